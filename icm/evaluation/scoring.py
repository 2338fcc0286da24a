"""Scoring a variant's images: FD from the concept's labeler, FID against a reference
(clean-fid), and the image embedder CLIP-I uses. Shared by evaluation and calibration, so
that a calibrated alpha is chosen by the very numbers the table reports."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from icm.labeling.labelers import label_table

#: How an FD was computed (``score_fd``): the paper's evaluation, or hard labels.
FD_FROM_PROBABILITIES = "mean class probabilities of every image"


FD_FROM_LABELS = "shares of labelled images"


def fid_of_files(images: Sequence[str], reference: str, backend: str, toy_features: str | None,
                 device: str) -> float:
    """FID of image files (a variant's, spread over shards): linked into one folder."""
    return _fid_of_folder(lambda folder: [
        os.symlink(path, folder / f"{i:06d}{Path(path).suffix}") for i, path in enumerate(images)],
        reference, backend, toy_features, device)


def fid_of_images(images: Sequence[Image.Image], reference: str, backend: str,
                  toy_features: str | None, device: str) -> float:
    """FID of images in memory (calibration's): written as PNG into one folder."""
    return _fid_of_folder(lambda folder: [
        image.save(folder / f"{i:06d}.png") for i, image in enumerate(images)],
        reference, backend, toy_features, device)


def _fid_of_folder(fill: Any, reference: str, backend: str, toy_features: str | None,
                   device: str) -> float:
    """clean-fid scores one folder: ``fill(folder)`` puts the images in a temporary one."""
    from icm.evaluation.metrics import compute_fid

    with tempfile.TemporaryDirectory() as folder:
        fill(Path(folder))
        return compute_fid(folder, reference, backend=backend, toy_features=toy_features,
                           device=device)


def image_embedder(toy: bool, toy_features: str | None, evaluation: Mapping[str, Any],
                   device: str, labeler: Mapping[str, Any] | None = None) -> Any:
    """CLIP-I's image tower: the toy feature net in the toy world, on images whose concept
    attribute (the oracle ``labeler``'s) is neutralised; else open_clip's CLIP."""
    from icm.evaluation.metrics import ClipEmbedder, ToyFeatureEmbedder

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
    from icm.evaluation.metrics import fairness_discrepancy, fairness_discrepancy_from_probabilities

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


def write_embeddings(path: str | Path, embeddings: np.ndarray, samples: Sequence[int],
                     backend: str) -> None:
    """A set's image embeddings by sample (safetensors, float32): a variant's, or the
    calibration's unsteered images'."""
    from safetensors.numpy import save_file

    from icm.io.atomic import written

    with written(path) as partial:
        save_file({"embeddings": np.ascontiguousarray(embeddings, dtype=np.float32),
                   "sample": np.asarray(samples, dtype=np.int64)}, str(partial),
                  metadata={"what": "image embeddings of CLIP-I and CLIP-T, row per sample",
                            "backend": backend})


def embeddings_of(path: str | Path, samples: Sequence[int]) -> np.ndarray:
    """The rows of ``samples`` in an embeddings file; a sample it lacks is an error (the
    original and a variant share their seeds)."""
    from safetensors.numpy import load_file

    stored = load_file(str(path))
    index = {int(s): i for i, s in enumerate(stored["sample"])}
    missing = [int(s) for s in samples if int(s) not in index]
    if missing:
        raise ValueError(f"{path} has no embeddings of samples {missing[:10]}: the original "
                         "variant must hold every sample a steered variant has")
    return stored["embeddings"][[index[int(s)] for s in samples]]
