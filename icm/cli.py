"""Command line: ``python -m icm inspect PATH`` summarises an activation store; ``plan``
prices a target before it runs;
``python -m icm sites MODEL`` lists a model's sites (kind, width) without its weights."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from icm.io.activations import open_store, site_kind_name, verify_store

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
    # Forward order, as the attributes list them (the group lists arrays alphabetically:
    # FLUX's single-stream blocks before its double-stream ones, block 10 before block 2).
    listed = [name for name in attrs.get("sites") or [] if name in arrays]
    sites = listed + sorted(set(arrays) - set(listed) - set(COORDINATE_ARRAYS))
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
    lines.append(f"  {'site':<{width}}  {'kind':<6} {'shape':>16} {'dtype':>8} {'chunks':>16}")
    for name in sites:
        array: zarr.Array = arrays[name]
        lines.append(f"  {name:<{width}}  {site_kind_name(name):<6} {str(array.shape):>16} "
                     f"{str(array.dtype):>8} {str(array.chunks):>16}")
    versions = attrs.get("versions")
    if versions:
        lines.append("versions   " + json.dumps(versions))
    return "\n".join(lines)


def describe_sites(model: str, config_path: str | Path = "config.yaml") -> str:
    """The sites of ``model`` (a name in ``config_path``'s ``models``, or a family name),
    built from its config on the meta device: one line per site, then counts per kind."""
    from collections import Counter

    import yaml

    from icm.models.families import FAMILIES, family_of_folder
    from icm.models.meta import denoiser_config, denoiser_on_meta, site_table

    models = {}
    if Path(config_path).is_file():
        models = (yaml.safe_load(Path(config_path).read_text()) or {}).get("models", {})
    folder = family_of_folder(model) if Path(model).is_dir() else None
    if model in models:
        entry = models[model]
    elif folder is not None:  # a local diffusers folder: its own denoiser config
        entry = {"family": folder.name, "source": model}
    elif model in FAMILIES:
        entry = {"family": model}
    else:
        raise ValueError(f"{model!r} is no model of {config_path} ({', '.join(models)}), no "
                         f"family ({', '.join(FAMILIES)}) and no diffusers model folder")
    family, config, origin = denoiser_config(model, entry)
    rows = site_table(denoiser_on_meta(config))
    width = max((len(r["site"]) for r in rows), default=4)
    lines = [f"model      {model} (family {family.name}, {family.denoiser} "
             f"{config['_class_name']}, config from {origin})",
             f"guidance   {family.guidance}; steered kinds {', '.join(family.steer_kinds)}",
             f"  {'site':<{width}}  {'kind':<6} {'width':>6}"]
    lines += [f"  {r['site']:<{width}}  {r['kind']:<6} {r['width']:>6}" for r in rows]
    counts = Counter((r["kind"], r["label"]) for r in rows)
    lines.append("sites      " + ", ".join(f"{n} {kind} ({label})"
                                         for (kind, label), n in counts.items()))
    return "\n".join(lines)


def print_plan(targets: Sequence[str], configfiles: Sequence[str], rates: Path | None) -> int:
    """Print the cost plan of ``targets`` (``icm.costs``); 2 when the workflow cannot plan."""
    import yaml

    from icm.costs.plan import load_config, plan, planned_jobs, rule_stages
    from icm.costs.rates import rates_with, report

    try:
        jobs = planned_jobs(targets, configfiles)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = load_config(configfiles)
    table = plan(jobs, config, rule_stages())
    models = {j.wildcards["model"] for j in jobs if "model" in j.wildcards}
    measured = rates_with(yaml.safe_load(rates.read_text()) if rates else None)
    print(f"plan of {' '.join(targets)} ({len(jobs)} jobs of a fresh run; calibration counted "
          "with every doubling of its sweep, an upper bound)")
    print(report(table, models, measured))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="icm", description="The ICM workflow's command line (also `python -m icm`): "
        "inspect a store, list a model's sites, price a target before it runs.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="summarise and check a Zarr store: "
                                  "activations or per-head word maps")
    inspect.add_argument("path", type=Path, help="the store's folder, e.g. results/toy/color/"
                         "generation/shard-000/activations.zarr")
    sites = commands.add_parser("sites", help="list a model's sites without its weights")
    sites.add_argument("model", help="a model of config.yaml (sd15, sdxl, ...) or a family")
    sites.add_argument("--config", type=Path, default=Path("config.yaml"),
                       help="the config whose models section names the model")
    plan = commands.add_parser("plan", help="what a target costs before it runs: images, "
                               "denoiser rows, store size, GPU- and CPU-hours per stage")
    plan.add_argument("targets", nargs="+", help="workflow targets, as given to snakemake")
    plan.add_argument("--configfile", nargs="+", default=[],
                      help="config.yaml and overlays, as given to snakemake")
    plan.add_argument("--rates", type=Path, help="YAML of measured per-unit costs "
                      "(icm.costs.rates.DEFAULT_RATES' keys) to use instead of the defaults")
    args = parser.parse_args(argv)
    if args.command == "plan":
        return print_plan(args.targets, args.configfile, args.rates)
    if args.command == "sites":
        try:
            print(describe_sites(args.model, args.config))
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    if args.command == "inspect":
        try:
            attributes = store_attributes(args.path)
        except ValueError as problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        np.set_printoptions(precision=3)
        if attributes.get("kind") == "head-maps":
            from icm.head_maps.store import describe_head_store

            print(describe_head_store(args.path))
            return 0
        print(describe_store(args.path))
        problems = verify_store(args.path)
        if problems:
            print(f"check      {len(problems)} problem(s):")
            print("\n".join(f"  {line}" for line in problems))
            return 1
        print("check      OK: every shard present and decodable, every value finite, "
              "shapes as recorded")
    return 0


def store_attributes(path: Path) -> dict:
    """The attributes of the ICM store at ``path``, read without opening anything that
    could block (a FIFO named zarr.json) or raise a traceback; ValueError says why ``path``
    is not one."""
    meta = path / "zarr.json"
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    if not meta.is_file():  # is_file is False for a FIFO: never opened
        raise ValueError(f"{path} is not a Zarr v3 store (no regular file zarr.json)")
    try:
        node = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{meta} is broken: {error}") from error
    if not isinstance(node, dict) or node.get("zarr_format") != 3 \
            or node.get("node_type") != "group":
        raise ValueError(f"{meta} does not describe a Zarr v3 group")
    attributes = node.get("attributes") or {}
    if "sites" not in attributes:
        raise ValueError(f"{path} is a Zarr group but not an ICM activation store (its "
                         "attributes have no 'sites')")
    return attributes
