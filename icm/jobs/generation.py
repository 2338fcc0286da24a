"""Jobs of stages 0-1: build the models the workflow makes, generate shards, merge tables."""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icm.samples import SAMPLE_COLUMNS, SEED_RULE, Sample, plan_samples, shard_samples
from icm.tables import write_table

log = logging.getLogger("icm")


def specific_prompts(concept: Mapping[str, Any]) -> dict[str, str]:
    """Each class-specific prompt of a concept with its class, class-major as configured
    (``concepts.<c>.specific_prompts``): the prompt order numbers the samples and seeds. A
    prompt under two classes is an error: its images' class would be ambiguous."""
    classes: dict[str, str] = {}
    for name, prompts in (concept.get("specific_prompts") or {}).items():
        for prompt in prompts:
            if classes.setdefault(prompt, name) != name:
                raise ValueError(f"specific prompt {prompt!r} is listed under both "
                                 f"{classes[prompt]} and {name}")
    return classes


def concept_samples(
    concept: Mapping[str, Any], model: Mapping[str, Any], generation: Mapping[str, Any],
    per_prompt: int | None = None, stream: str = "localization",
    prompts: Sequence[str] | None = None, prompt_set: str = "general",
) -> list[Sample]:
    """The sample plan of a (model, concept) run: ``prompts`` (default: the concept's
    general prompts), ``per_prompt`` repeats and the seed rule of ``stream``, so sample
    (stream, prompt, repeat) has one seed in every stage that uses it.

    The repeats: ``per_prompt`` when given (steering passes its own
    ``steering.samples_per_prompt``, which wins), else the model's ``samples_per_prompt``
    (a smaller localization run for that model), else the concept's. The ``specific``
    prompt set is the concept's class-specific prompts (``specific_prompts``) with
    ``specific_samples_per_prompt`` repeats, seeded apart from the general prompts."""
    if prompt_set == "specific":
        prompts = prompts or list(specific_prompts(concept))
        if not prompts:
            raise ValueError("the concept has no specific_prompts")
        per_prompt = (per_prompt or model.get("samples_per_prompt")
                      or concept["specific_samples_per_prompt"])
    per_prompt = per_prompt or model.get("samples_per_prompt") or concept["samples_per_prompt"]
    return plan_samples(prompts or concept["prompts"], per_prompt, generation["base_seed"],
                        stream, prompt_set)


def generate_shard_job(
    *,
    model_name: str,
    model: Mapping[str, Any],
    source: str,
    concept_name: str,
    concept: Mapping[str, Any],
    generation: Mapping[str, Any],
    shard: int,
    images_dir: str | Path,
    table: str | Path,
    store: str | Path,
    prompt_set: str = "general",
) -> None:
    """Generate one shard of the concept's general prompts or (``prompt_set="specific"``)
    of its class-specific prompts. The model loads first, so missing weights stop the job
    before anything is written."""
    from icm.generate import SamplerSettings, generate_shard
    from icm.models import ModelSpec, load_pipeline

    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    samples = concept_samples(concept, model, generation, prompt_set=prompt_set)
    prompts = list(dict.fromkeys(s.prompt for s in samples))
    mine = shard_samples(samples, model["n_shards"], shard, model["batch_size"])
    log.info("%s/%s shard %d: samples %d..%d of %d", model_name, concept_name, shard,
             mine[0].sample, mine[-1].sample, len(samples))
    pipe = load_pipeline(spec, device=generation["device"])
    attrs = {
        "model": {"name": model_name, "family": spec.family, "source": source,
                  "dtype": spec.dtype, "scheduler": type(pipe.scheduler).__name__},
        "concept": concept_name,
        "prompts": prompts,
        "prompt_set": prompt_set,
        "samples_per_prompt": len(samples) // len(prompts),
        "base_seed": generation["base_seed"],
        "seed_stream": "localization",
        "seed_rule": SEED_RULE,
        "shard": shard,
        "n_shards": model["n_shards"],
    }
    if prompt_set == "specific":
        attrs["prompt_classes"] = specific_prompts(concept)
    generate_shard(
        pipe,
        mine,
        SamplerSettings.of(spec),
        images_dir,
        table,
        store,
        batch_size=model["batch_size"],
        store_dtype=generation["store_dtype"],
        chunk_samples=generation["chunk_samples"],
        attrs=attrs,
    )



def merge_samples_job(shard_tables: Sequence[str | Path], output: str | Path) -> None:
    """Concatenate shard sample tables; image paths become relative to the merged table."""
    output = Path(output)
    rows: list[dict[str, object]] = []
    for shard, table in enumerate(shard_tables):
        table = Path(table)
        with table.open(newline="") as handle:
            for row in csv.DictReader(handle):
                image = os.path.relpath(table.parent / row["image"], output.parent)
                rows.append({**row, "image": image, "shard": shard})
    write_table(output, rows, columns=[*SAMPLE_COLUMNS, "shard"])



def build_model_job(builder: str, output: str | Path, seed: int = 0) -> None:
    """Build a model that the workflow makes itself instead of downloading: a tiny
    random-weight replica of a family (``tiny-sd15``, ``tiny-sdxl``, ``tiny-sana``,
    ``tiny-flux``)."""
    from icm.models.tiny import save_replica, save_tiny_sd15
    from icm.models.tiny_flux import build_tiny_flux
    from icm.models.tiny_sana import build_tiny_sana
    from icm.models.tiny_sdxl import build_tiny_sdxl

    builders = {"tiny-sdxl": build_tiny_sdxl, "tiny-sana": build_tiny_sana,
                "tiny-flux": build_tiny_flux}
    if builder == "tiny-sd15":
        save_tiny_sd15(Path(output), seed=seed)
    elif builder in builders:
        save_replica(builders[builder], Path(output), seed=seed)
    else:
        raise ValueError(f"unknown model builder {builder!r}; known: "
                         f"{sorted([*builders, 'tiny-sd15'])}")
    print(f"built {builder} into {output}", file=sys.stderr)
