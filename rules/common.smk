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


def concept_params(*keys):
    """Param function: only the concept settings a rule reads. Snakemake reruns a job when
    its params change, so passing the whole concept would rerun generation when, say, one
    steering variant's alpha is edited."""

    def params(wildcards):
        spec = CONCEPTS[wildcards.concept]
        return {key: spec[key] for key in keys}

    return params


def shard_ids(model):
    return [f"{i:03d}" for i in range(MODELS[model]["n_shards"])]


def expand_over(pattern, key, values):
    """Input function: `pattern` with the job's wildcards filled in, once per value of `key`
    (e.g. every shard of the model, every class pair of the concept)."""

    def files(wildcards):
        known = dict(wildcards.items())
        return [pattern.format(**known, **{key: value}) for value in values(wildcards)]

    return files


def shard_files(pattern):
    """`pattern` for every shard of the wildcards' model."""
    return expand_over(pattern, "shard", lambda wildcards: shard_ids(wildcards.model))


def gpu_resources(wildcards):
    return MODELS[wildcards.model]["resources"]["gpu"]


def mem_resources(wildcards):
    return MODELS[wildcards.model]["resources"]["mem_mb"]


def runtime_resources(wildcards):
    return MODELS[wildcards.model]["resources"]["runtime"]



def concept_pairs(concept):
    """[negative, positive] class pairs of a concept (default: first class vs each other)."""
    spec = CONCEPTS[concept]
    if spec.get("pairs"):
        return [tuple(p) for p in spec["pairs"]]
    return [(spec["classes"][0], other) for other in spec["classes"][1:]]


def pair_names(concept):
    return [f"{negative}-{positive}" for negative, positive in concept_pairs(concept)]


def pair_of(wildcards):
    """The (negative, positive) pair a `{pair}` wildcard names."""
    pairs = dict(zip(pair_names(wildcards.concept), concept_pairs(wildcards.concept)))
    if wildcards.pair not in pairs:
        raise ValueError(f"concept {wildcards.concept} has no pair {wildcards.pair}; "
                         f"its pairs are {list(pairs)}")
    return pairs[wildcards.pair]


def pair_files(pattern):
    """`pattern` for every class pair of the wildcards' concept."""
    return expand_over(pattern, "pair", lambda wildcards: pair_names(wildcards.concept))


def labeler_gpu(wildcards):
    """Neural labelers use the model's GPU allotment; the toy oracle needs none."""
    if CONCEPTS[wildcards.concept]["labeler"]["type"] == "oracle":
        return 0
    return gpu_resources(wildcards)


# -- steering and evaluation (stages 4-5) ----------------------------------------------

VARIANTS = config["steering"]["variants"]


def variant_spec(wildcards):
    """The resolved variant: its site selection and this concept's alpha for it. Only this
    variant's alpha is in its params, so editing another variant's alpha reruns nothing here."""
    variant = VARIANTS[wildcards.variant]
    alphas = CONCEPTS[wildcards.concept]["steering"]["alpha"]
    return {
        "sites": variant["sites"],
        "alpha": float(alphas.get(wildcards.variant, variant["alpha"])),
        "k": config["steering"]["k"],
        "seed": config["steering"]["seed"],
        "sites_per": config["steering"]["sites_per"],
    }


def steer_rankings(wildcards):
    """The concept ranking, and the per-pair one when each pair selects its own sites."""
    base = f"results/{wildcards.model}/{wildcards.concept}"
    inputs = {"ranking": f"{base}/ranking.csv"}
    if config["steering"]["sites_per"] == "pair":
        inputs["pair_ranking"] = f"{base}/ranking_by_pair.csv"
    return inputs


def steer_concept(wildcards):
    """What steering reads of the concept (not the alpha table, see variant_spec)."""
    spec = CONCEPTS[wildcards.concept]
    return {
        "prompts": spec["prompts"],
        "classes": spec["classes"],
        "pairs": [list(p) for p in concept_pairs(wildcards.concept)],
        "steering": {k: v for k, v in spec["steering"].items() if k != "alpha"},
        "evaluation_prompts": spec["evaluation"]["prompts"],
    }


ORIGINAL = next((name for name, v in VARIANTS.items() if v["sites"] == "none"), None)


def is_toy(wildcards):
    return MODELS[wildcards.model]["family"] == "toy"


def fid_reference(wildcards):
    """What clean-fid compares against: a folder, a custom-statistics name, or nothing."""
    reference = CONCEPTS[wildcards.concept]["evaluation"]["fid_reference"]
    if reference == "toy-world":
        return f"results/{wildcards.model}/{wildcards.concept}/reference/images"
    if reference and reference.startswith("stats:"):
        return reference.removeprefix("stats:")
    return reference


def steer_files(name, variant="{variant}"):
    """Input function: `name` in every shard folder of a steering variant (default: the
    job's own `{variant}`)."""
    return shard_files(f"results/{{model}}/{{concept}}/steer/{variant}/shard-{{shard}}/{name}")


def metric_inputs(wildcards):
    inputs = {
        "steered": steer_files("samples.csv")(wildcards),
        "images": steer_files("images")(wildcards),
    }
    if ORIGINAL and wildcards.variant != ORIGINAL:
        inputs["original"] = steer_files("samples.csv", ORIGINAL)(wildcards)
    reference = CONCEPTS[wildcards.concept]["evaluation"]["fid_reference"]
    if reference and not reference.startswith("stats:"):
        inputs["reference"] = fid_reference(wildcards)
    if is_toy(wildcards):
        inputs["toy_features"] = config["toy"]["features"]["path"]
    return inputs
