"""Jobs of ICM finetuning (the paper's section 3.2, appendix C, Tables 1-2): train a LoRA on
a variant's sites from the class-specific prompts' images, then generate the evaluation
samples with it, where steering variants generate theirs, so metrics and tables take both."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from icm.jobs.records import write_json
from icm.tables import write_table

log = logging.getLogger("icm")


def training_set(concept: Mapping[str, Any], samples_csv: str | Path, labels_csv: str | Path,
                 seed: int) -> tuple[Any, dict[str, Any]]:
    """The finetuning images: specific-prompt images the labeler reads as their prompt's
    class (the others are counted and left out), each class subsampled so the classes mix
    as the concept's reference distribution (uniform by default), each image reported
    under the general prompt closest to its specific one (``general_prompt_for``)."""
    import numpy as np
    import pandas as pd

    from icm.debias import target_probabilities
    from icm.finetune import general_prompt_for

    samples = pd.read_csv(samples_csv, keep_default_na=False)
    labels = pd.read_csv(labels_csv, keep_default_na=False, dtype={"label": str})
    table = samples.merge(labels[["sample", "label", "prompt_class"]], on="sample",
                          validate="one_to_one")
    classes = list(concept["classes"])
    agree = table[table["label"] == table["prompt_class"]]
    probs = dict(zip(classes, target_probabilities(classes, concept.get("reference")),
                     strict=True))
    counts = agree["prompt_class"].value_counts().to_dict()
    wanted = [c for c in classes if probs[c] > 0]
    missing = [c for c in wanted if not counts.get(c)]
    if missing:
        raise ValueError(f"no specific-prompt image the labeler reads as {missing}: "
                         "nothing to finetune toward them")
    total = min(counts[c] / probs[c] for c in wanted)
    rng = np.random.default_rng(seed)
    parts = []
    for name in wanted:
        rows = agree[agree["prompt_class"] == name]
        take = int(np.floor(total * probs[name] + 1e-9))
        parts.append(rows.iloc[np.sort(rng.choice(len(rows), take, replace=False))])
    chosen = pd.concat(parts, ignore_index=True)
    general = list(concept["prompts"])
    pairing = {p: general_prompt_for(p, general) for p in dict.fromkeys(table["prompt"])}
    chosen["general_prompt"] = chosen["prompt"].map(pairing)
    summary = {"images": len(chosen), "per_class": {
                   k: int(v) for k, v in chosen["prompt_class"].value_counts().items()},
               "misread_left_out": int(len(table) - len(agree)),
               "prompt_pairing": pairing,
               "mix": "the concept's reference distribution (uniform when null)"}
    return chosen, summary


def lora_sites(concept: Mapping[str, Any], variant: Mapping[str, Any],
               ranking: str | Path | None, pair_ranking: str | Path | None) -> list[str]:
    """The sites a LoRA variant trains: the selection of the concept ranking, or with a
    per-pair ranking the union, in order, of each pair's selection (as steering chooses
    them: the paper's race LoRA trains the union of its black, indian and asian layers)."""
    import pandas as pd

    from icm.debias import sites_per_pair
    from icm.pairs import Pair

    names = [Pair(*p).name for p in concept["pairs"]]
    per_pair = sites_per_pair(pd.read_csv(ranking) if ranking else None,
                              pd.read_csv(pair_ranking) if pair_ranking else None,
                              names, variant["sites"], variant.get("k"), variant["seed"])
    return list(dict.fromkeys(s for pair in names for s in per_pair[pair]))


def finetune_lora_job(
    *, model_name: str, model: Mapping[str, Any], source: str, concept: Mapping[str, Any],
    variant_name: str, variant: Mapping[str, Any], finetuning: Mapping[str, Any],
    generation: Mapping[str, Any], ranking: str | Path | None, samples_csv: str | Path,
    labels_csv: str | Path, adapter_dir: str | Path, record: str | Path,
    losses_csv: str | Path, loss_plot: str | Path, pair_ranking: str | Path | None = None,
) -> None:
    """Train the variant's adapter: its sites (``lora_sites``), the training set of
    ``training_set``, the settings ``finetuning``. The model loads first; the adapter
    folder appears only complete."""
    import pandas as pd
    from PIL import Image
    from tqdm import tqdm

    from icm.atomic import atomic_directory
    from icm.families import family_of
    from icm.finetune import OBJECTIVES, TrainSettings, save_adapter, target_modules, train_lora
    from icm.generate import SamplerSettings
    from icm.models import ModelSpec, load_pipeline
    from icm.provenance import package_versions
    from icm.sites import denoiser_of

    settings = TrainSettings.of(finetuning)
    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    pipe = load_pipeline(spec, device=generation["device"])
    sites = lora_sites(concept, variant, ranking, pair_ranking)
    targets = target_modules(pipe, sites)  # a path the model lacks stops here, before work
    chosen, summary = training_set(concept, samples_csv, labels_csv, settings.seed)
    root = Path(samples_csv).parent
    images = [Image.open(root / path).convert("RGB") for path in chosen["image"]]
    log.info("%s: LoRA rank %d on %d sites (%d modules), %d images, %d steps", variant_name,
             settings.rank, len(sites), len(targets), len(images), settings.steps)
    call = SamplerSettings.of(spec).pipeline_kwargs()
    with tqdm(total=settings.steps, desc=f"finetune {variant_name}", unit="step",
              file=sys.stderr) as bar:
        weights, config, losses = train_lora(
            pipe, sites, images, list(chosen["general_prompt"]), settings, spec.resolution,
            call, progress=lambda step, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4f}")))
    with atomic_directory(adapter_dir, replace=True) as partial:
        save_adapter(partial, weights, config)
    write_table(losses_csv, [{"step": i, "loss": v} for i, v in enumerate(losses)],
                columns=["step", "loss"])
    _plot_losses(losses, loss_plot, variant_name)
    write_json(record, {
        "variant": variant_name, "selection": variant["sites"], "sites": sites,
        "sites_from": "the union of each pair's selection" if pair_ranking
        else "the concept ranking's selection",
        "target_modules": targets, "settings": settings.__dict__,
        "device": str(next(denoiser_of(pipe).parameters()).device),
        "accelerations": settings.accelerations(next(denoiser_of(pipe).parameters()).device),
        "training_set": summary, "loss_first": losses[0], "loss_last": losses[-1],
        "objective": OBJECTIVES[family_of(denoiser_of(pipe)).objective],
        "versions": package_versions()})


def _plot_losses(losses: Sequence[float], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(losses, color="0.7", linewidth=0.8, label="step")
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(len(smooth)) + window - 1, smooth, color="tab:blue", label="running mean")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion loss")
    ax.set_title(f"LoRA training: {title}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def generate_finetuned_job(
    *, model_name: str, model: Mapping[str, Any], source: str, concept_name: str,
    concept: Mapping[str, Any], generation: Mapping[str, Any], variant_name: str,
    variant: Mapping[str, Any], shard: int, adapter_dir: str | Path,
    training_record: str | Path, images_dir: str | Path, table: str | Path,
    record: str | Path,
) -> None:
    """One shard of a LoRA variant's evaluation images: the steering variants' samples and
    seeds (evaluation stream), generated by the model with the adapter. No batch is pushed
    toward a target: the adapter shifts every image (``target`` empty, ``steered`` True)."""
    import json

    from tqdm import tqdm

    from icm.atomic import atomic_directory
    from icm.finetune import load_adapter
    from icm.generate import SamplerSettings, batches, generate_images, image_name
    from icm.jobs.generation import concept_samples
    from icm.jobs.steering import STEER_COLUMNS
    from icm.models import ModelSpec, load_pipeline
    from icm.provenance import package_versions
    from icm.samples import shard_samples

    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    prompts = concept.get("evaluation_prompts") or concept["prompts"]
    samples = concept_samples(concept, model, generation,
                              concept["steering"]["samples_per_prompt"], stream="evaluation",
                              prompts=prompts)
    batch_size = concept["steering"].get("batch_size") or model["batch_size"]
    mine = shard_samples(samples, model["n_shards"], shard, batch_size)
    pipe = load_pipeline(spec, device=generation["device"])
    modules = load_adapter(pipe, adapter_dir)
    trained = json.loads(Path(training_record).read_text())
    settings = SamplerSettings.of(spec)
    rows: list[dict[str, object]] = []
    rel = Path(os.path.relpath(Path(images_dir).resolve(), Path(table).parent.resolve()))
    with (atomic_directory(images_dir) as partial,
          tqdm(total=len(mine), desc=f"generate {variant_name}", unit="img",
               file=sys.stderr) as bar):
        partial.mkdir()
        for batch in batches(mine, batch_size):
            for sample, image in zip(batch, generate_images(pipe, batch, settings),
                                     strict=True):
                image.save(partial / image_name(sample))
                rows.append({**sample.as_row(), "image": str(rel / image_name(sample)),
                             "target": "", "steered": True})
            bar.update(len(batch))
    write_table(table, rows, STEER_COLUMNS)
    write_json(record, {
        "model": {"name": model_name, "source": source, "steps": spec.steps},
        "concept": concept_name, "variant": variant_name, "method": "lora",
        "selection": variant["sites"], "sites": trained["sites"], "alpha": None,
        "target_modules": modules, "adapter": str(adapter_dir),
        "rank": trained["settings"]["rank"], "prompts": list(prompts),
        "seed_stream": "evaluation", "shard": shard, "n_shards": model["n_shards"],
        "base_seed": generation["base_seed"], "versions": package_versions()})
