"""A CLIP BPE tokenizer built entirely in code.

Tests and the tiny pipeline need a real ``CLIPTokenizer`` but may never download
one, so we write a minimal byte-level vocabulary plus merges that turn a chosen
word list into single tokens (which keeps token-position bookkeeping readable).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable unicode map; BPE symbols are these characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy lowest-rank-first BPE, as the tokenizers library applies it."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 62), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 62:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _word_symbols(word: str, byte_map: dict[int, str]) -> list[str]:
    chars = [byte_map[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + EOW]


def build_vocab_and_merges(
    words: Sequence[str] = (),
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges in CLIP's layout: bytes, bytes+</w>, merges, specials.

    Each word's merges join its pieces left to right *after* simulating the
    merges added so far, so words sharing substrings cannot break each other.
    """
    byte_map = bytes_to_unicode()
    chars = list(byte_map.values())
    tokens = chars + [c + EOW for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words if w):
        pieces = _apply_bpe(_word_symbols(word, byte_map), ranks)
        acc = pieces[0]
        for piece in pieces[1:]:
            pair = (acc, piece)
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
                tokens.append(acc + piece)
            acc += piece
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def build_clip_tokenizer(
    directory: Path | None = None,
    words: Sequence[str] = (),
    model_max_length: int = 77,
) -> CLIPTokenizer:
    """Write vocab.json/merges.txt to ``directory`` (temp dir if None) and load them.

    Loading from files (rather than passing dicts) exercises the same code path
    as a real checkpoint's ``tokenizer/`` folder.
    """
    if directory is None:
        # The backend tokenizer lives in memory once loaded, so the files can go.
        with tempfile.TemporaryDirectory(prefix="icm-clip-tokenizer-") as tmp:
            return build_clip_tokenizer(Path(tmp), words, model_max_length)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(words)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(
        str(directory), model_max_length=model_max_length, pad_token=EOS
    )
    _check_single_tokens(tokenizer, words)
    return tokenizer


def _check_single_tokens(tokenizer: CLIPTokenizer, words: Sequence[str]) -> None:
    """Fail loudly if a word (e.g. one with punctuation) was split by the pre-tokenizer."""
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"word {word!r} does not map to a single token: {ids}")
