"""Figures of the head-map study (mIoU against k, against tau, head relevance, overlays)
and the misinterpretation listing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icm.io.atomic import written

MISREAD_COLUMNS = ["sample", "seed", "prompt", "word", "asked", "drawn", "image"]


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, output: str | Path) -> None:
    """Save a figure atomically (a temporary file of the same type, then a rename)."""
    with written(output) as partial:
        fig.savefig(partial, dpi=120)


def middle(values: Sequence[Any]) -> Any:
    """The value the figures show when a setting has several: the middle one."""
    return list(values)[len(values) // 2]


def plot_curve(curve: pd.DataFrame, table: pd.DataFrame, tau: float, output: str | Path) -> None:
    plt = pyplot()
    words = list(dict.fromkeys(curve["word"]))
    fig, axes = plt.subplots(1, len(words), figsize=(5 * len(words), 3.8), squeeze=False)
    for ax, word in zip(axes[0], words, strict=True):
        part = curve[(curve.word == word) & (curve.tau == tau)]
        for i, (source, rows) in enumerate(part.groupby("relevance", sort=False)):
            color = f"C{i}"
            for order, style in (("most", "-"), ("least", "--")):
                line = rows[rows.order == order]
                ax.plot(line.k, line.miou, style, color=color, marker=".",
                        label=f"{source}, {order} relevant first")
        everything = table[(table.split == "held-out") & (table.word == word)
                           & (table.method == "all") & (table.tau == tau)]
        if len(everything):
            ax.axhline(everything.miou.iloc[0], color="k", lw=0.8, label="all heads (DAAM)")
        ax.set_xscale("log")
        ax.set_xlabel("heads kept")
        ax.set_ylabel(f"held-out mIoU (tau {tau})")
        ax.set_title(f"word: {word}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    rows = -(-len(labels) // 3)
    fig.set_figheight(3.8 + 0.25 * rows)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.25 * rows / (3.8 + 0.25 * rows) + 0.02, 1, 1))
    save(fig, output)
    plt.close(fig)


def plot_tau(table: pd.DataFrame, k: int, output: str | Path) -> None:
    plt = pyplot()
    held = table[table.split == "held-out"]
    words = list(dict.fromkeys(held["word"]))
    fig, axes = plt.subplots(1, len(words), figsize=(5 * len(words), 3.8), squeeze=False)
    for ax, word in zip(axes[0], words, strict=True):
        part = held[held.word == word]
        lines = [("all heads", part[part.method == "all"])]
        chosen = part[(part.method == "topk") & (part.k == k)]
        lines += [(f"top-{k} {source}", rows) for source, rows in chosen.groupby(
            "relevance", sort=False)]
        for label, rows in lines:
            rows = rows.sort_values("tau")
            ax.errorbar(rows.tau, rows.miou, yerr=[rows.miou - rows.miou_low,
                                                   rows.miou_high - rows.miou],
                        marker="o", capsize=2, label=label)
        ax.set_xlabel("threshold tau")
        ax.set_ylabel("held-out mIoU (95 % interval)")
        ax.set_title(f"word: {word}")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    save(fig, output)
    plt.close(fig)


def plot_relevance(relevance: Mapping[str, Mapping[str, Mapping[tuple[str, int], float]]],
                   output: str | Path) -> None:
    plt = pyplot()
    sources = list(relevance)
    words = list(next(iter(relevance.values())))
    fig, axes = plt.subplots(len(sources), len(words), squeeze=False,
                             figsize=(4.5 * len(words), 2.2 + 2.4 * len(sources)))
    for r, source in enumerate(sources):
        for c, word in enumerate(words):
            scores = relevance[source][word]
            sites = list(dict.fromkeys(site for site, _ in scores))
            width = 1 + max(h for _, h in scores)
            grid = np.full((len(sites), width), np.nan)
            for (site, h), value in scores.items():
                grid[sites.index(site), h] = value
            ax = axes[r][c]
            image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_yticks(range(len(sites)), sites, fontsize=5)
            ax.set_xlabel("head")
            ax.set_title(f"{source}: {word}", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    save(fig, output)
    plt.close(fig)


def plot_overlays(images: np.ndarray, panels: Sequence[tuple[str, np.ndarray]],
                  captions: Sequence[str], output: str | Path) -> None:
    """Rows: images; columns: the image, then each panel's word map over it."""
    plt = pyplot()
    rows, cols = len(images), 1 + len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.6 * rows), squeeze=False)
    for i, image in enumerate(images):
        axes[i][0].imshow(image)
        axes[i][0].set_ylabel(captions[i], fontsize=6)
        for j, (name, maps) in enumerate(panels, start=1):
            axes[i][j].imshow(image)
            axes[i][j].imshow(maps[i], cmap="jet", alpha=0.55,
                              extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
            if i == 0:
                axes[i][j].set_title(name, fontsize=6)
        if i == 0:
            axes[i][0].set_title("image", fontsize=6)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    save(fig, output)
    plt.close(fig)


def misread(rows: Sequence[Mapping[str, Any]], images: np.ndarray,
            slots: list[str]) -> list[dict[str, Any]]:
    """(image, slot) pairs where the toy oracle reads another value than the prompt asked,
    for the slots that are oracle attributes (shape, color)."""
    from icm.toy.oracle import oracle_label

    readable = [s for s in slots if s in ("shape", "color")]
    out = []
    for row, image in zip(rows, images, strict=True):
        label = oracle_label(image)
        for slot in readable:
            asked, drawn = row["words"][slots.index(slot)], getattr(label, slot)
            if asked != drawn:
                out.append({"sample": int(row["sample"]), "seed": int(row["seed"]),
                            "prompt": row["prompt"], "word": slot, "asked": asked,
                            "drawn": drawn, "image": row["image"]})
    return out


def mean_map(scorer: Any, chosen: Sequence[tuple[str, int]]) -> np.ndarray:
    return scorer.stack[:, [scorer.index[h] for h in chosen]].mean(dim=1).numpy()
