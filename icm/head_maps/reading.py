"""A head-map study's outputs read back: a split's samples and stores, its images and masks,
the relevance table, and the label-free choice of heads."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from icm.head_maps.aggregation import Head
from icm.head_maps.study import kept_site

SAMPLE_COLUMNS = ["sample", "prompt_index", "repeat", "prompt", "seed", "words", "image"]


def read_split(tables: Sequence[str | Path], stores: Sequence[str | Path],
               exclude: Sequence[str] = (), sites: str = "daam"
               ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The sample rows (image paths made absolute) and the float32 maps (site -> (samples,
    heads, words, y, x)) of a split's shards, in shard order: the sites of the rule
    ``sites`` (``icm.head_maps.study.SITE_RULES``), ``exclude``'d sites left out."""
    import zarr

    from icm.io.activations import read_checked

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
            if kept_site(site, tuple(group[site].shape[-2:]), group.attrs.get("default_size"),
                         sites, list(exclude)):
                parts.setdefault(site, []).append(
                    read_checked(group, store, site).astype(np.float32))
        rows += shard_rows
    if not parts:
        raise ValueError(f"every site is excluded (sites: {sites}, exclude: {list(exclude)})")
    return rows, {site: np.concatenate(chunks) for site, chunks in parts.items()}


def read_images(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """(samples, H, W, 3) uint8 images of the rows."""
    return np.stack([np.asarray(Image.open(row["image"]).convert("RGB")) for row in rows])


def read_masks(masks: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], slots: list[str],
               images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(samples, slots, H, W) ground truth and (samples, slots) whether it was given: the toy
    oracle's foreground of each image (the same for every slot: the one object is what each
    word names), or ``<path>/<seed>-<slot>.png`` at the image's size, where a missing file
    means that word of that image is not annotated (not scored; none at all is an error)."""
    if masks["type"] == "oracle":
        from icm.toy.oracle import foreground_mask

        images = read_images(rows) if images is None else images
        fg = np.stack([foreground_mask(image) for image in images])
        return np.repeat(fg[:, None], len(slots), axis=1), np.ones((len(rows), len(slots)),
                                                                   dtype=bool)
    folder = Path(masks["path"])
    files = [[folder / f"{row['seed']}-{slot}.png" for slot in slots] for row in rows]
    annotated = np.array([[f.is_file() for f in per] for per in files], dtype=bool)
    if not annotated.any():
        raise FileNotFoundError(f"no masks in {folder} for these {len(rows)} images, e.g. "
                                f"{[str(f) for f in files[0]]} (one <seed>-<slot>.png per "
                                "annotated image and slot)")
    size = np.asarray(Image.open(rows[0]["image"])).shape[:2]
    out = np.zeros((len(rows), len(slots), *size), dtype=bool)
    for i, per in enumerate(files):
        for j, path in enumerate(per):
            if not annotated[i, j]:
                continue
            mask = np.asarray(Image.open(path).convert("L"))
            if mask.shape != size:
                raise ValueError(f"{path} is {mask.shape}, its image {size}")
            out[i, j] = mask > 0
    return out, annotated


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
