"""Which sites each layer-selection variant steers (paper section 4, Tables 1 and 5), from a
site ranking: ``top`` (the ICM choice: the k best self-attention sites), ``cross`` (the
cross-attention sites of those same blocks), ``all`` (every attention site), ``all-self``
(every self-attention site, or FLUX's blocks: Table 5's "all layers"), ``random`` (k seeded
self-attention sites), ``worst`` (the k lowest-ranked self-attention sites), ``h-space`` (the
UNet bottleneck, the mid-block output: a baseline row), ``none`` (the original, unsteered
model). By default each pair's direction steers the sites of that pair's own ranking (paper
Table 6 selects layers per direction); ``steering.sites_per: concept`` uses one ranking of
the concept for all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from icm.models.families import FAMILIES, KINDS

#: The site kinds ``top``, ``worst`` and ``random`` choose among, over every family.
STEERED_KINDS = frozenset(k for family in FAMILIES.values() for k in family.steer_kinds)


#: The kinds ``cross`` steers, over every family (cross-attention; FLUX has none).
CROSS_KINDS = frozenset(f.cross_kind for f in FAMILIES.values() if f.cross_kind)


#: Baseline kinds (the UNet bottleneck, ``h-space``): only their own selection steers them.
BASELINE_KINDS = frozenset(name for name, kind in KINDS.items() if kind.baseline)


SELECTIONS = ("none", "top", "cross", "all", "all-self", "random", "worst", "h-space")


def select_sites(ranking: pd.DataFrame, selection: str, k: int | None,
                 seed: int | Sequence[int] = 0) -> list[str]:
    """Sites a layer-selection variant steers, from a ranking (``ranking.csv`` or one pair's
    rows of ``ranking_by_pair.csv``). ``top``, ``worst`` and ``random`` choose among the
    sites of the families' steered kinds (``icm.models.families``: self-attention, or FLUX's block
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
