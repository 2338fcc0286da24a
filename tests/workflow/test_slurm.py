"""The workflow on a real SLURM cluster: one node on this machine, jobs through sbatch.

Needs root (it starts munged, slurmctld and slurmd) and Debian's slurm-wlm and munge, which
`tests/slurm/cluster.sh install` (run by `.ci/run`) provides. Elsewhere the test is skipped,
except under CI=true, where a missing cluster is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from workflow_helpers import TEST_CONFIG, job_counts

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
STATE = "/tmp/icm-slurm"  # munged (user munge) must reach its socket: not under pytest's tmp

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster():
    missing = [d for d in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(d)]
    conf = Path("/etc/slurm/slurm.conf")
    foreign = conf.exists() and "Written by tests/slurm/cluster.sh" not in conf.read_text()
    if missing or os.geteuid() != 0 or foreign:
        reason = ("this machine already has a SLURM config" if foreign else
                  f"needs root and SLURM ({', '.join(missing) or 'not root'})")
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the SLURM test: {reason}; see tests/slurm/cluster.sh")
        pytest.skip(reason)
    env = {**os.environ, "ICM_SLURM_STATE": STATE}
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, check=False)  # an earlier run's
    shutil.rmtree(STATE, ignore_errors=True)
    subprocess.run(["bash", str(CLUSTER), "start"], env=env, check=True, capture_output=True)
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, check=False)


def test_toy_table_through_the_slurm_profile(cluster, workdir, tmp_path):
    """The tiny test configuration's toy run, every non-local job an sbatch job, GPU jobs
    asking for (placeholder) GPUs: every kind of job up to one variant's metrics
    (generation, labels, probes, ranking, calibration, steering, metrics); the rest of the
    table is local rules, run in tests/workflow/test_workflow.py."""
    # The repository's profile, fitted to this 2-core node and its test cluster (no accounts,
    # no accounting): fewer CPUs and less memory per job, nothing else changed.
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
    profile.update({"jobs": 4, "slurm-no-account": True, "slurm-status-command": "squeue",
                    "slurm-init-seconds-before-status-checks": 2})
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        resources.update({k: v for k, v in (("cpus_per_task", 1), ("mem_mb", 3000),
                                            ("runtime", 30)) if k in resources})
    (workdir / "profiles/test").mkdir(parents=True)
    (workdir / "profiles/test/config.yaml").write_text(yaml.safe_dump(profile))
    gpus = tmp_path / "gpus.yaml"  # make generation, steering and probes ask for a GPU
    gpus.write_text(  # ... and keep steering small: the jobs' kinds are tested, not sizes
        "models: {toy: {resources: {gpu: 1, mem_mb: 3000, runtime: 30}}}\n"
        "concepts: {color: {steering: {samples_per_prompt: 5}}}\n"
        "steering: {calibration: {alphas: [8], batches_per_class: 1, batch_size: 2,\n"
        "                          max_doublings: 0}}\n")
    env = {**cluster, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(workdir)}
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", "profiles/test",
         "--configfile", str(TEST_CONFIG), str(gpus), "--", "results/toy/color/metrics/icm.json"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=1500,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    metrics = json.loads((workdir / "results/toy/color/metrics/icm.json").read_text())
    assert metrics["n_images"] == 20 and np.isfinite(metrics["FD"])
    assert job_counts(out).get("calibrate_steering") == 1  # icm's alpha is calibrated

    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out)
    counts = job_counts(out)
    local = {"merge_samples", "rank_sites", "render_reference", "collect_table", "plot_grid",
             "plot_tradeoff", "tabulate_target"}
    remote = sum(n for rule, n in counts.items() if rule not in local | {"total"})
    assert len(submitted) == remote > 0
    # What SLURM recorded: the GPU jobs asked for one GPU, on the gpu partition.
    shown = [subprocess.run(["scontrol", "show", "job", slurm_id], capture_output=True,
                            text=True, env=cluster).stdout for _, slurm_id in submitted]
    by_rule = {}
    for record in shown:
        rule = re.search(r"slurm_logs/rule_(\w+?)/", record)
        by_rule.setdefault(rule.group(1) if rule else "?", []).append(record)
    for rule in ("generate_images", "steer_images", "fit_probes"):
        assert by_rule[rule], f"no SLURM record of {rule}"
        for record in by_rule[rule]:
            assert "Partition=gpu" in record and "TresPerJob=gres:gpu:1" in record, record
    # The oracle labeler needs no GPU: the job asks for none (toy: labeler_gpu is 0).
    assert by_rule["label_images"] and not any("gres:gpu" in r for r in by_rule["label_images"])
    # ... and, holding no GPU, it runs on the CPU partition (cluster.cpu_partition).
    assert all("Partition=cpu" in r for r in by_rule["label_images"])
