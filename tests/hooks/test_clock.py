"""A step is a denoising-loop step on every scheduler: capture, probes and steering agree on
it, a start "of 50" means the same timestep everywhere, order-2 schedulers are refused."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from icm.hooks.capture import capture_activations
from icm.hooks.clock import (
    UnsupportedSchedulerError,
    denoising_timesteps,
    start_step,
    train_timesteps,
)
from icm.hooks.registry import SiteHooks
from icm.hooks.sites import denoiser_of
from icm.hooks.steering import steer_activations
from icm.models.configs import sd15_scheduler_config
from icm.models.families import image_stream
from icm.models.tiny import build_sd15_pipeline
from icm.probing.probes import Pair, fit_pair
from icm.toy.pipeline import toy_scheduler_config

SITE = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
PROMPTS = ["a photo of a person", "a portrait of a woman"]
FIRST_ORDER = ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
               "DPMSolverMultistepScheduler"]


def scheduler(name: str, config=None):
    return getattr(diffusers, name).from_config(config or sd15_scheduler_config())


def test_start_of_50_maps_by_timestep():
    ddim = denoising_timesteps(scheduler("DDIMScheduler"), 50)
    pndm = denoising_timesteps(scheduler("PNDMScheduler"), 50)
    assert len(ddim) == 50 and len(pndm) == 51  # PNDM repeats a timestep: 51 loop steps
    assert start_step(ddim, 1000, 15) == 15 and ddim[15] == 681
    assert start_step(pndm, 1000, 15) == 16 and pndm[16] == 681  # the same timestep
    toy = denoising_timesteps(diffusers.DDIMScheduler(**toy_scheduler_config()), 20)
    assert start_step(toy, 1000, 15) == 6  # the toy's 20 trailing steps
    euler = denoising_timesteps(scheduler("EulerDiscreteScheduler"), 50)
    assert 690 < euler[start_step(euler, 1000, 15)] <= 700
    assert start_step(ddim, 1000, 0) == 0 and start_step(ddim, 1000, 50) == 49


def test_order_two_schedulers_are_refused_by_name():
    heun = scheduler("HeunDiscreteScheduler")
    with pytest.raises(UnsupportedSchedulerError, match="HeunDiscreteScheduler"):
        denoising_timesteps(heun, 4)
    pipe = build_sd15_pipeline("tiny", scheduler="KDPM2DiscreteScheduler")
    with pytest.raises(UnsupportedSchedulerError, match="KDPM2DiscreteScheduler"):
        capture_activations(pipe).__enter__()
    assert not denoiser_of(pipe)._forward_pre_hooks  # nothing left behind


@pytest.fixture(scope="module")
def pipe():
    return build_sd15_pipeline("tiny", seed=0)


class Outputs(SiteHooks):
    """The site's whole output per step (steered, since steering hooks run first)."""

    purpose = "record"

    def __init__(self, pipe):
        super().__init__(pipe, [SITE], cfg="all")
        self.steps: list[torch.Tensor] = []

    def on_output(self, site, step, output):
        self.steps.append(image_stream(site, output).detach().clone())


def generate(pipe, guidance, steered=None):
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(8)]
    with Outputs(pipe) as record:
        kwargs = {"num_images_per_prompt": 4, "num_inference_steps": 4, "height": 32,
                  "width": 32, "guidance_scale": guidance, "generator": generators,
                  "output_type": "np"}
        if steered is None:
            pipe(PROMPTS, **kwargs)
        else:
            with steered:
                pipe(PROMPTS, **kwargs)
    return record.steps


@pytest.mark.parametrize("guidance", [7.5, 1.0])
@pytest.mark.parametrize("name", FIRST_ORDER)
def test_capture_probes_and_steering_share_the_loop_steps(pipe, name, guidance):
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    planned = denoising_timesteps(pipe.scheduler, 4)
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(8)]
    with capture_activations(pipe, [SITE]) as cap:
        pipe(PROMPTS, num_images_per_prompt=4, num_inference_steps=4, height=32, width=32,
             guidance_scale=guidance, generator=generators, output_type="np")
        batch = cap.pop()
    # The store's step axis is the pipeline's loop, with the timestep of each iteration.
    np.testing.assert_allclose(batch.timesteps, planned)
    assert batch.activations[SITE].shape[:2] == (8, len(planned))

    labels = np.array(["man", "woman"] * 4)
    (probe,) = fit_pair(batch.activations, labels, Pair("man", "woman"), min_per_class=2,
                        test_size=0.25)
    assert probe.directions.shape == (len(planned), batch.activations[SITE].shape[2])

    start = start_step(batch.timesteps, train_timesteps(pipe.scheduler), 15)
    assert batch.timesteps[start] <= 700 and (start == 0 or batch.timesteps[start - 1] > 700)
    plain = generate(pipe, guidance)
    alpha = 3.0
    steering = steer_activations(pipe, {SITE: probe.directions}, alpha, start,
                                 timesteps=batch.timesteps)
    steered = generate(pipe, guidance, steering)
    assert len(plain) == len(steered) == len(planned)
    cond = slice(8, 16) if guidance > 1 else slice(0, 8)
    for step in range(start):
        torch.testing.assert_close(steered[step], plain[step], rtol=0, atol=0)
    shift = (steered[start] - plain[start]).mean(dim=1)
    expected = torch.as_tensor(alpha * probe.directions[start], dtype=shift.dtype)
    torch.testing.assert_close(shift[cond], expected.expand_as(shift[cond]), rtol=1e-4,
                               atol=1e-4)
    if guidance > 1:  # the unconditional half is never steered
        torch.testing.assert_close(steered[start][:8], plain[start][:8], rtol=0, atol=0)


def test_steering_refuses_directions_fitted_at_other_timesteps(pipe):
    pipe.scheduler = scheduler("PNDMScheduler", pipe.scheduler.config)
    pndm = denoising_timesteps(pipe.scheduler, 4)
    width = dict(denoiser_of(pipe).named_modules())[SITE].to_out[0].out_features
    directions = {SITE: np.zeros((len(pndm), width), np.float32)}
    pipe.scheduler = scheduler("DDIMScheduler", pipe.scheduler.config)
    with pytest.raises(RuntimeError, match="fitted at"):
        generate(pipe, 7.5, steer_activations(pipe, directions, 1.0, 0, timesteps=pndm))


def test_more_denoiser_calls_than_timesteps_is_an_error(pipe):
    pipe.scheduler = scheduler("DDIMScheduler", pipe.scheduler.config)
    unet = denoiser_of(pipe)
    with capture_activations(pipe, [SITE]):
        pipe(PROMPTS[:1], num_inference_steps=2, height=32, width=32, output_type="np")
        latents = torch.zeros(2, 4, 16, 16)
        text = torch.zeros(2, 77, denoiser_of(pipe).config.cross_attention_dim)
        with pytest.raises(RuntimeError, match="more than once per step"):
            unet(latents, 1, encoder_hidden_states=text)
