"""Which class each batch is steered toward (paper appendix B). Each batch gets one target
class from the target distribution, as a function of (seed, global batch index), so a
batch's target does not depend on sharding. ``random`` draws (default) are independent, as
in the paper: ten of them are often off by 15 points, which sets a floor under FD
(``icm.evaluation.metrics.draw_floor``). ``quasi`` draws follow a golden-ratio sequence, so
any run of consecutive batches (say, the ten batches of one prompt) holds the classes in
close to the asked proportions: lower variance, not the paper's protocol.
``balanced_targets`` deals calibration's targets evenly within each prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np


def target_probabilities(
    classes: Sequence[str], probs: Mapping[str, float] | None = None
) -> np.ndarray:
    """Target distribution over ``classes`` (default uniform); must sum to 1."""
    if probs is None:
        return np.full(len(classes), 1.0 / len(classes))
    unknown = set(probs) - set(classes)
    if unknown:
        raise ValueError(f"target probabilities name unknown classes {sorted(unknown)}")
    p = np.array([float(probs.get(c, 0.0)) for c in classes])
    if np.any(p < 0) or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"target probabilities must be >= 0 and sum to 1, got {dict(probs)}")
    return p


GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0  # the Weyl step with the most even spread


#: How steering draws its batch targets (``batch_target``).
TARGET_DRAWS = ("random", "quasi")


def batch_target(classes: Sequence[str], probs: np.ndarray, seed: int, batch_index: int,
                 draw: str = "random") -> str:
    """The target class of one batch: a pure function of (seed, global batch index)."""
    if draw == "random":
        rng = np.random.default_rng([seed, batch_index])
        return classes[int(rng.choice(len(classes), p=probs))]
    if draw not in TARGET_DRAWS:
        raise ValueError(f"unknown target draw {draw!r}; use one of {TARGET_DRAWS}")
    offset = np.random.default_rng(seed).random()
    position = (offset + batch_index * GOLDEN) % 1.0
    edges = np.cumsum(probs)
    return classes[min(int(np.searchsorted(edges, position, side="right")), len(classes) - 1)]


def calibration_batches(probs: np.ndarray, batches_per_class: int) -> int:
    """Batches per prompt that give the rarest target class ``batches_per_class`` of them
    when ``balanced_targets`` deals them (uniform over K classes: K x batches_per_class)."""
    if batches_per_class < 1:
        raise ValueError(f"batches_per_class must be at least 1, got {batches_per_class}")
    rarest = float(np.asarray(probs)[np.asarray(probs) > 0].min())
    return int(np.ceil(batches_per_class / rarest - 1e-9))


def balanced_targets(classes: Sequence[str], probs: np.ndarray, n_batches: int, seed: int,
                     prompt_index: int) -> list[str]:
    """The targets of one prompt's ``n_batches`` batches, dealt in the target proportions
    (largest remainder), in an order shuffled by (seed, prompt index). Calibration uses it:
    a prompt's FD then measures the steering, not how its few random draws fell."""
    quota = np.asarray(probs, dtype=np.float64) * n_batches
    counts = np.floor(quota + 1e-9).astype(int)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[:n_batches - counts.sum()]] += 1
    dealt = np.repeat(np.arange(len(classes)), counts)
    np.random.default_rng([seed, prompt_index]).shuffle(dealt)
    return [classes[i] for i in dealt]


def target_rule(classes: Sequence[str], probs: np.ndarray, seed: int, batch_size: int,
                draw: str, samples_per_prompt: int | None = None) -> Callable[[Sequence], str]:
    """batch (its samples) -> its target class. ``random`` and ``quasi`` are functions of
    (seed, global batch index) (``batch_target``); ``balanced`` deals each prompt's batches
    (``balanced_targets``) and needs whole batches per prompt."""
    if draw in TARGET_DRAWS:
        return lambda batch: batch_target(classes, probs, seed, batch[0].sample // batch_size,
                                          draw)
    if draw != "balanced":
        raise ValueError(f"unknown target draw {draw!r}; use one of {TARGET_DRAWS} or "
                         "'balanced'")
    if not samples_per_prompt or samples_per_prompt % batch_size:
        raise ValueError(f"balanced targets need whole batches per prompt: "
                         f"{samples_per_prompt} samples per prompt, batches of {batch_size}")
    n_batches = samples_per_prompt // batch_size
    dealt: dict[int, list[str]] = {}

    def target(batch: Sequence) -> str:
        first = batch[0]
        if first.prompt_index not in dealt:
            dealt[first.prompt_index] = balanced_targets(classes, probs, n_batches, seed,
                                                         first.prompt_index)
        return dealt[first.prompt_index][first.repeat // batch_size]

    return target
