"""A synthetic image world with planted biases, so implicit choices have a known ground truth.

Each image is one filled shape on a plain background. The shape's colour depends on the
shape (circles are mostly red, squares mostly blue, triangles unbiased), and captions often
leave the colour or the shape unsaid: a model trained here must fill in those choices from
the planted priors, which is what the ICM workflow then localizes and steers.

Geometry: the image spans ``[0, image_size]`` in continuous pixel units; pixel ``(row i,
column j)`` has its centre at ``(x, y) = (j + 0.5, i + 0.5)``. A pixel belongs to a shape if
its centre does (hard edges, no anti-aliasing).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
}
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
CAPTION_KINDS: tuple[str, ...] = ("full", "shape", "color", "none")
#: Every word a caption can hold; the toy tokenizer is built from it.
VOCABULARY: tuple[str, ...] = ("a", "shape", *SHAPES, *COLORS)

_TOL = 1e-6


def _default_shape_probs() -> dict[str, float]:
    return {s: 1.0 / len(SHAPES) for s in SHAPES}


def _default_color_given_shape() -> dict[str, dict[str, float]]:
    return {
        "circle": {"red": 0.8, "green": 0.1, "blue": 0.1},
        "square": {"blue": 0.8, "red": 0.1, "green": 0.1},
        "triangle": {"red": 1 / 3, "green": 1 / 3, "blue": 1 / 3},
    }


def _default_caption_probs() -> dict[str, float]:
    return {"full": 0.4, "shape": 0.3, "color": 0.2, "none": 0.1}


def _check_probs(name: str, probs: Mapping[str, float], known: Sequence[str]) -> None:
    unknown = set(probs) - set(known)
    if unknown:
        raise ValueError(f"{name}: unknown names {sorted(unknown)}; known: {list(known)}")
    if any(p < 0 for p in probs.values()):
        raise ValueError(f"{name}: negative probability in {dict(probs)}")
    total = sum(probs.values())
    if abs(total - 1.0) > _TOL:
        raise ValueError(f"{name}: probabilities sum to {total}, not 1")


def _ordered(probs: Mapping[str, float], order: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Names and probabilities in canonical order, so sampling ignores dict insertion order."""
    names = [n for n in order if n in probs]
    return names, np.array([probs[n] for n in names], dtype=np.float64)


@dataclass(frozen=True)
class WorldConfig:
    """The world's generative distribution; recorded (as JSON) beside anything trained on it."""

    image_size: int = 16
    min_size: int = 8  # shape extent in pixels: circle diameter, square side, triangle base/height
    max_size: int = 14
    shape_probs: dict[str, float] = field(default_factory=_default_shape_probs)
    color_given_shape: dict[str, dict[str, float]] = field(
        default_factory=_default_color_given_shape
    )
    caption_probs: dict[str, float] = field(default_factory=_default_caption_probs)

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size <= self.image_size:
            raise ValueError(
                f"need 1 <= min_size <= max_size <= image_size, got "
                f"{self.min_size}, {self.max_size}, {self.image_size}"
            )
        _check_probs("shape_probs", self.shape_probs, SHAPES)
        _check_probs("caption_probs", self.caption_probs, CAPTION_KINDS)
        missing = [s for s in self.shape_probs if s not in self.color_given_shape]
        if missing:
            raise ValueError(f"color_given_shape lacks shapes {missing}")
        unknown = set(self.color_given_shape) - set(SHAPES)
        if unknown:
            raise ValueError(f"color_given_shape: unknown shapes {sorted(unknown)}")
        for shape, probs in self.color_given_shape.items():
            _check_probs(f"color_given_shape[{shape!r}]", probs, tuple(COLORS))
        # Own plain-float copies, so a caller mutating its dicts cannot change a frozen config.
        object.__setattr__(self, "shape_probs", {k: float(v) for k, v in self.shape_probs.items()})
        object.__setattr__(
            self, "caption_probs", {k: float(v) for k, v in self.caption_probs.items()}
        )
        object.__setattr__(
            self,
            "color_given_shape",
            {s: {c: float(p) for c, p in d.items()} for s, d in self.color_given_shape.items()},
        )

    def __hash__(self) -> int:  # dict fields: hash the canonical JSON, so configs can key caches
        return hash(self.to_json())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> WorldConfig:
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> WorldConfig:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    cx: float  # centre of the shape's bounding box, pixel units
    cy: float
    size: int  # extent in pixels


def sample_scene(rng: np.random.Generator, config: WorldConfig) -> Scene:
    """Shape, then colour given shape, then size, then a centre keeping the shape inside."""
    shapes, p = _ordered(config.shape_probs, SHAPES)
    shape = shapes[rng.choice(len(shapes), p=p)]
    colors, p = _ordered(config.color_given_shape[shape], tuple(COLORS))
    color = colors[rng.choice(len(colors), p=p)]
    size = int(rng.integers(config.min_size, config.max_size + 1))
    half = size / 2
    cx = float(rng.uniform(half, config.image_size - half))
    cy = float(rng.uniform(half, config.image_size - half))
    return Scene(shape, color, cx, cy, size)


def shape_masks(
    shape: str, cx: np.ndarray, cy: np.ndarray, size: np.ndarray, image_size: int
) -> np.ndarray:
    """Masks (K, H, W) for K parameter sets at once (the oracle fits templates with this)."""
    cx, cy, size = (np.asarray(v, dtype=np.float64).reshape(-1, 1, 1) for v in (cx, cy, size))
    centres = np.arange(image_size, dtype=np.float64) + 0.5
    x = centres.reshape(1, 1, -1)
    y = centres.reshape(1, -1, 1)
    half = size / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if shape == "triangle":
        # Apex at the top (y = cy - half), base at the bottom; base width = height = size.
        depth = y - (cy - half)
        return (depth >= 0) & (y <= cy + half) & (np.abs(x - cx) <= depth / 2)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def shape_mask(shape: str, cx: float, cy: float, size: float, image_size: int) -> np.ndarray:
    """Boolean (H, W) mask of one shape (hard edges)."""
    return shape_masks(shape, cx, cy, size, image_size)[0]


def render(scene: Scene, image_size: int) -> np.ndarray:
    """uint8 (H, W, 3): the background with the scene's shape filled in its colour."""
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[shape_mask(scene.shape, scene.cx, scene.cy, scene.size, image_size)] = COLORS[scene.color]
    return image


def caption(scene: Scene, kind: str) -> str:
    """'a red circle' (full), 'a circle' (shape), 'a red shape' (color), 'a shape' (none)."""
    if kind == "full":
        return f"a {scene.color} {scene.shape}"
    if kind == "shape":
        return f"a {scene.shape}"
    if kind == "color":
        return f"a {scene.color} shape"
    if kind == "none":
        return "a shape"
    raise ValueError(f"unknown caption kind {kind!r}; known: {CAPTION_KINDS}")


def prompt_attributes(prompt: str) -> dict[str, str | None]:
    """The shape and colour a prompt names (first of each; plurals accepted), else None."""
    found: dict[str, str | None] = {"shape": None, "color": None}
    for word in re.findall(r"[a-z]+", prompt.lower()):
        for key, names in (("shape", SHAPES), ("color", tuple(COLORS))):
            if found[key] is None:
                for name in names:
                    if word in (name, name + "s"):
                        found[key] = name
    return found


@dataclass
class ToyDataset:
    images: np.ndarray  # uint8 (N, H, W, 3)
    captions: list[str]
    shapes: list[str]
    colors: list[str]
    caption_kinds: list[str]
    scenes: list[Scene]  # full ground truth (position and size too)

    def __len__(self) -> int:
        return len(self.captions)


def make_dataset(n: int, seed: int, config: WorldConfig | None = None) -> ToyDataset:
    """n captioned images, a pure function of (n, seed, config): sample i never depends on n."""
    config = config or WorldConfig()
    rng = np.random.default_rng(seed)
    kinds, kind_p = _ordered(config.caption_probs, CAPTION_KINDS)
    images = np.empty((n, config.image_size, config.image_size, 3), dtype=np.uint8)
    scenes, captions, chosen = [], [], []
    for i in range(n):
        scene = sample_scene(rng, config)
        kind = kinds[rng.choice(len(kinds), p=kind_p)]
        images[i] = render(scene, config.image_size)
        scenes.append(scene)
        chosen.append(kind)
        captions.append(caption(scene, kind))
    return ToyDataset(
        images=images,
        captions=captions,
        shapes=[s.shape for s in scenes],
        colors=[s.color for s in scenes],
        caption_kinds=chosen,
        scenes=scenes,
    )


def gaussian_blur(images: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of float (N, H, W, C) images, one sigma per image (0: none)."""
    images = np.asarray(images, dtype=np.float64)
    n = images.shape[0]
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n,))
    radius = max(1, int(np.ceil(3 * sigma.max())))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    safe = np.where(sigma > 0, sigma, 1.0)[:, None]
    kernels = np.where(sigma[:, None] > 0, np.exp(-0.5 * (offsets / safe) ** 2), offsets == 0)
    kernels = kernels / kernels.sum(axis=1, keepdims=True)
    out = images
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        windows = np.lib.stride_tricks.sliding_window_view(
            np.pad(out, pad, mode="edge"), 2 * radius + 1, axis=axis
        )
        out = np.einsum("nhwck,nk->nhwc", windows, kernels)
    return out


def degrade(
    images: np.ndarray,
    rng: np.random.Generator,
    blur_sigma: float | np.ndarray = 0.6,
    noise_std: float | np.ndarray = 12.0,
    max_shift: float | np.ndarray = 25.0,
) -> np.ndarray:
    """Imitate a generator's flaws: blur, per-pixel noise, a global colour shift per image.

    images: uint8 (N, H, W, 3). The shift is uniform in [-max_shift, max_shift] per image and
    channel. Each parameter may be a per-image array (for random augmentation). Returns uint8.
    """
    images = np.asarray(images)
    n = images.shape[0]

    def per_image(value: float | np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).reshape(n, 1, 1, 1)

    out = gaussian_blur(images.astype(np.float64), blur_sigma)
    out = out + rng.normal(size=out.shape) * per_image(noise_std)
    out = out + rng.uniform(-1.0, 1.0, size=(n, 1, 1, 3)) * per_image(max_shift)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
