"""How relevant each cross-attention head is to a concept, from three kinds of source.

Heads are ``(site, head index)`` pairs in site order. Every function returns one score per
head (higher: more relevant), to rank heads for
``icm.head_maps.aggregation.aggregate(mode="topk")``:

* ``hrv``: concept-word voting as in Head Relevance Vectors (HRV; no masks, concept word
  lists): while images generate, each head's image queries also attend to sequences holding
  one word per concept; the concept with the most attention mass (mean over pixels and the
  word's tokens) gets that head's vote, per image and step (a text mask would not change
  it: padding only adds to the softmax's common denominator). Votes are normalised per head,
  then each concept's row is L1-normalised and scaled by the number of heads (rows average 1);
* ``oracle``: a head's mean IoU with ground-truth masks (an upper bound, only where masks
  exist, such as the toy world's oracle);
* label-free signals of the maps themselves: spatial ``concentration`` (1 - normalised
  entropy), ``agreement`` with the all-head map (Pearson correlation), and the
  ``rank_stability`` of any score across seed groups.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from icm.head_maps.aggregation import Head, ious, segment_batch, word_stack
from icm.head_maps.study import hrv_refusal
from icm.head_maps.tokens import word_positions
from icm.hooks.head_maps import attention_probabilities, word_map_sites
from icm.hooks.registry import CFGMode, SiteHooks
from icm.hooks.sites import denoiser_of
from icm.models.families import family_of


def encode_texts(pipe: Any, texts: Sequence[str]) -> torch.Tensor:
    """(texts, tokens, width) text states as the denoiser's cross-attention receives them:
    the pipeline's encoding, then the modules the family table names (SANA projects and
    normalises the Gemma states to its width first)."""
    with torch.no_grad():
        if "do_classifier_free_guidance" in inspect.signature(pipe.encode_prompt).parameters:
            states = pipe.encode_prompt(list(texts), device=pipe.device,
                                        num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)[0]
        else:
            states = pipe.encode_prompt(list(texts))
        denoiser = denoiser_of(pipe)
        for name in family_of(denoiser).text_projection:
            states = getattr(denoiser, name)(states)
        return states


def voting_sequences(concepts: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Every concept's words in turn: the i-th list holds the i-th word of each concept
    (shorter lists wrap). HRV draws one word per concept at random on each call
    (``ConceptVoting``); these lists are what such draws cover."""
    longest = max(len(words) for words in concepts.values())
    return [[words[i % len(words)] for words in concepts.values()] for i in range(longest)]


class ConceptVoting(SiteHooks):
    """Counts, per ``attn2`` head, the votes of its image queries for each concept, as Head
    Relevance Vectors (HRV, SNU-DRL/HRV) count them: each concept word is encoded on its own
    (start token, then the word's tokens), so that no word's keys depend on the words before
    it (CLIP's causal attention would); on every call one word per concept is drawn (seeded)
    and the voting sequence is the start token followed by the drawn words' tokens, no end
    or padding token, so the softmax runs over the concept words only. Each head's
    conditional image queries attend to it; the probabilities, averaged over pixels and
    over each word's tokens, give each concept a mass, and the largest gets the head's
    vote (per image, per step)."""

    purpose = "head_votes"
    reads_inputs = True

    def __init__(self, pipe: Any, concepts: Mapping[str, Sequence[str]],
                 sites: Sequence[str] | None = None, cfg: CFGMode = "auto",
                 seed: int = 0) -> None:
        refusal = hrv_refusal(family_of(denoiser_of(pipe)))
        if refusal:
            raise ValueError(refusal)
        chosen = list(sites) if sites is not None else word_map_sites(denoiser_of(pipe))
        super().__init__(pipe, chosen, cfg)
        self.concepts = list(concepts)
        self.words: list[list[torch.Tensor]] = []  # per concept, per word: (tokens, width)
        start = None
        for words in concepts.values():
            states = encode_texts(pipe, list(words))  # (words, T, width), each on its own
            encoded = []
            for w, word in enumerate(words):
                positions = word_positions(pipe, word, word, instruction=False)
                encoded.append(states[w, positions])
                start = states[w, :positions[0]][-1:] if start is None else start
            self.words.append(encoded)
        self.start = start  # the start token's state (the position before the first word)
        self.generator = torch.Generator("cpu").manual_seed(int(seed))
        self.votes: dict[str, torch.Tensor] = {}

    def sequence(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw: the (1, L, width) voting sequence and (L, concepts) token weights."""
        drawn = [encoded[int(torch.randint(len(encoded), (1,), generator=self.generator))]
                 for encoded in self.words]
        context = torch.cat([self.start, *drawn])[None]
        weights = torch.zeros(context.shape[1], len(self.concepts))
        at = 1  # after the start token
        for c, tokens in enumerate(drawn):
            weights[at:at + len(tokens), c] = 1.0 / len(tokens)
            at += len(tokens)
        return context, weights

    def on_call(self, site: str, step: int, module: nn.Module, args: tuple, kwargs: dict,
                output: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rows = hidden[self.cond_slice(hidden.shape[0])]
        with torch.no_grad():
            context, weights = self.sequence()
            keys = context.to(rows.device, rows.dtype).expand(rows.shape[0], -1, -1)
            probs = attention_probabilities(module, rows, keys)  # (B, heads, N, L)
            mass = probs.mean(dim=2) @ weights.to(rows.device)  # (B, heads, concepts)
            vote = torch.nn.functional.one_hot(mass.argmax(dim=-1), len(self.concepts))
            total = vote.sum(dim=0).float()  # (heads, concepts)
            counts = self.votes.get(site)
            self.votes[site] = total if counts is None else counts + total
        return None

    def relevance(self) -> tuple[list[Head], np.ndarray]:
        """The heads and their (concepts, heads) HRV relevance from the votes so far."""
        if not self.votes:
            raise RuntimeError("no votes: run the pipeline inside the context first")
        heads = [(s, h) for s in self.sites for h in range(self.votes[s].shape[0])]
        votes = torch.cat([self.votes[s] for s in self.sites]).cpu().numpy()  # (heads, C)
        return heads, hrv_from_votes(votes)


def hrv_from_votes(votes: np.ndarray) -> np.ndarray:
    """(concepts, heads) relevance from (heads, concepts) vote counts: each head's votes as
    shares, then each concept's row L1-normalised and times the number of heads."""
    shares = votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-12)
    rows = shares.T
    return rows / np.maximum(rows.sum(axis=1, keepdims=True), 1e-12) * rows.shape[1]


def concentration(maps: Mapping[str, np.ndarray], word: int) -> np.ndarray:
    """Per head: 1 - the normalised spatial entropy of its map of word slot ``word``
    (1: all mass on one pixel, 0: uniform), averaged over images."""
    out = []
    for m in maps.values():
        values = np.clip(np.asarray(m[:, :, word], dtype=np.float64), 0, None)
        flat = values.reshape(values.shape[0], values.shape[1], -1)
        p = flat / np.maximum(flat.sum(axis=-1, keepdims=True), 1e-12)
        entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)
        out.append((1 - entropy / np.log(flat.shape[-1])).mean(axis=0))
    return np.concatenate(out)


def agreement(maps: Mapping[str, np.ndarray], word: int, size: int = 64) -> np.ndarray:
    """Per head: Pearson correlation of its upsampled map of word slot ``word`` with the
    all-head (DAAM) map, averaged over images."""
    flat = word_stack(maps, word, size).flatten(2).double()
    mean_map = flat.mean(dim=1, keepdim=True)

    def centred(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=-1, keepdim=True)
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return (centred(flat) * centred(mean_map)).sum(-1).mean(0).numpy()


#: Bytes of full-size segmentation work one step of ``oracle_iou`` may hold (its float
#: upsampling of a block of heads to the image size): memory stays bounded whatever the head
#: count and image size (SDXL: 1,300 heads at 1,024 px).
ORACLE_BLOCK_BYTES = 256 * 2**20


def oracle_iou(maps: Mapping[str, np.ndarray], word: int, masks: np.ndarray,
               tau: float = 0.4, size: int = 64) -> np.ndarray:
    """Per head: mean IoU of its segmentation of word slot ``word`` with ``masks`` (images,
    H, W boolean ground truth): an oracle, usable only where masks exist. Heads are
    segmented a block at a time (``ORACLE_BLOCK_BYTES``), never all at the image size."""
    stacked = word_stack(maps, word, size)
    images, heads = stacked.shape[:2]
    truth = np.asarray(masks, dtype=bool)
    per_head = images * truth.shape[-2] * truth.shape[-1] * 4
    block = max(1, ORACLE_BLOCK_BYTES // per_head)
    out = np.empty(heads)
    for start in range(0, heads, block):
        part = stacked[:, start:start + block]
        n = part.shape[1]
        pred = segment_batch(part.reshape(images * n, size, size), truth.shape[-2:], tau)
        scores = ious(pred, np.repeat(truth, n, axis=0)).reshape(images, n)
        out[start:start + n] = scores.mean(axis=0)
    return out


def rank_stability(scores: np.ndarray) -> np.ndarray:
    """Per head, from (groups, heads) scores of disjoint seed groups: 1 - the standard
    deviation of the head's percentile rank across groups (1: the same rank everywhere)."""
    scores = np.asarray(scores, dtype=np.float64)
    ranks = scores.argsort(axis=1).argsort(axis=1) / max(scores.shape[1] - 1, 1)
    return 1 - ranks.std(axis=0)


def hrv_of_votes(votes: Sequence[str | Path], heads: list[Head], slots: list[str]) -> np.ndarray:
    """(slots, heads) HRV relevance from the shards' summed votes, rows in slot order, over
    the kept heads only (votes of excluded sites dropped before normalising)."""
    from safetensors import safe_open

    from icm.head_maps.relevance import hrv_from_votes

    total, order, concepts = None, None, None
    for path in votes:
        with safe_open(str(path), "np") as handle:
            counts = handle.get_tensor("votes")
            meta = handle.metadata()
        names = [tuple(h) for h in json.loads(meta["heads"])]
        if order is not None and names != order:
            raise ValueError(f"{path} votes for other heads than the first shard")
        order, concepts = names, json.loads(meta["concepts"])
        total = counts if total is None else total + counts
    index = {h: i for i, h in enumerate(order)}
    kept = total[[index[h] for h in heads]]
    relevance = hrv_from_votes(kept)  # (concepts, heads)
    return relevance[[concepts.index(slot) for slot in slots]]


#: HRV's places, in its files' naming ("down, layer: 3, head: 5"), by module prefix.
HRV_PLACES = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}


def hrv_head_names(sites: Sequence[str], heads: Sequence[Head]) -> list[str]:
    """HRV's name of each head: its place (down, mid, up), the index of its transformer
    block's cross-attention within the place in forward order (HRV counts both attentions
    of a block and halves: ``layer = count // 2``), and the head."""
    layer: dict[str, int] = {}
    counts: dict[str, int] = {}
    for site in sites:
        place = HRV_PLACES.get(site.split(".")[0])
        if place is None:
            raise ValueError(f"{site}: HRV names heads of UNet places {list(HRV_PLACES)} only")
        layer[site] = counts.get(place, 0)
        counts[place] = layer[site] + 1
    return [f"{HRV_PLACES[s.split('.')[0]]}, layer: {layer[s]}, head: {h}" for s, h in heads]


def published_hrv(vectors: str | Path, head_index: str | Path, concepts: Sequence[str],
                  slot_concepts: Mapping[str, str], sites: Sequence[str],
                  heads: Sequence[Head]) -> np.ndarray:
    """(slots, heads) relevance from HRV's published vectors: ``vectors`` a .npy of
    (concepts, heads) (its ``category_vectors_*.npy``: SD1.4's 34 x 128, SDXL's 34 x 1300),
    ``head_index`` a .npy of each column's head name (``head_index_*.npy``, names as
    ``hrv_head_names``), ``concepts`` the row names in order, ``slot_concepts`` each word
    slot's concept. Rows in slot order, columns in ``heads`` order (the study's sites; the
    file's other heads are left out); a head the file lacks is an error."""
    table = np.load(vectors)
    names = [str(n) for n in np.load(head_index, allow_pickle=False)]
    if table.shape != (len(concepts), len(names)):
        raise ValueError(f"{vectors} is {table.shape}, but {len(concepts)} concepts and "
                         f"{len(names)} head names ({head_index}) were given")
    column = {name: i for i, name in enumerate(names)}
    wanted = hrv_head_names(sites, heads)
    missing = [n for n in wanted if n not in column]
    if missing:
        raise ValueError(f"{head_index} names no head {missing[:3]} ({len(missing)} of "
                         f"{len(wanted)} missing): vectors of another model?")
    unknown = sorted(set(slot_concepts.values()) - set(concepts))
    if unknown:
        raise ValueError(f"concepts {unknown} are not rows of {vectors}: {list(concepts)}")
    rows = [list(concepts).index(c) for c in slot_concepts.values()]
    return table[np.ix_(rows, [column[n] for n in wanted])]

