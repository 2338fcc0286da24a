"""Per-unit costs that turn a plan's work (``icm.costs.plan``) into hours, and its report.

Defaults are the reference machines' measurements (``benchmarks/README.md``); a user's own,
from a short run on their machine, replace them (``python -m icm plan --rates FILE``, a YAML
mapping of these keys). A model without a measured rate gets no GPU-hours: the report says
so instead of guessing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

#: Seconds per denoiser row (one image at one step, one guidance half), by model name; the
#: reference: SD1.5 in float16 at 512 px on one H100, 20 steps x batch 8 x 2 rows in
#: 1.276 s (benchmarks/README.md, capture on); the toy on 2 CPU cores, 0.12 s per image of
#: 20 steps x 2 rows (localization generation of `make demo`).
DEFAULT_RATES: dict[str, Any] = {
    "denoiser_row_s": {"sd15": 1.276 / (20 * 8 * 2), "toy": 0.12 / (20 * 2)},
    # A LoRA training example: a forward and a backward pass, about three rows' work.
    "train_example_rows": 3.0,
    # dlib's CNN face detector and landmarks at FairFace's settings, 512 px, one CPU core;
    # its HOG detector with the same landmarks (`detector: dlib-hog`; benchmarks/README.md).
    "face_image_cpu_s": 26.0,
    "hog_face_image_cpu_s": 0.21,
}


def rates_with(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The default rates updated by a user's (``denoiser_row_s`` merged per model)."""
    rates = {**DEFAULT_RATES, "denoiser_row_s": dict(DEFAULT_RATES["denoiser_row_s"])}
    for key, value in (overrides or {}).items():
        if key not in DEFAULT_RATES:
            raise KeyError(f"unknown rate {key!r}; known: {sorted(DEFAULT_RATES)}")
        if key == "denoiser_row_s":
            rates[key].update(value)
        else:
            rates[key] = value
    return rates


def hours(row: Mapping[str, int], models: set[str], rates: Mapping[str, Any]) -> dict:
    """GPU-hours (None where a model of the plan has no rate) and CPU-hours of one row."""
    per_row = [rates["denoiser_row_s"].get(m) for m in models]
    gpu = None
    if per_row and all(r is not None for r in per_row):
        rate = max(per_row)  # one model per target in practice; the slower if several
        rows = row["denoiser_rows"] + row["train_examples"] * rates["train_example_rows"]
        gpu = rows * rate / 3600
    return {"gpu_hours": gpu, "cpu_hours": face_seconds(row, rates) / 3600}


def face_seconds(row: Mapping[str, int], rates: Mapping[str, Any]) -> float:
    """CPU seconds of a row's face crops, by dlib finder."""
    return row.get("face_images", 0) * rates["face_image_cpu_s"] + \
        row.get("hog_face_images", 0) * rates["hog_face_image_cpu_s"]


def report(table: Mapping[str, Mapping[str, int]], models: set[str],
           rates: Mapping[str, Any]) -> str:
    """The plan as a Markdown table, one row per stage and the total."""
    lines = ["| stage | jobs | images | denoiser rows | LoRA examples | store GB | GPU-h | "
             "CPU-h (faces) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for stage, row in table.items():
        cost = hours(row, models, rates)
        gpu = "?" if cost["gpu_hours"] is None else f"{cost['gpu_hours']:.2f}"
        lines.append(f"| {stage} | {row['jobs']} | {row['images']:,} | "
                     f"{row['denoiser_rows']:,} | {row['train_examples']:,} | "
                     f"{row['store_bytes'] / 1e9:.2f} | {gpu} | {cost['cpu_hours']:.1f} |")
    missing = sorted(m for m in models if rates["denoiser_row_s"].get(m) is None)
    if missing:
        lines.append(f"\nNo measured rate for {', '.join(missing)}: GPU-hours unknown (give "
                     "`denoiser_row_s` with --rates).")
    return "\n".join(lines)


#: Minutes a job spends starting: loading the model, its libraries, the first batch.
STARTUP_MINUTES = 10


def job_minutes(row: Mapping[str, int], model: str, threads: int, rates: Mapping[str, Any],
                margin: float) -> int | None:
    """A job's time limit from its planned work (``icm.costs.plan.Work.of``): the denoiser's
    time at the model's rate and the CPU face crops spread over the job's threads, times
    ``margin``, plus ``STARTUP_MINUTES``; None where the job denoises with a model that has
    no measured rate (the caller keeps its configured limit)."""
    rate = rates["denoiser_row_s"].get(model)
    rows = row.get("denoiser_rows", 0) + row.get("train_examples", 0) * rates[
        "train_example_rows"]
    if rows and rate is None:
        return None
    seconds = rows * (rate or 0.0) + face_seconds(row, rates) / max(1, threads)
    return int(np.ceil(margin * seconds / 60)) + STARTUP_MINUTES
