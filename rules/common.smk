# Helpers shared by the rules: config lookups by wildcard. No rules here.
#
# What reruns a job (Snakemake's rerun triggers, docs/workflow.md): its inputs (every local
# file it reads: model files, checkpoints, reference images), its params (only the config it
# uses, never resources), its script and, through the `code` param, the icm library code
# its job function runs (icm.io.fingerprints).
import functools
import re
from pathlib import Path

import yaml

from icm.checks import config_problems, run_problems
from icm.costs.plan import Job, Work
from icm.costs.rates import job_minutes, rates_with
from icm.models.families import family_named
from icm.head_maps.study import has_study
from icm.probing.pairs import concept_pairs as pairs_of
from icm.io.fingerprints import clean_fid_stats_file, code_fingerprint, local_files

MODELS = config["models"]
CONCEPTS = config["concepts"]


def job_code(function):
    """Param: fingerprint of the icm code job function `function` runs, so that editing that
    code (and no other) reruns the rule's jobs."""
    return code_fingerprint(function)


def model_params(wildcards):
    """The model's settings a job reads: everything but `resources`, which are the
    scheduler's business (raising a time limit must not regenerate anything), and
    `finetuning`, which only `finetune_lora` reads (`finetune_settings`): training longer
    must not regenerate the images it trains on. Every (model, concept) job reads it, so
    the pair is checked here, once, while Snakemake plans (before any job runs)."""
    if "concept" in wildcards.keys():
        check_run(wildcards.model, wildcards.concept)
    return {k: v for k, v in MODELS[wildcards.model].items()
            if k not in ("resources", "finetuning")}


wildcard_constraints:
    model="|".join(map(re.escape, MODELS)) or "NO_MODELS",
    concept="|".join(map(re.escape, CONCEPTS)) or "NO_CONCEPTS",
    shard=r"\d{3}",
    pair=r"[^/]+",  # class names joined by '-': one path level


def built_model_dir(name):
    """Where the workflow builds a model that has a `builder` (no weights to download)."""
    return f"results/models/{name}"


def model_source(name):
    """Local folder or hub id that the model loads from."""
    model = MODELS[name]
    return built_model_dir(name) if model["builder"] else model["source"]


def model_input(wildcards):
    """A model built by a rule is its output folder; a local model folder (committed under
    resources/ or the user's own) is every file in it, weights and configs, so replacing one
    reruns what used it. A hub id is a param, loaded from the cache as it is."""
    if MODELS[wildcards.model]["builder"]:
        return built_model_dir(wildcards.model)
    source = model_source(wildcards.model)
    files = local_files(source)
    if not files and Path(source).parts[0] == "resources":
        return source  # missing: Snakemake names the path before any job runs
    return files


def labeler_files(spec):
    """Local checkpoint files a labeler config names (FairFace weights and its face
    detector's model, a CLIP file)."""
    if not spec:
        return []
    return (local_files(spec.get("weights")) + local_files(spec.get("pretrained"))
            + local_files((spec.get("face") or {}).get("model")))


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


def partition(gpus):
    """The SLURM partition of a job with `gpus` GPUs (`cluster` in config.yaml)."""
    return config["cluster"]["gpu_partition" if gpus else "cpu_partition"]


def model_partition(wildcards):
    return partition(gpu_resources(wildcards))


def model_threads(wildcards):
    return MODELS[wildcards.model]["resources"]["threads"]


def mem_resources(wildcards):
    return MODELS[wildcards.model]["resources"]["mem_mb"]


def runtime_resources(wildcards):
    return MODELS[wildcards.model]["resources"]["runtime"]


WORK = Work(config, stores=False)  # each job's work, as the cost plan counts it (icm.costs)
RATES = rates_with(yaml.safe_load(Path(config["cluster"]["rates"]).read_text())
                   if config["cluster"]["rates"] else None)


def planned_runtime(rule):
    """Resource `runtime` of `rule`'s jobs: the job's planned work at the measured rates
    times `cluster.runtime_margin`, plus start-up (icm.costs.rates.job_minutes), never under
    the model's `resources.runtime`, doubled on each retry: a retry after a time limit gets
    more time, not the same."""

    def runtime(wildcards, attempt):
        row = WORK.of(Job(rule, dict(wildcards.items())))
        minutes = job_minutes(row, wildcards.model, model_threads(wildcards), RATES,
                              config["cluster"]["runtime_margin"])
        return max(minutes or 0, runtime_resources(wildcards)) * attempt

    return runtime



def concept_pairs(concept):
    """[negative, positive] class pairs of a concept (default: first class vs each other)."""
    return pairs_of(CONCEPTS[concept])


def check_config():
    """Refuse, before any job, what the schema cannot see (icm.checks): concept keys naming
    classes or variants that do not exist, and configured local paths that are missing."""
    problems = config_problems(config, ".")  # relative paths: from where Snakemake runs
    if problems:
        raise ValueError("config.yaml:\n  " + "\n  ".join(problems))


check_config()


@functools.cache
def check_run(model, concept):
    """Refuse a (model, concept) pair whose counts disagree or whose prompts the model's text
    encoder would cut (icm.checks.run_problems), naming each key. Once, in the Snakemake
    that plans the run: a cluster job's own Snakemake (SLURM) skips it, as its pair was
    checked before the job was submitted."""
    if not workflow.is_main_process:
        return
    local = model_source(model)
    problems = run_problems(config, model, concept, local if Path(local).is_dir() else None)
    if problems:
        raise ValueError(f"config.yaml, {model} x {concept}:\n  " + "\n  ".join(problems))


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
    """Neural labelers use the model's GPU allotment; pixel statistics (the toy oracle, the
    pixel labeler) need none."""
    if CONCEPTS[wildcards.concept]["labeler"]["type"] in ("oracle", "pixel"):
        return 0
    return gpu_resources(wildcards)


def labeler_partition(wildcards):
    return partition(labeler_gpu(wildcards))


def metrics_gpu(wildcards):
    """Metrics run the labeler and, outside the toy world, CLIP: a GPU job unless both are
    pixel statistics and toy features."""
    return labeler_gpu(wildcards) if is_toy(wildcards) else gpu_resources(wildcards)


# -- steering and evaluation (stages 4-5) ----------------------------------------------

VARIANTS = config["steering"]["variants"]
#: Variants by method: steering variants generate through steer_images, LoRA variants
#: (`method: lora`) through finetune_lora and generate_finetuned_images.
LORA_VARIANTS = [v for v, spec in VARIANTS.items() if spec.get("method") == "lora"]
STEER_VARIANTS = [v for v in VARIANTS if v not in LORA_VARIANTS]


def variant_pattern(names):
    """A `{variant}` wildcard constraint matching exactly ``names``."""
    return "|".join(map(re.escape, names)) or "NO_VARIANTS"


def variant_spec(wildcards):
    """The resolved variant, holding only what its selection uses: this concept's alpha for
    it (editing another variant's alpha reruns nothing here), `k` where a number of sites is
    chosen, `sites_per` where sites are selected. The original (`none`) steers nothing."""
    variant = VARIANTS[wildcards.variant]
    alphas = CONCEPTS[wildcards.concept]["steering"]["alpha"]
    spec = {"sites": variant["sites"], "seed": config["steering"]["seed"]}  # seed: targets
    if variant.get("method") == "lora":  # no alpha, no directions: the adapter's sites
        return {**spec, "method": "lora"} | (
            {"k": steering_k(wildcards.concept)} if counts_sites(variant["sites"]) else {})
    if variant["sites"] == "none":
        return {**spec, "alpha": 0.0}
    if variant["sites"] == "explicit":  # the concept's hand-picked sites for this model
        return {**spec, "explicit": explicit_sites(wildcards), "alpha_unit": "absolute"} | (
            {"directions": variant["directions"]}
            if variant.get("directions", "general") != "general" else {})
    alpha = alphas.get(wildcards.variant, variant["alpha"])
    spec["alpha"] = alpha if alpha == "auto" else float(alpha)
    spec["alpha_unit"] = config["steering"]["alpha_unit"]
    if variant.get("direction_steps"):  # only where set: per-step variants keep their params
        spec["direction_steps"] = variant["direction_steps"]
    if variant.get("directions", "general") != "general":  # likewise
        spec["directions"] = variant["directions"]
    if variant["sites"] != "all":
        spec["sites_per"] = config["steering"]["sites_per"]
    if counts_sites(variant["sites"]):
        spec["k"] = steering_k(wildcards.concept)
    return spec


def counts_sites(selection):
    """Whether a selection picks `k` sites: not `all` or `all-self`, nor `h-space` (the one
    bottleneck)."""
    return selection not in ("all", "all-self", "h-space")


def steering_k(concept):
    """How many sites `top`, `random`, `worst` and `cross` steer for a concept: its own
    `steering.k` (SDXL's president: 20 of 70), else `steering.k`."""
    return CONCEPTS[concept]["steering"].get("k") or config["steering"]["k"]


def explicit_sites(wildcards):
    """`concepts.<c>.steering.explicit.<model>`: the hand-picked sites and signed strengths
    per target (the paper's Table 6) a `sites: explicit` variant steers with."""
    chosen = CONCEPTS[wildcards.concept]["steering"]["explicit"].get(wildcards.model)
    if chosen is None:
        raise ValueError(f"variant {wildcards.variant}: concepts.{wildcards.concept}.steering."
                         f"explicit has no entry for model {wildcards.model}")
    return chosen


def alpha_is_auto(concept, variant):
    """Whether a steering variant's alpha, for this concept, is chosen by calibration."""
    alphas = CONCEPTS[concept]["steering"]["alpha"]
    spec = VARIANTS[variant]
    return (spec["sites"] not in ("none", "explicit") and spec.get("method") != "lora"
            and alphas.get(variant, spec["alpha"]) == "auto")


def target_classes(wildcards):
    """The classes a concept tabulates one-target steering for (`steering.targets`, null:
    every class); each must be a class of the concept."""
    spec = CONCEPTS[wildcards.concept]
    chosen = spec["steering"].get("targets") or spec["classes"]
    unknown = [t for t in chosen if t not in spec["classes"]]
    if unknown:
        raise ValueError(f"concepts.{wildcards.concept}.steering.targets: {unknown} are not "
                         f"classes of the concept {spec['classes']}")
    return list(chosen)


def run_variants(wildcards):
    """The steering variants of a (model, concept): the concept's `steering.variants` (null:
    all but the opt-in ones; the original always), less those whose layer selection the model's family lacks (FLUX has no
    cross-attention, so no `cross` variant; SANA and FLUX no `h-space` bottleneck), for a
    concept without `specific_prompts` those steering with directions from specific prompts
    or finetuned on their images, and `explicit` variants where the concept names no sites
    for the model."""
    chosen = (CONCEPTS[wildcards.concept]["steering"].get("variants")
              or [v for v, spec in VARIANTS.items() if not spec.get("opt_in")])
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise ValueError(f"concepts.{wildcards.concept}.steering.variants: {unknown} are not "
                         f"steering.variants {list(VARIANTS)}")
    if ORIGINAL and ORIGINAL not in chosen:
        chosen = [ORIGINAL, *chosen]  # CLIP-I and the target tables compare with it
    family = family_named(MODELS[wildcards.model]["family"])
    specific = bool(CONCEPTS[wildcards.concept].get("specific_prompts"))

    def needs_specific(spec):
        return spec.get("directions", "general") != "general" or spec.get("method") == "lora"

    explicit = CONCEPTS[wildcards.concept]["steering"]["explicit"]
    return [v for v in chosen if family.selects(VARIANTS[v]["sites"])
            and (specific or not needs_specific(VARIANTS[v]))
            and (VARIANTS[v]["sites"] != "explicit" or wildcards.model in explicit)]


def target_variants(wildcards):
    """The run's variants that push batches toward a target (the one-target tables): not
    the LoRA variants, whose adapter shifts every image alike."""
    return [v for v in run_variants(wildcards) if v not in LORA_VARIANTS]


def finetune_settings(wildcards):
    """`finetuning` with the concept's own keys over it (appendix C: rank 64 for age and
    race), and the model's over both."""
    return (config["finetuning"] | CONCEPTS[wildcards.concept].get("finetuning", {})
            | MODELS[wildcards.model].get("finetuning", {}))


def variant_files(pattern):
    """Input function: `pattern` once per variant the (model, concept) runs."""
    return expand_over(pattern, "variant", run_variants)


def target_variant_files(pattern):
    """Input function: `pattern` once per variant of the one-target tables."""
    return expand_over(pattern, "variant", target_variants)


def calibrated_variants(wildcards):
    """The run's variants whose alpha is `auto` for the wildcards' concept."""
    return [v for v in run_variants(wildcards) if alpha_is_auto(wildcards.concept, v)]


#: Where each `directions` source's probes are, under results/{model}/{concept}.
PROBE_DIRS = {"general": "probes", "specific": "specific/probes"}


def steer_inputs(wildcards):
    """What a variant reads of the probes: nothing for the original; the directions, their
    step axis and the ranking (per pair unless `steering.sites_per: concept`) otherwise."""
    if VARIANTS[wildcards.variant]["sites"] == "none":
        return {}
    base = f"results/{wildcards.model}/{wildcards.concept}"
    names = pair_names(wildcards.concept)
    # `directions: specific`: the probes of the class-specific prompts' generations; the
    # sites and the start still come from the general prompts' ranking.
    probes = f"{base}/{PROBE_DIRS[VARIANTS[wildcards.variant].get('directions', 'general')]}"
    inputs = {
        "directions": [f"{probes}/{p}/directions.safetensors" for p in names],
        "directions_meta": [f"{probes}/{p}/directions.json" for p in names],
    }
    if VARIANTS[wildcards.variant]["sites"] == "explicit":  # its own sites and start
        return inputs
    inputs["start"] = f"{base}/ranking.json"  # the steering start the ranking chose
    if alpha_is_auto(wildcards.concept, wildcards.variant):
        inputs["alphas"] = f"{base}/calibration/{wildcards.variant}.alpha.json"
    selects = VARIANTS[wildcards.variant]["sites"] != "all"
    if selects and config["steering"]["sites_per"] == "pair":
        inputs["pair_ranking"] = f"{base}/ranking_by_pair.csv"
    else:
        inputs["ranking"] = f"{base}/ranking.csv"
    return inputs


def steer_concept(wildcards):
    """What steering reads of the concept (not the alpha table, see variant_spec)."""
    spec = CONCEPTS[wildcards.concept]
    return {
        "prompts": spec["prompts"],
        "classes": spec["classes"],
        "pairs": [list(p) for p in concept_pairs(wildcards.concept)],
        "steering": {k: v for k, v in spec["steering"].items()  # none changes an image,
                     if k not in ("alpha", "targets", "variants", "k", "explicit")},  # or in
        # the variant's own spec (variant_spec: k, the explicit sites)
        "evaluation_prompts": spec["evaluation"]["prompts"],
    }


def injection_concept(wildcards):
    """What injection reads of the concept: its prompts, classes, `injection` block and the
    specific prompts it falls back on."""
    spec = CONCEPTS[wildcards.concept]
    return {k: spec[k] for k in ("prompts", "classes", "specific_prompts", "injection")}


ORIGINAL = next((name for name, v in VARIANTS.items() if v["sites"] == "none"), None)


def is_toy(wildcards):
    return MODELS[wildcards.model]["family"] == "toy"


def fid_source(wildcards):
    """The FID reference a concept names: a folder of images (the rendered toy world's for
    `toy-world`), a statistics file or custom-statistics name, or nothing."""
    reference = CONCEPTS[wildcards.concept]["evaluation"]["fid_reference"]
    if reference == "toy-world":
        return f"results/{wildcards.model}/{wildcards.concept}/reference/images"
    if reference and reference.startswith("stats:"):
        return reference.removeprefix("stats:")
    return reference


def fid_from_images(wildcards):
    """Whether the FID reference is images (featurized once, compute_fid_statistics)."""
    source = fid_source(wildcards)
    stats = CONCEPTS[wildcards.concept]["evaluation"]["fid_reference"] or ""
    return bool(source) and not stats.startswith("stats:") and not source.endswith(".npz")


def fid_images(wildcards):
    """Input: the reference images, a rule's folder (the toy world's) or a local folder's
    files, so that replacing one recomputes the statistics."""
    source = fid_source(wildcards)
    if CONCEPTS[wildcards.concept]["evaluation"]["fid_reference"] == "toy-world":
        return source
    return local_files(source) or source


def toy_feature_inputs(wildcards):
    """The toy feature net and its sidecar (its architecture, read on load), for the toy's
    scoring jobs; nothing elsewhere."""
    if not is_toy(wildcards):
        return {}
    weights = config["toy"]["features"]["path"]
    return {"toy_features": weights,
            "toy_features_sidecar": str(Path(weights).with_suffix(".json"))}


def fid_statistics_inputs(wildcards):
    """The reference images and, on the toy, the feature net that featurizes them."""
    return {"reference": fid_images(wildcards), **toy_feature_inputs(wildcards)}


def fid_reference(wildcards):
    """What every FID of the (model, concept) compares against: the reference images'
    statistics, computed once, or the statistics the concept names; None without one."""
    if fid_from_images(wildcards):
        return f"results/{wildcards.model}/{wildcards.concept}/reference/fid_statistics.npz"
    return fid_source(wildcards)


def steer_files(name, variant="{variant}"):
    """Input function: `name` in every shard folder of a steering variant (default: the
    job's own `{variant}`)."""
    return shard_files(f"results/{{model}}/{{concept}}/steer/{variant}/shard-{{shard}}/{name}")


def metric_inputs(wildcards):
    """Images and tables of the variant (and the original's embeddings, for CLIP-I), and
    every local file the metrics read (`scoring_inputs`)."""
    inputs = {
        "steered": steer_files("samples.csv")(wildcards),
        "images": steer_files("images")(wildcards),
    }
    if ORIGINAL and wildcards.variant != ORIGINAL:  # embedded once, by its own metrics job
        inputs["original_embeddings"] = (f"results/{wildcards.model}/{wildcards.concept}/"
                                         f"metrics/{ORIGINAL}.embeddings.safetensors")
    return {**inputs, **scoring_inputs(wildcards)}


def scoring_inputs(wildcards, fid=True):
    """Every local file that scoring images reads: labeler and CLIP checkpoints, the FID
    reference (unless `fid` is off), the toy feature net and its sidecar."""
    concept = CONCEPTS[wildcards.concept]
    inputs = {"checkpoints": labeler_files(concept["evaluation"]["labeler"]
                                           or concept["labeler"])}
    reference = concept["evaluation"]["fid_reference"] if fid else None
    if reference and fid_from_images(wildcards):
        inputs["reference"] = fid_reference(wildcards)  # made by compute_fid_statistics
    elif reference and reference.startswith("stats:"):
        stats = clean_fid_stats_file(fid_reference(wildcards))
        inputs["reference"] = local_files(stats)
    elif reference:
        inputs["reference"] = local_files(reference) or reference
    inputs.update(toy_feature_inputs(wildcards))
    if not is_toy(wildcards):
        inputs["checkpoints"] += local_files(metric_settings(wildcards)["clip_pretrained"])
    return inputs


def metric_settings(wildcards):
    """The evaluation settings a metrics job uses (not the grid's layout): the CLIP of
    CLIP-I and CLIP-T is the concept's `evaluation.clip` where it names one."""
    keys = ("clip_model", "clip_pretrained", "clip_checkpoint_tag", "device")
    settings = {key: config["evaluation"][key] for key in keys}
    clip = CONCEPTS[wildcards.concept]["evaluation"].get("clip")
    if clip:
        settings.update(clip_model=clip["model"], clip_pretrained=clip["pretrained"],
                        clip_checkpoint_tag=clip.get("checkpoint_tag"))
    return settings


# The head-map study (rules/head_maps.smk): its paths, and what each of its jobs reads of
# `concepts.<c>.head_maps` (and therefore what reruns it).
HEAD_MAPS = "results/{model}/{concept}/head-maps"
STUDY_KEYS = ("prompts", "template", "slots", "held_out", "window", "store_dtype")
TRAIN_KEYS = (*STUDY_KEYS, "train_samples_per_prompt", "hrv_words")
HRV_VOTE_KEYS = (*STUDY_KEYS, "hrv_words", "hrv_prompts", "hrv_samples_per_prompt")
RELEVANCE_KEYS = (*TRAIN_KEYS, "masks", "relevance", "oracle_tau", "stability_groups",
                  "exclude", "sites", "map_size", "hrv_vectors")
EVALUATION_KEYS = (*RELEVANCE_KEYS, "held_out_samples_per_prompt", "ks", "taus", "seed",
                   "curve_points")


def study(*keys, masks_if_oracle=False):
    """Param function: the study keys a job uses (``masks_if_oracle``: the masks only where
    the oracle is a relevance source, the only relevance that reads them)."""

    def params(wildcards):
        spec = CONCEPTS[wildcards.concept]["head_maps"]
        if not has_study(spec):
            raise ValueError(f"concepts.{wildcards.concept}.head_maps names no prompts: "
                             "no head-map study to run")
        chosen = {key: spec[key] for key in keys}
        if masks_if_oracle and "oracle" not in spec["relevance"]:
            chosen.pop("masks")
        return chosen

    return params


def split_files(split, name):
    """Input function: `name` in every shard folder of a split."""
    return shard_files(f"{HEAD_MAPS}/{split}/shard-{{shard}}/{name}")


def hrv_vote_files(wildcards):
    """HRV's votes: on the generic prompts' images where the study gives them
    (`hrv_prompts`, rule count_head_votes), else the train split's."""
    if CONCEPTS[wildcards.concept]["head_maps"]["hrv_prompts"]:
        return shard_files(f"{HEAD_MAPS}/hrv-votes/shard-{{shard}}/votes.safetensors")(wildcards)
    return split_files("train", "votes.safetensors")(wildcards)


def mask_files(wildcards):
    """A mask folder's files are inputs: a redrawn mask reruns what read it."""
    masks = CONCEPTS[wildcards.concept]["head_maps"]["masks"]
    return local_files(masks["path"]) if masks["type"] == "folder" else []


def oracle_mask_files(wildcards):
    """The mask files relevance reads: only the oracle source reads masks."""
    oracle = "oracle" in CONCEPTS[wildcards.concept]["head_maps"]["relevance"]
    return mask_files(wildcards) if oracle else []
