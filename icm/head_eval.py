"""Word maps judged against exact masks: mIoU per method with bootstrap intervals, each method
compared with DAAM's all-head map image by image.

Rows follow the head-map table: ``split, word, method, relevance, k, tau, miou, miou_low,
miou_high, n`` and, for every method but ``all``, the paired difference with ``all`` on the
same images (``diff``, ``diff_low``, ``diff_high``). Methods: ``all``; ``topk`` of a named
relevance source; its controls ``bottom-k`` (the least relevant k) and ``random-k`` (k heads
drawn with a seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from icm.aggregation import Head, aggregate, chosen_heads, heads_of, iou, segment

Z = 0.95  # interval level


def image_ious(maps: Mapping[str, np.ndarray], word: int, masks: np.ndarray, tau: float,
               mode: str = "all", relevance: Mapping[Head, float] | None = None,
               k: int | float | None = None) -> np.ndarray:
    """IoU of every image's segmentation of word slot ``word`` with its mask."""
    word_maps = aggregate({s: m[:, :, word:word + 1] for s, m in maps.items()}, mode,
                          relevance, k)
    return np.array([iou(segment(word_maps[i, 0], masks.shape[-1], tau), masks[i])
                     for i in range(len(masks))])


def bootstrap(values: np.ndarray, seed: int = 0, draws: int = 2000) -> tuple[float, float]:
    """Percentile interval of the mean at level ``Z``, resampling images."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(draws, len(values)), replace=True).mean(axis=1)
    return (float(np.percentile(means, 100 * (1 - Z) / 2)),
            float(np.percentile(means, 100 * (1 + Z) / 2)))


def random_relevance(heads: Sequence[Head], seed: int) -> dict[Head, float]:
    """A relevance that ranks heads in a seeded random order (the random-k control)."""
    order = np.random.default_rng(seed).permutation(len(heads))
    return {head: float(-rank) for head, rank in zip(heads, order)}


def evaluate(maps: Mapping[str, np.ndarray], masks: np.ndarray, word: int, word_name: str,
             split: str, relevances: Mapping[str, Mapping[Head, float]],
             ks: Sequence[int | float], taus: Sequence[float], seed: int = 0,
             ) -> list[dict[str, Any]]:
    """The table rows of one word slot on one split's images (see the module docstring)."""
    heads = heads_of(maps)
    rows = []
    for tau in taus:
        base = image_ious(maps, word, masks, tau)
        low, high = bootstrap(base, seed)
        rows.append({"split": split, "word": word_name, "method": "all", "relevance": "none",
                     "k": len(heads), "tau": tau, "miou": float(base.mean()), "miou_low": low,
                     "miou_high": high, "n": len(base), "diff": 0.0, "diff_low": 0.0,
                     "diff_high": 0.0})
        for k in ks:
            chosen = len(chosen_heads(heads, {h: 0.0 for h in heads}, k))
            methods = [("random-k", "random", random_relevance(heads, seed))]
            for name, relevance in relevances.items():
                methods += [("topk", name, relevance),
                            ("bottom-k", name, {h: -v for h, v in relevance.items()})]
            for method, source, relevance in methods:
                values = image_ious(maps, word, masks, tau, "topk", relevance, k)
                low, high = bootstrap(values, seed)
                d_low, d_high = bootstrap(values - base, seed)
                rows.append({"split": split, "word": word_name, "method": method,
                             "relevance": source, "k": chosen, "tau": tau,
                             "miou": float(values.mean()), "miou_low": low, "miou_high": high,
                             "n": len(values), "diff": float((values - base).mean()),
                             "diff_low": d_low, "diff_high": d_high})
    return rows
