"""Stable Diffusion 1.5 component configs, written out so no hub access is needed.

Values follow the ``stable-diffusion-v1-5`` checkpoint's ``*/config.json`` files;
only version/provenance keys are dropped. They let us build the full-size
architecture (random weights, or on the meta device) to plan capture sites and
memory without the real weights.
"""

from __future__ import annotations

from typing import Any


def sd15_unet_config() -> dict[str, Any]:
    """``unet/config.json``: 4 levels, cross-attention in all but the deepest."""
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,  # diffusers' legacy name: this is the number of heads
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ],
    }


def sd15_vae_config() -> dict[str, Any]:
    """``vae/config.json``: 8x spatial downsampling to 4 latent channels."""
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def sd15_text_encoder_config() -> dict[str, Any]:
    """``text_encoder/config.json``: the text tower of CLIP ViT-L/14.

    ``eos_token_id=2`` is the checkpoint's historical value; transformers treats
    it as "pool at argmax(input_ids)", which is what SD1.5 was trained with.
    """
    return {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "vocab_size": 49408,
    }


def sd15_scheduler_config() -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` (PNDM); DDIM and others read the same keys."""
    return {
        "_class_name": "PNDMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }
