"""What the workflow refuses at start (icm.checks): keys naming nothing, missing paths."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from icm.checks import config_problems, path_problems

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def config():
    from snakemake.utils import validate

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    validate(cfg, str(ROOT / "schemas" / "config.schema.yaml"))
    return cfg


def test_the_shipped_config_has_no_problems(config):
    assert config_problems(config, ROOT) == []


def test_a_toy_reference_the_world_cannot_render_is_refused_at_start(config):
    """The toy world plants colour and shape, not position: `fid_reference: toy-world`
    serves a pixel-labelled concept (the shipped `position`) only as a uniform reference."""
    assert config["concepts"]["position"]["labeler"]["attribute"] == "lit_side"
    config["concepts"]["position"]["reference"] = {"left": 0.7, "right": 0.3}
    problems = config_problems(config, ROOT)
    assert any(p.startswith("concepts.position.reference: fid_reference toy-world reweights")
               and "set `reference` to null" in p for p in problems)
    config["concepts"]["position"]["reference"] = {"left": 0.5, "right": 0.5}
    assert config_problems(config, ROOT) == []


def test_one_vs_rest_pairs_are_accepted_and_a_class_named_rest_is_not(config):
    config["concepts"]["shape"]["pairs"] = "one-vs-rest"
    assert config_problems(config, ROOT) == []
    config["concepts"]["shape"]["classes"] = ["circle", "rest"]
    assert any("'rest' names the other classes" in p for p in config_problems(config, ROOT))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda c: c["concepts"]["gender"].update(pairs=[["woman", "person"]]),
     "concepts.gender.pairs: ['woman', 'person'] names ['person'], which are not classes"),
    (lambda c: c["concepts"]["gender"].update(classes=["woman"], pairs=None),
     "concepts.gender.classes: ['woman'] is one class"),
    (lambda c: c["concepts"]["gender"].update(classes=["woman", "man", "man"]),
     "concepts.gender.classes: ['man'] appear more than once"),
    (lambda c: c["concepts"]["color"]["steering"].update(targets=["purple"]),
     "concepts.color.steering.targets: ['purple'] are not classes"),
    (lambda c: c["concepts"]["color"].update(reference={"red": 0.5, "pink": 0.5}),
     "concepts.color.reference: ['pink'] are not classes"),
    (lambda c: c["concepts"]["color"]["steering"].update(variants=["icm", "best"]),
     "concepts.color.steering.variants: ['best'] are not steering.variants"),
    (lambda c: c["concepts"]["color"]["steering"].update(alpha={"icn": 3}),
     "concepts.color.steering.alpha: ['icn'] are not steering.variants"),
    # The paper's Table 6 as config: a sign pushing away from the target, a class without a
    # direction, a model that is not configured.
    (lambda c: c["concepts"]["gender"]["steering"]["explicit"]["sd15"]["targets"]["woman"]
     .update(alpha=10), "concepts.gender.steering.explicit.sd15: explicit target 'woman': "
     "strength 10 does not push toward it"),
    (lambda c: c["concepts"]["race"]["steering"]["explicit"]["sd15"]["targets"].update(
        white={"sites": ["mid_block"], "alpha": -5}),
     "concepts.race.steering.explicit.sd15: explicit target 'white' has no direction"),
    (lambda c: c["concepts"]["age"]["steering"]["explicit"].update(
        {"sd-15": {"start_step": 15, "targets": {"old": {"sites": ["x"], "alpha": 8}}}}),
     "concepts.age.steering.explicit: 'sd-15' is not a model"),
])
def test_keys_that_name_nothing_are_refused_with_the_key(config, mutate, message):
    mutate(config)
    assert any(message in p for p in config_problems(config, ROOT)), config_problems(config, ROOT)


def test_missing_local_paths_are_refused_with_the_key(config, tmp_path):
    cfg = copy.deepcopy(config)
    cfg["models"]["toy"]["source"] = "resources/models/gone"
    cfg["models"]["sd15"]["source"] = "models/my sd15"          # not a hub id's shape
    cfg["models"]["sdxl"]["source"] = "someone/some-model"      # a hub id: loaded from cache
    cfg["concepts"]["color"]["evaluation"]["fid_reference"] = "data/real-images"
    cfg["concepts"]["gender"]["evaluation"]["fid_reference"] = "stats/ffhq_clean.npz"
    cfg["concepts"]["gender"]["evaluation"]["labeler"] = {
        "type": "fairface", "attribute": "gender", "weights": "ckpt/fairface.pt"}
    cfg["evaluation"]["clip_pretrained"] = "ckpt/ViT-L-14.pt"
    problems = path_problems(cfg, ROOT)
    assert problems == [
        "models.sd15.source: 'models/my sd15' is neither a folder nor a hub id (owner/name)",
        "models.toy.source: 'resources/models/gone' is neither a folder nor a hub id "
        "(owner/name)",
        "concepts.gender.evaluation.labeler.weights: no file 'ckpt/fairface.pt'",
        "concepts.gender.evaluation.fid_reference: no file 'stats/ffhq_clean.npz'",
        "concepts.color.evaluation.fid_reference: no folder 'data/real-images'",
        "evaluation.clip_pretrained: no checkpoint file 'ckpt/ViT-L-14.pt' (a tag such as "
        "openai, or a local file)",
    ]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "ViT-L-14.pt").write_bytes(b"")
    assert not any("clip_pretrained" in p for p in path_problems(cfg, tmp_path))


def test_dlib_face_models_are_a_folder_and_yunet_a_file(config, tmp_path):
    """dlib's `face.model` names the folder of its two model files (what DlibDetector loads),
    YuNet's the ONNX file: each refused at start only when it is not that."""
    cfg = copy.deepcopy(config)
    labeler = {"type": "fairface", "attribute": "gender", "face": {"model": "dlib"}}
    cfg["concepts"]["gender"]["evaluation"]["labeler"] = labeler
    key = "concepts.gender.evaluation.labeler.face.model"
    assert [p for p in path_problems(cfg, tmp_path) if key in p] == [
        f"{key}: no folder 'dlib' holding mmod_human_face_detector.dat, "
        "shape_predictor_5_face_landmarks.dat"]
    (tmp_path / "dlib").mkdir()
    (tmp_path / "dlib" / "mmod_human_face_detector.dat").write_bytes(b"")
    assert [p for p in path_problems(cfg, tmp_path) if key in p] == [
        f"{key}: no folder 'dlib' holding shape_predictor_5_face_landmarks.dat"]
    (tmp_path / "dlib" / "shape_predictor_5_face_landmarks.dat").write_bytes(b"")
    assert not [p for p in path_problems(cfg, tmp_path) if key in p]
    labeler["face"] = {"detector": "yunet", "model": "dlib"}   # a folder, not YuNet's file
    assert [p for p in path_problems(cfg, tmp_path) if key in p] == [f"{key}: no file 'dlib'"]
    (tmp_path / "yunet.onnx").write_bytes(b"")
    labeler["face"]["model"] = "yunet.onnx"
    assert not [p for p in path_problems(cfg, tmp_path) if key in p]


def test_a_variant_named_like_the_calibrations_unsteered_images_is_refused(config):
    config["steering"]["variants"]["unsteered"] = {"sites": "top", "alpha": "auto"}
    assert any("steering.variants.unsteered" in p for p in config_problems(config, ROOT))
