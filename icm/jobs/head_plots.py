"""Figures of the head-map study, and the misinterpretation listing.

* ``curve.png``: held-out mIoU against the number of heads kept, most relevant first (solid)
  and least relevant first (dashed), per relevance source; DAAM's all-head mIoU as a line;
* ``tau.png``: held-out mIoU against the threshold, all heads and each source's top-k;
* ``overlays.png``: held-out images with their word maps: all heads, each source's top-k,
  the first source's bottom-k;
* ``relevance.png``: a sites x heads heatmap per source and word;
* ``misread.csv`` / ``misread.png``: held-out images where the toy oracle reads another shape
  or colour than the prompt asked, with their word maps (the diagnostic use of word maps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icm.head_study import slot_names
from icm.jobs.head_maps import read_images, read_masks, read_relevance, read_split
from icm.jobs.records import written
from icm.tables import write_table

MISREAD_COLUMNS = ["sample", "seed", "prompt", "word", "asked", "drawn", "image"]


def _pyplot() -> Any:
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
    plt = _pyplot()
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
    plt = _pyplot()
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
    plt = _pyplot()
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
    plt = _pyplot()
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


def plot_head_maps_job(
    *, study: Mapping[str, Any], table: str | Path, curve: str | Path,
    relevance: str | Path, held_out: tuple[Sequence[str], Sequence[str]],
    outputs: Mapping[str, str | Path], per_prompt: int = 2,
) -> None:
    """Every figure of the module docstring, from the held-out split."""
    from icm.aggregation import chosen_heads
    from icm.head_eval import WordScorer

    table_frame, curve_frame = pd.read_csv(table), pd.read_csv(curve)
    tau = middle(study["taus"])
    plot_curve(curve_frame, table_frame, tau, outputs["curve"])
    topk = table_frame[table_frame.method == "topk"]
    k = middle(sorted(topk.k.unique())) if len(topk) else 1
    plot_tau(table_frame, int(k), outputs["tau"])
    scores = read_relevance(relevance)
    plot_relevance(scores, outputs["relevance"])

    slots, size = slot_names(study), study["map_size"]
    rows, maps = read_split(*held_out, study["exclude"])
    images = read_images(rows)
    masks = read_masks(study["masks"], rows, slots, images)
    shown = [i for i, row in enumerate(rows) if int(row["repeat"]) < per_prompt]
    panel_rows, panels_by_slot = [], []
    for w, slot in enumerate(slots):
        scorer = WordScorer(maps, w, masks[:, w], size)
        panels = [("all heads", scorer.stack.mean(dim=1).numpy())]
        for source, per in scores.items():
            chosen = chosen_heads(scorer.heads, per[slot], int(k))
            panels.append((f"top-{k} {source}", _mean(scorer, chosen)))
        first = next(iter(scores))
        bottom = chosen_heads(scorer.heads, {h: -v for h, v in scores[first][slot].items()},
                              int(k))
        panels.append((f"bottom-{k} {first}", _mean(scorer, bottom)))
        panels_by_slot.append(panels)
        panel_rows += [(i, w) for i in shown]
    plot_overlays(
        images[[i for i, _ in panel_rows]],
        [(name, np.stack([panels_by_slot[w][j][1][i] for i, w in panel_rows]))
         for j, (name, _) in enumerate(panels_by_slot[0])],
        [f"{rows[i]['prompt']}: {slots[w]}" for i, w in panel_rows], outputs["overlays"])

    wrong = misread(rows, images, slots) if study["masks"]["type"] == "oracle" else []
    write_table(outputs["misread"], wrong, MISREAD_COLUMNS)
    index = {int(row["sample"]): i for i, row in enumerate(rows)}
    picked = [(index[m["sample"]], slots.index(m["word"]), m) for m in wrong[:12]]
    if picked:
        plot_overlays(
            images[[i for i, _, _ in picked]],
            [(name, np.stack([panels_by_slot[w][j][1][i] for i, w, _ in picked]))
             for j, (name, _) in enumerate(panels_by_slot[0])],
            [f"{m['prompt']}: drew {m['drawn']}" for _, _, m in picked], outputs["misread_plot"])
    else:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, "no held-out image drew another word than asked", ha="center",
                va="center", fontsize=8)
        ax.axis("off")
        save(fig, outputs["misread_plot"])
        plt.close(fig)


def _mean(scorer: Any, chosen: Sequence[tuple[str, int]]) -> np.ndarray:
    return scorer.stack[:, [scorer.index[h] for h in chosen]].mean(dim=1).numpy()
