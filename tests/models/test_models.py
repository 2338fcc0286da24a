"""icm.models: offline tokenizer, tiny SD1.5 pipeline, loading errors, full-size module names."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from icm.hooks.sites import denoiser_of
from icm.models.loading import ModelNotAvailableError, ModelSpec, load_pipeline
from icm.models.tiny import build_sd15_pipeline, build_sd15_unet_on_meta, save_tiny_sd15
from icm.models.tokenizer import build_clip_tokenizer

PROMPTS = ["a photo of a person"] * 2
GEN_KW = dict(num_inference_steps=3, height=32, width=32, guidance_scale=7.5, output_type="np")


def _generate(pipe, seed: int = 0) -> np.ndarray:
    return pipe(PROMPTS, generator=torch.Generator("cpu").manual_seed(seed), **GEN_KW).images


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    """2 CPU cores here; restore afterwards since other modules' numerics may rely on theirs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_sd15_pipeline("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15", seed=0)


def test_tokenizer_single_tokens_and_round_trip(tmp_path):
    words = ["a", "red", "circle", "on", "person", "man", "woman"]  # shared substrings on purpose
    tok = build_clip_tokenizer(tmp_path / "src", words=words, model_max_length=77)
    assert (tmp_path / "src" / "merges.txt").read_text().startswith("#version: 0.2\n")
    for word in words:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == [f"{word}</w>"]
    ids = tok("a red circle")["input_ids"]
    assert len(ids) == 5 and max(ids) < len(tok)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>" and tok.model_max_length == 77
    assert tok("zebra")["input_ids"][1:-1]  # unknown words still encode (as bytes)

    tok.save_pretrained(tmp_path / "saved")
    again = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    assert len(again) == len(tok) and again.model_max_length == 77
    for text in ["a red circle", "a photo of a woman, portrait!"]:
        padded = dict(padding="max_length", max_length=77, truncation=True)
        assert again(text, **padded)["input_ids"] == tok(text, **padded)["input_ids"]


def test_tiny_pipeline_is_deterministic(tiny_pipe):
    assert denoiser_of(tiny_pipe) is tiny_pipe.unet
    first, second = _generate(tiny_pipe), _generate(tiny_pipe)
    assert first.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, _generate(tiny_pipe, seed=1))
    rebuilt = build_sd15_pipeline("tiny", seed=0)
    np.testing.assert_array_equal(first, _generate(rebuilt))


def test_tiny_has_attention_in_down_mid_up(tiny_pipe):
    names = [n for n, _ in tiny_pipe.unet.named_modules() if n.endswith((".attn1", ".attn2"))]
    for prefix in ("down_blocks.", "mid_block.", "up_blocks."):
        assert any(n.startswith(prefix) and n.endswith("attn1") for n in names)
        assert any(n.startswith(prefix) and n.endswith("attn2") for n in names)


def test_saved_tiny_loads_bit_identical(tiny_pipe, tiny_dir):
    assert (tiny_dir / "model_index.json").is_file()
    assert not list(tiny_dir.parent.glob(".tiny-sd15.*"))  # temp sibling renamed away
    assert list(tiny_dir.rglob("*.safetensors")) and not list(tiny_dir.rglob("*.bin"))
    spec = ModelSpec(name="tiny", family="sd15", source=str(tiny_dir), dtype="float32")
    loaded = load_pipeline(spec, device="cpu")
    np.testing.assert_array_equal(_generate(loaded), _generate(tiny_pipe))


def test_model_spec_from_config():
    entry = {"family": "sd15", "source": "x/y", "dtype": "float32", "steps": "4",
             "batch_size": 8, "resources": {"gpu": 0}}  # fmt: skip
    spec = ModelSpec.from_config("tiny", entry)
    assert spec.name == "tiny" and spec.steps == 4 and spec.scheduler == "default"
    assert spec.variant is None and spec.source == "x/y"
    with pytest.raises(ValueError, match="source"):
        ModelSpec.from_config("tiny", {"family": "sd15"})
    with pytest.raises(ValueError, match="family"):
        ModelSpec.from_config("tiny", {"family": "dalle", "source": "x/y"})
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec.from_config("tiny", {"family": "sd15", "source": "x/y", "dtype": "int8"})


def test_missing_local_path_raises(tmp_path):
    missing = tmp_path / "no" / "such-model"
    spec = ModelSpec(name="ghost", family="sd15", source=str(missing), dtype="float32")
    with pytest.raises(ModelNotAvailableError, match="such-model") as info:
        load_pipeline(spec, device="cpu")
    assert str(missing) in str(info.value)


def test_unknown_hub_id_offline_raises(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so patch the constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = ModelSpec(
        name="nothing", family="sd15", source="nobody-xyz/not-a-model", dtype="float32"
    )
    with pytest.raises(ModelNotAvailableError) as info:
        load_pipeline(spec, device="cpu")
    message = str(info.value)
    assert "nobody-xyz/not-a-model" in message and "config.yaml" in message
    assert "models.nothing.source" in message
    assert huggingface_hub.constants.HF_HUB_CACHE in message
    assert info.value.__cause__ is not None


def test_unknown_scheduler_raises(tiny_dir):
    spec = ModelSpec("tiny", "sd15", str(tiny_dir), "float32", scheduler="NoSuchScheduler")
    with pytest.raises(ValueError, match="NoSuchScheduler"):
        load_pipeline(spec, device="cpu")


def test_scheduler_swap(tiny_dir):
    spec = ModelSpec("tiny", "sd15", str(tiny_dir), "float32", scheduler="EulerDiscreteScheduler")
    pipe = load_pipeline(spec, device="cpu")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"


def test_float16_on_cpu_falls_back_to_float32(tiny_dir):
    spec = ModelSpec(name="tiny", family="sd15", source=str(tiny_dir), dtype="float16")
    with pytest.warns(UserWarning, match="float16"):
        pipe = load_pipeline(spec, device="cpu")
    assert pipe.unet.dtype == torch.float32


EXPECTED_SD15_ATTENTION_SITES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn1",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "down_blocks.2.attentions.0.transformer_blocks.0.attn1",
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.2.attentions.1.transformer_blocks.0.attn1",
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
    "mid_block.attentions.0.transformer_blocks.0.attn1",
    "mid_block.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn1",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.2.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.2.transformer_blocks.0.attn1",
    "up_blocks.2.attentions.2.transformer_blocks.0.attn2",
    "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
    "up_blocks.3.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.3.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn1",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2",
]


def test_full_sd15_unet_on_meta_golden_sites():
    unet = build_sd15_unet_on_meta()
    names = sorted(n for n, _ in unet.named_modules() if n.endswith((".attn1", ".attn2")))
    assert names == EXPECTED_SD15_ATTENTION_SITES
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # the real SD1.5 UNet


def test_a_denoiser_of_another_family_stops_at_load(tiny_dir):
    """The configured family must be the loaded model's: tiny SD1.5 configured as SDXL or
    FLUX is refused naming both, and SD3's MMDiT transformer is refused in one sentence
    (never read as a UNet: `family_of` knows no such class)."""
    from diffusers import SD3Transformer2DModel

    from icm.models.families import family_of
    from icm.models.loading import check_denoiser

    with pytest.raises(ValueError, match="configured as family 'sdxl' but is a "
                                         "StableDiffusionPipeline, family sd15's"):
        load_pipeline(ModelSpec("tiny", "sdxl", str(tiny_dir), "float32"), device="cpu")
    with pytest.raises(ValueError, match=r"family 'flux', whose denoiser \(pipe.transformer\) "
                                         "is a FluxTransformer2DModel, but it loaded a "
                                         "UNet2DConditionModel; it is family sd15's"):
        load_pipeline(ModelSpec("tiny", "flux", str(tiny_dir), "float32"), device="cpu")
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                attention_head_dim=8, num_attention_heads=2,
                                joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)
    pipe = type("StableDiffusion3Pipeline", (), {"transformer": sd3})()
    with pytest.raises(ValueError, match="its denoiser is SD3Transformer2DModel. Stable "
                                         "Diffusion 3 and 3.5 .* are not supported"):
        check_denoiser(pipe, ModelSpec("sd3", "sd15", "x/y", "float32"))
    with pytest.raises(ValueError, match="no family has the denoiser class "
                                         "SD3Transformer2DModel"):
        family_of(sd3)
