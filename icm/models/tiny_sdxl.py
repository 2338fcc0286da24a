"""A random-weight SDXL-architecture pipeline, built offline (tokenizers in code).

SDXL's layout in miniature: a UNet whose first level has no attention, 1 and 2 transformer
layers per attention level, text-and-time added conditioning, two CLIP text encoders (the
second with a projection, whose pooled output conditions the UNet) concatenated into the
cross-attention context, and SDXL's default scheduler (Euler discrete, SDXL's config).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from icm.models.configs import sdxl_unet_config
from icm.models.tiny import TINY_WORDS, tiny_text_encoder_config, tiny_vae_config
from icm.models.tokenizer import build_clip_tokenizer


def tiny_sdxl_unet_config() -> dict[str, Any]:
    """SDXL's UNet shrunk: two levels (the first without attention, as SDXL's), 1 and 2
    transformer layers, cross-attention over both encoders' 32 + 32 channels."""
    return sdxl_unet_config() | {
        "attention_head_dim": [2, 4],
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2],
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,  # 6 time ids + pooled text
        "cross_attention_dim": 64,
        "norm_num_groups": 1,
        "sample_size": 16,
    }


def sdxl_scheduler_config() -> dict[str, Any]:
    """SDXL base 1.0 ``scheduler/scheduler_config.json`` (Euler discrete)."""
    return {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "interpolation_type": "linear", "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
            "trained_betas": None, "use_karras_sigmas": False}


def build_tiny_sdxl(seed: int = 0, device: str | torch.device = "cpu") -> StableDiffusionXLPipeline:
    """The tiny SDXL pipeline with seeded random weights, every component in eval mode."""
    tokenizer = build_clip_tokenizer(words=TINY_WORDS)
    tokenizer_2 = build_clip_tokenizer(words=TINY_WORDS)
    text = tiny_text_encoder_config(len(tokenizer), tokenizer.bos_token_id,
                                    tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(tiny_sdxl_unet_config())
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(tiny_vae_config())
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(sdxl_scheduler_config()),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
