"""Debiasing by steering (paper section 4, appendix B): which sites, which way, which batch.

* Sites per layer-selection variant, from a site ranking: ``top`` (the ICM choice: the k
  best self-attention sites), ``cross`` (the cross-attention sites of those same blocks),
  ``all`` (every attention site), ``all-self`` (every self-attention site, or FLUX's
  blocks: Table 5's "all layers"), ``random`` (k seeded self-attention sites), ``worst`` (the
  k lowest-ranked self-attention sites), ``h-space`` (the UNet bottleneck, the mid-block
  output: a baseline row), ``none`` (the original, unsteered model). A variant may instead
  name its sites and strengths per target (``explicit``, see ``explicit_pushes``). By default each pair's
  direction steers the sites of that pair's own ranking (paper Table 6 selects layers per
  direction); ``steering.sites_per: concept`` uses one ranking of the concept for all.
* Which direction pushes toward each class: a pair's positive class is reached with +v, the
  negative class of a single pair with -v; a class that is the negative of several pairs
  (the majority class the pairs are built around, e.g. white or adult) gets no push.
* Each batch gets one target class from the target distribution, as a function of (seed,
  global batch index), so a batch's target does not depend on sharding. ``random`` draws
  (default) are independent, as in the paper's appendix B: ten of them are often off by 15
  points, which sets a floor under FD (``icm.metrics.draw_floor``). ``quasi`` draws follow a
  golden-ratio sequence, so any run of consecutive batches (say, the ten batches of one
  prompt) holds the classes in close to the asked proportions: lower variance, not the
  paper's protocol. ``balanced_targets`` deals calibration's targets evenly within each
  prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from icm.families import FAMILIES, KINDS
from icm.pairs import Pair

#: The site kinds ``top``, ``worst`` and ``random`` choose among, over every family.
STEERED_KINDS = frozenset(k for family in FAMILIES.values() for k in family.steer_kinds)

#: The kinds ``cross`` steers, over every family (cross-attention; FLUX has none).
CROSS_KINDS = frozenset(f.cross_kind for f in FAMILIES.values() if f.cross_kind)

#: Baseline kinds (the UNet bottleneck, ``h-space``): only their own selection steers them.
BASELINE_KINDS = frozenset(name for name, kind in KINDS.items() if kind.baseline)

SELECTIONS = ("none", "top", "cross", "all", "all-self", "random", "worst", "h-space")


@dataclass(frozen=True)
class Push:
    """Steer along the direction of ``pair`` (its ``negative-positive`` name) times ``sign``."""

    pair: str
    sign: float


def class_pushes(
    classes: Sequence[str], pairs: Sequence[tuple[str, str]]
) -> dict[str, Push | None]:
    """How steering reaches each class (None: the class is left unpushed)."""
    pushes: dict[str, Push | None] = {}
    for cls in classes:
        positive = [Pair(n, p).name for n, p in pairs if p == cls]
        negative = [Pair(n, p).name for n, p in pairs if n == cls]
        if positive:
            pushes[cls] = Push(positive[0], +1.0)
        elif len(negative) == 1:
            pushes[cls] = Push(negative[0], -1.0)
        else:
            pushes[cls] = None
    return pushes


def target_probabilities(
    classes: Sequence[str], probs: Mapping[str, float] | None = None
) -> np.ndarray:
    """Target distribution over ``classes`` (default uniform); must sum to 1."""
    if probs is None:
        return np.full(len(classes), 1.0 / len(classes))
    unknown = set(probs) - set(classes)
    if unknown:
        raise ValueError(f"target probabilities name unknown classes {sorted(unknown)}")
    p = np.array([float(probs.get(c, 0.0)) for c in classes])
    if np.any(p < 0) or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"target probabilities must be >= 0 and sum to 1, got {dict(probs)}")
    return p


GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0  # the Weyl step with the most even spread
#: How steering draws its batch targets (``batch_target``).
TARGET_DRAWS = ("random", "quasi")


def batch_target(classes: Sequence[str], probs: np.ndarray, seed: int, batch_index: int,
                 draw: str = "random") -> str:
    """The target class of one batch: a pure function of (seed, global batch index)."""
    if draw == "random":
        rng = np.random.default_rng([seed, batch_index])
        return classes[int(rng.choice(len(classes), p=probs))]
    if draw not in TARGET_DRAWS:
        raise ValueError(f"unknown target draw {draw!r}; use one of {TARGET_DRAWS}")
    offset = np.random.default_rng(seed).random()
    position = (offset + batch_index * GOLDEN) % 1.0
    edges = np.cumsum(probs)
    return classes[min(int(np.searchsorted(edges, position, side="right")), len(classes) - 1)]


def calibration_batches(probs: np.ndarray, batches_per_class: int) -> int:
    """Batches per prompt that give the rarest target class ``batches_per_class`` of them
    when ``balanced_targets`` deals them (uniform over K classes: K x batches_per_class)."""
    if batches_per_class < 1:
        raise ValueError(f"batches_per_class must be at least 1, got {batches_per_class}")
    rarest = float(np.asarray(probs)[np.asarray(probs) > 0].min())
    return int(np.ceil(batches_per_class / rarest - 1e-9))


def balanced_targets(classes: Sequence[str], probs: np.ndarray, n_batches: int, seed: int,
                     prompt_index: int) -> list[str]:
    """The targets of one prompt's ``n_batches`` batches, dealt in the target proportions
    (largest remainder), in an order shuffled by (seed, prompt index). Calibration uses it:
    a prompt's FD then measures the steering, not how its few random draws fell."""
    quota = np.asarray(probs, dtype=np.float64) * n_batches
    counts = np.floor(quota + 1e-9).astype(int)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:n_batches - counts.sum()]] += 1
    dealt = np.repeat(np.arange(len(classes)), counts)
    np.random.default_rng([seed, prompt_index]).shuffle(dealt)
    return [classes[i] for i in dealt]


def target_rule(classes: Sequence[str], probs: np.ndarray, seed: int, batch_size: int,
                draw: str, samples_per_prompt: int | None = None) -> Callable[[Sequence], str]:
    """batch (its samples) -> its target class. ``random`` and ``quasi`` are functions of
    (seed, global batch index) (``batch_target``); ``balanced`` deals each prompt's batches
    (``balanced_targets``) and needs whole batches per prompt."""
    if draw in TARGET_DRAWS:
        return lambda batch: batch_target(classes, probs, seed, batch[0].sample // batch_size,
                                          draw)
    if draw != "balanced":
        raise ValueError(f"unknown target draw {draw!r}; use one of {TARGET_DRAWS} or "
                         "'balanced'")
    if not samples_per_prompt or samples_per_prompt % batch_size:
        raise ValueError(f"balanced targets need whole batches per prompt: "
                         f"{samples_per_prompt} samples per prompt, batches of {batch_size}")
    n_batches = samples_per_prompt // batch_size
    dealt: dict[int, list[str]] = {}

    def target(batch: Sequence) -> str:
        first = batch[0]
        if first.prompt_index not in dealt:
            dealt[first.prompt_index] = balanced_targets(classes, probs, n_batches, seed,
                                                         first.prompt_index)
        return dealt[first.prompt_index][first.repeat // batch_size]

    return target


def select_sites(ranking: pd.DataFrame, selection: str, k: int | None,
                 seed: int | Sequence[int] = 0) -> list[str]:
    """Sites a layer-selection variant steers, from a ranking (``ranking.csv`` or one pair's
    rows of ``ranking_by_pair.csv``). ``top``, ``worst`` and ``random`` choose among the
    sites of the families' steered kinds (``icm.families``: self-attention, or FLUX's block
    outputs); ``random`` draws in name order, so its draw does not depend on the ranking."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown site selection {selection!r}; use one of {SELECTIONS}")
    ranked = ranking.sort_values("rank")
    self_attention = ranked[ranked["kind"].isin(STEERED_KINDS)]
    if selection == "none":
        return []
    if selection == "all":  # every attention (or block) site; the bottleneck is a baseline
        return list(ranked["site"][~ranked["kind"].isin(BASELINE_KINDS)])
    if selection == "all-self":  # every site of the steered kinds (the paper's Table 5 "all")
        return list(self_attention["site"])
    if selection == "h-space":
        bottleneck = list(ranked["site"][ranked["kind"] == "h-space"])
        if not bottleneck:
            raise ValueError("selection 'h-space' needs the UNet bottleneck (mid_block) in the "
                             "ranking; this model has none (SANA and FLUX are transformers)")
        return bottleneck
    if k is None:
        raise ValueError(f"selection {selection!r} needs k, the number of sites")
    if k > len(self_attention):
        raise ValueError(f"steering.k is {k} but the ranking has {len(self_attention)} sites of "
                         f"the steered kinds {sorted(STEERED_KINDS)}: lower steering.k")
    if selection == "top":
        return list(self_attention["site"][:k])
    if selection == "worst":
        return list(self_attention["site"][-k:])
    if selection == "random":
        names = sorted(self_attention["site"])
        chosen = np.random.default_rng(seed).choice(len(names), size=k, replace=False)
        return [names[i] for i in np.sort(chosen)]
    # cross: the cross-attention sites of the blocks the top self-attention sites live in
    blocks = list(self_attention["block"][:k])
    cross = ranked[ranked["kind"].isin(CROSS_KINDS) & ranked["block"].isin(blocks)]
    if len(cross) < len(blocks):
        raise ValueError(f"no cross-attention site in some of the blocks {blocks}")
    return list(cross["site"])


def sites_per_pair(concept_ranking: pd.DataFrame | None, pair_ranking: pd.DataFrame | None,
                   pairs: Sequence[str], selection: str, k: int | None,
                   seed: int) -> dict[str, list[str]]:
    """{pair name: sites its direction steers}. With ``pair_ranking`` (``ranking_by_pair.csv``)
    each pair selects from its own ranking and ``random`` draws per pair (seed, pair index);
    without it every pair gets the concept ranking's selection (``all`` needs only one of
    the two: every site of either)."""
    if pair_ranking is None:
        if concept_ranking is None:
            raise ValueError("no ranking to select sites from")
        chosen = select_sites(concept_ranking, selection, k, seed)
        return {pair: list(chosen) for pair in pairs}
    out = {}
    for index, pair in enumerate(pairs):
        rows = pair_ranking[pair_ranking["pair"] == pair]
        if rows.empty:
            raise ValueError(f"the per-pair ranking has no rows for pair {pair!r}")
        out[pair] = select_sites(rows, selection, k, [seed, index])
    return out


@dataclass(frozen=True)
class ExplicitPush:
    """A hand-picked push (the paper's Table 6): ``strength`` times the unit direction of
    ``pair`` at ``sites``; the strength is signed along the pair (positive toward its
    second, positive class), as the paper writes it (woman -10, man 10 on woman-man)."""

    pair: str
    sites: tuple[str, ...]
    strength: float


def explicit_pushes(classes: Sequence[str], pairs: Sequence[tuple[str, str]],
                    targets: Mapping[str, Mapping]) -> dict[str, ExplicitPush | None]:
    """Per class its explicit push (None: not listed, so batches toward it stay unsteered,
    as the paper leaves adult and white). A listed class must have a direction, and its
    strength's sign must reach it: a sign that pushes away from the target is a typo."""
    unknown = sorted(set(targets) - set(classes))
    if unknown:
        raise ValueError(f"explicit targets {unknown} are not classes of the concept "
                         f"{list(classes)}")
    pushes = class_pushes(classes, pairs)
    out: dict[str, ExplicitPush | None] = {}
    for cls in classes:
        entry = targets.get(cls)
        if entry is None:
            out[cls] = None
            continue
        push = pushes[cls]
        if push is None:
            raise ValueError(f"explicit target {cls!r} has no direction: it is the positive class "
                             f"of no pair and the negative class of several or none {list(pairs)}")
        strength = float(entry["alpha"])
        if strength == 0 or np.sign(strength) != push.sign:
            side = "positive" if push.sign > 0 else "negative"
            raise ValueError(f"explicit target {cls!r}: strength {strength:g} does not push toward "
                             f"it; it is the {side} class of {push.pair}, so its strength must "
                             f"be {side}")
        sites = tuple(entry["sites"])
        if not sites or len(set(sites)) != len(sites):
            raise ValueError(f"explicit target {cls!r}: sites must be distinct and at least one, "
                             f"got {list(sites)}")
        out[cls] = ExplicitPush(push.pair, sites, strength)
    return out
