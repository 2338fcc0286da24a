"""Jobs of steering calibration: sweep one variant's alpha on calibration samples
(``calibrate_variant_job``), and collect every variant's sweep into ``tradeoff.csv`` and
``tradeoff.png`` (``tradeoff_job``). The method lives in ``icm.steering.calibration``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from icm.evaluation.scoring import fid_of_images, image_embedder, score_fd
from icm.generation.samples import concept_samples
from icm.io.atomic import write_json, write_table
from icm.labeling.labelers import make_labeler
from icm.models.devices import resolve_device
from icm.steering.calibration import (
    ClipFloor,
    alpha_sweep,
    calibration_reference,
    calibration_samples_per_prompt,
    choose_alpha,
    plot_tradeoff,
)

log = logging.getLogger("icm")

TRADEOFF_COLUMNS = ["variant", "alpha", "FD", "CLIP-I", "CLIP-I_paper", "FID", "n_images"]


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
    from icm.evaluation.images import paper_scale
    from icm.evaluation.metrics import paired_cosine
    from icm.generation.shard import SamplerSettings
    from icm.models.loading import ModelSpec, load_pipeline
    from icm.steering.batch_targets import target_rule
    from icm.steering.plan import plan_steering, steer_batches

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


