"""How far each fast face finder's crop is from FairFace's own (dlib's CNN), and how fast.

The photographs are the real ones that ship inside installed packages: scikit-image's
astronaut (Eileen Collins) and cameraman, matplotlib's Grace Hopper, each as it is,
mirrored, rotated by 12 degrees and shrunk to half size on a grey canvas twice its size (a
face a quarter of the area); and five photographs without a face (coffee, cat, rocket,
horse, Hubble deep field). The reference is the paper's setting (``detector: dlib``: the
MMOD CNN at ``max_size`` 800, ``upsample`` 1). For each candidate and image: whether a face
is found where the reference finds one (and none where there is none), the IoU of the
largest face's box with the reference's, and the mean distance of its 5 landmarks from the
reference's in pixels of the 300 px chip (what FairFace classifies). Seconds per image are
measured in the same run, one image at a time in this process (MTCNN's batches on a GPU are
not measured here: no GPU was lent).

    .venv/bin/python benchmarks/face_crops.py              # every candidate, CPU
    .venv/bin/python benchmarks/face_crops.py --only dlib-hog haar
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from icm.labeling.faces import DlibDetector, Face, HaarDetector

SIZE, PADDING = 300, 0.25


def photographs() -> Iterator[tuple[str, Image.Image, bool]]:
    """(name, image, whether it shows a face) for every test photograph."""
    import matplotlib
    import skimage.data

    faces = {
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "cameraman": Image.fromarray(skimage.data.camera()).convert("RGB"),
        "grace_hopper": Image.open(Path(matplotlib.get_data_path(), "sample_data",
                                        "grace_hopper.jpg")).convert("RGB"),
    }
    for name, image in faces.items():
        yield name, image, True
        yield f"{name} mirrored", ImageOps.mirror(image), True
        yield f"{name} rotated 12", image.rotate(12, resample=Image.BICUBIC,
                                                 fillcolor=(128, 128, 128)), True
        canvas = Image.new("RGB", image.size, (128, 128, 128))
        small = image.resize((image.width // 2, image.height // 2), Image.BICUBIC)
        canvas.paste(small, (image.width // 4, image.height // 3))
        yield f"{name} half size", canvas, True
    for name in ("coffee", "chelsea", "rocket", "horse", "hubble_deep_field"):
        pixels = getattr(skimage.data, name)()
        image = Image.fromarray(pixels.astype(np.uint8) * (255 if pixels.dtype == bool else 1))
        yield name, image.convert("RGB"), False


def largest(faces: list[Face]) -> Face | None:
    return max(faces, key=lambda f: f.box[2] * f.box[3]) if faces else None


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = w * h
    return inter / (aw * ah + bw * bh - inter)


def chip_side(reference: DlibDetector, image: Image.Image, face: Face) -> float:
    """How many pixels of the original image the reference chip's side spans."""
    import dlib

    rgb, scale = reference._resized(image)
    x, y, w, h = (round(v * scale) for v in face.box)
    points = [dlib.point(round(px * scale), round(py * scale)) for px, py in face.landmarks]
    shape = dlib.full_object_detection(dlib.rectangle(x, y, x + w, y + h), points)
    return dlib.get_face_chip_details(shape, size=SIZE, padding=PADDING).rect.width() / scale


def candidates(names: list[str] | None) -> dict[str, Callable[[], object]]:
    every = {
        "dlib (paper), upsample 0": lambda: DlibDetector(upsample=0),
        "dlib-hog, upsample 1": lambda: DlibDetector(finder="hog"),
        "dlib-hog, upsample 0": lambda: DlibDetector(upsample=0, finder="hog"),
        "mtcnn (CPU), upsample -": lambda: DlibDetector(finder="mtcnn"),
        "haar": HaarDetector,
    }
    if not names:
        return every
    return {k: v for k, v in every.items() if any(k.startswith(n) for n in names)}


def timed(detector: object, image: Image.Image) -> tuple[list[Face], float]:
    start = time.perf_counter()
    faces = detector.detect(image)  # type: ignore[attr-defined]
    return faces, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="candidates whose names start so")
    args = parser.parse_args()
    images = list(photographs())
    reference = DlibDetector()
    truth = []
    ref_seconds = []
    for _, image, _ in images:
        faces, seconds = timed(reference, image)
        truth.append(largest(faces))
        ref_seconds.append(seconds)
    print(f"{len(images)} photographs ({sum(f for *_, f in images)} with a face); reference "
          f"{reference.name}: {np.median(ref_seconds):.2f} s per image (median), finds "
          f"{sum(t is not None for t in truth)} faces")
    print("| candidate | faces agreed | missed | extra | box IoU (median, min) | landmark error, "
          "chip px (median, max) | s per image (median) | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, make in candidates(args.only).items():
        detector = make()
        agreed = missed = extra = 0
        ious, errors, seconds = [], [], []
        for (_, image, _), ref in zip(images, truth, strict=True):
            faces, took = timed(detector, image)
            seconds.append(took)
            face = largest(faces)
            if ref is None:
                extra += face is not None
                agreed += face is None
                continue
            if face is None:
                missed += 1
                continue
            agreed += 1
            ious.append(iou(face.box, ref.box))
            if face.landmarks is not None:
                side = chip_side(reference, image, ref)
                distance = np.linalg.norm(face.landmarks - ref.landmarks, axis=1).mean()
                errors.append(distance * SIZE / side)
        speed = np.median(ref_seconds) / np.median(seconds)
        landmark = (f"{np.median(errors):.1f}, {np.max(errors):.1f}" if errors
                    else "(box only)")
        print(f"| {name} | {agreed}/{len(images)} | {missed} | {extra} | "
              f"{np.median(ious):.2f}, {np.min(ious):.2f} | {landmark} | "
              f"{np.median(seconds):.3f} | {speed:.0f}x |")


if __name__ == "__main__":
    main()
