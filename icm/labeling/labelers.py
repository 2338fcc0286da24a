"""Pseudo-labels: which option did the model choose in each image?

Four labelers behind one interface (``scores`` -> per-class scores, argmax is the label):

* ``OracleLabeler``: the toy world's pixel oracle (ground truth there).
* ``PixelLabeler``: which half of an image is brighter, or which colour channel is strongest,
  read off the pixels of any model's images with no weights (offline runs, replicas).
* ``ClipLabeler``: CLIP zero-shot through open_clip. Each class is a group of text prompts and
  the best-matching prompt of a group is the class's score, as in the paper's code.
* ``FairFaceLabeler``: the FairFace ResNet-34 (18-way head) for gender, age and race, with
  the paper's groupings.

An optional margin drops ambiguous images (best minus second-best score below the margin):
they get an empty label and ``kept = False``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image


class LabelerNotAvailableError(RuntimeError):
    """The labeler's weights are missing; raised before any image is labelled."""


class Labeler(ABC):
    """Scores images against ``classes``; higher is more likely."""

    classes: list[str]
    name: str

    @abstractmethod
    def scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(images, classes) scores; NaN where an image cannot be scored."""

    def class_probabilities(self, images: Sequence[Image.Image]) -> np.ndarray | None:
        """(images, classes) probabilities of every image, for a probability-based FD;
        None for labelers whose scores are not probabilities (CLIP cosines, the oracle)."""
        return None

    def confidences(self, scores: np.ndarray) -> np.ndarray:
        """(images, classes) confidence in each class, from ``scores`` (NaN rows stay NaN):
        by default the non-negative scores as shares of their sum (the oracle's colour
        scores are a softmax already, its shape scores are IoUs)."""
        positive = np.clip(scores, 0.0, None)
        total = positive.sum(axis=1, keepdims=True)
        return positive / np.where(total > 0, total, np.nan)


class OracleLabeler(Labeler):
    """Colour or shape read from pixels (toy world only)."""

    def __init__(self, attribute: str, classes: Sequence[str]) -> None:
        if attribute not in ("color", "shape"):
            raise ValueError(f"the oracle reads 'color' or 'shape', not {attribute!r}")
        self.attribute, self.classes = attribute, list(classes)
        self.name = f"toy oracle ({attribute})"

    def scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        from icm.toy.oracle import oracle_label

        out = np.full((len(images), len(self.classes)), np.nan)
        for i, image in enumerate(images):
            label = oracle_label(np.asarray(image.convert("RGB")))
            table = label.color_scores if self.attribute == "color" else label.shape_scores
            if table:
                out[i] = [table.get(c, 0.0) for c in self.classes]
        return out


#: The pixel labeler's attributes and the classes each can score.
PIXEL_CLASSES: dict[str, tuple[str, ...]] = {
    "lit_side": ("left", "right", "top", "bottom"),
    "color": ("red", "green", "blue"),
}


class PixelLabeler(Labeler):
    """A statistic of the pixels, for any model and no weights: ``lit_side``, which half of
    the image is brightest (classes among left, right, top, bottom), or ``color``, which
    colour channel is strongest (among red, green, blue).

    A class's score is the mean of its half (of its channel) minus the image's mean, in
    pixel units of [0, 1]. It exists so that the whole workflow runs offline on random-weight
    replicas: their images are almost constant, so a fixed brightness threshold or the
    dominant channel labels every image alike, but which half is brighter varies with the
    seed (measured on the tiny replicas: left in 34-50% of the images)."""

    def __init__(self, attribute: str, classes: Sequence[str]) -> None:
        if attribute not in PIXEL_CLASSES:
            raise ValueError(f"the pixel labeler reads {sorted(PIXEL_CLASSES)}, not "
                             f"{attribute!r}")
        unknown = [c for c in classes if c not in PIXEL_CLASSES[attribute]]
        if unknown:
            raise ValueError(f"pixel {attribute} classes are {list(PIXEL_CLASSES[attribute])};"
                             f" got {unknown}")
        self.attribute, self.classes = attribute, list(classes)
        self.name = f"pixel statistic ({attribute})"

    def scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = np.empty((len(images), len(self.classes)))
        for i, image in enumerate(images):
            pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
            out[i] = [self._part(pixels, c).mean() - pixels.mean() for c in self.classes]
        return out

    @staticmethod
    def _part(pixels: np.ndarray, name: str) -> np.ndarray:
        """The pixels a class averages: a half (the middle row or column of an odd size is
        in neither) or a channel."""
        height, width = pixels.shape[:2]
        half_h, half_w = height // 2, width // 2
        parts = {"left": (slice(None), slice(None, half_w)),
                 "right": (slice(None), slice(width - half_w, None)),
                 "top": (slice(None, half_h),), "bottom": (slice(height - half_h, None),),
                 "red": (Ellipsis, 0), "green": (Ellipsis, 1), "blue": (Ellipsis, 2)}
        return pixels[parts[name]]


class ClipLabeler(Labeler):
    """Zero-shot CLIP: cosine similarity of the image to each class's best prompt."""

    def __init__(
        self,
        classes: Sequence[str],
        prompts: Mapping[str, Sequence[str]] | None = None,
        model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        device: str = "cpu",
        batch_size: int = 32,
        checkpoint_tag: str | None = None,
    ) -> None:
        from icm.models.clip import ClipEmbedder, MetricBackendNotAvailableError

        self.classes = list(classes)
        self.prompts = {c: list((prompts or {}).get(c) or [f"a photo of a {c}"]) for c in classes}
        try:  # the same open_clip towers as the CLIP-I/CLIP-T metrics
            self.embedder = ClipEmbedder(model, pretrained, device=device, batch_size=batch_size,
                                         checkpoint_tag=checkpoint_tag)
        except MetricBackendNotAvailableError as error:
            raise LabelerNotAvailableError(
                f"{error}\nFor the labeler, set `labeler.pretrained` in config.yaml to that "
                "local checkpoint file."
            ) from error
        self.name = self.embedder.name
        texts = [p for c in self.classes for p in self.prompts[c]]
        self.text = self.embedder.embed_texts(texts)  # (prompts, D), unit rows
        self.group = np.repeat(np.arange(len(self.classes)),
                               [len(self.prompts[c]) for c in self.classes])

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embedder.embed_images(images)

    def confidences(self, scores: np.ndarray) -> np.ndarray:
        """CLIP's zero-shot probabilities: softmax over classes of 100 x cosine (the logit
        scale CLIP is trained with)."""
        logits = 100.0 * scores
        logits = logits - np.nanmax(logits, axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)

    def scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        similarity = self.embed_images(images) @ self.text.T
        return np.stack([similarity[:, self.group == k].max(axis=1)
                         for k in range(len(self.classes))], axis=1)


# FairFace's 18 outputs: race (7), gender (2), age (9), in this order.
FAIRFACE_RACE = ("white", "black", "latino_hispanic", "east_asian", "southeast_asian", "indian",
                 "middle_eastern")
FAIRFACE_GENDER = ("man", "woman")
FAIRFACE_AGE = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+")
# The paper's groupings of FairFace outputs into classes.
FAIRFACE_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "gender": {"man": ("man",), "woman": ("woman",)},
    "age": {"young": ("0-2", "3-9", "10-19"), "adult": ("20-29", "30-39", "40-49", "50-59"),
            "old": ("60-69", "70+")},
    "race": {"white": ("white",), "black": ("black",),
             "asian": ("east_asian", "southeast_asian"), "indian": ("indian",)},
}


class FairFaceLabeler(Labeler):
    """FairFace ResNet-34 probabilities summed into the paper's groups.

    Outputs outside the concept's classes (latino/hispanic and middle eastern for race, or a
    group the concept leaves out, such as adult for classes [young, old]) are groups of
    their own: an image is labelled with the most likely group, compared as groups (asian
    0.30 + 0.30 beats latino 0.35), and gets NaN scores (no label) only when an outside
    group wins. ``class_probabilities`` keeps every image, as the paper's FD does (the
    classes' probabilities as they are; for race they need not sum to 1).
    """

    def __init__(self, attribute: str, classes: Sequence[str], weights: str | None,
                 device: str = "cpu", batch_size: int = 64, faces: Any = None) -> None:
        import torchvision

        if attribute not in FAIRFACE_GROUPS:
            raise ValueError(f"FairFace reads {sorted(FAIRFACE_GROUPS)}, not {attribute!r}")
        groups = FAIRFACE_GROUPS[attribute]
        unknown = [c for c in classes if c not in groups]
        if unknown:
            raise ValueError(f"FairFace {attribute} classes are {list(groups)}; got {unknown}")
        check_fairface_weights(weights)
        self.attribute, self.classes, self.groups = attribute, list(classes), groups
        self.device, self.batch_size = device, batch_size
        self.name = f"FairFace ResNet-34 ({attribute})"
        # icm.labeling.faces.FaceCropper: each image's largest face, aligned, is what FairFace sees;
        # None: the whole image. ``last_faces``: whether each image of the last call had one.
        self.faces = faces
        self.last_faces: np.ndarray | None = None
        if faces is not None:
            self.name += f" on face crops ({faces.name})"
        net = torchvision.models.resnet34(weights=None)
        net.fc = torch.nn.Linear(net.fc.in_features, 18)
        net.load_state_dict(load_state_dict(weights))
        self.net = net.to(device).eval()
        self.transform = torchvision.transforms.Compose([
            torchvision.transforms.Resize((224, 224)),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])

    @torch.no_grad()
    def raw_probabilities(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """Per-output-name probabilities of the chosen attribute's head."""
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.transform(im.convert("RGB"))
                                 for im in images[start:start + self.batch_size]])
            parts.append(self.net(batch.to(self.device)).float().cpu())
        logits = torch.cat(parts)
        head, names = {"race": (slice(0, 7), FAIRFACE_RACE),
                       "gender": (slice(7, 9), FAIRFACE_GENDER),
                       "age": (slice(9, 18), FAIRFACE_AGE)}[self.attribute]
        probs = torch.softmax(logits[:, head], dim=1).numpy()
        return {name: probs[:, k] for k, name in enumerate(names)}

    def _grouped(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities of the classes (N, K) and of the outside groups (N, G); NaN rows
        for images in which the face detector found no face."""
        found = np.ones(len(images), dtype=bool)
        if self.faces is not None:
            crops = self.faces.crop_many(images)
            found = np.array([c is not None for c in crops], dtype=bool)
            images = [c for c in crops if c is not None]
        self.last_faces = found
        if not len(images):
            return np.full((len(found), len(self.classes)), np.nan), np.zeros((len(found), 0))
        inside, outside = self._grouped_crops(images)
        if found.all():
            return inside, outside
        full_in = np.full((len(found), inside.shape[1]), np.nan)
        full_out = np.full((len(found), outside.shape[1]), np.nan)
        full_in[found], full_out[found] = inside, outside
        return full_in, full_out

    def _grouped_crops(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        probs = self.raw_probabilities(images)
        inside = np.stack([sum(probs[n] for n in self.groups[c]) for c in self.classes], axis=1)
        outside_groups = [members for name, members in FAIRFACE_GROUPS[self.attribute].items()
                          if name not in self.classes]
        covered = {n for members in FAIRFACE_GROUPS[self.attribute].values() for n in members}
        outside_groups += [(n,) for n in probs if n not in covered]
        outside = (np.stack([sum(probs[n] for n in g) for g in outside_groups], axis=1)
                   if outside_groups else np.zeros((len(inside), 0)))
        return inside, outside

    def scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        inside, outside = self._grouped(images)
        out = inside.copy()
        if outside.shape[1]:
            with np.errstate(invalid="ignore"):
                out[outside.max(axis=1) > inside.max(axis=1)] = np.nan
        return out

    def class_probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._grouped(images)[0]


def check_fairface_weights(weights: str | None) -> None:
    """Stop, naming the key to set, when the FairFace checkpoint is not where it is said."""
    if not weights or not Path(weights).is_file():
        raise LabelerNotAvailableError(
            f"FairFace weights not found at {weights!r}. Download "
            "res34_fair_align_multi_7_20190809.pt from the FairFace project on a machine "
            "with internet and set `labeler.weights` in config.yaml to its path.")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch state dict loaded with ``weights_only=True`` (no pickled code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in state.items()}


def make_labeler(spec: Mapping[str, Any], classes: Sequence[str], device: str = "cpu") -> Labeler:
    """The labeler a concept's ``labeler`` config names; weights are checked here, up front."""
    kind = spec.get("type", "clip")
    if kind == "oracle":
        return OracleLabeler(spec.get("attribute") or "color", classes)
    if kind == "pixel":
        return PixelLabeler(spec.get("attribute") or "lit_side", classes)
    if kind == "clip":
        return ClipLabeler(classes, spec.get("prompts"), spec.get("model", "ViT-L-14"),
                           spec.get("pretrained", "openai"), device=device,
                           checkpoint_tag=spec.get("checkpoint_tag"))
    if kind == "fairface":
        from icm.labeling.faces import make_cropper

        check_fairface_weights(spec.get("weights"))  # before any face worker is forked
        # face detection runs on the CPU cores torch was given (the job's ``threads:``), or
        # MTCNN's batches on the job's device
        faces = make_cropper(spec.get("face"), workers=torch.get_num_threads(), device=device)
        return FairFaceLabeler(spec.get("attribute") or "gender", classes, spec.get("weights"),
                               device=device, faces=faces)
    raise ValueError(f"unknown labeler type {kind!r}")


def label_images(
    samples: pd.DataFrame, image_root: str | Path, labeler: Labeler, margin: float = 0.0,
    batch_size: int = 256,
) -> pd.DataFrame:
    """``labels.csv`` rows: sample, per-class scores, label, margin, kept."""
    root = Path(image_root)
    scores, faces = [], []
    for start in range(0, len(samples), batch_size):
        paths = samples["image"].iloc[start:start + batch_size]
        images = [Image.open(root / p) for p in paths]
        scores.append(labeler.scores(images))
        faces.append(getattr(labeler, "last_faces", None))
    matrix = np.concatenate(scores) if scores else np.empty((0, len(labeler.classes)))
    table = label_table(samples, matrix, labeler, margin)
    if getattr(labeler, "faces", None) is not None and scores:
        table["face"] = np.concatenate(faces)  # False: no face found, so no label
    return table


def label_table(samples: pd.DataFrame, matrix: np.ndarray, labeler: Labeler,
                margin: float = 0.0) -> pd.DataFrame:
    """Labels from per-class scores (rows aligned with ``samples``): the best class where the
    scores are valid and it beats the second best by ``margin``, else an empty label."""
    table = pd.DataFrame({"sample": samples["sample"].to_numpy(),
                          "prompt_index": samples["prompt_index"].to_numpy()})
    for k, name in enumerate(labeler.classes):
        table[f"score_{name}"] = matrix[:, k]
    filled = np.nan_to_num(matrix, nan=-np.inf)
    ordered = np.sort(filled, axis=1)
    with np.errstate(invalid="ignore"):  # -inf - -inf: a row without scores, masked below
        gap = (ordered[:, -1] - ordered[:, -2] if matrix.shape[1] > 1
               else np.full(len(matrix), np.inf))
    valid = ~np.isnan(matrix).any(axis=1)
    best = filled.argmax(axis=1)
    kept = valid & (gap >= margin)
    table["label"] = np.where(kept, np.asarray(labeler.classes, dtype=object)[best], "")
    table["margin"] = np.where(valid, gap, np.nan)
    table["kept"] = kept
    table.attrs["labeler"] = labeler.name
    return table
