"""Probe fitting: batched torch fast path vs the scikit-learn reference, on the same data.

Reports the speed ratio measured in one run and how far the test accuracies differ (goal:
at least 10x faster, within 1 point on average).

    python benchmarks/probe_speed.py                                  # synthetic, SD1.5-like widths
    python benchmarks/probe_speed.py --stores results/toy/color/generation/shard-*/activations.zarr \
        --labels results/toy/color/labels.csv --pair red green        # real toy activations
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from icm.probes import Pair, fit_pair


def synthetic(samples: int, steps: int, widths: list[int], seed: int = 0):
    """Activations with a weak planted signal that grows over steps, as probes see it."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(samples) < 0.4, "positive", "negative")
    sign = np.where(labels == "positive", 1.0, -1.0)
    acts = {}
    for k, width in enumerate(widths):
        x = rng.standard_normal((samples, steps, width)).astype(np.float32)
        strength = np.linspace(0.0, 0.6, steps) * (k + 1) / len(widths)
        x[:, :, :8] += sign[:, None, None] * strength[None, :, None]
        acts[f"site{k}.w{width}"] = x
    return acts, labels, Pair("negative", "positive")


def from_stores(stores: list[str], labels_csv: str, pair: list[str]):
    from icm.store import read_sites

    samples, acts, _ = read_sites(stores)
    table = pd.read_csv(labels_csv, keep_default_na=False).set_index("sample")
    labels = table.loc[samples, "label"].to_numpy()
    return acts, labels, Pair(pair[0], pair[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--widths", type=int, nargs="+", default=[320, 640, 1280, 1280])
    parser.add_argument("--stores", nargs="+")
    parser.add_argument("--labels")
    parser.add_argument("--pair", nargs=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.stores:
        acts, labels, pair = from_stores(args.stores, args.labels, args.pair)
        data = f"stores ({len(args.stores)} shards)"
    else:
        acts, labels, pair = synthetic(args.samples, args.steps, args.widths)
        data = f"synthetic {args.samples} samples x {args.steps} steps, widths {args.widths}"

    timings, results = {}, {}
    for backend in ("sklearn", "torch"):
        start = time.perf_counter()
        results[backend] = {r.site: r for r in fit_pair(acts, labels, pair, backend=backend,
                                                        device=args.device)}
        if args.device == "cuda":
            torch.cuda.synchronize()
        timings[backend] = time.perf_counter() - start
    gaps = [np.abs(results["torch"][s].test_acc - results["sklearn"][s].test_acc) for s in acts]
    cosines = [np.sum(results["torch"][s].directions * results["sklearn"][s].directions, axis=1)
               for s in acts]
    report = {
        "data": data,
        "probes": int(sum(np.shape(a)[1] for a in acts.values())),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{args.threads}",
        "sklearn_s": timings["sklearn"],
        "torch_s": timings["torch"],
        "speedup": timings["sklearn"] / timings["torch"],
        "mean_abs_test_acc_gap_points": 100 * float(np.mean(np.concatenate(gaps))),
        "min_direction_cosine": float(np.min(np.concatenate(cosines))),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
