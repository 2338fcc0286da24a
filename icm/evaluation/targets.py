"""Steering toward one target class (the paper's Table 5): success rate per variant.

Every evaluation batch is steered toward one target class, drawn per batch from the same seed
for every variant, so the images of a target are the same seeds in every variant. For a
target ``c`` and a variant, over the images whose batch target is ``c``:

- ``already_target``: share whose *original* image (same seed, unsteered) is already ``c``;
- ``success_rate``: the share of all of them whose image in this variant is ``c`` (the
  paper's Table 5 denominator: "changing 91.0% of images" of the 100 steered; the
  original's row is its ``already_target``);
- ``flip_rate``: of those whose original is labelled and is not ``c``, the share whose
  image in this variant is ``c`` (0 for the original by construction);
- ``target_confidence``: mean labeler confidence in ``c`` (FairFace's probability, CLIP's
  zero-shot softmax, the oracle's colour softmax);
- ``CLIP-I``: mean similarity to the original image of the same seed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from icm.evaluation.images import paper_scale

TARGET_COLUMNS = ["target", "variant", "success_rate", "target_confidence", "CLIP-I",
                  "CLIP-I_paper", "flip_rate", "already_target", "n_images", "n_eligible",
                  "n_steered", "alpha", "selection", "labeler"]


def target_rows(per_variant: Mapping[str, pd.DataFrame], original: str, target: str,
                records: Mapping[str, Mapping] | None = None) -> list[dict]:
    """One row per variant for ``target``; ``per_variant`` holds each variant's per-image
    table (``metrics/{variant}.labels.csv``: sample, target, steered, label, p_{class},
    CLIP-I), ``original`` names the unsteered variant."""
    base = per_variant[original].set_index("sample")
    column = f"p_{target}"
    if column not in base.columns:
        raise ValueError(f"{target!r} is not a class of these tables ({list(base.columns)})")
    seeds = base.index[base["target"] == target]
    if len(seeds) == 0:
        raise ValueError(f"no evaluation batch was steered toward {target!r}: raise "
                         "steering.samples_per_prompt or check target_probs")
    before = base.loc[seeds, "label"].fillna("").astype(str)
    eligible = seeds[(before != "") & (before != target)]
    rows = []
    for name, table in per_variant.items():
        table = table.set_index("sample")
        missing = seeds.difference(table.index)
        if len(missing):
            raise ValueError(f"variant {name} lacks {len(missing)} of the original's samples "
                             "(steer every variant on the same seeds)")
        mine = table.loc[seeds]
        if not (mine["target"] == target).all():
            raise ValueError(f"variant {name} drew other targets for the same samples")
        after = table.loc[eligible, "label"].fillna("").astype(str)
        record = (records or {}).get(name, {})
        clip_i = float(mine["CLIP-I"].mean()) if name != original else np.nan
        rows.append({
            "target": target, "variant": name,
            "success_rate": float((mine["label"].fillna("").astype(str) == target).mean()),
            "target_confidence": float(mine[column].mean()),
            "CLIP-I": clip_i, "CLIP-I_paper": paper_scale(clip_i),
            "flip_rate": float((after == target).mean()) if len(eligible) else np.nan,
            "already_target": float((before == target).mean()),
            "n_images": len(seeds), "n_eligible": len(eligible),
            "n_steered": int(mine["steered"].astype(str).eq("True").sum()),
            "alpha": record.get("alpha"), "selection": record.get("selection"),
            "labeler": record.get("labeler"),
        })
    return rows


def read_labels(path: str | Path) -> pd.DataFrame:
    """A ``metrics/{variant}.labels.csv``: labels as text ("" = unlabelled), numbers as
    numbers (empty = NaN)."""
    table = pd.read_csv(path, keep_default_na=False, dtype={"label": str, "target": str})
    for column in table.columns:
        if column.startswith("p_") or column == "CLIP-I":
            table[column] = pd.to_numeric(table[column], errors="coerce")
    return table
