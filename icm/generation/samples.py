"""Which samples a concept's generation makes, with which seed, in which shard.

A sample is one image of one prompt. Its seed depends on the base seed, its seed stream,
the prompt's index and the repeat number only, never on the batch or shard it lands in, so
any sample can be regenerated alone. Growing ``samples_per_prompt`` keeps every existing
sample's seed.

Each purpose draws from its own seed stream (``SEED_STREAMS``): the localization samples
the probes are fitted on, the calibration samples that tune steering, and the evaluation
samples steering is judged on. The stream is the top two bits of the 32-bit seed (the
bits torch's CPU generator uses), so the streams are disjoint by construction: no
evaluation image shares its initial noise with an image the probes saw.

Shards are cut on the global batch grid (whole batches of ``batch_size``), so a sample meets
the same batch companions whatever the number of shards, and its image is bit-identical.
Regenerated alone or with another batch size it is the same image up to floating-point
reassociation in batch-size-dependent kernels (measured: at most 1/255 per pixel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

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


#: Seed streams by purpose; the value is the top two bits of every seed of the stream.
SEED_STREAMS: dict[str, int] = {"localization": 0, "calibration": 1, "evaluation": 2,
                                "head-maps": 3}
# The columns of a shard's samples.csv (icm.generation.shard writes them; merging needs no model).
SAMPLE_COLUMNS = ["sample", "prompt_index", "repeat", "prompt", "seed", "image"]
#: Prompt sets by name: the tag a set's seeds mix in (0, the general prompts: none).
PROMPT_SETS: dict[str, int] = {"general": 0, "specific": 1, "injection": 2, "hrv": 3}
SEED_RULE = ("stream << 30 | low 30 bits of numpy SeedSequence([base_seed, stream, "
             "prompt_index, repeat] + ([set tag] for a prompt set other than the general "
             "prompts)).generate_state(1, uint32); streams " +
             ", ".join(f"{k} {v}" for k, v in SEED_STREAMS.items()) + "; set tags " +
             ", ".join(f"{k} {v}" for k, v in PROMPT_SETS.items()))


def sample_seed(base_seed: int, prompt_index: int, repeat: int,
                stream: str = "localization", prompt_set: str = "general") -> int:
    """A well-mixed 32-bit seed of (base seed, stream, prompt index, repeat[, prompt set])
    via numpy's SeedSequence, its top two bits naming the stream."""
    if stream not in SEED_STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; known: {list(SEED_STREAMS)}")
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; known: {list(PROMPT_SETS)}")
    code = SEED_STREAMS[stream]
    entropy = [int(base_seed), code, int(prompt_index), int(repeat)]
    if PROMPT_SETS[prompt_set]:  # the general prompts keep the seeds they always had
        entropy.append(PROMPT_SETS[prompt_set])
    if min(entropy) < 0:
        raise ValueError(f"seeds and indices must be non-negative, got {entropy}")
    low = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])
    return (code << 30) | (low & (2**30 - 1))


def plan_samples(prompts: Sequence[str], samples_per_prompt: int, base_seed: int,
                 stream: str = "localization", prompt_set: str = "general") -> list[Sample]:
    """All samples of a generation, prompt-major: prompt 0's repeats first."""
    if samples_per_prompt < 1:
        raise ValueError("samples_per_prompt must be at least 1")
    if not prompts:
        raise ValueError("a generation needs at least one prompt")
    return [
        Sample(p * samples_per_prompt + r, p, r, prompt,
               sample_seed(base_seed, p, r, stream, prompt_set))
        for p, prompt in enumerate(prompts)
        for r in range(samples_per_prompt)
    ]


def shard_bounds(n_samples: int, n_shards: int, shard: int, batch_size: int = 1) -> tuple[int, int]:
    """[start, stop) of a shard: contiguous whole batches, counts differing by at most one."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    n_batches = -(-n_samples // batch_size)
    if n_shards > n_batches:
        raise ValueError(
            f"{n_shards} shards for only {n_batches} batches of {batch_size} ({n_samples} samples)"
        )
    base, extra = divmod(n_batches, n_shards)
    first = shard * base + min(shard, extra)
    last = first + base + (shard < extra)
    return first * batch_size, min(last * batch_size, n_samples)


def shard_samples(
    samples: Sequence[Sample], n_shards: int, shard: int, batch_size: int = 1
) -> list[Sample]:
    start, stop = shard_bounds(len(samples), n_shards, shard, batch_size)
    return list(samples[start:stop])


def specific_prompts(concept: Mapping[str, Any]) -> dict[str, str]:
    """Each class-specific prompt of a concept with its class, class-major as configured
    (``concepts.<c>.specific_prompts``): the prompt order numbers the samples and seeds. A
    prompt under two classes is an error: its images' class would be ambiguous."""
    classes: dict[str, str] = {}
    for name, prompts in (concept.get("specific_prompts") or {}).items():
        for prompt in prompts:
            if classes.setdefault(prompt, name) != name:
                raise ValueError(f"specific prompt {prompt!r} is listed under both "
                                 f"{classes[prompt]} and {name}")
    return classes


def concept_samples(
    concept: Mapping[str, Any], model: Mapping[str, Any], generation: Mapping[str, Any],
    per_prompt: int | None = None, stream: str = "localization",
    prompts: Sequence[str] | None = None, prompt_set: str = "general",
) -> list[Sample]:
    """The sample plan of a (model, concept) run: ``prompts`` (default: the concept's
    general prompts), ``per_prompt`` repeats and the seed rule of ``stream``, so sample
    (stream, prompt, repeat) has one seed in every stage that uses it.

    The repeats: ``per_prompt`` when given (steering passes its own
    ``steering.samples_per_prompt``, which wins), else the model's ``samples_per_prompt``
    (a smaller localization run for that model), else the concept's. The ``specific``
    prompt set is the concept's class-specific prompts (``specific_prompts``) with
    ``specific_samples_per_prompt`` repeats, seeded apart from the general prompts."""
    if prompt_set == "specific":
        prompts = prompts or list(specific_prompts(concept))
        if not prompts:
            raise ValueError("the concept has no specific_prompts")
        per_prompt = (per_prompt or model.get("samples_per_prompt")
                      or concept["specific_samples_per_prompt"])
    per_prompt = per_prompt or model.get("samples_per_prompt") or concept["samples_per_prompt"]
    return plan_samples(prompts or concept["prompts"], per_prompt, generation["base_seed"],
                        stream, prompt_set)
