"""Command line: ``python -m icm inspect PATH`` summarises an activation store."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from icm.store import open_store

COORDINATE_ARRAYS = {"sample", "step", "timestep", "seed", "prompt_index", "repeat"}


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # unreachable


def _disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe_store(path: str | Path) -> str:
    """A human-readable summary: attributes, axes, and one line per site."""
    path = Path(path)
    group = open_store(path)
    attrs = dict(group.attrs)
    arrays = dict(group.arrays())
    sites = [name for name in arrays if name not in COORDINATE_ARRAYS]
    samples = arrays["sample"][:]
    timesteps = arrays["timestep"][:]
    lines = [f"store      {path}"]
    model = attrs.get("model", {})
    if isinstance(model, dict):
        lines.append(f"model      {model.get('name')} ({model.get('family')}, "
                     f"{model.get('source')}, {model.get('dtype')}, {model.get('scheduler')})")
    for key in ("concept", "shard", "n_shards", "base_seed", "pooling", "cfg_half", "store_dtype"):
        if key in attrs:
            lines.append(f"{key:<10} {attrs[key]}")
    for i, prompt in enumerate(attrs.get("prompts", [])):
        lines.append(f"prompt {i:<3} {prompt!r}")
    lines.append(f"samples    {len(samples)} (ids {samples.min()}..{samples.max()})")
    shown = ", ".join(f"{t:g}" for t in timesteps[:6]) + (", ..." if len(timesteps) > 6 else "")
    requested = attrs.get("sampler", {}).get("steps")
    scheduler = attrs.get("scheduler", {}).get("class", "")
    loop = (f" loop steps of {requested} inference steps, {scheduler}"
            if requested and requested != len(timesteps) else "")
    lines.append(f"steps      {len(timesteps)}{loop} (timesteps {shown})")
    lines.append(f"sites      {len(sites)}  on disk {_size(_disk_size(path))}")
    width = max((len(s) for s in sites), default=4)
    lines.append(f"  {'site':<{width}}  {'kind':<5} {'shape':>16} {'dtype':>8} {'chunks':>16}")
    for name in sites:
        array: zarr.Array = arrays[name]
        lines.append(f"  {name:<{width}}  {name.rsplit('.', 1)[-1]:<5} {str(array.shape):>16} "
                     f"{str(array.dtype):>8} {str(array.chunks):>16}")
    versions = attrs.get("versions")
    if versions:
        lines.append("versions   " + json.dumps(versions))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="summarise a Zarr activation store")
    inspect.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.command == "inspect":
        if not (args.path / "zarr.json").exists():
            print(f"error: {args.path} is not a Zarr v3 store (no zarr.json)", file=sys.stderr)
            return 2
        np.set_printoptions(precision=3)
        print(describe_store(args.path))
    return 0
