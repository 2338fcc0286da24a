# Helpers shared by the rules: config lookups by wildcard. No rules here.
import re
from pathlib import Path

MODELS = config["models"]
CONCEPTS = config["concepts"]


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)) or "NO_MODELS",
    concept="|".join(map(re.escape, CONCEPTS)) or "NO_CONCEPTS",
    shard=r"\d{3}",


def built_model_dir(name):
    """Where the workflow builds a model that has a `builder` (no weights to download)."""
    return f"results/models/{name}"


def model_source(name):
    """Local folder or hub id that the model loads from."""
    model = MODELS[name]
    return built_model_dir(name) if model["builder"] else model["source"]


def model_input(wildcards):
    """A job depends on the model folder when it lives in this workflow (built by a rule, or
    trained and committed under resources/), so that rebuilding it regenerates; hub ids and
    folders outside the workflow are loaded as they are."""
    source = model_source(wildcards.model)
    return source if Path(source).parts[0] in ("results", "resources") else []


def shard_ids(model):
    return [f"{i:03d}" for i in range(MODELS[model]["n_shards"])]


def shard_files(pattern):
    """Input function: `pattern` formatted for every shard of the wildcards' model."""

    def files(wildcards):
        return [
            pattern.format(model=wildcards.model, concept=wildcards.concept, shard=shard)
            for shard in shard_ids(wildcards.model)
        ]

    return files


def gpu_resources(wildcards):
    return MODELS[wildcards.model]["resources"]["gpu"]


def mem_resources(wildcards):
    return MODELS[wildcards.model]["resources"]["mem_mb"]


def runtime_resources(wildcards):
    return MODELS[wildcards.model]["resources"]["runtime"]


def steer_shard_files(wildcards):
    """Steered sample tables of every shard of one variant."""
    return [
        f"results/{wildcards.model}/{wildcards.concept}/steer/{wildcards.variant}/shard-{shard}/samples.csv"
        for shard in shard_ids(wildcards.model)
    ]
