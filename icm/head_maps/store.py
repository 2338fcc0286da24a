"""Zarr v3 stores of per-head word maps: one array per ``attn2`` site, dims
``(sample, head, word, y, x)`` at the site's native resolution.

Like the activation stores (``icm.io.activations``): float16 by default (maps are probabilities in
[0, steps]), chunked per block of samples (one chunk holds every head and word of a block),
``dimension_names`` so that ``xarray.open_zarr`` opens it, coordinates ``sample``, ``seed``
and ``prompt_index``, attributes saying what produced it (``kind: head-maps``, the words of
each sample in slot order, the step window, the model, versions). The writer fills a hidden
``*.partial`` directory and renames it into place only when every sample is written, and
refuses non-finite maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from icm.generation.samples import Sample
from icm.hooks.head_maps import HeadMaps
from icm.io.activations import PartialStore, StoreDataError

KIND = "head-maps"


class HeadMapStoreWriter(PartialStore):
    """Writes ``HeadMaps`` of successive generation batches, in sample-plan order."""

    def __init__(self, path: str | Path, samples: Sequence[Sample], attrs: Mapping[str, Any],
                 dtype: str = "float16", chunk_samples: int = 64) -> None:
        super().__init__(path, len(samples))
        self.samples, self.attrs = list(samples), dict(attrs)
        self.dtype = np.dtype(dtype)
        self.block = max(1, min(chunk_samples, len(self.samples)))
        self.words: list[list[str]] = []
        self.steps: list[int] | None = None
        self._group: zarr.Group | None = None
        self.sites: list[str] = []

    def _create(self, batch: HeadMaps) -> None:
        group = zarr.open_group(self.partial, mode="w", zarr_format=3)
        compressor = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
        n = len(self.samples)
        for site, maps in batch.maps.items():
            group.create_array(
                site, shape=(n, *maps.shape[1:]), chunks=(self.block, *maps.shape[1:]),
                dtype=self.dtype, compressors=compressor, fill_value=np.nan,
                dimension_names=("sample", "head", "word", f"y_{maps.shape[3]}",
                                 f"x_{maps.shape[4]}"),
                attributes={"coordinates": "seed prompt_index", "site": site})
        for name, values in (("sample", [s.sample for s in self.samples]),
                             ("seed", [s.seed for s in self.samples]),
                             ("prompt_index", [s.prompt_index for s in self.samples])):
            group.create_array(name, data=np.asarray(values, dtype="int64"),
                               dimension_names=("sample",))
        group.create_array("word", data=np.arange(len(batch.words[0]), dtype="int64"),
                           dimension_names=("word",))
        self._group = group
        self.sites = list(batch.maps)

    def write(self, batch: HeadMaps) -> None:
        """Append the next ``len(batch.words)`` samples."""
        if self._group is None:
            self._create(batch)
            self.steps = list(batch.steps)
        assert self._group is not None
        if batch.steps != self.steps:
            raise ValueError(f"batch summed steps {batch.steps}, the store {self.steps}")
        n = len(batch.words)
        if self.written + n > len(self.samples):
            raise ValueError(f"store holds {len(self.samples)} samples; got {self.written + n}")
        limit = float(np.finfo(self.dtype).max)
        for site, maps in batch.maps.items():
            if not np.isfinite(maps).all() or (maps.size and np.abs(maps).max() > limit):
                raise StoreDataError(f"site {site}: head maps NaN, inf or beyond "
                                     f"{self.dtype.name}'s range; nothing is stored")
            self._group[site][self.written:self.written + n] = maps
        self.words += [list(w) for w in batch.words]
        self.written += n

    def close(self) -> Path:
        self._check_complete(self._group, "head-map store")
        self._group.attrs.update({**self.attrs, "kind": KIND, "sites": self.sites,
                                  "words": self.words, "steps_summed": self.steps,
                                  "n_samples": len(self.samples)})
        return self._publish()


def describe_head_store(path: str | Path) -> str:
    """``python -m icm inspect`` of a head-map store: what produced it, then a line per site."""
    group = zarr.open_group(Path(path), mode="r")
    attrs = dict(group.attrs)
    words = attrs.get("words") or [[]]
    lines = [f"store      {path} (head maps)",
             f"model      {attrs.get('model', {}).get('name', '?')}",
             f"samples    {attrs.get('n_samples')}; words per sample {len(words[0])} "
             f"(e.g. {words[0]})",
             f"steps      {attrs.get('steps_summed')} summed"]
    width = max((len(s) for s in attrs.get("sites", [])), default=4)
    lines.append(f"  {'site':<{width}}  {'(sample, head, word, y, x)':>28} {'dtype':>8}")
    for site in attrs.get("sites", []):
        array = group[site]
        lines.append(f"  {site:<{width}}  {str(array.shape):>28} {str(array.dtype):>8}")
    return "\n".join(lines)
