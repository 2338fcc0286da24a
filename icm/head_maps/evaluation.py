"""Word maps judged against exact masks: mIoU per method with bootstrap intervals, each method
compared with DAAM's all-head map image by image.

Rows follow the head-map table: ``split, word, method, relevance, k, tau, miou, miou_low,
miou_high, n`` and, for every method but ``all``, the paired difference with ``all`` on the
same images (``diff``, ``diff_low``, ``diff_high``). Methods: ``all``; ``topk`` of a named
relevance source; its controls ``bottom-k`` (the least relevant k) and ``random-k`` (k heads
drawn at random, each image's IoU averaged over ``RANDOM_DRAWS`` draws). Each word slot has
its rows over the images where it is annotated, and ``word = pooled`` rows pool every
annotated (image, word) pair, as DAAM reports one mIoU. Intervals resample prompts, the unit
the held-out split holds out (every pair of a drawn prompt's images together).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from icm.head_maps.aggregation import (
    Head,
    chosen_heads,
    head_count,
    heads_of,
    ious,
    segment_batch,
    word_stack,
)

#: Random head sets averaged per image in the random-k control.
RANDOM_DRAWS = 20
#: The word of the rows that pool every annotated (image, word) pair.
POOLED = "pooled"

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
        return ious(segment_batch(word_maps, self.masks.shape[-2:], tau), self.masks)

    def ranked(self, relevance: Mapping[Head, float]) -> list[Head]:
        return chosen_heads(self.heads, relevance, len(self.heads))

    def curve(self, relevance: Mapping[Head, float], counts: Sequence[int],
              tau: float) -> dict[str, list[float]]:
        """mIoU of the first ``count`` heads, most relevant first and least relevant first."""
        order = self.ranked(relevance)
        return {"most": [float(self.ious(order[:c], tau).mean()) for c in counts],
                "least": [float(self.ious(order[::-1][:c], tau).mean()) for c in counts]}


def bootstrap(values: np.ndarray, seed: int = 0, draws: int = 2000,
              groups: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile interval of the mean at level ``Z``, resampling ``groups`` (every value of
    a drawn group together: prompts) or, without groups, single values."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if groups is None:
        means = rng.choice(values, size=(draws, len(values)), replace=True).mean(axis=1)
    else:
        labels, index = np.unique(np.asarray(groups), return_inverse=True)
        sums = np.bincount(index, weights=values, minlength=len(labels))
        counts = np.bincount(index, minlength=len(labels))
        picked = rng.integers(0, len(labels), size=(draws, len(labels)))
        means = sums[picked].sum(axis=1) / counts[picked].sum(axis=1)
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


def word_values(scorer: WordScorer, relevances: Mapping[str, Mapping[Head, float]],
                ks: Sequence[int | float], taus: Sequence[float], seed: int = 0
                ) -> dict[tuple[str, str, int, float], np.ndarray]:
    """Per (method, relevance, k, tau): each image's IoU for one word slot (the scorer of
    its annotated images). ``all`` under k = every head."""
    heads = scorer.heads
    rng = np.random.default_rng(seed)
    draws = [random_relevance(heads, int(s)) for s in rng.integers(0, 2**31, RANDOM_DRAWS)]
    out = {}
    for tau in taus:
        out["all", "none", len(heads), tau] = scorer.ious(None, tau)
        for k in ks:
            count = head_count(k, len(heads))
            out["random-k", "random", count, tau] = np.mean(
                [scorer.ious(chosen_heads(heads, r, k), tau) for r in draws], axis=0)
            for name, relevance in relevances.items():
                out["topk", name, count, tau] = scorer.ious(
                    chosen_heads(heads, relevance, k), tau)
                out["bottom-k", name, count, tau] = scorer.ious(
                    chosen_heads(heads, {h: -v for h, v in relevance.items()}, k), tau)
    return out


def table_rows(split: str, word: str, values: Mapping[tuple[str, str, int, float], np.ndarray],
               groups: np.ndarray, seed: int = 0) -> list[dict[str, Any]]:
    """The table rows of one word (or the pooled pairs): mIoU with its interval over
    ``groups`` (the prompts), and the paired difference with ``all`` at the same tau."""
    rows = []
    for (method, source, k, tau), ious_ in values.items():
        base = next(v for (m, _, _, t), v in values.items() if m == "all" and t == tau)
        low, high = bootstrap(ious_, seed, groups=groups)
        d_low, d_high = bootstrap(ious_ - base, seed, groups=groups)
        rows.append({"split": split, "word": word, "method": method, "relevance": source,
                     "k": k, "tau": tau, "miou": float(ious_.mean()), "miou_low": low,
                     "miou_high": high, "n": len(ious_),
                     "diff": float((ious_ - base).mean()), "diff_low": d_low,
                     "diff_high": d_high})
    return rows


def evaluate_split(maps: Mapping[str, np.ndarray], masks: np.ndarray, annotated: np.ndarray,
                   prompts: Sequence[int], slots: Sequence[str], split: str,
                   relevances: Mapping[str, Mapping[str, Mapping[Head, float]]],
                   ks: Sequence[int | float], taus: Sequence[float], seed: int = 0,
                   size: int = 64, scorers: dict[str, WordScorer] | None = None
                   ) -> list[dict[str, Any]]:
    """Every row of one split: per word slot over its annotated images, then ``pooled``
    over every annotated (image, word) pair. ``masks``: (images, slots, H, W);
    ``annotated``: (images, slots), False where no mask was given (not scored);
    ``relevances``: source -> slot -> head relevance. ``scorers``, where given, receives
    each scored slot's ``WordScorer`` (its upsampled maps serve the curve too)."""
    prompts = np.asarray(prompts)
    rows, pooled, pooled_groups = [], {}, []
    for w, slot in enumerate(slots):
        keep = np.asarray(annotated[:, w], dtype=bool)
        if not keep.any():
            continue
        scorer = WordScorer({s: m[keep] for s, m in maps.items()}, w, masks[keep, w], size)
        if scorers is not None:
            scorers[slot] = scorer
        values = word_values(scorer, {name: per[slot] for name, per in relevances.items()},
                             ks, taus, seed)
        rows += table_rows(split, slot, values, prompts[keep], seed)
        for key, v in values.items():
            pooled.setdefault(key, []).append(v)
        pooled_groups.append(prompts[keep])
    if not rows:
        raise ValueError(f"{split}: no annotated image for any word slot {list(slots)}")
    rows += table_rows(split, POOLED, {k: np.concatenate(v) for k, v in pooled.items()},
                       np.concatenate(pooled_groups), seed)
    return rows
