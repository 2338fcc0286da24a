"""A random-weight SANA-architecture pipeline, built offline (tokenizer in code).

Four transformer blocks (so that a selection of k = 3 sites has a choice), each with linear
self-attention (``attn1``) and softmax cross-attention (``attn2``), a two-level
deep-compression autoencoder (``AutoencoderDC``), a one-layer Gemma-2 text encoder (a
character-level tokenizer built in code), and SANA's scheduler (DPM-Solver++ on flow
sigmas, flow shift 3). Call it as SANA with ``height``/``width`` multiples of 32 and
``use_resolution_binning=False`` (there are no bins at this size; the ``tiny-sana`` config
sets it in ``pipeline_arguments``).
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
)
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast


def build_gemma_tokenizer() -> GemmaTokenizerFast:
    """A character-level Gemma tokenizer (BPE without merges over lowercase letters, digits
    and a little punctuation, each bare and word-initial): any such prompt tokenizes, and
    it survives ``save_pretrained`` / ``from_pretrained`` unchanged (a word-level backend
    does not: the Gemma class rebuilds it as BPE on load)."""
    symbols = string.ascii_lowercase + string.digits + ",.-'"
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "\u2581": 4}
    for prefix in ("", "\u2581"):
        for symbol in symbols:
            vocab[prefix + symbol] = len(vocab)
    return GemmaTokenizerFast(vocab=vocab, merges=[], pad_token="<pad>", eos_token="<eos>",
                              bos_token="<bos>", unk_token="<unk>")


def build_tiny_sana(seed: int = 0, device: str | torch.device = "cpu",
                    text_width: int = 8) -> SanaPipeline:
    """The tiny SANA pipeline with seeded random weights, every component in eval mode.
    ``text_width``: the Gemma encoder's width (SANA's ``caption_channels``); the default
    equals the attention width, as the workflow's replica has it; another width makes the
    caption projection change the shape, as real SANA's (2304 -> 2240) does."""
    tokenizer = build_gemma_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SanaTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=4, num_attention_heads=2,
            attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
            cross_attention_dim=8, caption_channels=text_width, sample_size=16)
        torch.manual_seed(seed)
        vae = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
            downsample_block_type="conv", upsample_block_type="interpolate",
            decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
        torch.manual_seed(seed)
        text_encoder = Gemma2Model(Gemma2Config(
            hidden_size=text_width, head_dim=16, vocab_size=len(tokenizer), num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
            pad_token_id=0, eos_token_id=1, bos_token_id=2))
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction",
                                            use_flow_sigmas=True)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                        transformer=transformer.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
