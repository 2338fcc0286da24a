"""Which token sits at each text position the cross-attention attends to, per family.

A word map averages the attention on the word's tokens, so their positions must be those of
the text states the pipeline actually feeds its cross-attention. How a family encodes a
prompt is a row of the family table (``Family.text_encoding``):

* ``padded`` (SD1.5, SDXL, the toy): the CLIP tokenizer's ids, padded to its
  ``model_max_length`` (77); SDXL's two encoders share the positions;
* ``sana``: SANA's Gemma encoding: the prompt lower-cased, prefixed with the complex human
  instruction (when the call uses one), padded to the instruction's length + 298, then only
  the first token and the last ``max_sequence_length - 1`` kept (SanaPipeline.encode_prompt).
  Positions are searched in the prompt's part only, never in the instruction (found from the
  fast tokenizer's character offsets);
* ``t5`` (FLUX): the T5 tokenizer's ids (``tokenizer_2``) with its end token, padded to the
  call's ``max_sequence_length`` (512 by default), as ``FluxPipeline`` encodes them; CLIP's
  pooled vector only modulates the blocks and has no positions.

Words are looked up with the tokenizer of those positions (``Family.prompt_tokenizer``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from icm.hooks.sites import denoiser_of
from icm.models.families import family_of


def _call_default(pipe: Any, name: str) -> Any:
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def prompt_tokenizer(pipe: Any) -> Any:
    """The tokenizer of the text positions the denoiser attends to (FLUX: its T5's)."""
    return getattr(pipe, family_of(denoiser_of(pipe)).prompt_tokenizer)


def encoded_tokens(pipe: Any, prompt: str, arguments: Mapping[str, Any] | None = None,
                   instruction: bool = True) -> tuple[list[int], int]:
    """(ids at every text position the denoiser sees, first position of the prompt itself).
    ``arguments``: the pipeline call's own arguments (e.g. SANA's
    ``complex_human_instruction``); ``instruction=False`` encodes as ``encode_prompt`` does
    by default (no instruction: how HRV's voting sequences are encoded)."""
    tokenizer = prompt_tokenizer(pipe)
    arguments = dict(arguments or {})
    rule = family_of(denoiser_of(pipe)).text_encoding
    if rule == "padded":
        ids = tokenizer(prompt, padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length).input_ids
        return list(ids), 0
    if rule == "t5":
        keep = int(arguments.get("max_sequence_length")
                   or _call_default(pipe, "max_sequence_length") or 512)
        ids = tokenizer(prompt, padding="max_length", max_length=keep, truncation=True).input_ids
        return list(ids), 0
    if rule != "sana":
        raise ValueError(f"unknown text encoding {rule!r}")
    keep = int(arguments.get("max_sequence_length", _call_default(pipe, "max_sequence_length")
                             or 300))
    chi = arguments.get("complex_human_instruction",
                        _call_default(pipe, "complex_human_instruction")) if instruction else None
    text = prompt.lower().strip()
    if not chi:
        ids = list(tokenizer(text, padding="max_length", max_length=keep, truncation=True,
                             add_special_tokens=True).input_ids)
        return ids, 0
    prefix = "\n".join(chi)
    total = len(tokenizer.encode(prefix)) + keep - 2
    encoded = tokenizer(prefix + text, padding="max_length", max_length=total, truncation=True,
                        add_special_tokens=True, return_offsets_mapping=True)
    ids = list(encoded.input_ids)
    # The prompt starts at the first token reaching past the instruction's characters: the
    # instruction's trailing space may merge into the prompt's first token ("▁a").
    first = next((i for i, (a, b) in enumerate(encoded.offset_mapping)
                  if b > len(prefix) and b > a), len(ids))
    kept = [0, *range(total - keep + 1, total)]
    start = next((j for j, original in enumerate(kept) if original >= first), len(kept))
    return [ids[i] for i in kept], start


def word_positions(pipe: Any, prompt: str, word: str,
                   arguments: Mapping[str, Any] | None = None, instruction: bool = True,
                   ) -> list[int]:
    """Text positions of ``word`` in ``prompt`` as the pipeline encodes it: every sub-word
    token of every occurrence (as a word of its own or after a space, both tokenizations
    tried); an absent word is an error naming both."""
    tokenizer = prompt_tokenizer(pipe)
    ids, start = encoded_tokens(pipe, prompt, arguments, instruction)
    if family_of(denoiser_of(pipe)).text_encoding == "sana":
        word = word.lower()
    pieces = {tuple(tokenizer(w, add_special_tokens=False).input_ids) for w in (word, " " + word)}
    found: set[int] = set()
    for piece in filter(None, pieces):
        for i in range(start, len(ids) - len(piece) + 1):
            if tuple(ids[i:i + len(piece)]) == piece:
                found.update(range(i, i + len(piece)))
    if not found:
        shown = tokenizer.convert_ids_to_tokens(list(min(pieces, key=len)))
        raise ValueError(f"word {word!r} (tokens {shown}) is not in prompt {prompt!r}")
    return sorted(found)
