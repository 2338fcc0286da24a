"""A head-map study's prompts, slots, split and seeds (icm.head_study), and what the
workflow refuses of it at start (icm.checks)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from icm.checks import config_problems
from icm.head_study import (
    excluded,
    hrv_concepts,
    slot_names,
    split_prompts,
    split_samples,
    study_prompts,
    words_of,
)
from icm.samples import SEED_STREAMS, plan_samples

ROOT = Path(__file__).resolve().parents[1]
STUDY = {"template": "a {color} {shape}",
         "slots": {"shape": ["circle", "square"], "color": ["red", "blue"]},
         "held_out": ["a blue circle"], "train_samples_per_prompt": 3,
         "held_out_samples_per_prompt": 5}


def test_a_template_fills_every_combination_with_its_words_in_slot_order():
    prompts = study_prompts(STUDY)
    assert [p.prompt for p in prompts] == ["a red circle", "a blue circle", "a red square",
                                           "a blue square"]
    assert prompts[1].slot_words == ["circle", "blue"] and slot_names(STUDY) == ["shape", "color"]
    listed = {"prompts": [{"prompt": "a dog on a couch", "words": {"animal": "dog",
                                                                     "furniture": "couch"}}]}
    assert study_prompts(listed)[0].slot_words == ["dog", "couch"]
    assert hrv_concepts(STUDY) == {"shape": ["circle", "square"], "color": ["red", "blue"]}


def test_splits_have_their_own_prompts_and_seeds_disjoint_from_every_other_stream():
    train, held = (split_samples(STUDY, s, base_seed=0) for s in ("train", "held-out"))
    assert len(train) == 3 * 3 and len(held) == 5
    assert {s.prompt for s in held} == {"a blue circle"} and "a blue circle" not in {
        s.prompt for s in train}
    assert [s.sample for s in held] == list(range(5))
    assert not {s.seed for s in train} & {s.seed for s in held}
    assert {s.seed >> 30 for s in train + held} == {SEED_STREAMS["head-maps"]}
    others = {s.seed for stream in ("localization", "calibration", "evaluation")
              for s in plan_samples(["a blue circle"], 5, 0, stream)}
    assert not others & {s.seed for s in held}
    # A sample's seed depends on its prompt and repeat only, not on the other split's size.
    bigger = split_samples({**STUDY, "train_samples_per_prompt": 7}, "held-out", 0)
    assert [s.seed for s in bigger] == [s.seed for s in held]
    assert words_of(STUDY, held) == [["circle", "blue"]] * 5


@pytest.mark.parametrize(("change", "message"), [
    ({"held_out": ["a green circle"]}, r"held_out: \['a green circle'\] are not prompts"),
    ({"held_out": []}, r"the \['held-out'\] split has no prompts"),
    ({"template": "a {colour} {shape}"}, r"names \['colour', 'shape'\]"),
])
def test_a_study_that_cannot_split_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        split_prompts({**STUDY, **change})


def test_exclusion_takes_sites_and_module_prefixes():
    assert excluded("mid_block.attentions.0.transformer_blocks.0.attn2", ["mid_block"])
    assert not excluded("mid_blocks2.attn2", ["mid_block"])
    assert excluded("up_blocks.1.attn2", ["up_blocks.1.attn2"])


@pytest.fixture()
def config():
    from snakemake.utils import validate

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    validate(cfg, str(ROOT / "schemas" / "config.schema.yaml"))
    return cfg


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda s: s.update(held_out=["a pink circle"]),
     "concepts.objects.head_maps: head_maps.held_out: ['a pink circle'] are not prompts"),
    (lambda s: s.update(hrv_words={"shape": ["circle"]}),
     "concepts.objects.head_maps.hrv_words: concepts ['shape'] must be the slots"),
    (lambda s: s.update(masks={"type": "folder", "path": "data/no-masks"}),
     "concepts.objects.head_maps.masks.path: no folder 'data/no-masks'"),
    (lambda s: s.update(template=None),
     "concepts.objects: neither prompts nor a head_maps study"),
])
def test_the_workflow_refuses_a_broken_study_at_start(config, mutate, message):
    cfg = copy.deepcopy(config)
    mutate(cfg["concepts"]["objects"]["head_maps"])
    assert any(p.startswith(message) for p in config_problems(cfg, ROOT)), \
        config_problems(cfg, ROOT)
