"""What a run costs before it starts: the work of every job the workflow plans for a target.

The jobs are the workflow's own: ``snakemake --dry-run --forceall`` lists each job with its
rule and wildcards, so the plan holds exactly the jobs a fresh run would (what already exists
is counted too: the plan is of the whole target). Each job's work is counted from the same
config and the same library functions the job itself uses (``concept_samples``,
``shard_samples``, ``calibration_samples_per_prompt``), in units a machine's speed turns into
time (``icm.costs.rates``): images generated, denoiser rows (an image is ``steps`` steps,
two rows each under classifier-free guidance), LoRA training examples, images labelled on
the CPU by FairFace's face finder, and bytes of activation store.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from icm.generation.samples import concept_samples, shard_samples

#: Work counted per job, summed per stage.
UNITS = ("jobs", "images", "denoiser_rows", "train_examples", "face_images", "hog_face_images",
         "store_bytes")


@dataclass
class Job:
    """One planned job: its rule, wildcards and resources, as the dry run names them."""

    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    resources: dict[str, str] = field(default_factory=dict)


def planned_jobs(targets: Sequence[str], configfiles: Sequence[str] = (),
                 workdir: str | Path = ".") -> list[Job]:
    """The jobs of a fresh run of ``targets``: Snakemake's own dry run (``--forceall``)."""
    command = [sys.executable, "-m", "snakemake", "--dry-run", "--forceall", *targets]
    if configfiles:
        command += ["--configfile", *configfiles]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError("the workflow could not plan "
                           f"{' '.join(targets)}:\n{(result.stdout + result.stderr)[-3000:]}")
    return parse_dry_run(result.stdout + result.stderr)


def parse_dry_run(text: str) -> list[Job]:
    """Jobs from a dry run's job blocks (``rule NAME:`` / ``localrule NAME:``, then indented
    ``wildcards:`` and ``resources:`` lines where the job has them)."""
    jobs: list[Job] = []
    for line in text.splitlines():
        head = re.match(r"^(?:local)?rule (\w+):$", line)
        if head:
            jobs.append(Job(head.group(1)))
        elif jobs and line.startswith(("    wildcards: ", "    resources: ")):
            key, value = line.strip().split(": ", 1)
            setattr(jobs[-1], key, dict(p.split("=", 1) for p in value.split(", ")))
    return jobs


def job_seconds(log: str) -> list[tuple[str, float]]:
    """(rule, seconds) of each finished job of a Snakemake run's log, from the ``[date]``
    lines it prints before a job's ``rule NAME:`` block and before its ``Finished jobid: N``
    line (to the second): what each job took, for ``benchmarks/table_overhead.py``."""
    started: dict[str, tuple[str, datetime]] = {}
    done: list[tuple[str, float]] = []
    stamp, rule = None, None
    for line in log.splitlines():
        if re.fullmatch(r"\[\w{3} \w{3} +\d+ [\d:]{8} \d{4}\]", line.strip()):
            stamp = datetime.strptime(" ".join(line.strip("[] \n").split()),
                                      "%a %b %d %H:%M:%S %Y")
        elif (head := re.match(r"^(?:local)?rule (\w+):$", line)) and stamp:
            rule = (head.group(1), stamp)
        elif (jobid := re.match(r"^\s+jobid: (\d+)$", line)) and rule:
            started[jobid.group(1)], rule = rule, None
        elif (end := re.match(r"^Finished jobid: (\d+)", line)) and stamp:
            name, start = started.pop(end.group(1))
            done.append((name, (stamp - start).total_seconds()))
    return done


def load_config(configfiles: Sequence[str | Path], workdir: str | Path = ".") -> dict[str, Any]:
    """``config.yaml`` updated by each overlay in order (nested keys merged, as Snakemake's
    ``--configfile`` does), validated with the schema's defaults filled in."""
    from snakemake.utils import update_config, validate

    root = Path(workdir)
    config: dict[str, Any] = yaml.safe_load((root / "config.yaml").read_text())
    for path in configfiles:
        if Path(path).resolve() != (root / "config.yaml").resolve():
            update_config(config, yaml.safe_load((root / path).read_text()) or {})
    validate(config, str(root / "schemas/config.schema.yaml"))
    return config


def rule_stages(workdir: str | Path = ".") -> dict[str, str]:
    """Rule -> its stage, the name of the rule file that defines it (``generation``, ...),
    in the Snakefile's order of includes, which is the pipeline's."""
    root = Path(workdir)
    includes = re.findall(r'^include: "rules/(\w+)\.smk"', (root / "Snakefile").read_text(),
                          flags=re.MULTILINE)
    stages = {}
    for stem in includes:
        text = (root / "rules" / f"{stem}.smk").read_text()
        for name in re.findall(r"^\s*(?:use rule \w+ as|rule) (\w+)", text,
                               flags=re.MULTILINE):
            stages[name] = stem
    return stages


class Work:
    """Counts the work of jobs under one config; ``of(job)`` -> units (``UNITS``)."""

    def __init__(self, config: Mapping[str, Any], stores: bool = True) -> None:
        """``stores``: count activation-store bytes, which needs each model's sites (its
        denoiser on the meta device: torch, and a built model's folder); time limits need
        none of it, and the Snakefile must not import torch."""
        self.config, self.stores = config, stores
        self._sites: dict[str, list[dict[str, Any]]] = {}
        self._evaluation: dict[tuple[str, str], list] = {}

    def model(self, name: str) -> dict[str, Any]:
        return dict(self.config["models"][name])

    def concept(self, name: str) -> dict[str, Any]:
        return dict(self.config["concepts"][name])

    def sites(self, model: str) -> list[dict[str, Any]]:
        """The model's sites with kind and width, from its config on the meta device."""
        if model not in self._sites:
            from icm.models.meta import denoiser_config, denoiser_on_meta, site_table

            _, denoiser, _ = denoiser_config(model, self.model(model))
            self._sites[model] = site_table(denoiser_on_meta(denoiser))
        return self._sites[model]

    def rows_per_call(self, model: str) -> int:
        """Denoiser rows per image and step: 2 under classifier-free guidance (``[uncond,
        cond]``), 1 where guidance is embedded (FLUX.1-dev) or off."""
        from icm.models.families import family_named

        spec = self.model(model)
        batched = family_named(spec["family"]).guidance == "batched"
        return 2 if batched and float(spec.get("guidance_scale", 1.0)) > 1.0 else 1

    def images(self, model: str, n: int) -> dict[str, int]:
        spec = self.model(model)
        return {"images": n, "denoiser_rows": n * int(spec["steps"]) * self.rows_per_call(model)}

    def shard(self, model: str, samples: list, shard: str, batch_size: int | None = None
              ) -> list:
        """The shard's samples, cut by whole batches as the job cuts them (``batch_size``:
        the job's, by default the model's)."""
        m = self.model(model)
        return shard_samples(samples, int(m["n_shards"]), int(shard),
                             int(batch_size or m["batch_size"]))

    def evaluation_samples(self, model: str, concept: str) -> list:
        """The evaluation stream's samples: the steering samples of the evaluation prompts
        (computed once per (model, concept): the workflow asks for every job's)."""
        key = (model, concept)
        if key not in self._evaluation:
            self._evaluation[key] = self._evaluation_samples(model, concept)
        return self._evaluation[key]

    def _evaluation_samples(self, model: str, concept: str) -> list:
        c = self.concept(concept)
        prompts = (c.get("evaluation") or {}).get("prompts") or c["prompts"]
        return concept_samples(c, self.model(model), self.config["generation"],
                               c["steering"]["samples_per_prompt"], stream="evaluation",
                               prompts=prompts)

    def of(self, job: Job) -> dict[str, int]:
        """The job's work; rules that only read tables and draw plots count as a job alone."""
        w = job.wildcards
        counter = getattr(self, f"_{job.rule}", None)
        work = counter(w) if counter else {}
        return {"jobs": 1, **work}

    # One method per rule that does measurable work, named after the rule.

    def _generate_images(self, w: Mapping[str, str]) -> dict[str, int]:
        c, m = self.concept(w["concept"]), self.model(w["model"])
        samples = self.shard(w["model"], concept_samples(c, m, self.config["generation"]),
                             w["shard"])
        return {**self.images(w["model"], len(samples)),
                "store_bytes": self.store_bytes(w["model"], len(samples))}

    def _generate_specific_images(self, w: Mapping[str, str]) -> dict[str, int]:
        c, m = self.concept(w["concept"]), self.model(w["model"])
        samples = self.shard(w["model"], concept_samples(c, m, self.config["generation"],
                                                         prompt_set="specific"), w["shard"])
        return {**self.images(w["model"], len(samples)),
                "store_bytes": self.store_bytes(w["model"], len(samples))}

    def _steer_images(self, w: Mapping[str, str]) -> dict[str, int]:
        batch = self.concept(w["concept"])["steering"].get("batch_size")
        samples = self.shard(w["model"], self.evaluation_samples(w["model"], w["concept"]),
                             w["shard"], batch)
        return self.images(w["model"], len(samples))

    _generate_finetuned_images = _steer_images

    def _capture_head_maps(self, w: Mapping[str, str], split: str = "held-out"
                           ) -> dict[str, int]:
        """A head-map study's shard of one split (its map store is not counted)."""
        from icm.head_maps.study import split_samples

        samples = split_samples(self.concept(w["concept"])["head_maps"], split,
                                self.config["generation"]["base_seed"])
        return self.images(w["model"], len(self.shard(w["model"], samples, w["shard"])))

    def _capture_train_head_maps(self, w: Mapping[str, str]) -> dict[str, int]:
        return self._capture_head_maps(w, "train")

    def _count_head_votes(self, w: Mapping[str, str]) -> dict[str, int]:
        """A shard of HRV's generic prompts' images (``hrv_prompts``), generated to vote."""
        from icm.head_maps.study import hrv_samples

        samples = hrv_samples(self.concept(w["concept"])["head_maps"],
                              self.config["generation"]["base_seed"])
        return self.images(w["model"], len(self.shard(w["model"], samples, w["shard"])))

    def _calibrate_steering(self, w: Mapping[str, str]) -> dict[str, int]:
        """Every alpha of the grid and the doublings past its top alpha (``max_doublings``):
        an upper bound, as a sweep stops doubling once CLIP-I falls. Alpha 0 is the
        concept's ``calibrate_unsteered`` job's."""
        calibration = self.config["steering"]["calibration"]
        alphas = len(calibration["alphas"]) + int(calibration["max_doublings"])
        return self.calibration_images(w, alphas)

    def _calibrate_unsteered(self, w: Mapping[str, str]) -> dict[str, int]:
        """Every sweep's alpha 0, once per concept: one alpha's images."""
        return self.calibration_images(w, 1)

    def calibration_images(self, w: Mapping[str, str], alphas: int) -> dict[str, int]:
        """``alphas`` sweeps' worth of the concept's calibration images, each one alpha's:
        ``calibration_batching``'s images per prompt over the evaluation prompts."""
        from icm.steering.calibration import calibration_batching

        c = self.concept(w["concept"])
        _, _, per_prompt = calibration_batching(self.config["steering"]["calibration"],
                                                c["steering"], c["classes"],
                                                self.model(w["model"]))
        prompts = (c.get("evaluation") or {}).get("prompts") or c["prompts"]
        n = alphas * per_prompt * len(prompts)
        return {**self.images(w["model"], n), **self.faces(w["concept"], n)}

    def _inject_prompts(self, w: Mapping[str, str]) -> dict[str, int]:
        """Each sample as it is and once per (cross-attention site, class) injected."""
        c = self.concept(w["concept"])
        injection = c["injection"]
        prompts = injection.get("prompts") or c["prompts"]
        cross = sum(1 for s in self.sites(w["model"]) if s["kind"] == "attn2")
        per_sample = 1 + cross * len(c["classes"])
        n = len(prompts) * int(injection["samples_per_prompt"]) * per_sample
        return self.images(w["model"], n)

    def _finetune_lora(self, w: Mapping[str, str]) -> dict[str, int]:
        """Training examples: steps x batch x gradient accumulation (each one denoiser
        forward and backward pass)."""
        settings = {**self.config["finetuning"],
                    **(self.model(w["model"]).get("finetuning") or {}),
                    **(self.concept(w["concept"]).get("finetuning") or {})}
        return {"train_examples": int(settings["steps"]) * int(settings["batch_size"])
                * int(settings.get("gradient_accumulation", 1))}

    def _compute_metrics(self, w: Mapping[str, str]) -> dict[str, int]:
        n = len(self.evaluation_samples(w["model"], w["concept"]))
        return self.faces(w["concept"], n)

    def faces(self, concept: str, n: int) -> dict[str, int]:
        """Of ``n`` images labelled by the concept's evaluation labeler (metrics and the
        calibration's FD), those whose faces dlib finds on the CPU, by its finder: all of
        them under FairFace with dlib's CNN (``face_images``) or HOG (``hog_face_images``);
        MTCNN's batches run with the job's model time, its landmarks in milliseconds."""
        c = self.concept(concept)
        labeler = (c.get("evaluation") or {}).get("labeler") or c["labeler"]
        if labeler.get("type") != "fairface":
            return {}
        unit = {"dlib": "face_images", "dlib-hog": "hog_face_images"}.get(
            (labeler.get("face") or {}).get("detector", "dlib"))
        return {unit: n} if unit else {}

    def store_bytes(self, model: str, samples: int) -> int:
        """An activation store's size before compression: samples x steps x the widths of
        every site, in the store's dtype."""
        if not self.stores:
            return 0
        itemsize = 2 if self.config["generation"]["store_dtype"] == "float16" else 4
        width = sum(int(s["width"]) for s in self.sites(model))
        return samples * int(self.model(model)["steps"]) * width * itemsize


def plan(jobs: Iterable[Job], config: Mapping[str, Any],
         stages: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Units per stage (the rule file's word, in pipeline order; ``other`` for the
    Snakefile's own rules) and in total (``"total"``)."""
    work = Work(config)
    order = list(dict.fromkeys(stages.values()))
    table: dict[str, dict[str, int]] = {}
    for job in sorted(jobs, key=lambda j: order.index(stages[j.rule]) if j.rule in stages
                      else len(order)):
        row = table.setdefault(stages.get(job.rule, "other"), dict.fromkeys(UNITS, 0))
        for unit, value in work.of(job).items():
            row[unit] += value
    table["total"] = {u: sum(row[u] for row in table.values()) for u in UNITS}
    return table
