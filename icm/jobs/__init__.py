"""One function per workflow job, taking plain config mappings and paths.

The Snakemake adapters in ``workflow_scripts/`` only unpack ``snakemake.*`` and call these,
so every job can also be run (and tested) from Python without Snakemake.
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from collections.abc import Iterator
from pathlib import Path

from icm.jobs.calibration import calibrate_variant_job, tradeoff_job
from icm.jobs.evaluation import (
    collect_table_job,
    compute_metrics_job,
    plot_grid_job,
    render_reference_job,
)
from icm.jobs.generation import (
    build_model_job,
    concept_samples,
    generate_shard_job,
    merge_samples_job,
)
from icm.jobs.head_maps import (
    capture_head_maps_job,
    evaluate_head_maps_job,
    score_head_relevance_job,
)
from icm.jobs.head_plots import plot_head_maps_job
from icm.jobs.probing import fit_probes_job, label_images_job, merge_probes_job, rank_sites_job
from icm.jobs.steering import steer_shard_job
from icm.jobs.targets import target_table_job
from icm.jobs.toy import toy_quality_job, train_toy_features_job, train_toy_job

__all__ = [
    "build_model_job", "calibrate_variant_job", "capture_head_maps_job",
    "evaluate_head_maps_job", "plot_head_maps_job", "score_head_relevance_job", "collect_table_job", "compute_metrics_job", "concept_samples",
    "fit_probes_job", "generate_shard_job", "label_images_job", "logging_to",
    "merge_probes_job", "merge_samples_job", "plot_grid_job", "rank_sites_job", "render_reference_job",
    "steer_shard_job", "toy_quality_job", "train_toy_features_job", "train_toy_job",
    "target_table_job", "tradeoff_job", "use_threads",
]


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
