"""Every stage of one (model, concept) table against bare generation of the same images.

The workflow runs for real (Snakemake, in a scratch copy of the repository) from nothing to
``results/sd15-full/lit-side/table.csv`` on the full-size SD1.5 architecture with random
weights, built offline (cost does not depend on weight values; the pixel labeler and a
random-weight ViT-L-14 CLIP stand in for the trained ones at their real sizes). Each job's
time is read from Snakemake's own log; the cost plan (``icm.costs.plan``, the workflow's dry
run) says how many images each stage generates. Bare generation is the same pipeline,
loaded the same way, generating batches of the same samples with no hooks, timed in this
process after the run; a stage's bare time is its images times that per-image time.

    python benchmarks/table_overhead.py                          # CPU: 64 px, 4 steps
    python benchmarks/table_overhead.py --resolution 512 --steps 20 --device cuda  # on a GPU

Reported per stage: jobs, seconds of job time (summed; on 2 cores the jobs run one at a
time), images generated, the bare time of those images, and the whole table's ratio.
Two things the CPU ratio cannot forecast for a GPU node: per-image evaluation costs (CLIP at
224 px) stay fixed while generation shrinks with resolution and steps, and every job's
start-up (loading the 4.3 GB pipeline) is a larger share of a small run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: What a workflow run needs (as the workflow tests copy it).
WORKFLOW_FILES = ["Snakefile", "config.yaml", "rules", "workflow_scripts", "schemas", "envs",
                  "resources", "icm", "profiles", "configs"]
MODEL, CONCEPT = "sd15-full", "lit-side"
TARGET = f"results/{MODEL}/{CONCEPT}/table.csv"
#: The table's variants: one of each kind of work (a calibrated layer selection, a second
#: one, a LoRA); the other layer selections repeat the same stages' work.
VARIANTS = ["original", "icm", "random", "lora-top"]


def overlay(args: argparse.Namespace) -> dict:
    """The benchmark's config over config.yaml: the model at the benchmark's size, one shard,
    ``VARIANTS``, a two-alpha calibration in the batches every other stage uses, a fixed
    steering start (random weights read nothing, so the automatic start would stop)."""
    return {
        "models": {MODEL: {
            "family": "sd15", "source": f"resources/models/{MODEL}", "dtype": args.dtype,
            "steps": args.steps, "scheduler": "DDIMScheduler", "guidance_scale": 7.5,
            "resolution": args.resolution, "batch_size": args.batch, "n_shards": 1,
            "resources": {"gpu": int(args.device == "cuda"), "threads": 2, "mem_mb": 20000},
        }},
        "concepts": {CONCEPT: {
            "samples_per_prompt": args.samples_per_prompt,
            "specific_prompts": {"left": ["a photo of a person lit from the left"],
                                 "right": ["a photo of a person lit from the right"]},
            "specific_samples_per_prompt": args.samples_per_prompt,
            "steering": {"samples_per_prompt": args.steered_per_prompt,
                         "batch_size": args.batch, "variants": VARIANTS},
            "evaluation": {"clip": {"model": "ViT-L-14", "pretrained": None}},
        }},
        "probes": {"steer_start": 15},
        "steering": {"calibration": {"alphas": [2, 8], "batches_per_class": 1,
                                     "max_doublings": 0}},
        "finetuning": {"steps": args.train_steps, "batch_size": 2, "gradient_accumulation": 1,
                       "warmup_steps": 1},
    }


def bare_seconds_per_image(work: Path, config: dict, device: str, repeats: int) -> float:
    """Median seconds per image of plain generation (no hooks) of the localization samples,
    in batches of the model's size, after one untimed batch."""
    from icm.generation.samples import concept_samples
    from icm.generation.shard import SamplerSettings, batches, generate_images
    from icm.models.loading import ModelSpec, load_pipeline

    model = config["models"][MODEL]
    spec = ModelSpec.from_config(MODEL, {**model, "source": str(work / model["source"])})
    pipe = load_pipeline(spec, device)
    samples = concept_samples(config["concepts"][CONCEPT], model, config["generation"])
    chunks = list(batches(samples, int(model["batch_size"])))[: repeats + 1]
    settings, times = SamplerSettings.of(spec), []
    for i, chunk in enumerate(chunks):
        start = time.perf_counter()
        generate_images(pipe, chunk, settings)
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) / len(chunk))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--samples-per-prompt", type=int, default=16)
    parser.add_argument("--steered-per-prompt", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed bare batches")
    parser.add_argument("--workdir", type=Path, help="scratch copy (default: a temporary one)")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="table-overhead-"))
    for name in WORKFLOW_FILES:  # this checkout's code, over an earlier run's (kept: results)
        source, target = ROOT / name, work / name
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy(source, target)
    model_dir = work / f"resources/models/{MODEL}"
    if not model_dir.exists():
        from icm.models.tiny import build_sd15_pipeline, save_replica

        print(f"building the full-size SD1.5 architecture into {model_dir} ...", flush=True)
        save_replica(lambda seed: build_sd15_pipeline("full", seed=seed), model_dir)
    bench = work / "benchmark.yaml"
    bench.write_text(yaml.safe_dump(overlay(args), sort_keys=False))
    os.environ.update(PYTHONPATH=str(work), HF_HUB_OFFLINE="1")
    sys.path.insert(0, str(work))

    from icm.costs.plan import job_seconds, load_config, plan, planned_jobs, rule_stages

    config = load_config([bench.name], work)
    counts = plan(planned_jobs([TARGET], [bench.name], work), config, rule_stages(work))
    print(f"running {TARGET} in {work} ...", flush=True)
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--forceall",
                          TARGET, "--configfile", bench.name], cwd=work, capture_output=True,
                         text=True)  # --forceall: a rerun in the same scratch copy times all
    wall = time.perf_counter() - start
    (work / "benchmark.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        sys.exit(f"the workflow failed (log: {work / 'benchmark.log'}):\n"
                 f"{(run.stdout + run.stderr)[-3000:]}")
    bare = bare_seconds_per_image(work, config, args.device, args.repeats)

    stages, seconds, jobs = rule_stages(work), defaultdict(float), defaultdict(int)
    by_rule: dict[str, list[float]] = defaultdict(list)
    for rule, s in job_seconds(run.stdout + run.stderr):
        seconds[stages.get(rule, "other")] += s
        jobs[stages.get(rule, "other")] += 1
        by_rule[rule].append(s)
    print(f"\nfull-size SD1.5 architecture, {args.device} {args.dtype}, {args.resolution} px, "
          f"{args.steps} steps, batch {args.batch}; bare generation {bare:.3f} s per image\n")
    print("| stage | jobs | job time | images | bare generation | stage / its bare |")
    print("|---|---:|---:|---:|---:|---:|")
    for stage in [s for s in counts if s != "total"]:
        images = counts[stage]["images"]
        ratio = f"{seconds[stage] / (images * bare):.2f}" if images else "-"
        print(f"| {stage} | {jobs[stage]} | {seconds[stage]:.0f} s | {images} | "
              f"{images * bare:.0f} s | {ratio} |")
    images, total = counts["total"]["images"], sum(seconds.values())
    print(f"| **table** | {sum(jobs.values())} | {total:.0f} s | {images} | "
          f"{images * bare:.0f} s | **{total / (images * bare):.2f}** |")
    print(f"\nwall time {wall:.0f} s; LoRA training examples {counts['total']['train_examples']}")
    print("\n| rule | jobs | seconds each (median) | total |\n|---|---:|---:|---:|")
    for rule, times in sorted(by_rule.items(), key=lambda item: -sum(item[1])):
        print(f"| {rule} | {len(times)} | {statistics.median(times):.0f} s | "
              f"{sum(times):.0f} s |")


if __name__ == "__main__":
    main()
