"""Shared fixtures. Tests never reach a model hub: everything is built offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist runs two workflow tests at once on 2 cores, each job using the threads it is
# given: OpenMP threads that spin while waiting then starve each other (measured here: a
# 2-thread torch loop took 8.5 s alone, 60 s beside a second one, 15 s with this). Every
# subprocess, Snakemake jobs and SLURM jobs included, inherits it; it must be set before
# torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipe():
    """A random-weight SD1.5-architecture pipeline (tiny), shared read-only by tests, with
    the scheduler `models.sd15` runs (DDIM from SD1.5's own scheduler config; the replica
    ships PNDM as the checkpoint does, and tests/hooks/test_clock.py covers the others)."""
    from icm.models.tiny import build_sd15_pipeline

    # ICM_TEST_DEVICE=cuda runs the pipeline-level tests on a GPU (see docs/development.md).
    pipe = build_sd15_pipeline("tiny", seed=0, device=os.environ.get("ICM_TEST_DEVICE", "cpu"),
                               scheduler="DDIMScheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_settings():
    from icm.generation.shard import SamplerSettings

    return SamplerSettings(steps=4, guidance_scale=7.5, resolution=32)


@pytest.fixture()
def workdir(tmp_path):
    """A temporary copy of the workflow to run Snakemake in."""
    from workflow_helpers import copy_workflow

    return copy_workflow(tmp_path)


def pytest_collection_modifyitems(config, items):
    """The end-to-end runs first (they take minutes each; `slow`), so that under `-n 2
    --dist worksteal` they start at once and the short tests fill the gaps, rather than
    one of them starting last and setting the suite's length."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
