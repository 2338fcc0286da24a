"""The toy world: deterministic sampling, planted biases, the pixel oracle, the feature net."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from icm.toy.features import (
    ToyFeatureNet,
    extract_features,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from icm.toy.oracle import (
    foreground_mask,
    labels_table,
    neutralise,
    oracle_label,
    oracle_labels,
)
from icm.toy.world import (
    BACKGROUND,
    COLORS,
    SHAPES,
    VOCABULARY,
    Scene,
    WorldConfig,
    caption,
    degrade,
    make_dataset,
    prompt_attributes,
    render,
    shape_mask,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def big() -> object:
    return make_dataset(5000, seed=1)


@pytest.fixture(scope="module")
def oracle_set() -> object:
    return make_dataset(600, seed=123)


def test_make_dataset_is_deterministic_by_seed() -> None:
    a, b, c = make_dataset(64, 7), make_dataset(64, 7), make_dataset(64, 8)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions and a.scenes == b.scenes
    assert not np.array_equal(a.images, c.images)
    longer = make_dataset(128, 7)  # sample i does not depend on n
    assert np.array_equal(longer.images[:64], a.images) and longer.captions[:64] == a.captions
    assert a.images.dtype == np.uint8 and a.images.shape == (64, 16, 16, 3)


def test_config_validates_and_round_trips() -> None:
    config = WorldConfig(image_size=24, max_size=20, caption_probs={"full": 0.5, "none": 0.5})
    assert WorldConfig.from_json(config.to_json()) == config
    assert hash(WorldConfig.from_json(config.to_json())) == hash(config) != hash(WorldConfig())
    assert WorldConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="sum to"):
        WorldConfig(caption_probs={"full": 0.5, "none": 0.4})
    with pytest.raises(ValueError, match="unknown"):
        WorldConfig(color_given_shape={**WorldConfig().color_given_shape, "circle": {"pink": 1.0}})
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(max_size=17)


def test_planted_biases_show_up(big) -> None:
    pairs = Counter(zip(big.shapes, big.colors))
    shapes = Counter(big.shapes)
    assert abs(pairs["circle", "red"] / shapes["circle"] - 0.8) < 0.05
    assert abs(pairs["square", "blue"] / shapes["square"] - 0.8) < 0.05
    for color in COLORS:
        assert abs(pairs["triangle", color] / shapes["triangle"] - 1 / 3) < 0.05
    for shape in SHAPES:
        assert abs(shapes[shape] / len(big) - 1 / 3) < 0.03
    kinds = Counter(big.caption_kinds)
    for kind, p in WorldConfig().caption_probs.items():
        assert abs(kinds[kind] / len(big) - p) < 0.03


def test_captions_match_kinds_and_attributes(big) -> None:
    words = set()
    for text, kind, scene in zip(big.captions, big.caption_kinds, big.scenes):
        assert text == caption(scene, kind)
        attrs = prompt_attributes(text)
        assert attrs["shape"] == (scene.shape if kind in ("full", "shape") else None)
        assert attrs["color"] == (scene.color if kind in ("full", "color") else None)
        words.update(text.split())
    assert words == set(VOCABULARY)
    scene = Scene("circle", "red", 8.0, 8.0, 10)
    assert [caption(scene, k) for k in ("full", "shape", "color", "none")] == [
        "a red circle", "a circle", "a red shape", "a shape",
    ]  # fmt: skip


def test_shapes_lie_inside_the_image(big) -> None:
    config = WorldConfig()
    for scene, image in zip(big.scenes[:1000], big.images[:1000]):
        half = scene.size / 2
        assert config.min_size <= scene.size <= config.max_size
        assert (
            half <= scene.cx <= config.image_size - half
            and half <= scene.cy <= config.image_size - half
        )
        # The same shape on a larger canvas loses no pixel to the border.
        big_mask = shape_mask(scene.shape, scene.cx + 8, scene.cy + 8, scene.size, 32)
        assert big_mask[8:24, 8:24].sum() == big_mask.sum() > 0
        fg = np.any(image != np.array(BACKGROUND, dtype=np.uint8), axis=-1)
        assert np.array_equal(fg, shape_mask(scene.shape, scene.cx, scene.cy, scene.size, 16))
    assert np.array_equal(render(big.scenes[0], 16), big.images[0])


def test_prompt_attributes() -> None:
    assert prompt_attributes("a red circle") == {"shape": "circle", "color": "red"}
    assert prompt_attributes("A Blue shape") == {"shape": None, "color": "blue"}
    assert prompt_attributes("two green triangles") == {"shape": "triangle", "color": "green"}
    assert prompt_attributes("a shape") == {"shape": None, "color": None}
    assert prompt_attributes("a photo of a dog") == {"shape": None, "color": None}


def _accuracy(labels, data) -> tuple[float, float]:
    color = np.mean([lab.color == c for lab, c in zip(labels, data.colors)])
    shape = np.mean([lab.shape == s for lab, s in zip(labels, data.shapes)])
    return float(color), float(shape)


def test_oracle_on_clean_images(oracle_set) -> None:
    labels = oracle_labels(oracle_set.images)
    color, shape = _accuracy(labels, oracle_set)
    assert color == 1.0 and shape >= 0.97
    table = labels_table(labels)
    assert (
        table["shape"] == [lab.shape for lab in labels] and len(table["shape_score_circle"]) == 600
    )
    # A clean image is its own template: the right shape fits (almost) exactly.
    assert np.median([lab.shape_scores[lab.shape] for lab in labels]) > 0.95


def test_oracle_on_degraded_images(oracle_set) -> None:
    rng = np.random.default_rng(0)
    degraded = degrade(oracle_set.images, rng, blur_sigma=0.6, noise_std=12.0, max_shift=25.0)
    color, shape = _accuracy(oracle_labels(degraded), oracle_set)
    assert color >= 0.99 and shape >= 0.90


def test_oracle_edge_cases(oracle_set) -> None:
    image = oracle_set.images[0]
    as_float, as_uint8 = oracle_label(image.astype(np.float32) / 255.0), oracle_label(image)
    assert (as_float.color, as_float.shape) == (as_uint8.color, as_uint8.shape)
    assert as_float.shape_scores == pytest.approx(as_uint8.shape_scores)
    blank = np.full((16, 16, 3), BACKGROUND, dtype=np.uint8)
    empty = oracle_label(blank)
    assert (empty.color, empty.shape, empty.fg_fraction) == ("none", "none", 0.0)
    assert not foreground_mask(blank).any()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        oracle_label(image.astype(np.float32) / 127.5 - 1.0)


@pytest.fixture(scope="module")
def quick_net() -> ToyFeatureNet:
    return train_feature_net(
        n_train=2000, steps=150, batch_size=64, n_eval=500, seed=0, progress=False
    )


def test_feature_net_learns_quickly(quick_net) -> None:
    acc = quick_net.info["accuracies"]["clean"]
    assert acc["color"] > 0.9 and acc["shape"] > 0.6
    assert sum(p.numel() for p in quick_net.parameters()) < 100_000


def test_feature_net_save_load_round_trip(quick_net, oracle_set, tmp_path) -> None:
    path = tmp_path / "features.safetensors"
    save_feature_net(quick_net, path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert WorldConfig.from_dict(sidecar["world_config"]) == WorldConfig()
    assert sidecar["torch_version"] == torch.__version__ and "accuracies" in sidecar
    loaded = load_feature_net(path)
    images = oracle_set.images[:100]
    feats = extract_features(quick_net, images, batch=32)
    assert feats.shape == (100, 64) and feats.dtype == np.float32
    assert np.array_equal(feats, extract_features(loaded, images))
    assert loaded.info["accuracies"] == quick_net.info["accuracies"]
    # Larger worlds work too (global pooling, coordinate channels built per input size).
    wide = make_dataset(8, 0, WorldConfig(image_size=32, max_size=28)).images
    assert extract_features(loaded, wide).shape == (8, 64)


def test_feature_net_training_is_deterministic() -> None:
    def run() -> ToyFeatureNet:
        return train_feature_net(n_train=300, steps=5, batch_size=16, n_eval=50, progress=False)

    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_neutralising_an_attribute_hides_it_and_nothing_else() -> None:
    import dataclasses

    scene = Scene("circle", "red", 8.0, 7.5, 11)
    recoloured = dataclasses.replace(scene, color="blue")
    reshaped = dataclasses.replace(scene, shape="square")
    moved = dataclasses.replace(scene, cx=5.0)
    image = render(scene, 16)
    assert np.array_equal(neutralise(image, "color"), neutralise(render(recoloured, 16), "color"))
    assert np.array_equal(neutralise(image, "shape"), neutralise(render(reshaped, 16), "shape"))
    # what the attribute does not cover still shows: position, and the other attribute
    assert not np.array_equal(neutralise(image, "color"), neutralise(render(moved, 16), "color"))
    assert not np.array_equal(neutralise(image, "shape"),
                              neutralise(render(recoloured, 16), "shape"))
    assert not np.array_equal(neutralise(image, "color"), neutralise(render(reshaped, 16), "color"))
    # lit_side (where the shape sits): a shape moved by whole pixels looks the same, its
    # colour still shows
    shifted = dataclasses.replace(scene, cx=6.0, cy=8.5)
    assert np.array_equal(neutralise(image, "lit_side"),
                          neutralise(render(shifted, 16), "lit_side"))
    assert not np.array_equal(neutralise(image, "lit_side"),
                              neutralise(render(recoloured, 16), "lit_side"))
    with pytest.raises(ValueError, match="neutralise"):
        neutralise(image, "size")
