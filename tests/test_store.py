"""Zarr store layout: xarray opens it, chunks are per (site, step), nothing half-written."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from icm.capture import CapturedBatch
from icm.cli import main as cli_main
from icm.samples import plan_samples
from icm.store import ActivationStoreWriter

SITES = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": 8,
         "mid_block.attentions.0.transformer_blocks.0.attn2": 16}
TIMESTEPS = np.array([901.0, 601.0, 301.0])


def batch(rng, n):
    acts = {s: rng.standard_normal((n, len(TIMESTEPS), w)).astype(np.float32)
            for s, w in SITES.items()}
    return CapturedBatch(acts, TIMESTEPS)


def write(path, samples, sizes, chunk=4, rng=None):
    rng = rng or np.random.default_rng(0)
    batches = [batch(rng, n) for n in sizes]
    with ActivationStoreWriter(path, samples, {"model": {"name": "t"}}, chunk_samples=chunk) as w:
        for b in batches:
            w.write(b)
    return {s: np.concatenate([b.activations[s] for b in batches]) for s in SITES}


def test_round_trip_through_xarray(tmp_path):
    samples = plan_samples(["p0", "p1"], 5, base_seed=3)[:10]
    expected = write(tmp_path / "a.zarr", samples, sizes=[3, 3, 3, 1])  # not chunk-aligned
    ds = xr.open_zarr(tmp_path / "a.zarr")
    for site, width in SITES.items():
        assert ds[site].dims == ("sample", "step", f"channel_{width}")
        np.testing.assert_array_equal(ds[site].values, expected[site])
    assert list(ds["sample"].values) == list(range(10))
    assert list(ds["seed"].values) == [s.seed for s in samples]
    np.testing.assert_array_equal(ds["timestep"].values, TIMESTEPS)
    assert ds.attrs["model"] == {"name": "t"}
    # Each (site, step) lives in its own chunks.
    array = zarr.open_group(tmp_path / "a.zarr", mode="r")[next(iter(SITES))]
    assert array.chunks == (4, 1, 8)
    assert array.metadata.dimension_names == ("sample", "step", "channel_8")


def test_failure_leaves_nothing(tmp_path):
    samples = plan_samples(["p"], 6, base_seed=0)
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationStoreWriter(tmp_path / "s.zarr", samples, {}, chunk_samples=2) as w:
            w.write(batch(np.random.default_rng(0), 4))
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="4 of 6 samples"):
        with ActivationStoreWriter(tmp_path / "s.zarr", samples, {}, chunk_samples=2) as w:
            w.write(batch(np.random.default_rng(0), 4))
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_and_to_overfill(tmp_path):
    samples = plan_samples(["p"], 2, base_seed=0)
    write(tmp_path / "s.zarr", samples, sizes=[2])
    with pytest.raises(FileExistsError):
        ActivationStoreWriter(tmp_path / "s.zarr", samples, {})
    with pytest.raises(ValueError, match="holds 2 samples"):
        with ActivationStoreWriter(tmp_path / "t.zarr", samples, {}) as w:
            w.write(batch(np.random.default_rng(0), 3))


def test_inspect_prints_a_summary(tmp_path, capsys):
    write(tmp_path / "s.zarr", plan_samples(["p"], 3, base_seed=0), sizes=[3])
    assert cli_main(["inspect", str(tmp_path / "s.zarr")]) == 0
    out = capsys.readouterr().out
    assert "samples    3" in out and "steps      3" in out
    for site in SITES:
        assert site in out
    assert cli_main(["inspect", str(tmp_path)]) == 2
