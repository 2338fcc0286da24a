"""Prompt injection, the localization baseline (the paper's section 4.5, appendix H): the
images, then the flip rates, the injection ranking and its agreement with the probes'."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from icm.io.atomic import write_json, write_table
from icm.probing.injection import INJECTION_COLUMNS, flip_table, injected_prompts
from icm.probing.ranking import short_site

log = logging.getLogger("icm")


def inject_prompts_job(
    *, model_name: str, model: Mapping[str, Any], source: str, concept_name: str,
    concept: Mapping[str, Any], generation: Mapping[str, Any], images_dir: str | Path,
    table: str | Path, record: str | Path,
) -> None:
    """Every general prompt x ``injection.samples_per_prompt`` seeds, once as it is and once
    per (cross-attention site, class) with that class's prompt injected at that site only,
    at every step, conditional rows only; the same seed (initial noise) for all of a
    sample's images. The model loads first, so missing weights stop the job before any
    work; images appear only complete (``atomic_directory``)."""
    from tqdm import tqdm

    from icm.generation.samples import concept_samples
    from icm.generation.shard import SamplerSettings, generate_images, image_name
    from icm.hooks.injection import PromptInjection, record_text_states
    from icm.hooks.sites import denoiser_of, list_sites
    from icm.io.atomic import atomic_directory
    from icm.io.provenance import package_versions
    from icm.models.families import family_of
    from icm.models.loading import ModelSpec, load_pipeline

    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    injection = concept["injection"]
    prompts = injection.get("prompts") or concept["prompts"]
    targets = injected_prompts(concept)
    samples = concept_samples(concept, {}, generation, injection["samples_per_prompt"],
                              prompts=prompts, prompt_set="injection")
    pipe = load_pipeline(spec, device=generation["device"])
    family = family_of(denoiser_of(pipe))
    if family.cross_kind is None:
        raise ValueError(f"{model_name} ({family.name}) has no cross-attention sites: prompt "
                         "injection has nowhere to inject")
    sites = list_sites(denoiser_of(pipe), [family.cross_kind])
    settings = SamplerSettings.of(spec)
    states = {c: record_text_states(pipe, p, sites, settings.pipeline_kwargs())
              for c, p in targets.items()}
    batch_size = model["batch_size"]
    runs = [(None, None)] + [(site, c) for site in sites for c in targets]
    log.info("%s/%s: %d samples x (1 + %d sites x %d classes) = %d images", model_name,
             concept_name, len(samples), len(sites), len(targets), len(samples) * len(runs))
    rows: list[dict[str, object]] = []
    rel = Path(os.path.relpath(Path(images_dir).resolve(), Path(table).parent.resolve()))
    with (atomic_directory(images_dir) as partial,
          tqdm(total=len(samples) * len(runs), desc="inject", unit="img", file=sys.stderr) as bar):
        partial.mkdir()
        for number, (site, name) in enumerate(runs):
            folder = partial / ("none" if site is None else f"{number:03d}")
            folder.mkdir()
            for start in range(0, len(samples), batch_size):
                batch = samples[start:start + batch_size]
                if site is None:
                    images = generate_images(pipe, batch, settings)
                else:
                    with PromptInjection(pipe, {site: states[name][site]}):
                        images = generate_images(pipe, batch, settings)
                for sample, image in zip(batch, images, strict=True):
                    image.save(folder / image_name(sample))
                    rows.append({**sample.as_row(), "sample": len(rows), "site": site or "",
                                 "injected_class": name or "",
                                 "injected_prompt": targets[name] if name else "",
                                 "image": str(rel / folder.name / image_name(sample))})
                bar.update(len(batch))
    write_table(table, rows, INJECTION_COLUMNS)
    write_json(record, {
        "model": {"name": model_name, "family": family.name, "source": source},
        "concept": concept_name, "prompts": list(prompts), "injected": targets,
        "sites": sites, "samples_per_prompt": injection["samples_per_prompt"],
        "sampler": settings.record(), "base_seed": generation["base_seed"],
        "seed_stream": "localization", "prompt_set": "injection",
        "meaning": "each seed's image as generated (site empty) and with one class's prompt "
                   "in place of the general prompt's text at one cross-attention site, every "
                   "step, conditional rows only",
        "versions": package_versions()})


def rank_injection_job(
    samples_csv: str | Path, labels_csv: str | Path, ranking_csv: str | Path,
    output_flips: str | Path, output_ranking: str | Path, output_record: str | Path,
    output_plot: str | Path,
) -> None:
    """The flip rate per (site, class), the sites ranked by flip rate over all classes, and
    its Spearman correlation with the probe ranking's order of the same sites (mean test
    accuracy from the steering start, ``ranking.csv``), with a scatter plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from scipy.stats import spearmanr

    samples = pd.read_csv(samples_csv, keep_default_na=False)
    labels = pd.read_csv(labels_csv, keep_default_na=False, dtype={"label": str})
    flips = flip_table(samples, labels)
    write_table(output_flips, flips.to_dict("records"), columns=list(flips.columns))
    per_site = (flips.groupby("site", sort=False)[["eligible", "flips"]].sum().reset_index())
    per_site["flip_rate"] = per_site["flips"] / per_site["eligible"].where(
        per_site["eligible"] > 0)
    probes = pd.read_csv(ranking_csv).set_index("site")
    unknown = sorted(set(per_site["site"]) - set(probes.index))
    if unknown:
        raise ValueError(f"{ranking_csv} does not rank the injected sites {unknown}: the "
                         "probes and the injection ran on different models")
    per_site["probe_mean_test_acc"] = probes.loc[per_site["site"], "mean_test_acc"].to_numpy()
    per_site["probe_rank"] = probes.loc[per_site["site"], "rank"].to_numpy()
    per_site = per_site.sort_values(["flip_rate", "probe_rank"], ascending=[False, True],
                                    na_position="last", kind="stable")
    per_site.insert(0, "injection_rank", range(1, len(per_site) + 1))
    write_table(output_ranking, per_site.to_dict("records"), columns=list(per_site.columns))
    valid = per_site.dropna(subset=["flip_rate"])
    rho, pvalue = (spearmanr(valid["flip_rate"], valid["probe_mean_test_acc"])
                   if len(valid) > 2 else (float("nan"), float("nan")))
    write_json(output_record, {
        "spearman_rho": float(rho), "pvalue": float(pvalue), "sites": len(valid),
        "meaning": "Spearman correlation, over the cross-attention sites, of the injection "
                   "flip rate with the probes' mean test accuracy from the steering start; "
                   "near 0 or negative: injection localizes elsewhere than the probes",
        "top_by_injection": list(per_site["site"][:3]),
        "top_by_probes": list(per_site.sort_values("probe_rank")["site"][:3])})
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.scatter(per_site["probe_mean_test_acc"], per_site["flip_rate"], color="tab:blue")
    for _, row in per_site.head(3).iterrows():
        ax.annotate(short_site(row["site"]), (row["probe_mean_test_acc"], row["flip_rate"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("probe mean test accuracy (from the steering start)")
    ax.set_ylabel("flip rate toward the injected class")
    ax.set_title(f"cross-attention sites: injection vs probes (Spearman {rho:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(output_plot, dpi=120)
    plt.close(fig)


