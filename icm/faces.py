"""Face detection and 5-point alignment before FairFace, as the paper's evaluation crops
faces before classifying them (FairFace: arXiv:1908.04913, "FairFace: Face Attribute Dataset
for Balanced Race, Gender, and Age", aligns with dlib's 5 landmarks and 25 % padding).

Detectors come from OpenCV (the package registry's `opencv-python-headless`, 4.x: OpenCV 5
dropped the bundled Haar cascades):

* ``yunet`` (default): ``cv2.FaceDetectorYN`` with the YuNet ONNX file of the OpenCV model
  zoo (``face_detection_yunet_2023mar.onnx``), loaded from a local path (``face.model``);
  it gives each face's box and 5 landmarks (eyes, nose tip, mouth corners), and the crop is
  the similarity transform taking them to a fixed 5-point template, with padding;
* ``haar``: the frontal-face Haar cascade bundled with OpenCV (no download), box only: the
  crop is the padded square around the box, unaligned;
* ``none``: the whole image (what FairFace saw before this module).

The largest face of an image is classified; an image without one gets no label, and every
stage that reads labels counts it ("no face"), never drops it silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: The 5-point template (left eye, right eye, nose tip, left and right mouth corner) of the
#: widely used 112 x 112 ArcFace alignment, as fractions of the face square.
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]]) / 112.0
DETECTORS = ("yunet", "haar", "none")


class FaceDetectorNotAvailableError(RuntimeError):
    """The configured face detector cannot be loaded (missing model file or OpenCV)."""


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x, y, width, height in pixels
    landmarks: np.ndarray | None  # (5, 2) in pixels, or None (box-only detectors)
    score: float


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as error:  # pragma: no cover - a dependency of the package
        raise FaceDetectorNotAvailableError(
            "face detection needs OpenCV: pip install opencv-python-headless") from error
    return cv2


class YuNetDetector:
    """OpenCV's YuNet: boxes and 5 landmarks."""

    name = "YuNet (OpenCV)"

    def __init__(self, model: str | None, score_threshold: float = 0.7) -> None:
        if not model or not Path(model).is_file():
            raise FaceDetectorNotAvailableError(
                f"the YuNet face detector model was not found at {model!r}. FairFace labels "
                "face crops: download face_detection_yunet_2023mar.onnx from the OpenCV model "
                "zoo on a machine with internet and set `labeler.face.model` to its path, or "
                "set `labeler.face.detector` to haar (OpenCV's bundled cascade, unaligned) "
                "or none (whole images)")
        self.model, self.score_threshold = str(model), float(score_threshold)
        self._detector = _cv2().FaceDetectorYN.create(self.model, "", (320, 320),
                                                      self.score_threshold)

    def detect(self, image: Image.Image) -> list[Face]:
        rgb = np.asarray(image.convert("RGB"))
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        self._detector.setInputSize((rgb.shape[1], rgb.shape[0]))
        _, found = self._detector.detect(bgr)
        faces = []
        for row in ([] if found is None else found):
            faces.append(Face(tuple(float(v) for v in row[:4]),
                              np.asarray(row[4:14], dtype=np.float64).reshape(5, 2),
                              float(row[14])))
        return faces


class HaarDetector:
    """OpenCV's bundled frontal-face Haar cascade: boxes only."""

    name = "Haar cascade (OpenCV, frontal face)"

    def __init__(self, min_size: int = 24) -> None:
        cv2 = _cv2()
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise FaceDetectorNotAvailableError(f"OpenCV's cascade {path} did not load")
        self.min_size = min_size

    def detect(self, image: Image.Image) -> list[Face]:
        cv2 = _cv2()
        gray = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
        boxes = self._cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                               minSize=(self.min_size, self.min_size))
        return [Face(tuple(float(v) for v in box), None, 1.0) for box in boxes]


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity transform (rotation, uniform scale, translation; no reflection)
    mapping ``source`` points closest to ``target`` in least squares (Umeyama, 1991)."""
    source, target = np.asarray(source, float), np.asarray(target, float)
    mu_s, mu_t = source.mean(0), target.mean(0)
    s, t = source - mu_s, target - mu_t
    u, singular, vt = np.linalg.svd(t.T @ s / len(source))
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ sign @ vt
    scale = np.trace(np.diag(singular) @ sign) / (s ** 2).sum(1).mean()
    return np.hstack([scale * rotation, (mu_t - scale * rotation @ mu_s)[:, None]])


def template_points(size: int, padding: float) -> np.ndarray:
    """Where the template's 5 points go in a ``size`` crop with ``padding`` (a share of the
    face square added on each side, FairFace's 0.25)."""
    return (TEMPLATE + padding) / (1 + 2 * padding) * size


def align(image: Image.Image, landmarks: np.ndarray, size: int = 224,
          padding: float = 0.25) -> Image.Image:
    """The face warped so its 5 landmarks sit on the template."""
    forward = np.vstack([similarity(landmarks, template_points(size, padding)), [0, 0, 1]])
    inverse = np.linalg.inv(forward)[:2]  # PIL maps output pixels back to input pixels
    return image.convert("RGB").transform((size, size), Image.AFFINE, inverse.ravel(),
                                          resample=Image.BICUBIC)


def crop_box(image: Image.Image, box: tuple[float, float, float, float], size: int = 224,
             padding: float = 0.25) -> Image.Image:
    """The square around ``box`` grown by ``padding`` on each side, resized to ``size``."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * padding)
    cx, cy = x + w / 2, y + h / 2
    area = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return image.convert("RGB").crop(tuple(round(v) for v in area)).resize((size, size),
                                                                         Image.BICUBIC)


class FaceCropper:
    """The largest face of an image, aligned (landmarks) or boxed, or None."""

    def __init__(self, detector: Any, size: int = 224, padding: float = 0.25) -> None:
        self.detector, self.size, self.padding = detector, int(size), float(padding)
        self.name = f"{detector.name}, {size} px, padding {padding:g}"

    def crop(self, image: Image.Image) -> Image.Image | None:
        faces = self.detector.detect(image)
        if not faces:
            return None
        face = max(faces, key=lambda f: f.box[2] * f.box[3])
        if face.landmarks is not None:
            return align(image, face.landmarks, self.size, self.padding)
        return crop_box(image, face.box, self.size, self.padding)


def make_cropper(spec: Mapping[str, Any] | None) -> FaceCropper | None:
    """The cropper a labeler's ``face`` settings name (None: detector yunet, which needs
    its model file); ``detector: none`` gives None (whole images)."""
    spec = dict(spec or {})
    detector = spec.get("detector") or "yunet"
    if detector not in DETECTORS:
        raise ValueError(f"unknown face detector {detector!r}; use one of {DETECTORS}")
    if detector == "none":
        return None
    found = (YuNetDetector(spec.get("model"), spec.get("score_threshold", 0.7))
             if detector == "yunet" else HaarDetector())
    return FaceCropper(found, spec.get("size", 224), spec.get("padding", 0.25))
