"""Jobs of steering calibration: how hard to push, chosen per variant on samples of their own.

For each variant whose alpha is ``auto``, ``calibrate_variant_job`` steers a set of
calibration-stream samples (disjoint from the localization and evaluation seeds) at every
alpha of a geometric grid and measures FD and CLIP-I (against the same samples unsteered).
Each prompt's batch targets are dealt in the target proportions, ``batches_per_class``
batches for each class (``icm.debias.balanced_targets``), so FD measures the steering, not
how a few random draws fell. It keeps the variant's alpha by one rule (``choose_alpha``):
the lowest FD among the alphas whose CLIP-I stays at or above a floor, on the scale the
floor names (``ClipFloor``: the paper's (cos + 1) / 2 by default), each variant in a file of
its own, so that editing one variant reruns no other. ``tradeoff_job`` collects the sweeps
into ``tradeoff.csv`` and ``tradeoff.png`` (FD against CLIP-I, a curve per variant: the
comparison of layer selections at matched image fidelity).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icm.devices import resolve_device
from icm.jobs.evaluation import fid_of_images, image_embedder, score_fd
from icm.jobs.generation import concept_samples
from icm.jobs.records import write_json
from icm.labels import make_labeler
from icm.tables import write_table

log = logging.getLogger("icm")

TRADEOFF_COLUMNS = ["variant", "alpha", "FD", "CLIP-I", "CLIP-I_paper", "FID", "n_images"]

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


def calibration_samples_per_prompt(calibration: Mapping[str, Any], probs: np.ndarray,
                                   batch_size: int) -> int:
    """Images per prompt and alpha: ``batches_per_class`` batches for the rarest target
    class, the others in proportion (``icm.debias.calibration_batches``)."""
    from icm.debias import calibration_batches

    return calibration_batches(probs, int(calibration["batches_per_class"])) * batch_size


def calibrate_variant_job(
    *,
    model_name: str,
    model: Mapping[str, Any],
    source: str,
    concept: Mapping[str, Any],
    generation: Mapping[str, Any],
    variant_name: str,
    variant: Mapping[str, Any],
    calibration: Mapping[str, Any],
    toy: bool,
    toy_features: str | None,
    evaluation: Mapping[str, Any],
    ranking: str | Path | None,
    pair_ranking: str | Path | None,
    directions: Sequence[str | Path],
    directions_meta: Sequence[str | Path],
    start: str | Path,
    output: str | Path,
    output_alpha: str | Path,
    fid_reference: str | None = None,
) -> None:
    """FD and CLIP-I of one variant at each alpha of ``calibration["alphas"]`` (and 0), on
    calibration-stream samples of the evaluation prompts (``calibration_samples_per_prompt``
    each, targets dealt evenly per prompt), with the variant's sites and start as steering
    uses them; FID too given ``fid_reference`` (the rule passes one where the concept has it
    and ``calibration["fid"]`` is on)."""
    from icm.debias import target_rule
    from icm.generate import SamplerSettings
    from icm.jobs.evaluation import paper_scale
    from icm.jobs.steering import plan_steering, steer_batches
    from icm.metrics import paired_cosine
    from icm.models import ModelSpec, load_pipeline

    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    floor = ClipFloor.of(calibration)
    plan = plan_steering(concept, variant, ranking, pair_ranking, directions, directions_meta,
                         start)
    prompts = concept.get("evaluation_prompts") or concept["prompts"]
    batch_size = (calibration.get("batch_size") or concept["steering"].get("batch_size")
                  or model["batch_size"])
    per_prompt = calibration_samples_per_prompt(calibration, plan.probs, batch_size)
    reference, objective = calibration_reference(plan.classes, plan.probs,
                                                 concept.get("reference"))
    samples = concept_samples(concept, model, generation, per_prompt, stream="calibration",
                              prompts=prompts)
    targets = target_rule(plan.classes, plan.probs, variant["seed"], batch_size, "balanced",
                          per_prompt)
    log.info("%s: %d calibration images per alpha (%d prompts x %d, batches of %d, targets "
             "dealt evenly per prompt)", variant_name, len(samples), len(prompts), per_prompt,
             batch_size)
    device = str(resolve_device(evaluation["device"]))
    labeler_spec = concept["evaluation"]["labeler"] or concept["labeler"]
    labeler = make_labeler(labeler_spec, plan.classes, device=device)
    embedder = image_embedder(toy, toy_features, evaluation, device, labeler_spec)
    pipe = load_pipeline(spec, device=generation["device"])
    plan.check_pipeline(pipe, spec.steps, spec.resolution)
    settings = SamplerSettings.of(spec)
    table = pd.DataFrame([s.as_row() for s in samples])
    base = None

    def measure(alpha: float) -> dict[str, Any]:
        nonlocal base
        images = [image for _, batch_images, _, _ in steer_batches(
            pipe, plan, samples, batch_size, alpha, settings, targets)
            for image in batch_images]
        fd, _, fd_from, _ = score_fd(labeler, labeler_spec, images, list(table["prompt"]),
                                     plan.classes, reference, table)
        embeddings = embedder.embed_images(images)
        base = embeddings if base is None else base
        clip_i = paired_cosine(embeddings, base)
        fid = math.nan
        if fid_reference:
            fid = fid_of_images(images, fid_reference, "toy" if toy else "inception",
                                toy_features, device)
        row = {"variant": variant_name, "alpha": alpha, "FD": fd, "CLIP-I": clip_i,
               "CLIP-I_paper": paper_scale(clip_i), "FID": fid, "n_images": len(images)}
        log.info("%s alpha %g: FD %.3f CLIP-I %.3f FID %.1f (%s)", variant_name, alpha, fd,
                 row["CLIP-I"], fid, fd_from)
        return row

    rows = alpha_sweep([float(a) for a in calibration["alphas"]], floor,
                       int(calibration.get("max_doublings", 0)), measure)
    write_table(output, rows, TRADEOFF_COLUMNS)
    alpha, rule = choose_alpha(pd.DataFrame(rows), floor, calibration["max_fid_ratio"])
    write_json(output_alpha, {"variant": variant_name, "alpha": alpha, "alpha_rule": rule,
                              "clip_i_floor": floor.value, "clip_i_scale": floor.scale,
                              "samples_per_prompt": per_prompt, "batch_size": batch_size,
                              "targets": "dealt evenly per prompt", "objective": objective,
                              "max_fid_ratio": calibration["max_fid_ratio"],
                              "fid_reference": fid_reference})
    log.info("%s: alpha %g (%s)", variant_name, alpha, rule)


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


def tradeoff_job(sweeps: Sequence[str | Path], alphas: Sequence[str | Path],
                 calibration: Mapping[str, Any], output_table: str | Path,
                 output_plot: str | Path) -> None:
    """Collect the variants' sweeps and chosen alphas into one table and its plot (the floor
    from ``calibration``'s ``clip_i_floor`` and ``clip_i_scale``)."""
    floor = ClipFloor.of(calibration)
    table = pd.concat([pd.read_csv(p) for p in sweeps], ignore_index=True)
    write_table(output_table, table.to_dict("records"), TRADEOFF_COLUMNS)
    chosen = {record["variant"]: record
              for record in (json.loads(Path(p).read_text()) for p in alphas)}
    plot_tradeoff(table, chosen, floor, output_plot)
    log.info("chosen alphas: %s", {v: c["alpha"] for v, c in chosen.items()})


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
