"""Capture and steering sites: attention modules named by their diffusers module path.

A site is the path of a module inside the denoiser (``pipe.unet`` or ``pipe.transformer``),
e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn1``. Using the path verbatim keeps
results readable next to the diffusers source and stable across runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

#: Module-name suffixes of the attention layers the method probes, per kind.
SITE_KINDS: dict[str, str] = {"attn1": "self-attention", "attn2": "cross-attention"}


def denoiser_of(pipe: object) -> nn.Module:
    """The pipeline's denoising network: a UNet for SD/SDXL, a transformer for SANA/FLUX."""
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer` module")


def site_kind(site: str) -> str:
    """``attn1`` or ``attn2``: the last component of the module path."""
    return site.rsplit(".", 1)[-1]


# UNets register ``mid_block`` after ``up_blocks``; data flows down -> mid -> up.
_FORWARD_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def list_sites(denoiser: nn.Module, kinds: Iterable[str] = ("attn1", "attn2")) -> list[str]:
    """All sites of the given kinds, in forward order (registration order within a block
    group; transformer blocks register in forward order already)."""
    wanted = set(kinds)
    unknown = wanted - set(SITE_KINDS)
    if unknown:
        raise ValueError(f"unknown site kinds {sorted(unknown)}; known: {sorted(SITE_KINDS)}")
    names = [name for name, _ in denoiser.named_modules() if name and site_kind(name) in wanted]
    return sorted(names, key=lambda name: _FORWARD_RANK.get(name.split(".", 1)[0], 1))


def resolve_sites(denoiser: nn.Module, sites: Sequence[str]) -> dict[str, nn.Module]:
    """Map site names to modules, failing with the list of valid names on a typo."""
    modules = dict(denoiser.named_modules())
    missing = [s for s in sites if s not in modules]
    if missing:
        valid = ", ".join(list_sites(denoiser)) or "(none)"
        raise KeyError(f"unknown sites {missing}; this model's sites are: {valid}")
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate sites in {list(sites)}")
    return {s: modules[s] for s in sites}


def output_tensor(output: object) -> torch.Tensor:
    """The image-stream hidden states of an attention module's output.

    Joint-attention blocks (FLUX, SD3) return ``(image_states, text_states)``; the image
    stream is what the method probes and steers.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot read hidden states from an output of type {type(output).__name__}")
