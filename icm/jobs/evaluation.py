"""Jobs of stage 5: score each variant's images (FD, FID, CLIP-I, CLIP-T) and collect the table.

Every metric names its backend in the output: the toy world has no CLIP or Inception
weights, so there image similarity and FID use the toy feature extractor, and text alignment
is the share of images whose oracle-read attributes match the prompt (docs/toy.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from icm.devices import resolve_device
from icm.jobs.records import write_json
from icm.labels import label_table, make_labeler
from icm.provenance import package_versions
from icm.tables import write_table

log = logging.getLogger("icm")

#: Metric columns: the main ones, then the same numbers in the other convention the paper's
#: evaluation uses or its text implies (each column's convention in its ``*_backend``).
METRIC_COLUMNS = ["FD", "FID", "CLIP-I", "CLIP-T", "FD_labels", "FD_probabilities",
                  "CLIP-I_paper", "CLIP-T_paper"]
#: ``FD_draw_floor``: the FD perfect steering would reach with the row's realised batch targets
#: (``icm.metrics.draw_floor``); ``n_no_face``: images FairFace's face finder found no face in,
#: left out of FD.
TABLE_COLUMNS = ["variant", *METRIC_COLUMNS[:4], "FD_draw_floor", "n_images", "n_no_face",
                 "alpha", "selection", "layers", *METRIC_COLUMNS[4:],
                 *(f"{m}_backend" for m in METRIC_COLUMNS)]


#: How an FD was computed (``score_fd``): the paper's evaluation, or hard labels.
FD_FROM_PROBABILITIES = "mean class probabilities of every image"
FD_FROM_LABELS = "shares of labelled images"


def paper_scale(cosine: float) -> float:
    """A mean cosine as the paper reports CLIP-I and CLIP-T: (cos + 1) / 2, in [0, 1]."""
    return (cosine + 1) / 2


def read_shards(tables: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate shard tables, image paths made absolute, ordered by sample."""
    parts = []
    for table in tables:
        frame = pd.read_csv(table, keep_default_na=False)
        frame["image"] = [str((Path(table).parent / p).resolve()) for p in frame["image"]]
        parts.append(frame)
    return pd.concat(parts, ignore_index=True).sort_values("sample", ignore_index=True)


def load_images(paths: Sequence[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def render_reference_job(
    world: Mapping[str, Any], concept: Mapping[str, Any], n: int, seed: int, output: str | Path
) -> None:
    """Toy-world "real" images for FID: the world as configured, except that the concept's
    attribute follows the concept's reference distribution (uniform by default)."""
    from icm.atomic import atomic_directory
    from icm.checks import toy_reference_problem, unplanted_reference_ok
    from icm.debias import target_probabilities
    from icm.toy.world import WorldConfig, make_dataset

    classes = list(concept["classes"])
    reference = dict(zip(classes, target_probabilities(classes, concept.get("reference")),
                         strict=True))
    attribute = concept["labeler"].get("attribute") or "color"
    config = dict(world)
    if attribute == "color":
        shapes = (WorldConfig.from_dict(config).color_given_shape or {}).keys()
        config["color_given_shape"] = {s: {c: reference.get(c, 0.0)
                                           for c in ("red", "green", "blue")} for s in shapes}
    elif attribute == "shape":
        config["shape_probs"] = {s: reference.get(s, 0.0) for s in ("circle", "square",
                                                                    "triangle")}
    elif not unplanted_reference_ok(concept.get("reference")):
        raise ValueError(toy_reference_problem(attribute))  # the start-up check says so too
    # else: an attribute the world does not plant (where the shape sits): the world's own
    # images, whose positions are uniform, are already the uniform reference
    data = make_dataset(n, seed, WorldConfig.from_dict(config))
    with atomic_directory(output) as partial:
        partial.mkdir()
        for i, image in enumerate(data.images):
            Image.fromarray(image).save(partial / f"{i:06d}.png")
    log.info("rendered %d reference images with %s %s", n, attribute, reference)


def _fid(images: Sequence[str], reference: str, backend: str, toy_features: str | None,
         device: str) -> float:
    """clean-fid wants one folder: link the variant's images (spread over shards) into one."""
    from icm.metrics import compute_fid

    with tempfile.TemporaryDirectory() as folder:
        for i, path in enumerate(images):
            os.symlink(path, Path(folder) / f"{i:06d}{Path(path).suffix}")
        return compute_fid(folder, reference, backend=backend, toy_features=toy_features,
                           device=device)


def fid_of_images(images: Sequence[Image.Image], reference: str, backend: str,
                  toy_features: str | None, device: str) -> float:
    """FID of images in memory (calibration's), written to a temporary folder for
    clean-fid."""
    from icm.metrics import compute_fid

    with tempfile.TemporaryDirectory() as folder:
        for i, image in enumerate(images):
            image.save(Path(folder) / f"{i:06d}.png")
        return compute_fid(folder, reference, backend=backend, toy_features=toy_features,
                           device=device)


def image_embedder(toy: bool, toy_features: str | None, evaluation: Mapping[str, Any],
                   device: str, labeler: Mapping[str, Any] | None = None) -> Any:
    """CLIP-I's image tower: the toy feature net in the toy world, on images whose concept
    attribute (the oracle ``labeler``'s) is neutralised; else open_clip's CLIP."""
    from icm.metrics import ClipEmbedder, ToyFeatureEmbedder

    if toy:
        if not toy_features:
            raise ValueError("the toy model's metrics need the toy feature extractor")
        return ToyFeatureEmbedder(toy_features, device=device,
                                  neutral=(labeler or {}).get("attribute"))
    return ClipEmbedder(evaluation["clip_model"], evaluation["clip_pretrained"], device=device,
                        checkpoint_tag=evaluation.get("clip_checkpoint_tag"))


def score_fd(labeler: Any, spec: Mapping[str, Any], images: Sequence[Image.Image],
             prompts: Sequence[str], classes: Sequence[str],
             reference: Mapping[str, float] | None,
             rows: pd.DataFrame) -> tuple[float, dict[str, float], str, pd.DataFrame]:
    """FD of ``images`` (rows: their sample table) and how it was computed: from mean class
    probabilities of every image where the labeler has them (FairFace, as the paper), else
    from shares of labelled images; and per image its ``label`` and ``p_{class}``, the
    labeler's confidence in each class (its probabilities, else ``labeler.confidences``)."""
    from icm.metrics import fairness_discrepancy, fairness_discrepancy_from_probabilities

    margin = float(spec.get("margin", 0.0))
    matrix = labeler.scores(images)
    labels = label_table(rows, matrix, labeler, margin)["label"]
    probabilities = labeler.class_probabilities(images)
    confidence = probabilities if probabilities is not None else labeler.confidences(matrix)
    labelled = pd.DataFrame({"label": labels.to_numpy(),
                             **{f"p_{c}": confidence[:, k] for k, c in enumerate(classes)}})
    if probabilities is not None:
        fd, per_prompt = fairness_discrepancy_from_probabilities(probabilities, list(prompts),
                                                                 classes, reference)
        return fd, per_prompt, FD_FROM_PROBABILITIES, labelled
    fd, per_prompt = fairness_discrepancy(list(labels), list(prompts), classes, reference)
    return fd, per_prompt, FD_FROM_LABELS, labelled


def compute_metrics_job(
    *,
    toy: bool,
    concept: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    variant: str,
    steered: Sequence[str | Path],
    original: Sequence[str | Path],
    fid_reference: str | None,
    toy_features: str | None,
    output: str | Path,
    output_labels: str | Path,
) -> None:
    """Metrics of one variant (``output``) and per image its label, class confidences and
    CLIP-I (``output_labels``, for the target tables). ``original``: the unsteered
    variant's shard tables, for CLIP-I (same seeds, paired by sample); empty when this is
    the original itself."""
    from icm.metrics import (
        clip_t,
        draw_floor,
        fairness_discrepancy,
        paired_cosines,
        prompt_agreement,
    )

    device = str(resolve_device(evaluation["device"]))
    classes = list(concept["classes"])
    spec = concept["evaluation"]["labeler"] or concept["labeler"]
    labeler = make_labeler(spec, classes, device=device)  # fails here if weights are missing
    embedder = image_embedder(toy, toy_features, evaluation, device, spec)
    rows = read_shards(steered)
    images = load_images(rows["image"])
    fd, fd_per_prompt, fd_from, labelled = score_fd(labeler, spec, images,
                                                    list(rows["prompt"]), classes,
                                                    concept.get("reference"), rows)
    labels = labelled["label"]
    embeddings = embedder.embed_images(images)
    clip_i, per_image = math.nan, np.full(len(rows), np.nan)
    if original:
        base = read_shards(original).set_index("sample").loc[rows["sample"]]
        per_image = paired_cosines(embeddings, embedder.embed_images(load_images(base["image"])))
        clip_i = float(per_image.mean())
    if toy:
        text_alignment = prompt_agreement(list(rows["prompt"]), images)
        text_backend = "toy oracle: prompt attributes present"
    else:
        text_alignment = clip_t(embeddings, embedder.embed_texts(list(rows["prompt"])))
        text_backend = f"{embedder.name} cosine"
    fid, fid_backend = math.nan, "none (no fid_reference)"
    if fid_reference:
        backend = "toy" if toy else "inception"
        fid = _fid(list(rows["image"]), fid_reference, backend, toy_features, device)
        fid_backend = ("clean-fid, toy features" if toy else "clean-fid, Inception") + \
            f" vs {fid_reference}"
    counts = labels[labels != ""].value_counts().to_dict()
    fd_labels, _ = fairness_discrepancy(list(labels), list(rows["prompt"]), classes,
                                        concept.get("reference"))
    from_probabilities = fd_from == FD_FROM_PROBABILITIES
    result = {
        "variant": variant, "n_images": len(rows), "FD": fd, "FD_per_prompt": fd_per_prompt,
        "FID": fid, "CLIP-I": clip_i, "CLIP-T": text_alignment, "label_counts": counts,
        "FD_labels": fd_labels, "FD_probabilities": fd if from_probabilities else math.nan,
        "FD_draw_floor": draw_floor(list(rows["target"]), list(rows["prompt"]), classes,
                                    concept.get("reference")),
        "CLIP-I_paper": paper_scale(clip_i),
        "CLIP-T_paper": math.nan if toy else paper_scale(text_alignment),
        "targets": rows["target"].value_counts().to_dict(),
        "steered_images": int(rows["steered"].astype(str).eq("True").sum()),
        "FD_from": fd_from, "unlabelled_images": int((labels == "").sum()),
        # FairFace on face crops: images without a face (no label, left out of FD).
        "no_face_images": int((~faces).sum()) if (faces := getattr(labeler, "last_faces",
                                                                   None)) is not None else 0,
        "backends": {"FD": f"{labeler.name}, {fd_from}", "FID": fid_backend,
                     "CLIP-I": f"{embedder.name} cosine (steered vs original, same seed)",
                     "CLIP-T": text_backend,
                     "FD_labels": f"{labeler.name}, {FD_FROM_LABELS}",
                     "FD_probabilities": f"{labeler.name}, mean class probabilities of every "
                     "image (the paper's evaluation)" if from_probabilities
                     else f"none ({labeler.name} gives no class probabilities)",
                     "CLIP-I_paper": "(CLIP-I + 1) / 2, as the paper reports it",
                     "CLIP-T_paper": "none (the toy's CLIP-T is no cosine)" if toy
                     else "(CLIP-T + 1) / 2, as the paper reports it"},
        "versions": package_versions(),
    }
    write_json(output, result)
    per_sample = pd.concat([rows[["sample", "prompt", "target", "steered"]].reset_index(
        drop=True), labelled, pd.Series(per_image, name="CLIP-I")], axis=1)
    write_table(output_labels, per_sample.to_dict("records"), columns=list(per_sample.columns))
    log.info("%s: FD %.3f FID %.2f CLIP-I %.3f CLIP-T %.3f (%s)", variant, fd, fid, clip_i,
             text_alignment, counts)


def collect_table_job(metrics: Sequence[str | Path], records: Sequence[str | Path],
                      output: str | Path, plot: str | Path | None = None) -> pd.DataFrame:
    """``table.csv``: a row per variant with its metrics, alpha, sites and metric backends;
    ``plot``: the same as bar charts."""
    rows = []
    for metrics_path, record_path in zip(metrics, records, strict=True):
        result = json.loads(Path(metrics_path).read_text())
        record = json.loads(Path(record_path).read_text())
        rows.append({
            "variant": result["variant"], **{m: result[m] for m in METRIC_COLUMNS},
            "FD_draw_floor": result["FD_draw_floor"],
            "n_images": result["n_images"], "n_no_face": result["no_face_images"],
            "alpha": record["alpha"],
            "selection": record["selection"], "layers": layers_text(record["sites"]),
            **{f"{k}_backend": v for k, v in result["backends"].items()},
        })
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    write_table(output, table.to_dict("records"), columns=TABLE_COLUMNS)
    if plot:
        plot_metrics(table, plot)
    return table


def layers_text(sites: Mapping[str, Sequence[str]] | Sequence[str]) -> str:
    """The table's ``layers`` cell: ``;``-separated sites, per pair as ``pair: a;b | ...``
    when pairs steer different sets of sites."""
    if not isinstance(sites, Mapping):
        return ";".join(sites)
    if len({frozenset(v) for v in sites.values()}) == 1:
        return ";".join(next(iter(sites.values())))
    return " | ".join(f"{pair}: {';'.join(v)}" for pair, v in sites.items())


def plot_metrics(table: pd.DataFrame, output: str | Path) -> None:
    """One bar chart per metric, a bar per variant: the table at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["FD", "FID", "CLIP-I", "CLIP-T"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3))
    for ax, metric in zip(axes, metrics, strict=True):
        ax.bar(table["variant"], table[metric].astype(float), color="tab:blue")
        better = "lower" if metric in ("FD", "FID") else "higher"
        ax.set_title(f"{metric} ({better} is better)", fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def plot_grid_job(variant_tables: Mapping[str, Sequence[str | Path]], columns: int,
                  output: str | Path) -> None:
    """Rows: variants (first: the original); columns: the same samples (seeds) in each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = {v: read_shards(t) for v, t in variant_tables.items()}
    first = next(iter(frames.values()))
    picks = np.linspace(0, len(first) - 1, min(columns, len(first))).astype(int)
    samples = first["sample"].iloc[picks].tolist()
    fig, axes = plt.subplots(len(frames), len(samples), squeeze=False,
                             figsize=(1.2 * len(samples) + 1, 1.2 * len(frames) + 0.4))
    for r, (variant, frame) in enumerate(frames.items()):
        indexed = frame.set_index("sample")
        for c, sample in enumerate(samples):
            ax = axes[r][c]
            ax.imshow(load_images([indexed.loc[sample, "image"]])[0])
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(variant, rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title(f"#{sample}\n{indexed.loc[sample, 'target']}", fontsize=7)
    fig.suptitle("same seeds per column; column title: sample and its batch's target", fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)
