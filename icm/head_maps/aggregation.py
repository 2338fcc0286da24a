"""Word maps from per-head maps: DAAM's average over every head, or over a selection.

One function, three modes (``aggregate``):

* ``all``: DAAM's formula (arXiv 2210.04885): every (site, head) map is upsampled bicubically
  to a common size (64 x 64), clamped at 0, and the maps are averaged over heads and sites;
* ``topk``: the same average over the ``k`` most relevant heads only (``k`` a count, or a
  fraction of all heads): selective aggregation;
* ``weighted``: the relevance-weighted mean (negative relevance counts as 0).

``segment`` turns a word map into a mask the way DAAM does: upsample to the image size,
min-max normalise, threshold at ``tau``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Head = tuple[str, int]  # (site, head index)
Mode = Literal["all", "topk", "weighted"]


def upsampled(maps: Mapping[str, np.ndarray | torch.Tensor],
              size: int = 64) -> dict[str, torch.Tensor]:
    """Each site's (images, heads, words, y, x) maps at ``size`` x ``size``, bicubic, >= 0."""
    out = {}
    for site, value in maps.items():
        tensor = torch.as_tensor(np.asarray(value), dtype=torch.float32)
        images, heads, words = tensor.shape[:3]
        flat = tensor.reshape(images * heads * words, 1, *tensor.shape[3:])
        up = F.interpolate(flat, size=(size, size), mode="bicubic", align_corners=False)
        out[site] = up.clamp_min(0).reshape(images, heads, words, size, size)
    return out


def word_stack(maps: Mapping[str, np.ndarray | torch.Tensor], word: int,
               size: int = 64) -> torch.Tensor:
    """(images, heads, size, size): every head's upsampled map of word slot ``word``, the
    heads of all sites side by side in ``heads_of`` order. Selections of heads are means
    over its head axis (what ``aggregate`` computes, without upsampling again)."""
    up = upsampled({s: m[:, :, word:word + 1] for s, m in maps.items()}, size)
    return torch.cat([t[:, :, 0] for t in up.values()], dim=1)


def heads_of(maps: Mapping[str, np.ndarray | torch.Tensor]) -> list[Head]:
    """Every (site, head) of per-site (images, heads, ...) maps, in site order."""
    return [(site, h) for site, m in maps.items() for h in range(m.shape[1])]


def head_count(k: int | float, n_heads: int) -> int:
    """How many heads ``k`` asks for: an int is a count; a float in (0, 1] a fraction of all
    ``n_heads`` (1.0: every head), rounded up, at least one."""
    if isinstance(k, float):
        if not 0 < k <= 1:
            raise ValueError(f"k = {k}: a fraction of the heads is in (0, 1]; give a count "
                             "as an integer")
        return max(1, math.ceil(k * n_heads - 1e-9))
    return int(k)


def chosen_heads(heads: Sequence[Head], relevance: Mapping[Head, float],
                 k: int | float) -> list[Head]:
    """The ``k`` most relevant heads (``head_count``: a count, or a fraction of all heads);
    ties broken by (site, head) order, so the choice is deterministic."""
    count = head_count(k, len(heads))
    if not 1 <= count <= len(heads):
        raise ValueError(f"k = {k} heads, but there are {len(heads)}")
    missing = [h for h in heads if h not in relevance]
    if missing:
        raise ValueError(f"no relevance for heads {missing[:5]}")
    ranked = sorted(heads, key=lambda h: (-relevance[h], heads.index(h)))
    return ranked[:count]


def aggregate(maps: Mapping[str, np.ndarray | torch.Tensor], mode: Mode = "all",
              relevance: Mapping[Head, float] | None = None, k: int | float | None = None,
              size: int = 64, exclude: Sequence[str] = ()) -> torch.Tensor:
    """(images, words, size, size) word maps from per-site (images, heads, words, y, x) maps.
    ``exclude``: sites or module prefixes left out (``mid_block``: every site in it), the
    rule of the study's ``exclude``."""
    from icm.head_maps.study import excluded

    kept = {s: m for s, m in maps.items() if not excluded(s, list(exclude))}
    if not kept:
        raise ValueError("every site is excluded")
    up = upsampled(kept, size)
    heads = heads_of(up)
    if mode == "all":
        weights = {head: 1.0 for head in heads}
    elif mode == "topk":
        if relevance is None or k is None:
            raise ValueError("topk needs a relevance per head and k")
        weights = {head: 1.0 for head in chosen_heads(heads, relevance, k)}
    elif mode == "weighted":
        if relevance is None:
            raise ValueError("weighted needs a relevance per head")
        weights = {head: max(0.0, float(relevance[head])) for head in heads}
    else:
        raise ValueError(f"unknown aggregation {mode!r}; use all, topk or weighted")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("the head weights sum to zero")
    images, _, words = next(iter(up.values())).shape[:3]
    out = torch.zeros(images, words, size, size)
    for (site, h), weight in weights.items():
        if weight:
            out += weight * up[site][:, h]
    return out / total


def segment(word_map: torch.Tensor | np.ndarray, image_size: int, tau: float) -> np.ndarray:
    """A boolean (image_size, image_size) mask: the map upsampled (bicubic) to the image,
    min-max normalised, thresholded at ``tau`` (a flat map segments nothing)."""
    tensor = torch.as_tensor(np.asarray(word_map), dtype=torch.float32)[None, None]
    up = F.interpolate(tensor, size=(image_size, image_size), mode="bicubic",
                       align_corners=False)[0, 0]
    low, high = up.min(), up.max()
    if high - low <= 0:
        return np.zeros((image_size, image_size), dtype=bool)
    return ((up - low) / (high - low) >= tau).numpy()


def segment_batch(word_maps: torch.Tensor | np.ndarray, image_size: int | tuple[int, int],
                  tau: float) -> np.ndarray:
    """``segment`` of every (images, size, size) map at once: (images, H, W) booleans, the
    image ``image_size`` a side or (H, W) (non-square images)."""
    shape = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    tensor = torch.as_tensor(np.asarray(word_maps), dtype=torch.float32)[:, None]
    up = F.interpolate(tensor, size=shape, mode="bicubic", align_corners=False)[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    span = up.amax(dim=(1, 2), keepdim=True) - low
    normalised = (up - low) / span.clamp_min(torch.finfo(torch.float32).tiny)
    return ((normalised >= tau) & (span > 0)).numpy()


#: IoU where prediction and truth are both empty: DAAM's 0 (its ``compute_iou`` divides by
#: the union plus 1e-8), so an empty annotation scores nothing, as in DAAM's tables.
EMPTY_IOU = 0.0


def ious(masks: np.ndarray, truth: np.ndarray, empty: float = EMPTY_IOU) -> np.ndarray:
    """IoU of each of (images, H, W) predicted masks with its truth (both empty: ``empty``,
    DAAM's 0 by default)."""
    inter = np.logical_and(masks, truth).sum(axis=(1, 2))
    union = np.logical_or(masks, truth).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), empty)


def iou(mask: np.ndarray, truth: np.ndarray, empty: float = EMPTY_IOU) -> float:
    """Intersection over union of two boolean masks (both empty: ``empty``, DAAM's 0)."""
    union = np.logical_or(mask, truth).sum()
    return float(np.logical_and(mask, truth).sum() / union) if union else float(empty)
