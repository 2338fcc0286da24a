"""SD1.5's whole probe stage, as the workflow runs it: every (site, step) of every pair.

Writes synthetic activation stores with SD1.5's 32 attention sites (their real module paths
and widths, read from the full-size UNet built on the meta device: 10 of width 320, 10 of
640, 12 of 1,280), ``--steps`` denoising steps and ``--samples`` samples over four prompts,
and a labels table of four classes (as FairFace's race concept has) with a weak planted
signal that grows over steps. Then it runs ``icm.jobs.probing.fit_probes_job`` for each of
the three class pairs (the first class against each other one), exactly as rule
``fit_probes`` does (reading the stores step by step, config.yaml's probe settings), and
times each pair (``--jobs``: several pair jobs at once, each in its own process, as
``snakemake --cores`` runs them). Goal (issue 14): on one GPU, 32 sites x 50 steps x 3
pairs at N = 2,000 in under 60 s. ``--check-sites`` refits a few sites of the first pair
with the scikit-learn reference and compares accuracies and directions with the stage's.

    python benchmarks/probe_stage.py --device cuda                      # the goal's shape
    python benchmarks/probe_stage.py --device cpu --samples 300 --steps 4   # a quick look
    python benchmarks/probe_stage.py --device cuda --jobs 1 3               # pairs side by side
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

CLASSES = ("a", "b", "c", "d")  # the first against each other: three pairs
PROMPTS = [f"a photo of a person, take {k}" for k in range(4)]


def sd15_sites() -> dict[str, int]:
    """SD1.5's attention sites in forward order, with their widths."""
    from icm.models.meta import site_table
    from icm.models.tiny import build_sd15_unet_on_meta

    return {row["site"]: row["width"] for row in site_table(build_sd15_unet_on_meta())
            if row["kind"] in ("attn1", "attn2")}


def write_stores(folder: Path, sites: dict[str, int], samples: int, steps: int, shards: int,
                 dtype: str, seed: int = 0,
                 chunk_samples: int = 128) -> tuple[list[Path], Path, float]:
    """``shards`` stores and a labels table; returns them and the seconds writing took.
    Class k shifts channels 8k..8k+7 by a strength growing over steps, larger at later
    sites, so probes read it more at some (site, step) than at others."""
    import pandas as pd

    from icm.generation.samples import plan_samples, shard_bounds
    from icm.hooks.capture import CapturedBatch
    from icm.io.activations import ActivationStoreWriter

    rng = np.random.default_rng(seed)
    plan = plan_samples(PROMPTS, -(-samples // len(PROMPTS)), base_seed=0)[:samples]
    labels = rng.choice(len(CLASSES), size=samples, p=[0.4, 0.2, 0.2, 0.2])
    growth = np.linspace(0.0, 0.5, steps, dtype=np.float32)
    timesteps = np.linspace(981, 1, steps)
    stores, start = [], time.perf_counter()
    for shard in range(shards):
        lo, hi = shard_bounds(samples, shards, shard)
        path = folder / f"shard-{shard:03d}" / "activations.zarr"
        path.parent.mkdir(parents=True)
        with ActivationStoreWriter(path, plan[lo:hi], {"num_train_timesteps": 1000,
                                                             "sites": list(sites)},
                                   dtype=dtype, chunk_samples=chunk_samples) as writer:
            for first in range(lo, hi, 128):
                rows = np.arange(first, min(first + 128, hi))
                acts = {}
                for k, (site, width) in enumerate(sites.items()):
                    x = rng.standard_normal((len(rows), steps, width), dtype=np.float32)
                    strength = growth * (0.5 + k / len(sites))
                    for c in range(len(CLASSES)):
                        mine = labels[rows] == c
                        x[mine, :, 8 * c:8 * c + 8] += strength[None, :, None]
                    acts[site] = x
                writer.write(CapturedBatch(acts, timesteps))
        stores.append(path)
    seconds = time.perf_counter() - start
    table = pd.DataFrame({"sample": [s.sample for s in plan],
                          "prompt_index": [s.prompt_index for s in plan],
                          "label": [CLASSES[c] for c in labels], "kept": True})
    table.to_csv(folder / "labels.csv", index=False)
    return stores, folder / "labels.csv", seconds


def probe_settings(device: str) -> dict:
    """config.yaml's probe settings over the schema's defaults, as rule fit_probes passes
    them (read with PyYAML alone, so a GPU machine without Snakemake runs this too)."""
    import yaml

    root = Path(__file__).parents[1]
    schema = yaml.safe_load((root / "schemas" / "config.schema.yaml").read_text())
    defaults = {k: v["default"] for k, v in
                schema["properties"]["probes"]["properties"].items()}
    config = yaml.safe_load((root / "config.yaml").read_text())["probes"]
    probes = {k: v for k, v in (defaults | config).items()
              if k not in ("steer_start", "start_level", "site_groups")}
    return {**probes, "device": device}


def check_with_sklearn(stores: list[Path], labels_csv: Path, out: Path, pair: tuple[str, str],
                       sites: list[str], probes: dict) -> dict:
    """The scikit-learn reference on ``sites``, against the stage's scores and directions."""
    import pandas as pd
    from safetensors.numpy import load_file

    from icm.io.activations import open_store, site_widths
    from icm.probing.probes import Pair
    from icm.probing.stored import fit_stored

    samples = np.concatenate([open_store(p)["sample"][:] for p in stores])
    table = pd.read_csv(labels_csv).set_index("sample").loc[samples]
    widths = {s: w for s, w in site_widths(stores[0]).items() if s in sites}
    rows = np.arange(len(samples))
    reference = fit_stored(stores, widths, rows, table["label"].to_numpy(), Pair(*pair),
                           {**probes, "backend": "sklearn"}, 64000,
                           groups=table["prompt_index"].to_numpy(),
                           control=probes["control"] == "prompt")
    scores = pd.read_csv(out / "scores.csv").set_index(["site", "step"])
    directions = load_file(out / "directions.safetensors")
    gaps, cosines = [], []
    for r in reference:
        gaps += list(np.abs(scores.loc[r.site, "test_acc"].to_numpy() - r.test_acc) * 100)
        mine, theirs = directions[r.site], r.directions
        cosines += list(np.sum(mine * theirs, 1) / np.linalg.norm(mine, axis=1)
                        / np.linalg.norm(theirs, axis=1))
    return {"sites": sites, "mean_gap_points": float(np.mean(gaps)),
            "max_gap_points": float(np.max(gaps)), "min_cosine": float(np.min(cosines))}


def run_pair(concept: dict, probes: dict, pair: tuple[str, str], labels_csv: Path,
             stores: list[Path], out: Path, memory_mb: float, threads: int) -> float:
    """One ``fit_probes`` job on ``threads`` threads, as the rule runs it; its seconds (CUDA
    synchronised)."""
    import torch

    from icm.jobs.probing import fit_probes_job

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    cuda = probes["device"].startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fit_probes_job(concept, probes, pair, labels_csv, stores, out / "scores.csv",
                   out / "directions.safetensors", out / "directions.json",
                   memory_mb=memory_mb)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_stage(concept: dict, probes: dict, pairs: list, labels_csv: Path, stores: list[Path],
              folder: Path, memory_mb: float, jobs: int, threads: int) -> dict:
    """Every pair's job into ``folder``, ``jobs`` at a time (each its own process beyond one,
    as Snakemake starts one per job), ``threads // jobs`` threads each, as ``snakemake
    --cores threads`` runs jobs of that many ``threads:``: the stage's wall time."""
    if not 1 <= jobs <= threads:
        raise SystemExit(f"--jobs {jobs}: between 1 and the {threads} threads (--threads)")
    per_job = threads // jobs  # each job's `threads:`
    work = {"-".join(pair): (concept, probes, tuple(pair), labels_csv, stores,
                             folder / "-".join(pair), memory_mb, per_job)
            for pair in pairs}
    start = time.perf_counter()
    if jobs == 1:
        times = {name: run_pair(*job) for name, job in work.items()}
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = {name: pool.submit(run_pair, *job) for name, job in work.items()}
            times = {name: future.result() for name, future in futures.items()}
    wall = time.perf_counter() - start
    print(f"{jobs} job(s) x {per_job} thread(s): {wall:.1f} s ("
          + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + ")", flush=True)
    return {"jobs": jobs, "threads_per_job": per_job, "stage_s": round(wall, 2),
            "pair_s": {k: round(v, 2) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--dtype", default="float32", help="store dtype")
    parser.add_argument("--chunk-samples", type=int, default=128,
                        help="samples per chunk (generation.chunk_samples; default config's)")
    parser.add_argument("--memory-mb", type=float, default=32000,
                        help="the job's mem_mb (half of it bounds one batched fit)")
    parser.add_argument("--check-sites", type=int, default=0,
                        help="refit this many sites of the first pair with scikit-learn")
    parser.add_argument("--folder", type=Path, help="where the stores go (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1],
                        help="pair jobs at once, each its own process, sharing --threads "
                             "(default: all cores) and the device, as snakemake --cores does; "
                             "several values: one run each, on the same stores (the first "
                             "into probes/, the others into probes-{N}-jobs/)")
    args = parser.parse_args()

    import torch

    from icm.probing.pairs import concept_pairs

    if args.threads:
        torch.set_num_threads(args.threads)
    sites = sd15_sites()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="probe-stage-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        stores, labels_csv, write_s = write_stores(folder, sites, args.samples, args.steps,
                                                   args.shards, args.dtype,
                                                   chunk_samples=args.chunk_samples)
        itemsize = np.dtype(args.dtype).itemsize
        data_gb = args.samples * args.steps * sum(sites.values()) * itemsize / 1e9
        print(f"stores: {len(sites)} sites x {args.steps} steps x {args.samples} samples, "
              f"{data_gb:.2f} GB, written in {write_s:.1f} s", flush=True)
        probes = probe_settings(args.device)
        concept = {"prompts": PROMPTS, "classes": list(CLASSES)}
        pairs = concept_pairs(concept)
        threads = args.threads or torch.get_num_threads()
        # The first run's probes go to probes/, each later run's to probes-{jobs}-jobs/.
        runs = [run_stage(concept, probes, pairs, labels_csv, stores,
                          folder / ("probes" if k == 0 else f"probes-{jobs}-jobs"),
                          args.memory_mb, jobs, threads) for k, jobs in enumerate(args.jobs)]
        result = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
            else f"cpu x{threads}",
            "sites": len(sites), "steps": args.steps, "samples": args.samples,
            "pairs": len(pairs), "probes": len(sites) * args.steps * len(pairs),
            "store_gb": round(data_gb, 2), "chunk_samples": args.chunk_samples,
            "write_s": round(write_s, 1), **runs[0], "runs": runs, "probe_settings": probes,
        }
        if args.check_sites:
            by_width = {}
            for site, width in sites.items():
                by_width.setdefault(width, site)  # one site of each width first
            chosen = (list(by_width.values()) + [s for s in sites if s not in by_width.values()])
            first = "-".join(pairs[0])
            result["sklearn_check"] = check_with_sklearn(
                stores, labels_csv, folder / "probes" / first, tuple(pairs[0]),
                chosen[:args.check_sites], probes)
        print(json.dumps(result, indent=2))
        print("| device | sites x steps x pairs | samples | store | jobs x threads | stage "
              "| per pair |")
        print("|---|---|---|---|---|---|---|")
        for run in runs:
            print(f"| {result['device']} | {len(sites)} x {args.steps} x {len(pairs)} | "
                  f"{args.samples} | {data_gb:.1f} GB | {run['jobs']} x "
                  f"{run['threads_per_job']} | {run['stage_s']:.1f} s | "
                  + ", ".join(f"{v:.1f} s" for v in run["pair_s"].values()) + " |")
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
