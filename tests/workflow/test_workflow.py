"""The Snakemake workflow, run for real in a temporary copy of the repository."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from workflow_helpers import TEST_CONFIG, job_counts, snakemake


@pytest.mark.parametrize(("model", "shards"), [("sd15", 4), ("sdxl", 8), ("sana", 8),
                                               ("flux", 16)])
def test_dry_run_plans_the_whole_dag_with_gpu_jobs(workdir, model, shards):
    result = snakemake(workdir, "-n", f"results/{model}/gender/table.csv")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    jobs = job_counts(out)
    assert jobs["generate_images"] == shards  # the model's n_shards
    for stage in ("merge_samples", "label_images", "fit_probes", "rank_sites", "collect_table",
                  "label_specific_images", "fit_specific_probes"):
        assert jobs[stage] == 1
    assert jobs["generate_specific_images"] == shards  # for icm-specific's directions
    # Every family trains the four LoRA variants but FLUX, which has no `cross` selection.
    assert jobs.get("finetune_lora", 0) == (3 if model == "flux" else 4)
    rules = ["generate_images", "generate_specific_images"] + (
        ["finetune_lora", "generate_finetuned_images"] if jobs.get("finetune_lora") else [])
    for rule in rules:
        generation = out.split(f"rule {rule}:")[1].split("rule ")[0]
        assert "gpu=1" in generation, rule


def test_the_paper_evidence_targets_plan_gpu_jobs_for_sd15(workdir):
    """Table 3 (explicit vs implicit) and appendix H (prompt injection) for SD1.5's gender:
    the class-specific and injected generations are GPU jobs."""
    result = snakemake(workdir, "-n", "results/sd15/gender/explicit_vs_implicit.csv",
                       "results/sd15/gender/injection/ranking.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    jobs = job_counts(out)
    assert jobs["inject_prompts"] == 1 and jobs["compare_explicit_implicit"] == 1
    for rule in ("generate_specific_images", "inject_prompts"):
        assert "gpu=1" in out.split(f"rule {rule}:")[1].split("rule ")[0], rule


#: The paper's experiments as config.yaml configures them: (model, concept, the variants its
#: table must hold beyond the automatic ones, extra targets).
PAPER_EXPERIMENTS = [
    ("sd15", "gender", ["paper", "h-space", "lora-top"], []),
    ("sd15", "age", ["paper", "h-space", "lora-top"], []),
    ("sd15", "race", ["paper", "h-space", "lora-top"], []),
    ("sdxl", "president", [], ["results/sdxl/president/target-obama/table.csv"]),
    ("sana", "gender", ["lora-top"], []),
    ("flux", "gender", ["lora-top"], []),
]


@pytest.mark.parametrize(("model", "concept", "variants", "extra"), PAPER_EXPERIMENTS)
def test_each_paper_experiment_plans_its_table_with_gpu_jobs(workdir, model, concept,
                                                             variants, extra):
    result = snakemake(workdir, "-n", f"results/{model}/{concept}/table.csv", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    for variant in ["original", "icm", *variants]:
        assert f"results/{model}/{concept}/metrics/{variant}.json" in out, variant
    for rule in ("generate_images", "steer_images"):
        assert "gpu=1" in out.split(f"rule {rule}:")[1].split("rule ")[0], rule
    if "paper" in variants:  # the hand-picked sites need no calibration
        assert "calibration/paper.alpha.json" not in out
    if concept == "president":  # Table 5's rows only; its "all layers" are self-attention
        assert "metrics/cross.json" not in out and "metrics/paper.json" not in out
        assert "metrics/all-self.json" in out and "metrics/all.json" not in out
        assert "probes/rest-obama/" in out  # the direction toward Obama
    else:  # an opt-in variant runs only where a concept lists it
        assert "all-self" not in out


@pytest.mark.parametrize(("model", "concept", "hub_id"), [
    ("sd15", "gender", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("sd15", "race", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ("sdxl", "president", "stabilityai/stable-diffusion-xl-base-1.0"),
    ("sana", "gender", "Efficient-Large-Model/Sana_1600M_1024px_diffusers"),
    ("flux", "gender", "black-forest-labs/FLUX.1-dev")])
def test_missing_weights_fail_fast_with_a_clear_message(workdir, model, concept, hub_id):
    result = snakemake(workdir, "--cores", "1",
                       f"results/{model}/{concept}/generation/samples.csv")
    assert result.returncode != 0
    logs = list((workdir / f"logs/{model}/{concept}/generation").glob("shard-*.log"))
    assert len(logs) == 1  # the first failing job stops the run
    log = logs[0].read_text()
    assert "ModelNotAvailableError" in log
    assert hub_id in log
    assert "config.yaml" in log
    assert not (workdir / f"results/{model}").exists() or not any(
        p.is_file() for p in (workdir / f"results/{model}").rglob("*"))


@pytest.mark.slow
def test_tiny_generation_end_to_end(workdir):
    target = "results/tiny-sd15/probe-test/generation/samples.csv"
    result = snakemake(workdir, "--cores", "2", target)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((workdir / target).open()))
    assert [int(r["sample"]) for r in rows] == list(range(6))
    assert [r["shard"] for r in rows] == ["0"] * 4 + ["1"] * 2  # whole batches of 2
    stores = [workdir / f"results/tiny-sd15/probe-test/generation/shard-{k:03d}/activations.zarr"
              for k in range(2)]
    ds = xr.concat([xr.open_zarr(s) for s in stores], dim="sample")
    site = "mid_block.attentions.0.transformer_blocks.0.attn1"
    # PNDM, as SD1.5 ships it: 4 steps are 5 loop iterations, the second timestep repeated.
    assert ds[site].shape == (6, 5, 64) and not np.isnan(ds[site].values).any()
    assert ds.attrs["model"]["name"] == "tiny-sd15"
    assert ds.attrs["scheduler"]["class"] == "PNDMScheduler"
    assert ds.attrs["denoising_steps"] == 5 and ds.attrs["num_train_timesteps"] == 1000
    assert list(ds["timestep"].values) == [751, 501, 501, 251, 1]
    assert (workdir / "logs/tiny-sd15/probe-test/generation/shard-001.log").exists()

    # Shard 1's last batch (samples 4, 5), regenerated through the same loading code with the
    # job's CPU threads (the model's resources.threads: 2), is bit-identical. The thread count
    # takes part: on some CPUs, 1 and 2 threads reduce in another order and a pixel moves by 1.
    import torch

    from icm.generation.samples import plan_samples
    from icm.generation.shard import SamplerSettings, generate_images
    from icm.models.loading import ModelSpec, load_pipeline

    spec = ModelSpec.from_config("tiny-sd15", {
        "family": "sd15", "source": str(workdir / "results/models/tiny-sd15"),
        "dtype": "float32", "steps": 4, "guidance_scale": 7.5, "resolution": 32})
    pipe = load_pipeline(spec, device="cpu")
    samples = plan_samples(["a photo of a person", "a portrait of a man"], 3, base_seed=0)[4:]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        images = generate_images(pipe, samples, SamplerSettings(4, 7.5, 32))
    finally:
        torch.set_num_threads(threads)
    for row, image in zip(rows[4:], images):
        stored = Image.open(workdir / "results/tiny-sd15/probe-test/generation" / row["image"])
        assert np.array_equal(np.asarray(stored), np.asarray(image))

    again = snakemake(workdir, "--cores", "2", target)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_toy_color_through_the_table(workdir, tmp_path):
    """Stages 1-5 on the committed toy model: the colour choice is found where it is read,
    steering it changes only steered batches, and the table compares the variants."""
    import pandas as pd

    # A fresh clone's file times are arbitrary: make the committed weights look oldest, which
    # is how a checkout can leave them, and check that nothing plans to retrain them.
    for path in (workdir / "resources").rglob("*"):
        os.utime(path, (0, 0))
    plan = snakemake(workdir, "--cores", "2", "-n", "results/toy/color/table.csv")
    assert "train_toy" not in plan.stdout + plan.stderr
    result = snakemake(workdir, "--cores", "2", "results/toy/color/table.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    base = workdir / "results/toy/color"
    labels = pd.read_csv(base / "labels.csv", keep_default_na=False)
    assert len(labels) == 160 and set(labels["label"]) <= {"red", "green", "blue"}
    for pair in ("red-green", "red-blue"):  # the test config's pairs
        scores = pd.read_csv(base / f"probes/{pair}/scores.csv")
        assert len(scores) == 15 * 20 and (base / f"probes/{pair}/heatmap.png").exists()
    ranking = pd.read_csv(base / "ranking.csv")
    assert list(ranking["rank"]) == list(range(1, 16))  # 7 attn1, 7 attn2, the bottleneck
    assert ranking.iloc[0]["mean_test_acc"] > 0.9  # the colour is linearly readable somewhere
    by_kind = pd.read_csv(base / "ranking_by_kind.csv").set_index("kind")
    assert by_kind.loc["attn1", "sites"] == by_kind.loc["attn2", "sites"] == 7

    table = pd.read_csv(base / "table.csv").set_index("variant")
    assert list(table.index) == ["original", "icm", "cross", "all", "random", "worst"]
    assert (table["n_images"] == 40).all() and table["FD"].notna().all()
    assert np.isnan(table.loc["original", "CLIP-I"]) and table.loc["icm", "CLIP-I"] <= 1
    assert "toy features" in table.loc["icm", "FID_backend"]
    # The oracle labels only: FD is the labels' FD; the paper's (cos + 1) / 2 for CLIP-I.
    assert (table["FD_labels"] == table["FD"]).all() and table["FD_probabilities"].isna().all()
    assert np.isclose(table.loc["icm", "CLIP-I_paper"], (table.loc["icm", "CLIP-I"] + 1) / 2)
    assert table["CLIP-T_paper"].isna().all()
    # Each steering variant's alpha came from its calibration sweep, on seeds of its own.
    tradeoff = pd.read_csv(base / "calibration/tradeoff.csv")
    assert set(tradeoff["variant"]) == {"icm", "cross", "all", "random", "worst"}
    assert (base / "calibration/tradeoff.png").exists()
    icm_alpha = json.loads((base / "calibration/icm.alpha.json").read_text())
    assert table.loc["icm", "alpha"] == icm_alpha["alpha"] in set(tradeoff["alpha"])
    # Each pair's direction steers the three best self-attention sites of its own probes.
    by_pair = pd.read_csv(base / "ranking_by_pair.csv")
    record = json.loads((base / "steer/icm/shard-000/steering.json").read_text())
    assert record["sites_per"] == "pair" and set(record["sites"]) == set(by_pair["pair"])
    for pair, sites in record["sites"].items():
        own = by_pair[(by_pair["pair"] == pair) & (by_pair["kind"] == "attn1")]
        assert sites == list(own.sort_values("rank")["site"][:3])
    assert record["sites_by_target"]["green"] == record["sites"]["red-green"]
    assert all(cell.count(";") >= 2 for cell in table.loc["icm", "layers"].split(" | "))
    # Steering starts where the ranking's automatic rule says: the first step whose selected
    # probes beat chance significantly, Bonferroni over the 20 steps.
    meta = json.loads((base / "probes/red-green/directions.json").read_text())
    chosen = json.loads((base / "ranking.json").read_text())
    assert chosen["start_rule"].startswith("auto") and record["start_rule"] == chosen["start_rule"]
    assert chosen["start_baseline"] == "chance" and chosen["start_correction"] == "bonferroni"
    assert record["start_step"] == chosen["start_step"] == ranking["from_step"].iloc[0]
    assert chosen["pvalues"][chosen["start_step"]] < 0.01 / 20
    assert all(p >= 0.01 / 20 for p in chosen["pvalues"][:chosen["start_step"]])
    assert record["target_draw"] == "quasi"  # the toy's, named
    assert "CLIP-I >= 0.85 ((cos + 1) / 2)" in icm_alpha["alpha_rule"]
    assert record["timesteps"] == meta["timesteps"] and len(meta["timesteps"]) == 20
    scores = pd.read_csv(base / "probes/red-green/scores.csv")
    assert (scores["gain"] == scores["test_acc"] - scores["prompt_acc"]).all()
    # Evaluated on samples the probes never saw: a seed stream of its own.
    generated = pd.read_csv(base / "generation/samples.csv")
    for variant in table.index:
        seeds = pd.concat([pd.read_csv(p) for p in (base / "steer" / variant).glob(
            "shard-*/samples.csv")])["seed"]
        assert not set(seeds) & set(generated["seed"]), variant
    assert (base / "grid.png").exists() and (base / "metrics.png").exists()
    # The cost plan counted the images this run made, stage by stage (icm.costs).
    from icm.costs.plan import load_config, plan, planned_jobs, rule_stages

    jobs = planned_jobs(["results/toy/color/table.csv"], [str(TEST_CONFIG)], workdir)
    costs = plan(jobs, load_config([str(TEST_CONFIG)], workdir), rule_stages(workdir))
    for stage, pattern in (("generation", "generation/shard-*/samples.csv"),
                           ("steering", "steer/*/shard-*/samples.csv")):
        made = sum(len(pd.read_csv(path)) for path in base.glob(pattern))
        assert costs[stage]["images"] == made, stage
    swept = tradeoff.groupby("variant")["n_images"]
    assert swept.nunique().eq(1).all() and tradeoff["n_images"].nunique() == 1
    calibration = load_config([str(TEST_CONFIG)], workdir)["steering"]["calibration"]
    alphas = len(calibration["alphas"]) + calibration["max_doublings"]  # alpha 0 apart
    per_alpha = int(tradeoff["n_images"].iloc[0])
    assert costs["calibration"]["images"] == (alphas * swept.ngroups + 1) * per_alpha
    assert tradeoff.groupby("variant").size().max() <= alphas + 1
    # Alpha 0 is one set of images for every variant: the same row in every sweep.
    zero = tradeoff[tradeoff["alpha"] == 0].drop(columns="variant")
    assert len(zero) == swept.ngroups and len(zero.drop_duplicates()) == 1
    # One-target tables (paper Table 5): the same seeds in every variant, none counted twice.
    green = pd.read_csv(base / "target-green/table.csv").set_index("variant")
    assert list(green.index) == list(table.index) and green["n_images"].nunique() == 1
    assert green.loc["original", "flip_rate"] == 0 and green.loc["icm", "n_steered"] > 0
    assert green.loc["original", "success_rate"] == green.loc["original", "already_target"]
    assert (green["n_eligible"] <= green["n_images"]).all()
    assert record["alpha_unit"] == "spread"
    # Same seeds everywhere: an unsteered batch (target red, which is only ever a negative
    # in the test config's pairs, so it has no direction) is the original image bit for bit;
    # a steered one differs.
    original = pd.read_csv(base / "steer/original/shard-000/samples.csv")
    icm = pd.read_csv(base / "steer/icm/shard-000/samples.csv")
    assert list(icm["seed"]) == list(original["seed"])
    assert record["pushes"]["red"] is None and record["sites_by_target"]["red"] == []
    assert set(icm.loc[~icm["steered"], "target"]) == {"red"} and icm["steered"].any()
    for (_, a), (_, b) in zip(original.iterrows(), icm.iterrows()):
        pixels = [np.asarray(Image.open(base / "steer" / v / "shard-000" / r["image"]))
                  for v, r in (("original", a), ("icm", b))]
        assert np.array_equal(*pixels) != bool(b["steered"])

    # Fixing one variant's alpha plans its steering and metrics, the grid, the table and the
    # trade-off plot (which no longer shows it); no other variant recalibrates.
    again = snakemake(workdir, "--cores", "2", "-n", "results/toy/color/table.csv")
    assert "Nothing to be done" in again.stdout + again.stderr
    edit = tmp_path / "alpha.yaml"
    edit.write_text("concepts: {color: {steering: {alpha: {icm: 7}}}}\n")
    plan = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(edit), "--cores", "2",
                     "-n", "results/toy/color/table.csv")
    out = plan.stdout + plan.stderr
    jobs = job_counts(out)
    assert jobs == {"steer_images": 1, "compute_metrics": 1, "plot_grid": 1,
                    "collect_table": 1, "plot_tradeoff": 1, "tabulate_target": 3,
                    "total": 8}, out[-2000:]
    assert "variant=icm" in out and "variant=cross" not in out
    check_specific_prompts(workdir, tmp_path)  # first: check_what_reruns replaces weights
    check_paper_and_h_space(workdir, tmp_path)
    check_what_reruns(workdir, tmp_path)


def check_specific_prompts(workdir, tmp_path):
    """On the finished toy table: the class-specific prompts' generation, Table 3's
    explicit-vs-implicit probes and Table 4's variant steered with their directions."""
    import pandas as pd

    base = workdir / "results/toy/color"
    overlay = tmp_path / "specific.yaml"
    overlay.write_text("concepts: {color: {steering: {variants: [original, icm, icm-specific, "
                       "lora-top], alpha: {icm-specific: 4}}}}\n")
    targets = ["results/toy/color/explicit_vs_implicit.csv",
               "results/toy/color/metrics/icm-specific.json",
               "results/toy/color/injection/ranking.csv",
               "results/toy/color/metrics/lora-top.json"]
    plan = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(overlay), "--cores", "2",
                     "-n", *targets)
    assert job_counts(plan.stdout + plan.stderr) == {
        "generate_specific_images": 1, "merge_specific_samples": 1, "label_specific_images": 1,
        "fit_specific_probes": 2, "compare_explicit_implicit": 1, "steer_images": 1,
        "compute_metrics": 2, "inject_prompts": 1, "label_injected_images": 1,
        "rank_injection": 1, "finetune_lora": 1, "generate_finetuned_images": 1,
        "total": 14}, (plan.stdout + plan.stderr)[-2000:]
    result = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(overlay), "--cores", "2",
                       *targets)
    assert result.returncode == 0, result.stderr[-3000:]
    general = pd.read_csv(base / "generation/samples.csv")
    specific = pd.read_csv(base / "specific/generation/samples.csv")
    assert len(specific) == 12 * 14 and not set(specific["seed"]) & set(general["seed"])
    labels = pd.read_csv(base / "specific/labels.csv", keep_default_na=False)
    assert set(labels["prompt_class"]) == {"red", "green", "blue"}
    # The toy model paints the colour it is asked for: the oracle agrees on most images.
    assert (labels["label"] == labels["prompt_class"]).mean() > 0.8
    table = pd.read_csv(base / "explicit_vs_implicit.csv")
    assert len(table) == 12 and (table["n_explicit"] == table["n_implicit"]).all()
    assert table["test_acc"].between(0, 1).all() and (table["chance"] == 0.5).all()
    assert (base / "explicit-vs-implicit/heatmap.png").exists()
    record = json.loads((base / "steer/icm-specific/shard-000/steering.json").read_text())
    general_icm = json.loads((base / "steer/icm/shard-000/steering.json").read_text())
    assert record["sites"] == general_icm["sites"]  # the same selection and start ...
    assert record["start_step"] == general_icm["start_step"]
    assert record["directions"] == "specific"  # ... with other directions
    metrics = json.loads((base / "metrics/icm-specific.json").read_text())
    assert metrics["n_images"] == 40
    # Injection: the toy's 7 cross-attention sites x 3 classes on 4 prompts x 1 seed, plus
    # each seed uninjected; at some site the injected "a red shape" (green, blue) flips most.
    injected = pd.read_csv(base / "injection/samples.csv", keep_default_na=False)
    assert len(injected) == 4 * (1 + 7 * 3)
    flips = pd.read_csv(base / "injection/flips.csv")
    assert len(flips) == 21 and flips.groupby("site")["flip_rate"].mean().max() > 0.5
    ranking = pd.read_csv(base / "injection/ranking.csv")
    assert list(ranking["injection_rank"]) == list(range(1, 8))
    assert set(ranking["site"]) == {s for s in pd.read_csv(base / "ranking.csv")["site"]
                                    if s.endswith("attn2")}
    assert "spearman_rho" in json.loads((base / "injection/correlation.json").read_text())
    # LoRA on the union of each pair's three best attn1 sites (as steering selects them;
    # the paper's race LoRA), from the specific images, classes balanced.
    trained = json.loads((base / "finetune/lora-top/training.json").read_text())
    by_pair = pd.read_csv(base / "ranking_by_pair.csv").query("kind == 'attn1'")
    union = [s for pair in ("red-green", "red-blue")
             for s in by_pair[by_pair["pair"] == pair].sort_values("rank")["site"][:3]]
    assert trained["sites"] == list(dict.fromkeys(union))
    assert trained["sites_from"] == "the union of each pair's selection"
    per_class = trained["training_set"]["per_class"]
    assert set(per_class) == {"red", "green", "blue"} and len(set(per_class.values())) == 1
    assert trained["training_set"]["prompt_pairing"]["a red circle"] == "a circle"
    assert trained["accelerations"] == {"autocast": None, "gradient_checkpointing": False}
    lora = json.loads((base / "steer/lora-top/shard-000/steering.json").read_text())
    assert lora["method"] == "lora" and lora["sites"] == trained["sites"]
    assert json.loads((base / "metrics/lora-top.json").read_text())["n_images"] == 40
    lora_seeds = pd.read_csv(base / "steer/lora-top/shard-000/samples.csv")["seed"]
    assert list(lora_seeds) == list(pd.read_csv(
        base / "steer/original/shard-000/samples.csv")["seed"])  # the same evaluation seeds
    # More specific images rerun what reads them, never the general prompts' stages.
    more = tmp_path / "more.yaml"
    more.write_text("concepts: {color: {specific_samples_per_prompt: 16}}\n")
    plan = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(overlay), str(more),
                     "--cores", "2", "-n", *targets)
    assert job_counts(plan.stdout + plan.stderr) == {
        "generate_specific_images": 1, "merge_specific_samples": 1, "label_specific_images": 1,
        "fit_specific_probes": 2, "compare_explicit_implicit": 1, "steer_images": 1,
        "finetune_lora": 1, "generate_finetuned_images": 1, "compute_metrics": 2, "total": 11}


TOY_EXPLICIT = """concepts:
  color:
    steering:
      variants: [original, icm, paper, h-space]
      alpha: {h-space: 8}    # fixed: the tiny UNets' h-space rows calibrate theirs
      explicit:
        toy:
          start_step: 0
          targets:
            green: {sites: [up_blocks.1.attentions.1.transformer_blocks.0.attn1,
                            SECOND], alpha: 2}
            blue: {sites: [down_blocks.1.attentions.0.transformer_blocks.0.attn1], alpha: 3}
"""


def check_paper_and_h_space(workdir, tmp_path):
    """On the finished toy table: the `paper` variant steers each target with its own listed
    sites and signed strength from its own start (no calibration, no ranking), the `h-space`
    row steers the bottleneck (alpha 8 spreads), and a misspelt site stops the run
    naming the variant and the site."""
    import pandas as pd

    base = workdir / "results/toy/color"
    overlay = tmp_path / "paper.yaml"
    overlay.write_text(TOY_EXPLICIT.replace(
        "SECOND", "up_blocks.1.attentions.0.transformer_blocks.0.attn1"))
    result = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(overlay), "--cores", "2",
                       "results/toy/color/table.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (base / "calibration/paper.alpha.json").exists()
    paper = json.loads((base / "steer/paper/shard-000/steering.json").read_text())
    assert paper["selection"] == "explicit" and paper["start_step"] == 0
    assert paper["strengths"] == {"red": None, "green": 2.0, "blue": 3.0}
    assert paper["sites_by_target"]["blue"] == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1"]
    assert len(paper["sites_by_target"]["green"]) == 2 and paper["sites_by_target"]["red"] == []
    rows = pd.read_csv(base / "steer/paper/shard-000/samples.csv")
    assert set(rows.loc[rows["steered"], "target"]) == {"green", "blue"}
    assert not rows.loc[rows["target"] == "red", "steered"].any()
    bottleneck = json.loads((base / "steer/h-space/shard-000/steering.json").read_text())
    assert bottleneck["sites_by_target"]["green"] == ["mid_block"]
    assert bottleneck["alpha"] == 8 and bottleneck["alpha_unit"] == "spread"
    table = pd.read_csv(base / "table.csv").set_index("variant")
    assert list(table.index) == ["original", "icm", "paper", "h-space"]
    assert table.loc["paper", "alpha"] == "green 2; blue 3"
    assert table.loc["h-space", "layers"] == "mid_block"
    # The paper variant's steered batches move toward their target: more green and blue
    # than the original on the same seeds.
    labelled = {v: pd.read_csv(base / f"metrics/{v}.labels.csv") for v in ("original", "paper")}
    toward = {v: (t.loc[t["target"].isin(["green", "blue"]), "label"]
                  == t.loc[t["target"].isin(["green", "blue"]), "target"]).mean()
              for v, t in labelled.items()}
    assert toward["paper"] > toward["original"], toward
    # A misspelt site: the steering job stops, naming the variant and the site.
    overlay.write_text(TOY_EXPLICIT.replace("SECOND", "up_blocks.0.attentions.9.attn1"))
    failed = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(overlay), "--cores", "2",
                       "results/toy/color/metrics/paper.json")
    assert failed.returncode != 0
    log = (workdir / "logs/toy/color/steer/paper/shard-000.log").read_text()
    assert "variant paper on toy/color" in log and "'up_blocks.0.attentions.9.attn1'" in log
    assert not (base / "steer/paper/shard-000/images").exists()
    # Back to the test config's table, which the checks after this one start from.
    restored = snakemake(workdir, "--cores", "2", "results/toy/color/table.csv")
    assert restored.returncode == 0, restored.stderr[-3000:]


def check_what_reruns(workdir, tmp_path):
    """On the finished toy table, each edit plans exactly the jobs whose result it changes."""
    target = "results/toy/color/table.csv"

    def plan(overlay: str = "") -> dict[str, int]:
        extra = []
        if overlay:
            (tmp_path / "overlay.yaml").write_text(overlay)
            extra = [str(tmp_path / "overlay.yaml")]
        result = snakemake(workdir, "--configfile", str(TEST_CONFIG), *extra, "--cores", "2",
                           "-n", "--", target)
        assert result.returncode == 0, result.stderr[-3000:]
        return job_counts(result.stdout + result.stderr)

    def edit(path, old, new):
        text = path.read_text()
        path.write_text(text.replace(old, new, 1))
        return text

    # Resources are the scheduler's business; the grid's columns only the grid's.
    assert plan("models: {toy: {resources: {runtime: 99, mem_mb: 5000, threads: 1}}}\n") == {}
    # LoRA's training settings are finetune_lora's alone (this table trains no adapter).
    assert plan("models: {toy: {finetuning: {steps: 5, rank: 2}}}\n") == {}
    assert plan("evaluation: {grid_columns: 4}\n") == {"plot_grid": 1, "collect_table": 1,
                                                        "total": 2}
    # The start is the ranking's and steering's, not the probes'.
    start = plan("probes: {steer_start: 20}\n")
    assert start.get("fit_probes") is None and start["rank_sites"] == 1
    assert start["steer_images"] == 5 and start["compute_metrics"] == 5  # not the original
    # The original steers nothing: an alpha on it is no setting of its.
    assert plan("steering: {variants: {original: {alpha: 3}}}\n") == {}
    # k: the automatic start (through the ranking) and the variants that choose k sites,
    # never the original.
    recalibrated = {"calibrate_steering": 5, "plot_tradeoff": 1, "steer_images": 5,
                    "compute_metrics": 5, "plot_grid": 1, "collect_table": 1,
                    "tabulate_target": 3}
    assert plan("steering: {k: 2}\n") == recalibrated | {"rank_sites": 1, "total": 22}
    # The calibration grid, floor or alpha unit: calibration and what follows it.
    assert plan("steering: {calibration: {alphas: [2, 4]}}\n") == recalibrated | {
        "total": 21}
    assert plan("steering: {calibration: {clip_i_floor: 0.5}}\n") == recalibrated | {
        "total": 21}
    assert plan("steering: {alpha_unit: absolute}\n") == recalibrated | {"total": 21}
    # A new variant (one vector of 5 steps, appendix G) plans only its own jobs and the
    # tables beside them: icm, with the same sites, keeps its params.
    assert plan("steering: {variants: {icm-mean5: {sites: top, alpha: auto, "
                "direction_steps: 5}}}\n"
                "concepts: {color: {steering: {variants: [original, icm, cross, all, random, "
                "worst, icm-mean5]}}}\n") == {
        "calibrate_steering": 1, "plot_tradeoff": 1, "steer_images": 1, "compute_metrics": 1,
        "plot_grid": 1, "collect_table": 1, "tabulate_target": 3, "total": 9}
    # Which targets are tabulated: the table asks for another set, nothing is steered.
    assert plan("concepts: {color: {steering: {targets: [green]}}}\n") == {
        "collect_table": 1, "total": 1}
    # Library code: an edit reruns the jobs that run it; a comment or docstring reruns nothing.
    metrics = workdir / "icm/evaluation/metrics.py"
    original = edit(metrics, "def paired_cosine(", "_EDITED = 1\n\n\ndef paired_cosine(")
    # All four score images: the metrics, the sweeps, their shared alpha 0 and the FID
    # reference's statistics.
    assert plan() == recalibrated | {"compute_metrics": 6, "calibrate_unsteered": 1,
                                     "compute_fid_statistics": 1, "total": 24}
    metrics.write_text(original.replace('"""Evaluation metrics', '"""Metrics of evaluation', 1))
    assert plan() == {}
    hooks = workdir / "icm/hooks/registry.py"
    original = edit(hooks, "class DoubleHookError", "_EDITED = 1\n\n\nclass DoubleHookError")
    hooked = plan()
    assert hooked["generate_images"] == 1 and hooked["steer_images"] == 6
    hooks.write_text(original)
    assert plan() == {}
    # Local files: the feature net's sidecar, a replaced weight file of the model folder.
    # Snakemake compares files under 1 MB by content, larger ones by modification time.
    sidecar = workdir / "resources/models/toy-features.json"
    os.utime(sidecar)
    assert plan() == {}  # touched, same content
    sidecar.write_text(sidecar.read_text() + "\n")
    assert plan() == recalibrated | {"compute_metrics": 6, "calibrate_unsteered": 1,
                                     "compute_fid_statistics": 1, "total": 24}
    weights = workdir / "resources/models/toy/unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes())  # an in-place write, as `git checkout` does
    replaced = plan()
    assert replaced["generate_images"] == 1 and replaced["steer_images"] == 6


def test_probe_site_groups_plan_one_job_per_group_and_a_local_merge(workdir, tmp_path):
    """probes.site_groups: a pair's probes as several jobs (each a share of the sites, a GPU
    job like fit_probes), merged by a local rule into the paths everything else reads."""
    overlay = tmp_path / "groups.yaml"
    overlay.write_text("probes: {site_groups: 4}\n")
    result = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(overlay), "-n", "--",
                       "results/sd15/gender/ranking.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    jobs = job_counts(out)
    assert jobs["fit_probe_group"] == 4 and jobs["merge_probes"] == 1 and "fit_probes" not in jobs
    group = out.split("rule fit_probe_group:")[1].split("rule ")[0]
    assert "probes/woman-man/group-" in group and "gpu=1" in group
    merge = out.split("rule merge_probes:")[1].split("rule ")[0]
    assert "output: results/sd15/gender/probes/woman-man/scores.csv" in merge
    assert "gpu=" not in merge and "slurm_partition" not in merge  # a local rule


@pytest.mark.parametrize(("model", "unet"), [("tiny-sdxl", True), ("tiny-flux", False)])
def test_a_family_without_cross_attention_or_bottleneck_plans_neither_variant(workdir, model,
                                                                             unet):
    result = snakemake(workdir, "-n", f"results/{model}/gender/table.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    for variant in ("cross", "h-space"):
        assert (f"results/{model}/gender/metrics/{variant}.json" in out) == unet
    assert f"results/{model}/gender/metrics/worst.json" in out
    assert "metrics/paper.json" not in out  # gender names the paper's sites for sd15 only
    jobs = job_counts(out)
    # One shard per variant: six with h-space, and icm-specific (gender has specific prompts).
    assert jobs["steer_images"] == (8 if unet else 6)


@pytest.mark.slow
def test_each_tiny_family_runs_the_whole_workflow_offline(workdir, tmp_path):
    """The lit-side concept (pixel labeler, random-weight CLIP) from building each family's
    tiny replica to its table, in one run: SD1.5 (here with its shipped PNDM, two shards),
    SDXL, SANA and FLUX stores are captured, probed, ranked, calibrated and steered through
    the family table; SANA and FLUX train and generate with a LoRA on their top sites (the
    flow objective). The UNets add the h-space row (their bottleneck) and tiny-sd15 the
    hand-picked `paper` variant."""
    import pandas as pd

    from icm.finetuning.lora import OBJECTIVES
    from icm.models.families import FAMILIES, kind_of

    models = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl", "tiny-sana": "sana",
              "tiny-flux": "flux"}
    flow = ("tiny-sana", "tiny-flux")  # the noise objective runs in the toy table test
    # Random weights read nothing beyond chance, so the paper's automatic start would stop
    # the ranking (its error is tested in test_probes.py): a fixed start, as the paper's 15.
    fixed = tmp_path / "fixed-start.yaml"  # ... and a fixed alpha for h-space
    fixed.write_text("probes: {steer_start: 15}\n"
                     "concepts: {lit-side: {steering: {alpha: {h-space: 4}}}}\n")
    result = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(fixed), "--cores", "2",
                       *[f"results/{m}/lit-side/table.csv" for m in models],
                       *[f"results/{m}/lit-side/metrics/lora-top.json" for m in flow])
    assert result.returncode == 0, result.stderr[-3000:]
    for model, name in models.items():
        family, base = FAMILIES[name], workdir / f"results/{model}/lit-side"
        store = xr.open_zarr(base / "generation/shard-000/activations.zarr")
        sites = store.attrs["sites"]
        assert {kind_of(s, family).name for s in sites} == set(family.kinds)
        assert store.attrs["sampler"]["arguments"] == (
            {"use_resolution_binning": False} if name == "sana" else {})
        labels = pd.read_csv(base / "labels.csv", keep_default_na=False)
        assert len(labels) == 64 and set(labels["label"]) == {"left", "right"}
        ranking = pd.read_csv(base / "ranking.csv")
        assert sorted(ranking["site"]) == sorted(sites)  # every site probed and ranked
        table = pd.read_csv(base / "table.csv").set_index("variant")
        expected = {"sd15": ["original", "icm", "h-space", "paper"],
                    "sdxl": ["original", "icm", "h-space"]}.get(name, ["original", "icm"])
        assert list(table.index) == expected, model
        assert (table["n_images"] == 16).all() and table["FD"].notna().all()
        assert table["CLIP-T_backend"].str.contains("random weights").all()
        assert 0 < table.loc["icm", "CLIP-I"] <= 1 + 1e-6
        record = json.loads((base / "steer/icm/shard-000/steering.json").read_text())
        steered = {s for chosen in record["sites"].values() for s in chosen}
        assert len(steered) == 3
        assert {kind_of(s, family).name for s in steered} <= set(family.steer_kinds)
        assert record["alpha"] == json.loads(
            (base / "calibration/icm.alpha.json").read_text())["alpha"]
        # The fixed start and the paper's random draws, each named in steering.json.
        assert record["start_rule"] == "step 15 of 50, mapped by timestep"
        assert record["target_draw"] == "random"
        for target in ("left", "right"):
            assert (base / f"target-{target}/table.csv").exists()
        if "h-space" in expected:  # the bottleneck, steered by the same probes and rule
            record = json.loads((base / "steer/h-space/shard-000/steering.json").read_text())
            assert record["sites_by_target"] == {"left": ["mid_block"], "right": ["mid_block"]}
            assert record["alpha"] == 4 and record["alpha_rule"] == "fixed in config"
            assert not (base / "calibration/h-space.alpha.json").exists()
        if "paper" in expected:  # each target its listed sites and signed strength
            record = json.loads((base / "steer/paper/shard-000/steering.json").read_text())
            assert record["strengths"] == {"left": -6.0, "right": 6.0}
            assert record["sites_by_target"]["right"] == [
                "up_blocks.1.attentions.1.transformer_blocks.0.attn1"]
            # step 20 of 50 is timestep 600: step 1 (501) of PNDM's 751, 501, 501, 251, 1
            assert record["start_step"] == 1 and table.loc["paper", "alpha"] == "left -6; right 6"
            assert record["start_rule"].startswith("explicit: step 20 of 50")
        if model not in flow:
            continue
        # ICM finetuning through the family table: a LoRA on lora-top's sites, trained with
        # the flow objective on the specific prompts' images, generates the evaluation
        # samples on the steering variants' seeds.
        trained = json.loads((base / "finetune/lora-top/training.json").read_text())
        assert trained["objective"] == OBJECTIVES[family.objective], model
        assert len(trained["sites"]) == 3 and trained["training_set"]["images"] > 0
        assert np.isfinite([trained["loss_first"], trained["loss_last"]]).all()
        assert trained["target_modules"] == [f"{s}.{p}" for s in trained["sites"]
                                             for p in family.lora_projections]
        metrics = json.loads((base / "metrics/lora-top.json").read_text())
        assert metrics["n_images"] == 16 and np.isfinite(metrics["FD"])
        seeds = [pd.read_csv(base / f"steer/{v}/shard-000/samples.csv")["seed"].tolist()
                 for v in ("original", "lora-top")]
        assert seeds[0] == seeds[1]


@pytest.mark.slow
def test_train_toy_model_rule_retrains_into_a_loadable_model(workdir, tmp_path):
    """`make toy-model`'s rule, with a tiny budget, trains a loadable model into results/."""
    from icm.models.loading import ModelSpec, load_pipeline

    quick = tmp_path / "quick-train.yaml"
    quick.write_text("toy:\n  train: {steps: 3, batch_size: 4, n_train: 32, warmup_steps: 1}\n")
    result = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(quick), "--cores", "2",
                       "results/models/toy")
    assert result.returncode == 0, result.stderr[-3000:]
    record = (workdir / "results/models/toy/icm_toy.json").read_text()
    assert '"steps": 3' in record
    pipe = load_pipeline(ModelSpec(name="toy", family="toy", dtype="float32",
                                   source=str(workdir / "results/models/toy")), device="cpu")
    assert type(pipe).__name__ == "ToyPipeline"


@pytest.mark.slow
def test_a_killed_shard_leaves_nothing_complete_and_only_it_is_redone(workdir, tmp_path):
    """SIGKILL the whole run while a generation shard is half written: its outputs must not
    exist under their final names, and the rerun must redo that shard and nothing else."""
    import signal
    import subprocess
    import sys
    import time

    more = tmp_path / "more.yaml"  # enough batches that the kill lands mid-shard
    more.write_text("concepts: {probe-test: {samples_per_prompt: 40}}\n")
    target = "results/tiny-sd15/probe-test/generation/samples.csv"
    base = workdir / "results/tiny-sd15/probe-test/generation"
    run = subprocess.Popen(
        [sys.executable, "-m", "snakemake", "--configfile", str(TEST_CONFIG), str(more),
         "--cores", "1", target],
        cwd=workdir, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                          "PYTHONPATH": str(workdir)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # one shard done, the other's images half written
            done = [k for k in ("000", "001") if (base / f"shard-{k}/samples.csv").exists()]
            partial = [p for p in base.glob("shard-*/images.partial") if any(p.iterdir())]
            if done and partial:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached a half-written shard")
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    killed = "001" if done == ["000"] else "000"
    assert not (base / f"shard-{killed}/samples.csv").exists()
    assert not (base / f"shard-{killed}/images").exists()
    assert not (base / f"shard-{killed}/activations.zarr").exists()
    finished = base / f"shard-{done[0]}/samples.csv"
    before = finished.stat().st_mtime_ns

    assert snakemake(workdir, "--unlock", target).returncode == 0  # the killed run's lock
    rerun = snakemake(workdir, str(more), "--cores", "1", target)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    jobs = job_counts(rerun.stdout + rerun.stderr)
    assert jobs.get("generate_images") == 1 and jobs.get("build_model") is None
    assert f"shard={killed}" in rerun.stdout + rerun.stderr
    assert finished.stat().st_mtime_ns == before
    assert (base / f"shard-{killed}/samples.csv").exists() and (base / "samples.csv").exists()


def planned_inputs(output: str, rule: str) -> list[str]:
    """The inputs a dry run lists for the first job of ``rule``."""
    block = output.split(f"rule {rule}:")[1]
    line = next(row for row in block.splitlines() if row.strip().startswith("input:"))
    return [part.strip() for part in line.split("input:", 1)[1].split(",")]


def test_checkpoints_and_reference_images_named_in_the_config_are_inputs(workdir, tmp_path):
    """Local files the jobs read are inputs (a replaced one reruns its dependants); hub ids
    and tags stay params."""
    fairface = tmp_path / "res34_fair_align_multi_7_20190809.pt"
    clip = tmp_path / "open_clip_model.safetensors"
    reference = tmp_path / "ffhq"
    reference.mkdir()
    for path in (fairface, clip, reference / "a.png", reference / "b.png"):
        path.write_bytes(b"0")
    overlay = tmp_path / "files.yaml"
    overlay.write_text(
        "concepts:\n  gender:\n"
        f"    labeler: {{type: fairface, attribute: gender, weights: {fairface}}}\n"
        f"    evaluation: {{fid_reference: {reference}, labeler: {{type: fairface, "
        f"attribute: gender, weights: {fairface}, face: {{detector: none}}}}}}\n"
        f"evaluation: {{clip_pretrained: {clip}, clip_checkpoint_tag: openai}}\n")
    result = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(overlay), "-n", "--",
                       "results/sd15/gender/metrics/icm.json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert str(fairface) in planned_inputs(out, "label_images")
    metrics = planned_inputs(out, "compute_metrics")
    assert {str(fairface), str(clip)} <= set(metrics)
    # The reference images are featurized once, into the statistics every FID reads.
    statistics = "results/sd15/gender/reference/fid_statistics.npz"
    assert statistics in metrics
    assert {str(reference / "a.png"), str(reference / "b.png")} <= set(
        planned_inputs(out, "compute_fid_statistics"))
    # Resources are not params: the sd15 jobs carry no runtime among them (checked above on
    # finished results); the partitions follow the GPU count.
    assert "slurm_partition=gpu" in out.split("rule generate_images:")[1].split("rule ")[0]


def refused_dry_run(workdir, tmp_path, overlay, target):
    """The output of a dry run of ``target`` with the YAML text ``overlay`` over the test
    config, which must fail."""
    path = tmp_path / "overlay.yaml"
    path.write_text(overlay)
    result = snakemake(workdir, "--configfile", str(TEST_CONFIG), str(path), "-n", "--", target)
    assert result.returncode != 0
    return result.stdout + result.stderr


def test_pair_names_that_collide_are_refused_at_start(workdir, tmp_path):
    out = refused_dry_run(workdir, tmp_path, "concepts:\n  clash:\n    prompts: [a shape]\n"
                          "    classes: [a, a-b, b-c, c]\n    pairs: [[a, b-c], [a-b, c]]\n",
                          "results/toy/color/labels.csv")
    assert "['a', 'b-c'] and ['a-b', 'c'] are both named 'a-b-c'" in out


def test_a_stale_path_or_a_key_naming_nothing_stops_the_run_at_start(workdir, tmp_path):
    """Checked when the workflow starts, whatever exists already: a table built before the
    path was changed does not make the run "nothing to be done"."""
    built = workdir / "results/toy/color/table.csv"
    built.parent.mkdir(parents=True)
    built.write_text("variant\n")
    out = refused_dry_run(workdir, tmp_path, "concepts:\n  color:\n    evaluation: "
                          "{fid_reference: data/real}\n    pairs: [[red, pink]]\n",
                          "results/toy/color/table.csv")
    assert "concepts.color.evaluation.fid_reference: no folder 'data/real'" in out
    assert "concepts.color.pairs: ['red', 'pink'] names ['pink']" in out
    assert "Nothing to be done" not in out
