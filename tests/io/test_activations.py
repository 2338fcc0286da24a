"""Zarr store layout: xarray opens it, chunks are per (site, step), nothing half-written."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from icm.cli import main as cli_main
from icm.generation.samples import plan_samples
from icm.hooks.capture import CapturedBatch
from icm.io.activations import ActivationStoreWriter, StepStack, StoreDataError, read_sites

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
    attrs = {"model": {"name": "t"}, "sites": list(SITES), "n_samples": len(samples)}
    with ActivationStoreWriter(path, samples, attrs, chunk_samples=chunk) as w:
        for b in batches:
            w.write(b)
    return {s: np.concatenate([b.activations[s] for b in batches]) for s in SITES}


def test_round_trip_through_xarray(tmp_path):
    samples = plan_samples(["p0", "p1"], 5, base_seed=3)[:10]
    expected = write(tmp_path / "a.zarr", samples, sizes=[3, 3, 3, 1])  # not chunk-aligned
    ds = xr.open_zarr(tmp_path / "a.zarr")
    for site, width in SITES.items():
        assert ds[site].dims == ("sample", "step", f"channel_{width}")
        assert ds[site].chunks == ((4, 4, 2), (1, 1, 1), (width,))  # lazy: dask, per step
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


def test_inspect_lists_sites_in_forward_order(tmp_path, capsys):
    """As the denoiser runs them (FLUX: double-stream blocks 0..10, then single-stream),
    not as the group lists its arrays."""
    forward = ["transformer_blocks.2", "transformer_blocks.10", "single_transformer_blocks.0"]
    samples = plan_samples(["p"], 2, base_seed=0)
    rng = np.random.default_rng(0)
    acts = {s: rng.standard_normal((2, len(TIMESTEPS), 4)).astype(np.float32) for s in forward}
    with ActivationStoreWriter(tmp_path / "s.zarr", samples, {"sites": forward}) as w:
        w.write(CapturedBatch(acts, TIMESTEPS))
    assert cli_main(["inspect", str(tmp_path / "s.zarr")]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()
            if line.startswith("  ") and "blocks." in line]
    assert rows == forward


ATTN1 = next(iter(SITES))


def test_the_writer_refuses_nan_and_float16_overflow_and_leaves_nothing(tmp_path):
    samples = plan_samples(["p"], 4, base_seed=0)
    bad = batch(np.random.default_rng(0), 4)
    bad.activations[ATTN1][2, 1, 5] = np.nan
    with pytest.raises(StoreDataError, match=rf"site {ATTN1}: .*NaN or inf at steps \[1\] "
                                             rf"of samples \[2\]"):
        with ActivationStoreWriter(tmp_path / "s.zarr", samples, {}, chunk_samples=2) as w:
            w.write(bad)
    big = batch(np.random.default_rng(0), 4)
    big.activations[ATTN1][0, 2, 0] = 7e4  # fine in float32, inf in float16
    with pytest.raises(StoreDataError,
                       match=r"exceeds float16's range .* generation.store_dtype: float32"):
        with ActivationStoreWriter(tmp_path / "s.zarr", samples, {}, "float16", 2) as w:
            w.write(big)
    assert list(tmp_path.iterdir()) == []  # no store, no partial directory
    with ActivationStoreWriter(tmp_path / "s.zarr", samples, {}, "float32", 2) as w:
        w.write(big)  # float32 holds it


def test_reading_refuses_missing_damaged_and_nonfinite_chunks(tmp_path, capsys):
    samples = plan_samples(["p"], 8, base_seed=0)
    store = tmp_path / "s.zarr"
    write(store, samples, sizes=[8], chunk=4)
    assert cli_main(["inspect", str(store)]) == 0
    assert "check      OK" in capsys.readouterr().out
    shards = sorted(p for p in (store / ATTN1 / "c").rglob("*") if p.is_file())
    assert len(shards) == 2  # one file per block of 4 samples
    shards[1].unlink()  # a lost file reads as the fill value, NaN
    for read in (lambda: read_sites([store], [ATTN1]),
                 lambda: StepStack([store], [ATTN1]).step(0)):
        with pytest.raises(StoreDataError, match=rf"site {ATTN1}.*missing chunk file.*"
                                                 rf"{shards[1]}"):
            read()
    assert cli_main(["inspect", str(store)]) == 1
    assert f"shard file {shards[1]} is missing" in capsys.readouterr().out

    write(store2 := tmp_path / "t.zarr", samples, sizes=[8], chunk=4)
    damaged = sorted(p for p in (store2 / ATTN1 / "c").rglob("*") if p.is_file())[0]
    damaged.write_bytes(damaged.read_bytes()[:40])  # truncated
    with pytest.raises(StoreDataError, match=rf"site {ATTN1} cannot be read.*damaged: "
                                             rf"\['{damaged}'\]"):
        StepStack([store2], [ATTN1]).step(1)
    assert cli_main(["inspect", str(store2)]) == 1
    assert "cannot be decoded" in capsys.readouterr().out

    write(store3 := tmp_path / "u.zarr", samples, sizes=[8], chunk=4)
    array = zarr.open_group(store3, mode="r+")[ATTN1]
    array[5, 2, 0] = np.inf  # written behind the writer's back
    with pytest.raises(StoreDataError, match=rf"site {ATTN1} step 2: 1 of .* NaN or inf"):
        StepStack([store3], [ATTN1]).step(2)
    StepStack([store3], [ATTN1]).step(1)  # the other steps are fine
    assert cli_main(["inspect", str(store3)]) == 1
    assert "1 NaN or inf values in samples 4..7, steps [2]" in capsys.readouterr().out


def test_inspect_explains_what_is_not_a_store_without_hanging(tmp_path, capsys):
    import os

    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w", zarr_format=3, attributes={"hello": 1})
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{not json")
    fifo = tmp_path / "fifo.zarr"
    fifo.mkdir()
    os.mkfifo(fifo / "zarr.json")  # opening it for reading would block
    for path, message in ((foreign, "not an ICM activation store"), (broken, "is broken"),
                          (fifo, "no regular file zarr.json"),
                          (tmp_path / "none", "not a directory")):
        assert cli_main(["inspect", str(path)]) == 2
        assert message in capsys.readouterr().err
