"""One function per workflow job, taking plain config mappings and paths.

The Snakemake adapters in ``workflow_scripts/`` only unpack ``snakemake.*`` and call these,
so every job can also be run (and tested) from Python without Snakemake.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from icm.generate import SAMPLE_COLUMNS, SamplerSettings, generate_shard, write_table
from icm.models import ModelSpec, load_pipeline, save_tiny_sd15
from icm.models.loading import resolve_device
from icm.samples import Sample, plan_samples, shard_samples

log = logging.getLogger("icm")


@contextlib.contextmanager
def logging_to(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Send logging, warnings, progress bars and any traceback of the job to its log file."""
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as handle, contextlib.redirect_stderr(handle):
        logging.basicConfig(stream=handle, level=logging.INFO, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.captureWarnings(True)
        try:
            yield
        except BaseException:
            traceback.print_exc(file=handle)
            raise


def concept_samples(
    concept: Mapping[str, Any], model: Mapping[str, Any], generation: Mapping[str, Any]
) -> list[Sample]:
    """The full sample plan of a (model, concept) generation."""
    per_prompt = model.get("samples_per_prompt") or concept["samples_per_prompt"]
    return plan_samples(concept["prompts"], per_prompt, generation["base_seed"])


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
) -> None:
    """Generate one shard. The model loads first, so missing weights stop the job before
    anything is written."""
    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    samples = concept_samples(concept, model, generation)
    mine = shard_samples(samples, model["n_shards"], shard, model["batch_size"])
    log.info("%s/%s shard %d: samples %d..%d of %d", model_name, concept_name, shard,
             mine[0].sample, mine[-1].sample, len(samples))
    pipe = load_pipeline(spec, device=generation["device"])
    attrs = {
        "model": {"name": model_name, "family": spec.family, "source": source,
                  "dtype": spec.dtype, "scheduler": type(pipe.scheduler).__name__},
        "concept": concept_name,
        "prompts": list(concept["prompts"]),
        "samples_per_prompt": len(samples) // len(concept["prompts"]),
        "base_seed": generation["base_seed"],
        "seed_rule": "numpy SeedSequence([base_seed, prompt_index, repeat]), first uint32",
        "shard": shard,
        "n_shards": model["n_shards"],
    }
    generate_shard(
        pipe,
        mine,
        SamplerSettings(spec.steps, spec.guidance_scale, spec.resolution),
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
    """Build a model that the workflow makes itself instead of downloading."""
    if builder != "tiny-sd15":
        raise ValueError(f"unknown model builder {builder!r}")
    save_tiny_sd15(Path(output), seed=seed)
    print(f"built {builder} into {output}", file=sys.stderr)


def train_toy_job(
    world: Mapping[str, Any], train: Mapping[str, Any], output: str | Path, threads: int = 2
) -> None:
    """Train the toy diffusion model from scratch (GPU if present) and save it."""
    from icm.toy.train import ToyTrainConfig, save_toy, train_toy
    from icm.toy.world import WorldConfig

    torch.set_num_threads(threads)
    config = ToyTrainConfig(**train, world=WorldConfig(**world))
    pipe, record = train_toy(config, device=str(resolve_device("auto")))
    save_toy(pipe, record, output)
    log.info("trained toy model in %.0f s, final loss %.4f", record["wall_seconds"],
             record["final_loss"])


def train_toy_features_job(
    world: Mapping[str, Any], features: Mapping[str, Any], output: str | Path, threads: int = 2
) -> None:
    """Train the toy world's feature extractor (for FID-style metrics) and save it."""
    from icm.toy.features import save_feature_net, train_feature_net
    from icm.toy.world import WorldConfig

    net = train_feature_net(WorldConfig(**world), n_train=features["n_train"],
                            steps=features["steps"], seed=features["seed"], num_threads=threads)
    save_feature_net(net, output)


def toy_quality_job(
    model_name: str, model: Mapping[str, Any], source: str, output_json: str | Path,
    output_markdown: str | Path, n_per_prompt: int = 64, threads: int = 2,
) -> None:
    """Oracle read-out of the toy model's fidelity and planted bias (docs/toy.md)."""
    import json

    from icm.toy.quality import measure_quality, quality_markdown

    torch.set_num_threads(threads)
    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    pipe = load_pipeline(spec, device="auto")
    settings = SamplerSettings(spec.steps, spec.guidance_scale, spec.resolution)
    result = measure_quality(pipe, settings, n_per_prompt=n_per_prompt,
                             batch_size=model["batch_size"])
    result["model"] = {"name": model_name, "source": source}
    Path(output_json).write_text(json.dumps(result, indent=2))
    Path(output_markdown).write_text(quality_markdown(result) + "\n")


def _write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    import json

    Path(path).write_text(json.dumps(data, indent=2, default=str))


def label_images_job(
    concept: Mapping[str, Any], samples_csv: str | Path, output: str | Path,
    sidecar: str | Path, device: str = "auto",
) -> None:
    """Label every generated image; the labeler loads (and fails) before any work."""
    import pandas as pd

    from icm.labels import label_images, make_labeler
    from icm.provenance import package_versions

    labeler = make_labeler(concept["labeler"], concept["classes"],
                           device=str(resolve_device(device)))
    samples = pd.read_csv(samples_csv)
    table = label_images(samples, Path(samples_csv).parent, labeler,
                         margin=concept["labeler"]["margin"])
    write_table(output, table.to_dict("records"), columns=list(table.columns))
    counts = table.loc[table["kept"], "label"].value_counts().to_dict()
    _write_json(sidecar, {"labeler": labeler.name, "classes": concept["classes"],
                          "margin": concept["labeler"]["margin"], "counts": counts,
                          "dropped": int((~table["kept"]).sum()), "versions": package_versions()})
    log.info("labelled %d images: %s", len(table), counts)


def fit_probes_job(
    concept: Mapping[str, Any], probes: Mapping[str, Any], pair: tuple[str, str],
    labels_csv: str | Path, stores: Sequence[str | Path], output_scores: str | Path,
    output_directions: str | Path, output_meta: str | Path, output_heatmap: str | Path,
) -> None:
    """Fit one class pair's probes for every (site, step); write scores, directions, heatmap."""
    import numpy as np
    import pandas as pd
    from safetensors.numpy import save_file

    from icm.probes import Pair, fit_pair
    from icm.provenance import package_versions
    from icm.ranking import plot_heatmap, rank_sites, steering_start
    from icm.sites import site_kind
    from icm.store import read_sites, site_widths

    target = Pair(negative=pair[0], positive=pair[1])
    labels = pd.read_csv(labels_csv, keep_default_na=False)
    labels = labels[labels["kept"].astype(str) == "True"].set_index("sample")["label"]
    device = str(resolve_device(probes["device"]))
    widths = site_widths(stores[0])
    rows, directions = [], {}
    for width in dict.fromkeys(widths.values()):  # one width group at a time bounds memory
        group = [s for s, w in widths.items() if w == width]
        samples, arrays, timesteps = read_sites(list(stores), group)
        keep = np.isin(samples, labels.index)
        y = labels.loc[samples[keep]].to_numpy()
        results = fit_pair({s: a[keep] for s, a in arrays.items()}, y, target,
                           backend=probes["backend"], test_size=probes["test_size"],
                           seed=probes["seed"], min_per_class=probes["min_per_class"],
                           device=device)
        for r in results:
            directions[r.site] = r.directions.astype(np.float32)
            for step, (tr, te) in enumerate(zip(r.train_acc, r.test_acc)):
                rows.append({"site": r.site, "kind": site_kind(r.site), "step": step,
                             "timestep": float(timesteps[step]), "pair": target.name,
                             "negative": target.negative, "positive": target.positive,
                             "train_acc": float(tr), "test_acc": float(te), "n_train": r.n_train,
                             "n_test": r.n_test, f"n_{target.negative}": r.counts[target.negative],
                             f"n_{target.positive}": r.counts[target.positive]})
    order = list(widths)
    scores = pd.DataFrame(rows).sort_values(["site", "step"], key=lambda c: c.map(
        order.index) if c.name == "site" else c, kind="stable")
    Path(output_scores).parent.mkdir(parents=True, exist_ok=True)
    write_table(output_scores, scores.to_dict("records"), columns=list(scores.columns))
    save_file({s: directions[s] for s in order}, str(output_directions),
              metadata={"pair": target.name, "positive": target.positive})
    _write_json(output_meta, {
        "format": "icm-directions/1",
        "pair": target.name, "positive": target.positive, "negative": target.negative,
        "meaning": "unit vector per (site, step) in unscaled activation space; adding it moves "
                   "toward the positive class",
        "backend": probes["backend"], "test_size": probes["test_size"], "seed": probes["seed"],
        "concept": {k: concept[k] for k in ("prompts", "classes")},
        "entries": [{k: row[k] for k in ("site", "step", "timestep", "train_acc", "test_acc")}
                    for row in scores.to_dict("records")],
        "versions": package_versions(),
    })
    t0 = steering_start(int(scores["step"].max()) + 1, probes["steer_start_of_50"])
    plot_heatmap(scores, rank_sites(scores, t0), output_heatmap,
                 title=f"probe test accuracy, {target.negative} vs {target.positive}")


def rank_sites_job(
    probes: Mapping[str, Any], scores_csvs: Sequence[str | Path], output_ranking: str | Path,
    output_by_kind: str | Path, output_heatmap: str | Path,
) -> None:
    """Rank sites over all pairs; write ranking, self- vs cross-attention summary, heatmap."""
    import pandas as pd

    from icm.ranking import kind_summary, plot_heatmap, rank_sites, steering_start

    scores = pd.concat([pd.read_csv(p) for p in scores_csvs], ignore_index=True)
    t0 = steering_start(int(scores["step"].max()) + 1, probes["steer_start_of_50"])
    ranking = rank_sites(scores, t0)
    write_table(output_ranking, ranking.to_dict("records"), columns=list(ranking.columns))
    summary = kind_summary(ranking)
    write_table(output_by_kind, summary.to_dict("records"), columns=list(summary.columns))
    plot_heatmap(scores, ranking, output_heatmap,
                 title=f"probe test accuracy (mean over {scores['pair'].nunique()} pairs)")
