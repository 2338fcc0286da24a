"""The toy diffusion model: an ordinary diffusers pipeline to capture and steering code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from icm.generation.samples import plan_samples
from icm.generation.shard import SamplerSettings, generate_images
from icm.hooks.capture import capture_activations
from icm.hooks.sites import list_sites
from icm.models.loading import ModelSpec, load_pipeline
from icm.toy.oracle import oracle_label
from icm.toy.pipeline import build_toy_pipeline
from icm.toy.train import ToyTrainConfig, save_toy, train_toy
from icm.toy.world import VOCABULARY, WorldConfig

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "resources" / "models" / "toy"
SETTINGS = SamplerSettings(steps=20, guidance_scale=1.5, resolution=16)


@pytest.fixture(scope="module")
def untrained():
    pipe = build_toy_pipeline(VOCABULARY, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sites_and_cfg_capture(untrained):
    sites = list_sites(untrained.unet)
    assert len(sites) == 15 and sum(s.endswith("attn1") for s in sites) == 7
    bottleneck = sites.index("mid_block")  # the h-space site, after the attention it holds
    assert sites[bottleneck - 1] == "mid_block.attentions.0.transformer_blocks.0.attn2"
    site = "mid_block.attentions.0.transformer_blocks.0.attn1"
    full: list[torch.Tensor] = []
    module = dict(untrained.unet.named_modules())[site]
    handle = module.register_forward_hook(lambda m, a, out: full.append(out.detach().clone()))
    try:
        with capture_activations(untrained, [site]) as cap:
            untrained(["a red circle", "a shape"], num_inference_steps=3, guidance_scale=1.5,
                      output_type="np")
            batch = cap.pop()
    finally:
        handle.remove()
    assert full[0].shape[0] == 4  # [uncond, uncond, cond, cond]
    expected = torch.stack([o[2:].mean(dim=1) for o in full], dim=1).numpy()
    np.testing.assert_allclose(batch.activations[site], expected, rtol=1e-6, atol=1e-6)


def test_save_load_round_trip_is_bit_identical(untrained, tmp_path):
    save_toy(untrained, {"note": "untrained"}, tmp_path / "toy")
    loaded = load_pipeline(ModelSpec(name="toy", family="toy", source=str(tmp_path / "toy"),
                                     dtype="float32", steps=4), device="cpu")
    samples = plan_samples(["a red circle", "a square"], 2, base_seed=0)
    settings = SamplerSettings(steps=4, guidance_scale=1.5, resolution=16)
    for a, b in zip(generate_images(untrained, samples, settings),
                    generate_images(loaded, samples, settings)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError, match="unsupported"):
        untrained("a circle", num_inference_steps=2, negative_prompt="x")


def test_training_is_deterministic_and_recorded():
    config = ToyTrainConfig(steps=6, batch_size=8, n_train=64, warmup_steps=2,
                            world=WorldConfig(image_size=16))
    first, record = train_toy(config, progress=False)
    second, _ = train_toy(config, progress=False)
    for a, b in zip(first.unet.parameters(), second.unet.parameters()):
        assert torch.equal(a, b)
    assert record["train"]["steps"] == 6 and len(record["loss_curve"]) == 1
    assert record["train"]["world"]["color_given_shape"]["circle"]["red"] == 0.8


@pytest.mark.skipif(not COMMITTED.exists(), reason="toy weights not trained yet")
def test_committed_toy_model_follows_prompts_and_planted_bias():
    pipe = load_pipeline(ModelSpec(name="toy", family="toy", source=str(COMMITTED),
                                   dtype="float32", steps=20), device="cpu")
    full = [oracle_label(np.asarray(im)) for im in
            generate_images(pipe, plan_samples(["a green triangle"], 16, 7), SETTINGS)]
    assert sum(lab.color == "green" and lab.shape == "triangle" for lab in full) >= 13
    circles = [oracle_label(np.asarray(im)) for im in
               generate_images(pipe, plan_samples(["a circle"], 64, 7), SETTINGS)]
    red = sum(lab.color == "red" for lab in circles) / len(circles)
    assert 0.6 <= red <= 0.95
