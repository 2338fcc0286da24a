"""Which samples a concept's generation makes, with which seed, in which shard.

A sample is one image of one prompt. Its seed depends on the base seed, the prompt's index
and the repeat number only, never on the batch or shard it lands in, so any sample can be
regenerated alone. Growing ``samples_per_prompt`` keeps every existing sample's seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Sample:
    sample: int  # index of the sample within the concept's generation, 0..N-1
    prompt_index: int
    repeat: int
    prompt: str
    seed: int

    def as_row(self) -> dict[str, object]:
        return asdict(self)


def sample_seed(base_seed: int, prompt_index: int, repeat: int) -> int:
    """A well-mixed 32-bit seed from (base seed, prompt index, repeat) via numpy's SeedSequence."""
    entropy = [int(base_seed), int(prompt_index), int(repeat)]
    if min(entropy) < 0:
        raise ValueError(f"seeds and indices must be non-negative, got {entropy}")
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


def plan_samples(prompts: Sequence[str], samples_per_prompt: int, base_seed: int) -> list[Sample]:
    """All samples of a generation, prompt-major: prompt 0's repeats first."""
    if samples_per_prompt < 1:
        raise ValueError("samples_per_prompt must be at least 1")
    if not prompts:
        raise ValueError("a generation needs at least one prompt")
    return [
        Sample(p * samples_per_prompt + r, p, r, prompt, sample_seed(base_seed, p, r))
        for p, prompt in enumerate(prompts)
        for r in range(samples_per_prompt)
    ]


def shard_bounds(n_samples: int, n_shards: int, shard: int) -> tuple[int, int]:
    """[start, stop) of a shard: contiguous, sizes differing by at most one."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
    if n_shards > n_samples:
        raise ValueError(f"{n_shards} shards for only {n_samples} samples")
    base, extra = divmod(n_samples, n_shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (shard < extra)


def shard_samples(samples: Sequence[Sample], n_shards: int, shard: int) -> list[Sample]:
    start, stop = shard_bounds(len(samples), n_shards, shard)
    return list(samples[start:stop])
