"""Steer attention outputs along probe directions (paper section 3.2, appendix A).

At every chosen site and every step from ``start_step`` on, the conditional half of the CFG
batch gets ``alpha * v[site, step]`` added to every token of the site's output::

    with steer_activations(pipe, {site: directions}, alpha=10, start_step=15):
        images = pipe(prompts, ...).images

``directions[site]`` is (steps, channels): the unit probe directions of ``icm.probing.probes``, row
``s`` used at step ``s``. A positive alpha moves toward the probe's positive class. Steering
hooks are :class:`icm.hooks.registry.SiteHooks` like capture, registered first
(``purpose="steer"``), so a capture on the same site records the steered output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from icm.hooks.registry import CFGMode, SiteHooks
from icm.models.families import image_stream, replace_image_stream


class ActivationSteering(SiteHooks):
    """Adds ``alpha * v[site][step]`` to the conditional rows of each site's output."""

    purpose = "steer"

    def __init__(
        self,
        pipe: Any,
        directions: Mapping[str, np.ndarray | torch.Tensor],
        alpha: float,
        start_step: int,
        cfg: CFGMode = "auto",
        timesteps: np.ndarray | None = None,
    ) -> None:
        super().__init__(pipe, list(directions), cfg)
        self.alpha = float(alpha)
        self.start_step = int(start_step)
        self.timesteps = None if timesteps is None else np.asarray(timesteps, dtype=np.float64)
        self._directions = {site: torch.as_tensor(np.asarray(v)) for site, v in directions.items()}
        self._on_device: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def _vector(self, site: str, step: int, like: torch.Tensor) -> torch.Tensor:
        key = (site, like.device, like.dtype)
        if key not in self._on_device:  # one copy per site and device, not one per call
            self._on_device[key] = self._directions[site].to(like.device, like.dtype)
        table = self._on_device[key]
        if step >= len(table):
            raise RuntimeError(
                f"{site}: step {step} but directions cover {len(table)} steps; steer with the "
                "sampler settings the probes were fitted on"
            )
        return table[step]

    def _check_timestep(self, site: str, step: int) -> None:
        """Row ``step`` of a direction belongs to one timestep: refuse to apply it at another."""
        assert self.clock is not None
        if self.timesteps is None or self.clock.timestep is None:
            return
        if step >= len(self.timesteps) or abs(self.timesteps[step] - self.clock.timestep) > 1e-3:
            fitted = self.timesteps[step] if step < len(self.timesteps) else "none"
            raise RuntimeError(
                f"{site}: step {step} runs at timestep {self.clock.timestep:g}, but the "
                f"directions were fitted at {fitted}: steer with the scheduler and steps of "
                "the generation the probes were fitted on")

    def on_output(self, site: str, step: int, output: Any) -> Any:
        self._check_timestep(site, step)
        if step < self.start_step:
            return None
        hidden = image_stream(site, output)
        vector = self._vector(site, step, hidden)
        if hidden.ndim == 4:  # (batch, channels, height, width)
            vector = vector[:, None, None]
        elif hidden.ndim != 3:  # (batch, tokens, channels)
            raise ValueError(f"{site}: cannot steer an output of shape {tuple(hidden.shape)}")
        steered = hidden.clone()
        steered[self.cond_slice(hidden.shape[0])] += self.alpha * vector
        return replace_image_stream(site, output, steered)


def steer_activations(
    pipe: Any,
    directions: Mapping[str, np.ndarray | torch.Tensor],
    alpha: float,
    start_step: int,
    cfg: CFGMode = "auto",
    timesteps: np.ndarray | None = None,
) -> ActivationSteering:
    """Context manager: steer ``directions``' sites by ``alpha`` from ``start_step`` on.
    With ``timesteps`` (those the directions were fitted at, one per row), a step that runs
    at another timestep is an error."""
    return ActivationSteering(pipe, directions, alpha, start_step, cfg, timesteps)
