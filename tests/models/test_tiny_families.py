"""Capture and steering on the tiny replicas of the other families, read through the family
table: the same guarantees as SD1.5's (tests/hooks/test_capture.py,
tests/steering/test_steering.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icm.hooks.capture import capture_activations, token_mean
from icm.hooks.registry import SiteHooks
from icm.hooks.sites import denoiser_of, list_sites
from icm.hooks.steering import steer_activations
from icm.models.families import FAMILIES, image_stream, site_width

PROMPTS = ["a photo of a person", "a portrait of a woman"]
STEPS = 3


# Per family: how the tests call the tiny pipeline (FLUX.1-dev: its guidance embedding).
CALLS = {"sdxl": {"height": 32, "width": 32, "guidance_scale": 5.0},
         "sana": {"height": 32, "width": 32, "guidance_scale": 4.5, "max_sequence_length": 16,
                  "use_resolution_binning": False, "complex_human_instruction": None},
         "flux": {"height": 16, "width": 16, "guidance_scale": 3.5, "max_sequence_length": 16}}


@pytest.fixture(scope="module", params=sorted(CALLS))
def family_pipe(request):
    from icm.models.tiny_flux import build_tiny_flux
    from icm.models.tiny_sana import build_tiny_sana
    from icm.models.tiny_sdxl import build_tiny_sdxl

    builders = {"sdxl": build_tiny_sdxl, "sana": build_tiny_sana, "flux": build_tiny_flux}
    pipe = builders[request.param](seed=0)
    pipe.icm_test_family = request.param
    return pipe


def run(pipe):
    generator = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=STEPS, generator=generator, output_type="np",
                **CALLS[pipe.icm_test_family]).images


def conditional_rows(pipe, rows):
    """The conditional rows of a denoiser batch, as the family table lays guidance out."""
    return slice(0, rows) if FAMILIES[pipe.icm_test_family].guidance == "embedded" \
        else slice(rows // 2, rows)


class RowMeans(SiteHooks):
    """Token mean of every row of a site's image stream at every step, as a plain hook."""

    purpose = "record"

    def __init__(self, pipe, sites):
        super().__init__(pipe, sites, cfg="all")
        self.means = {s: [] for s in self.sites}

    def on_output(self, site, step, output):
        self.means[site].append(token_mean(image_stream(site, output)).detach().clone())


def test_capture_records_the_conditional_means_and_changes_no_pixel(family_pipe):
    sites = list_sites(denoiser_of(family_pipe))
    plain = run(family_pipe)
    with capture_activations(family_pipe, sites) as capture, RowMeans(family_pipe, sites) as raw:
        captured = run(family_pipe)
        batch = capture.pop()
    np.testing.assert_array_equal(captured, plain)  # bit-identical with capture on
    for site in sites:
        rows = torch.stack(raw.means[site], dim=1)  # (rows, steps, C)
        cond = conditional_rows(family_pipe, rows.shape[0])
        assert rows[cond].shape[0] == len(PROMPTS)
        np.testing.assert_allclose(batch.activations[site], rows[cond].numpy(),
                                   rtol=1e-6, atol=1e-6)
    # steps are the scheduler's, in its units (FLUX's transformer is given t / 1000)
    np.testing.assert_allclose(batch.timesteps, family_pipe.scheduler.timesteps.numpy(),
                               rtol=1e-5)


def test_the_timestep_plan_is_the_pipelines_own_at_every_size(family_pipe):
    """What steering checks its probes against: FLUX's timesteps shift with the image's
    token count, so 16 and 64 px run different timesteps, and the plan follows."""
    from icm.hooks.clock import pipeline_timesteps

    seen = {}
    for size in (16, 64) if family_pipe.icm_test_family == "flux" else (32,):
        call = {**CALLS[family_pipe.icm_test_family], "height": size, "width": size}
        with capture_activations(family_pipe, list_sites(denoiser_of(family_pipe))[:1]) as cap:
            family_pipe(PROMPTS[:1], num_inference_steps=STEPS, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(0), **call)
            seen[size] = cap.pop().timesteps
        np.testing.assert_allclose(pipeline_timesteps(family_pipe, STEPS, size), seen[size],
                                   rtol=1e-6)
    if len(seen) == 2:
        assert not np.allclose(seen[16], seen[64])


def test_steering_is_the_identity_at_zero_and_alpha_v_on_conditional_rows(family_pipe):
    denoiser = denoiser_of(family_pipe)
    sites = list_sites(denoiser)
    rng = np.random.default_rng(0)
    directions = {}
    for site in sites:  # random directions: a constant vector is removed by LayerNorm
        v = rng.standard_normal((STEPS, site_width(denoiser, site))).astype(np.float32)
        directions[site] = v / np.linalg.norm(v, axis=1, keepdims=True)
    plain = run(family_pipe)
    with steer_activations(family_pipe, directions, alpha=0.0, start_step=0):
        np.testing.assert_array_equal(run(family_pipe), plain)
    site, t0, alpha = sites[0], 1, 3.0
    with RowMeans(family_pipe, [site]) as before:
        run(family_pipe)
    with (steer_activations(family_pipe, {site: directions[site]}, alpha, t0),
          RowMeans(family_pipe, [site]) as after):
        moved = run(family_pipe)
    assert np.abs(moved - plain).max() > 1e-4
    torch.testing.assert_close(after.means[site][0], before.means[site][0], rtol=0, atol=0)
    shift = after.means[site][t0] - before.means[site][t0]
    cond = conditional_rows(family_pipe, shift.shape[0])
    expected = alpha * torch.as_tensor(directions[site][t0])
    torch.testing.assert_close(shift[cond], expected.expand_as(shift[cond]), rtol=0, atol=1e-5)
    others = torch.ones(shift.shape[0], dtype=torch.bool)
    others[cond] = False
    assert others.sum() == 0 or shift[others].abs().max() == 0


def test_a_saved_replica_loads_back_through_the_real_loading_code(family_pipe, tmp_path):
    from icm.models.loading import ModelSpec, load_pipeline
    from icm.models.tiny import save_replica
    from icm.models.tiny_flux import build_tiny_flux
    from icm.models.tiny_sana import build_tiny_sana
    from icm.models.tiny_sdxl import build_tiny_sdxl

    family = family_pipe.icm_test_family
    builders = {"sdxl": build_tiny_sdxl, "sana": build_tiny_sana, "flux": build_tiny_flux}
    folder = save_replica(builders[family], tmp_path / family)
    loaded = load_pipeline(ModelSpec(name=f"tiny-{family}", family=family, dtype="float32",
                                     source=str(folder)), device="cpu")
    assert type(loaded) is type(family_pipe)
    loaded.icm_test_family = family
    np.testing.assert_array_equal(run(loaded), run(family_pipe))


def raw_means(pipe, site):
    """Token means of every call of ``site`` (a plain torch hook, outside the registry)."""
    calls = []
    module = denoiser_of(pipe).get_submodule(site)
    handle = module.register_forward_hook(
        lambda m, a, out: calls.append(image_stream(site, out).mean(dim=1).detach().clone()))
    return calls, handle


def test_flux_true_cfg_calls_are_skipped_by_capture_and_steering():
    """FLUX with true_cfg_scale > 1 calls its transformer twice per step (conditional, then
    unconditional): the step is the loop index, capture keeps the conditional call only,
    steering touches only it."""
    from icm.models.tiny_flux import build_tiny_flux

    pipe = build_tiny_flux(seed=0)
    pipe.icm_test_family = "flux"
    calls = {**CALLS["flux"], "true_cfg_scale": 2.0, "negative_prompt": ["blurry"] * 2}

    def run_cfg():
        generator = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]
        return pipe(PROMPTS, num_inference_steps=STEPS, generator=generator,
                    output_type="np", **calls).images

    site = list_sites(denoiser_of(pipe))[0]
    plain_calls, handle = raw_means(pipe, site)
    with capture_activations(pipe, [site]) as capture:
        run_cfg()
        batch = capture.pop()
    handle.remove()
    assert len(plain_calls) == 2 * STEPS  # cond, uncond per step
    np.testing.assert_allclose(batch.activations[site][:, :, :],
                               torch.stack(plain_calls[0::2], dim=1).numpy(), atol=1e-6)
    np.testing.assert_allclose(batch.timesteps, pipe.scheduler.timesteps.numpy(), rtol=1e-5)
    v = np.random.default_rng(0).standard_normal((STEPS, site_width(denoiser_of(pipe), site)))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    steered_calls, handle = raw_means(pipe, site)
    with steer_activations(pipe, {site: v}, alpha=2.0, start_step=0):
        run_cfg()
    handle.remove()
    cond_shift = steered_calls[0] - plain_calls[0]  # step 0, identical inputs
    torch.testing.assert_close(cond_shift, 2.0 * torch.as_tensor(v[0]).expand_as(cond_shift),
                               rtol=0, atol=1e-5)
    assert (steered_calls[1] - plain_calls[1]).abs().max() == 0  # the unconditional call


def test_sdxl_with_guidance_off_captures_every_row():
    from icm.models.tiny_sdxl import build_tiny_sdxl

    pipe = build_tiny_sdxl(seed=0)
    site = list_sites(denoiser_of(pipe))[0]
    plain_calls, handle = raw_means(pipe, site)
    with capture_activations(pipe, [site]) as capture:
        generator = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]
        pipe(PROMPTS, num_inference_steps=STEPS, generator=generator, output_type="np",
             height=32, width=32, guidance_scale=1.0)
        batch = capture.pop()
    handle.remove()
    assert len(plain_calls) == STEPS and plain_calls[0].shape[0] == len(PROMPTS)  # no doubling
    np.testing.assert_allclose(batch.activations[site], torch.stack(plain_calls, 1).numpy(),
                               atol=1e-6)


def test_pipeline_arguments_reach_every_call_and_bad_ones_stop_before_any_image(tmp_path):
    """models.<m>.pipeline_arguments: SANA's complex human instruction changes the images
    (it is prepended to each prompt); a misspelt or workflow-owned key is refused."""
    from icm.generation.samples import Sample
    from icm.generation.shard import SamplerSettings, generate_images
    from icm.models.loading import ModelSpec, load_pipeline
    from icm.models.tiny import save_replica
    from icm.models.tiny_sana import build_tiny_sana

    folder = save_replica(build_tiny_sana, tmp_path / "sana")

    def spec(arguments):
        return ModelSpec.from_config("tiny-sana", {
            "family": "sana", "source": str(folder), "dtype": "float32", "steps": 2,
            "resolution": 32, "pipeline_arguments": arguments})

    samples = [Sample(0, 0, 0, "a photo of a person", 7)]
    images = {}
    for name, arguments in {"instruction": {"use_resolution_binning": False},
                            "plain": {"use_resolution_binning": False,
                                      "complex_human_instruction": None}}.items():
        settings = SamplerSettings.of(spec(arguments))
        assert settings.record()["arguments"] == arguments
        images[name] = np.asarray(generate_images(load_pipeline(spec(arguments), "cpu"),
                                                  samples, settings)[0])
    assert images["instruction"].shape == images["plain"].shape == (32, 32, 3)  # not binned
    assert not np.array_equal(images["instruction"], images["plain"])
    with pytest.raises(ValueError, match=r"SanaPipeline takes no argument \['use_binning'\]"):
        load_pipeline(spec({"use_binning": False}), "cpu")
    with pytest.raises(ValueError, match=r"may not set \['height'\]"):
        load_pipeline(spec({"height": 64}), "cpu")
