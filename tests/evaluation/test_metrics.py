"""Metrics: FD and cosines against hand-computed answers; embedders and FID on toy images;
missing weights fail up front."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icm.evaluation import metrics
from icm.evaluation.metrics import (
    ClipEmbedder,
    MetricBackendNotAvailableError,
    ToyFeatureEmbedder,
    class_distribution,
    clip_t,
    compute_fid,
    fairness_discrepancy,
    fairness_discrepancy_from_probabilities,
    paired_cosine,
    prompt_agreement,
)
from icm.toy.world import Scene, make_dataset, render

pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")

TOY_FEATURES = Path(__file__).parents[2] / "resources/models/toy-features.safetensors"
CLASSES = ["woman", "man"]


def scenes(shape: str, color: str, n: int) -> list[Image.Image]:
    """n images of one shape and colour at varied positions and sizes."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        size = int(rng.integers(8, 15))
        cx, cy = rng.uniform(size / 2, 16 - size / 2, 2)
        out.append(Image.fromarray(render(Scene(shape, color, cx, cy, size), 16)))
    return out


# --- fairness ------------------------------------------------------------------------------


def test_class_distribution_ignores_unlabelled_and_rejects_unknown():
    np.testing.assert_allclose(class_distribution(["man", "", "man", "woman"], CLASSES),
                               [1 / 3, 2 / 3])
    np.testing.assert_array_equal(class_distribution(["", ""], CLASSES), [0.0, 0.0])
    with pytest.raises(ValueError, match="cat"):
        class_distribution(["cat"], CLASSES)


def test_fd_balanced_is_zero_and_one_class_is_sqrt_half():
    mean, per = fairness_discrepancy(["woman", "man"] * 3, ["p"] * 6, CLASSES)
    assert mean == pytest.approx(0.0) and per == {"p": pytest.approx(0.0)}
    mean, _ = fairness_discrepancy(["man"] * 4, ["p"] * 4, CLASSES)
    assert mean == pytest.approx(math.sqrt(0.5))


def test_fd_is_computed_per_prompt_then_averaged():
    # Pooled, these 8 images are balanced (FD 0); per prompt they are not.
    labels = ["man"] * 4 + ["woman", "woman", "woman", "man"]
    prompts = ["a"] * 4 + ["b"] * 4
    mean, per = fairness_discrepancy(labels, prompts, CLASSES)
    expected_b = math.hypot(0.75 - 0.5, 0.25 - 0.5)
    assert per == {"a": pytest.approx(math.sqrt(0.5)), "b": pytest.approx(expected_b)}
    assert mean == pytest.approx((math.sqrt(0.5) + expected_b) / 2)


def test_fd_custom_reference_and_bad_references():
    mean, _ = fairness_discrepancy(["man", "man", "man", "woman"], ["p"] * 4, CLASSES,
                                   reference={"man": 0.75, "woman": 0.25})
    assert mean == pytest.approx(0.0)
    for bad in ({"man": 0.6, "woman": 0.6}, {"man": 1.0}, {"man": 0.5, "woman": 0.25, "x": 0.25},
                {"man": 1.5, "woman": -0.5}):
        with pytest.raises(ValueError):
            fairness_discrepancy(["man"], ["p"], CLASSES, reference=bad)


def test_fd_from_mean_probabilities_per_prompt():
    """The paper's FD: the mean probability per prompt against uniform, then the mean."""
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5], [0.5, 0.5]])
    mean, per = fairness_discrepancy_from_probabilities(probs, ["a", "a", "b", "b"], CLASSES)
    assert per == pytest.approx({"a": np.sqrt(2) * 0.3, "b": 0.0})
    assert mean == pytest.approx(np.sqrt(2) * 0.15)
    with pytest.raises(ValueError, match="shape"):
        fairness_discrepancy_from_probabilities(probs[:, :1], ["a"] * 4, CLASSES)


def test_fd_ignores_empty_labels():
    with_empty = fairness_discrepancy(["man", "", "woman", ""], ["p"] * 4, CLASSES)
    assert with_empty[0] == pytest.approx(0.0)
    # A prompt with no labelled image has no FD and does not drag the mean.
    mean, per = fairness_discrepancy(["man", "", ""], ["a", "b", "b"], CLASSES)
    assert math.isnan(per["b"]) and mean == pytest.approx(math.sqrt(0.5))


# --- similarity ----------------------------------------------------------------------------


def test_paired_cosine_and_clip_t_on_known_vectors():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    b = np.array([[5.0, 0.0], [0.0, -1.0], [1.0, 0.0]])  # cosines 1, -1, 1/sqrt(2)
    assert paired_cosine(a, b) == pytest.approx((1 - 1 + 1 / math.sqrt(2)) / 3)
    assert clip_t(a, b) == pytest.approx(paired_cosine(a, b))  # raw cosine: no x100, no clip
    assert paired_cosine(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        paired_cosine(a, b[:2])


def test_clip_embedder_random_weights():
    torch.manual_seed(0)
    embedder = ClipEmbedder("ViT-S-32-alt", pretrained=None)  # the smallest open_clip model
    images = scenes("circle", "red", 2) + scenes("square", "blue", 1)
    image_emb = embedder.embed_images(images + images[:1])
    text_emb = embedder.embed_texts(["a red circle", "a blue square"])
    assert image_emb.shape == (4, text_emb.shape[1]) and text_emb.shape[0] == 2
    assert image_emb.dtype == np.float32 and text_emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, rtol=1e-5)
    assert paired_cosine(image_emb[:1], image_emb[3:]) == pytest.approx(1.0, abs=1e-5)
    assert "ViT-S-32-alt" in embedder.name


def test_clip_embedder_missing_checkpoint_fails_up_front():
    with pytest.raises(MetricBackendNotAvailableError, match="pretrained"):
        ClipEmbedder("ViT-S-32-alt", pretrained="/nowhere/clip.bin")


def test_toy_embedder_separates_red_circles_from_blue_squares():
    embedder = ToyFeatureEmbedder(TOY_FEATURES)
    red = embedder.embed_images(scenes("circle", "red", 8))
    blue = embedder.embed_images(scenes("square", "blue", 8))
    np.testing.assert_allclose(np.linalg.norm(red, axis=1), 1.0, rtol=1e-5)
    within = (red @ red.T)[np.triu_indices(8, 1)].mean()
    across = (red @ blue.T).mean()
    assert within > across + 0.1
    # Larger images are resized to the net's 16 px (unresized, a 4x upscale scores ~0.8).
    big = [im.resize((64, 64), Image.NEAREST) for im in scenes("circle", "red", 8)]
    assert paired_cosine(embedder.embed_images(big), red) > 0.99
    assert embedder.name == "toy features"


def test_toy_embedder_missing_weights():
    with pytest.raises(MetricBackendNotAvailableError, match="train_toy_features"):
        ToyFeatureEmbedder("/nowhere/toy-features.safetensors")


def test_prompt_agreement_reads_the_oracle():
    circles = scenes("circle", "red", 4)
    assert prompt_agreement(["a red circle"] * 4, circles) == 1.0
    assert prompt_agreement(["a blue square"] * 4, circles) == 0.0
    assert prompt_agreement(["a shape"] * 4, circles) == 1.0
    assert prompt_agreement(["a red square", "a circle", "a blue shape", "a shape"],
                            circles) == 0.5
    with pytest.raises(ValueError):
        prompt_agreement(["a shape"], circles)


# --- FID -----------------------------------------------------------------------------------


def save_folder(root: Path, images: np.ndarray, scale: int = 1) -> Path:
    root.mkdir()
    for i, image in enumerate(images):
        im = Image.fromarray(image)
        if scale > 1:
            im = im.resize((16 * scale, 16 * scale), Image.NEAREST)
        im.save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def fid_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    n = 80  # more images than the 64 feature dimensions: a full-rank covariance
    pool = make_dataset(8 * n, seed=3)
    colors = np.array(pool.colors)
    return {
        "a": save_folder(root / "a", make_dataset(n, seed=1).images),
        "b": save_folder(root / "b", make_dataset(n, seed=2).images),
        "a_big": save_folder(root / "a_big", make_dataset(n, seed=1).images, scale=4),
        "red": save_folder(root / "red", pool.images[colors == "red"][:n]),
        "blue": save_folder(root / "blue", pool.images[colors == "blue"][:n]),
    }


def toy_fid(folder: Path, reference: Path) -> float:
    return compute_fid(folder, reference, backend="toy", toy_features=TOY_FEATURES)


def test_toy_fid_ranks_distributions(fid_folders):
    same = toy_fid(fid_folders["a"], fid_folders["b"])
    different = toy_fid(fid_folders["red"], fid_folders["blue"])
    assert 0 < same < different / 5
    assert abs(toy_fid(fid_folders["a"], fid_folders["a"])) < 1e-3
    # Larger images are brought down to the net's 16 px.
    assert toy_fid(fid_folders["a_big"], fid_folders["a"]) < same


def test_toy_fid_sees_the_images_as_rendered(fid_folders):
    """clean-fid would upsample to 299 px; the net must get the 16-px pixels untouched."""
    from cleanfid.fid import fid_from_feats

    from icm.toy.features import extract_features, load_feature_net

    net = load_feature_net(TOY_FEATURES)

    def features(folder: Path) -> np.ndarray:
        return extract_features(net, np.stack(
            [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]))

    expected = fid_from_feats(features(fid_folders["a"]), features(fid_folders["b"]))
    assert toy_fid(fid_folders["a"], fid_folders["b"]) == pytest.approx(expected, rel=1e-4)


def test_fid_against_a_statistics_file_equals_fid_against_its_folder(fid_folders, tmp_path):
    """A local .npz of (mu, sigma), as clean-fid publishes for FFHQ, stands for the reference
    folder it was computed from; a missing file says where such statistics come from."""
    from icm.evaluation.metrics import write_fid_statistics

    stats = write_fid_statistics(fid_folders["b"], tmp_path / "b.npz", backend="toy",
                                 toy_features=TOY_FEATURES)
    assert toy_fid(fid_folders["a"], stats) == pytest.approx(
        toy_fid(fid_folders["a"], fid_folders["b"]), rel=1e-6)
    with pytest.raises(FileNotFoundError, match="ffhq_clean_trainval70k_1024.npz"):
        toy_fid(fid_folders["a"], tmp_path / "ffhq.npz")
    np.savez(tmp_path / "narrow.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="statistics of 3 features, but backend 'toy' gives 64"):
        toy_fid(fid_folders["a"], tmp_path / "narrow.npz")


def test_fid_checks_inputs_before_work(fid_folders, tmp_path):
    with pytest.raises(ValueError, match="backend"):
        compute_fid(fid_folders["a"], fid_folders["b"], backend="clip")
    with pytest.raises(ValueError, match="toy_features"):
        compute_fid(fid_folders["a"], fid_folders["b"], backend="toy")
    (tmp_path / "one").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "one" / "x.png")
    with pytest.raises(ValueError, match="at least 2"):
        toy_fid(tmp_path / "one", fid_folders["a"])
    with pytest.raises(FileNotFoundError, match="custom statistics"):
        compute_fid(fid_folders["a"], "no_such_stats_icm_test")
    with pytest.raises(MetricBackendNotAvailableError):
        compute_fid(fid_folders["a"], fid_folders["b"], backend="toy",
                    toy_features=tmp_path / "missing.safetensors")


def test_inception_fid_offline_without_weights_fails_fast(fid_folders, tmp_path, monkeypatch):
    from cleanfid import fid

    # An empty cache and an unreachable source: what an offline machine sees.
    monkeypatch.setattr(metrics, "_inception_weights_path", lambda: tmp_path / "inception.pt")
    monkeypatch.setattr(metrics, "_INCEPTION_URL", (tmp_path / "absent.pt").as_uri())
    monkeypatch.setattr(fid, "compute_fid", lambda *a, **k: pytest.fail("clean-fid was run"))
    start = time.perf_counter()
    with pytest.raises(MetricBackendNotAvailableError, match="inception.pt"):
        compute_fid(fid_folders["a"], fid_folders["b"], backend="inception")
    assert time.perf_counter() - start < 5
    assert list(tmp_path.iterdir()) == []  # no partial download left behind
