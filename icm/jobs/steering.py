"""Job of stage 4: generate one shard of one layer-selection variant with debiasing steering
(the plan from ``icm.steering.plan``)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from icm.generation.samples import concept_samples, shard_samples
from icm.generation.shard import (
    SamplerSettings,
    image_name,
)
from icm.io.atomic import atomic_directory, write_json, write_table
from icm.io.provenance import package_versions
from icm.models.loading import ModelSpec, load_pipeline
from icm.steering.batch_targets import target_rule
from icm.steering.plan import (
    STEER_COLUMNS,
    explicit_text,
    plan_steering,
    resolve_alpha,
    steer_batches,
)

log = logging.getLogger("icm")


def steer_shard_job(
    *,
    model_name: str,
    model: Mapping[str, Any],
    source: str,
    concept_name: str,
    concept: Mapping[str, Any],
    generation: Mapping[str, Any],
    variant_name: str,
    variant: Mapping[str, Any],
    shard: int,
    ranking: str | Path | None,
    pair_ranking: str | Path | None,
    directions: Sequence[str | Path],
    directions_meta: Sequence[str | Path],
    start: str | Path | None,
    alphas: str | Path | None,
    images_dir: str | Path,
    table: str | Path,
    record: str | Path,
) -> None:
    """Generate one shard of a variant: each batch gets a target class; if the class has a
    direction and the variant sites and a non-zero alpha, the batch is steered toward it.

    ``variant`` is resolved: ``sites`` (selection), ``alpha`` (a number, or ``auto``: the
    calibration's choice, file ``alphas``), ``seed``, and ``k`` where the selection uses it;
    the original (``sites: none``) needs no ranking and no directions; ``directions`` and
    ``directions_meta`` are the probes' safetensors and JSON files in the order of
    ``concept["pairs"]``; ``pair_ranking`` (``ranking_by_pair.csv``) selects sites per pair,
    None selects them once from ``ranking``. The samples are the evaluation seed stream over
    the concept's evaluation prompts: none of them is a localization or calibration sample.
    The step axis (count and timesteps) comes from the probes, and the pipeline must run
    the same timesteps; the start step is the ranking's (``ranking.json``, ``start``).
    """
    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    try:
        plan = plan_steering(concept, variant, ranking, pair_ranking, directions,
                             directions_meta, start)
    except ValueError as error:  # name what to fix: the variant, the model, the concept
        raise ValueError(f"variant {variant_name} on {model_name}/{concept_name}: {error}") \
            from error
    alpha, alpha_rule = resolve_alpha(variant, variant_name, alphas)
    prompts = concept.get("evaluation_prompts") or concept["prompts"]
    samples = concept_samples(concept, model, generation,
                              concept["steering"]["samples_per_prompt"], stream="evaluation",
                              prompts=prompts)
    batch_size = concept["steering"].get("batch_size") or model["batch_size"]
    mine = shard_samples(samples, model["n_shards"], shard, batch_size)
    log.info("%s/%s variant %s shard %d: %d samples, alpha %g from step %s at %s",
             model_name, concept_name, variant_name, shard, len(mine), alpha,
             plan.start_step, plan.sites)
    pipe = load_pipeline(spec, device=generation["device"])
    planned = plan.check_pipeline(pipe, spec.steps, spec.resolution)
    settings = SamplerSettings.of(spec)
    rows: list[dict[str, object]] = []
    rel = Path(os.path.relpath(Path(images_dir).resolve(), Path(table).parent.resolve()))
    with (atomic_directory(images_dir) as partial,
          tqdm(total=len(mine), desc=f"steer {variant_name}", unit="img", file=sys.stderr) as bar):
        partial.mkdir()
        for batch, images, target, steered in steer_batches(
                pipe, plan, mine, batch_size, alpha, settings,
                target_rule(plan.classes, plan.probs, variant["seed"], batch_size,
                            concept["steering"]["target_draw"])):
            for sample, image in zip(batch, images, strict=True):
                image.save(partial / image_name(sample))
                rows.append({**sample.as_row(), "image": str(rel / image_name(sample)),
                             "target": target, "steered": steered})
            bar.update(len(batch))
    write_table(table, rows, STEER_COLUMNS)
    unsteered = variant["sites"] == "none"
    write_json(record, {
        "model": {"name": model_name, "source": source, "steps": spec.steps,
                  "scheduler": type(pipe.scheduler).__name__},
        "concept": concept_name,
        "variant": variant_name,
        "selection": variant["sites"],
        "sites_per": None if unsteered else "target" if plan.explicit is not None
        else "pair" if pair_ranking else "concept",
        "sites": plan.sites,
        "sites_by_target": plan.sites_by_target(),
        "alpha": alpha if plan.explicit is None else explicit_text(plan.explicit),
        "strengths": None if plan.explicit is None else {
            c: None if e is None else e.strength for c, e in plan.explicit.items()},
        "alpha_rule": alpha_rule,
        "alpha_unit": plan.alpha_unit,
        "direction_steps": variant.get("direction_steps"),
        "directions": None if unsteered else variant.get("directions", "general"),
        "k": variant.get("k"),
        "batch_size": batch_size,
        "seed": variant["seed"],
        "start_step": plan.start_step,
        "start_timestep": None if plan.start_step is None
        else float(plan.timesteps[plan.start_step]),
        "start_rule": plan.start_rule,
        "timesteps": planned.tolist(),
        "pushes": {c: None if p is None else {"pair": p.pair, "sign": p.sign}
                   for c, p in plan.pushes.items()},
        "target_draw": concept["steering"]["target_draw"],
        "target_probs": dict(zip(plan.classes, np.round(plan.probs, 6).tolist(), strict=True)),
        "prompts": list(prompts),
        "seed_stream": "evaluation",
        "shard": shard,
        "n_shards": model["n_shards"],
        "base_seed": generation["base_seed"],
        "versions": package_versions(),
    })


