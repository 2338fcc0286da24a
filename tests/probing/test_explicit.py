"""Class-specific prompts: their seeds, the implicit-vs-explicit probes (the paper's Table 3)
and probes labelled by the prompt's class (Table 4's directions)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from icm.checks import concept_problems
from icm.generation.samples import concept_samples, plan_samples, sample_seed, specific_prompts

PROBES = {"control": "none", "device": "cpu", "backend": "torch", "test_size": 0.25,
          "seed": 0, "min_per_class": 5}
CONCEPT = {"classes": ["red", "blue"], "specific_prompts": {"red": ["r0"], "blue": ["b0"]},
           "specific_samples_per_prompt": 60, "prompts": ["p0", "p1"],
           "samples_per_prompt": 40}


def test_specific_prompts_have_their_own_seeds_and_the_general_keep_theirs():
    general = concept_samples(CONCEPT, {}, {"base_seed": 0})
    specific = concept_samples(CONCEPT, {}, {"base_seed": 0}, prompt_set="specific")
    assert [s.prompt for s in specific[::60]] == ["r0", "b0"] and len(specific) == 120
    assert not {s.seed for s in general} & {s.seed for s in specific}
    # The general prompts' rule is the one stores were written with before prompt sets.
    low = int(np.random.SeedSequence([0, 0, 1, 3]).generate_state(1, dtype=np.uint32)[0])
    assert sample_seed(0, 1, 3) == low & (2**30 - 1)
    assert plan_samples(["p0", "p1"], 40, 0) == general
    with pytest.raises(ValueError, match="unknown prompt set"):
        sample_seed(0, 0, 0, prompt_set="explicit")
    with pytest.raises(ValueError, match="under both red and blue"):
        specific_prompts({"specific_prompts": {"red": ["x"], "blue": ["x"]}})


def test_specific_prompt_settings_naming_nothing_are_refused():
    variants = {"icm": {"sites": "top"}, "icm-specific": {"sites": "top",
                                                          "directions": "specific"}}
    base = {"prompts": ["p"], "classes": ["red", "blue"]}
    assert concept_problems({"c": base}, variants) == []  # unlisted: the run skips it
    problems = concept_problems({"c": {**base, "specific_prompts": {"pink": ["x"]},
                                       "steering": {"variants": ["icm-specific"]}}}, variants)
    assert any("specific_prompts: ['pink'] are not classes" in p for p in problems)
    assert any("specific_prompts has none for ['blue', 'red']" in p for p in problems)
    doubled = concept_problems({"c": {**base, "specific_prompts": {"red": ["x"],
                                                                   "blue": ["x"]}}}, variants)
    assert any("'x' is listed under both red and blue" in p for p in doubled)


def _store(path, prompts, per_prompt, acts, prompt_set="general"):
    from icm.hooks.capture import CapturedBatch
    from icm.io.activations import ActivationStoreWriter

    samples = plan_samples(prompts, per_prompt, 0, prompt_set=prompt_set)
    with ActivationStoreWriter(path, samples, {"sites": list(acts), "n_samples": len(samples)},
                               chunk_samples=16) as writer:
        steps = next(iter(acts.values())).shape[1]
        writer.write(CapturedBatch(acts, np.linspace(900.0, 100.0, steps)))
    return samples


def _labels(path, samples, labels, **columns):
    pd.DataFrame({"sample": [s.sample for s in samples],
                  "prompt_index": [s.prompt_index for s in samples], "label": labels,
                  "kept": [bool(x) for x in labels], **columns}).to_csv(path, index=False)


def _world(tmp_path, rng, general=80, specific=60):
    """General images: ``general`` per prompt (two), red or blue by a channel at both sites.
    Specific images: ``specific`` per prompt, the explicit ones shifted on channel 1 at
    down.attn1 from step 1 only; the labeler reads 10 of r0's as blue."""
    sites = ("down.attn1", "down.attn2")
    general_labels = np.array(["red", "blue"] * general)
    acts = {s: rng.standard_normal((2 * general, 3, 6)).astype(np.float32) for s in sites}
    for s in sites:
        acts[s][:, :, 0] += np.where(general_labels == "red", 2.0, -2.0)[:, None]
    general_samples = _store(tmp_path / "g.zarr", ["p0", "p1"], general, acts)
    _labels(tmp_path / "g.csv", general_samples, general_labels)
    named = np.array(["red"] * specific + ["blue"] * specific)
    spec = {s: rng.standard_normal((2 * specific, 3, 6)).astype(np.float32) for s in sites}
    for s in sites:
        spec[s][:, :, 0] += np.where(named == "red", 2.0, -2.0)[:, None]
    spec["down.attn1"][:, 1:, 1] += 3.0  # explicit differs from implicit here
    specific = _store(tmp_path / "s.zarr", ["r0", "b0"], specific, spec, prompt_set="specific")
    read = named.copy()
    read[:10] = "blue"  # misread by the labeler
    _labels(tmp_path / "s.csv", specific, read, prompt_class=named)
    return tmp_path / "g.zarr", tmp_path / "g.csv", tmp_path / "s.zarr", tmp_path / "s.csv"


def test_explicit_vs_implicit_probes_find_where_the_two_differ(tmp_path):
    from icm.jobs import explicit_vs_implicit_job

    g_store, g_labels, s_store, s_labels = _world(tmp_path, np.random.default_rng(0),
                                                  specific=100)
    out = tmp_path / "out"
    explicit_vs_implicit_job(CONCEPT, PROBES, g_labels, [g_store], s_labels, [s_store],
                             out / "table.csv", out / "scores.csv", out / "heatmap.png",
                             out / "record.json")
    table = pd.read_csv(out / "table.csv").set_index("specific_prompt")
    assert list(table.index) == ["r0", "b0"] and list(table["class"]) == ["red", "blue"]
    assert (table["best_site"] == "down.attn1").all() and (table["best_step"] >= 1).all()
    assert (table["test_acc"] > 0.8).all()  # the best possible is 0.93 (a 3-sd shift)
    assert (table["best_attn1_site"] == "down.attn1").all()
    assert (table["mean_attn2_validation_acc"] < 0.7).all()  # per kind (one site each here)
    # r0: 90 read as red against 80 red general images; b0: 100 against 80.
    assert list(table["n_misread"]) == [10, 0]
    assert (table["n_explicit"] == table["n_implicit"]).all()
    assert list(table["n_explicit"]) == [80, 80]
    scores = pd.read_csv(out / "scores.csv")
    elsewhere = scores[(scores["site"] == "down.attn2") | (scores["step"] == 0)]
    assert elsewhere["validation_acc"].mean() < 0.7  # no difference there: about chance
    assert (out / "heatmap.png").exists()
    assert json.loads((out / "record.json").read_text())["backend"] == "torch"


def test_table_3_reports_chance_where_explicit_and_implicit_do_not_differ(tmp_path):
    """Both sides drawn from one distribution: the best of 200 probes, chosen on validation
    rows, is scored on rows held out from the choice, so the table reports about 0.5 (the
    validation score of the chosen probe is well above it: the bias scoring on the rows of
    the choice would report)."""
    from icm.jobs import explicit_vs_implicit_job

    rng = np.random.default_rng(1)
    sites = [f"s{i}.attn1" for i in range(20)]
    specific_names = {"red": [f"r{i}" for i in range(4)], "blue": [f"b{i}" for i in range(4)]}
    general_labels = np.array(["red", "blue"] * 40)
    acts = {s: rng.standard_normal((80, 10, 8)).astype(np.float32) for s in sites}
    general = _store(tmp_path / "g.zarr", ["p0", "p1"], 40, acts)
    _labels(tmp_path / "g.csv", general, general_labels)
    prompts = [p for names in specific_names.values() for p in names]
    spec = {s: rng.standard_normal((40 * len(prompts), 10, 8)).astype(np.float32)
            for s in sites}
    named = np.repeat(["red"] * 4 + ["blue"] * 4, 40)
    specific = _store(tmp_path / "s.zarr", prompts, 40, spec, prompt_set="specific")
    _labels(tmp_path / "s.csv", specific, named, prompt_class=named)
    concept = {**CONCEPT, "specific_prompts": specific_names}
    out = tmp_path / "out"
    explicit_vs_implicit_job(concept, PROBES, tmp_path / "g.csv", [tmp_path / "g.zarr"],
                             tmp_path / "s.csv", [tmp_path / "s.zarr"], out / "table.csv",
                             out / "scores.csv", out / "heatmap.png", out / "record.json")
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 8 and (table["n_explicit"] == 40).all()
    assert abs(table["test_acc"].mean() - 0.5) < 0.08
    assert table["validation_acc"].mean() > 0.7  # the chosen probe's own score: biased
    assert abs(table["mean_validation_acc"].mean() - 0.5) < 0.05


def test_probes_by_prompt_read_the_class_the_prompt_names(tmp_path):
    """``by_prompt``: the specific prompts' probes are labelled by prompt, not labeler; here
    the labeler is wrong on a sixth of r0's images and the probe still points to red."""
    from safetensors.numpy import load_file

    from icm.jobs import fit_probes_job

    _, _, s_store, s_labels = _world(tmp_path, np.random.default_rng(1))
    out = tmp_path / "probes"
    fit_probes_job(CONCEPT, PROBES, ("blue", "red"), s_labels, [s_store], out / "scores.csv",
                   out / "d.safetensors", out / "d.json", by_prompt=True)
    meta = json.loads((out / "d.json").read_text())
    assert meta["labels"]["label_source"] == "prompt_class"
    scores = pd.read_csv(out / "scores.csv")
    assert (scores["n_red"] == 60).all() and (scores["n_blue"] == 60).all()
    direction = load_file(str(out / "d.safetensors"))["down.attn2"]
    assert (direction[:, 0] > 0.9).all()  # channel 0 tells the prompts' classes apart
    _labels(tmp_path / "plain.csv", plan_samples(["r0", "b0"], 60, 0, prompt_set="specific"),
            ["red"] * 120)
    with pytest.raises(ValueError, match="no prompt_class column"):
        fit_probes_job(CONCEPT, PROBES, ("blue", "red"), tmp_path / "plain.csv", [s_store],
                       out / "x.csv", out / "x.safetensors", out / "x.json", by_prompt=True)
