"""Capture: exact token means of the conditional half, no effect on images, clean hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icm.hooks.capture import capture_activations, token_mean
from icm.hooks.registry import DoubleHookError
from icm.hooks.sites import denoiser_of, list_sites

PROMPTS = ["a photo of a person", "a portrait of a woman"]


def run(pipe, guidance=7.5, per_prompt=2, seed=0):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(PROMPTS, num_images_per_prompt=per_prompt, num_inference_steps=4, height=32,
                width=32, guidance_scale=guidance, generator=generator, output_type="np").images


def full_outputs(pipe):
    """Plain forward hooks recording every site's whole output, as the reference."""
    recorded: dict[str, list[torch.Tensor]] = {}
    modules = dict(denoiser_of(pipe).named_modules())
    handles = [
        modules[s].register_forward_hook(
            lambda m, a, out, s=s: recorded.setdefault(s, []).append(out.detach().clone()))
        for s in list_sites(denoiser_of(pipe))
    ]
    return recorded, handles


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_means_equal_direct_computation(tiny_pipe, guidance):
    recorded, handles = full_outputs(tiny_pipe)
    try:
        with capture_activations(tiny_pipe) as cap:
            run(tiny_pipe, guidance)
            batch = cap.pop()
    finally:
        for h in handles:
            h.remove()
    assert list(batch.activations) == list_sites(denoiser_of(tiny_pipe))
    for site, outputs in recorded.items():
        assert len(outputs) == 4  # one call per step
        # With guidance the batch is [uncond x4, cond x4]; the conditional half comes second.
        cond = [o.chunk(2)[1] if guidance > 1 else o for o in outputs]
        expected = torch.stack([token_mean(c) for c in cond], dim=1).cpu().numpy()
        assert batch.activations[site].shape == (4, 4, expected.shape[-1])
        np.testing.assert_allclose(batch.activations[site], expected, rtol=1e-6, atol=1e-6)
    assert batch.timesteps.shape == (4,)
    assert np.all(np.diff(batch.timesteps) < 0)  # denoising runs from noisy to clean


def test_capture_does_not_change_images(tiny_pipe):
    plain = run(tiny_pipe)
    with capture_activations(tiny_pipe) as cap:
        captured = run(tiny_pipe)
        cap.pop()
    assert np.array_equal(plain, captured)


def test_pop_separates_generations(tiny_pipe):
    with capture_activations(tiny_pipe, sites=list_sites(denoiser_of(tiny_pipe))[:2]) as cap:
        run(tiny_pipe, per_prompt=1, seed=1)
        first = cap.pop()
        run(tiny_pipe, per_prompt=1, seed=2)
        second = cap.pop()
        with pytest.raises(RuntimeError, match="incomplete capture"):
            cap.pop()
    assert first.n_images == second.n_images == 2
    site = next(iter(first.activations))
    assert not np.array_equal(first.activations[site], second.activations[site])


def test_double_hooking_is_an_error_and_hooks_are_removed(tiny_pipe):
    unet = denoiser_of(tiny_pipe)
    with capture_activations(tiny_pipe):
        with pytest.raises(DoubleHookError, match="already hooked"):
            with capture_activations(tiny_pipe):
                pass
    with pytest.raises(ValueError, match="boom"):
        with capture_activations(tiny_pipe):
            raise ValueError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())
    assert "set_timesteps" not in vars(tiny_pipe.scheduler)
    with capture_activations(tiny_pipe):  # usable again after clean exits
        pass


def test_sites_are_listed_in_forward_order(tiny_pipe):
    sites = list_sites(denoiser_of(tiny_pipe))
    calls: list[str] = []
    modules = dict(denoiser_of(tiny_pipe).named_modules())
    handles = [modules[s].register_forward_hook(lambda m, a, o, s=s: calls.append(s))
               for s in sites]
    try:
        tiny_pipe("a photo", num_inference_steps=1, height=32, width=32, output_type="np")
    finally:
        for h in handles:
            h.remove()
    assert calls == sites
    assert [s.split(".")[0] for s in sites if s.endswith("attn1")][:3] == [
        "down_blocks", "down_blocks", "mid_block"]


def test_unknown_site_lists_valid_names(tiny_pipe):
    with pytest.raises(KeyError, match="mid_block.attentions.0.transformer_blocks.0.attn1"):
        capture_activations(tiny_pipe, sites=["mid_block.attn9"])


def test_explicit_cfg_half_must_be_even(tiny_pipe):
    site = list_sites(denoiser_of(tiny_pipe))[0]
    with capture_activations(tiny_pipe, sites=[site], cfg="cond_half") as cap:
        with pytest.raises(RuntimeError, match="odd size"):
            tiny_pipe(PROMPTS[:1], num_inference_steps=2, height=32, width=32,
                      guidance_scale=1.0, output_type="np")
        assert cap.sites == [site]
