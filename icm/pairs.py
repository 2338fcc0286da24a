"""A class pair: the binary probe and steering direction between two classes. Its own
torch-free module, so that the config checks at the workflow's start can use it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pair:
    """A binary probe: ``positive`` against ``negative`` (direction points to positive)."""

    negative: str
    positive: str

    @property
    def name(self) -> str:
        return f"{self.negative}-{self.positive}"
