"""Labelers: the oracle is right on the toy world; CLIP and FairFace code paths run on
random weights built offline; missing weights fail up front."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from icm.labeling.labelers import (
    ClipLabeler,
    FairFaceLabeler,
    LabelerNotAvailableError,
    OracleLabeler,
    PixelLabeler,
    label_images,
    label_table,
    make_labeler,
)
from icm.toy.world import make_dataset


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    data = make_dataset(24, seed=5)
    for i, image in enumerate(data.images):
        Image.fromarray(image).save(root / f"{i}.png")
    samples = pd.DataFrame({"sample": range(24), "prompt_index": 0,
                            "image": [f"{i}.png" for i in range(24)]})
    return root, samples, data


def test_oracle_labels_are_ground_truth(toy_images):
    root, samples, data = toy_images
    table = label_images(samples, root, OracleLabeler("color", ["red", "green", "blue"]))
    assert list(table["label"]) == data.colors
    assert table["kept"].all()
    strict = label_images(samples, root, OracleLabeler("color", ["red", "green", "blue"]),
                          margin=2.0)  # scores are probabilities: no gap reaches 2
    assert not strict["kept"].any() and (strict["label"] == "").all()


def test_clip_scores_take_the_best_prompt_of_each_group(toy_images):
    root, samples, _ = toy_images
    torch.manual_seed(0)
    labeler = ClipLabeler(["red", "blue"], {"red": ["a red shape", "a crimson thing"],
                                            "blue": ["a blue shape"]},
                          model="RN50", pretrained=None)
    images = [Image.open(root / p) for p in samples["image"][:4]]
    scores = labeler.scores(images)
    per_prompt = labeler.embed_images(images) @ labeler.text.T
    np.testing.assert_allclose(scores[:, 0], per_prompt[:, :2].max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(scores[:, 1], per_prompt[:, 2], rtol=1e-5)


def test_missing_clip_weights_fail_up_front():
    with pytest.raises(LabelerNotAvailableError, match="labeler.pretrained"):
        make_labeler({"type": "clip", "model": "RN50", "pretrained": "/nowhere/clip.bin"},
                     ["woman", "man"])


def test_fairface_groups_and_missing_weights(tmp_path, toy_images):
    import torchvision
    from safetensors.torch import save_file

    with pytest.raises(LabelerNotAvailableError, match="labeler.weights"):
        FairFaceLabeler("age", ["young", "adult", "old"], str(tmp_path / "missing.pt"))
    torch.manual_seed(0)
    net = torchvision.models.resnet34(weights=None)
    net.fc = torch.nn.Linear(net.fc.in_features, 18)
    save_file(net.state_dict(), tmp_path / "ff.safetensors")
    root, samples, _ = toy_images
    images = [Image.open(root / p) for p in samples["image"][:3]]
    labeler = FairFaceLabeler("age", ["young", "adult", "old"], str(tmp_path / "ff.safetensors"))
    probs = labeler.raw_probabilities(images)
    scores = labeler.scores(images)
    np.testing.assert_allclose(scores[:, 0], probs["0-2"] + probs["3-9"] + probs["10-19"])
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_fairface_race_compares_groups_and_keeps_every_image_for_fd(tmp_path, monkeypatch):
    """Asian (east 0.30 + southeast 0.30) beats latino 0.35; an image whose most likely
    group is outside the classes gets no label but keeps its class probabilities."""
    import torchvision
    from safetensors.torch import save_file

    net = torchvision.models.resnet34(weights=None)
    net.fc = torch.nn.Linear(net.fc.in_features, 18)
    save_file(net.state_dict(), tmp_path / "ff.safetensors")
    classes = ["white", "black", "asian", "indian"]
    labeler = FairFaceLabeler("race", classes, str(tmp_path / "ff.safetensors"))
    rows = {  # white, black, latino, east asian, southeast asian, indian, middle eastern
        "asian by group": [0.00, 0.05, 0.35, 0.30, 0.30, 0.00, 0.00],
        "latino": [0.10, 0.05, 0.50, 0.10, 0.05, 0.10, 0.10],
        "white": [0.60, 0.10, 0.10, 0.05, 0.05, 0.05, 0.05],
    }
    table = np.array(list(rows.values()))
    from icm.labeling.labelers import FAIRFACE_RACE

    monkeypatch.setattr(labeler, "raw_probabilities", lambda images: {
        name: table[:, k] for k, name in enumerate(FAIRFACE_RACE)})
    scores = labeler.scores([None] * 3)
    assert classes[int(np.argmax(scores[0]))] == "asian"
    assert np.isnan(scores[1]).all() and classes[int(np.argmax(scores[2]))] == "white"
    probabilities = labeler.class_probabilities([None] * 3)
    np.testing.assert_allclose(probabilities[1], [0.10, 0.05, 0.15, 0.10])  # kept, as is
    # A group the concept leaves out is an outside group too (age without adult).
    ages = FairFaceLabeler("age", ["young", "old"], str(tmp_path / "ff.safetensors"))
    age_table = np.zeros((1, 9))
    age_table[0, [1, 4, 7]] = [0.3, 0.5, 0.2]  # 3-9, 30-39, 60-69: adult is most likely
    from icm.labeling.labelers import FAIRFACE_AGE

    monkeypatch.setattr(ages, "raw_probabilities", lambda images: {
        name: age_table[:, k] for k, name in enumerate(FAIRFACE_AGE)})
    assert np.isnan(ages.scores([None])).all()


def test_pixel_labeler_reads_the_brighter_half_and_the_strongest_channel():
    image = np.full((9, 8, 3), 100, dtype=np.uint8)
    image[:, :4] = 140              # left half brighter
    image[:4, :, 2] = 250           # top rows: blue strongest, and top brighter than bottom
    pixels = Image.fromarray(image)
    sides = PixelLabeler("lit_side", ["left", "right", "top", "bottom"]).scores([pixels])[0]
    gray = image.astype(float).mean(axis=2) / 255
    np.testing.assert_allclose(sides, [gray[:, :4].mean() - gray.mean(),
                                       gray[:, 4:].mean() - gray.mean(),
                                       gray[:4].mean() - gray.mean(),   # row 4 is the middle
                                       gray[5:].mean() - gray.mean()])
    assert sides.argmax() == 2
    samples = pd.DataFrame({"sample": [0, 1], "prompt_index": [0, 0]})
    flipped = Image.fromarray(image[:, ::-1].copy())
    table = label_table(samples, PixelLabeler("lit_side", ["left", "right"]).scores(
        [pixels, flipped]), PixelLabeler("lit_side", ["left", "right"]))
    assert list(table["label"]) == ["left", "right"]
    colors = make_labeler({"type": "pixel", "attribute": "color"}, ["red", "blue"])
    assert colors.scores([pixels]).argmax() == 1
    with pytest.raises(ValueError, match="lit_side classes"):
        PixelLabeler("lit_side", ["left", "up"])


def test_labels_are_checked_against_the_samples_and_classes(tmp_path):
    from icm.labeling.table import read_labels

    path = tmp_path / "labels.csv"

    def write(rows):
        pd.DataFrame(rows, columns=["sample", "prompt_index", "label", "kept"]).to_csv(
            path, index=False)

    good = [(0, 0, "red", True), (1, 0, "", False), (2, 1, "blue", True)]
    write(good)
    table, counts = read_labels(path, [0, 1, 2], ["red", "green", "blue"])
    assert counts == {"samples": 3, "labelled": 2, "unlabelled": 1}
    assert list(table["label"]) == ["red", "", "blue"]
    for rows, message in (
            ([*good, (2, 1, "blue", True)], r"samples \[2\] have more than one row"),
            (good[:2], r"1 of the stores' 3 samples have no row \(e.g. \[2\]\)"),
            ([*good, (7, 0, "red", True)], r"1 rows name samples the stores do not hold"),
            ([(0, 0, "purple", True), *good[1:]], r"labels \['purple'\] are not classes"),
            ([(0, 0, "red", False), *good[1:]], "disagrees with their label")):
        write(rows)
        with pytest.raises(ValueError, match=message):
            read_labels(path, [0, 1, 2], ["red", "green", "blue"])
