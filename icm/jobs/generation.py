"""Jobs of stage 1: generate shards of a concept's samples (capturing activations), merge tables."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icm.generation.samples import (
    SAMPLE_COLUMNS,
    SEED_RULE,
    concept_samples,
    shard_samples,
    specific_prompts,
)
from icm.io.atomic import write_table

log = logging.getLogger("icm")


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
    from icm.generation.shard import SamplerSettings, generate_shard
    from icm.models.loading import ModelSpec, load_pipeline

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


