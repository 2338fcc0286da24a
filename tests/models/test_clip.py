"""CLIP as OpenAI trained it: OpenAI's weights always run with QuickGELU, tag or file."""

from __future__ import annotations

import open_clip
import pytest
import torch

from icm.models.clip import ClipEmbedder, clip_arguments, uses_quick_gelu


def build_on_meta(model: str, **options) -> torch.nn.Module:
    """The architecture open_clip builds for ``options``, without memory for its weights."""
    with torch.device("meta"):
        return open_clip.create_model(model, pretrained=None, device="meta", **options)


def test_openai_tag_builds_quick_gelu_and_other_tags_gelu():
    openai = clip_arguments("ViT-L-14", "openai")
    assert openai == {"force_quick_gelu": True}
    assert uses_quick_gelu(build_on_meta("ViT-L-14", **openai))
    assert not uses_quick_gelu(build_on_meta("ViT-L-14"))  # open_clip's plain default: GELU
    assert clip_arguments("ViT-L-14", None, checkpoint_tag="laion2b_s32b_b82k") == {}
    assert clip_arguments("ViT-L-14-quickgelu", None, checkpoint_tag="openai") == \
        {"force_quick_gelu": True}


def test_a_local_checkpoint_says_which_weights_it_holds(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "clip.safetensors"
    network = open_clip.create_model("RN50", pretrained=None)
    save_file({k: v.half().contiguous() for k, v in network.state_dict().items()}, path)
    with pytest.raises(ValueError, match="checkpoint_tag"):
        ClipEmbedder("RN50", str(path))  # an OpenAI file looks like any other
    embedder = ClipEmbedder("RN50", str(path), checkpoint_tag="openai")
    assert embedder.quick_gelu and "QuickGELU" in embedder.name
    with pytest.raises(ValueError, match="no pretrained tag 'laion"):
        clip_arguments("RN50", str(path), checkpoint_tag="laion2b_s32b_b82k")
    with pytest.raises(ValueError, match="no pretrained tag 'laion2b_s32b_b82k'"):  # GELU
        clip_arguments("ViT-L-14-quickgelu", str(path), checkpoint_tag="laion2b_s32b_b82k")
    with pytest.raises(ValueError, match="agree"):
        clip_arguments("ViT-L-14", "openai", checkpoint_tag="laion2b_s32b_b82k")


def test_random_weights_are_the_same_in_every_job():
    """A random-weight CLIP (tests, offline mechanics) is seeded, so that embeddings stored
    by one job (the original's, for CLIP-I) compare with another job's."""
    import numpy as np
    from PIL import Image

    from icm.models.clip import ClipEmbedder

    image = [Image.new("RGB", (32, 32), (200, 10, 10))]
    torch.manual_seed(123)  # whatever the caller's random state
    first = ClipEmbedder("ViT-S-32-alt", None).embed_images(image)
    state = torch.random.get_rng_state()
    second = ClipEmbedder("ViT-S-32-alt", None).embed_images(image)
    assert np.array_equal(first, second)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's stream untouched
