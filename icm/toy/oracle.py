"""Ground-truth labels read from pixels, so generated images can be scored without a classifier.

Built to survive a generator's flaws (soft edges, noise, slightly wrong colours): the
background is re-estimated per image, the colour is the median foreground colour corrected
for the background's shift, and the shape is the best-fitting template (by IoU) among
rendered circles, squares and triangles placed and sized around the foreground.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from icm.toy.world import BACKGROUND, COLORS, SHAPES, shape_masks

#: Colour distance (Euclidean, 0..255 RGB) above which a pixel is foreground. The palette
#: colours lie 242..276 from the background, so 110 sits just under half-way: a blurred
#: edge pixel counts as foreground when it is roughly half shape, which keeps fitted sizes
#: unbiased, while background noise (std 12 per channel) and a global shift (up to 25 per
#: channel, ~43 in distance) stay well below it.
FG_THRESHOLD = 110.0
#: Fewer foreground pixels than this read as an empty image (specks of noise are not a shape).
MIN_FG_PIXELS = 3
#: Softmax temperature (RGB distance units) for colour scores.
COLOR_TEMPERATURE = 20.0

_BG = np.array(BACKGROUND, dtype=np.float64)
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class OracleLabel:
    color: str  # palette name, or "none" for an empty image
    shape: str  # shape name, or "none"
    color_scores: dict[str, float]  # softmax over palette colours of -distance / temperature
    shape_scores: dict[str, float]  # best IoU of each shape's fitted template
    fg_fraction: float  # fraction of pixels in the foreground


def _as_rgb255(image: np.ndarray) -> np.ndarray:
    """uint8 as is; floats are taken in [0, 1] (diffusers' 'np' output) and scaled to 0..255."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one (H, W, 3) image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64)
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected uint8 or float image, got {image.dtype}")
    lo, hi = float(image.min()), float(image.max())
    if lo < -0.25 or hi > 1.25:
        raise ValueError(f"float images must be in [0, 1] (got range [{lo:.3g}, {hi:.3g}])")
    return np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0


def _background(rgb: np.ndarray) -> np.ndarray:
    """The image's own background colour: the median of pixels near the nominal one."""
    near = np.linalg.norm(rgb - _BG, axis=-1) <= FG_THRESHOLD
    return np.median(rgb[near], axis=0) if near.any() else _BG


def foreground_mask(image: np.ndarray, threshold: float = FG_THRESHOLD) -> np.ndarray:
    """Bool (H, W): pixels farther than ``threshold`` from the image's estimated background."""
    rgb = _as_rgb255(image)
    return np.linalg.norm(rgb - _background(rgb), axis=-1) > threshold


#: The grey a neutralised foreground is painted (``neutralise``): no palette colour.
NEUTRAL_GREY = (128, 128, 128)


def neutralise(image: np.ndarray, attribute: str) -> np.ndarray:
    """uint8 (H, W, 3) ``image`` with ``attribute`` made uninformative, so that an image
    similarity after it measures what steering ``attribute`` should have left alone:
    ``color`` paints the foreground grey; ``shape`` fills the foreground's bounding box
    with its median colour (a circle, square or triangle of one extent share that box);
    ``lit_side`` (the pixel labeler's brighter half: where the shape sits) moves the
    foreground's centre to the image's centre (the background wraps: it is one colour)."""
    rgb = np.asarray(image).copy()
    mask = foreground_mask(rgb)
    if mask.sum() < MIN_FG_PIXELS:
        return rgb
    if attribute == "color":
        rgb[mask] = NEUTRAL_GREY
    elif attribute == "shape":
        rows, cols = np.nonzero(mask)
        colour = np.median(rgb[mask], axis=0).astype(np.uint8)
        rgb[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = colour
    elif attribute == "lit_side":
        rows, cols = np.nonzero(mask)
        height, width = mask.shape
        shift = (int(np.floor((height - 1) / 2 - rows.mean() + 0.5)),
                 int(np.floor((width - 1) / 2 - cols.mean() + 0.5)))
        rgb = np.roll(rgb, shift, axis=(0, 1))
    else:
        raise ValueError(f"can neutralise {sorted(NEUTRALISED)}, not {attribute!r}")
    return rgb


#: The attributes ``neutralise`` can make uninformative.
NEUTRALISED = ("color", "shape", "lit_side")


#: Template search: (step in pixels, centre offsets in steps, size offsets in steps). A coarse
#: pass around the bounding box, then a finer one around the coarse winner. Sizes reach
#: below the box's extent by more than above it: a triangle's apex row is often empty.
_SEARCH = ((0.5, range(-2, 3), range(-3, 5)), (0.25, range(-1, 2), range(-1, 2)))


def _fit_shapes(mask: np.ndarray) -> dict[str, float]:
    """Best IoU per shape over templates placed and sized around the mask's bounding box.

    The templates come from the world's own renderer, so a clean image scores IoU ~1 for its
    shape; blur and noise move the mask's edges by about a pixel, which the search absorbs.
    """
    image_size = mask.shape[0]
    rows, cols = np.nonzero(mask)
    box = (
        (cols.min() + cols.max() + 1) / 2,
        (rows.min() + rows.max() + 1) / 2,
        float(max(cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min())),
    )
    flat = mask.reshape(-1)
    area = int(flat.sum())
    scores = {}
    for shape in SHAPES:
        best_iou, (cx, cy, s) = -1.0, box
        for step, centre_offsets, size_offsets in _SEARCH:
            dc = np.asarray(centre_offsets) * step
            gx, gy, gs = np.meshgrid(
                cx + dc, cy + dc, s + np.asarray(size_offsets) * step, indexing="ij"
            )
            gx, gy, gs = gx.ravel(), gy.ravel(), np.maximum(gs.ravel(), 1.0)
            templates = shape_masks(shape, gx, gy, gs, image_size).reshape(len(gx), -1)
            inter = templates[:, flat].sum(axis=1)
            iou = inter / (area + templates.sum(axis=1) - inter)
            k = int(np.argmax(iou))
            if iou[k] > best_iou:
                best_iou, (cx, cy, s) = float(iou[k]), (gx[k], gy[k], gs[k])
        scores[shape] = best_iou
    return scores


def oracle_label(image: np.ndarray) -> OracleLabel:
    """Colour and shape of the one shape in an image, read from its pixels."""
    rgb = _as_rgb255(image)
    background = _background(rgb)
    mask = np.linalg.norm(rgb - background, axis=-1) > FG_THRESHOLD
    fg_fraction = float(mask.mean())
    if mask.sum() < MIN_FG_PIXELS:
        return OracleLabel(
            "none", "none", {c: 0.0 for c in _PALETTE_NAMES}, {s: 0.0 for s in SHAPES}, fg_fraction
        )
    # Undo a global colour cast, as measured on the background, before matching the palette.
    colour = np.median(rgb[mask], axis=0) - (background - _BG)
    dist = np.linalg.norm(_PALETTE - colour, axis=1)
    logits = -(dist - dist.min()) / COLOR_TEMPERATURE
    probs = np.exp(logits) / np.exp(logits).sum()
    color_scores = {c: float(p) for c, p in zip(_PALETTE_NAMES, probs)}
    shape_scores = _fit_shapes(mask)
    return OracleLabel(
        color=_PALETTE_NAMES[int(np.argmin(dist))],
        shape=max(SHAPES, key=lambda s: shape_scores[s]),
        color_scores=color_scores,
        shape_scores=shape_scores,
        fg_fraction=fg_fraction,
    )


def oracle_labels(images: np.ndarray | Sequence[np.ndarray]) -> list[OracleLabel]:
    """oracle_label for each image of an (N, H, W, 3) batch."""
    return [oracle_label(image) for image in images]


def labels_table(labels: Sequence[OracleLabel]) -> dict[str, list]:
    """Columns (color, shape, fg_fraction, color_score_<c>, shape_score_<s>) for a DataFrame."""
    table: dict[str, list] = {
        "color": [lab.color for lab in labels],
        "shape": [lab.shape for lab in labels],
        "fg_fraction": [lab.fg_fraction for lab in labels],
    }
    for c in _PALETTE_NAMES:
        table[f"color_score_{c}"] = [lab.color_scores[c] for lab in labels]
    for s in SHAPES:
        table[f"shape_score_{s}"] = [lab.shape_scores[s] for lab in labels]
    return table
