"""Which way steering pushes toward each class. A pair's positive class is reached with +v,
the negative class of a single pair with -v; a class that is the negative of several pairs
(the majority class the pairs are built around, e.g. white or adult) gets no push. A variant
may instead name its sites and strengths per target (``explicit_pushes``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from icm.probing.pairs import Pair


@dataclass(frozen=True)
class Push:
    """Steer along the direction of ``pair`` (its ``negative-positive`` name) times ``sign``."""

    pair: str
    sign: float


def class_pushes(
    classes: Sequence[str], pairs: Sequence[tuple[str, str]]
) -> dict[str, Push | None]:
    """How steering reaches each class (None: the class is left unpushed)."""
    pushes: dict[str, Push | None] = {}
    for cls in classes:
        positive = [Pair(n, p).name for n, p in pairs if p == cls]
        negative = [Pair(n, p).name for n, p in pairs if n == cls]
        if positive:
            pushes[cls] = Push(positive[0], +1.0)
        elif len(negative) == 1:
            pushes[cls] = Push(negative[0], -1.0)
        else:
            pushes[cls] = None
    return pushes


@dataclass(frozen=True)
class ExplicitPush:
    """A hand-picked push (the paper's Table 6): ``strength`` times the unit direction of
    ``pair`` at ``sites``; the strength is signed along the pair (positive toward its
    second, positive class), as the paper writes it (woman -10, man 10 on woman-man)."""

    pair: str
    sites: tuple[str, ...]
    strength: float


def explicit_pushes(classes: Sequence[str], pairs: Sequence[tuple[str, str]],
                    targets: Mapping[str, Mapping]) -> dict[str, ExplicitPush | None]:
    """Per class its explicit push (None: not listed, so batches toward it stay unsteered,
    as the paper leaves adult and white). A listed class must have a direction, and its
    strength's sign must reach it: a sign that pushes away from the target is a typo."""
    unknown = sorted(set(targets) - set(classes))
    if unknown:
        raise ValueError(f"explicit targets {unknown} are not classes of the concept "
                         f"{list(classes)}")
    pushes = class_pushes(classes, pairs)
    out: dict[str, ExplicitPush | None] = {}
    for cls in classes:
        entry = targets.get(cls)
        if entry is None:
            out[cls] = None
            continue
        push = pushes[cls]
        if push is None:
            raise ValueError(f"explicit target {cls!r} has no direction: it is the positive class "
                             f"of no pair and the negative class of several or none {list(pairs)}")
        strength = float(entry["alpha"])
        if strength == 0 or np.sign(strength) != push.sign:
            side = "positive" if push.sign > 0 else "negative"
            raise ValueError(f"explicit target {cls!r}: strength {strength:g} does not push toward "
                             f"it; it is the {side} class of {push.pair}, so its strength must "
                             f"be {side}")
        sites = tuple(entry["sites"])
        if not sites or len(set(sites)) != len(sites):
            raise ValueError(f"explicit target {cls!r}: sites must be distinct and at least one, "
                             f"got {list(sites)}")
        out[cls] = ExplicitPush(push.pair, sites, strength)
    return out
