"""Jobs of the head-map study (docs/head-maps.md): capture per-head word maps while
generating, score head relevance on the train split, judge selections on both splits.

The plots live in ``icm.jobs.head_plots``. Everything a job writes appears at its final path
only once complete (stores, image folders and tables are written under temporary names).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from icm.aggregation import Head
from icm.atomic import atomic_directory
from icm.head_study import (
    STREAM,
    excluded,
    hrv_concepts,
    slot_names,
    split_samples,
    words_of,
)
from icm.jobs.records import write_json, written
from icm.provenance import package_versions
from icm.samples import SEED_RULE, shard_samples
from icm.tables import write_table

log = logging.getLogger("icm")

RELEVANCE_COLUMNS = ["relevance", "word", "site", "head", "score", "rank"]
TABLE_COLUMNS = ["split", "word", "method", "relevance", "k", "tau", "miou", "miou_low",
                 "miou_high", "n", "diff", "diff_low", "diff_high"]
CURVE_COLUMNS = ["split", "word", "relevance", "order", "k", "tau", "miou"]
SAMPLE_COLUMNS = ["sample", "prompt_index", "repeat", "prompt", "seed", "words", "image"]


def capture_head_maps_job(
    *, model_name: str, model: Mapping[str, Any], source: str, concept_name: str,
    study: Mapping[str, Any], generation: Mapping[str, Any], split: str, shard: int,
    images_dir: str | Path, table: str | Path, store: str | Path,
    votes: str | Path | None = None,
) -> None:
    """Generate one shard of a split with map capture at every ``attn2`` site (and, given
    ``votes``, HRV's concept-word votes of every head on the same calls)."""
    import torch
    from safetensors.torch import save_file

    from icm.families import family_of
    from icm.generate import GUIDANCE_ROWS, SamplerSettings, batches, generate_images
    from icm.head_maps import StepWindow, capture_head_maps, cross_attention_sites
    from icm.head_relevance import ConceptVoting
    from icm.head_store import HeadMapStoreWriter
    from icm.models import ModelSpec, load_pipeline
    from icm.sites import denoiser_of

    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    samples = split_samples(study, split, generation["base_seed"])
    mine = shard_samples(samples, model["n_shards"], shard, model["batch_size"])
    words = dict(zip((s.sample for s in samples), words_of(study, samples), strict=True))
    log.info("%s/%s head maps, %s shard %d: samples %d..%d of %d", model_name, concept_name,
             split, shard, mine[0].sample, mine[-1].sample, len(samples))
    pipe = load_pipeline(spec, device=generation["device"])
    settings = SamplerSettings.of(spec)
    denoiser = denoiser_of(pipe)
    sites = cross_attention_sites(denoiser)
    if not sites:
        raise ValueError(f"{model_name} has no cross-attention (attn2) sites: no word maps")
    window = StepWindow(**study["window"])
    attrs = {
        "model": {"name": model_name, "family": spec.family, "source": source,
                  "dtype": spec.dtype, "scheduler": type(pipe.scheduler).__name__},
        "concept": concept_name, "split": split, "slots": slot_names(study),
        "window": dict(study["window"]), "sampler": settings.record(),
        "base_seed": generation["base_seed"], "seed_stream": STREAM, "seed_rule": SEED_RULE,
        "shard": shard, "n_shards": model["n_shards"],
        "maps": "softmax(q k^T * scale) per head, mean over the word's tokens, summed over "
                "the window's steps, conditional rows: "
                + GUIDANCE_ROWS[family_of(denoiser).guidance],
        "versions": package_versions(),
    }
    images_dir, table = Path(images_dir), Path(table)
    rows: list[dict[str, object]] = []
    voting = ConceptVoting(pipe, hrv_concepts(study), sites) if votes else None
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
    if voting is not None:
        counts = torch.cat([voting.votes[s] for s in voting.sites]).contiguous()
        heads = [[s, h] for s in voting.sites for h in range(voting.votes[s].shape[0])]
        with written(votes) as partial:
            save_file({"votes": counts.cpu()}, str(partial), metadata={"heads": json.dumps(heads), "concepts": json.dumps(voting.concepts),
                            "what": "HRV votes (heads, concepts): per image, step and "
                                    "concept-word sequence, one vote per head"})


# -- reading a split back ----------------------------------------------------------------


def read_split(tables: Sequence[str | Path], stores: Sequence[str | Path],
               exclude: Sequence[str] = ()) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The sample rows (image paths made absolute) and the float32 maps (site -> (samples,
    heads, words, y, x)) of a split's shards, in shard order, ``exclude``'d sites left out."""
    import zarr

    from icm.store import read_checked

    rows: list[dict[str, Any]] = []
    parts: dict[str, list[np.ndarray]] = {}
    for table, store in zip(tables, stores, strict=True):
        with Path(table).open(newline="") as handle:
            shard_rows = list(csv.DictReader(handle))
        for row in shard_rows:
            row["image"] = str(Path(table).parent / row["image"])
            row["words"] = json.loads(row["words"])
        group = zarr.open_group(Path(store), mode="r")
        if group.attrs.get("n_samples") != len(shard_rows):
            raise ValueError(f"{store} holds {group.attrs.get('n_samples')} samples, "
                             f"{table} lists {len(shard_rows)}")
        for site in group.attrs["sites"]:
            if not excluded(site, list(exclude)):
                parts.setdefault(site, []).append(
                    read_checked(group, store, site).astype(np.float32))
        rows += shard_rows
    if not parts:
        raise ValueError(f"every site is excluded ({list(exclude)})")
    return rows, {site: np.concatenate(chunks) for site, chunks in parts.items()}


def read_images(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(samples, H, W, 3) uint8 images of the rows."""
    return np.stack([np.asarray(Image.open(row["image"]).convert("RGB")) for row in rows])


def read_masks(masks: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], slots: list[str],
               images: np.ndarray | None = None) -> np.ndarray:
    """(samples, slots, H, W) ground truth: the toy oracle's foreground of each image (the same
    for every slot: the one object is what each word names), or ``<path>/<seed>-<slot>.png``."""
    if masks["type"] == "oracle":
        from icm.toy.oracle import foreground_mask

        images = read_images(rows) if images is None else images
        fg = np.stack([foreground_mask(image) for image in images])
        return np.repeat(fg[:, None], len(slots), axis=1)
    folder = Path(masks["path"])
    files = [[folder / f"{row['seed']}-{slot}.png" for slot in slots] for row in rows]
    missing = [str(f) for per in files for f in per if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} masks missing in {folder}, e.g. {missing[:3]} "
                                "(one <seed>-<slot>.png per generated image and slot)")
    size = np.asarray(Image.open(rows[0]["image"])).shape[:2]
    out = np.zeros((len(rows), len(slots), *size), dtype=bool)
    for i, per in enumerate(files):
        for j, path in enumerate(per):
            mask = np.asarray(Image.open(path).convert("L"))
            if mask.shape != size:
                raise ValueError(f"{path} is {mask.shape}, its image {size}")
            out[i, j] = mask > 0
    return out


# -- relevance ------------------------------------------------------------------------------


def score_head_relevance_job(
    *, study: Mapping[str, Any], tables: Sequence[str | Path], stores: Sequence[str | Path],
    votes: Sequence[str | Path], output_table: str | Path, output_tensors: str | Path,
    output_record: str | Path,
) -> None:
    """Every relevance source of the study, per (slot, head), fitted on the train split."""
    from safetensors.numpy import save_file

    from icm.aggregation import heads_of
    from icm.head_relevance import agreement, concentration, oracle_iou, rank_stability

    slots, sources = slot_names(study), list(study["relevance"])
    rows, maps = read_split(tables, stores, study["exclude"])
    heads = heads_of(maps)
    size = study["map_size"]
    masks = read_masks(study["masks"], rows, slots) if "oracle" in sources else None
    hrv = _hrv(votes, heads, slots) if "hrv" in sources else None
    groups = np.asarray([int(r["repeat"]) for r in rows]) % study["stability_groups"]
    scores: dict[str, np.ndarray] = {}
    for w, slot in enumerate(slots):
        for source in sources:
            if source == "oracle":
                value = oracle_iou(maps, w, masks[:, w], study["oracle_tau"], size)
            elif source == "agreement":
                value = agreement(maps, w, size)
            elif source == "concentration":
                value = concentration(maps, w)
            elif source == "stability":
                value = rank_stability(np.stack([
                    agreement({s: m[groups == g] for s, m in maps.items()}, w, size)
                    for g in range(study["stability_groups"]) if (groups == g).any()]))
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
            "oracle_tau", "stability_groups", "map_size", "exclude", "hrv_words")},
        "hrv_concepts": hrv_concepts(study), "versions": package_versions()})


def _hrv(votes: Sequence[str | Path], heads: list[Head], slots: list[str]) -> np.ndarray:
    """(slots, heads) HRV relevance from the shards' summed votes, rows in slot order, over
    the kept heads only (votes of excluded sites dropped before normalising)."""
    from safetensors import safe_open

    from icm.head_relevance import hrv_from_votes

    total, order, concepts = None, None, None
    for path in votes:
        with safe_open(str(path), "np") as handle:
            counts = handle.get_tensor("votes")
            meta = handle.metadata()
        names = [tuple(h) for h in json.loads(meta["heads"])]
        if order is not None and names != order:
            raise ValueError(f"{path} votes for other heads than the first shard")
        order, concepts = names, json.loads(meta["concepts"])
        total = counts if total is None else total + counts
    index = {h: i for i, h in enumerate(order)}
    kept = total[[index[h] for h in heads]]
    relevance = hrv_from_votes(kept)  # (concepts, heads)
    return relevance[[concepts.index(slot) for slot in slots]]


def read_relevance(path: str | Path) -> dict[str, dict[str, dict[Head, float]]]:
    """relevance.csv as source -> slot -> {(site, head): score}."""
    out: dict[str, dict[str, dict[Head, float]]] = {}
    with Path(path).open(newline="") as handle:
        for row in csv.DictReader(handle):
            out.setdefault(row["relevance"], {}).setdefault(row["word"], {})[
                (row["site"], int(row["head"]))] = float(row["score"])
    return out


def label_free_choice(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per word and tau: the label-free selection (source and k, the oracle excluded) with
    the best paired gain over all heads on the train split, and how it does on the held-out
    split. The train masks choose among a few settings; the held-out images stay unseen."""
    out = []
    train = [r for r in rows if r["split"] == "train" and r["method"] == "topk"
             and r["relevance"] != "oracle"]
    held = {(r["word"], r["relevance"], r["k"], r["tau"]): r for r in rows
            if r["split"] == "held-out" and r["method"] == "topk"}
    for word, tau in dict.fromkeys((r["word"], r["tau"]) for r in train):
        best = max((r for r in train if r["word"] == word and r["tau"] == tau),
                   key=lambda r: r["diff"])
        test = held.get((word, best["relevance"], best["k"], tau))
        if test is not None:
            out.append({"word": word, "tau": tau, "relevance": best["relevance"],
                        "k": best["k"], "train_diff": best["diff"],
                        "held_out_miou": test["miou"], "held_out_diff": test["diff"],
                        "held_out_diff_low": test["diff_low"],
                        "held_out_diff_high": test["diff_high"]})
    return out


# -- evaluation -------------------------------------------------------------------------------


def evaluate_head_maps_job(
    *, study: Mapping[str, Any], splits: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    relevance: str | Path, output_table: str | Path, output_curve: str | Path,
    output_record: str | Path,
) -> None:
    """table.csv (every method on both splits, paired with ``all``) and curve.csv (mIoU of
    the k most and the k least relevant heads, held-out split)."""
    from icm.head_eval import WordScorer, curve_counts, evaluate

    slots, size = slot_names(study), study["map_size"]
    scores = read_relevance(relevance)
    table, curve = [], []
    for split, (tables, stores) in splits.items():
        rows, maps = read_split(tables, stores, study["exclude"])
        masks = read_masks(study["masks"], rows, slots)
        for w, slot in enumerate(slots):
            chosen = {source: per[slot] for source, per in scores.items()}
            table += evaluate(maps, masks[:, w], w, slot, split, chosen, study["ks"],
                              study["taus"], study["seed"], size)
            if split != "held-out":
                continue
            scorer = WordScorer(maps, w, masks[:, w], size)
            counts = curve_counts(len(scorer.heads), study["curve_points"])
            for source, relevance_of in chosen.items():
                for tau in study["taus"]:
                    for order, values in scorer.curve(relevance_of, counts, tau).items():
                        curve += [{"split": split, "word": slot, "relevance": source,
                                   "order": order, "k": c, "tau": tau, "miou": v}
                                  for c, v in zip(counts, values, strict=True)]
        log.info("%s: %d images evaluated", split, len(rows))
    write_table(output_table, table, TABLE_COLUMNS)
    write_table(output_curve, curve, CURVE_COLUMNS)
    write_json(output_record, {
        "what": "mIoU of each head selection's word-map segmentation against the masks, "
                "95 % bootstrap intervals over images, paired differences with all heads",
        "masks": dict(study["masks"]), "relevance_fitted_on": "train",
        "label_free_choice": label_free_choice(table),
        "settings": {k: study[k] for k in ("ks", "taus", "seed", "map_size", "exclude",
                                           "curve_points")},
        "versions": package_versions()})
