"""Figures and text of the evaluation table: the per-variant metrics plot and a variant's
steered layers in one line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd


def layers_text(sites: Mapping[str, Sequence[str]] | Sequence[str]) -> str:
    """The table's ``layers`` cell: ``;``-separated sites, per pair as ``pair: a;b | ...``
    when pairs steer different sets of sites."""
    if not isinstance(sites, Mapping):
        return ";".join(sites)
    if len({frozenset(v) for v in sites.values()}) == 1:
        return ";".join(next(iter(sites.values())))
    return " | ".join(f"{pair}: {';'.join(v)}" for pair, v in sites.items())


def plot_metrics(table: pd.DataFrame, output: str | Path) -> None:
    """One bar chart per metric, a bar per variant: the table at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["FD", "FID", "CLIP-I", "CLIP-T"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3))
    for ax, metric in zip(axes, metrics, strict=True):
        ax.bar(table["variant"], table[metric].astype(float), color="tab:blue")
        better = "lower" if metric in ("FD", "FID") else "higher"
        ax.set_title(f"{metric} ({better} is better)", fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
