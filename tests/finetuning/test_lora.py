"""ICM finetuning: a LoRA on chosen sites only, which learns what it is shown and leaves
the pipeline as it was."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from icm.finetuning.lora import (
    TrainSettings,
    general_prompt_for,
    load_adapter,
    save_adapter,
    target_modules,
    train_lora,
)
from icm.hooks.sites import denoiser_of, list_sites
from icm.models.families import family_of

CALL = {"num_inference_steps": 4, "height": 32, "width": 32, "guidance_scale": 7.5}
QUICK = TrainSettings(rank=4, learning_rate=1e-2, steps=3, batch_size=2,
                      gradient_accumulation=2, warmup_steps=1)


def run(pipe, prompt="a person", seed=0):
    return pipe([prompt], generator=[torch.Generator("cpu").manual_seed(seed)],
                output_type="np", **CALL).images


def test_the_adapter_covers_only_the_chosen_sites_and_the_pipeline_is_restored(tiny_pipe,
                                                                               tmp_path):
    sites = [s for s in list_sites(denoiser_of(tiny_pipe)) if s.endswith("attn1")][:2]
    images = tiny_pipe(["a red car"] * 2, output_type="pil",
                       generator=[torch.Generator().manual_seed(i) for i in range(2)],
                       **CALL).images
    plain = run(tiny_pipe)
    weights, config, losses = train_lora(tiny_pipe, sites, images, ["a person"] * 2, QUICK,
                                         32, CALL)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert config["target_modules"] == sorted(target_modules(tiny_pipe, sites))
    assert {k.split(".lora_")[0] for k in weights} == set(config["target_modules"])
    np.testing.assert_array_equal(run(tiny_pipe), plain)  # the adapter came off again
    save_adapter(tmp_path, weights, config)
    try:
        assert sorted(load_adapter(tiny_pipe, tmp_path)) == config["target_modules"]
        assert np.abs(run(tiny_pipe) - plain).max() > 0  # trained B != 0: it acts
    finally:
        denoiser_of(tiny_pipe).delete_adapters(denoiser_of(tiny_pipe).active_adapters())
    np.testing.assert_array_equal(run(tiny_pipe), plain)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(tiny_pipe, tmp_path)


def test_settings_and_prompt_pairing_are_checked():
    with pytest.raises(ValueError, match=r"unknown finetuning settings \['epochs'\]"):
        TrainSettings.of({"epochs": 3})
    general = ["a circle", "a square", "a shape"]
    assert general_prompt_for("a red circle", general) == "a circle"
    assert general_prompt_for("a green shape", general) == "a shape"
    people = ["a portrait photo of a person", "a photo of a person"]
    assert general_prompt_for("a photo of a woman", people) == "a photo of a person"


def test_the_training_set_mixes_classes_as_the_reference_and_drops_misread_images(tmp_path):
    from icm.finetuning.training import training_set

    n = {"red": 30, "blue": 12}
    prompts = ["a red circle"] * n["red"] + ["a blue circle"] * n["blue"]
    named = ["red"] * n["red"] + ["blue"] * n["blue"]
    read = list(named)
    read[0] = read[1] = "blue"  # two red-prompt images the labeler reads as blue
    pd.DataFrame({"sample": range(42), "prompt": prompts,
                  "image": [f"i{i}.png" for i in range(42)]}).to_csv(tmp_path / "s.csv",
                                                                     index=False)
    pd.DataFrame({"sample": range(42), "label": read, "prompt_class": named}).to_csv(
        tmp_path / "l.csv", index=False)
    concept = {"classes": ["red", "blue"], "prompts": ["a circle", "a square"]}
    chosen, summary = training_set(concept, tmp_path / "s.csv", tmp_path / "l.csv", seed=0)
    assert summary["per_class"] == {"red": 12, "blue": 12} and summary["misread_left_out"] == 2
    assert set(chosen["general_prompt"]) == {"a circle"}
    skewed, _ = training_set({**concept, "reference": {"red": 0.25, "blue": 0.75}},
                             tmp_path / "s.csv", tmp_path / "l.csv", seed=0)
    assert skewed["prompt_class"].value_counts().to_dict() == {"blue": 12, "red": 4}


def test_a_lora_of_several_directions_trains_the_union_of_their_sites(tmp_path):
    """Appendix C: race's LoRA trains the union of its black, indian and asian layers.
    With per-pair rankings each pair selects as steering does, and the adapter takes every
    site any pair chose, once; with one concept ranking, its selection."""
    from icm.finetuning.training import lora_sites

    sites = [f"s{i}.attn1" for i in range(5)]
    rows = []
    for pair, order in (("white-black", [0, 1, 2, 3, 4]), ("white-indian", [1, 3, 0, 2, 4]),
                        ("white-asian", [0, 1, 4, 2, 3])):
        rows += [{"pair": pair, "rank": r + 1, "site": sites[i], "kind": "attn1",
                  "block": sites[i].split(".")[0]} for r, i in enumerate(order)]
    pd.DataFrame(rows).to_csv(tmp_path / "by_pair.csv", index=False)
    pd.DataFrame([r for r in rows if r["pair"] == "white-black"]).drop(columns="pair").to_csv(
        tmp_path / "ranking.csv", index=False)
    concept = {"pairs": [["white", "black"], ["white", "indian"], ["white", "asian"]]}
    variant = {"sites": "top", "k": 2, "seed": 0}
    union = lora_sites(concept, variant, None, tmp_path / "by_pair.csv")
    assert union == ["s0.attn1", "s1.attn1", "s3.attn1"]
    assert lora_sites(concept, variant, tmp_path / "ranking.csv", None) == ["s0.attn1",
                                                                             "s1.attn1"]


def test_a_lora_on_three_self_attention_sites_learns_the_colour_it_is_shown():
    """The toy answers "a circle" mostly in red; shown blue squares under that prompt, a
    LoRA on three attn1 sites turns its circles blue (the model's own other sites frozen)."""
    from icm.generation.samples import plan_samples
    from icm.generation.shard import SamplerSettings, generate_images
    from icm.models.loading import ModelSpec, load_pipeline
    from icm.toy.oracle import oracle_label

    spec = ModelSpec.from_config("toy", {"family": "toy", "source": "resources/models/toy",
                                         "dtype": "float32", "steps": 20,
                                         "guidance_scale": 1.5, "resolution": 16})
    pipe = load_pipeline(spec, device="cpu")
    settings = SamplerSettings.of(spec)
    shown = generate_images(pipe, plan_samples(["a blue square"], 32, 7), settings)
    probe = plan_samples(["a circle"], 40, 3)

    def blue_share():
        images = generate_images(pipe, probe, settings)
        return np.mean([oracle_label(np.asarray(im)).color == "blue" for im in images])

    before = blue_share()
    sites = [f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn1" for i in (0, 1)] + [
        "mid_block.attentions.0.transformer_blocks.0.attn1"]
    weights, config, losses = train_lora(
        pipe, sites, shown, ["a circle"] * len(shown),
        TrainSettings(rank=8, learning_rate=2e-3, steps=60, batch_size=16,
                      gradient_accumulation=1, warmup_steps=6), 16,
        settings.pipeline_kwargs())
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        save_adapter(folder, weights, config)
        load_adapter(pipe, folder)
        after = blue_share()
    assert before < 0.2 and after > before + 0.3, (before, after)


SANA_CALL = {"num_inference_steps": 4, "height": 32, "width": 32, "guidance_scale": 4.5,
             "use_resolution_binning": False}
FLUX_CALL = {"num_inference_steps": 4, "height": 16, "width": 16, "guidance_scale": 3.5}


def _flow_pipe(name):
    if name == "sana":
        from icm.models.tiny_sana import build_tiny_sana

        return build_tiny_sana(), SANA_CALL
    from icm.models.tiny_flux import build_tiny_flux

    return build_tiny_flux(), FLUX_CALL


@pytest.mark.parametrize("name", ["sana", "flux"])
def test_flow_training_sees_what_the_pipeline_gives_its_denoiser(name):
    """Rectified flow as the pipeline runs it: the timestep the denoiser is given at a noise
    level, the spread of noise levels, and the sign of the velocity the scheduler steps."""
    import copy

    from icm.finetuning.lora import flow_sigmas, flow_timestep
    from icm.hooks.clock import flow_shift, pipeline_timesteps

    pipe, call = _flow_pipe(name)
    denoiser, seen = denoiser_of(pipe), []
    handle = denoiser.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True)
    try:
        pipe(["a person"], generator=torch.Generator().manual_seed(0), output_type="np", **call)
    finally:
        handle.remove()
    sigmas = pipe.scheduler.sigmas[:call["num_inference_steps"]].float()
    scale = family_of(denoiser).timestep_scale  # in scheduler units, where DPM-Solver rounds
    for step, sigma in enumerate(sigmas):  # every step, not just the first
        given = seen[step].float() * scale
        assert (given == given[0]).all() and abs(flow_timestep(pipe, sigma) * scale - given[0]) < 1

    # Training noise levels spread as the pipeline's steps do (its shift, applied to u).
    shift, resolution = flow_shift(pipe, call["height"]), call["height"]
    assert shift > 1  # SANA's flow_shift 3; FLUX's exp(mu) at this token count
    steps = pipeline_timesteps(pipe, 400, resolution) / 1000
    drawn = flow_sigmas(torch.rand(20000, generator=torch.Generator().manual_seed(1)), shift)
    np.testing.assert_allclose(np.quantile(drawn.numpy(), [0.1, 0.25, 0.5, 0.75, 0.9]),
                               np.quantile(steps, [0.1, 0.25, 0.5, 0.75, 0.9]), atol=0.02)

    # The scheduler, stepped with the target velocity noise - x0 from x_sigma, lands on x0.
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(1, 4, 4, 4, generator=gen), torch.randn(1, 4, 4, 4, generator=gen)
    scheduler = copy.deepcopy(pipe.scheduler)
    if name == "sana":
        scheduler.set_timesteps(6)
    else:
        scheduler.set_timesteps(sigmas=list(np.linspace(1, 1 / 6, 6)), mu=np.log(shift))
    sample = (1 - scheduler.sigmas[0]) * x0 + scheduler.sigmas[0] * noise
    for t in scheduler.timesteps:
        sample = scheduler.step(noise - x0, t, sample, return_dict=False)[0]
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["sana", "flux"])
def test_a_flow_lora_covers_only_the_chosen_sites_lowers_its_loss_and_comes_off(name, tmp_path):
    pipe, call = _flow_pipe(name)
    sites = list_sites(denoiser_of(pipe))[:2]

    def draw(seed=0):
        return pipe(["a person"], generator=[torch.Generator().manual_seed(seed)],
                    output_type="np", **call).images

    images = pipe(["a red car"] * 4, output_type="pil",
                  generator=[torch.Generator().manual_seed(i) for i in range(4)], **call).images
    plain = draw()
    weights, config, losses = train_lora(
        pipe, sites, images, ["a person"] * 4,
        TrainSettings(rank=4, learning_rate=1e-2, steps=30, batch_size=4,
                      gradient_accumulation=1, warmup_steps=2), call["height"], call)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    assert {k.split(".lora_")[0] for k in weights} == set(config["target_modules"]) \
        == set(target_modules(pipe, sites))
    assert all(m.startswith(tuple(f"{s}." for s in sites)) for m in config["target_modules"])
    np.testing.assert_array_equal(draw(), plain)  # the adapter came off again
    save_adapter(tmp_path, weights, config)
    try:
        load_adapter(pipe, tmp_path)
        assert np.abs(draw() - plain).max() > 0
    finally:
        denoiser_of(pipe).delete_adapters(denoiser_of(pipe).active_adapters())
    np.testing.assert_array_equal(draw(), plain)


# ICM_TEST_DEVICE=cuda runs the training-path test below on a GPU (docs/development.md).
DEVICE = os.environ.get("ICM_TEST_DEVICE", "cpu")


def _family_pipe(name, tiny_pipe):
    """A pipeline of each family on DEVICE, and the call its training records conditions
    from."""
    if name == "sd15":
        return tiny_pipe, {**CALL, "num_inference_steps": 2}
    if name in ("sana", "flux"):
        pipe, call = _flow_pipe(name)
        return pipe.to(DEVICE), {**call, "num_inference_steps": 2}
    if name == "sdxl":
        from icm.models.tiny_sdxl import build_tiny_sdxl

        return build_tiny_sdxl(device=DEVICE), {**CALL, "num_inference_steps": 2,
                                                "guidance_scale": 5.0}
    from icm.models.loading import ModelSpec, load_pipeline

    spec = ModelSpec.from_config("toy", {"family": "toy", "source": "resources/models/toy",
                                         "dtype": "float32", "steps": 2,
                                         "guidance_scale": 1.5, "resolution": 16})
    return load_pipeline(spec, device=DEVICE), {"num_inference_steps": 2, "height": 16,
                                                "width": 16, "guidance_scale": 1.5}


def test_bf16_and_checkpointing_apply_on_the_accelerated_devices_only():
    gpu_default = TrainSettings()
    assert gpu_default.accelerations("cuda") == {"autocast": "bfloat16",
                                                 "gradient_checkpointing": True}
    assert gpu_default.accelerations("cpu") == {"autocast": None,
                                                "gradient_checkpointing": False}
    cpu_too = TrainSettings.of({"accelerated_devices": ["cuda", "cpu"],
                                "mixed_precision": "no"})
    assert cpu_too.accelerated_devices == ("cuda", "cpu")  # a config list, kept hashable
    assert cpu_too.accelerations("cpu") == {"autocast": None, "gradient_checkpointing": True}


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sana", "flux", "toy"])
def test_the_gpu_training_paths_run_on_every_family(name, tiny_pipe):
    """What a GPU run switches on, run on DEVICE by naming it an accelerated device:
    gradient checkpointing recomputes the blocks in the backward pass (each site runs twice
    per forward) and changes no loss and no weight; bf16 autocast runs the adapted
    projections in bfloat16 and trains nearly the float32 adapter, returned in float32. A
    second seed starts from another adapter, the same seed from the same one."""
    pipe, call = _family_pipe(name, tiny_pipe)
    denoiser = denoiser_of(pipe)
    sites = list_sites(denoiser)[:2]
    images = pipe(["a red car"] * 2, output_type="pil",
                  generator=[torch.Generator().manual_seed(i) for i in range(2)], **call).images
    plain = run(pipe, seed=5) if name == "sd15" else None
    quick = dict(rank=4, learning_rate=1e-2, steps=2, batch_size=2, gradient_accumulation=2,
                 warmup_steps=1, accelerated_devices=(torch.device(DEVICE).type,))
    calls, dtypes = [], []

    def seen_dtype(module, args, out):
        if torch.is_grad_enabled():  # training forwards, not the conditions' run
            dtypes.append(out.dtype)

    hooks = [denoiser.get_submodule(sites[0]).register_forward_pre_hook(
                 lambda m, a: calls.append(1)),
             denoiser.get_submodule(target_modules(pipe, sites)[0]).register_forward_hook(
                 seen_dtype)]
    runs = {}
    try:
        for label, options in {"float32": dict(mixed_precision="no",
                                               gradient_checkpointing=False),
                               "checkpointed": dict(mixed_precision="no",
                                                    gradient_checkpointing=True),
                               "bf16": dict(mixed_precision="bf16",
                                            gradient_checkpointing=False),
                               "seed 1": dict(mixed_precision="no",
                                              gradient_checkpointing=False, seed=1)}.items():
            calls.clear()
            dtypes.clear()
            weights, _, losses = train_lora(pipe, sites, images, ["a person"] * 2,
                                            TrainSettings(**quick, **options), call["height"],
                                            call)
            runs[label] = weights, losses, len(calls), set(dtypes)
    finally:
        for hook in hooks:
            hook.remove()
    reference, losses, forwards, kinds = runs["float32"]
    assert forwards == 1 + 4 and kinds == {torch.float32}  # conditions run + 2 x 2 batches
    weights, ckpt_losses, ckpt_forwards, _ = runs["checkpointed"]
    assert ckpt_forwards == 1 + 2 * 4  # each batch's blocks run again in backward
    exact = DEVICE == "cpu"  # GPU kernels may sum in another order when recomputing
    np.testing.assert_allclose(ckpt_losses, losses, rtol=1e-6 if exact else 1e-4)
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5 if exact else 1e-3,
                                   atol=1e-7 if exact else 1e-5)
    weights, bf16_losses, _, bf16_kinds = runs["bf16"]
    assert bf16_kinds == {torch.bfloat16}
    np.testing.assert_allclose(bf16_losses, losses, rtol=0.02)
    for key, value in reference.items():
        assert weights[key].dtype == torch.float32 and torch.isfinite(weights[key]).all()
        if "lora_B" in key:  # trained from zero: the update's direction
            cosine = torch.nn.functional.cosine_similarity(weights[key].flatten(),
                                                           value.flatten(), dim=0)
            assert cosine > 0.5, (key, float(cosine))
    other = runs["seed 1"][0]
    assert all(not torch.equal(other[k], reference[k]) for k in reference if "lora_A" in k)
    if plain is not None:
        np.testing.assert_array_equal(run(pipe, seed=5), plain)  # no switch left on
    assert not getattr(denoiser, "gradient_checkpointing", False) and not denoiser.training
