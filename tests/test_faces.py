"""Faces before FairFace: 5-point alignment lands the landmarks on the template, and images
without a face get no label and are counted, never dropped silently."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from icm.faces import (
    Face,
    FaceCropper,
    FaceDetectorNotAvailableError,
    HaarDetector,
    align,
    make_cropper,
    similarity,
    template_points,
)
from icm.labels import FairFaceLabeler, label_images
from icm.metrics import fairness_discrepancy_from_probabilities
from icm.toy.world import make_dataset


@pytest.fixture(scope="module")
def toy_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-faces")
    for i, image in enumerate(make_dataset(6, seed=5).images):
        Image.fromarray(image).resize((64, 64)).save(root / f"{i}.png")
    samples = pd.DataFrame({"sample": range(6), "prompt_index": 0,
                            "image": [f"{i}.png" for i in range(6)]})
    return root, samples, None


def test_the_similarity_transform_recovers_rotation_scale_and_shift():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.4, 1.7, np.array([12.0, -5.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = points @ (scale * rotation).T + shift
    np.testing.assert_allclose(similarity(points, moved), np.hstack([scale * rotation,
                                                                     shift[:, None]]), atol=1e-9)


def test_alignment_puts_the_landmarks_where_the_template_says():
    """Five dots drawn at a rotated, scaled copy of the template come out at the template's
    points of the padded crop."""
    size, padding = 112, 0.25
    angle, scale = -0.3, 1.5
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (template_points(size, padding) - size / 2) @ (scale * rotation).T + 150
    image = Image.new("RGB", (300, 300), "white")
    draw = ImageDraw.Draw(image)
    for x, y in landmarks:
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill="black")
    crop = np.asarray(align(image, landmarks, size, padding).convert("L"))
    for x, y in template_points(size, padding):
        assert crop[int(round(y)), int(round(x))] < 80  # a dot lands on each template point
    assert crop[5, 5] > 200  # and the corners stay background


def test_the_largest_face_is_cropped_and_a_missing_model_is_a_clear_error(tmp_path):
    class Two:
        name = "two boxes"

        def detect(self, image):
            return [Face((0, 0, 10, 10), None, 1.0), Face((40, 40, 30, 20), None, 0.9)]

    image = Image.new("RGB", (100, 100), "white")
    ImageDraw.Draw(image).rectangle((40, 40, 70, 60), fill="red")
    crop = FaceCropper(Two(), size=32, padding=0.0).crop(image)
    assert crop.size == (32, 32) and np.asarray(crop)[16, 16].tolist() == [255, 0, 0]
    with pytest.raises(FaceDetectorNotAvailableError, match="labeler.face.model"):
        make_cropper({"detector": "yunet", "model": str(tmp_path / "missing.onnx")})
    with pytest.raises(FaceDetectorNotAvailableError, match="labeler.face.model"):
        make_cropper(None)  # the default detector needs its model file
    assert make_cropper({"detector": "none"}) is None
    assert isinstance(make_cropper({"detector": "haar"}).detector, HaarDetector)


def test_images_without_a_face_get_no_label_and_are_counted(tmp_path, toy_images):
    """The toy's shapes hold no face: FairFace on face crops labels none of them, says so
    per image, and FD from probabilities leaves them out instead of using them."""
    import torchvision
    from safetensors.torch import save_file

    net = torchvision.models.resnet34(weights=None)
    net.fc = torch.nn.Linear(net.fc.in_features, 18)
    save_file(net.state_dict(), tmp_path / "ff.safetensors")
    root, samples, _ = toy_images
    labeler = FairFaceLabeler("gender", ["woman", "man"], str(tmp_path / "ff.safetensors"),
                              faces=make_cropper({"detector": "haar"}))
    table = label_images(samples.iloc[:6], root, labeler)
    assert (table["face"] == False).all() and (table["label"] == "").all()  # noqa: E712
    assert "on face crops" in labeler.name
    probabilities = labeler.class_probabilities([Image.open(root / p)
                                                 for p in samples["image"][:6]])
    assert np.isnan(probabilities).all()
    mixed = np.array([[0.9, 0.1], [np.nan, np.nan], [0.1, 0.9]])
    fd, per_prompt = fairness_discrepancy_from_probabilities(mixed, ["a", "a", "b"],
                                                             ["woman", "man"])
    assert per_prompt["a"] == pytest.approx(np.linalg.norm([0.4, -0.4]))  # the NaN row left out
    none, _ = fairness_discrepancy_from_probabilities(mixed[1:2], ["a"], ["woman", "man"])
    assert np.isnan(none)
