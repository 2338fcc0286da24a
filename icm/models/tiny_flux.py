"""A random-weight FLUX.1-dev-architecture pipeline, built offline (tokenizers in code).

Two double-stream and two single-stream blocks with a guidance embedding, a one-level VAE
with one latent channel (packed 2 x 2 into the transformer's 4 input channels), CLIP and T5
text encoders, and FLUX's flow-matching Euler scheduler with its dynamic shift.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from icm.models.tiny import TINY_WORDS, tiny_text_encoder_config
from icm.models.tokenizer import build_clip_tokenizer


def build_t5_tokenizer(words: tuple[str, ...] = TINY_WORDS) -> T5TokenizerFast:
    """A T5 (unigram) tokenizer whose pieces are ``words``: one token per word."""
    pieces = ["<pad>", "</s>", "<unk>"] + ["\u2581" + w for w in words]
    return T5TokenizerFast(vocab=[(p, 0.0) for p in pieces], extra_ids=0)


def build_tiny_flux(seed: int = 0, device: str | torch.device = "cpu") -> FluxPipeline:
    """The tiny FLUX pipeline with seeded random weights, every component in eval mode."""
    tokenizer, tokenizer_2 = build_clip_tokenizer(words=TINY_WORDS), build_t5_tokenizer()
    text = tiny_text_encoder_config(len(tokenizer), tokenizer.bos_token_id,
                                    tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
        torch.manual_seed(seed)
        vae = AutoencoderKL(block_out_channels=[32], latent_channels=1, layers_per_block=1,
                            down_block_types=["DownEncoderBlock2D"],
                            up_block_types=["UpDecoderBlock2D"], shift_factor=0.1159,
                            scaling_factor=0.3611, use_quant_conv=False,
                            use_post_quant_conv=False)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
        torch.manual_seed(seed)
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_ff=37, d_kv=8, num_layers=2,
            num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(),
                        tokenizer_2=tokenizer_2, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
