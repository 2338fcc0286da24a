"""A tiny CNN whose pooled features stand in for Inception/CLIP features in the toy world.

Real Inception or CLIP weights are unavailable offline and know nothing of 16-px shapes, so
FID-style and image-similarity metrics use features of a net trained here to tell shape,
colour and position apart. Two coordinate channels are appended to the input (CoordConv),
so the globally pooled features still carry where the shape is. Training sees randomly
degraded images (blur, noise, colour cast) so that features stay meaningful on generated
images. Weights go to safetensors with a JSON sidecar; never pickles.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from icm.toy.world import COLORS, SHAPES, ToyDataset, WorldConfig, degrade, make_dataset

FORMAT = "icm-toy-feature-net/1"
HEADS: dict[str, int] = {"shape": len(SHAPES), "color": len(COLORS), "position": 4}


@dataclass(frozen=True)
class FeatureNetArch:
    """Architecture hyper-parameters, recorded in the sidecar so load rebuilds the same net."""

    channels: tuple[int, ...] = (16, 32, 64)  # one stage each; stages after the first halve H, W
    feature_dim: int = 64


class ToyFeatureNet(nn.Module):
    """Conv stages -> global average pool -> feature_dim features, with linear heads."""

    def __init__(self, arch: FeatureNetArch | None = None) -> None:
        super().__init__()
        self.arch = arch or FeatureNetArch()
        layers: list[nn.Module] = []
        c_in = 3 + 2  # RGB + (x, y) coordinates
        for i, c in enumerate(self.arch.channels):
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
            c_in = c
        if c_in != self.arch.feature_dim:
            layers += [nn.Conv2d(c_in, self.arch.feature_dim, 1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(
            {k: nn.Linear(self.arch.feature_dim, n) for k, n in HEADS.items()}
        )
        #: Provenance (world config, accuracies, training settings); saved in the sidecar.
        self.info: dict = {}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, feature_dim)."""
        n, _, h, w = x.shape
        ys = (
            torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
            .view(1, 1, h, 1)
            .expand(n, 1, h, w)
        )
        xs = (
            torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
            .view(1, 1, 1, w)
            .expand(n, 1, h, w)
        )
        return self.body(torch.cat([x, xs, ys], dim=1)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head, keyed by head name."""
        f = self.forward_features(x)
        return {k: head(f) for k, head in self.heads.items()}


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3), or float in [0, 1], -> float (N, 3, H, W) in [-1, 1]."""
    images = np.asarray(images)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x.div(127.5).sub(1.0) if images.dtype == np.uint8 else x.mul(2.0).sub(1.0)


def head_targets(data: ToyDataset, image_size: int) -> dict[str, np.ndarray]:
    """Class indices per head; position is the quadrant of the shape's centre (row-major)."""
    half = image_size / 2
    return {
        "shape": np.array([SHAPES.index(s) for s in data.shapes]),
        "color": np.array([list(COLORS).index(c) for c in data.colors]),
        "position": np.array([2 * (s.cy >= half) + (s.cx >= half) for s in data.scenes]),
    }


def random_degrade(images: np.ndarray, rng: np.random.Generator, p: float = 0.7) -> np.ndarray:
    """Degrade a random fraction p of images, each at a random strength.

    Strengths reach ~1.5x the oracle test's (sigma 0.6, noise 12, shift 25), so the features
    stay meaningful on generated images that are somewhat worse than that.
    """
    n = len(images)
    on = rng.random(n) < p
    return degrade(
        images,
        rng,
        blur_sigma=on * rng.uniform(0.0, 0.9, n),
        noise_std=on * rng.uniform(0.0, 18.0, n),
        max_shift=on * rng.uniform(0.0, 35.0, n),
    )


@torch.no_grad()
def head_accuracies(
    net: ToyFeatureNet, images: np.ndarray, targets: dict[str, np.ndarray]
) -> dict[str, float]:
    """Fraction of images each head gets right."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    preds: dict[str, list[np.ndarray]] = {k: [] for k in HEADS}
    for i in range(0, len(images), 512):
        logits = net(to_input(images[i : i + 512]).to(device))
        for k in HEADS:
            preds[k].append(logits[k].argmax(1).cpu().numpy())
    net.train(was_training)
    return {k: float(np.mean(np.concatenate(preds[k]) == targets[k])) for k in HEADS}


def _seed_for(seed: int, purpose: int) -> int:
    """Independent dataset seeds per purpose (train / held-out / augmentation) from one seed."""
    return int(np.random.SeedSequence([seed, purpose]).generate_state(1)[0])


def train_feature_net(
    config: WorldConfig | None = None,
    n_train: int = 20000,
    steps: int = 2000,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 128,
    lr: float = 3e-3,
    n_eval: int = 2000,
    arch: FeatureNetArch | None = None,
    num_threads: int | None = None,
    device: str | torch.device = "cpu",
) -> ToyFeatureNet:
    """Train all heads jointly (summed cross-entropy) on a fresh make_dataset sample.

    Deterministic from seed on CPU; the caller's global torch RNG is left untouched.
    ``num_threads`` sets torch's CPU threads for the call only. Held-out accuracies (clean
    and degraded images) land in ``net.info["accuracies"]``.
    """
    config = config or WorldConfig()
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = ToyFeatureNet(arch).to(device)
            start = time.perf_counter()
            train = make_dataset(n_train, _seed_for(seed, 0), config)
            targets = {
                k: torch.from_numpy(v) for k, v in head_targets(train, config.image_size).items()
            }
            rng = np.random.default_rng(_seed_for(seed, 1))
            opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
            warmup = max(1, steps // 20)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt,
                lambda s: (
                    min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))
                ),
            )
            net.train()
            for step in range(steps):
                idx = rng.integers(0, n_train, batch_size)
                x = to_input(random_degrade(train.images[idx], rng)).to(device)
                logits = net(x)
                losses = {k: F.cross_entropy(logits[k], targets[k][idx].to(device)) for k in HEADS}
                loss = sum(losses.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if progress and (step % max(1, steps // 10) == 0 or step == steps - 1):
                    parts = " ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
                    print(
                        f"step {step + 1}/{steps} loss {loss.item():.3f} ({parts}) "
                        f"{time.perf_counter() - start:.0f}s",
                        flush=True,
                    )
            train_seconds = time.perf_counter() - start
            held = make_dataset(n_eval, _seed_for(seed, 2), config)
            held_targets = head_targets(held, config.image_size)
            degraded = degrade(held.images, np.random.default_rng(_seed_for(seed, 3)))
            accuracies = {
                "clean": head_accuracies(net, held.images, held_targets),
                "degraded": head_accuracies(net, degraded, held_targets),
            }
    finally:
        torch.set_num_threads(old_threads)
    net.eval()
    net.info = {
        "world_config": config.to_dict(),
        "accuracies": accuracies,
        "training": {
            "n_train": n_train, "steps": steps, "seed": seed, "batch_size": batch_size,
            "lr": lr, "n_eval": n_eval, "seconds": round(train_seconds, 1),
        },
    }  # fmt: skip
    if progress:
        print(f"held-out accuracies: {json.dumps(accuracies)}", flush=True)
    return net


def _sidecar(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_feature_net(net: ToyFeatureNet, path: str | Path) -> None:
    """Weights to ``path`` (safetensors); architecture and provenance to ``path`` with .json."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"format": FORMAT})
    sidecar = {
        "format": FORMAT,
        "architecture": asdict(net.arch),
        "torch_version": torch.__version__,
        "n_parameters": sum(p.numel() for p in net.parameters()),
        **net.info,
    }
    _sidecar(path).write_text(json.dumps(sidecar, indent=2) + "\n")


def load_feature_net(path: str | Path, device: str | torch.device = "cpu") -> ToyFeatureNet:
    """The net saved by save_feature_net, in eval mode, with its sidecar as ``net.info``."""
    sidecar = json.loads(_sidecar(path).read_text())
    if sidecar.get("format") != FORMAT:
        raise ValueError(
            f"{_sidecar(path)}: not a {FORMAT} sidecar (format {sidecar.get('format')!r})"
        )
    arch = sidecar["architecture"]
    net = ToyFeatureNet(
        FeatureNetArch(channels=tuple(arch["channels"]), feature_dim=arch["feature_dim"])
    )
    net.load_state_dict(load_file(str(path), device=str(device)))
    net.info = {k: v for k, v in sidecar.items() if k not in ("format", "architecture")}
    return net.to(device).eval()


@torch.no_grad()
def extract_features(
    net: ToyFeatureNet, images: np.ndarray | Sequence[np.ndarray], batch: int = 256
) -> np.ndarray:
    """float32 (N, feature_dim) pooled features of uint8 (N, H, W, 3) images, in eval mode."""
    images = np.asarray(images)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    out = [
        net.forward_features(to_input(images[i : i + batch]).to(device)).float().cpu().numpy()
        for i in range(0, len(images), batch)
    ]
    net.train(was_training)
    if not out:
        return np.zeros((0, net.arch.feature_dim), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)
