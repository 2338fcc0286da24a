"""Debiasing plan: who gets pushed which way, per-batch targets, sites per variant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from icm.steering.batch_targets import (
    balanced_targets,
    batch_target,
    calibration_batches,
    target_probabilities,
    target_rule,
)
from icm.steering.pushes import ExplicitPush, Push, class_pushes, explicit_pushes
from icm.steering.selection import select_sites, sites_per_pair

ROOT = Path(__file__).resolve().parents[2]


def test_pushes_follow_the_paper():
    race = class_pushes(["white", "black", "asian", "indian"],
                        [("white", "black"), ("white", "indian"), ("white", "asian")])
    assert race["white"] is None and race["black"] == Push("white-black", 1.0)
    age = class_pushes(["young", "adult", "old"], [("young", "old")])
    assert age == {"young": Push("young-old", -1.0), "adult": None,
                   "old": Push("young-old", 1.0)}
    gender = class_pushes(["woman", "man"], [("woman", "man")])
    assert gender["woman"].sign == -1.0 and gender["man"].sign == 1.0


@pytest.mark.parametrize("draw", ["quasi", "random"])
def test_batch_targets_are_reproducible_and_follow_the_probabilities(draw):
    classes = ["red", "green", "blue"]
    p = target_probabilities(classes, {"red": 0.5, "green": 0.25, "blue": 0.25})
    draws = [batch_target(classes, p, 0, b, draw) for b in range(4000)]
    assert draws[:50] == [batch_target(classes, p, 0, b, draw) for b in range(50)]
    share = {c: draws.count(c) / len(draws) for c in classes}
    assert abs(share["red"] - 0.5) < 0.03 and abs(share["blue"] - 0.25) < 0.03
    assert draws != [batch_target(classes, p, 1, b, draw) for b in range(4000)]


def test_quasi_draws_balance_every_short_run_of_batches():
    """Ten batches (one prompt's worth) hold each of three classes 2 to 4 times, wherever
    the run starts; independent draws often do not."""
    classes = ["red", "green", "blue"]
    p = target_probabilities(classes)
    quasi = [batch_target(classes, p, 0, b, "quasi") for b in range(1000)]
    counts = [[quasi[s:s + 10].count(c) for c in classes] for s in range(990)]
    assert min(map(min, counts)) >= 2 and max(map(max, counts)) <= 4
    random = [batch_target(classes, p, 0, b, "random") for b in range(1000)]
    spread = [max(random[s:s + 10].count(c) for c in classes) for s in range(0, 990, 10)]
    assert max(spread) >= 6
    np.testing.assert_allclose(target_probabilities(classes), 1 / 3)
    with pytest.raises(ValueError, match="sum to 1"):
        target_probabilities(classes, {"red": 0.5})


def paper_steering(concept):
    """(classes, evaluation prompts, samples per prompt, batch size, target draw) of a paper
    concept as config.yaml sets it, schema defaults filled in."""
    from snakemake.utils import validate

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    spec = config["concepts"][concept]
    steering = spec["steering"]
    return (spec["classes"], spec["evaluation"]["prompts"], steering["samples_per_prompt"],
            steering["batch_size"], steering["target_draw"])


@pytest.mark.parametrize(("concept", "floor"), [("gender", 0.093), ("age", 0.127),
                                                ("race", 0.140)])
def test_perfect_steering_under_the_paper_configs_reaches_the_random_draw_floor(concept,
                                                                                 floor):
    """The paper's protocol draws each batch's target at random (appendix B): with 500
    images per prompt in batches of 16, even perfect steering (every image its batch's
    target) leaves FD near 0.09 (gender), 0.13 (age), 0.14 (race), and the default
    config draws so. Quasi draws would report about a quarter of that."""
    from icm.evaluation.metrics import draw_floor
    from icm.generation.samples import plan_samples

    classes, prompts, per_prompt, batch_size, draw = paper_steering(concept)
    assert (len(prompts), per_prompt, batch_size, draw) == (4, 500, 16, "random")
    samples = plan_samples(prompts, per_prompt, 0, "evaluation")
    probs = target_probabilities(classes)

    def floors(kind, seeds):
        out = []
        for seed in seeds:
            rule = target_rule(classes, probs, seed, batch_size, kind)
            targets = [rule(samples[i:i + batch_size]) for i in range(0, len(samples),
                                                                       batch_size)
                       for _ in samples[i:i + batch_size]]
            out.append(draw_floor(targets, [s.prompt for s in samples], classes))
        return np.array(out)

    random = floors(draw, range(40))
    assert abs(random.mean() - floor) < 0.2 * floor
    assert floors("quasi", range(10)).mean() < 0.4 * floor


def test_table_5_steers_all_100_images_toward_obama_along_obama_vs_rest():
    """The paper's Table 5 is a one-target experiment: every one of the 100 evaluation
    images is pushed toward Obama, Trump's and Biden's alike along rest-obama, and the
    calibration measures the distance to Obama alone."""
    from snakemake.utils import validate

    from icm.generation.samples import plan_samples
    from icm.probing.pairs import concept_pairs
    from icm.steering.calibration import calibration_reference

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    spec = config["concepts"]["president"]
    classes, steering = spec["classes"], spec["steering"]
    probs = target_probabilities(classes, steering["target_probs"])
    batch = steering["batch_size"] or config["models"]["sdxl"]["batch_size"]
    samples = plan_samples(spec["evaluation"]["prompts"], steering["samples_per_prompt"], 0,
                           "evaluation")
    rule = target_rule(classes, probs, 0, batch, steering["target_draw"])
    targets = [rule(samples[i:i + batch]) for i in range(0, len(samples), batch)
               for _ in samples[i:i + batch]]
    assert len(targets) == 100 and set(targets) == {"obama"}
    pushes = class_pushes(classes, concept_pairs(spec))
    assert pushes["obama"] == Push("rest-obama", 1.0)
    reference, objective = calibration_reference(classes, probs, spec.get("reference"))
    assert reference == {"obama": 1.0} and "one target" in objective


def test_calibration_deals_each_prompts_targets_evenly():
    """Calibration's targets are dealt, not drawn: every prompt holds each class's share of
    its batches exactly (three batches each by default), in a seeded order of its own."""
    from icm.generation.samples import plan_samples
    from icm.steering.calibration import calibration_samples_per_prompt

    classes = ["white", "black", "asian", "indian"]
    probs = target_probabilities(classes)
    per_prompt = calibration_samples_per_prompt({"batches_per_class": 3}, probs, 16)
    assert per_prompt == 4 * 3 * 16
    samples = plan_samples(["a", "b", "c"], per_prompt, 0, "calibration")
    rule = target_rule(classes, probs, 0, 16, "balanced", per_prompt)
    orders = {}
    for i in range(0, len(samples), 16):
        batch = samples[i:i + 16]
        orders.setdefault(batch[0].prompt, []).append(rule(batch))
    for targets in orders.values():
        assert sorted(targets) == sorted(classes * 3)
    assert len({tuple(t) for t in orders.values()}) > 1  # not one fixed order
    skewed = target_probabilities(["a", "b"], {"a": 0.75, "b": 0.25})
    assert calibration_batches(skewed, 3) == 12  # the rarer class gets its three
    assert balanced_targets(["a", "b"], skewed, 12, 0, 0).count("b") == 3
    assert calibration_batches(target_probabilities(classes[:3]), 3) == 9  # not 10
    with pytest.raises(ValueError, match="whole batches per prompt"):
        target_rule(classes, probs, 0, 16, "balanced", 40)


def ranking():
    rows = []
    accs = {"b0": (0.9, 0.7), "b1": (0.95, 0.8), "b2": (0.6, 0.55), "b3": (0.8, 0.75)}
    for block, (self_acc, cross_acc) in accs.items():
        rows += [{"site": f"{block}.attn1", "kind": "attn1", "block": block, "acc": self_acc},
                 {"site": f"{block}.attn2", "kind": "attn2", "block": block, "acc": cross_acc}]
    table = pd.DataFrame(rows).sort_values("acc", ascending=False)
    table["rank"] = np.arange(1, len(table) + 1)
    return table


def test_site_selection_per_variant():
    table = ranking()
    assert select_sites(table, "top", 2) == ["b1.attn1", "b0.attn1"]
    assert select_sites(table, "cross", 2) == ["b1.attn2", "b0.attn2"]
    assert select_sites(table, "worst", 2) == ["b3.attn1", "b2.attn1"]
    assert select_sites(table, "none", 2) == []
    assert len(select_sites(table, "all", 2)) == 8
    random = select_sites(table, "random", 2, seed=3)
    assert random == select_sites(table, "random", 2, seed=3)
    assert len(set(random)) == 2 and all(s.endswith("attn1") for s in random)
    with pytest.raises(ValueError, match="steering.k is 5"):
        select_sites(table, "top", 5)


def test_the_bottleneck_is_a_baseline_only_its_own_selection_steers():
    table = ranking()
    best = pd.DataFrame([{"site": "mid_block", "kind": "h-space", "block": "mid_block",
                          "acc": 1.0, "rank": 0}])
    table = pd.concat([best, table], ignore_index=True)  # ranked first, yet a baseline
    assert select_sites(table, "h-space", None) == ["mid_block"]
    assert select_sites(table, "top", 2) == ["b1.attn1", "b0.attn1"]
    assert "mid_block" not in select_sites(table, "all", None)
    assert "mid_block" not in select_sites(table, "random", 4, seed=0)
    with pytest.raises(ValueError, match="needs the UNet bottleneck"):
        select_sites(ranking(), "h-space", None)


def test_explicit_pushes_take_the_papers_signed_strengths_and_refuse_a_wrong_sign():
    classes, pairs = ["white", "black", "asian", "indian"], [
        ("white", "black"), ("white", "indian"), ("white", "asian")]
    table6 = {"black": {"sites": ["a", "b"], "alpha": 15}, "asian": {"sites": ["c"], "alpha": 10}}
    pushes = explicit_pushes(classes, pairs, table6)
    assert pushes == {"white": None, "black": ExplicitPush("white-black", ("a", "b"), 15.0),
                      "asian": ExplicitPush("white-asian", ("c",), 10.0), "indian": None}
    gender = explicit_pushes(["woman", "man"], [("woman", "man")],
                             {"woman": {"sites": ["a"], "alpha": -10},
                              "man": {"sites": ["a"], "alpha": 10}})
    assert gender["woman"].strength == -10 and gender["man"].pair == "woman-man"
    with pytest.raises(ValueError, match="'woman': strength 10 does not push toward it; it is "
                                         "the negative class of woman-man"):
        explicit_pushes(["woman", "man"], [("woman", "man")],
                        {"woman": {"sites": ["a"], "alpha": 10}})
    with pytest.raises(ValueError, match="'white' has no direction"):
        explicit_pushes(classes, pairs, {"white": {"sites": ["a"], "alpha": -5}})
    with pytest.raises(ValueError, match=r"\['purple'\] are not classes"):
        explicit_pushes(classes, pairs, {"purple": {"sites": ["a"], "alpha": 5}})
    with pytest.raises(ValueError, match="distinct"):
        explicit_pushes(classes, pairs, {"black": {"sites": ["a", "a"], "alpha": 5}})


def test_each_pair_steers_its_own_sites_unless_one_selection_is_asked_for():
    one, other = ranking(), ranking()
    other["rank"] = other["rank"].to_numpy()[::-1]  # the second pair reads best elsewhere
    by_pair = pd.concat([one.assign(pair="a-b"), other.assign(pair="a-c")], ignore_index=True)
    for selection in ("top", "cross", "worst", "random"):
        sites = sites_per_pair(one, by_pair, ["a-b", "a-c"], selection, 2, seed=0)
        assert sites["a-b"] == select_sites(one, selection, 2, [0, 0])
        assert sites["a-c"] == select_sites(other, selection, 2, [0, 1])
    top = sites_per_pair(one, by_pair, ["a-b", "a-c"], "top", 2, seed=0)
    assert top == {"a-b": ["b1.attn1", "b0.attn1"], "a-c": ["b2.attn1", "b3.attn1"]}
    shared = sites_per_pair(one, None, ["a-b", "a-c"], "top", 2, seed=0)
    assert shared == {"a-b": ["b1.attn1", "b0.attn1"], "a-c": ["b1.attn1", "b0.attn1"]}
    with pytest.raises(ValueError, match="no rows for pair 'a-d'"):
        sites_per_pair(one, by_pair, ["a-d"], "top", 2, seed=0)
