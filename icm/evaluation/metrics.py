"""Evaluation metrics: how fair, how faithful and how good are (steered) images?

* Fairness discrepancy (FD, paper appendix D): distance of the labelled class distribution from
  a reference (uniform by default), per prompt, averaged over prompts.
* Similarity: CLIP-I (a steered image against the original of the same seed) and CLIP-T (an
  image against its prompt), from embeddings of ``icm.models.clip.ClipEmbedder`` (QuickGELU for
  OpenAI's weights); in the toy world the
  ``ToyFeatureEmbedder`` stands in for CLIP's image tower and ``prompt_agreement`` (the pixel
  oracle against the prompt's words) for CLIP-T.
* FID through clean-fid, with its Inception features or the toy world's feature net.

Model-backed metrics check their weights up front and raise ``MetricBackendNotAvailableError``
(saying what to provide) before any image is read, so an offline run fails fast and clearly.
"""

from __future__ import annotations

import os
import platform
import shutil
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# CLIP lives in icm.models.clip (shared with the labeler); metric callers import it from here too.
from icm.models.clip import ClipEmbedder, MetricBackendNotAvailableError  # noqa: F401
from icm.models.clip import unit_rows as _unit_rows

#: Where clean-fid's Inception weights come from, and (``_inception_weights_path``) where its
#: ``InceptionV3W`` looks for them; kept beside the check so a test can point both elsewhere.
_INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    "inception-2015-12-05.pt"
)
_INCEPTION_FILE = "inception-2015-12-05.pt"
#: Seconds a socket may stall while fetching the Inception weights (clean-fid sets none).
_DOWNLOAD_TIMEOUT_S = 30.0
FID_BACKENDS: tuple[str, ...] = ("inception", "toy")


# --- fairness ------------------------------------------------------------------------------


def _unlabelled(label: object) -> bool:
    """'' is no label; so are None and NaN (what pandas reads from an empty CSV cell)."""
    return label is None or label == "" or (isinstance(label, float) and np.isnan(label))


def class_distribution(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Share of each class among labelled images (unlabelled ones ignored; none -> zeros).

    A label outside ``classes`` is an error, not silently dropped: it means the labeler and
    the metric disagree about the classes.
    """
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate classes in {classes}")
    index = {c: k for k, c in enumerate(classes)}
    counts = np.zeros(len(classes), dtype=np.float64)
    for label in labels:
        if _unlabelled(label):
            continue
        if label not in index:
            raise ValueError(f"label {label!r} is not one of the classes {classes}")
        counts[index[label]] += 1
    total = counts.sum()
    return counts / total if total else counts


def _reference_vector(classes: Sequence[str], reference: Mapping[str, float] | None) -> np.ndarray:
    """The reference distribution in ``classes`` order; uniform when none is given."""
    if reference is None:
        return np.full(len(classes), 1.0 / len(classes))
    if set(reference) != set(classes):
        raise ValueError(
            f"reference names {sorted(reference)}, but the classes are {sorted(classes)}")
    vector = np.array([float(reference[c]) for c in classes])
    if (vector < 0).any() or abs(vector.sum() - 1.0) > 1e-6:
        raise ValueError(f"reference must be a distribution (>= 0, sum 1), got {dict(reference)}")
    return vector


def fairness_discrepancy(
    labels: Sequence[str],
    prompts: Sequence[str],
    classes: Sequence[str],
    reference: Mapping[str, float] | None = None,
) -> tuple[float, dict[str, float]]:
    """FD (paper appendix D): mean over prompts of ||p_prompt - p_reference||_2.

    ``labels[i]`` is the label of the image made from ``prompts[i]``. Per prompt, so that one
    prompt's surplus cannot cancel another's deficit. A prompt with no labelled image has no
    distribution: its FD is NaN and it is left out of the mean (NaN if no prompt has one).
    Returns (mean, {prompt: fd}) with prompts in order of first appearance.
    """
    if len(labels) != len(prompts):
        raise ValueError(f"{len(labels)} labels but {len(prompts)} prompts")
    if not classes:
        raise ValueError("no classes")
    target = _reference_vector(classes, reference)
    groups: dict[str, list[str]] = {}
    for label, prompt in zip(labels, prompts):
        groups.setdefault(prompt, []).append(label)
    per_prompt = {}
    for prompt, group in groups.items():
        dist = class_distribution(group, classes)
        per_prompt[prompt] = float(np.linalg.norm(dist - target)) if dist.sum() else float("nan")
    values = [v for v in per_prompt.values() if not np.isnan(v)]
    return (float(np.mean(values)) if values else float("nan")), per_prompt


def fairness_discrepancy_from_probabilities(
    probabilities: np.ndarray,
    prompts: Sequence[str],
    classes: Sequence[str],
    reference: Mapping[str, float] | None = None,
) -> tuple[float, dict[str, float]]:
    """FD as the paper's evaluation computes it: per prompt, ||mean class probability -
    reference||_2 over every image with probabilities, then the mean over prompts. The class
    probabilities are used as they are (FairFace race: they need not sum to 1). A NaN row
    (an image in which no face was found) has no probabilities and is left out; a prompt
    with none left has NaN FD and is left out of the mean (counted by the callers)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(prompts), len(classes)):
        raise ValueError(f"probabilities of shape {probabilities.shape}, expected "
                         f"({len(prompts)}, {len(classes)})")
    target = _reference_vector(classes, reference)
    order = list(dict.fromkeys(prompts))
    prompts = np.asarray(prompts, dtype=object)
    scored = ~np.isnan(probabilities).any(axis=1)
    per_prompt = {}
    for p in order:
        rows = probabilities[(prompts == p) & scored]
        per_prompt[p] = float(np.linalg.norm(rows.mean(axis=0) - target)) if len(rows) \
            else float("nan")
    values = [v for v in per_prompt.values() if not np.isnan(v)]
    return (float(np.mean(values)) if values else float("nan")), per_prompt


def draw_floor(
    targets: Sequence[str],
    prompts: Sequence[str],
    classes: Sequence[str],
    reference: Mapping[str, float] | None = None,
) -> float:
    """The FD perfect steering would reach with these batch targets: every image labelled
    (with certainty) as its batch's target, then FD as ``fairness_discrepancy`` computes it.

    Steering draws one target per batch, so the realised targets of a prompt's few batches
    are off the reference by chance; no steering, however good, goes below this. NaN where an
    image has no target (the original's or a LoRA's images are not steered toward one)."""
    if len(targets) == 0 or any(_unlabelled(t) for t in targets):
        return float("nan")
    return fairness_discrepancy(list(targets), list(prompts), classes, reference)[0]


# --- similarity ----------------------------------------------------------------------------


def paired_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of ``a`` with row i of ``b``, per row (rows need not be
    normalised)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"need two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("no rows to compare")
    return np.sum(_unit_rows(a) * _unit_rows(b), axis=1, dtype=np.float64)


def paired_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of row i of ``a`` with row i of ``b``.

    CLIP-I uses it with steered vs original images of the same seed: how much steering changed
    the picture beyond the chosen attribute.
    """
    return float(np.mean(paired_cosines(a, b)))


def clip_t(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """CLIP-T: mean cosine of each image with its own prompt's text embedding (rows aligned).

    The scaling used is the raw cosine in [-1, 1]: no x100 and no clipping at 0 (CLIPScore's
    ``2.5 * max(cos, 0)`` and the x100 convention are affine in it, so comparisons carry over).
    """
    return paired_cosine(image_embeddings, text_embeddings)


def _load_toy_net(path: str | Path, device: str) -> torch.nn.Module:
    """The toy feature net, or MetricBackendNotAvailableError naming how to make it."""
    from icm.toy.features import load_feature_net

    path = Path(path)
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise MetricBackendNotAvailableError(
            f"toy feature net not found at {path} (needs it and its .json sidecar). Train it "
            "with the workflow's `train_toy_features` rule or point `toy.features.path` in "
            "config.yaml at resources/models/toy-features.safetensors.")
    return load_feature_net(path, device=device)


def _toy_size(net: torch.nn.Module) -> int:
    """The image size the toy net was trained at (from its sidecar)."""
    return int(getattr(net, "info", {}).get("world_config", {}).get("image_size", 16))


def _toy_resizer(size: int) -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's own "clean" resize (PIL bicubic per float channel, antialiased when
    shrinking, no quantisation), but to the toy net's size instead of Inception's 299.

    uint8 (H, W, 3) -> float32 (size, size, 3) in [0, 255]; PIL returns same-size images
    unchanged, so 16-px toy images reach the net exactly as rendered.
    """
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", False, "bicubic", (size, size))


class ToyFeatureEmbedder:
    """The toy world's feature CNN as an image embedder (CLIP-I stand-in there).

    With ``neutral`` (an attribute, ``color`` or ``shape``) each image is first
    neutralised (``icm.toy.oracle.neutralise``): the features encode colour and shape
    explicitly, so a pure colour flip of one scene scores 0.72 on raw features and 1.0 on
    colour-neutralised ones; the similarity then counts what steering the attribute
    changed besides it, the damage CLIP-I is meant to measure."""

    def __init__(self, path: str | Path, device: str = "cpu", neutral: str | None = None) -> None:
        self.net = _load_toy_net(path, device)
        self.size = _toy_size(self.net)
        self.resize = _toy_resizer(self.size)
        self.neutral = neutral
        self.name = "toy features" + (f", {neutral} neutralised" if neutral else "")

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) unit-norm pooled features; images of another size are resized to the net's."""
        from icm.toy.features import extract_features
        from icm.toy.oracle import neutralise

        pixels = np.zeros((len(images), self.size, self.size, 3), np.float32)
        for i, image in enumerate(images):
            rgb = np.asarray(image.convert("RGB"))
            pixels[i] = self.resize(neutralise(rgb, self.neutral) if self.neutral else rgb)
        return _unit_rows(extract_features(self.net, pixels / np.float32(255.0)))


def prompt_agreement(prompts: Sequence[str], images: Sequence[Image.Image]) -> float:
    """Toy-world text alignment: share of images whose oracle-read shape and colour agree with
    every attribute their prompt names (a prompt naming none agrees with any image).

    The pixel oracle is ground truth in the toy world, where CLIP knows nothing of 16-px shapes.
    """
    from icm.toy.oracle import oracle_label
    from icm.toy.world import prompt_attributes

    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    if not prompts:
        raise ValueError("no images")
    agree = 0
    for prompt, image in zip(prompts, images):
        label = oracle_label(np.asarray(image.convert("RGB")))
        named = {k: v for k, v in prompt_attributes(prompt).items() if v is not None}
        agree += all(getattr(label, k) == v for k, v in named.items())
    return agree / len(prompts)


# --- FID -----------------------------------------------------------------------------------


def _inception_weights_path() -> Path:
    """Where clean-fid's InceptionV3W looks for (and downloads) its weights."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / _INCEPTION_FILE


def _ensure_inception_weights() -> Path:
    """clean-fid's Inception weights, fetched now if missing (with a timeout, atomically).

    clean-fid would download them itself mid-run, with no timeout and leaving a partial file on
    failure; fetching first makes an offline run fail at once, before any image is read.
    """
    path = _inception_weights_path()
    if path.is_file() and path.stat().st_size > 0:
        return path
    partial = path.with_name(f"{path.name}.partial{os.getpid()}")
    try:
        with urllib.request.urlopen(_INCEPTION_URL, timeout=_DOWNLOAD_TIMEOUT_S) as response, \
                open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(partial, path)
    except OSError as error:  # URLError, timeouts and disk errors are all OSErrors
        partial.unlink(missing_ok=True)
        raise MetricBackendNotAvailableError(
            f"clean-fid's Inception weights are not at {path} and could not be downloaded "
            f"({error}). On a machine with internet download {_INCEPTION_URL} and copy it to "
            f"{path}, or use backend 'toy' in the toy world.") from error
    return path


def _image_count(path: Path) -> int:
    """Images clean-fid would read from a folder (recursively) or a .zip."""
    from cleanfid.utils import EXTENSIONS

    if path.is_file() and path.suffix == ".zip":
        names = zipfile.ZipFile(path).namelist()
    else:
        names = [str(p) for p in path.rglob("*")]
    return sum(os.path.splitext(n)[1][1:] in EXTENSIONS for n in names)


def _is_image_set(path: Path) -> bool:
    return path.is_dir() or (path.is_file() and path.suffix == ".zip")


def _check_image_set(path: Path, what: str) -> None:
    """FID needs a covariance, so at least two images."""
    if not _is_image_set(path):
        raise FileNotFoundError(f"{what} {path} is not a folder (or .zip) of images")
    n = _image_count(path)
    if n < 2:
        raise ValueError(f"{what} {path} holds {n} images; FID needs at least 2")


class _ToyFidExtractor:
    """clean-fid ``custom_feat_extractor``: (N, 3, S, S) float in [0, 255] -> (N, D) features.

    S is the toy net's size because ``compute_fid`` hands clean-fid ``_toy_resizer`` as
    ``custom_fn_resize``; anything else (another caller) is resized here with antialiasing.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.size = net, _toy_size(net)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float()
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bicubic", antialias=True).clamp(0, 255)
        return self.net.forward_features(x / 127.5 - 1.0)


def _stats_name(reference: str | Path, backend: str) -> str:
    """``reference`` as the name of clean-fid custom statistics (must already exist)."""
    from cleanfid.fid import test_stats_exists

    name = str(reference)
    if backend != "inception":
        raise FileNotFoundError(
            f"reference {name!r} is not a folder of images; backend {backend!r} compares against "
            "a folder (clean-fid custom statistics hold Inception features only)")
    if not test_stats_exists(name.lower(), "clean"):  # make_custom_stats lower-cases names
        raise FileNotFoundError(
            f"reference {name!r} is neither a folder of images nor clean-fid custom statistics "
            "(make them with cleanfid.fid.make_custom_stats(name, folder, mode='clean'))")
    return name


#: Where clean-fid's precomputed reference statistics are published (FFHQ, CIFAR, ...).
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"


def _clean_fid_options(backend: str, toy_features: str | Path | None,
                       device: str) -> dict[str, Any]:
    """clean-fid's options for a backend: its feature extractor and resize (or none)."""
    if backend == "toy":
        if toy_features is None:
            raise ValueError("backend 'toy' needs `toy_features`, the toy feature net's path")
        net = _load_toy_net(toy_features, device)
        return {"custom_feat_extractor": _ToyFidExtractor(net),
                "custom_fn_resize": _toy_resizer(_toy_size(net))}
    _ensure_inception_weights()
    return {}


def _folder_statistics(folder: Path, backend: str, toy_features: str | Path | None,
                       device: str, batch_size: int,
                       num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the backend's features of the images in ``folder``, as clean-fid
    computes them for a reference."""
    from cleanfid import fid

    options = _clean_fid_options(backend, toy_features, device)
    model = options.get("custom_feat_extractor") or fid.build_feature_extractor(
        "clean", torch.device(device), use_dataparallel=False)
    features = fid.get_folder_features(
        str(folder), model, num_workers=num_workers, batch_size=batch_size,
        device=torch.device(device), mode="clean",
        custom_fn_resize=options.get("custom_fn_resize"), verbose=False)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def read_fid_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a clean-fid statistics file (``.npz`` with ``mu`` and ``sigma``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID statistics {path} not found. clean-fid's precomputed ones are published at "
            f"{CLEANFID_STATS_URL} (FFHQ at 1024 px in clean mode: "
            "ffhq_clean_trainval70k_1024.npz): download the file on a machine with internet "
            "and give its local path; or write statistics of a folder with "
            "icm.evaluation.metrics.write_fid_statistics")
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} holds {sorted(data)}, not clean-fid statistics (mu, sigma)")
        mu, sigma = data["mu"], data["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not match")
    return mu, sigma


def write_fid_statistics(folder: str | Path, output: str | Path, *, backend: str = "inception",
                         toy_features: str | Path | None = None, device: str = "cpu",
                         batch_size: int = 64, num_workers: int = 0) -> Path:
    """Write the (mu, sigma) of ``folder``'s features as a clean-fid statistics file, so that
    later FIDs against it read no reference image."""
    folder = Path(folder)
    _check_image_set(folder, "image folder")
    mu, sigma = _folder_statistics(folder, backend, toy_features, device, batch_size,
                                   num_workers)
    output = Path(output)
    np.savez(output, mu=mu, sigma=sigma)
    return output


def compute_fid(
    folder: str | Path,
    reference: str | Path,
    *,
    backend: str = "inception",
    toy_features: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
) -> float:
    """FID of the images in ``folder`` against ``reference``, computed by clean-fid.

    ``reference`` is a folder (or .zip) of images, a statistics file (``.npz`` with ``mu`` and
    ``sigma`` of the backend's features: clean-fid's precomputed FFHQ statistics, or
    ``write_fid_statistics``), or the name of clean-fid custom statistics
    (``cleanfid.fid.make_custom_stats``; Inception backend only). Everything is checked before
    any image is read: folders, statistics and weights.

    * ``backend="inception"``: clean-fid's "clean" mode (PIL bicubic resize to 299, Inception
      pool features). Its weights are fetched first if missing; offline that raises
      ``MetricBackendNotAvailableError`` saying where to put them.
    * ``backend="toy"``: the toy feature net at ``toy_features``. clean-fid would upsample
      16-px images to 299 (``ResizeDataset`` then hands the extractor float (N, 3, 299, 299) in
      [0, 255]), a size the net never saw; instead clean-fid's own ``custom_fn_resize`` option
      gets its clean PIL-bicubic resizer aimed at the net's training size, so toy images pass
      through unchanged and larger ones are antialiased down, as ``ToyFeatureEmbedder`` does.
    """
    if backend not in FID_BACKENDS:
        raise ValueError(f"unknown FID backend {backend!r}; known: {FID_BACKENDS}")
    folder = Path(folder)
    _check_image_set(folder, "image folder")
    if str(reference).endswith(".npz"):  # precomputed statistics, e.g. clean-fid's FFHQ
        mu, sigma = read_fid_statistics(reference)
        own_mu, own_sigma = _folder_statistics(folder, backend, toy_features, device,
                                               batch_size, num_workers)
        if len(own_mu) != len(mu):
            raise ValueError(f"{reference} holds statistics of {len(mu)} features, but backend "
                             f"{backend!r} gives {len(own_mu)}")
        from cleanfid import fid

        return float(fid.frechet_distance(own_mu, own_sigma, mu, sigma))
    if _is_image_set(Path(reference)):
        _check_image_set(Path(reference), "reference folder")
        reference_folder, stats = str(reference), None
    else:
        reference_folder, stats = None, _stats_name(reference, backend)
    options = _clean_fid_options(backend, toy_features, device)
    from cleanfid import fid

    score = fid.compute_fid(
        str(folder), reference_folder, mode="clean", num_workers=num_workers,
        batch_size=batch_size, device=torch.device(device), verbose=False,
        use_dataparallel=False, **({"dataset_name": stats, "dataset_split": "custom"}
                                   if stats else {}), **options)
    return float(score)
