"""Helpers for the tests that run Snakemake for real in a temporary copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The library is copied too, and runs from the copy (PYTHONPATH), so that a test can edit it.
WORKFLOW_FILES = ["Snakefile", "config.yaml", "rules", "workflow_scripts", "schemas", "envs",
                  "resources", "docs/report", "icm", "profiles", "configs"]
TEST_CONFIG = ROOT / "tests" / "data" / "tiny-workflow.yaml"


def copy_workflow(tmp_path: Path) -> Path:
    """The files a workflow run needs, copied into ``tmp_path`` (results stay out of ROOT)."""
    for name in WORKFLOW_FILES:
        source, target = ROOT / name, tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    return tmp_path


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(workdir)}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "--configfile", str(TEST_CONFIG), *args],
        cwd=workdir, env=env, capture_output=True, text=True,
        timeout=3600,  # a hang guard: two end-to-end runs share 2 cores under xdist (one took
        # 17 min alone on a slower 2-core machine, over 40 min beside the other)
    )


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a Snakemake run or dry run: rule -> number of jobs ({} when
    there is nothing to be done)."""
    if "Job stats:" not in output and "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:")[1].split("\n\n")[0]
    rows = [line.split() for line in table.splitlines()]
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[1].isdigit()}
