"""Per-head cross-attention maps of chosen prompt words, beside an ordinary pipeline call.

The maps of selective aggregation (DAAM, arXiv 2210.04885, "What the DAAM: Interpreting
Stable Diffusion Using Cross Attention", averages them over every head; the selective
variant averages only the heads most relevant to a concept)::

    with capture_head_maps(pipe, prompts, ["circle", "red"]) as maps:
        images = pipe(prompts, num_images_per_prompt=2).images
        batch = maps.pop()     # site -> (images, heads, words, y, x), float32

For every ``attn2`` site, each head's attention probabilities ``softmax(q k^T * scale)`` are
recomputed from the module's own inputs (its ``to_q`` of the image tokens, ``to_k`` of the
text tokens) in float32, for the conditional rows of the guidance batch only. On FLUX, whose
double-stream blocks attend over one joint sequence of text and image tokens (MMDiT), the
sites are those joint attentions (``transformer_blocks.N.attn``): each head's image queries'
probabilities on the text keys, from the softmax over the whole joint sequence, with the
module's own norms and rotary embedding (``joint_attention_probabilities``). The model's own
attention, fast kernel and output are left as they are, so the images do not change (tested
bit for bit). A word's map is the mean over its sub-word tokens, every occurrence; maps are
summed over the steps of the window on the device, at the site's native resolution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from icm.head_maps.tokens import encoded_tokens, word_positions
from icm.hooks.registry import CFGMode, SiteHooks
from icm.hooks.sites import denoiser_of, list_sites
from icm.models.families import KINDS, family_of, kind_of


def word_map_sites(denoiser: nn.Module) -> list[str]:
    """Where word maps are read, in forward order: every site of the family's map kind
    (``attn2``; FLUX's joint attention), none where the family has no such kind."""
    kind = family_of(denoiser).map_kind
    return list_sites(denoiser, [kind]) if kind else []


def words_per_prompt(prompts: Sequence[str],
                     words: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """The words of each prompt: one list for all (``["circle"]``), or one list per prompt
    with the same count (``[["circle", "red"], ["square", "blue"]]``: word slots)."""
    if all(isinstance(w, str) for w in words):
        return [list(words) for _ in prompts]
    per_prompt = [list(w) for w in words]
    if len(per_prompt) != len(prompts) or len({len(w) for w in per_prompt}) != 1:
        raise ValueError(f"words per prompt must be one list per prompt ({len(prompts)}), all "
                         f"of one length; got {per_prompt}")
    return per_prompt


def token_weights(pipe: Any, prompts: Sequence[str], words: Sequence[Sequence[str]],
                  arguments: Mapping[str, Any] | None = None) -> torch.Tensor:
    """(prompts, words, text positions) weights: 1 / (the word's token count) at its
    positions as the pipeline encodes the prompt (``icm.head_maps.tokens``), so that weights @
    probabilities is the mean over the word's tokens."""
    length = len(encoded_tokens(pipe, prompts[0], arguments)[0])
    out = torch.zeros(len(prompts), len(words[0]), length)
    for p, prompt in enumerate(prompts):
        for w, word in enumerate(words[p]):
            positions = word_positions(pipe, prompt, word, arguments)
            out[p, w, positions] = 1.0 / len(positions)
    return out


@dataclass
class StepWindow:
    """The steps whose maps are summed: ``start <= step < stop`` (stop None: to the end)."""

    start: int = 0
    stop: int | None = None

    def __contains__(self, step: int) -> bool:
        return step >= self.start and (self.stop is None or step < self.stop)


def attention_probabilities(module: nn.Module, hidden: torch.Tensor,
                            context: torch.Tensor,
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, heads, queries, keys) softmax attention of a diffusers ``Attention`` module,
    from its projections, in float32 (what its processor computes, before the values).
    ``mask``: the additive text mask the module was called with (SANA masks the padding:
    (batch, 1, keys) or (batch, keys)); SD's cross-attention has none."""
    heads = module.heads
    query, key = module.to_q(hidden), module.to_k(context)
    query = query.view(query.shape[0], -1, heads, query.shape[-1] // heads).transpose(1, 2)
    key = key.view(key.shape[0], -1, heads, key.shape[-1] // heads).transpose(1, 2)
    if getattr(module, "norm_q", None) is not None:
        query = module.norm_q(query)
    if getattr(module, "norm_k", None) is not None:
        key = module.norm_k(key)
    scores = query.float() @ key.float().transpose(-1, -2) * module.scale
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -torch.inf)
        scores = scores + mask.float().reshape(mask.shape[0], 1, 1, mask.shape[-1])
    return scores.softmax(dim=-1)


def joint_attention_probabilities(module: nn.Module, hidden: torch.Tensor,
                                  context: torch.Tensor, rotary: Any = None,
                                  heads_per_chunk: int = 1) -> torch.Tensor:
    """(batch, heads, image queries, text keys) probabilities of a FLUX joint attention
    (``FluxAttention``: text first, then image, in one sequence), in float32: queries and
    keys as its processor makes them (``to_q``/``to_k`` of the image, ``add_q_proj``/
    ``add_k_proj`` of the text, their RMS norms, the rotary embedding over the joint
    positions), the softmax of each image query over all keys, text and image, and its text
    columns kept. Heads are taken ``heads_per_chunk`` at a time, so the image-to-image
    scores never exist for all heads at once (at 1,024 px, 4,096 x 4,608 per head)."""
    from diffusers.models.embeddings import apply_rotary_emb

    def split(states: torch.Tensor) -> torch.Tensor:  # (B, S, heads, head_dim)
        return states.unflatten(-1, (-1, module.head_dim))

    query = module.norm_q(split(module.to_q(hidden)))
    key = module.norm_k(split(module.to_k(hidden)))
    text_query = module.norm_added_q(split(module.add_q_proj(context)))
    text_key = module.norm_added_k(split(module.add_k_proj(context)))
    query, key = torch.cat([text_query, query], dim=1), torch.cat([text_key, key], dim=1)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    text = context.shape[1]
    query = query[:, text:].transpose(1, 2).float()  # (B, heads, image, head_dim)
    key = key.transpose(1, 2).float()
    scale = query.shape[-1] ** -0.5  # scaled_dot_product_attention's default, as the module's
    chunks = []
    for h in range(0, query.shape[1], heads_per_chunk):
        scores = query[:, h:h + heads_per_chunk] @ key[:, h:h + heads_per_chunk].transpose(-1, -2)
        chunks.append((scores * scale).softmax(dim=-1)[..., :text])
    return torch.cat(chunks, dim=1)


class HeadMapCapture(SiteHooks):
    """Forward hooks on the family's word-map sites (``attn2``; FLUX's joint attention) that
    sum each head's word maps over a step window."""

    purpose = "head_maps"
    reads_inputs = True

    def __init__(self, pipe: Any, prompts: Sequence[str],
                 words: Sequence[str] | Sequence[Sequence[str]],
                 sites: Sequence[str] | None = None, images_per_prompt: int = 1,
                 window: StepWindow | None = None, keep_steps: bool = False,
                 cfg: CFGMode = "auto", arguments: Mapping[str, Any] | None = None) -> None:
        family = family_of(denoiser_of(pipe))
        chosen = list(sites) if sites is not None else word_map_sites(denoiser_of(pipe))
        if not family.map_kind:
            raise ValueError(f"{family.name} has no attention read as word maps")
        wrong = [s for s in chosen if kind_of(s).name != family.map_kind]
        if wrong:
            raise ValueError(f"{family.name}'s head maps are read at "
                             f"{KINDS[family.map_kind].label} sites, not {wrong}")
        self.packed = family.latent_layout == "packed"
        super().__init__(pipe, chosen, cfg)
        per_prompt = words_per_prompt(prompts, words)
        weights = token_weights(pipe, prompts, per_prompt, arguments)
        self.weights = weights.repeat_interleave(images_per_prompt, dim=0)
        self.words = [w for w in per_prompt for _ in range(images_per_prompt)]  # per image
        self.window = window or StepWindow()
        self.keep_steps = keep_steps
        self._sums: dict[str, torch.Tensor] = {}
        self._steps: dict[str, list[int]] = {s: [] for s in self.sites}
        self._per_step: dict[str, list[torch.Tensor]] = {s: [] for s in self.sites}
        self._latent: tuple[int, int] | None = None

    def __enter__(self) -> HeadMapCapture:
        super().__enter__()
        assert self._stack is not None
        handle = self.denoiser.register_forward_pre_hook(self._record_latent, with_kwargs=True)
        self._stack.callback(handle.remove)
        return self

    def _record_latent(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The latent's (y, x) grid: a (B, C, H, W) sample's, or, for packed tokens (FLUX),
        the rows and columns of their position ids (``img_ids``: (N, 3), 0, row, column)."""
        if self.packed:
            ids = kwargs.get("img_ids")
            if isinstance(ids, torch.Tensor):
                ids = ids.reshape(-1, ids.shape[-1])
                self._latent = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
            return
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            self._latent = (int(sample.shape[2]), int(sample.shape[3]))

    def _grid(self, site: str, tokens: int) -> tuple[int, int]:
        """(y, x) of a site's image tokens: the latent's shape divided by the site's level."""
        if self._latent is None:
            raise RuntimeError("head maps need a (B, C, H, W) latent or packed tokens' img_ids")
        height, width = self._latent
        factor = math.isqrt(height * width // tokens)
        if factor < 1 or (height // factor) * (width // factor) != tokens:
            raise RuntimeError(f"{site}: {tokens} image tokens do not tile the "
                               f"{height} x {width} latent")
        return height // factor, width // factor

    def on_call(self, site: str, step: int, module: nn.Module, args: tuple, kwargs: dict,
                output: Any) -> None:
        if step not in self.window:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if context is None:
            raise RuntimeError(f"{site} was called without text (encoder_hidden_states)")
        rows = self.cond_slice(hidden.shape[0])
        mask = kwargs.get("attention_mask")
        with torch.no_grad():
            if kind_of(site).name == "joint":
                if mask is not None:
                    raise RuntimeError(f"{site}: a masked joint attention is not supported")
                probs = joint_attention_probabilities(module, hidden[rows], context[rows],
                                                      kwargs.get("image_rotary_emb"))
            else:
                probs = attention_probabilities(module, hidden[rows], context[rows],
                                                None if mask is None else mask[rows])
            images = probs.shape[0]
            if images != self.weights.shape[0]:
                raise RuntimeError(f"{site}: {images} conditional rows, but the capture was "
                                   f"set up for {self.weights.shape[0]} images")
            if probs.shape[-1] != self.weights.shape[-1]:
                raise RuntimeError(f"{site} attends to {probs.shape[-1]} text positions, the "
                                   f"prompt encodes to {self.weights.shape[-1]}")
            weights = self.weights.to(probs.device)
            maps = torch.einsum("bhnt,bwt->bhwn", probs, weights)
            y, x = self._grid(site, probs.shape[2])
            maps = maps.reshape(*maps.shape[:3], y, x)
        total = self._sums.get(site)
        self._sums[site] = maps if total is None else total + maps
        self._steps[site].append(step)
        if self.keep_steps:
            self._per_step[site].append(maps.to("cpu", copy=True))
        return None

    def pop(self) -> HeadMaps:
        """Host copy of the summed maps of the last generation; resets for the next."""
        missing = [s for s in self.sites if s not in self._sums]
        if missing:
            raise RuntimeError(f"no maps captured at {missing}: did the pipeline run, with "
                               "steps inside the window?")
        steps = {s: list(v) for s, v in self._steps.items()}
        if len({tuple(v) for v in steps.values()}) != 1:
            raise RuntimeError(f"sites saw different steps: {steps}")
        out = HeadMaps(
            maps={s: t.cpu().numpy() for s, t in self._sums.items()},
            words=[list(w) for w in self.words], steps=next(iter(steps.values())),
            per_step={s: torch.stack(v, dim=1).numpy() for s, v in self._per_step.items()}
            if self.keep_steps else None)
        self._sums = {}
        self._steps = {s: [] for s in self.sites}
        self._per_step = {s: [] for s in self.sites}
        return out


@dataclass
class HeadMaps:
    """Summed word maps per site: (images, heads, words, y, x) float32; ``words[i]``: image
    i's words, in slot order; ``steps``: the steps summed."""

    maps: dict[str, np.ndarray]
    words: list[list[str]]
    steps: list[int]
    per_step: dict[str, np.ndarray] | None = None  # (images, steps, heads, words, y, x)


def capture_head_maps(pipe: Any, prompts: Sequence[str],
                      words: Sequence[str] | Sequence[Sequence[str]],
                      sites: Sequence[str] | None = None, images_per_prompt: int = 1,
                      window: StepWindow | None = None, keep_steps: bool = False,
                      arguments: Mapping[str, Any] | None = None) -> HeadMapCapture:
    """Context manager: per-head word maps at ``sites`` (default: ``word_map_sites``).
    ``arguments``: the further arguments the pipeline is called with (SANA's instruction
    decides where the prompt's words sit)."""
    return HeadMapCapture(pipe, prompts, words, sites, images_per_prompt, window, keep_steps,
                          arguments=arguments)
