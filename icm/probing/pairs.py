"""A class pair: the binary probe and steering direction between two classes. Its own
torch-free module, so that the config checks at the workflow's start can use it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pair:
    """A binary probe: ``positive`` against ``negative`` (direction points to positive)."""

    negative: str
    positive: str

    @property
    def name(self) -> str:
        return f"{self.negative}-{self.positive}"


#: The negative side of a one-vs-rest probe: every labelled image of another class.
REST = "rest"
#: The `pairs` value that asks for one one-vs-rest probe per class.
ONE_VS_REST = "one-vs-rest"


def concept_pairs(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A concept's [negative, positive] class pairs: its `pairs`, by default its first class
    against each other one (none without classes). ``pairs: one-vs-rest`` gives each class
    c the pair (``REST``, c): its probe tells c from every other class, so its direction
    points toward c, not away from one other class (with three or more classes a pairwise
    push "to circle" from square-circle may land on triangle)."""
    classes = list(spec.get("classes") or [])
    if spec.get("pairs") == ONE_VS_REST:
        return [(REST, c) for c in classes]
    if spec.get("pairs"):
        return [tuple(p) for p in spec["pairs"]]
    return [(classes[0], other) for other in classes[1:]]
