"""Jobs of stage 5: score each variant's images (FD, FID, CLIP-I, CLIP-T) and collect the table.

Every metric names its backend in the output: the toy world has no CLIP or Inception
weights, so there image similarity and FID use the toy feature extractor, and text alignment
is the share of images whose oracle-read attributes match the prompt (docs/toy.md).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from icm.evaluation.images import load_images, paper_scale, read_shards
from icm.evaluation.plots import layers_text, plot_metrics
from icm.evaluation.targets import TARGET_COLUMNS, read_labels, target_rows
from icm.io.atomic import write_json, write_table
from icm.io.provenance import package_versions
from icm.labeling.labelers import make_labeler
from icm.models.devices import resolve_device

log = logging.getLogger("icm")

#: Metric columns: the main ones, then the same numbers in the other convention the paper's
#: evaluation uses or its text implies (each column's convention in its ``*_backend``).
METRIC_COLUMNS = ["FD", "FID", "CLIP-I", "CLIP-T", "FD_labels", "FD_probabilities",
                  "CLIP-I_paper", "CLIP-T_paper"]
#: ``FD_draw_floor``: the FD perfect steering would reach with the row's realised batch targets
#: (``icm.evaluation.metrics.draw_floor``); ``n_no_face``: images FairFace's face finder found no
#: face in, left out of FD.
TABLE_COLUMNS = ["variant", *METRIC_COLUMNS[:4], "FD_draw_floor", "n_images", "n_no_face",
                 "alpha", "selection", "layers", *METRIC_COLUMNS[4:],
                 *(f"{m}_backend" for m in METRIC_COLUMNS)]


def fid_statistics_job(*, folder: str | Path, backend: str, toy_features: str | None,
                       device: str, output: str | Path) -> None:
    """The FID reference's feature statistics, computed once per (model, concept): every
    FID of its metrics and calibration jobs then reads them instead of featurizing the
    reference images again (the same mean and covariance clean-fid computes per call)."""
    from icm.evaluation.metrics import write_fid_statistics
    from icm.io.atomic import written

    with written(output) as partial:
        write_fid_statistics(folder, partial, backend=backend, toy_features=toy_features,
                             device=str(resolve_device(device)))
    log.info("FID statistics of %s (%s features) in %s", folder, backend, output)


def render_reference_job(
    world: Mapping[str, Any], concept: Mapping[str, Any], n: int, seed: int, output: str | Path
) -> None:
    """Toy-world "real" images for FID: the world as configured, except that the concept's
    attribute follows the concept's reference distribution (uniform by default)."""
    from icm.checks import toy_reference_problem, unplanted_reference_ok
    from icm.io.atomic import atomic_directory
    from icm.steering.batch_targets import target_probabilities
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


def compute_metrics_job(
    *,
    toy: bool,
    concept: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    variant: str,
    steered: Sequence[str | Path],
    original_embeddings: str | Path | None,
    fid_reference: str | None,
    toy_features: str | None,
    output: str | Path,
    output_labels: str | Path,
    output_embeddings: str | Path,
) -> None:
    """Metrics of one variant (``output``), per image its label, class confidences and
    CLIP-I (``output_labels``, for the target tables), and its images' embeddings
    (``output_embeddings``, by sample). ``original_embeddings``: the unsteered variant's,
    for CLIP-I (same seeds, paired by sample: its images are embedded once, by its own
    metrics job); None when this is the original itself."""
    # Imported here: the other jobs of this module score nothing (icm.io.fingerprints).
    from icm.evaluation.metrics import (
        clip_t,
        draw_floor,
        fairness_discrepancy,
        paired_cosines,
        prompt_agreement,
    )
    from icm.evaluation.scoring import (
        FD_FROM_LABELS,
        FD_FROM_PROBABILITIES,
        embeddings_of,
        fid_of_files,
        image_embedder,
        score_fd,
        write_embeddings,
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
    if original_embeddings:
        per_image = paired_cosines(embeddings, embeddings_of(original_embeddings,
                                                             rows["sample"]))
        clip_i = float(per_image.mean())
    write_embeddings(output_embeddings, embeddings, rows["sample"], embedder.name)
    if toy:
        text_alignment = prompt_agreement(list(rows["prompt"]), images)
        text_backend = "toy oracle: prompt attributes present"
    else:
        text_alignment = clip_t(embeddings, embedder.embed_texts(list(rows["prompt"])))
        text_backend = f"{embedder.name} cosine"
    fid, fid_backend = math.nan, "none (no fid_reference)"
    if fid_reference:
        backend = "toy" if toy else "inception"
        fid = fid_of_files(list(rows["image"]), fid_reference, backend, toy_features, device)
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


def target_table_job(target: str, labels: Mapping[str, str | Path], original: str,
                     records: Mapping[str, str | Path], metrics: Mapping[str, str | Path],
                     output: str | Path) -> None:
    """``target-{target}/table.csv`` from every variant's per-image labels."""
    tables = {v: read_labels(p) for v, p in labels.items()}
    info = {}
    for variant, path in records.items():
        record = json.loads(Path(path).read_text())
        backend = json.loads(Path(metrics[variant]).read_text())["backends"]["FD"]
        info[variant] = {"alpha": record["alpha"], "selection": record["selection"],
                         "labeler": backend}
    rows = target_rows(tables, original, target, info)
    write_table(output, rows, TARGET_COLUMNS)
    for row in rows:
        log.info("%s -> %s: success %.3f flips %.3f confidence %.3f CLIP-I %.3f (n %d, "
                 "eligible %d)", row["variant"], target, row["success_rate"], row["flip_rate"],
                 row["target_confidence"], row["CLIP-I"], row["n_images"], row["n_eligible"])
