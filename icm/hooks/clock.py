"""What "step s" means: the pipeline's own denoising-loop index, the same timestep everywhere.

Diffusers pipelines loop ``for i, t in enumerate(scheduler.timesteps)`` and call the denoiser
once per iteration, so the loop index is the count of denoiser calls since
``set_timesteps``: that is the step index of every store, probe and steering vector.
The loop does not always run ``num_inference_steps`` times: PNDM (Stable Diffusion 1.5's
shipped scheduler) repeats its first timestep after the first, so 50 steps are 51
iterations. Every stage therefore takes the step count and the timesteps from the
activation store, never from the ``steps`` setting.

Schedulers of order 2 (Heun, DPM2, ...) run two loop iterations per step, evaluating the
denoiser at an intermediate point: their iterations are not one step each, so they are
refused with an error naming the scheduler.

A start step given "of 50" (the paper's step 15 of 50) maps by timestep: the first step
whose timestep is at most ``T * (1 - start / 50)``, with T the scheduler's training
timesteps (1000). On DDIM with 50 steps that is step 15 (timestep 681), on PNDM step 16
(the same timestep 681), on the toy's 20 trailing steps step 6 (timestep 699).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np


class UnsupportedSchedulerError(ValueError):
    """The scheduler calls the denoiser more than once per denoising step."""


def check_scheduler(scheduler: Any) -> None:
    """Refuse schedulers whose loop iterations are not one denoising step each."""
    order = int(getattr(scheduler, "order", 1))
    if order != 1:
        raise UnsupportedSchedulerError(
            f"{type(scheduler).__name__} is a order-{order} scheduler: it calls the denoiser "
            f"{order} times per denoising step, so a loop iteration is not one step of the "
            "activation store. Use a first-order scheduler (DDIMScheduler, PNDMScheduler, "
            "EulerDiscreteScheduler, DPMSolverMultistepScheduler, ...) in "
            "`models.<name>.scheduler`.")


def train_timesteps(scheduler: Any) -> int:
    """T, the number of timesteps the model was trained with (1000 for every family here)."""
    return int(scheduler.config.get("num_train_timesteps", 1000))


def denoising_timesteps(scheduler: Any, steps: int, **options: Any) -> np.ndarray:
    """The timesteps a pipeline loop runs for ``steps`` inference steps, one per iteration,
    computed on a copy of the scheduler (the pipeline's own is left as it is). ``options``
    go to ``set_timesteps`` as the pipeline passes them (FLUX: ``sigmas`` and ``mu``)."""
    check_scheduler(scheduler)
    twin = copy.deepcopy(scheduler)
    if "sigmas" in options:
        twin.set_timesteps(**options)
    else:
        twin.set_timesteps(steps, **options)
    return np.asarray(twin.timesteps, dtype=np.float64)


def pipeline_timesteps(pipe: Any, steps: int, resolution: int) -> np.ndarray:
    """The timesteps ``pipe`` runs for ``steps`` steps at ``resolution``, set the way its
    family's pipeline sets them (``Family.schedule``): by the scheduler alone, or as FLUX
    does, sigmas ``linspace(1, 1/N, N)`` (unless the scheduler makes flow sigmas itself)
    shifted by ``mu``, which grows with the packed image's token count."""
    from icm.hooks.sites import denoiser_of
    from icm.models.families import family_of

    if family_of(denoiser_of(pipe)).schedule != "flux":
        return denoising_timesteps(pipe.scheduler, steps)
    config = pipe.scheduler.config
    mu = flux_mu(pipe, resolution)
    if config.get("use_flow_sigmas"):
        return denoising_timesteps(pipe.scheduler, steps, mu=mu)
    return denoising_timesteps(pipe.scheduler, steps,
                               sigmas=list(np.linspace(1.0, 1 / steps, steps)), mu=mu)


def flux_mu(pipe: Any, resolution: int) -> float:
    """FLUX's time shift ``mu`` at ``resolution``: it grows with the packed image's token
    count (2 x 2 latent patches), as ``FluxPipeline`` computes it."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = pipe.scheduler.config
    tokens = (resolution // (pipe.vae_scale_factor * 2)) ** 2
    return float(calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15)))


def flow_shift(pipe: Any, resolution: int) -> float:
    """The shift ``s`` of a flow-matching pipeline's noise levels at ``resolution``: its
    sigmas are ``s u / (1 + (s - 1) u)`` of an evenly spaced ``u``. SANA's DPM-Solver names
    it ``flow_shift``, a static flow-match scheduler ``shift``; FLUX's dynamic shift is
    ``exp(mu)`` (the exponential time shift is the same map)."""
    from icm.hooks.sites import denoiser_of
    from icm.models.families import family_of

    config = pipe.scheduler.config
    if family_of(denoiser_of(pipe)).schedule == "flux" and config.get("use_dynamic_shifting"):
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"time_shift_type {config['time_shift_type']!r}: only FLUX's "
                             "exponential time shift is a static shift")
        return float(np.exp(flux_mu(pipe, resolution)))
    if config.get("use_flow_sigmas"):
        return float(config.get("flow_shift", 1.0))
    return float(config.get("shift", 1.0))


def start_step(timesteps: Sequence[float], num_train_timesteps: int, start_of_50: int) -> int:
    """The first step whose timestep is at most ``T * (1 - start_of_50 / 50)``; the last step
    when none is (a start at or past the end of the schedule)."""
    timesteps = np.asarray(timesteps, dtype=np.float64)
    if timesteps.ndim != 1 or not len(timesteps):
        raise ValueError(f"need a 1-d sequence of timesteps, got shape {timesteps.shape}")
    if not 0 <= start_of_50 <= 50:
        raise ValueError(f"a start of 50 must lie in 0..50, got {start_of_50}")
    threshold = num_train_timesteps * (1 - start_of_50 / 50)
    reached = np.flatnonzero(timesteps <= threshold + 1e-6)
    return int(reached[0]) if len(reached) else len(timesteps) - 1


def same_timesteps(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two step axes are the same timesteps (to float tolerance)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0, atol=1e-3))
