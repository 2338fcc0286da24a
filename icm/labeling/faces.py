"""Face detection and alignment before FairFace, as the paper's evaluation crops faces
before classifying them (FairFace: arXiv:1908.04913, "FairFace: Face Attribute Dataset for
Balanced Race, Gender, and Age", whose own pipeline is the ``dlib`` detector below).

* ``dlib`` (default): dlib's CNN face detector (MMOD) and its 5-point landmark model, the
  evaluation the paper ran: the image resized so its long side is ``max_size`` (800),
  detection upsampled ``upsample`` times (1), the chip cut by ``dlib.get_face_chip`` (300 px,
  padding 0.25). Both model files ship with the registry package ``face-recognition-models``
  (found where it is installed, never imported) or lie in the directory ``face.model``
  names; dlib itself is the ``dlib-bin`` wheel (or ``dlib`` built from source, with CUDA
  where the machine has it);
* ``yunet``: ``cv2.FaceDetectorYN`` with the YuNet ONNX file of the OpenCV model zoo
  (``face_detection_yunet_2023mar.onnx``), loaded from a local path (``face.model``); each
  face's box and 5 landmarks (eyes, nose tip, mouth corners), the crop the similarity
  transform taking them to a fixed 5-point template, with padding;
* ``haar``: the frontal-face Haar cascade bundled with OpenCV (no download), box only: the
  crop is the padded square around the box, unaligned;
* ``none``: the whole image (what FairFace saw before this module).

The largest face of an image is classified; an image without one gets no label, and every
stage that reads labels counts it ("no face"), never drops it silently. Detection is the
slow part on a CPU (dlib's CNN: about 26 s for a 512 px image at the paper's settings on
one core), so ``FaceCropper.crop_many`` spreads images over the job's cores in processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger("icm")

#: The 5-point template (left eye, right eye, nose tip, left and right mouth corner) of the
#: widely used 112 x 112 ArcFace alignment, as fractions of the face square.
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                     [41.5493, 92.3655], [70.7299, 92.2041]]) / 112.0
DETECTORS = ("dlib", "dlib-hog", "mtcnn", "yunet", "haar", "none")
#: The dlib model files FairFace uses, as ``face-recognition-models`` names them.
DLIB_FILES = ("mmod_human_face_detector.dat", "shape_predictor_5_face_landmarks.dat")


class FaceDetectorNotAvailableError(RuntimeError):
    """The configured face detector cannot be loaded (missing model file or OpenCV)."""


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x, y, width, height in pixels
    landmarks: np.ndarray | None  # (5, 2) in pixels, the detector's own order; None: box only
    score: float


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as error:  # pragma: no cover - a dependency of the package
        raise FaceDetectorNotAvailableError(
            "face detection needs OpenCV: pip install opencv-python-headless") from error
    return cv2


def _dlib() -> Any:
    try:
        import dlib
    except ImportError as error:
        raise FaceDetectorNotAvailableError(
            "the dlib face detector needs dlib: pip install dlib-bin (a wheel) or dlib (built "
            "from source, with CUDA where found), or set `labeler.face.detector` to yunet, "
            "haar or none") from error
    return dlib


def _mtcnn(device: str) -> Any:
    """facenet-pytorch's MTCNN, its weights shipped inside that package (no download)."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError as error:
        raise FaceDetectorNotAvailableError(
            "the mtcnn face finder needs facenet-pytorch: pip install --no-deps "
            "facenet-pytorch (its declared pins predate the torch this project uses; its "
            "MTCNN runs with it), or set `labeler.face.detector` to dlib or dlib-hog") \
            from error
    return MTCNN(keep_all=True, device=device)


def missing_dlib_files(folder: Path | None) -> list[str]:
    """Which of dlib's two model files ``folder`` lacks (all of them for no folder): what
    DlibDetector loads, and what the workflow's start-up check asks of `face.model`."""
    return [f for f in DLIB_FILES if folder is None or not (folder / f).is_file()]


def packaged_dlib_models() -> Path | None:
    """The ``models`` folder of the installed ``face-recognition-models`` package, found
    without importing it (its ``__init__`` needs the retired ``pkg_resources``)."""
    from importlib.util import find_spec

    spec = find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class DlibDetector:
    """dlib's CNN (MMOD) detector and 5-point landmarks, as FairFace crops faces: the image
    resized to a long side of ``max_size``, detection upsampled ``upsample`` times, the chip
    from ``dlib.get_face_chip`` on the resized image. Faces are reported in the original
    image's pixels; ``chip`` maps them back, so the chip is FairFace's own.

    ``finder="hog"`` swaps only the detector for dlib's HOG frontal-face detector (built into
    dlib, tens of times faster on a CPU): the same resize, landmarks and chip, so its crops
    differ from FairFace's only where the two detectors' boxes do
    (``benchmarks/face_crops.py`` measures how far)."""

    NAMES = {"cnn": "dlib MMOD CNN + 5-point landmarks",
             "hog": "dlib HOG + 5-point landmarks",
             "mtcnn": "MTCNN (torch) + dlib 5-point landmarks"}

    def __init__(self, model: str | None = None, max_size: int | None = 800,
                 upsample: int = 1, finder: str = "cnn", device: str = "cpu") -> None:
        folder = Path(model) if model else packaged_dlib_models()
        missing = missing_dlib_files(folder)
        if missing:
            where = "no face-recognition-models package is installed" if folder is None \
                else f"{folder} lacks {', '.join(missing)}"
            raise FaceDetectorNotAvailableError(
                f"the dlib face detector's model files were not found: {where}. Install "
                "them with pip install face-recognition-models, or set `labeler.face.model` "
                f"to a folder holding {' and '.join(DLIB_FILES)}")
        if finder not in self.NAMES:
            raise ValueError(f"unknown dlib face finder {finder!r}; use one of {list(self.NAMES)}")
        dlib = _dlib()
        self.folder, self.max_size, self.upsample = folder, max_size, int(upsample)
        self.finder, self.name = finder, self.NAMES[finder]
        if finder == "cnn":
            self._detector = dlib.cnn_face_detection_model_v1(str(folder / DLIB_FILES[0]))
        elif finder == "hog":
            self._detector = dlib.get_frontal_face_detector()
        else:
            self._detector = _mtcnn(device)
        self._landmarks = dlib.shape_predictor(str(folder / DLIB_FILES[1]))

    def _resized(self, image: Image.Image) -> tuple[np.ndarray, float]:
        """The RGB pixels with the long side at ``max_size`` (dlib's resize, as FairFace)
        and the factor from original to resized pixels."""
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        if not self.max_size:
            return rgb, 1.0
        height, width = rgb.shape[:2]
        scale = self.max_size / max(height, width)
        rows, cols = int(height * scale), int(width * scale)  # FairFace truncates too
        return _dlib().resize_image(rgb, rows=rows, cols=cols), scale

    def _boxes(self, rgb: np.ndarray) -> list[tuple[Any, float]]:
        """(dlib rectangle, score) of each face in the resized pixels."""
        if self.finder == "cnn":
            return [(found.rect, float(found.confidence))
                    for found in self._detector(rgb, self.upsample)]
        if self.finder == "mtcnn":
            return self._mtcnn_boxes([rgb])[0]
        rects, scores, _ = self._detector.run(rgb, self.upsample, 0.0)
        return list(zip(rects, map(float, scores), strict=True))

    def _mtcnn_boxes(self, pixels: Sequence[np.ndarray]) -> list[list[tuple[Any, float]]]:
        """MTCNN's boxes of same-sized images in one batch (on its device)."""
        dlib = _dlib()
        boxes, scores = self._detector.detect(np.stack(pixels))
        return [[(dlib.rectangle(*(int(round(v)) for v in box)), float(score))
                 for box, score in zip(found, probs, strict=True)] if found is not None else []
                for found, probs in zip(boxes, scores, strict=True)]

    def detect(self, image: Image.Image) -> list[Face]:
        rgb, scale = self._resized(image)
        return self.faces(rgb, scale, self._boxes(rgb))

    def detect_many(self, images: Sequence[Image.Image], batch_size: int = 32
                    ) -> list[list[Face]]:
        """``detect`` of each image; MTCNN finds the faces of a batch of same-sized images in
        one call (on the GPU where it runs), the others one image at a time."""
        if self.finder != "mtcnn":
            return [self.detect(image) for image in images]
        resized = [self._resized(image) for image in images]
        out: list[list[Face]] = [[] for _ in images]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, (rgb, _) in enumerate(resized):
            by_size.setdefault(rgb.shape, []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                found = self._mtcnn_boxes([resized[i][0] for i in chunk])
                for i, boxes in zip(chunk, found, strict=True):
                    out[i] = self.faces(resized[i][0], resized[i][1], boxes)
        return out

    def faces(self, rgb: np.ndarray, scale: float, boxes: Sequence[tuple[Any, float]]
              ) -> list[Face]:
        """Each box's 5-point landmarks (dlib's model), in the original image's pixels."""
        faces = []
        for rect, score in boxes:
            shape = self._landmarks(rgb, rect)
            points = np.array([[shape.part(i).x, shape.part(i).y]
                               for i in range(shape.num_parts)], dtype=np.float64)
            box = (rect.left(), rect.top(), rect.right() - rect.left(),
                   rect.bottom() - rect.top())
            faces.append(Face(tuple(v / scale for v in box), points / scale, score))
        return faces

    def chip(self, image: Image.Image, face: Face, size: int, padding: float) -> Image.Image:
        dlib = _dlib()
        rgb, scale = self._resized(image)
        x, y, w, h = (round(v * scale) for v in face.box)
        points = [dlib.point(round(px * scale), round(py * scale)) for px, py in face.landmarks]
        shape = dlib.full_object_detection(dlib.rectangle(x, y, x + w, y + h), points)
        return Image.fromarray(dlib.get_face_chip(rgb, shape, size=size, padding=padding))


class YuNetDetector:
    """OpenCV's YuNet: boxes and 5 landmarks."""

    name = "YuNet (OpenCV)"

    def __init__(self, model: str | None, score_threshold: float = 0.7) -> None:
        if not model or not Path(model).is_file():
            raise FaceDetectorNotAvailableError(
                f"the YuNet face detector model was not found at {model!r}. FairFace labels "
                "face crops: download face_detection_yunet_2023mar.onnx from the OpenCV model "
                "zoo on a machine with internet and set `labeler.face.model` to its path, or "
                "set `labeler.face.detector` to dlib (the paper's, from the package "
                "registry), haar (unaligned) or none (whole images)")
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

    def chip(self, image: Image.Image, face: Face, size: int, padding: float) -> Image.Image:
        return align(image, face.landmarks, size, padding)


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

    def chip(self, image: Image.Image, face: Face, size: int, padding: float) -> Image.Image:
        return crop_box(image, face.box, size, padding)


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
    """The largest face of an image, cut out as its detector does (aligned from landmarks,
    or boxed), or None. ``workers`` > 1: ``crop_many`` spreads images over that many
    processes, forked here, before the detector first runs: dlib's thread pool does not
    survive a fork, so a process that has detected a face forks no workers afterwards."""

    def __init__(self, detector: Any, size: int = 300, padding: float = 0.25,
                 workers: int = 1) -> None:
        self.detector, self.size, self.padding = detector, int(size), float(padding)
        self.name = f"{detector.name}, {size} px, padding {padding:g}"
        self._pool = None
        if int(workers) > 1 and "fork" in multiprocessing.get_all_start_methods():
            if _DETECTED_HERE:
                log.warning("finding faces in one process: this one has run a detector, "
                            "after which forked workers would hang")
            else:
                global _WORKER_CROPPER
                _WORKER_CROPPER = self  # the forked workers inherit it: nothing is pickled
                try:
                    self._pool = multiprocessing.get_context("fork").Pool(int(workers))
                finally:
                    _WORKER_CROPPER = None
                weakref.finalize(self, self._pool.terminate)

    def crop(self, image: Image.Image) -> Image.Image | None:
        global _DETECTED_HERE
        _DETECTED_HERE = True
        return self._largest_chip(image, self.detector.detect(image))

    def _largest_chip(self, image: Image.Image, faces: Sequence[Face]) -> Image.Image | None:
        if not faces:
            return None
        face = max(faces, key=lambda f: f.box[2] * f.box[3])
        return self.detector.chip(image, face, self.size, self.padding)

    def crop_many(self, images: Sequence[Image.Image]) -> list[Image.Image | None]:
        """``crop`` of each image, in order, with a progress bar; in the workers where there
        are some (the detectors hold the GIL, so threads would not help). The crops do not
        depend on the number of workers."""
        from tqdm.auto import tqdm

        images = [im.convert("RGB") for im in images]
        label = f"finding faces ({self.detector.name})"
        if getattr(self.detector, "finder", None) == "mtcnn":  # batches, on its device
            found = self.detector.detect_many(images)
            return [self._largest_chip(im, faces)
                    for im, faces in zip(tqdm(images, desc=label, leave=False), found,
                                         strict=True)]
        if self._pool is None or len(images) < 2:
            return [self.crop(im) for im in tqdm(images, desc=label, leave=False)]
        return list(tqdm(self._pool.imap(_crop_in_worker, images, chunksize=1),
                         total=len(images), desc=label, leave=False))


_WORKER_CROPPER: FaceCropper | None = None  # set in the parent only while forking
_DETECTED_HERE = False  # whether this process has run a detector (forked workers inherit it)


def _crop_in_worker(image: Image.Image) -> Image.Image | None:
    if _WORKER_CROPPER is None:  # a worker keeps the cropper it was forked with
        raise RuntimeError("face worker started without its cropper")
    return _WORKER_CROPPER.crop(image)


#: The face finders whose boxes dlib's landmarks and chip follow, by `detector` name.
DLIB_FINDERS = {"dlib": "cnn", "dlib-hog": "hog", "mtcnn": "mtcnn"}


def make_cropper(spec: Mapping[str, Any] | None, workers: int = 1,
                 device: str = "cpu") -> FaceCropper | None:
    """The cropper a labeler's ``face`` settings name (None: the paper's dlib detector, its
    models from the installed ``face-recognition-models``); ``detector: none`` gives None
    (whole images). Every model file is checked here, before any image is read."""
    spec = dict(spec or {})
    detector = spec.get("detector") or "dlib"
    if detector not in DETECTORS:
        raise ValueError(f"unknown face detector {detector!r}; use one of {DETECTORS}")
    if detector == "none":
        return None
    if detector in DLIB_FINDERS:
        found: Any = DlibDetector(spec.get("model"), spec.get("max_size", 800),
                                  spec.get("upsample", 1), DLIB_FINDERS[detector], device)
        if detector == "mtcnn":
            workers = 1  # torch batches it (on the GPU where there is one): no forks
    elif detector == "yunet":
        found = YuNetDetector(spec.get("model"), spec.get("score_threshold", 0.7))
    else:
        found = HaarDetector()
    return FaceCropper(found, spec.get("size", 300), spec.get("padding", 0.25), workers)
