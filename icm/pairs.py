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


def concept_pairs(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A concept's [negative, positive] class pairs: its `pairs`, by default its first class
    against each other one (none without classes)."""
    if spec.get("pairs"):
        return [tuple(p) for p in spec["pairs"]]
    classes = list(spec.get("classes") or [])
    return [(classes[0], other) for other in classes[1:]]
