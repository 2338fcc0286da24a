"""Checks of a validated config that JSON schema cannot express, run when the workflow
starts (``rules/common.smk``), before any job: cross-key references and local paths.

Each problem is one line naming the config key; the Snakefile raises them all at once. This
module imports neither torch nor the icm library's heavy parts: Snakemake reads it on every
start.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from icm.head_maps.study import (
    has_study,
    hrv_concepts,
    hrv_refusal,
    slot_names,
    split_prompts,
)
from icm.probing.pairs import ONE_VS_REST, REST, concept_pairs

#: The calibration's unsteered images, shared by every variant's sweep (rules/calibration.smk).
UNSTEERED = "unsteered"

#: A hub id: owner/name (the loading code also accepts it when no folder of that name exists).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
#: Suffixes of checkpoint files: a `pretrained` value ending so is a path, not a tag.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


#: The attributes the toy world plants, so that `fid_reference: toy-world` can reweight them.
TOY_PLANTED = ("color", "shape")


def unplanted_reference_ok(reference: Mapping[str, float] | None) -> bool:
    """Whether the toy world as configured serves as the reference of an attribute it does
    not plant (its shapes sit anywhere alike): only for a uniform reference."""
    return reference is None or len({round(float(v), 9) for v in reference.values()}) == 1


def toy_reference_problem(attribute: str) -> str:
    return (f"fid_reference toy-world reweights {' or '.join(TOY_PLANTED)}; {attribute!r} is "
            "not planted by the world, whose own images serve as a uniform reference only: "
            "set `reference` to null (uniform) or `evaluation.fid_reference` to a folder")


def concept_problems(concepts: Mapping[str, Any], variants: Mapping[str, Any]) -> list[str]:
    """Concept settings that name things that do not exist: classes of pairs, targets,
    reference and target distributions, steering variants and per-variant alphas."""
    problems = []
    if UNSTEERED in variants:
        problems.append(f"steering.variants.{UNSTEERED}: the name of every calibration's "
                        "alpha-0 images (calibration/unsteered.csv); name the variant otherwise")
    for name, spec in concepts.items():
        key = f"concepts.{name}"
        classes = list(spec.get("classes") or [])
        study = spec.get("head_maps") or {}
        if not spec.get("prompts") and not (study.get("template") or study.get("prompts")):
            problems.append(f"{key}: neither prompts nor a head_maps study: nothing to run")
        problems += head_map_problems(key, spec.get("head_maps"))
        doubled = sorted({c for c in classes if classes.count(c) > 1})
        if doubled:
            problems.append(f"{key}.classes: {doubled} appear more than once")
        if len(set(classes)) == 1:
            problems.append(f"{key}.classes: {classes} is one class; a choice needs two or more")
        named: dict[str, list[str]] = {}
        if REST in classes:
            problems.append(f"{key}.classes: {REST!r} names the other classes of one-vs-rest "
                            "probes; rename that class")
        listed = spec.get("pairs")
        if isinstance(listed, str) and listed != ONE_VS_REST:
            problems.append(f"{key}.pairs: {listed!r}: give a list of pairs or "
                            f"{ONE_VS_REST!r}")
        for pair in concept_pairs(spec) if listed == ONE_VS_REST else listed or []:
            other = named.setdefault("-".join(pair), list(pair))
            if other != list(pair):
                problems.append(f"{key}.pairs: {other} and {list(pair)} are both named "
                                f"{'-'.join(pair)!r}; rename the classes so that '-' is not "
                                "ambiguous (pair names are paths and wildcards)")
            unknown = [c for c in pair if c not in classes and c != REST]
            if unknown:
                problems.append(f"{key}.pairs: {list(pair)} names {unknown}, which are not "
                                f"classes {classes}")
            elif pair[0] == pair[1]:
                problems.append(f"{key}.pairs: {list(pair)} pairs a class with itself")
        steering = spec.get("steering") or {}
        specific = spec.get("specific_prompts") or {}
        evaluation = spec.get("evaluation") or {}
        attribute = (evaluation.get("labeler") or spec.get("labeler") or {}).get("attribute")
        if (evaluation.get("fid_reference") == "toy-world" and attribute
                and attribute not in TOY_PLANTED
                and not unplanted_reference_ok(spec.get("reference"))):
            problems.append(f"{key}.reference: {toy_reference_problem(attribute)}")
        seen: dict[str, str] = {}
        for name_, prompts in specific.items():
            for prompt in prompts:
                if seen.setdefault(prompt, name_) != name_:
                    problems.append(f"{key}.specific_prompts: {prompt!r} is listed under both "
                                    f"{seen[prompt]} and {name_}")
        labelers = (("labeler", spec.get("labeler")), ("evaluation.labeler",
                                                        evaluation.get("labeler")))
        for sub, values in (("reference", spec.get("reference")),
                            ("specific_prompts", specific),
                            *((f"{name_}.prompts", (labeler or {}).get("prompts"))
                              for name_, labeler in labelers),
                            ("injection.injected", (spec.get("injection") or {}).get("injected")),
                            ("steering.target_probs", steering.get("target_probs")),
                            ("steering.targets", steering.get("targets"))):
            unknown = sorted(set(values or []) - set(classes))
            if unknown:
                problems.append(f"{key}.{sub}: {unknown} are not classes {classes}")
        for sub, values in (("steering.variants", steering.get("variants")),
                            ("steering.alpha", steering.get("alpha"))):
            unknown = sorted(set(values or []) - set(variants))
            if unknown:
                problems.append(f"{key}.{sub}: {unknown} are not steering.variants "
                                f"{list(variants)}")
        # Listed by the concept: it must have the prompts (unlisted, run_variants skips it).
        needs = [v for v in steering.get("variants") or []
                 if (variants.get(v) or {}).get("directions") == "specific"]
        missing = sorted({c for pair in concept_pairs(spec) for c in pair}
                         - set(specific) - {REST})
        if needs and missing:
            problems.append(f"{key}.steering.variants: {needs} steer with directions from "
                            f"specific prompts, but specific_prompts has none for {missing}")
    return problems


def head_map_problems(key: str, study: Mapping[str, Any] | None) -> list[str]:
    """A head-map study's prompts, split, HRV word lists and mask source."""
    try:
        if not has_study(study):
            return []
        split_prompts(study)
    except ValueError as error:
        return [f"{key}.head_maps: {error}"]
    problems = []
    if "hrv" in study.get("relevance", []) and \
            not set(slot_names(study)) <= set(hrv_concepts(study)):
        problems.append(f"{key}.head_maps.hrv_words: concepts {sorted(hrv_concepts(study))} "
                        f"must include the slots {slot_names(study)} (each slot's heads are "
                        "ranked by its concept's votes; other concepts are distractors)")
    if "hrv-published" in study.get("relevance", []):
        spec = study.get("hrv_vectors") or {}
        if not (spec.get("vectors") and spec.get("head_index") and spec.get("concepts")):
            problems.append(f"{key}.head_maps.hrv_vectors: the hrv-published source needs "
                            "HRV's vector files")
        elif sorted(spec.get("slots") or {}) != sorted(slot_names(study)) or \
                not set(spec["slots"].values()) <= set(spec["concepts"]):
            problems.append(f"{key}.head_maps.hrv_vectors.slots: {spec['slots']} must map "
                            f"each slot {slot_names(study)} to one of its concepts")
    relevance = study.get("relevance", [])
    if "stability" in relevance and \
            study.get("train_samples_per_prompt", 16) < study.get("stability_groups", 4):
        problems.append(f"{key}.head_maps.stability_groups: {study.get('stability_groups')} "
                        "groups of repeats, but train_samples_per_prompt is "
                        f"{study.get('train_samples_per_prompt')}: some groups would be empty")
    odd = [k for k in study.get("ks") or [] if isinstance(k, float) and k > 1]
    if odd:
        problems.append(f"{key}.head_maps.ks: {odd} are neither counts (integers) nor "
                        "fractions of the heads (in (0, 1])")
    masks = study.get("masks") or {}
    if masks.get("type") == "folder" and not masks.get("path"):
        problems.append(f"{key}.head_maps.masks: type folder needs a path")
    return problems


def _paths(config: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(key, value, what it must be) for every configured value that names a local path."""
    for name, model in config.get("models", {}).items():
        if not model.get("builder") and model.get("source"):
            yield f"models.{name}.source", str(model["source"]), "model"
    for name, concept in config.get("concepts", {}).items():
        labelers = [("labeler", concept.get("labeler") or {})]
        evaluation = concept.get("evaluation") or {}
        if evaluation.get("labeler"):
            labelers.append(("evaluation.labeler", evaluation["labeler"]))
        for key, labeler in labelers:
            if labeler.get("weights"):
                yield f"concepts.{name}.{key}.weights", str(labeler["weights"]), "file"
            face = labeler.get("face") or {}
            if face.get("model"):  # dlib's is a folder of its two files, the others' a file
                from icm.labeling.faces import DLIB_FINDERS

                dlib = face.get("detector", "dlib") in DLIB_FINDERS
                kind = "dlib models" if dlib else "file"
                yield f"concepts.{name}.{key}.face.model", str(face["model"]), kind
            if labeler.get("pretrained") and labeler.get("type", "clip") == "clip":
                yield f"concepts.{name}.{key}.pretrained", str(labeler["pretrained"]), "weights"
        if (evaluation.get("clip") or {}).get("pretrained"):
            yield (f"concepts.{name}.evaluation.clip.pretrained",
                   str(evaluation["clip"]["pretrained"]), "weights")
        vectors = (concept.get("head_maps") or {}).get("hrv_vectors") or {}
        for part in ("vectors", "head_index"):
            if vectors.get(part):
                yield f"concepts.{name}.head_maps.hrv_vectors.{part}", str(vectors[part]), "file"
        masks = (concept.get("head_maps") or {}).get("masks") or {}
        if masks.get("type") == "folder" and masks.get("path"):
            yield f"concepts.{name}.head_maps.masks.path", str(masks["path"]), "folder"
        reference = evaluation.get("fid_reference")
        if reference and reference != "toy-world" and not reference.startswith("stats:"):
            yield (f"concepts.{name}.evaluation.fid_reference", str(reference),
                   "file" if reference.endswith(".npz") else "folder")  # .npz: statistics
    pretrained = (config.get("evaluation") or {}).get("clip_pretrained")
    if pretrained:
        yield "evaluation.clip_pretrained", str(pretrained), "weights"


def looks_like_path(value: str) -> bool:
    """Whether a `pretrained` value names a file rather than an open_clip tag."""
    return "/" in value or "\\" in value or value.startswith(("~", ".")) or \
        value.endswith(CHECKPOINT_SUFFIXES)


def path_problems(config: Mapping[str, Any], root: str | Path = ".") -> list[str]:
    """Configured local paths that do not exist (relative ones from ``root``, the workflow's
    directory): a model `source` must be a folder or have a hub id's owner/name shape, a
    FID reference a folder, a FairFace checkpoint a file, dlib's face models a folder holding
    both its files (YuNet's a file), and a CLIP `pretrained` that is not a tag a file."""
    problems = []
    for key, value, kind in _paths(config):
        path = Path(root, value).expanduser() if not Path(value).is_absolute() else Path(value)
        if kind == "model":
            if path.is_dir() or (HUB_ID.match(value) and not value.startswith(".")):
                continue
            problems.append(f"{key}: {value!r} is neither a folder nor a hub id (owner/name)")
        elif kind == "folder" and not path.is_dir():
            problems.append(f"{key}: no folder {value!r}")
        elif kind == "file" and not path.is_file():
            problems.append(f"{key}: no file {value!r}")
        elif kind == "dlib models":
            from icm.labeling.faces import missing_dlib_files

            missing = missing_dlib_files(path)
            if missing:
                problems.append(f"{key}: no folder {value!r} holding {', '.join(missing)}")
        elif kind == "weights" and looks_like_path(value) and not path.is_file():
            problems.append(f"{key}: no checkpoint file {value!r} (a tag such as openai, or a "
                            "local file)")
    return problems


def config_problems(config: Mapping[str, Any], root: str | Path = ".") -> list[str]:
    """Every problem of a schema-valid config that would otherwise surface late or never."""
    variants = (config.get("steering") or {}).get("variants") or {}
    return concept_problems(config.get("concepts") or {}, variants) + \
        explicit_problems(config.get("concepts") or {}, config.get("models") or {}) + \
        path_problems(config, root)


def explicit_problems(concepts: Mapping[str, Any], models: Mapping[str, Any]) -> list[str]:
    """`steering.explicit` (hand-picked sites per model): each entry names a configured
    model, and each target class a class with a direction and a strength signed toward it
    (``icm.steering.pushes.explicit_pushes``); whether the sites exist is the steering job's check,
    which sees the model's probes."""
    from icm.steering.pushes import explicit_pushes

    problems = []
    for name, spec in concepts.items():
        key = f"concepts.{name}.steering.explicit"
        classes, pairs = list(spec.get("classes") or []), concept_pairs(spec)
        for model, chosen in ((spec.get("steering") or {}).get("explicit") or {}).items():
            if model not in models:
                problems.append(f"{key}: {model!r} is not a model of `models` {list(models)}")
                continue
            try:
                explicit_pushes(classes, pairs, chosen.get("targets") or {})
            except ValueError as error:
                problems.append(f"{key}.{model}: {error}")
    return problems


def run_problems(config: Mapping[str, Any], model: str, concept: str,
                 model_dir: str | Path | None = None) -> list[str]:
    """Problems of running ``concept`` on ``model`` that only the pair shows: counts that must
    agree (each sample stream fills every shard; the localization can hold the probes'
    minimum per class) and prompts the model's text encoder would cut
    (``prompt_problems``; ``model_dir`` is the model's folder where it is local). Checked for
    the pairs a run asks for (``rules/common.smk``), before any job starts."""
    return count_problems(config, model, concept) + \
        prompt_problems(config, model, concept, model_dir) + \
        head_map_family_problems(config, model, concept)


def head_map_family_problems(config: Mapping[str, Any], model: str, concept: str) -> list[str]:
    """A head-map study on a model whose family has no word maps, or asks FLUX's joint
    attention for HRV's votes (``icm.head_maps.study.hrv_refusal``)."""
    from icm.models.families import family_named

    study = config["concepts"][concept].get("head_maps")
    if not has_study(study):
        return []
    family = family_named(config["models"][model]["family"])
    key = f"concepts.{concept}.head_maps"
    if family.map_kind is None:
        return [f"{key}: {model}'s family {family.name} has no attention read as word maps"]
    hrv = [r for r in study.get("relevance", []) if r.startswith("hrv")]
    refusal = hrv_refusal(family)
    if refusal and hrv:
        return [f"{key}.relevance: {hrv} on {model}: {refusal}"]
    return []


def sample_streams(config: Mapping[str, Any], model: str, concept: str
                   ) -> Iterator[tuple[str, list, int, str]]:
    """(stream, its samples, the batch size its jobs shard by, the keys that set its count)
    for every sample stream the concept has, as its jobs plan them."""
    from icm.costs.plan import Work
    from icm.generation.samples import concept_samples
    from icm.head_maps.study import hrv_samples, split_samples

    c, m, generation = config["concepts"][concept], config["models"][model], config["generation"]
    key = f"concepts.{concept}"
    per_prompt = (f"models.{model}.samples_per_prompt" if m.get("samples_per_prompt")
                  else f"{key}.samples_per_prompt")
    if c.get("prompts"):
        yield ("localization", concept_samples(c, m, generation), m["batch_size"],
               f"{key}.prompts x {per_prompt}")
        steering = c.get("steering") or {}
        yield ("evaluation", Work(config, stores=False).evaluation_samples(model, concept),
               steering.get("batch_size") or m["batch_size"],
               f"{key}.evaluation.prompts x {key}.steering.samples_per_prompt")
    if c.get("specific_prompts"):
        yield ("specific", concept_samples(c, m, generation, prompt_set="specific"),
               m["batch_size"], f"{key}.specific_prompts x {key}.specific_samples_per_prompt")
    if has_study(c.get("head_maps")):
        for split in ("train", "held-out"):
            yield (f"head-map {split}", split_samples(c["head_maps"], split,
                                                      generation["base_seed"]),
                   m["batch_size"], f"{key}.head_maps.{split.replace('-', '_')}_samples_per_prompt")
        if c["head_maps"].get("hrv_prompts"):
            yield ("HRV vote", hrv_samples(c["head_maps"], generation["base_seed"]),
                   m["batch_size"], f"{key}.head_maps.hrv_prompts x "
                   f"{key}.head_maps.hrv_samples_per_prompt")


def count_problems(config: Mapping[str, Any], model: str, concept: str) -> list[str]:
    """Counts that must agree: every shard of every stream gets a batch
    (``models.<m>.n_shards`` at most the stream's batches), and the localization holds at
    least ``probes.min_per_class`` images per class."""
    problems = []
    shards = int(config["models"][model]["n_shards"])
    c = config["concepts"][concept]
    for stream, samples, batch, keys in sample_streams(config, model, concept):
        batches = -(-len(samples) // batch)
        if batches < shards:
            problems.append(f"models.{model}.n_shards: {shards} shards, but {concept}'s "
                            f"{stream} images ({keys} = {len(samples)}) make {batches} "
                            f"batches of {batch}: lower n_shards or raise the count")
        if stream == "localization" and c.get("classes"):
            least = int(config["probes"]["min_per_class"]) * len(c["classes"])
            if len(samples) < least:
                problems.append(f"probes.min_per_class: {len(c['classes'])} classes need "
                                f"{least} labelled images, but {concept}'s localization "
                                f"generates {len(samples)} ({keys})")
    return problems


def concept_prompts(spec: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(key, prompt) for every prompt of a concept that the denoiser's text encoder reads."""
    from icm.head_maps.study import study_prompts

    for i, prompt in enumerate(spec.get("prompts") or []):
        yield f"prompts[{i}]", prompt
    for i, prompt in enumerate((spec.get("evaluation") or {}).get("prompts") or []):
        yield f"evaluation.prompts[{i}]", prompt
    for name, prompts in (spec.get("specific_prompts") or {}).items():
        for i, prompt in enumerate(prompts):
            yield f"specific_prompts.{name}[{i}]", prompt
    injection = spec.get("injection") or {}
    for i, prompt in enumerate(injection.get("prompts") or []):
        yield f"injection.prompts[{i}]", prompt
    for name, prompt in (injection.get("injected") or {}).items():
        yield f"injection.injected.{name}", prompt
    if has_study(spec.get("head_maps")):
        for i, item in enumerate(study_prompts(spec["head_maps"])):
            yield f"head_maps prompt {i}", item.prompt


def prompt_problems(config: Mapping[str, Any], model: str, concept: str,
                    model_dir: str | Path | None) -> list[str]:
    """Prompts longer than the model's text encoder reads (its tokenizer's length, or the
    pipeline's ``max_sequence_length`` where the family has one): the pipeline would cut
    them silently. Read from the model's own tokenizer where it is on disk (``model_dir``,
    or the hub cache), without torch; a model not yet on disk is not checked."""
    from icm.models.families import family_named

    spec = config["models"][model]
    family = family_named(spec["family"])
    folder = tokenizer_folder(spec, family.prompt_tokenizer, model_dir)
    if folder is None:
        return []
    prompts = list(concept_prompts(config["concepts"][concept]))
    counted = token_counts(str(folder), [prompt for _, prompt in prompts])
    if counted is None:
        return []
    limit, counts = counted
    if family.prompt_length is not None:
        argument, default = family.prompt_length
        limit = int((spec.get("pipeline_arguments") or {}).get(argument, default))
    problems = []
    for key, prompt in prompts:
        n = counts[prompt]
        if n > limit:
            problems.append(f"concepts.{concept}.{key}: {prompt!r} is {n} tokens, but "
                            f"{model}'s text encoder reads {limit}: the rest would be cut")
    return problems


def tokenizer_folder(spec: Mapping[str, Any], subfolder: str,
                     model_dir: str | Path | None) -> Path | None:
    """The folder of a model's tokenizer: in its local folder, else in the hub cache."""
    if model_dir is not None and Path(model_dir, subfolder).is_dir():
        return Path(model_dir, subfolder)
    source = str(spec.get("source") or "")
    if not source or spec.get("builder") or not HUB_ID.match(source):
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, f"{subfolder}/tokenizer_config.json")
    return Path(found).parent if isinstance(found, str) else None


def token_counts(folder: str, prompts: list[str]) -> tuple[int, dict[str, int]] | None:
    """(the tokenizer's ``model_max_length``, each prompt's token count), None where the
    folder's config names no tokenizer class. Counts are kept in the code cache
    (``icm.io.fingerprints.code_cache_dir``) under the sha256 of the tokenizer's files, so a
    Snakemake start loads no tokenizer (nor transformers, 1.6 s) for prompts counted before
    by the same tokenizer."""
    import hashlib
    import json

    from icm.io.fingerprints import code_cache_dir, write_cache_entry

    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    cache = code_cache_dir()
    entry = cache / f"tokens-{digest.hexdigest()}.json" if cache else None
    known = json.loads(entry.read_text()) if entry is not None and entry.is_file() else {}
    missing = [p for p in dict.fromkeys(prompts) if p not in known.get("counts", {})]
    if missing or "limit" not in known:
        tokenizer = _tokenizer(folder)
        if tokenizer is None:
            return None
        known = {"limit": int(tokenizer.model_max_length), "counts": {
            **known.get("counts", {}),
            **{p: len(tokenizer(p, verbose=False).input_ids) for p in missing}}}
        if entry is not None:
            write_cache_entry(entry, json.dumps(known))
    return known["limit"], {p: known["counts"][p] for p in prompts}


@functools.cache
def _tokenizer(folder: str) -> Any:
    """The tokenizer class its config names, from transformers' top level (which, unlike
    AutoTokenizer, imports no torch); None where the config names none."""
    import json

    import transformers

    name = json.loads(Path(folder, "tokenizer_config.json").read_text()).get("tokenizer_class")
    if not name or not hasattr(transformers, name):
        return None
    return getattr(transformers, name).from_pretrained(folder)
