"""Zarr v3 activation stores: one array per site with dims (sample, step, channel).

Layout (documented for readers in ``docs/activation-store.md``):

* ``{site}``: float array (sample, step, channel_{C}); inner chunks ``(chunk_samples, 1, C)`` so
  that each (site, step) lives in its own chunks and a probe reads only what it needs;
  chunks are grouped by zarr's sharding codec into one file per (site, sample block), which
  keeps file counts sane on cluster file systems.
* coordinates ``sample`` (sample index), ``step`` (0..S-1), ``timestep`` (step), ``seed``,
  ``prompt_index`` and ``repeat`` (sample).
* group attributes: what produced the store (model, prompts, seeds, dtype, pooling, versions).

The writer fills a hidden ``*.partial`` directory and renames it into place only when every
sample has been written, so an interrupted job never leaves a store that looks complete.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from icm.capture import CapturedBatch
from icm.samples import Sample


def channel_dim(width: int) -> str:
    """Channel dimension name. xarray needs one length per dimension name in a Dataset, so
    sites of different widths get ``channel_320``, ``channel_640``...; equal widths share."""
    return f"channel_{width}"
COORDS = "timestep seed prompt_index repeat"


class ActivationStoreWriter:
    """Streams captured batches into a new store, buffering one sample block at a time.

    Writing whole blocks means no chunk is ever read back and rewritten, whatever the
    generation batch size.
    """

    def __init__(
        self,
        path: str | Path,
        samples: Sequence[Sample],
        attrs: Mapping[str, Any],
        dtype: str = "float32",
        chunk_samples: int = 128,
    ) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; remove it to regenerate")
        self.partial = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.samples = list(samples)
        self.attrs = dict(attrs)
        self.dtype = np.dtype(dtype)
        self.block = max(1, min(chunk_samples, len(self.samples)))
        self.written = 0  # samples received so far
        self.flushed = 0  # samples on disk
        self._group: zarr.Group | None = None
        self._buffer: dict[str, np.ndarray] = {}

    def __enter__(self) -> ActivationStoreWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            shutil.rmtree(self.partial, ignore_errors=True)

    def _create(self, batch: CapturedBatch) -> None:
        n, steps = len(self.samples), len(batch.timesteps)
        group = zarr.open_group(self.partial, mode="w", zarr_format=3, attributes=self.attrs)
        compressor = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
        for site, array in batch.activations.items():
            width = array.shape[-1]
            group.create_array(
                site,
                shape=(n, steps, width),
                chunks=(self.block, 1, width),
                shards=(self.block, steps, width),
                dtype=self.dtype,
                compressors=compressor,
                fill_value=np.nan,
                dimension_names=("sample", "step", channel_dim(width)),
                attributes={"coordinates": COORDS, "site": site, "kind": site.rsplit(".", 1)[-1]},
            )
            self._buffer[site] = np.full((self.block, steps, width), np.nan, self.dtype)
        columns = {
            "sample": ("sample", [s.sample for s in self.samples], "int64"),
            "seed": ("sample", [s.seed for s in self.samples], "int64"),
            "prompt_index": ("sample", [s.prompt_index for s in self.samples], "int64"),
            "repeat": ("sample", [s.repeat for s in self.samples], "int64"),
            "step": ("step", np.arange(steps), "int64"),
            "timestep": ("step", batch.timesteps, "float64"),
        }
        for name, (dim, values, kind) in columns.items():
            group.create_array(
                name, data=np.asarray(values, dtype=kind), dimension_names=(dim,)
            )
        self._group = group

    def write(self, batch: CapturedBatch) -> None:
        """Append the next ``batch.n_images`` samples, in plan order."""
        if self._group is None:
            self._create(batch)
        assert self._group is not None
        n = batch.n_images
        if self.written + n > len(self.samples):
            raise ValueError(f"store holds {len(self.samples)} samples; got {self.written + n}")
        expected = len(self._group["timestep"][:])
        if len(batch.timesteps) != expected:
            raise ValueError(f"batch has {len(batch.timesteps)} steps, store has {expected}")
        offset = 0
        while offset < n:
            at = self.written - self.flushed  # position inside the current block
            take = min(n - offset, self.block - at)
            for site, array in batch.activations.items():
                self._buffer[site][at : at + take] = array[offset : offset + take]
            offset += take
            self.written += take
            if self.written - self.flushed == self.block:
                self._flush()

    def _flush(self) -> None:
        assert self._group is not None
        count = self.written - self.flushed
        if count == 0:
            return
        region = slice(self.flushed, self.written)
        for site, buffer in self._buffer.items():
            self._group[site][region] = buffer[:count]
            buffer.fill(np.nan)
        self.flushed = self.written

    def close(self) -> Path:
        """Flush, check completeness, and move the store into place."""
        if self._group is None or self.written != len(self.samples):
            shutil.rmtree(self.partial, ignore_errors=True)
            raise RuntimeError(f"store got {self.written} of {len(self.samples)} samples")
        self._flush()
        with warnings.catch_warnings():  # v3 consolidation is zarr-python's extension; xarray
            warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)  # reads it
            zarr.consolidate_metadata(self.partial)
        self.partial.rename(self.path)
        return self.path


def open_store(path: str | Path) -> zarr.Group:
    """Open a finished store read-only."""
    return zarr.open_group(Path(path), mode="r")


def read_sites(
    stores: list[str | Path], sites: list[str] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Concatenate shards: sample ids, ``{site: (samples, steps, channels)}``, timesteps.

    ``sites=None`` reads every site; pass a subset to bound memory on large models.
    """
    groups = [open_store(p) for p in stores]
    if not groups:
        raise ValueError("no activation stores given")
    names = sites or list(groups[0].attrs["sites"])
    samples = np.concatenate([g["sample"][:] for g in groups])
    arrays = {s: np.concatenate([g[s][:] for g in groups]) for s in names}
    return samples, arrays, groups[0]["timestep"][:]


class StepStack:
    """Equal-width sites of several shards as one lazy (samples, sites, steps, channels)
    array: ``stack[rows, :, step]`` reads that step of every site (one chunk row per site
    and shard, as the store is chunked per (site, step)) and keeps it for the next call, so
    a probe fit that walks the steps in order holds one step in memory, never all of them.
    ``rows`` selects and orders samples (indices into the shards' concatenated samples)."""

    def __init__(self, stores: list[str | Path], sites: list[str],
                 rows: np.ndarray | None = None) -> None:
        self.groups = [open_store(p) for p in stores]
        if not self.groups:
            raise ValueError("no activation stores given")
        self.sites = list(sites)
        widths = {self.groups[0][s].shape[-1] for s in self.sites}
        if len(widths) != 1:
            raise ValueError(f"a StepStack holds sites of one width, got {sorted(widths)}")
        total = sum(g["sample"].shape[0] for g in self.groups)
        self.rows = np.arange(total) if rows is None else np.asarray(rows)
        steps = self.groups[0][self.sites[0]].shape[1]
        self.shape = (len(self.rows), len(self.sites), steps, widths.pop())
        self._step: tuple[int, np.ndarray] | None = None

    def step(self, step: int) -> np.ndarray:
        """(rows, sites, channels) at ``step``."""
        if self._step is None or self._step[0] != step:
            self._step = None  # release the previous step before reading the next
            per_site = [np.concatenate([g[s][:, step, :] for g in self.groups])[self.rows]
                        for s in self.sites]
            self._step = (step, np.stack(per_site, axis=1))
        return self._step[1]

    def __getitem__(self, key: tuple) -> np.ndarray:
        rows, sites, step = key
        if sites != slice(None) or not isinstance(step, (int, np.integer)):
            raise IndexError("a StepStack is read as stack[rows, :, step]")
        return self.step(int(step))[rows]


def site_widths(store: str | Path) -> dict[str, int]:
    """Channel width of every site in a store, in forward order."""
    group = open_store(store)
    return {s: group[s].shape[-1] for s in group.attrs["sites"]}
