"""One function per workflow job, taking plain config mappings and paths.

The Snakemake adapters in ``workflow_scripts/`` only unpack ``snakemake.*`` and call these,
so every job can also be run (and tested) from Python without Snakemake.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import logging
import os
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

# Job function -> the module defining it. A job imports only its own module (``__getattr__``
# below): a table or plot job need not load diffusers, which costs ~10 s a job on 2 cores.
# icm.io.fingerprints reads this mapping to find the code a job runs.
JOBS: dict[str, str] = {
    "build_model_job": "icm.jobs.models",
    "calibrate_unsteered_job": "icm.jobs.calibration",
    "calibrate_variant_job": "icm.jobs.calibration",
    "capture_head_maps_job": "icm.jobs.head_maps",
    "count_head_votes_job": "icm.jobs.head_maps",
    "collect_table_job": "icm.jobs.evaluation",
    "compute_metrics_job": "icm.jobs.evaluation",
    "concept_samples": "icm.jobs.generation",
    "evaluate_head_maps_job": "icm.jobs.head_maps",
    "explicit_vs_implicit_job": "icm.jobs.probing",
    "finetune_lora_job": "icm.jobs.finetuning",
    "fit_probes_job": "icm.jobs.probing",
    "inject_prompts_job": "icm.jobs.injection",
    "generate_finetuned_job": "icm.jobs.finetuning",
    "generate_shard_job": "icm.jobs.generation",
    "label_images_job": "icm.jobs.labeling",
    "merge_probes_job": "icm.jobs.probing",
    "merge_samples_job": "icm.jobs.generation",
    "plot_grid_job": "icm.jobs.evaluation",
    "plot_head_maps_job": "icm.jobs.head_maps",
    "rank_injection_job": "icm.jobs.injection",
    "rank_sites_job": "icm.jobs.probing",
    "render_reference_job": "icm.jobs.evaluation",
    "fid_statistics_job": "icm.jobs.evaluation",
    "score_head_relevance_job": "icm.jobs.head_maps",
    "steer_shard_job": "icm.jobs.steering",
    "target_table_job": "icm.jobs.evaluation",
    "toy_quality_job": "icm.jobs.toy",
    "tradeoff_job": "icm.jobs.calibration",
    "train_toy_features_job": "icm.jobs.toy",
    "train_toy_job": "icm.jobs.toy",
}

__all__ = [*JOBS, "end_job_process", "logging_to", "use_threads"]


def __getattr__(name: str) -> Any:
    """Import a job function's module on first use (PEP 562)."""
    if name in JOBS:
        return getattr(importlib.import_module(JOBS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def use_threads(threads: int) -> None:
    """Let torch use the CPU threads Snakemake gave the job (its ``threads:``, which the
    SLURM profile turns into --cpus-per-task), no more and no fewer."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


@contextlib.contextmanager
def logging_to(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Send logging, warnings, progress bars and any traceback of the job to its log file."""
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as handle, contextlib.redirect_stderr(handle):
        logging.basicConfig(stream=handle, level=logging.INFO, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.captureWarnings(True)
        try:
            yield
        except BaseException:
            traceback.print_exc(file=handle)
            raise


def end_job_process() -> NoReturn:
    """End a workflow job's process now that its job returned, skipping the interpreter's
    teardown.

    Tearing down torch, diffusers and transformers' modules takes 1-2 s a process on 2 cores
    (importing the steering job's modules and exiting: 8.5 s, 6.8 s without the teardown),
    paid once per job (the test configuration's toy table: 303 s, 253 s with this). What an
    exit does before the teardown still happens, in the interpreter's order: threads still
    running are joined and executors shut down, then the exit handlers run (finalizers such
    as icm.labeling.faces' pool, logging); then Python's and C's stdio are flushed and the process
    ends with status 0. For ``workflow_scripts/`` only, as their last line: a job that
    raised never gets here, and exits with Python's usual traceback and status.
    """
    threading._shutdown()  # CPython's exit, step one: join non-daemon threads, executors
    atexit._run_exitfuncs()  # step two: the exit handlers
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).fflush(None)  # C libraries' buffered stdout, which exit() would flush
    os._exit(0)
