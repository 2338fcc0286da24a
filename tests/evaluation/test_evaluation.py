"""Stage-5 jobs on the real-model code paths (CLIP labeler and embedder, random weights)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from icm.evaluation.scoring import embeddings_of
from icm.evaluation.targets import read_labels, target_rows
from icm.io.atomic import write_table
from icm.jobs.evaluation import (
    collect_table_job,
    compute_metrics_job,
    plot_grid_job,
)
from icm.steering.plan import STEER_COLUMNS

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
    embedded = tmp_path / "original.embeddings.safetensors"
    for variant, tables, base in (("original", [original], None), ("icm", [steered], embedded)):
        outputs[variant] = tmp_path / f"{variant}.json"
        compute_metrics_job(toy=False, concept=concept, evaluation=evaluation, variant=variant,
                            steered=tables, original_embeddings=base, fid_reference=None,
                            toy_features=None, output=outputs[variant],
                            output_labels=tmp_path / f"{variant}.labels.csv",
                            output_embeddings=tmp_path / f"{variant}.embeddings.safetensors")
    icm = json.loads(outputs["icm"].read_text())
    # CLIP-I reads the original's embeddings, made once by its own job, paired by sample.
    from safetensors.numpy import load_file

    from icm.evaluation.metrics import paired_cosines

    stored = {v: load_file(str(tmp_path / f"{v}.embeddings.safetensors"))
              for v in ("original", "icm")}
    assert list(stored["original"]["sample"]) == [0, 1, 2, 3]
    cosines = paired_cosines(stored["icm"]["embeddings"], stored["original"]["embeddings"])
    assert np.isclose(icm["CLIP-I"], cosines.mean())
    with pytest.raises(ValueError, match=r"no embeddings of samples \[7\]"):
        embeddings_of(tmp_path / "original.embeddings.safetensors", [0, 7])
    assert icm["n_images"] == 4 and 0 <= icm["FD"] <= math.sqrt(0.5) + 1e-9
    assert -1 <= icm["CLIP-I"] < 0.9999 and -1 <= icm["CLIP-T"] <= 1  # different images
    assert "ViT-S-32-alt" in icm["backends"]["CLIP-T"] and math.isnan(icm["FID"])
    # The paper's conventions beside: (cos + 1) / 2, and FD from hard labels as well as
    # from mean probabilities, which this CLIP labeler does not give (FairFace does).
    assert np.isclose(icm["CLIP-I_paper"], (icm["CLIP-I"] + 1) / 2)
    assert np.isclose(icm["CLIP-T_paper"], (icm["CLIP-T"] + 1) / 2)
    assert math.isnan(icm["FD_probabilities"]) and icm["FD_labels"] == icm["FD"]
    assert "no class probabilities" in icm["backends"]["FD_probabilities"]
    labelled = read_labels(tmp_path / "icm.labels.csv")
    per_prompt = []
    for _, group in labelled[labelled["label"] != ""].groupby("prompt"):
        shares = group["label"].value_counts(normalize=True)
        per_prompt.append(math.hypot(*(shares.get(c, 0.0) - 0.5 for c in ("woman", "man"))))
    assert np.isclose(icm["FD_labels"], np.mean(per_prompt))  # labelled shares vs uniform
    assert math.isnan(json.loads(outputs["original"].read_text())["CLIP-I"])
    per_image = read_labels(tmp_path / "icm.labels.csv")
    assert len(per_image) == 4 and np.allclose(per_image[["p_woman", "p_man"]].sum(axis=1), 1)
    assert np.isclose(per_image["CLIP-I"].mean(), icm["CLIP-I"])  # the mean is the metric

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
    assert "(CLIP-T + 1) / 2" in written.loc[1, "CLIP-T_paper_backend"]
    assert np.isclose(written.loc[1, "FD_labels"], icm["FD_labels"])
    # Every batch went toward "man": perfect steering could do no better than all men.
    assert np.allclose(written["FD_draw_floor"], math.sqrt(0.5))
    assert (written["n_no_face"] == 0).all()
    plot_grid_job({"original": [original], "icm": [steered]}, 3, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert (tmp_path / "metrics.png").stat().st_size > 1000


def per_image(labels, targets, confidence, clip_i=None):
    """A per-image table as compute_metrics writes it, for samples 0..n-1."""
    n = len(labels)
    return pd.DataFrame({"sample": range(n), "prompt": "a shape", "target": targets,
                         "steered": [t != "red" for t in targets], "label": labels,
                         "p_red": 1 - np.asarray(confidence), "p_green": confidence,
                         "CLIP-I": np.nan if clip_i is None else clip_i})


def test_success_has_the_papers_denominator_and_flips_count_the_rest():
    targets = ["green"] * 6 + ["red"] * 2
    original = per_image(["green", "red", "red", "red", "", "red", "red", "green"], targets,
                         [0.9, 0.1, 0.2, 0.1, 0.5, 0.1, 0.1, 0.8])
    icm = per_image(["green", "green", "green", "red", "green", "green", "red", "red"],
                    targets, [0.9, 0.8, 0.7, 0.3, 0.9, 0.6, 0.1, 0.2], clip_i=0.75)
    rows = {r["variant"]: r for r in target_rows({"original": original, "icm": icm},
                                                 "original", "green")}
    # seeds 0-5 were steered to green; seed 0 was green already and seed 4 unlabelled
    assert rows["icm"]["n_images"] == 6 and rows["icm"]["n_eligible"] == 4
    # Table 5's success: of all 6 steered toward green, 5 are green; flips: 3 of the 4
    # whose original was labelled and not green.
    assert np.isclose(rows["icm"]["success_rate"], 5 / 6)
    assert np.isclose(rows["original"]["success_rate"], 1 / 6)  # its already_target
    assert rows["icm"]["flip_rate"] == 0.75 and rows["original"]["flip_rate"] == 0
    assert rows["icm"]["CLIP-I_paper"] == 0.875
    assert np.isclose(rows["icm"]["already_target"], 1 / 6)
    assert np.isclose(rows["icm"]["target_confidence"], np.mean([0.9, 0.8, 0.7, 0.3, 0.9, 0.6]))
    assert rows["icm"]["CLIP-I"] == 0.75 and math.isnan(rows["original"]["CLIP-I"])
    shuffled = icm.copy()
    shuffled.loc[0, "target"] = "red"
    with pytest.raises(ValueError, match="other targets"):
        target_rows({"original": original, "icm": shuffled}, "original", "green")
