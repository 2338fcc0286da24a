"""Model construction and loading: real checkpoints, and offline SD1.5 stand-ins."""

from icm.models.configs import (
    sd15_scheduler_config,
    sd15_text_encoder_config,
    sd15_unet_config,
    sd15_vae_config,
)
from icm.models.loading import ModelNotAvailableError, ModelSpec, load_pipeline
from icm.models.tiny import build_sd15_pipeline, build_sd15_unet_on_meta, save_tiny_sd15
from icm.models.tokenizer import build_clip_tokenizer

__all__ = [
    "ModelNotAvailableError",
    "ModelSpec",
    "build_clip_tokenizer",
    "build_sd15_pipeline",
    "build_sd15_unet_on_meta",
    "load_pipeline",
    "save_tiny_sd15",
    "sd15_scheduler_config",
    "sd15_text_encoder_config",
    "sd15_unet_config",
    "sd15_vae_config",
]
