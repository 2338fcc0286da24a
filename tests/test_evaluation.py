"""Stage-5 jobs on the real-model code paths (CLIP labeler and embedder, random weights)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
from PIL import Image

from icm.jobs.evaluation import collect_table_job, compute_metrics_job, plot_grid_job
from icm.jobs.steering import STEER_COLUMNS
from icm.tables import write_table

CLIP = {"type": "clip", "model": "ViT-S-32-alt", "pretrained": None, "prompts": None}


def shard(folder, seed, steered):
    """A steer shard table of 4 random 32-px images (2 prompts), as steer_images writes it."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(4):
        name = f"images/{i:06d}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"sample": i, "prompt_index": i // 2, "repeat": i % 2,
                     "prompt": ["a photo of a person", "a portrait"][i // 2], "seed": i,
                     "image": name, "target": "man", "steered": steered})
    write_table(folder / "samples.csv", rows, STEER_COLUMNS)
    return folder / "samples.csv"


def test_metrics_table_and_grid_with_clip_backends(tmp_path):
    original = shard(tmp_path / "original", 0, False)
    steered = shard(tmp_path / "icm", 1, True)
    concept = {"classes": ["woman", "man"], "prompts": ["a photo of a person", "a portrait"],
               "labeler": CLIP, "evaluation": {"labeler": None, "fid_reference": None},
               "reference": None}
    evaluation = {"device": "cpu", "clip_model": "ViT-S-32-alt", "clip_pretrained": None}
    outputs = {}
    for variant, tables, base in (("original", [original], []), ("icm", [steered], [original])):
        outputs[variant] = tmp_path / f"{variant}.json"
        compute_metrics_job(toy=False, concept=concept, evaluation=evaluation, variant=variant,
                            steered=tables, original=base, fid_reference=None,
                            toy_features=None, output=outputs[variant])
    icm = json.loads(outputs["icm"].read_text())
    assert icm["n_images"] == 4 and 0 <= icm["FD"] <= math.sqrt(0.5) + 1e-9
    assert -1 <= icm["CLIP-I"] < 0.9999 and -1 <= icm["CLIP-T"] <= 1  # different images
    assert "ViT-S-32-alt" in icm["backends"]["CLIP-T"] and math.isnan(icm["FID"])
    assert math.isnan(json.loads(outputs["original"].read_text())["CLIP-I"])

    records = []
    for variant, sites, alpha in (("original", [], 0.0), ("icm", ["a.attn1", "b.attn1"], 8.0)):
        records.append(tmp_path / f"{variant}-steering.json")
        records[-1].write_text(json.dumps({"alpha": alpha, "selection": variant,
                                           "sites": sites}))
    table = collect_table_job([outputs["original"], outputs["icm"]], records,
                              tmp_path / "table.csv", tmp_path / "metrics.png")
    written = pd.read_csv(tmp_path / "table.csv")
    assert list(written["variant"]) == ["original", "icm"] == list(table["variant"])
    assert written.loc[1, "layers"] == "a.attn1;b.attn1" and written.loc[1, "alpha"] == 8.0
    assert "ViT-S-32-alt" in written.loc[1, "CLIP-I_backend"]
    plot_grid_job({"original": [original], "icm": [steered]}, 3, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert (tmp_path / "metrics.png").stat().st_size > 1000
