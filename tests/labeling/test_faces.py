"""Faces before FairFace: 5-point alignment lands the landmarks on the template, the
paper's dlib pipeline finds and straightens a real face, and images without a face get no
label and are counted, never dropped silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from icm.evaluation.metrics import fairness_discrepancy_from_probabilities
from icm.labeling.faces import (
    DLIB_FILES,
    DlibDetector,
    Face,
    FaceCropper,
    FaceDetectorNotAvailableError,
    HaarDetector,
    align,
    crop_box,
    make_cropper,
    similarity,
    template_points,
)
from icm.labeling.labelers import FairFaceLabeler, label_images
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

        def chip(self, image, face, size, padding):
            return crop_box(image, face.box, size, padding)

    image = Image.new("RGB", (100, 100), "white")
    ImageDraw.Draw(image).rectangle((40, 40, 70, 60), fill="red")
    crop = FaceCropper(Two(), size=32, padding=0.0).crop(image)
    assert crop.size == (32, 32) and np.asarray(crop)[16, 16].tolist() == [255, 0, 0]
    with pytest.raises(FaceDetectorNotAvailableError, match="labeler.face.model"):
        make_cropper({"detector": "yunet", "model": str(tmp_path / "missing.onnx")})
    with pytest.raises(FaceDetectorNotAvailableError, match="shape_predictor_5"):
        make_cropper({"detector": "dlib", "model": str(tmp_path)})  # a folder without them
    assert isinstance(make_cropper(None).detector, DlibDetector)  # the registry's files
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


# A real photograph that ships with matplotlib (Grace Hopper, public domain, 512 x 600).
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
QUICK = {"detector": "dlib", "max_size": 400, "upsample": 0}  # faster than FairFace's 800, 1


def correlation(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(im.convert("L").resize((150, 150)), float).ravel() for im in (a, b))
    return float(np.corrcoef(x, y)[0, 1])


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def test_dlib_finds_a_real_face_and_its_chip_undoes_a_turn():
    """One face in the photo, its landmarks inside its box, the box where OpenCV's Haar
    cascade also puts the face; the photo turned by 25 degrees gives the same upright chip,
    which a box crop does not; noise has no face."""
    photo = Image.open(PHOTO).convert("RGB")
    cropper = make_cropper(QUICK)
    faces = cropper.detector.detect(photo)
    assert len(faces) == 1 and faces[0].score > 0.5
    x, y, w, h = faces[0].box
    inside = (faces[0].landmarks >= (x, y)) & (faces[0].landmarks <= (x + w, y + h))
    assert w > 100 and inside.all()
    haar = HaarDetector().detect(photo)
    assert max(iou(faces[0].box, other.box) for other in haar) > 0.4
    upright = cropper.crop(photo)
    assert upright.size == (300, 300)
    turned = photo.rotate(25, resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    chip = cropper.crop(turned)
    boxed = crop_box(turned, cropper.detector.detect(turned)[0].box, 300, 0.25)
    assert correlation(upright, chip) > 0.85 > 0.5 > correlation(upright, boxed)
    noise = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    assert cropper.crop(Image.fromarray(noise)) is None


def test_fairface_labels_the_real_face_and_counts_the_faceless_image(tmp_path):
    """Through the labeler: the photo gets a label on its face crop, noise gets none."""
    import torchvision
    from safetensors.torch import save_file

    net = torchvision.models.resnet34(weights=None)
    net.fc = torch.nn.Linear(net.fc.in_features, 18)
    save_file(net.state_dict(), tmp_path / "ff.safetensors")
    Image.open(PHOTO).convert("RGB").save(tmp_path / "photo.png")
    noise = np.random.default_rng(1).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    samples = pd.DataFrame({"sample": [0, 1], "prompt_index": 0,
                            "image": ["photo.png", "noise.png"]})
    labeler = FairFaceLabeler("gender", ["woman", "man"], str(tmp_path / "ff.safetensors"),
                              faces=make_cropper(QUICK))
    table = label_images(samples, tmp_path, labeler)
    assert table["face"].tolist() == [True, False]
    assert table["label"].iloc[0] in {"woman", "man"} and table["label"].iloc[1] == ""


WORKERS_SCRIPT = """
import numpy as np
from PIL import Image
from icm.labeling.faces import make_cropper
photo = Image.open({photo!r}).convert("RGB")
images = [photo, photo.rotate(25, expand=True), Image.new("RGB", (256, 256)), photo]
spread = make_cropper({quick!r}, workers=2)
assert spread._pool is not None  # forked before this process ran a detector
crops = spread.crop_many(images)
alone = make_cropper({quick!r}).crop_many(images)
assert [c is None for c in crops] == [False, False, True, False]
assert all((a is None and b is None) or np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(crops, alone))
assert make_cropper({quick!r}, workers=2)._pool is None  # no fork after detecting here
print("same crops")
"""


def test_crops_spread_over_workers_are_the_crops_of_one_process():
    """In a fresh process (a fork after dlib has run would hang, which the cropper refuses):
    two workers give exactly the one-process crops, in order."""
    script = WORKERS_SCRIPT.format(photo=str(PHOTO), quick=QUICK)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "same crops" in done.stdout


@pytest.mark.slow
def test_fairface_s_own_settings_find_the_real_face():
    """The defaults (long side 800, one upsampling: about 26 s on a CPU core) find the
    same face as the quick settings."""
    photo = Image.open(PHOTO).convert("RGB")
    paper, quick = make_cropper(None).detector, make_cropper(QUICK).detector
    assert (paper.max_size, paper.upsample) == (800, 1) and DLIB_FILES[0] in str(
        paper.folder / DLIB_FILES[0])
    found, reference = paper.detect(photo), quick.detect(photo)
    assert len(found) == 1 and iou(found[0].box, reference[0].box) > 0.7
    assert np.abs(found[0].landmarks - reference[0].landmarks).max() < 10


def test_the_hog_finder_gives_the_cnn_s_face_and_chip_far_faster():
    """`dlib-hog` swaps only the detector: on the real photo its largest face is the CNN's
    (box IoU > 0.6), the landmarks on it within 4 % of the chip, the chips alike; and
    noise has no face. (Speed: benchmarks/face_crops.py.)"""
    photo = Image.open(PHOTO).convert("RGB")
    cnn, hog = make_cropper(QUICK), make_cropper({**QUICK, "detector": "dlib-hog"})
    assert hog.detector.name == "dlib HOG + 5-point landmarks" != cnn.detector.name
    reference, found = cnn.detector.detect(photo)[0], hog.detector.detect(photo)
    assert len(found) == 1 and iou(found[0].box, reference.box) > 0.6
    side = reference.box[2] * 1.5  # the chip spans the face square and its padding
    assert np.linalg.norm(found[0].landmarks - reference.landmarks, axis=1).max() < 0.04 * side
    assert correlation(cnn.crop(photo), hog.crop(photo)) > 0.9
    noise = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    assert hog.crop(Image.fromarray(noise)) is None
    with pytest.raises(ValueError, match="unknown dlib face finder"):
        DlibDetector(finder="mmod")


def test_mtcnn_boxes_give_the_cnn_s_landmarks_and_batches_change_nothing():
    """`mtcnn` (torch, batched on the job's device) boxes the real face taller than dlib's
    CNN, and dlib's landmarks on its box land within 4 % of the chip; crops of a batch are
    the crops of one image at a time; a faceless image has none."""
    pytest.importorskip("facenet_pytorch", reason="make install installs facenet-pytorch")
    photo = Image.open(PHOTO).convert("RGB")
    cnn, mtcnn = make_cropper(QUICK), make_cropper({**QUICK, "detector": "mtcnn"})
    assert mtcnn._pool is None  # no forked workers around torch
    reference, found = cnn.detector.detect(photo)[0], mtcnn.detector.detect(photo)
    assert len(found) == 1 and iou(found[0].box, reference.box) > 0.5
    side = reference.box[2] * 1.5
    assert np.linalg.norm(found[0].landmarks - reference.landmarks, axis=1).max() < 0.04 * side
    turned = photo.rotate(20, resample=Image.BICUBIC, fillcolor=(128, 128, 128))
    batch = mtcnn.crop_many([photo, turned, Image.new("RGB", photo.size)])
    assert batch[2] is None
    for image, crop in zip((photo, turned), batch[:2], strict=True):
        assert np.abs(np.asarray(crop, float) - np.asarray(mtcnn.crop(image), float)).max() < 2
    assert correlation(cnn.crop(photo), batch[0]) > 0.9
