"""The head-map study as a workflow: capture, relevance, evaluation and plots on the toy,
and what an edit reruns."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import xarray as xr
from workflow_helpers import TEST_CONFIG, job_counts, snakemake

BASE = "results/toy/objects/head-maps"


def plan(workdir, tmp_path, overlay: str, target: str = f"{BASE}/curve.png") -> dict[str, int]:
    path = tmp_path / "edit.yaml"
    path.write_text(overlay)
    result = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(path), "-n", "--", target)
    assert result.returncode == 0, result.stderr[-3000:]
    return job_counts(result.stdout + result.stderr)


@pytest.mark.slow
def test_toy_head_maps_to_their_table_and_plots_and_an_edit_reruns_only_what_reads_it(
        workdir, tmp_path):
    result = snakemake(workdir, "--cores", "2", f"{BASE}/curve.png")
    assert result.returncode == 0, result.stderr[-3000:]
    base = workdir / BASE
    # Maps: one array per attn2 site, (sample, head, word, y, x), opened by xarray.
    store = xr.open_zarr(base / "held-out/shard-000/maps.zarr", consolidated=False)
    sites = [name for name in store.data_vars if name.endswith("attn2")]
    assert len(sites) == 7 and store[sites[0]].dims[:3] == ("sample", "head", "word")
    assert store.attrs["kind"] == "head-maps" and store.attrs["slots"] == ["shape", "color"]
    assert store.sizes["sample"] == 12  # 3 held-out prompts x 4
    train = pd.read_csv(base / "train/shard-000/samples.csv")
    held = pd.read_csv(base / "held-out/shard-000/samples.csv")
    assert len(train) == 24 and not set(train["seed"]) & set(held["seed"])
    assert not set(train["prompt"]) & set(held["prompt"])  # held-out prompts never fit heads

    relevance = pd.read_csv(base / "relevance.csv")
    assert set(relevance["relevance"]) == {"hrv", "oracle", "agreement", "concentration",
                                           "stability"}
    assert len(relevance) == 5 * 2 * 48  # sources x words x heads (DAAM's sites: no mid)
    table = pd.read_csv(base / "table.csv")
    for column in ("split", "word", "method", "relevance", "k", "tau", "miou", "miou_low",
                   "miou_high", "n", "diff", "diff_low", "diff_high", "sites"):
        assert column in table.columns
    held_rows = table[table["split"] == "held-out"]
    assert set(held_rows["method"]) == {"all", "topk", "bottom-k", "random-k"}
    words = held_rows["word"] != "pooled"
    assert (held_rows["n"][words] == 12).all() and (held_rows["n"][~words] == 24).all()
    assert set(table["sites"]) == {"DAAM's sites: no mid block, no map of factor 8 "
                                   "(castorini/daam 0.2)"}
    assert ((held_rows["miou_low"] <= held_rows["miou"])
            & (held_rows["miou"] <= held_rows["miou_high"])).all()
    oracle = held_rows[(held_rows["method"] == "topk") & (held_rows["relevance"] == "oracle")]
    worst = held_rows[(held_rows["method"] == "bottom-k") & (held_rows["relevance"] == "oracle")]
    assert oracle["miou"].mean() > worst["miou"].mean()  # the most relevant heads see it
    record = json.loads((base / "table.json").read_text())
    assert {c["word"] for c in record["label_free_choice"]} == {"shape", "color", "pooled"}
    for name in ("curve", "tau", "overlays", "relevance", "misread"):
        assert (base / f"{name}.png").stat().st_size > 0
    assert list(pd.read_csv(base / "misread.csv").columns)[:4] == ["sample", "seed", "prompt",
                                                                  "word"]

    # Thresholds and head counts are read by the evaluation and the plots only.
    assert plan(workdir, tmp_path, "concepts:\n  objects:\n    head_maps: {taus: [0.35]}\n") \
        == {"evaluate_head_maps": 1, "plot_head_maps": 1, "total": 2}
    for edit in ("{ks: [3, 0.5]}", "{curve_points: 6}", "{seed: 1}"):
        assert plan(workdir, tmp_path, f"concepts:\n  objects:\n    head_maps: {edit}\n") \
            == {"evaluate_head_maps": 1, "plot_head_maps": 1, "total": 2}, edit
    # The oracle's threshold changes the relevance too; a held-out count, that split's maps.
    assert plan(workdir, tmp_path, "concepts:\n  objects:\n    head_maps: {oracle_tau: 0.5}\n") \
        == {"score_head_relevance": 1, "evaluate_head_maps": 1, "plot_head_maps": 1, "total": 3}
    assert plan(workdir, tmp_path, "concepts:\n  objects:\n    head_maps: "
                "{held_out_samples_per_prompt: 5}\n") \
        == {"capture_head_maps": 1, "evaluate_head_maps": 1, "plot_head_maps": 1, "total": 3}
    # Resources are the scheduler's: nothing reruns.
    assert plan(workdir, tmp_path, "models:\n  toy:\n    resources: {runtime: 999}\n") == {}


def test_the_sd15_head_map_config_plans_gpu_capture_and_refuses_a_missing_mask_folder(
        workdir, tmp_path):
    """configs/sd15-head-maps.yaml: SD1.5 maps of the user's prompts against the masks they
    draw. With the mask folder present it plans GPU capture shards; without it, the run
    stops at start naming the key."""
    target = "results/sd15/animals/head-maps/curve.png"
    args = ("--configfile", str(TEST_CONFIG), "configs/sd15-head-maps.yaml", "-n", "--", target)
    refused = snakemake(workdir, *args)
    assert refused.returncode != 0
    assert "concepts.animals.head_maps.masks.path: no folder 'data/head-maps/sd15-animals'" \
        in refused.stdout + refused.stderr
    (workdir / "data/head-maps/sd15-animals").mkdir(parents=True)
    result = snakemake(workdir, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert job_counts(out) == {"capture_head_maps": 4, "capture_train_head_maps": 4,
                               "score_head_relevance": 1, "evaluate_head_maps": 1,
                               "plot_head_maps": 1, "total": 11}
    capture = out.split("rule capture_train_head_maps:")[1].split("rule ")[0]
    assert "gpu=1" in capture and "slurm_partition=gpu" in capture


@pytest.mark.slow
def test_the_documented_sd15_recipe_runs_on_tiny_sd15_with_a_mask_folder(workdir):
    """docs/head-maps.md's two steps with configs/sd15-head-maps.yaml as a user runs them,
    on tiny SD1.5 (2 shards here): generate every shard of both splits, draw a mask per
    image and slot at the image's size (all but one: an unannotated pair is not scored),
    then the table and plots."""
    import numpy as np
    from PIL import Image

    base = "results/tiny-sd15/animals/head-maps"
    masks = workdir / "data/head-maps/sd15-animals"
    masks.mkdir(parents=True)  # the folder must exist at start (docs: mkdir -p)
    fewer = workdir / "fewer.yaml"  # the recipe's steps on fewer images: 2 per prompt
    fewer.write_text("concepts:\n  animals:\n    head_maps: {train_samples_per_prompt: 2, "
                     "stability_groups: 2, held_out_samples_per_prompt: 2}\n")
    overlay = ("--configfile", str(TEST_CONFIG), "configs/sd15-head-maps.yaml", str(fewer))
    step1 = [f"{base}/{split}/shard-{k:03d}/samples.csv" for split in ("train", "held-out")
             for k in range(2)]
    result = snakemake(workdir, "--cores", "2", *overlay, "--", *step1)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pd.concat([pd.read_csv(workdir / path) for path in step1])
    assert len(rows) == 9 * 2 + 3 * 2  # train and held-out prompts x their samples
    first = workdir / step1[0]
    size = Image.open(first.parent / pd.read_csv(first)["image"].iloc[0]).size[::-1]
    for n, seed in enumerate(rows["seed"]):
        for slot in ("animal", "furniture"):
            if n == 0 and slot == "furniture":
                continue  # one train pair left unannotated
            mask = np.zeros(size, np.uint8)
            mask[:, : size[1] // 2] = 255
            Image.fromarray(mask).save(masks / f"{seed}-{slot}.png")
    result = snakemake(workdir, "--cores", "2", *overlay, "--", f"{base}/curve.png")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(workdir / base / "table.csv")
    n = table[table["method"] == "all"].groupby(["split", "word"])["n"].max().to_dict()
    assert n == {("held-out", "animal"): 6, ("held-out", "furniture"): 6,
                 ("held-out", "pooled"): 12, ("train", "animal"): 18,
                 ("train", "furniture"): 17, ("train", "pooled"): 35}
    for name in ("curve", "tau", "overlays", "relevance"):
        assert (workdir / base / f"{name}.png").stat().st_size > 0


@pytest.mark.slow
def test_joint_attention_head_maps_on_tiny_flux_to_their_table(workdir):
    """FLUX's word maps (its double-stream blocks' joint attention) through the same study:
    capture into the same store, relevance without HRV (refused at start, in one sentence,
    where a study asks for it), evaluation against a mask folder, the table and plots; a
    study image is the plain pipeline's image of its seed, bit for bit."""
    import numpy as np
    from PIL import Image

    from icm.generation.samples import Sample
    from icm.generation.shard import SamplerSettings, generate_images
    from icm.models.loading import ModelSpec, load_pipeline

    base = "results/tiny-flux/jobs/head-maps"
    masks = workdir / "data/head-maps/flux-jobs"
    masks.mkdir(parents=True)
    study = workdir / "flux-study.yaml"
    study.write_text(
        "concepts:\n  jobs:\n    head_maps:\n"
        "      template: a {style} of a {who}\n"
        "      slots: {style: [photo, portrait], who: [doctor, nurse, man, woman]}\n"
        "      held_out: [a photo of a nurse, a portrait of a man]\n"
        "      train_samples_per_prompt: 2\n      held_out_samples_per_prompt: 2\n"
        "      stability_groups: 2\n      masks: {type: folder, path: data/head-maps/flux-jobs}\n"
        "      relevance: [oracle, agreement, concentration, stability]\n"
        "      ks: [1, 0.5]\n")
    overlay = ("--configfile", str(TEST_CONFIG), str(study))
    hrv = workdir / "hrv.yaml"
    hrv.write_text("concepts: {jobs: {head_maps: {relevance: [hrv, oracle]}}}\n")
    refused = snakemake(workdir, *overlay, str(hrv), "-n", "--", f"{base}/curve.png")
    assert refused.returncode != 0
    assert "concepts.jobs.head_maps.relevance: ['hrv'] on tiny-flux: HRV's concept-word " \
           "voting needs cross-attention" in refused.stdout + refused.stderr
    step1 = [f"{base}/{split}/shard-000/samples.csv" for split in ("train", "held-out")]
    result = snakemake(workdir, "--cores", "2", *overlay, "--", *step1)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pd.concat([pd.read_csv(workdir / path) for path in step1])
    assert len(rows) == 6 * 2 + 2 * 2
    store = xr.open_zarr(workdir / f"{base}/train/shard-000/maps.zarr")
    assert "joint" in store.attrs["maps"]
    assert sorted(store.data_vars) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    first = workdir / step1[0]
    image = np.asarray(Image.open(first.parent / pd.read_csv(first)["image"].iloc[0]))
    for n, seed in enumerate(rows["seed"]):
        for slot in ("style", "who"):
            mask = np.zeros(image.shape[:2], np.uint8)
            half = slice(None, image.shape[1] // 2) if slot == "who" else \
                slice(image.shape[1] // 2, None)
            mask[:, half] = 255
            Image.fromarray(mask).save(masks / f"{seed}-{slot}.png")
    result = snakemake(workdir, "--cores", "2", *overlay, "--", f"{base}/curve.png")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(workdir / base / "table.csv")
    assert set(table["relevance"].dropna()) >= {"oracle", "agreement"}
    assert (table["sites"] == "DAAM's sites: no mid block, no map of factor 8 (castorini/daam "
            "0.2); every joint-attention site (DAAM has no rule for them)").all()
    assert table["miou"].notna().all()
    for name in ("curve", "tau", "overlays", "relevance"):
        assert (workdir / base / f"{name}.png").stat().st_size > 0
    # The first train image, generated again without any hook: the same pixels.
    row = pd.read_csv(first).iloc[0]
    config = {"family": "flux", "dtype": "float32", "steps": 4, "guidance_scale": 3.5,
              "resolution": 16}
    spec = ModelSpec.from_config("tiny-flux", {**config,
                                               "source": str(workdir / "results/models/tiny-flux")})
    pipe = load_pipeline(spec, "cpu")
    sample = Sample(int(row["sample"]), int(row["prompt_index"]), int(row["repeat"]),
                    row["prompt"], int(row["seed"]))
    plain = generate_images(pipe, [sample], SamplerSettings.of(spec))[0]
    assert np.array_equal(np.asarray(plain), image)


def test_generic_hrv_prompts_plan_vote_jobs_whose_votes_relevance_reads(workdir, tmp_path):
    """With `hrv_prompts`, HRV's votes come from jobs of their own, one per shard, and the
    relevance job reads their files instead of the train split's; without, none is planned."""
    assert "count_head_votes" not in plan(workdir, tmp_path, "{}\n")
    jobs = plan(workdir, tmp_path, "concepts:\n  objects:\n    head_maps: {hrv_prompts: "
                "[a shape, a thing, a picture, a drawing], hrv_samples_per_prompt: 4}\n")
    assert jobs["count_head_votes"] == jobs["capture_train_head_maps"]
    path = tmp_path / "edit.yaml"  # the overlay plan() wrote
    result = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(path), "-n", "--",
                       f"{BASE}/relevance.csv")
    relevance = (result.stdout + result.stderr).split("rule score_head_relevance:")[1]
    relevance = relevance.split("rule ")[0]
    assert f"{BASE}/hrv-votes/shard-000/votes.safetensors" in relevance
    assert "train/shard-000/votes.safetensors" not in relevance
