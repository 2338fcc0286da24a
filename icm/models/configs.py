"""Full-size component configs, written out so no hub access is needed: SD1.5 (every
component), and the denoisers of SDXL base, SANA 1600M and FLUX.1-dev.

Values follow the checkpoints' ``*/config.json`` files (``stable-diffusion-v1-5``,
``stable-diffusion-xl-base-1.0``, ``Sana_1600M_1024px_diffusers``, ``FLUX.1-dev``); version
and provenance keys, and keys at their diffusers default, are dropped. They let us build the
full-size architecture (random weights, or on the meta device) to plan capture sites and
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


def sdxl_unet_config() -> dict[str, Any]:
    """SDXL base 1.0 ``unet/config.json``: 3 levels, 1/2/10 transformer layers per attention
    (70 ``attn1`` + 70 ``attn2``), text-and-time added conditioning."""
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    }


def sana_transformer_config() -> dict[str, Any]:
    """SANA 1600M 1024px ``transformer/config.json``: 20 blocks of width 2240, each with
    linear self-attention (``attn1``) and softmax cross-attention (``attn2``)."""
    return {
        "_class_name": "SanaTransformer2DModel",
        "attention_bias": False,
        "attention_head_dim": 32,
        "caption_channels": 2304,
        "cross_attention_dim": 2240,
        "cross_attention_head_dim": 112,
        "in_channels": 32,
        "mlp_ratio": 2.5,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-06,
        "num_attention_heads": 70,
        "num_cross_attention_heads": 20,
        "num_layers": 20,
        "out_channels": 32,
        "patch_size": 1,
        "sample_size": 32,
    }


def flux_transformer_config() -> dict[str, Any]:
    """FLUX.1-dev ``transformer/config.json``: 19 double-stream and 38 single-stream blocks
    of width 3072 (24 heads of 128), with a guidance embedding."""
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "patch_size": 1,
        "pooled_projection_dim": 768,
    }


#: The full-size denoiser config of each family (the toy's is its committed folder's).
DENOISER_CONFIGS = {
    "sd15": sd15_unet_config,
    "sdxl": sdxl_unet_config,
    "sana": sana_transformer_config,
    "flux": flux_transformer_config,
}
