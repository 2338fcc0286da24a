"""Shard generation: images, sample table and store agree; a failure leaves nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from icm.generation.samples import plan_samples
from icm.generation.shard import generate_images, generate_shard
from icm.hooks.capture import capture_activations
from icm.hooks.sites import denoiser_of, list_sites

ROOT = Path(__file__).resolve().parents[2]


def test_shard_outputs_agree(tmp_path, tiny_pipe, tiny_settings):
    samples = plan_samples(["a photo of a person", "a photo of a man"], 3, base_seed=1)
    out = tmp_path / "shard-000"
    generate_shard(tiny_pipe, samples, tiny_settings, out / "images", out / "samples.csv",
                   out / "activations.zarr", batch_size=4, chunk_samples=4, progress=False,
                   attrs={"concept": "test"})
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert [int(r["sample"]) for r in rows] == [s.sample for s in samples]
    assert [int(r["seed"]) for r in rows] == [s.seed for s in samples]
    ds = xr.open_zarr(out / "activations.zarr")
    sites = list_sites(denoiser_of(tiny_pipe))
    assert sorted(ds.data_vars) == sorted(sites)
    assert ds[sites[0]].shape[:2] == (6, tiny_settings.steps)
    assert ds.attrs["concept"] == "test" and ds.attrs["versions"]["torch"]
    # Regenerating the last batch (samples 4, 5) reproduces its images and activations.
    with capture_activations(tiny_pipe) as cap:
        again = generate_images(tiny_pipe, samples[4:], tiny_settings)
        acts = cap.pop()
    for row, image in zip(rows[4:], again):
        assert np.array_equal(np.asarray(Image.open(out / row["image"])), np.asarray(image))
    for site in sites:
        np.testing.assert_array_equal(ds[site].values[4:], acts.activations[site])


def test_a_store_records_the_locked_versions(tmp_path, tiny_pipe, tiny_settings):
    """The versions a store records are requirements.lock's (torch follows TORCH_PIN): what
    `make install` gives. Not a device check: a GPU image with its own packages fails it
    (benchmarks/gpu_checks.sh leaves it out)."""
    samples = plan_samples(["a photo of a person"], 2, base_seed=1)
    generate_shard(tiny_pipe, samples, tiny_settings, tmp_path / "images",
                   tmp_path / "samples.csv", tmp_path / "activations.zarr", batch_size=2,
                   progress=False)
    locked = dict(line.split("==") for line in (ROOT / "requirements.lock").read_text()
                  .splitlines() if "==" in line and not line.startswith((" ", "#")))
    versions = xr.open_zarr(tmp_path / "activations.zarr").attrs["versions"]
    recorded = {k: v for k, v in versions.items() if k not in ("python", "icm")}
    assert set(recorded) - set(locked) == {"torch"}, "a tracked package is not locked"
    assert {k: v for k, v in recorded.items() if k in locked} == {
        k: locked[k] for k in recorded if k in locked}, "run `make install` after `make lock`"


def test_failure_midway_leaves_nothing(tmp_path, tiny_pipe, tiny_settings, monkeypatch):
    samples = plan_samples(["a photo of a person"], 4, base_seed=0)
    calls = {"n": 0}
    original = tiny_pipe.__class__.__call__

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("GPU fell over")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe.__class__, "__call__", flaky)
    with pytest.raises(RuntimeError, match="fell over"):
        generate_shard(tiny_pipe, samples, tiny_settings, tmp_path / "images",
                       tmp_path / "samples.csv", tmp_path / "activations.zarr",
                       batch_size=2, progress=False)
    assert list(tmp_path.iterdir()) == []
