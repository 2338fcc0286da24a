"""Train the toy diffusion model on the synthetic world (CPU-friendly, deterministic by seed).

Standard epsilon-prediction DDPM training with caption dropout (so classifier-free guidance
works) and an exponential moving average of the weights, which is what gets saved.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm import tqdm

from icm.io.atomic import atomic_directory
from icm.io.provenance import package_versions
from icm.toy.pipeline import ToyPipeline, build_toy_pipeline, to_model_range, toy_scheduler_config
from icm.toy.world import VOCABULARY, WorldConfig, make_dataset

RECORD = "icm_toy.json"


@dataclass(frozen=True)
class ToyTrainConfig:
    """Hyper-parameters; recorded beside the weights."""

    steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    n_train: int = 40_000
    caption_dropout: float = 0.1
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["world"] = self.world.to_dict()
        return data


def _lr_factor(step: int, config: ToyTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def train_toy(
    config: ToyTrainConfig, device: str = "cpu", progress: bool = True
) -> tuple[ToyPipeline, dict[str, Any]]:
    """Train from scratch; returns the pipeline (EMA weights) and a training record."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    data = make_dataset(config.n_train, seed=config.seed, config=config.world)
    images = to_model_range(data.images).to(device)

    pipe = build_toy_pipeline(VOCABULARY, image_size=config.world.image_size, seed=config.seed)
    pipe.to(device)
    # Tokenize once: captions are few and short, and per-step tokenization dominated small steps.
    tokenize = partial(pipe.tokenizer, padding="max_length", return_tensors="pt",
                       max_length=pipe.tokenizer.model_max_length)
    caption_ids = tokenize(data.captions).input_ids.to(device)
    empty_ids = tokenize([""]).input_ids.to(device)
    unet, text_encoder = pipe.unet.train(), pipe.text_encoder.train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in (unet, text_encoder)]
    ema_params = [p for m in ema for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    training_keys = ("num_train_timesteps", "beta_schedule", "prediction_type", "clip_sample")
    noise_schedule = DDPMScheduler(**{k: toy_scheduler_config()[k] for k in training_keys})
    generator = torch.Generator().manual_seed(config.seed)

    start, losses = time.perf_counter(), []
    bar = tqdm(range(config.steps), desc="train toy", file=sys.stderr, disable=not progress,
               mininterval=2.0)
    for step in bar:
        index = torch.from_numpy(rng.integers(0, len(images), config.batch_size)).to(device)
        x0 = images[index]
        drop = torch.from_numpy(rng.random(config.batch_size) < config.caption_dropout)
        ids = torch.where(drop.to(device)[:, None], empty_ids, caption_ids[index])
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(x0),),
                          generator=generator).to(device)
        noisy = noise_schedule.add_noise(x0, noise, t)
        states = text_encoder(ids).last_hidden_state
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=states).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - config.ema_decay)
        losses.append(loss.detach())
        if step % 100 == 99:
            bar.set_postfix(loss=f"{torch.stack(losses[-100:]).mean().item():.4f}")
    losses = [float(x) for x in torch.stack(losses).cpu()]

    trained = ToyPipeline(
        unet=ema[0], text_encoder=ema[1], tokenizer=pipe.tokenizer, scheduler=pipe.scheduler
    )
    record = {
        "train": config.to_dict(),
        "final_loss": float(np.mean(losses[-200:])),
        "loss_curve": [float(np.mean(losses[i : i + 100])) for i in range(0, len(losses), 100)],
        "wall_seconds": time.perf_counter() - start,
        "device": device,
        "threads": torch.get_num_threads(),
        "versions": package_versions(),
    }
    return trained.to("cpu"), record


def save_toy(pipe: ToyPipeline, record: dict[str, Any], path: str | Path) -> Path:
    """``save_pretrained`` (safetensors) plus the training record, moved into place at once."""
    with atomic_directory(path) as partial:
        pipe.save_pretrained(partial, safe_serialization=True)
        (partial / RECORD).write_text(json.dumps(record, indent=2))
    return Path(path)
