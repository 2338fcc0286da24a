"""A head-map study's prompts, slots, split and seeds (icm.head_maps.study), and what the
workflow refuses of it at start (icm.checks)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from icm.checks import config_problems
from icm.generation.samples import SEED_STREAMS, plan_samples
from icm.head_maps.study import (
    excluded,
    hrv_concepts,
    slot_names,
    split_prompts,
    split_samples,
    study_prompts,
    words_of,
)

ROOT = Path(__file__).resolve().parents[2]
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
     "concepts.objects.head_maps.hrv_words: concepts ['shape'] must include the slots"),
    (lambda s: s.update(relevance=["hrv-published"]),
     "concepts.objects.head_maps.hrv_vectors: the hrv-published source needs"),
    (lambda s: s.update(masks={"type": "folder", "path": "data/no-masks"}),
     "concepts.objects.head_maps.masks.path: no folder 'data/no-masks'"),
    (lambda s: s.update(template=None),
     "concepts.objects: neither prompts nor a head_maps study"),
    (lambda s: s.update(train_samples_per_prompt=2, stability_groups=3),
     "concepts.objects.head_maps.stability_groups: 3 groups of repeats"),
    (lambda s: s.update(ks=[4, 2.5]),
     "concepts.objects.head_maps.ks: [2.5] are neither counts (integers) nor fractions"),
])
def test_the_workflow_refuses_a_broken_study_at_start(config, mutate, message):
    cfg = copy.deepcopy(config)
    mutate(cfg["concepts"]["objects"]["head_maps"])
    assert any(p.startswith(message) for p in config_problems(cfg, ROOT)), \
        config_problems(cfg, ROOT)


REPLICAS = {  # family -> (builder, model settings beyond the shared ones, attn2 heads)
    "sana": ("build_tiny_sana", {"guidance_scale": 4.5,
                                 "pipeline_arguments": {"use_resolution_binning": False}}, 8),
    "sdxl": ("build_tiny_sdxl", {"guidance_scale": 5.0}, None),
}


@pytest.mark.parametrize("family", sorted(REPLICAS))
def test_the_study_jobs_run_on_tiny_sana_and_sdxl(tmp_path, family):
    """Capture (with HRV votes), relevance and evaluation as the workflow calls them, on the
    SANA replica (its instruction on) and the SDXL replica: families beside the toy the study
    was built on. Masks come from a folder, as a user's would."""
    import functools
    import importlib

    import numpy as np
    import pandas as pd
    from PIL import Image

    from icm.jobs.head_maps import (
        capture_head_maps_job,
        evaluate_head_maps_job,
        score_head_relevance_job,
    )
    from icm.models.tiny import save_replica

    builder, settings, heads = REPLICAS[family]
    build = getattr(importlib.import_module(f"icm.models.tiny_{family}"), builder)
    if family == "sana":  # Gemma wider than the attention: voting must project (real SANA)
        build = functools.partial(build, text_width=12)
    folder = save_replica(build, tmp_path / family)
    model = {"family": family, "dtype": "float32", "steps": 2, "resolution": 32,
             "batch_size": 2, "n_shards": 1, "scheduler": "default", "variant": None,
             **settings}
    study = {**STUDY, "train_samples_per_prompt": 2, "held_out_samples_per_prompt": 2,
             "window": {"start": 0, "stop": None}, "store_dtype": "float16", "hrv_words": None,
             "masks": {"type": "folder", "path": str(tmp_path / "masks")},
             "relevance": ["hrv", "oracle", "agreement"], "oracle_tau": 0.4,
             "stability_groups": 2, "exclude": [], "sites": "daam", "map_size": 16, "ks": [2],
             "taus": [0.4],
             "seed": 0, "curve_points": 3}
    splits = {}
    for split in ("train", "held-out"):
        out = tmp_path / split
        capture_head_maps_job(
            model_name=f"tiny-{family}", model=model, source=str(folder), concept_name="objects",
            study=study, generation={"base_seed": 0, "device": "cpu"}, split=split, shard=0,
            images_dir=out / "images", table=out / "samples.csv", store=out / "maps.zarr",
            votes=out / "votes.safetensors" if split == "train" else None)
        splits[split] = ([out / "samples.csv"], [out / "maps.zarr"])
        for row in pd.read_csv(out / "samples.csv").itertuples():
            for slot in ("shape", "color"):  # a mask per image and slot: the left half
                mask = np.zeros((32, 32), np.uint8)
                mask[:, :16] = 255
                (tmp_path / "masks").mkdir(exist_ok=True)
                Image.fromarray(mask).save(tmp_path / "masks" / f"{row.seed}-{slot}.png")
    score_head_relevance_job(study=study, tables=splits["train"][0], stores=splits["train"][1],
                             votes=[tmp_path / "train/votes.safetensors"],
                             output_table=tmp_path / "relevance.csv",
                             output_tensors=tmp_path / "relevance.safetensors",
                             output_record=tmp_path / "relevance.json")
    relevance = pd.read_csv(tmp_path / "relevance.csv")
    per_source = relevance[relevance["relevance"] == "agreement"]
    assert len(relevance) == 3 * len(per_source) and set(per_source["word"]) == {"shape", "color"}
    if heads:
        assert len(per_source) == 2 * heads  # slots x (SANA: 4 attn2 sites x 2 heads)
    hrv = relevance[relevance["relevance"] == "hrv"].groupby("word")["score"].mean()
    assert np.allclose(hrv[hrv > 0], 1.0) and (hrv > 0).any()  # voted rows average 1
    evaluate_head_maps_job(study=study, splits=splits, relevance=tmp_path / "relevance.csv",
                           output_table=tmp_path / "table.csv",
                           output_curve=tmp_path / "curve.csv",
                           output_record=tmp_path / "table.json")
    table = pd.read_csv(tmp_path / "table.csv")
    held = table[table["split"] == "held-out"]
    assert set(table["split"]) == {"train", "held-out"}
    assert (held["n"][held["word"] != "pooled"] == 2).all()
    assert (held["n"][held["word"] == "pooled"] == 4).all()  # 2 images x 2 words
    assert set(table["sites"]) == {"DAAM's sites: no mid block, no map of factor 8 "
                                   "(castorini/daam 0.2)"}
    # A mask missing for one held-out image and word: that pair is not annotated, not scored.
    seed = pd.read_csv(tmp_path / "held-out" / "samples.csv")["seed"].iloc[0]
    (tmp_path / "masks" / f"{seed}-color.png").unlink()
    evaluate_head_maps_job(study=study, splits=splits, relevance=tmp_path / "relevance.csv",
                           output_table=tmp_path / "t.csv", output_curve=tmp_path / "c.csv",
                           output_record=tmp_path / "t.json")
    fewer = pd.read_csv(tmp_path / "t.csv")
    fewer = fewer[fewer["split"] == "held-out"].groupby("word")["n"].max()
    assert fewer.to_dict() == {"color": 1, "pooled": 3, "shape": 2}
    # No mask at all stops it, naming the folder, and writes nothing.
    for mask in (tmp_path / "masks").glob("*.png"):
        mask.unlink()
    with pytest.raises(FileNotFoundError, match="no masks in"):
        evaluate_head_maps_job(study=study, splits=splits, relevance=tmp_path / "relevance.csv",
                               output_table=tmp_path / "u.csv", output_curve=tmp_path / "v.csv",
                               output_record=tmp_path / "u.json")
    assert not (tmp_path / "u.csv").exists()


@pytest.mark.parametrize("resolution", [32, 48])
def test_the_default_sites_are_exactly_daam_s_on_tiny_sd15(tmp_path, resolution):
    """`sites: daam` keeps what DAAM's tracer keeps (castorini/daam 0.2, its rule written
    out here): no mid block, and no map whose factor int(sqrt(L // (h w))) is 8, L = 4096
    for a model made for 512 or 1024 px, else 9216. Tiny SD1.5 is made for 32 px (L 9216):
    at 32 px its 16 x 16 and 8 x 8 maps stay (factors 6, 12) and only the mid block goes;
    at 48 px its 12 x 12 maps have factor 8 and go too. `every` keeps all; `exclude` takes
    module prefixes in the aggregation as in the study."""
    import math

    import zarr

    from icm.head_maps.aggregation import aggregate
    from icm.head_maps.reading import read_split
    from icm.jobs.head_maps import capture_head_maps_job
    from icm.models.tiny import save_tiny_sd15

    folder = save_tiny_sd15(tmp_path / "tiny")
    model = {"family": "sd15", "dtype": "float32", "steps": 1, "resolution": resolution,
             "batch_size": 2, "n_shards": 1, "scheduler": "default", "variant": None,
             "guidance_scale": 7.5}
    study = {**STUDY, "held_out_samples_per_prompt": 1, "window": {"start": 0, "stop": None},
             "store_dtype": "float32"}
    out = tmp_path / "held-out"
    capture_head_maps_job(model_name="tiny-sd15", model=model, source=str(folder),
                          concept_name="objects", study=study,
                          generation={"base_seed": 0, "device": "cpu"}, split="held-out",
                          shard=0, images_dir=out / "images", table=out / "samples.csv",
                          store=out / "maps.zarr")
    group = zarr.open_group(out / "maps.zarr", mode="r")
    assert group.attrs["default_size"] == 32  # sample_size 16 x the VAE's factor 2
    every = list(group.attrs["sites"])
    latent = 9216
    daam = [s for s in every if not s.startswith("mid_block")
            and int(math.sqrt(latent // math.prod(group[s].shape[-2:]))) != 8]
    _, kept = read_split([out / "samples.csv"], [out / "maps.zarr"])
    assert list(kept) == daam and any(s.startswith("mid_block") for s in every)
    dropped_levels = {group[s].shape[-1] for s in every if s not in daam and "mid" not in s}
    assert dropped_levels == ({12} if resolution == 48 else set())
    _, wide = read_split([out / "samples.csv"], [out / "maps.zarr"], sites="every")
    assert list(wide) == every
    by_prefix = aggregate(wide, exclude=["mid_block"], size=8)
    by_name = aggregate({s: m for s, m in wide.items() if not s.startswith("mid_block")},
                        size=8)
    assert torch.equal(by_prefix, by_name)


def test_hrv_votes_on_generic_prompts_count_one_vote_per_head_image_and_step(tmp_path):
    """``hrv_prompts``: HRV's votes counted on images of generic prompts (HRV's 2,100), with
    seeds of their own, sharded like every stream; relevance reads them as the train
    split's votes."""
    import json

    from safetensors import safe_open

    from icm.head_maps.relevance import hrv_of_votes
    from icm.head_maps.study import hrv_samples
    from icm.jobs.head_maps import count_head_votes_job
    from icm.models.tiny import build_sd15_pipeline, save_replica

    generic = {**STUDY, "hrv_prompts": ["a photo", "a red thing", "a blue sky"],
               "hrv_samples_per_prompt": 2, "hrv_words": {"shape": ["circle", "square"],
                                                          "color": ["red", "blue"],
                                                          "texture": ["furry"]}}
    samples = hrv_samples(generic, base_seed=0)
    assert len(samples) == 6 and {s.seed >> 30 for s in samples} == {SEED_STREAMS["head-maps"]}
    maps = [s.seed for split in ("train", "held-out") for s in split_samples(generic, split, 0)]
    assert not {s.seed for s in samples} & set(maps)
    folder = save_replica(lambda seed: build_sd15_pipeline("tiny", seed=seed), tmp_path / "m")
    model = {"family": "sd15", "dtype": "float32", "steps": 3, "resolution": 32,
             "guidance_scale": 7.5, "batch_size": 2, "n_shards": 2, "scheduler": "default",
             "variant": None}
    for shard in (0, 1):
        count_head_votes_job(model_name="tiny-sd15", model=model, source=str(folder),
                             concept_name="objects", study=generic,
                             generation={"base_seed": 0, "device": "cpu"}, shard=shard,
                             votes=tmp_path / f"votes-{shard}.safetensors")
    with safe_open(str(tmp_path / "votes-0.safetensors"), "pt") as handle:
        votes = handle.get_tensor("votes")
        meta = handle.metadata()
    assert votes.shape[1] == 3 and "generic prompts" in meta["what"]
    steps = 4  # the tiny model's PNDM: 3 steps are 4 loop steps
    assert torch.all(votes.sum(dim=1) == 4 * steps)  # shard 0: 2 batches of 2 images
    heads = [tuple(h) for h in json.loads(meta["heads"])]
    relevance = hrv_of_votes([tmp_path / f"votes-{k}.safetensors" for k in (0, 1)], heads,
                             ["shape", "color"])
    assert relevance.shape == (2, len(heads))
