"""The cost plan counts the jobs the workflow plans and the work each one does."""

from __future__ import annotations

import re
from pathlib import Path

from workflow_helpers import snakemake

from icm.costs.plan import (
    Work,
    load_config,
    parse_dry_run,
    plan,
    planned_jobs,
    rule_stages,
)
from icm.costs.rates import DEFAULT_RATES, hours, job_minutes, rates_with, report

ROOT = Path(__file__).resolve().parents[2]

DRY_RUN = """
rule generate_images:
    input: resources/models/toy
    wildcards: model=toy, concept=color, shard=000
    resources: tmpdir=/tmp
localrule rank_sites:
    wildcards: model=toy, concept=color
rule all:
    input: results/toy/color/table.csv
"""


def test_a_dry_runs_jobs_are_read_with_their_wildcards():
    jobs = parse_dry_run(DRY_RUN)
    assert [j.rule for j in jobs] == ["generate_images", "rank_sites", "all"]
    assert jobs[0].wildcards == {"model": "toy", "concept": "color", "shard": "000"}
    assert jobs[2].wildcards == {}
    assert jobs[0].resources == {"tmpdir": "/tmp"} and jobs[1].resources == {}


def test_the_sd15_gender_plan_holds_the_dry_runs_jobs_and_the_protocols_image_counts(workdir):
    """Counted by hand from config.yaml: 102 prompts x 5 localization images, 2 specific
    prompts x 250; 10 steered or original variants and 4 LoRA variants x 4 evaluation prompts
    x 500; 7 calibrated variants x 9 alphas (the grid's 6, 3 doublings) and alpha 0 once, x 4
    prompts x 96 (3 batches of 16 per class, 2 classes)."""
    target = "results/sd15/gender/table.csv"
    dry = snakemake(workdir, "-n", "-F", target, "--configfile", "config.yaml")
    total = int(re.search(r"^total\s+(\d+)$", dry.stdout, flags=re.MULTILINE).group(1))
    jobs = planned_jobs([target], ["config.yaml"], workdir)
    assert len(jobs) == total == 102
    table = plan(jobs, load_config(["config.yaml"], workdir), rule_stages(workdir))
    assert table["generation"]["images"] == 102 * 5 + 2 * 250
    assert table["steering"]["images"] == 10 * 4 * 500
    assert table["finetuning"]["images"] == 4 * 4 * 500
    assert table["calibration"]["images"] == (7 * 9 + 1) * 4 * 96
    assert table["finetuning"]["train_examples"] == 4 * 2000 * 2 * 4
    # SD1.5 under guidance: two denoiser rows per image and step, 50 steps.
    assert table["total"]["denoiser_rows"] == table["total"]["images"] * 50 * 2
    # FairFace's dlib crops: every evaluated and every calibration image.
    assert table["total"]["face_images"] == 14 * 2000 + (7 * 9 + 1) * 4 * 96
    # The localization stores: samples x 50 steps x every site's width, float32.
    # attn1 and attn2 of 2 blocks at 320, 640, 1280 down, 1 in the middle, 3 at 1280, 640,
    # 320 up; and the bottleneck's 1,280.
    widths = 2 * (2 * (320 + 640 + 1280) + 1280 + 3 * (1280 + 640 + 320)) + 1280
    assert table["generation"]["store_bytes"] == (102 * 5 + 2 * 250) * 50 * widths * 4
    assert table["total"]["jobs"] == total


def test_hours_follow_the_rates_and_say_where_a_model_has_none():
    row = {"jobs": 1, "images": 100, "denoiser_rows": 10_000, "train_examples": 0,
           "face_images": 360, "store_bytes": 0}
    cost = hours(row, {"sd15"}, DEFAULT_RATES)
    assert abs(cost["gpu_hours"] - 10_000 * DEFAULT_RATES["denoiser_row_s"]["sd15"] / 3600) < 1e-9
    assert cost["cpu_hours"] == 360 * 26.0 / 3600
    assert hours(row, {"flux"}, DEFAULT_RATES)["gpu_hours"] is None
    assert "No measured rate for flux" in report({"total": row}, {"flux"}, DEFAULT_RATES)
    mine = rates_with({"denoiser_row_s": {"flux": 0.05}, "face_image_cpu_s": 1.0})
    assert hours(row, {"flux"}, mine)["gpu_hours"] == 10_000 * 0.05 / 3600
    assert mine["denoiser_row_s"]["sd15"] == DEFAULT_RATES["denoiser_row_s"]["sd15"]


def test_every_jobs_time_limit_covers_its_planned_work(workdir):
    """SLURM time limits follow the work (rules/common.smk, planned_runtime): no job of the
    SD1.5 gender table is planned with a limit under its own estimate at the reference
    rates, and the calibration and metrics jobs, whose CPU face crops outlast the model's
    240 minutes, get more than that."""
    target = "results/sd15/gender/table.csv"
    dry = snakemake(workdir, "-n", "-F", target, "--configfile", "config.yaml")
    limited = [j for j in parse_dry_run(dry.stdout) if "runtime" in j.resources]
    config = load_config(["config.yaml"], workdir)
    work = Work(config)
    threads = config["models"]["sd15"]["resources"]["threads"]
    estimated = 0
    for job in limited:
        if not job.wildcards:
            continue
        limit = int(job.resources["runtime"])
        row = work.of(job)
        need = job_minutes(row, "sd15", threads, DEFAULT_RATES, margin=1.0)
        if need is not None and row.get("images", 0) + row.get("face_images", 0):
            estimated += 1
            assert limit >= need, (job, limit, need)
    assert estimated >= 80

    def least(rule: str) -> int:
        return min(int(j.resources["runtime"]) for j in limited if j.rule == rule)

    assert least("calibrate_steering") > 240
    # 2,000 images x 26 s of face crops over 8 threads, twice: 227 minutes, under 240.
    assert least("compute_metrics") >= 227


def test_a_job_without_a_measured_rate_keeps_its_configured_limit():
    row = {"denoiser_rows": 1000, "train_examples": 0, "face_images": 0}
    assert job_minutes(row, "sdxl", 8, DEFAULT_RATES, 2.0) is None
    assert job_minutes({"face_images": 480}, "sdxl", 8, DEFAULT_RATES, 2.0) == 52 + 10


def test_time_limits_need_neither_torch_nor_a_built_models_folder():
    """The Snakefile counts each job's work for its time limit (rules/common.smk): without
    stores the count reads only the config, so it imports no torch and needs no model built
    yet (tiny-flux is built by the workflow itself)."""
    import subprocess
    import sys

    code = (
        "import sys; from icm.costs.plan import Job, Work, load_config\n"
        f"config = load_config(['tests/data/tiny-workflow.yaml'], {str(ROOT)!r})\n"
        "work = Work(config, stores=False)\n"
        "row = work.of(Job('generate_images', {'model': 'tiny-flux', 'concept': 'lit-side',"
        " 'shard': '000'}))\n"
        "assert row['images'] > 0 and row['store_bytes'] == 0, row\n"
        "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_job_seconds_reads_each_job_from_start_to_finish_in_a_run_log():
    """Jobs that overlap finish in another order than they started: each is matched by its
    jobid (the log format of Snakemake 9's own run log)."""
    from icm.costs.plan import job_seconds

    log = """Select jobs to execute...
Execute 2 jobs...
[Mon Dec  7 20:24:29 2026]
localrule generate_images:
    output: results/x/generation/shard-000/images
    jobid: 8
    wildcards: model=x, concept=y, shard=000
[Mon Dec  7 20:24:30 2026]
rule fit_probes:
    input: results/x/labels.csv
    jobid: 3
[Mon Dec  7 20:25:00 2026]
Finished jobid: 3 (Rule: fit_probes)
1 of 2 steps (50%) done
[Mon Dec  7 20:26:11 2026]
Finished jobid: 8 (Rule: generate_images)
2 of 2 steps (100%) done
"""
    assert job_seconds(log) == [("fit_probes", 30.0), ("generate_images", 102.0)]
