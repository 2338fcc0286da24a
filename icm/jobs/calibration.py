"""Jobs of steering calibration: generate and score the unsteered calibration images once
per concept (``calibrate_unsteered_job``, every sweep's alpha 0), sweep one variant's alpha
on the same samples (``calibrate_variant_job``), and collect every variant's sweep into
``tradeoff.csv`` and ``tradeoff.png`` (``tradeoff_job``). The method lives in
``icm.steering.calibration``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from icm.evaluation.scoring import (
    embeddings_of,
    fid_of_images,
    image_embedder,
    score_fd,
    write_embeddings,
)
from icm.io.atomic import write_json, write_table
from icm.labeling.labelers import make_labeler
from icm.models.devices import resolve_device
from icm.steering.calibration import (
    ClipFloor,
    alpha_sweep,
    calibration_plan,
    choose_alpha,
    plot_tradeoff,
)

log = logging.getLogger("icm")

TRADEOFF_COLUMNS = ["variant", "alpha", "FD", "CLIP-I", "CLIP-I_paper", "FID", "n_images"]


class Scorer:
    """Scores one calibration image set: FD with the concept's evaluation labeler, CLIP-I
    against the unsteered set's embeddings, FID where a reference is given."""

    def __init__(self, concept: Mapping[str, Any], setup: Mapping[str, Any], toy: bool,
                 toy_features: str | None, evaluation: Mapping[str, Any],
                 fid_reference: str | None) -> None:
        device = str(resolve_device(evaluation["device"]))
        self.spec = concept["evaluation"]["labeler"] or concept["labeler"]
        self.labeler = make_labeler(self.spec, setup["classes"], device=device)
        self.embedder = image_embedder(toy, toy_features, evaluation, device, self.spec)
        self.setup, self.toy, self.toy_features = setup, toy, toy_features
        self.fid_reference, self.device = fid_reference, device
        self.table = pd.DataFrame([s.as_row() for s in setup["samples"]])

    def row(self, name: str, alpha: float, images: list, base: Any) -> tuple[dict, Any]:
        """The sweep row of ``images`` and their embeddings (``base`` None: they are the
        unsteered set, CLIP-I 1 by definition)."""
        from icm.evaluation.images import paper_scale
        from icm.evaluation.metrics import paired_cosine

        fd, _, fd_from, _ = score_fd(self.labeler, self.spec, images, list(self.table["prompt"]),
                                     self.setup["classes"], self.setup["reference"], self.table)
        embeddings = self.embedder.embed_images(images)
        clip_i = paired_cosine(embeddings, embeddings if base is None else base)
        fid = math.nan
        if self.fid_reference:
            fid = fid_of_images(images, self.fid_reference, "toy" if self.toy else "inception",
                                self.toy_features, self.device)
        row = {"variant": name, "alpha": alpha, "FD": fd, "CLIP-I": clip_i,
               "CLIP-I_paper": paper_scale(clip_i), "FID": fid, "n_images": len(images)}
        log.info("%s alpha %g: FD %.3f CLIP-I %.3f FID %.1f (%s)", name, alpha, fd, clip_i,
                 fid, fd_from)
        return row, embeddings


def calibrate_unsteered_job(
    *,
    model_name: str,
    model: Mapping[str, Any],
    source: str,
    concept: Mapping[str, Any],
    generation: Mapping[str, Any],
    calibration: Mapping[str, Any],
    toy: bool,
    toy_features: str | None,
    evaluation: Mapping[str, Any],
    output: str | Path,
    output_embeddings: str | Path,
    fid_reference: str | None = None,
) -> None:
    """Alpha 0 of every variant's calibration sweep, made once per concept: the calibration
    samples generated unsteered, in the batches steering cuts, scored as each sweep scores
    its alphas; the row, and the image embeddings that each variant's CLIP-I compares
    with."""
    from icm.generation.shard import SamplerSettings, batches, generate_images
    from icm.models.loading import ModelSpec, load_pipeline

    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    setup = calibration_plan(concept, model, generation, calibration)
    log.info("unsteered: %d calibration images (%d prompts x %d, batches of %d)",
             len(setup["samples"]), len(setup["prompts"]), setup["per_prompt"],
             setup["batch_size"])
    scorer = Scorer(concept, setup, toy, toy_features, evaluation, fid_reference)
    pipe = load_pipeline(spec, device=generation["device"])
    settings = SamplerSettings.of(spec)
    images = [image for batch in batches(setup["samples"], setup["batch_size"])
              for image in generate_images(pipe, batch, settings)]
    row, embeddings = scorer.row("unsteered", 0.0, images, None)
    write_table(output, [row], TRADEOFF_COLUMNS)
    write_embeddings(output_embeddings, embeddings, [s.sample for s in setup["samples"]],
                     scorer.embedder.name)


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
    unsteered: str | Path,
    unsteered_embeddings: str | Path,
    output: str | Path,
    output_alpha: str | Path,
    fid_reference: str | None = None,
) -> None:
    """FD and CLIP-I of one variant at each alpha of ``calibration["alphas"]`` (alpha 0 is
    the concept's unsteered row, ``calibrate_unsteered_job``), on calibration-stream samples
    of the evaluation prompts (``calibration_samples_per_prompt`` each, targets dealt evenly
    per prompt), with the variant's sites and start as steering uses them; FID too given
    ``fid_reference`` (the rule passes one where the concept has it and
    ``calibration["fid"]`` is on)."""

    from icm.generation.shard import SamplerSettings
    from icm.models.loading import ModelSpec, load_pipeline
    from icm.steering.batch_targets import target_rule
    from icm.steering.plan import plan_steering, steer_batches

    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    floor = ClipFloor.of(calibration)
    plan = plan_steering(concept, variant, ranking, pair_ranking, directions, directions_meta,
                         start)
    setup = calibration_plan(concept, model, generation, calibration)
    batch_size, per_prompt = setup["batch_size"], setup["per_prompt"]
    targets = target_rule(plan.classes, plan.probs, variant["seed"], batch_size, "balanced",
                          per_prompt)
    log.info("%s: %d calibration images per alpha (%d prompts x %d, batches of %d, targets "
             "dealt evenly per prompt)", variant_name, len(setup["samples"]),
             len(setup["prompts"]), per_prompt, batch_size)
    base = embeddings_of(unsteered_embeddings, [s.sample for s in setup["samples"]])
    zero = {**pd.read_csv(unsteered).iloc[0].to_dict(), "variant": variant_name}
    if int(zero["n_images"]) != len(setup["samples"]):
        raise ValueError(f"{unsteered} holds {zero['n_images']} images, the calibration "
                         f"{len(setup['samples'])}: rerun calibrate_unsteered")
    scorer = Scorer(concept, setup, toy, toy_features, evaluation, fid_reference)
    pipe = load_pipeline(spec, device=generation["device"])
    plan.check_pipeline(pipe, spec.steps, spec.resolution)
    settings = SamplerSettings.of(spec)

    def measure(alpha: float) -> dict[str, Any]:
        if alpha == 0:
            return zero
        images = [image for _, batch_images, _, _ in steer_batches(
            pipe, plan, setup["samples"], batch_size, alpha, settings, targets)
            for image in batch_images]
        return scorer.row(variant_name, alpha, images, base)[0]

    rows = alpha_sweep([float(a) for a in calibration["alphas"]], floor,
                       int(calibration.get("max_doublings", 0)), measure)
    write_table(output, rows, TRADEOFF_COLUMNS)
    alpha, rule = choose_alpha(pd.DataFrame(rows), floor, calibration["max_fid_ratio"])
    write_json(output_alpha, {"variant": variant_name, "alpha": alpha, "alpha_rule": rule,
                              "clip_i_floor": floor.value, "clip_i_scale": floor.scale,
                              "samples_per_prompt": per_prompt, "batch_size": batch_size,
                              "targets": "dealt evenly per prompt",
                              "objective": setup["objective"],
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


