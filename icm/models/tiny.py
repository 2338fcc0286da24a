"""Random-weight SD1.5-architecture pipelines, built offline.

The tiny one lets tests and CI run the whole capture workflow on a CPU in
seconds with the same module layout (self- and cross-attention in down, mid and
up blocks). The full-size one and the meta-device UNet reproduce the real
model's shapes and module names without its weights. Both ship the scheduler the real
checkpoint ships (PNDM, with its config), so what the tests run is what users run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from icm.io.atomic import atomic_directory
from icm.models.configs import (
    sd15_scheduler_config,
    sd15_text_encoder_config,
    sd15_unet_config,
    sd15_vae_config,
)
from icm.models.tokenizer import build_clip_tokenizer

# Single tokens in the code-built vocabulary, so prompts over them have readable positions.
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "photo", "portrait", "person",
    "man", "woman", "doctor", "nurse", "red", "circle",
)  # fmt: skip


def tiny_unet_config() -> dict[str, Any]:
    """SD1.5's UNet shrunk to two cross-attention levels (downsample factor 2)."""
    return sd15_unet_config() | {
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "sample_size": 16,  # x vae_scale_factor 2 -> default 32 px images
    }


def tiny_vae_config() -> dict[str, Any]:
    """A two-level VAE: vae_scale_factor 2, so 32 px images have 16x16 latents."""
    return sd15_vae_config() | {
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "sample_size": 32,
    }


def tiny_text_encoder_config(vocab_size: int, bos: int, eos: int, pad: int) -> dict[str, Any]:
    """CLIP text tower with width 32 to match the tiny UNet's cross_attention_dim."""
    return sd15_text_encoder_config() | {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
        "vocab_size": vocab_size,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }


def build_sd15_pipeline(
    size: Literal["tiny", "full"] = "tiny",
    seed: int = 0,
    device: str | torch.device = "cpu",
    scheduler: str = "PNDMScheduler",
) -> StableDiffusionPipeline:
    """SD1.5-architecture pipeline with seeded random weights.

    Each component is seeded separately so changing one config leaves the
    others' weights unchanged. "full" is ~1.07 B fp32 parameters (~4.3 GB).
    ``scheduler``: a diffusers scheduler class built from SD1.5's scheduler config, as
    ``models.<name>.scheduler`` does (default: PNDM, the checkpoint's own).
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    tokenizer = build_clip_tokenizer(words=TINY_WORDS)
    if size == "tiny":
        unet_cfg, vae_cfg = tiny_unet_config(), tiny_vae_config()
        text_cfg = tiny_text_encoder_config(
            len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
    else:
        unet_cfg, vae_cfg = sd15_unet_config(), sd15_vae_config()
        text_cfg = sd15_text_encoder_config()

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_cfg)
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(vae_cfg)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))

    # eval() as from_pretrained does: a train-mode VAE decodes batches with last-bit
    # differences, which broke bit-identity between in-memory and reloaded pipelines.
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=getattr(diffusers, scheduler).from_config(sd15_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def save_replica(build: Callable[..., Any], path: Path, seed: int = 0) -> Path:
    """Save the pipeline ``build(seed=seed)`` makes as a diffusers directory, atomically (an
    interrupted build never leaves a half-written model at ``path``, which Snakemake would
    trust). Every tiny replica is saved through it."""
    with atomic_directory(path, replace=True) as partial:
        build(seed=seed).save_pretrained(partial, safe_serialization=True)
    return Path(path)


def save_tiny_sd15(path: Path, seed: int = 0) -> Path:
    """Save the tiny SD1.5 pipeline (``save_replica``)."""
    return save_replica(lambda seed: build_sd15_pipeline("tiny", seed=seed), path, seed)


def build_sd15_unet_on_meta() -> UNet2DConditionModel:
    """Full-size SD1.5 UNet with meta tensors: real module names and shapes, no memory."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(sd15_unet_config())
