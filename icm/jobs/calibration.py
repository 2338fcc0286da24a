"""Jobs of steering calibration: how hard to push, chosen per variant on samples of their own.

For each variant whose alpha is ``auto``, ``calibrate_variant_job`` steers a small set of
calibration-stream samples (disjoint from the localization and evaluation seeds) at every
alpha of a geometric grid and measures FD and CLIP-I (against the same samples unsteered).
It keeps the variant's alpha by one rule (``choose_alpha``): the lowest FD among the alphas
whose CLIP-I stays at or above a floor, each variant in a file of its own, so that editing
one variant reruns no other. ``tradeoff_job`` collects the sweeps into ``tradeoff.csv`` and
``tradeoff.png`` (FD against CLIP-I, a curve per variant: the comparison of layer
selections at matched image fidelity).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icm.devices import resolve_device
from icm.jobs.evaluation import image_embedder, score_fd
from icm.jobs.generation import concept_samples
from icm.jobs.records import write_json
from icm.labels import make_labeler
from icm.tables import write_table

log = logging.getLogger("icm")

TRADEOFF_COLUMNS = ["variant", "alpha", "FD", "CLIP-I", "FID", "n_images"]


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
    floor: float,
    output: str | Path,
    output_alpha: str | Path,
) -> None:
    """FD and CLIP-I of one variant at each alpha of ``calibration["alphas"]`` (and 0), on
    ``calibration["samples_per_prompt"]`` calibration-stream samples per evaluation prompt,
    with the variant's sites, start and batch targets as steering uses them."""
    from icm.generate import SamplerSettings
    from icm.jobs.steering import plan_steering, steer_batches
    from icm.metrics import paired_cosine
    from icm.models import ModelSpec, load_pipeline

    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    plan = plan_steering(concept, variant, ranking, pair_ranking, directions, directions_meta,
                         start)
    prompts = concept.get("evaluation_prompts") or concept["prompts"]
    samples = concept_samples(concept, model, generation, calibration["samples_per_prompt"],
                              stream="calibration", prompts=prompts)
    batch_size = concept["steering"].get("batch_size") or model["batch_size"]
    if calibration["samples_per_prompt"] < 3 * batch_size:
        log.warning("%d calibration samples per prompt are fewer than three batches of %d: "
                    "each batch has one target, so a prompt's FD will mostly measure that "
                    "target, not the balance", calibration["samples_per_prompt"], batch_size)
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
            pipe, plan, samples, batch_size, alpha, settings, variant["seed"],
            concept["steering"]["target_draw"]) for image in batch_images]
        fd, _, fd_from, _ = score_fd(labeler, labeler_spec, images, list(table["prompt"]),
                                     plan.classes, concept.get("reference"), table)
        embeddings = embedder.embed_images(images)
        base = embeddings if base is None else base
        row = {"variant": variant_name, "alpha": alpha, "FD": fd,
               "CLIP-I": paired_cosine(embeddings, base), "FID": math.nan,
               "n_images": len(images)}
        log.info("%s alpha %g: FD %.3f CLIP-I %.3f (%s)", variant_name, alpha, fd,
                 row["CLIP-I"], fd_from)
        return row

    rows = alpha_sweep([float(a) for a in calibration["alphas"]], floor,
                       int(calibration.get("max_doublings", 0)), measure)
    write_table(output, rows, TRADEOFF_COLUMNS)
    alpha, rule = choose_alpha(pd.DataFrame(rows), floor)
    write_json(output_alpha, {"variant": variant_name, "alpha": alpha, "alpha_rule": rule,
                              "clip_i_floor": floor})
    log.info("%s: alpha %g (%s)", variant_name, alpha, rule)


def alpha_sweep(grid: Sequence[float], floor: float, doublings: int,
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
                and rows[-1]["CLIP-I"] >= floor):
            alphas.append(2 * alphas[-1])
            extra += 1
    return rows


def choose_alpha(sweep: pd.DataFrame, floor: float) -> tuple[float, str]:
    """The lowest-FD alpha (the smaller on a tie) whose CLIP-I is at least ``floor``, among
    the grid's non-zero alphas; the smallest alpha when none keeps that fidelity."""
    grid = sweep[sweep["alpha"] > 0].sort_values("alpha")
    kept = grid[grid["CLIP-I"] >= floor]
    if kept.empty:
        alpha = float(grid["alpha"].iloc[0])
        return alpha, (f"auto: no alpha keeps CLIP-I >= {floor}; the smallest of the grid, "
                       f"{alpha:g}")
    best = kept.sort_values(["FD", "alpha"], kind="stable").iloc[0]
    return float(best["alpha"]), (f"auto: lowest calibration FD ({best['FD']:.3f}) with "
                                  f"CLIP-I >= {floor} (CLIP-I {best['CLIP-I']:.3f})")


def tradeoff_job(sweeps: Sequence[str | Path], alphas: Sequence[str | Path], floor: float,
                 output_table: str | Path, output_plot: str | Path) -> None:
    """Collect the variants' sweeps and chosen alphas into one table and its plot."""
    table = pd.concat([pd.read_csv(p) for p in sweeps], ignore_index=True)
    write_table(output_table, table.to_dict("records"), TRADEOFF_COLUMNS)
    chosen = {record["variant"]: record
              for record in (json.loads(Path(p).read_text()) for p in alphas)}
    plot_tradeoff(table, chosen, floor, output_plot)
    log.info("chosen alphas: %s", {v: c["alpha"] for v, c in chosen.items()})


def plot_tradeoff(table: pd.DataFrame, chosen: Mapping[str, Mapping[str, Any]], floor: float,
                  output: str | Path) -> None:
    """FD against CLIP-I, one curve per variant through its alphas, the chosen one ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for variant, sweep in table.groupby("variant", sort=False):
        sweep = sweep.sort_values("alpha")
        line, = ax.plot(sweep["CLIP-I"], sweep["FD"], marker="o", label=variant)
        for _, row in sweep.iterrows():
            ax.annotate(f"{row['alpha']:g}", (row["CLIP-I"], row["FD"]), fontsize=6,
                        xytext=(2, 2), textcoords="offset points")
        pick = sweep[np.isclose(sweep["alpha"], chosen[variant]["alpha"])]
        ax.scatter(pick["CLIP-I"], pick["FD"], s=120, facecolors="none",
                   edgecolors=line.get_color())
    ax.axvline(floor, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("CLIP-I vs unsteered (higher: closer to the original)")
    ax.set_ylabel("FD (lower: fairer)")
    ax.set_title("calibration: FD against image fidelity, labels are alphas", fontsize=9)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
