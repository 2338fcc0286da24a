"""Capture token-averaged attention outputs at every denoising step.

Usage, around any ordinary pipeline call::

    with capture_activations(pipe, sites) as cap:
        images = pipe(prompts, num_images_per_prompt=4).images
        batch = cap.pop()          # host copy, once per batch

``batch.activations[site]`` has shape (images, steps, channels): the mean over tokens of the
conditional half of the CFG batch, in float32, in the order the pipeline returns images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icm.hooks.registry import CFGMode, SiteHooks
from icm.hooks.sites import denoiser_of, list_sites
from icm.models.families import image_stream


@dataclass
class CapturedBatch:
    """Host-side result of one generation: per-site arrays and the step axis."""

    activations: dict[str, np.ndarray]  # site -> (images, steps, channels) float32
    timesteps: np.ndarray  # (steps,) scheduler timestep value of each step

    @property
    def n_images(self) -> int:
        return next(iter(self.activations.values())).shape[0]


def token_mean(hidden: torch.Tensor) -> torch.Tensor:
    """Average over spatial tokens, accumulating in float32 whatever the model's dtype."""
    if hidden.ndim == 3:  # (batch, tokens, channels)
        return hidden.mean(dim=1, dtype=torch.float32)
    if hidden.ndim == 4:  # (batch, channels, height, width)
        return hidden.mean(dim=(2, 3), dtype=torch.float32)
    raise ValueError(f"expected a 3-d or 4-d hidden state, got shape {tuple(hidden.shape)}")


class ActivationCapture(SiteHooks):
    """Forward hooks that pool each site's conditional output, step by step, on the device."""

    purpose = "capture"

    def __init__(self, pipe: Any, sites: Sequence[str], cfg: CFGMode = "auto") -> None:
        super().__init__(pipe, sites, cfg)
        self._pooled: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}
        self._timesteps: list[float | None] = []

    def on_output(self, site: str, step: int, output: Any) -> None:
        hidden = image_stream(site, output)
        seen = self._pooled[site]
        if step != len(seen):
            raise RuntimeError(
                f"{site}: got step {step} after {len(seen)} recorded steps; a site must run "
                "once per denoiser call (call cap.pop() between generations)"
            )
        seen.append(token_mean(hidden[self.cond_slice(hidden.shape[0])]).detach())
        if step == len(self._timesteps):
            assert self.clock is not None
            self._timesteps.append(self.clock.timestep)
        return None

    def pop(self) -> CapturedBatch:
        """Move everything recorded since the last pop to the host (one copy) and reset."""
        counts = {s: len(v) for s, v in self._pooled.items()}
        if len(set(counts.values())) != 1 or not next(iter(counts.values())):
            raise RuntimeError(f"incomplete capture, steps recorded per site: {counts}")
        per_site = [torch.stack(self._pooled[s], dim=1) for s in self.sites]  # (B, S, C)
        widths = [t.shape[-1] for t in per_site]
        host = torch.cat(per_site, dim=-1).cpu().numpy()
        arrays = np.split(host, np.cumsum(widths)[:-1], axis=-1)
        timesteps = np.asarray(
            [np.nan if t is None else t for t in self._timesteps], dtype=np.float64
        )
        self._pooled = {s: [] for s in self.sites}
        self._timesteps = []
        return CapturedBatch(dict(zip(self.sites, arrays, strict=True)), timesteps)


def capture_activations(
    pipe: Any, sites: Sequence[str] | None = None, cfg: CFGMode = "auto"
) -> ActivationCapture:
    """Context manager capturing ``sites`` (default: every site of the model's family,
    ``icm.models.families``)."""
    if sites is None:
        sites = list_sites(denoiser_of(pipe))
    return ActivationCapture(pipe, sites, cfg)
