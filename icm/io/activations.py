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

from icm.generation.samples import Sample
from icm.hooks.capture import CapturedBatch
from icm.io.finite import nonfinite_steps


def channel_dim(width: int) -> str:
    """Channel dimension name. xarray needs one length per dimension name in a Dataset, so
    sites of different widths get ``channel_320``, ``channel_640``...; equal widths share."""
    return f"channel_{width}"
COORDS = "timestep seed prompt_index repeat"


def site_kind_name(site: str) -> str:
    """A site's kind in the family table (attn1, attn2, double, single); the last path
    component for a module no kind matches (test doubles)."""
    from icm.models.families import kind_of

    try:
        return kind_of(site).name
    except ValueError:
        return site.rsplit(".", 1)[-1]


class StoreDataError(ValueError):
    """A store holds values a later stage must not use: NaN or inf (a missing chunk reads as
    NaN, the arrays' fill value), or a chunk file that cannot be decoded."""


def shard_file(store: str | Path, site: str, block: int) -> Path:
    """The file holding a site's sample block (zarr v3 default chunk keys, one shard per
    (site, sample block))."""
    return Path(store) / site / "c" / str(block) / "0" / "0"


def missing_shards(store: str | Path, site: str) -> list[Path]:
    """The shard files of ``site`` that should be on disk and are not."""
    array = open_store(store)[site]
    blocks = -(-array.shape[0] // array.shards[0])
    return [shard_file(store, site, b) for b in range(blocks)
            if not shard_file(store, site, b).is_file()]


def undecodable_shards(group: zarr.Group, store: str | Path, site: str) -> list[str]:
    """The shard files of ``site`` that exist but cannot be decoded (read block by block:
    only called once a read has failed)."""
    array, bad = group[site], []
    block = array.shards[0]
    for index, start in enumerate(range(0, array.shape[0], block)):
        path = shard_file(store, site, index)
        if path.is_file():
            try:
                array[start:start + block, 0]
            except Exception:
                bad.append(str(path))
    return bad


def check_finite(values: np.ndarray, store: str | Path, site: str, step: int | None) -> None:
    """Refuse NaN or inf in ``values`` read from ``site`` of ``store`` (at ``step``), naming
    both, and the missing shard files when there are any."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    where = f" step {step}" if step is not None else ""
    missing = [str(p) for p in missing_shards(store, site)]
    cause = (f"missing chunk file(s) {missing} read as NaN" if missing else
             "the store holds them (regenerate it)")
    raise StoreDataError(f"{store}: site {site}{where}: {int(bad.sum())} of {bad.size} values "
                         f"are NaN or inf ({cause}); `python -m icm inspect {store}` checks "
                         "the whole store")


class PartialStore:
    """A store filled under a hidden ``*.partial`` name and moved into place by
    ``_publish`` only once complete; on an error (or an incomplete ``close``) the partial
    directory is removed, so nothing that looks finished is left behind."""

    def __init__(self, path: str | Path, samples: int) -> None:
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; remove it to regenerate")
        self.partial = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.expected = samples
        self.written = 0  # samples received so far

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            shutil.rmtree(self.partial, ignore_errors=True)

    def close(self) -> Path:  # pragma: no cover
        raise NotImplementedError

    def _check_complete(self, group: zarr.Group | None, what: str = "store") -> None:
        if group is None or self.written != self.expected:
            shutil.rmtree(self.partial, ignore_errors=True)
            raise RuntimeError(f"{what} got {self.written} of {self.expected} samples")

    def _publish(self) -> Path:
        with warnings.catch_warnings():  # v3 consolidation is zarr-python's extension; xarray
            warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)  # reads it
            zarr.consolidate_metadata(self.partial)
        self.partial.rename(self.path)
        return self.path


class ActivationStoreWriter(PartialStore):
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
        super().__init__(path, len(samples))
        self.samples = list(samples)
        self.attrs = dict(attrs)
        self.dtype = np.dtype(dtype)
        self.block = max(1, min(chunk_samples, len(self.samples)))
        self.flushed = 0  # samples on disk
        self._group: zarr.Group | None = None
        self._buffer: dict[str, np.ndarray] = {}

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
                attributes={"coordinates": COORDS, "site": site, "kind": site_kind_name(site)},
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
        for site, array in batch.activations.items():
            self._check(site, array)
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

    def _check(self, site: str, array: np.ndarray) -> None:
        """Refuse what a probe could not use: NaN or inf, or values beyond the store dtype's
        range (float16 tops out at 65504: casting a larger activation makes it inf)."""
        ids = [s.sample for s in self.samples[self.written:self.written + len(array)]]
        bad = ~np.isfinite(array)
        if bad.any():
            rows, steps = np.nonzero(bad.any(axis=2))
            raise StoreDataError(
                f"site {site}: the model produced NaN or inf at steps "
                f"{sorted(set(steps.tolist()))} of samples {sorted({ids[r] for r in rows})}; "
                "nothing is stored")
        limit = float(np.finfo(self.dtype).max)
        peak = float(np.abs(array).max()) if array.size else 0.0
        if peak > limit:
            step = int(np.abs(array).max(axis=(0, 2)).argmax())
            raise StoreDataError(
                f"site {site}: an activation of magnitude {peak:.4g} at step {step} exceeds "
                f"{self.dtype.name}'s range ({limit:.6g}) and would be stored as inf; set "
                "generation.store_dtype: float32")

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
        self._check_complete(self._group)
        self._flush()
        return self._publish()


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
    arrays = {s: np.concatenate([read_checked(g, p, s) for g, p in zip(groups, stores)])
              for s in names}
    return samples, arrays, groups[0]["timestep"][:]


def read_checked(group: zarr.Group, store: str | Path, site: str,
                 step: int | None = None) -> np.ndarray:
    """A site of an open store (one step of it, or all), refused with the site, step and
    file named when a chunk cannot be decoded or a value is NaN or inf."""
    try:
        values = group[site][:] if step is None else group[site][:, step, :]
    except Exception as error:  # a truncated or foreign chunk: zarr's codecs raise anything
        raise StoreDataError(f"{store}: site {site} cannot be read ({type(error).__name__}: "
                             f"{error}); damaged: {undecodable_shards(group, store, site)}; "
                             "regenerate the store") from error
    check_finite(values, store, site, step)
    return values


class StepStack:
    """Equal-width sites of several shards as one lazy (samples, sites, steps, channels)
    array: ``stack[rows, :, step]`` reads that step of every site (one chunk row per site
    and shard, as the store is chunked per (site, step)) and keeps it for the next call, so
    a probe fit that walks the steps in order holds one step in memory, never all of them.
    ``rows`` selects and orders samples (indices into the shards' concatenated samples)."""

    def __init__(self, stores: list[str | Path], sites: list[str],
                 rows: np.ndarray | None = None) -> None:
        self.stores = list(stores)
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
            per_site = [np.concatenate([read_checked(g, p, s, step) for g, p in
                                        zip(self.groups, self.stores)])[self.rows]
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


def verify_store(store: str | Path) -> list[str]:
    """Everything wrong with a finished store, one line each (empty: nothing): sites the
    attributes list but the group lacks, shapes other than the recorded samples and steps,
    missing shard files (zarr reads them as the fill value, NaN), chunks that cannot be
    decoded, and NaN or inf values. Reads one sample block of one site at a time."""
    group = open_store(store)
    sites = group.attrs.get("sites")
    if not isinstance(sites, list) or "timestep" not in group:
        return [f"{store} is a Zarr group but not an activation store (no 'sites' attribute "
                "or 'timestep' array)"]
    steps = group["timestep"].shape[0]
    samples = int(group.attrs.get("n_samples", group["sample"].shape[0]))
    problems = []
    for site in sites:
        if site not in group:
            problems.append(f"site {site}: listed in the attributes but not in the store")
            continue
        array = group[site]
        if array.shape[:2] != (samples, steps):
            problems.append(f"site {site}: shape {array.shape}, but the store records "
                            f"{samples} samples and {steps} steps")
        missing = set(missing_shards(store, site))
        problems += [f"site {site}: shard file {p} is missing (it reads as NaN)"
                     for p in sorted(missing)]
        block = array.shards[0]
        for index, start in enumerate(range(0, array.shape[0], block)):
            if shard_file(store, site, index) in missing:
                continue
            try:
                values = array[start:start + block]
            except Exception as error:  # truncated or foreign bytes
                problems.append(f"site {site}: {shard_file(store, site, index)} cannot be "
                                f"decoded ({type(error).__name__}: {error})")
                continue
            at = nonfinite_steps(values, 1)
            if at:
                problems.append(f"site {site}: {int((~np.isfinite(values)).sum())} NaN or inf "
                                f"values in samples {start}..{start + len(values) - 1}, "
                                f"steps {at}")
    return problems
