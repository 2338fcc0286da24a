"""``labels.csv`` read back by the stages that use it, checked (its own module: editing a
labeler must not rerun the probes, which only read the table)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def read_labels(path: str | Path, samples: Sequence[int],
                classes: Sequence[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    """``labels.csv`` checked against the samples it labels and the concept's classes, with
    the counts of what a stage reading it leaves out. Every sample has exactly one row;
    every label is a class or empty (unlabelled, ``kept = False``); anything else is an
    error naming the file, since dropping it would skew the probes without a word."""
    path = Path(path)
    table = pd.read_csv(path, keep_default_na=False, dtype={"label": str})
    for column in ("sample", "label", "kept"):
        if column not in table:
            raise ValueError(f"{path}: no column {column!r}; relabel (rule label_images)")
    doubled = sorted(set(table.loc[table["sample"].duplicated(), "sample"].tolist()))
    if doubled:
        raise ValueError(f"{path}: samples {doubled[:10]} have more than one row")
    wanted, present = set(int(s) for s in samples), set(table["sample"].tolist())
    missing, extra = sorted(wanted - present), sorted(present - wanted)
    if missing or extra:
        raise ValueError(f"{path}: {len(missing)} of the stores' {len(wanted)} samples have no "
                         f"row (e.g. {missing[:5]}) and {len(extra)} rows name samples the "
                         f"stores do not hold (e.g. {extra[:5]}): relabel the generation")
    labelled = table["label"] != ""
    unknown = sorted(set(table.loc[labelled & ~table["label"].isin(list(classes)), "label"]))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not classes of the concept "
                         f"{list(classes)}: relabel with the concept's classes")
    kept = table["kept"].astype(str) == "True"
    if (kept != labelled).any():
        raise ValueError(f"{path}: rows whose `kept` disagrees with their label (kept rows "
                         "have a class, dropped rows none): relabel")
    counts = {"samples": len(table), "labelled": int(labelled.sum()),
              "unlabelled": int((~labelled).sum())}
    return table, counts
