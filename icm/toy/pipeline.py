"""The toy text-to-image diffusion model: pixel space, diffusers parts, SD-style call.

It is a real diffusers pipeline (``save_pretrained``/``from_pretrained``) whose ``__call__``
takes the arguments the generation code passes to Stable Diffusion, batches classifier-free
guidance as ``[uncond, cond]`` and exposes ``do_classifier_free_guidance``, so capture and
steering treat it exactly like SD1.5. Its denoiser is a ``UNet2DConditionModel`` with self-
(``attn1``) and cross-attention (``attn2``) in down, mid and up blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from icm.models.tokenizer import build_clip_tokenizer

#: Longest caption ("a red triangle") is 3 words + start/end tokens.
MAX_TOKENS = 8
TEXT_WIDTH = 64


class ToyPipeline(DiffusionPipeline):
    """Pixel-space text-to-image pipeline for the toy world (images in [-1, 1])."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDIMScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(
            unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler
        )
        self._guidance_scale = 1.0

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Per-token text states (batch, MAX_TOKENS, TEXT_WIDTH); "" is the unconditional."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **unused: Any,
    ) -> ImagePipelineOutput | tuple:
        if unused:
            raise TypeError(f"ToyPipeline got unsupported arguments {sorted(unused)}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        size = self.unet.config.sample_size
        height, width = height or size, width or size
        self._guidance_scale = guidance_scale
        device, dtype = self.unet.device, self.unet.dtype

        cond = self.encode_prompt(prompts).to(dtype)
        if self.do_classifier_free_guidance:
            cond = torch.cat([self.encode_prompt([""] * len(prompts)).to(dtype), cond])
        shape = (len(prompts), self.unet.config.in_channels, height, width)
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            batch = torch.cat([x, x]) if self.do_classifier_free_guidance else x
            batch = self.scheduler.scale_model_input(batch, t)
            eps = self.unet(batch, t, encoder_hidden_states=cond).sample
            if self.do_classifier_free_guidance:
                uncond_eps, cond_eps = eps.chunk(2)
                eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
            x = self.scheduler.step(eps, t, x).prev_sample

        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out: Any = images
        else:
            out = images.permute(0, 2, 3, 1).float().cpu().numpy()
            if output_type == "pil":
                out = self.numpy_to_pil(out)
            elif output_type != "np":
                raise ValueError(f"output_type must be 'pil', 'np' or 'pt', not {output_type!r}")
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def toy_unet(image_size: int = 16) -> UNet2DConditionModel:
    """Three levels (16 -> 8 -> 4 px), attention at 8 and 4 px and in the middle (none at full
    resolution, where it would cost most): 14 sites (7 attn1, 7 attn2), few enough to read a
    ranking at a glance."""
    return UNet2DConditionModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def toy_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(config)


def toy_scheduler_config() -> dict[str, Any]:
    """Cosine schedule, epsilon prediction, x0 clipped to the pixel range [-1, 1]."""
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "epsilon",
        "clip_sample": True,
        "set_alpha_to_one": True,
        "timestep_spacing": "trailing",
    }


def build_toy_pipeline(words: Sequence[str], image_size: int = 16, seed: int = 0) -> ToyPipeline:
    """An untrained toy pipeline; training fills in the weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer = build_clip_tokenizer(words=words, model_max_length=MAX_TOKENS)
        pipe = ToyPipeline(
            unet=toy_unet(image_size),
            text_encoder=toy_text_encoder(tokenizer),
            tokenizer=tokenizer,
            scheduler=DDIMScheduler(**toy_scheduler_config()),
        )
    return pipe


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the model's pixel range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
