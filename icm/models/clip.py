"""CLIP through open_clip, built with the activation its weights were trained with.

OpenAI trained CLIP with QuickGELU; open_clip's plain ``ViT-L-14`` uses GELU, and building
it with ``pretrained="openai"`` only warns, while a local checkpoint path (the offline case)
does not even warn: every pseudo-label, CLIP-I and CLIP-T would come from a subtly different
network. ``clip_arguments`` therefore decides the activation from the weights' open_clip
tag: the ``pretrained`` tag itself, or for a local checkpoint file the tag it was
downloaded as (``checkpoint_tag``, required there), and refuses a tag the model name does
not have (a ``-quickgelu`` name with GELU-trained weights among them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


class MetricBackendNotAvailableError(RuntimeError):
    """A metric's model weights are missing; raised before any image is processed."""


def clip_arguments(model: str, pretrained: str | None,
                   checkpoint_tag: str | None = None) -> dict[str, Any]:
    """Keyword arguments for ``open_clip.create_model_and_transforms`` beyond the model name
    and ``pretrained``: ``force_quick_gelu`` when the weights were trained with QuickGELU.

    ``checkpoint_tag``: the open_clip tag a local checkpoint file holds (e.g. ``openai``);
    required when ``pretrained`` is a file, and with ``pretrained=None`` (random weights,
    tests) it builds the architecture those weights need.
    """
    from open_clip.factory import get_model_config
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    config = get_model_config(model)
    if config is None:
        raise ValueError(f"unknown open_clip model {model!r}")
    tags = list_pretrained_tags_by_model(model)
    if pretrained is not None and pretrained in tags:
        if checkpoint_tag not in (None, pretrained):
            raise ValueError(f"CLIP weights {pretrained!r} are a tag, but checkpoint_tag says "
                             f"{checkpoint_tag!r}; drop checkpoint_tag or make them agree")
        tag: str | None = pretrained
    elif pretrained is not None and os.path.isfile(pretrained):
        if checkpoint_tag is None:
            raise ValueError(
                f"CLIP checkpoint file {pretrained!r}: say which weights it holds with "
                f"`checkpoint_tag` in config.yaml (the open_clip tag it was downloaded as, "
                f"e.g. openai; {model} tags: {', '.join(tags) or 'none'}). OpenAI's weights "
                "need QuickGELU, most others GELU, and the file does not say which.")
        tag = checkpoint_tag
    elif pretrained is not None:
        raise MetricBackendNotAvailableError(
            f"CLIP weights {pretrained!r} for {model!r} are neither a known tag "
            f"({', '.join(tags) or 'none'}) nor a local file. Offline, pass `pretrained` as a "
            "local checkpoint file (e.g. open_clip_pytorch_model.bin downloaded on a machine "
            "with internet) and set `checkpoint_tag`.")
    else:
        tag = checkpoint_tag
    if tag is None:
        return {}
    tag_config = get_pretrained_cfg(model, tag)
    if not tag_config:
        raise ValueError(f"open_clip model {model!r} has no pretrained tag {tag!r}; its tags: "
                         f"{', '.join(tags) or 'none'}")
    # open_clip lists for each model name the tags of its activation only (plus OpenAI's
    # under the plain names), so a -quickgelu name with GELU weights fails just above.
    return {"force_quick_gelu": True} if tag_config.get("quick_gelu", False) else {}


def uses_quick_gelu(network: torch.nn.Module) -> bool:
    """Whether every GELU-family activation of ``network`` is QuickGELU."""
    kinds = {type(m).__name__ for m in network.modules() if "GELU" in type(m).__name__}
    return kinds == {"QuickGELU"}


class ClipEmbedder:
    """open_clip image and text towers; embeddings are L2-normalised float32 numpy rows."""

    RANDOM_WEIGHTS_SEED = 0

    def __init__(
        self,
        model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        device: str = "cpu",
        batch_size: int = 32,
        checkpoint_tag: str | None = None,
    ) -> None:
        import open_clip

        self.device, self.batch_size = device, batch_size
        options = clip_arguments(model, pretrained, checkpoint_tag)
        try:
            # Random weights (tests, offline mechanics) are seeded: every job that builds
            # this model gets the same one, so embeddings stored by one job (the original's,
            # for CLIP-I) compare with another's.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.RANDOM_WEIGHTS_SEED)
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=pretrained, device=device, **options)
        except Exception as error:  # open_clip raises several kinds for missing weights
            raise MetricBackendNotAvailableError(
                f"CLIP model {model!r} with weights {pretrained!r} could not be loaded: {error}\n"
                "Offline, pass `pretrained` as a local checkpoint file (e.g. "
                "open_clip_pytorch_model.bin downloaded on a machine with internet)."
            ) from error
        self.quick_gelu = uses_quick_gelu(self.model)
        activation = "QuickGELU" if self.quick_gelu else "GELU"
        self.name = f"CLIP {model} ({pretrained or 'random weights'}, {activation})"
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) unit-norm image embeddings."""
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im.convert("RGB"))
                                 for im in images[start:start + self.batch_size]])
            parts.append(self.model.encode_image(batch.to(self.device)).float().cpu())
        return self._finish(parts)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) unit-norm text embeddings."""
        parts = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]))
            parts.append(self.model.encode_text(tokens.to(self.device)).float().cpu())
        return self._finish(parts)

    def _finish(self, parts: list[torch.Tensor]) -> np.ndarray:
        """Batches -> one unit-norm array; (0, D) for no input."""
        if not parts:
            return np.zeros((0, getattr(self.model.visual, "output_dim", 0)), np.float32)
        return unit_rows(torch.cat(parts))


def unit_rows(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (a zero row stays zero)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return torch.nn.functional.normalize(x, dim=-1).numpy()
