"""Jobs of the head-map study (docs/head-maps.md): capture per-head word maps while
generating, score head relevance on the train split, judge selections on both splits.

Figures come from ``icm.head_maps.plots``. Everything a job writes appears at its final path
only once complete (stores, image folders and tables are written under temporary names).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from icm.generation.samples import SEED_RULE, shard_samples
from icm.head_maps.plots import (
    MISREAD_COLUMNS,
    mean_map,
    middle,
    misread,
    plot_curve,
    plot_overlays,
    plot_relevance,
    plot_tau,
    pyplot,
    save,
)
from icm.head_maps.reading import (
    SAMPLE_COLUMNS,
    label_free_choice,
    read_images,
    read_masks,
    read_relevance,
    read_split,
)
from icm.head_maps.relevance import hrv_of_votes
from icm.head_maps.study import (
    STREAM,
    hrv_concepts,
    hrv_refusal,
    hrv_samples,
    site_rule_text,
    slot_names,
    split_samples,
    words_of,
)
from icm.io.atomic import atomic_directory, write_json, write_table, written
from icm.io.provenance import package_versions

log = logging.getLogger("icm")

RELEVANCE_COLUMNS = ["relevance", "word", "site", "head", "score", "rank"]
TABLE_COLUMNS = ["split", "word", "method", "relevance", "k", "tau", "miou", "miou_low",
                 "miou_high", "n", "diff", "diff_low", "diff_high", "sites"]
CURVE_COLUMNS = ["split", "word", "relevance", "order", "k", "tau", "miou"]


#: What a stored map is, by the family's word-map kind.
MAP_RULES = {
    "attn2": "softmax(q k^T * scale) per head",
    "joint": "per head, each image query's softmax over the joint text and image keys, its "
             "text-key columns",
}


def default_size(pipe: Any, denoiser: Any) -> int:
    """The model's default image side in pixels: the denoiser's ``sample_size`` (FLUX's
    pipeline's ``default_sample_size``) times the VAE's factor (1 for the pixel-space toy),
    as DAAM reads it."""
    size = getattr(denoiser.config, "sample_size", None) or pipe.default_sample_size
    size = size[0] if isinstance(size, list | tuple) else size
    return int(size) * int(getattr(pipe, "vae_scale_factor", 1) or 1)


def capture_head_maps_job(
    *, model_name: str, model: Mapping[str, Any], source: str, concept_name: str,
    study: Mapping[str, Any], generation: Mapping[str, Any], split: str, shard: int,
    images_dir: str | Path, table: str | Path, store: str | Path,
    votes: str | Path | None = None,
) -> None:
    """Generate one shard of a split with map capture at every word-map site (``attn2``;
    FLUX's joint attention) and, given ``votes``, HRV's concept-word votes of every head on
    the same calls."""

    from icm.generation.shard import GUIDANCE_ROWS, SamplerSettings, batches, generate_images
    from icm.head_maps.relevance import ConceptVoting
    from icm.head_maps.store import HeadMapStoreWriter
    from icm.hooks.head_maps import StepWindow, capture_head_maps, word_map_sites
    from icm.hooks.sites import denoiser_of
    from icm.models.families import family_of
    from icm.models.loading import ModelSpec, load_pipeline

    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    samples = split_samples(study, split, generation["base_seed"])
    mine = shard_samples(samples, model["n_shards"], shard, model["batch_size"])
    words = dict(zip((s.sample for s in samples), words_of(study, samples), strict=True))
    log.info("%s/%s head maps, %s shard %d: samples %d..%d of %d", model_name, concept_name,
             split, shard, mine[0].sample, mine[-1].sample, len(samples))
    pipe = load_pipeline(spec, device=generation["device"])
    settings = SamplerSettings.of(spec)
    denoiser = denoiser_of(pipe)
    family = family_of(denoiser)
    sites = word_map_sites(denoiser)
    if not sites:
        raise ValueError(f"{model_name} has no cross- or joint-attention sites: no word maps")
    window = StepWindow(**study["window"])
    attrs = {
        "model": {"name": model_name, "family": spec.family, "source": source,
                  "dtype": spec.dtype, "scheduler": type(pipe.scheduler).__name__},
        "concept": concept_name, "split": split, "slots": slot_names(study),
        # the model's default image side, which DAAM's site rule reads (study.daam_keeps)
        "default_size": default_size(pipe, denoiser),
        "window": dict(study["window"]), "sampler": settings.record(),
        "base_seed": generation["base_seed"], "seed_stream": STREAM, "seed_rule": SEED_RULE,
        "shard": shard, "n_shards": model["n_shards"],
        "maps": MAP_RULES[family.map_kind]
                + ", mean over the word's tokens, summed over the window's steps, conditional "
                "rows: " + GUIDANCE_ROWS[family.guidance],
        "versions": package_versions(),
    }
    images_dir, table = Path(images_dir), Path(table)
    rows: list[dict[str, object]] = []
    # HRV's votes need cross-attention (refused at start where a study asks for them on
    # joint attention); there the votes file records why it holds none.
    refusal = hrv_refusal(family)
    voting = ConceptVoting(pipe, hrv_concepts(study), sites, seed=shard) \
        if votes and refusal is None else None
    with (
        atomic_directory(images_dir) as partial_images,
        HeadMapStoreWriter(store, mine, attrs, study["store_dtype"],
                           chunk_samples=model["batch_size"]) as writer,
        voting if voting is not None else contextlib.nullcontext(),
        tqdm(total=len(mine), desc=f"head maps {split}", unit="img", file=sys.stderr) as bar,
    ):
        partial_images.mkdir()
        for batch in batches(mine, model["batch_size"]):
            prompts = [s.prompt for s in batch]
            with capture_head_maps(pipe, prompts, [words[s.sample] for s in batch], sites,
                                   window=window, arguments=settings.arguments) as capture:
                images = generate_images(pipe, batch, settings)
                writer.write(capture.pop())
            for sample, image in zip(batch, images, strict=True):
                name = f"{sample.sample:06d}.png"
                image.save(partial_images / name)
                rows.append({**sample.as_row(), "words": json.dumps(words[sample.sample]),
                             "image": f"{images_dir.name}/{name}"})
            bar.update(len(batch))
    write_table(table, rows, SAMPLE_COLUMNS)
    if votes:
        write_votes(votes, voting, f"the {split} split's images", refusal)


def write_votes(path: str | Path, voting: Any, images: str, refusal: str | None = None
                ) -> None:
    """HRV's (heads, concepts) vote counts with their heads and concepts; without
    ``voting`` (joint attention, where HRV is refused at start), an empty file saying why
    (``refusal``)."""
    import torch
    from safetensors.torch import save_file

    if voting is None:
        tensor, meta = torch.zeros(0, 0), {
            "heads": "[]", "concepts": "[]",
            "what": f"no HRV votes: {refusal}"}
    else:
        tensor = torch.cat([voting.votes[s] for s in voting.sites]).contiguous().cpu()
        heads = [[s, h] for s in voting.sites for h in range(voting.votes[s].shape[0])]
        meta = {"heads": json.dumps(heads), "concepts": json.dumps(voting.concepts),
                "what": "HRV votes (heads, concepts): per image, step and concept-word "
                        f"sequence, one vote per head, on {images}"}
    with written(path) as partial:
        save_file({"votes": tensor}, str(partial), metadata=meta)


def count_head_votes_job(
    *, model_name: str, model: Mapping[str, Any], source: str, concept_name: str,
    study: Mapping[str, Any], generation: Mapping[str, Any], shard: int, votes: str | Path,
) -> None:
    """HRV's votes on one shard of the study's generic prompts (``hrv_prompts``), as HRV
    counts them on its own prompts: images are generated only to vote, and not kept."""
    from icm.generation.shard import SamplerSettings, batches, generate_images
    from icm.head_maps.relevance import ConceptVoting
    from icm.hooks.head_maps import word_map_sites
    from icm.hooks.sites import denoiser_of
    from icm.models.loading import ModelSpec, load_pipeline

    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    samples = hrv_samples(study, generation["base_seed"])
    mine = shard_samples(samples, model["n_shards"], shard, model["batch_size"])
    log.info("%s/%s HRV votes, shard %d: samples %d..%d of %d", model_name, concept_name,
             shard, mine[0].sample, mine[-1].sample, len(samples))
    pipe = load_pipeline(spec, device=generation["device"])
    settings = SamplerSettings.of(spec)
    denoiser = denoiser_of(pipe)
    with (
        ConceptVoting(pipe, hrv_concepts(study), word_map_sites(denoiser), seed=shard) as voting,
        tqdm(total=len(mine), desc="HRV votes", unit="img", file=sys.stderr) as bar,
    ):
        for batch in batches(mine, model["batch_size"]):
            generate_images(pipe, batch, settings)
            bar.update(len(batch))
    write_votes(votes, voting, f"{len(mine)} images of the generic prompts (hrv_prompts)")


# -- reading a split back ----------------------------------------------------------------


# -- relevance ------------------------------------------------------------------------------


def score_head_relevance_job(
    *, study: Mapping[str, Any], tables: Sequence[str | Path], stores: Sequence[str | Path],
    votes: Sequence[str | Path], output_table: str | Path, output_tensors: str | Path,
    output_record: str | Path,
) -> None:
    """Every relevance source of the study, per (slot, head), fitted on the train split."""
    from safetensors.numpy import save_file

    from icm.head_maps.aggregation import heads_of
    from icm.head_maps.relevance import (
        agreement,
        concentration,
        oracle_iou,
        published_hrv,
        rank_stability,
    )

    slots, sources = slot_names(study), list(study["relevance"])
    rows, maps = read_split(tables, stores, study["exclude"], study["sites"])
    heads = heads_of(maps)
    size = study["map_size"]
    masks, annotated = read_masks(study["masks"], rows, slots) if "oracle" in sources \
        else (None, None)
    hrv = hrv_of_votes(votes, heads, slots) if "hrv" in sources else None
    published = None
    if "hrv-published" in sources:
        import zarr

        spec = study.get("hrv_vectors") or {}
        every_site = list(zarr.open_group(Path(stores[0]), mode="r").attrs["sites"])
        published = published_hrv(spec["vectors"], spec["head_index"], spec["concepts"],
                                  {slot: spec["slots"][slot] for slot in slots}, every_site,
                                  heads)
    groups = np.asarray([int(r["repeat"]) for r in rows]) % study["stability_groups"]
    scores: dict[str, np.ndarray] = {}
    for w, slot in enumerate(slots):
        for source in sources:
            if source == "oracle":
                keep = annotated[:, w]  # the train images annotated for this word
                value = oracle_iou({s: m[keep] for s, m in maps.items()}, w, masks[keep, w],
                                   study["oracle_tau"], size)
            elif source == "agreement":
                value = agreement(maps, w, size)
            elif source == "concentration":
                value = concentration(maps, w)
            elif source == "stability":
                value = rank_stability(np.stack([
                    agreement({s: m[groups == g] for s, m in maps.items()}, w, size)
                    for g in range(study["stability_groups"]) if (groups == g).any()]))
            elif source == "hrv-published":
                value = published[w]
            else:
                value = hrv[w]
            scores[f"{source}/{slot}"] = np.asarray(value, dtype=np.float64)
    table = []
    for key, value in scores.items():
        source, slot = key.split("/")
        rank = (-value).argsort(kind="stable").argsort()
        table += [{"relevance": source, "word": slot, "site": site, "head": h,
                   "score": float(v), "rank": int(r) + 1}
                  for (site, h), v, r in zip(heads, value, rank, strict=True)]
    write_table(output_table, table, RELEVANCE_COLUMNS)
    with written(output_tensors) as partial:
        save_file({k: v.astype(np.float32) for k, v in scores.items()}, str(partial),
                  metadata={"heads": json.dumps([list(h) for h in heads])})
    write_json(output_record, {
        "what": "head relevance per (source/slot): one score per head, higher is more relevant",
        "heads": [list(h) for h in heads], "slots": slots, "sources": sources,
        "oracle": "oracle is per-head IoU with the train split's masks: an upper bound, not "
                  "available without masks" if "oracle" in sources else None,
        "train_samples": len(rows), "settings": {k: study[k] for k in (
            "oracle_tau", "stability_groups", "map_size", "exclude", "sites", "hrv_words")}
        | {"hrv_vectors": study.get("hrv_vectors")},
        "hrv_concepts": hrv_concepts(study), "versions": package_versions()})


# -- evaluation -------------------------------------------------------------------------------


def evaluate_head_maps_job(
    *, study: Mapping[str, Any], splits: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    relevance: str | Path, output_table: str | Path, output_curve: str | Path,
    output_record: str | Path,
) -> None:
    """table.csv (every method on both splits, paired with ``all``) and curve.csv (mIoU of
    the k most and the k least relevant heads, held-out split)."""
    from icm.head_maps.evaluation import WordScorer, curve_counts, evaluate_split

    slots, size = slot_names(study), study["map_size"]
    scores = read_relevance(relevance)
    table, curve = [], []
    for split, (tables, stores) in splits.items():
        rows, maps = read_split(tables, stores, study["exclude"], study["sites"])
        masks, annotated = read_masks(study["masks"], rows, slots)
        prompts = [int(r["prompt_index"]) for r in rows]
        scorers: dict[str, WordScorer] = {}
        table += evaluate_split(maps, masks, annotated, prompts, slots, split, scores,
                                study["ks"], study["taus"], study["seed"], size, scorers)
        for slot, scorer in scorers.items() if split == "held-out" else ():
            chosen = {source: per[slot] for source, per in scores.items()}
            counts = curve_counts(len(scorer.heads), study["curve_points"])
            for source, relevance_of in chosen.items():
                for tau in study["taus"]:
                    for order, values in scorer.curve(relevance_of, counts, tau).items():
                        curve += [{"split": split, "word": slot, "relevance": source,
                                   "order": order, "k": c, "tau": tau, "miou": v}
                                  for c, v in zip(counts, values, strict=True)]
        log.info("%s: %d images, %d of %d (image, word) pairs annotated", split, len(rows),
                 int(annotated.sum()), annotated.size)
    rule = site_rule_text(study["sites"], study["exclude"], list(maps))
    write_table(output_table, [{**row, "sites": rule} for row in table], TABLE_COLUMNS)
    write_table(output_curve, curve, CURVE_COLUMNS)
    write_json(output_record, {
        "what": "mIoU of each head selection's word-map segmentation against the masks, "
                "95 % bootstrap intervals over images, paired differences with all heads",
        "masks": dict(study["masks"]), "relevance_fitted_on": "train",
        "label_free_choice": label_free_choice(table),
        "settings": {k: study[k] for k in ("ks", "taus", "seed", "map_size", "exclude",
                                           "sites", "curve_points")},
        "versions": package_versions()})


def plot_head_maps_job(
    *, study: Mapping[str, Any], table: str | Path, curve: str | Path,
    relevance: str | Path, held_out: tuple[Sequence[str], Sequence[str]],
    outputs: Mapping[str, str | Path], per_prompt: int = 2,
) -> None:
    """Every figure of the module docstring, from the held-out split."""
    from icm.head_maps.aggregation import chosen_heads
    from icm.head_maps.evaluation import WordScorer

    table_frame, curve_frame = pd.read_csv(table), pd.read_csv(curve)
    tau = middle(study["taus"])
    plot_curve(curve_frame, table_frame, tau, outputs["curve"])
    topk = table_frame[table_frame.method == "topk"]
    k = middle(sorted(topk.k.unique())) if len(topk) else 1
    plot_tau(table_frame, int(k), outputs["tau"])
    scores = read_relevance(relevance)
    plot_relevance(scores, outputs["relevance"])

    slots, size = slot_names(study), study["map_size"]
    rows, maps = read_split(*held_out, study["exclude"], study["sites"])
    images = read_images(rows)
    masks, _ = read_masks(study["masks"], rows, slots, images)  # unannotated: empty
    shown = [i for i, row in enumerate(rows) if int(row["repeat"]) < per_prompt]
    panel_rows, panels_by_slot = [], []
    for w, slot in enumerate(slots):
        scorer = WordScorer(maps, w, masks[:, w], size)
        panels = [("all heads", scorer.stack.mean(dim=1).numpy())]
        for source, per in scores.items():
            chosen = chosen_heads(scorer.heads, per[slot], int(k))
            panels.append((f"top-{k} {source}", mean_map(scorer, chosen)))
        first = next(iter(scores))
        bottom = chosen_heads(scorer.heads, {h: -v for h, v in scores[first][slot].items()},
                              int(k))
        panels.append((f"bottom-{k} {first}", mean_map(scorer, bottom)))
        panels_by_slot.append(panels)
        panel_rows += [(i, w) for i in shown]
    plot_overlays(
        images[[i for i, _ in panel_rows]],
        [(name, np.stack([panels_by_slot[w][j][1][i] for i, w in panel_rows]))
         for j, (name, _) in enumerate(panels_by_slot[0])],
        [f"{rows[i]['prompt']}: {slots[w]}" for i, w in panel_rows], outputs["overlays"])

    wrong = misread(rows, images, slots) if study["masks"]["type"] == "oracle" else []
    write_table(outputs["misread"], wrong, MISREAD_COLUMNS)
    index = {int(row["sample"]): i for i, row in enumerate(rows)}
    picked = [(index[m["sample"]], slots.index(m["word"]), m) for m in wrong[:12]]
    if picked:
        plot_overlays(
            images[[i for i, _, _ in picked]],
            [(name, np.stack([panels_by_slot[w][j][1][i] for i, w, _ in picked]))
             for j, (name, _) in enumerate(panels_by_slot[0])],
            [f"{m['prompt']}: drew {m['drawn']}" for _, _, m in picked], outputs["misread_plot"])
    else:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(4, 1))
        ax.text(0.5, 0.5, "no held-out image drew another word than asked", ha="center",
                va="center", fontsize=8)
        ax.axis("off")
        save(fig, outputs["misread_plot"])
        plt.close(fig)
