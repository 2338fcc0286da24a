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

from icm.head_maps.aggregation import Head, chosen_heads, heads_of, ious, segment_batch, word_stack

Z = 0.95  # interval level


class WordScorer:
    """IoUs of one word slot's selections, its head maps upsampled once: a selection's word
    map is the mean of its heads' maps (``aggregate``'s formula, tested equal)."""

    def __init__(self, maps: Mapping[str, np.ndarray], word: int, masks: np.ndarray,
                 size: int = 64) -> None:
        self.heads = heads_of(maps)
        self.index = {head: i for i, head in enumerate(self.heads)}
        self.stack = word_stack(maps, word, size)  # (images, heads, size, size)
        self.masks = np.asarray(masks, dtype=bool)

    def ious(self, chosen: Sequence[Head] | None, tau: float) -> np.ndarray:
        """Per image: IoU of the segmentation of the mean map of ``chosen`` (None: all)."""
        if chosen is None:
            word_maps = self.stack.mean(dim=1)
        else:
            word_maps = self.stack[:, [self.index[h] for h in chosen]].mean(dim=1)
        return ious(segment_batch(word_maps, self.masks.shape[-1], tau), self.masks)

    def ranked(self, relevance: Mapping[Head, float]) -> list[Head]:
        return chosen_heads(self.heads, relevance, len(self.heads))

    def curve(self, relevance: Mapping[Head, float], counts: Sequence[int],
              tau: float) -> dict[str, list[float]]:
        """mIoU of the first ``count`` heads, most relevant first and least relevant first."""
        order = self.ranked(relevance)
        return {"most": [float(self.ious(order[:c], tau).mean()) for c in counts],
                "least": [float(self.ious(order[::-1][:c], tau).mean()) for c in counts]}


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


def curve_counts(n_heads: int, points: int) -> list[int]:
    """About ``points`` head counts from 1 to ``n_heads``, spread evenly on a log scale."""
    grid = np.unique(np.round(np.geomspace(1, n_heads, points)).astype(int))
    return [int(c) for c in grid]


def evaluate(maps: Mapping[str, np.ndarray], masks: np.ndarray, word: int, word_name: str,
             split: str, relevances: Mapping[str, Mapping[Head, float]],
             ks: Sequence[int | float], taus: Sequence[float], seed: int = 0,
             size: int = 64) -> list[dict[str, Any]]:
    """The table rows of one word slot on one split's images (see the module docstring)."""
    scorer = WordScorer(maps, word, masks, size)
    heads = scorer.heads
    rows = []
    for tau in taus:
        base = scorer.ious(None, tau)
        low, high = bootstrap(base, seed)
        rows.append({"split": split, "word": word_name, "method": "all", "relevance": "none",
                     "k": len(heads), "tau": tau, "miou": float(base.mean()), "miou_low": low,
                     "miou_high": high, "n": len(base), "diff": 0.0, "diff_low": 0.0,
                     "diff_high": 0.0})
        for k in ks:
            methods = [("random-k", "random", random_relevance(heads, seed))]
            for name, relevance in relevances.items():
                methods += [("topk", name, relevance),
                            ("bottom-k", name, {h: -v for h, v in relevance.items()})]
            for method, source, relevance in methods:
                chosen = chosen_heads(heads, relevance, k)
                values = scorer.ious(chosen, tau)
                low, high = bootstrap(values, seed)
                d_low, d_high = bootstrap(values - base, seed)
                rows.append({"split": split, "word": word_name, "method": method,
                             "relevance": source, "k": len(chosen), "tau": tau,
                             "miou": float(values.mean()), "miou_low": low, "miou_high": high,
                             "n": len(values), "diff": float((values - base).mean()),
                             "diff_low": d_low, "diff_high": d_high})
    return rows
