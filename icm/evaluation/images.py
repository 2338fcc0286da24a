"""A variant's images read back from its shards, and the paper's scale for CLIP scores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from PIL import Image


def paper_scale(cosine: float) -> float:
    """A mean cosine as the paper reports CLIP-I and CLIP-T: (cos + 1) / 2, in [0, 1]."""
    return (cosine + 1) / 2


def read_shards(tables: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate shard tables, image paths made absolute, ordered by sample."""
    parts = []
    for table in tables:
        frame = pd.read_csv(table, keep_default_na=False)
        frame["image"] = [str((Path(table).parent / p).resolve()) for p in frame["image"]]
        parts.append(frame)
    return pd.concat(parts, ignore_index=True).sort_values("sample", ignore_index=True)


def load_images(paths: Sequence[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


