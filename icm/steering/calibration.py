"""Steering strength calibration: how hard to push, chosen per variant on samples of its own.

A variant whose alpha is ``auto`` is steered on calibration-stream samples (disjoint from the
localization and evaluation seeds) at every alpha of a geometric grid (``alpha_sweep``),
each prompt's batch targets dealt evenly (``calibration_samples_per_prompt``), so that FD
measures the steering, not how a few random draws fell. ``choose_alpha`` keeps the lowest FD
among the alphas whose CLIP-I stays at or above a floor on the scale the floor names
(``ClipFloor``: the paper's (cos + 1) / 2 by default) and, where FID was measured, whose FID
stays within ``max_fid_ratio`` of the unsteered images'. ``plot_tradeoff`` draws the sweeps
(FD against CLIP-I and FID, a curve per variant: layer selections compared at matched
fidelity)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icm.generation.samples import concept_samples
from icm.steering.batch_targets import calibration_batches, target_probabilities

#: Scales a CLIP-I floor may be on: the raw cosine, or the paper's (cos + 1) / 2.
CLIP_I_SCALES = ("paper", "cosine")


@dataclass(frozen=True)
class ClipFloor:
    """The least CLIP-I calibration lets an alpha cost, on a named scale (``CLIP_I_SCALES``):
    the paper reports (cos + 1) / 2, so a floor read off its tables is on that scale."""

    value: float
    scale: str = "paper"

    def __post_init__(self) -> None:
        if self.scale not in CLIP_I_SCALES:
            raise ValueError(f"clip_i_scale {self.scale!r}: use one of {CLIP_I_SCALES}")

    @classmethod
    def of(cls, calibration: Mapping[str, Any]) -> ClipFloor:
        return cls(float(calibration["clip_i_floor"]), calibration["clip_i_scale"])

    def column(self) -> str:
        """The sweep column compared with the floor."""
        return "CLIP-I_paper" if self.scale == "paper" else "CLIP-I"

    def cosine(self) -> float:
        """The floor as a raw cosine (where the plot draws it)."""
        return 2 * self.value - 1 if self.scale == "paper" else self.value

    def __str__(self) -> str:
        scale = "(cos + 1) / 2" if self.scale == "paper" else "cosine"
        return f"CLIP-I >= {self.value:g} ({scale})"


def calibration_reference(classes: Sequence[str], probs: np.ndarray,
                          reference: Mapping[str, float] | None) -> tuple[Any, str]:
    """What calibration's FD measures the distance to: the concept's reference (uniform by
    default), or, in a one-target experiment (every batch toward one class, the paper's
    Table 5), that class alone, so the kept alpha is the one that reaches the target."""
    if np.isclose(np.max(probs), 1.0):
        target = classes[int(np.argmax(probs))]
        return {target: 1.0}, f"FD against the one target {target!r} (a one-target run)"
    return reference, "FD against the concept's reference"


def calibration_batching(calibration: Mapping[str, Any], steering: Mapping[str, Any],
                         classes: Sequence[str], model: Mapping[str, Any]
                         ) -> tuple[np.ndarray, int, int]:
    """(target probabilities, batch size, images per prompt and alpha) of a concept's
    calibration: the batch is ``calibration.batch_size``, else the concept's steering batch,
    else the model's. The calibration jobs and the cost plan (``icm.costs.plan``) both count
    with it."""
    probs = target_probabilities(classes, steering.get("target_probs"))
    batch = int(calibration.get("batch_size") or steering.get("batch_size")
                or model["batch_size"])
    return probs, batch, calibration_samples_per_prompt(calibration, probs, batch)


def calibration_samples_per_prompt(calibration: Mapping[str, Any], probs: np.ndarray,
                                   batch_size: int) -> int:
    """Images per prompt and alpha: ``batches_per_class`` batches for the rarest target
    class, the others in proportion (``icm.steering.batch_targets.calibration_batches``)."""
    return calibration_batches(probs, int(calibration["batches_per_class"])) * batch_size


def alpha_sweep(grid: Sequence[float], floor: ClipFloor, doublings: int,
                measure: Any) -> list[dict[str, Any]]:
    """``measure(alpha)`` rows at 0 and every alpha of ``grid`` in order, then at twice the
    last alpha, up to ``doublings`` times, for as long as the last one still keeps CLIP-I
    at ``floor`` or above: a selection too weak for the grid is pushed until it costs
    fidelity, so that every variant is compared near the floor, not at the grid's end."""
    alphas = [0.0, *sorted(grid)]
    rows, extra = [], 0
    while len(rows) < len(alphas):
        rows.append(measure(alphas[len(rows)]))
        if (len(rows) == len(alphas) and extra < doublings and alphas[-1] > 0
                and rows[-1][floor.column()] >= floor.value):
            alphas.append(2 * alphas[-1])
            extra += 1
    return rows


def choose_alpha(sweep: pd.DataFrame, floor: ClipFloor,
                 max_fid_ratio: float | None = None) -> tuple[float, str]:
    """The lowest-FD alpha (the smaller on a tie) whose CLIP-I is at least ``floor`` on the
    floor's scale and, where the sweep measured FID and ``max_fid_ratio`` is set, whose FID
    is at most that many times the unsteered FID (alpha 0, the same seeds and count: FID's
    small-sample bias cancels in the ratio), among the grid's non-zero alphas; the smallest
    alpha when none keeps both."""
    grid = sweep[sweep["alpha"] > 0].sort_values("alpha")
    kept = grid[floor.column()] >= floor.value
    rule = str(floor)
    unsteered = sweep.loc[sweep["alpha"] == 0, "FID"] if "FID" in sweep else pd.Series([])
    if max_fid_ratio is not None and len(unsteered) and np.isfinite(unsteered.iloc[0]):
        ceiling = max_fid_ratio * float(unsteered.iloc[0])
        kept &= grid["FID"] <= ceiling
        rule += f" and FID <= {max_fid_ratio:g} x unsteered ({ceiling:.1f})"
    kept = grid[kept]
    if kept.empty:
        alpha = float(grid["alpha"].iloc[0])
        return alpha, f"auto: no alpha keeps {rule}; the smallest of the grid, {alpha:g}"
    best = kept.sort_values(["FD", "alpha"], kind="stable").iloc[0]
    fid = f", FID {best['FID']:.1f}" if "FID" in best and np.isfinite(best["FID"]) else ""
    return float(best["alpha"]), (f"auto: lowest calibration FD ({best['FD']:.3f}) with "
                                  f"{rule} ({floor.column()} {best[floor.column()]:.3f}{fid})")


def plot_tradeoff(table: pd.DataFrame, chosen: Mapping[str, Mapping[str, Any]],
                  floor: ClipFloor, output: str | Path) -> None:
    """FD against CLIP-I, one curve per variant through its alphas, the chosen one ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_fid = table["FID"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_fid else 1, figsize=(10 if has_fid else 5.5, 4),
                             squeeze=False)
    ax = axes[0, 0]
    for variant, sweep in table.groupby("variant", sort=False):
        sweep = sweep.sort_values("alpha")
        line, = ax.plot(sweep["CLIP-I"], sweep["FD"], marker="o", label=variant)
        for _, row in sweep.iterrows():
            ax.annotate(f"{row['alpha']:g}", (row["CLIP-I"], row["FD"]), fontsize=6,
                        xytext=(2, 2), textcoords="offset points")
        pick = sweep[np.isclose(sweep["alpha"], chosen[variant]["alpha"])]
        ax.scatter(pick["CLIP-I"], pick["FD"], s=120, facecolors="none",
                   edgecolors=line.get_color())
        if has_fid:  # the same curve against FID: what the push costs in artefacts
            axes[0, 1].plot(sweep["FID"], sweep["FD"], marker="o", color=line.get_color())
            axes[0, 1].scatter(pick["FID"], pick["FD"], s=120, facecolors="none",
                               edgecolors=line.get_color())
    ax.axvline(floor.cosine(), color="grey", linestyle="--", linewidth=1, label=str(floor))
    ax.set_xlabel("CLIP-I (cosine) vs unsteered (higher: closer to the original)")
    ax.set_ylabel("FD (lower: fairer)")
    ax.set_title("calibration: FD against image fidelity, labels are alphas", fontsize=9)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    if has_fid:
        axes[0, 1].set_xlabel("FID of the calibration images (lower: fewer artefacts)")
        axes[0, 1].set_ylabel("FD")
        axes[0, 1].set_title("FD against FID, the chosen alpha ringed", fontsize=9)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def calibration_plan(concept: Mapping[str, Any], model: Mapping[str, Any],
                     generation: Mapping[str, Any], calibration: Mapping[str, Any]) -> dict:
    """What every variant of a concept calibrates on: the samples (calibration stream, the
    evaluation prompts, ``calibration_samples_per_prompt`` each), the batch size, and what FD
    measures the distance to. Shared by the unsteered job and each variant's, so alpha 0 is
    one set of images for all of them."""
    classes = concept["classes"]
    probs, batch_size, per_prompt = calibration_batching(calibration, concept["steering"],
                                                         classes, model)
    prompts = concept.get("evaluation_prompts") or concept["prompts"]
    reference, objective = calibration_reference(classes, probs, concept.get("reference"))
    samples = concept_samples(concept, model, generation, per_prompt, stream="calibration",
                              prompts=prompts)
    return {"classes": classes, "probs": probs, "prompts": prompts, "batch_size": batch_size,
            "per_prompt": per_prompt, "reference": reference, "objective": objective,
            "samples": samples}
