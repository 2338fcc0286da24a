"""What the workflow refuses at start (icm.checks): keys naming nothing, missing paths."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from icm.checks import config_problems, path_problems, run_problems

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
    # A labeler's per-class prompt groups (a misspelt class would silently fall back to
    # "a photo of a {class}").
    (lambda c: c["concepts"]["gender"]["labeler"].update(prompts={"women": ["a woman"]}),
     "concepts.gender.labeler.prompts: ['women'] are not classes"),
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


TOY = ROOT / "resources" / "models" / "toy"


def test_the_shipped_pairs_have_no_run_problems(config):
    """The demo's pairs with the toy's own tokenizer, and the paper's (counts only: their
    tokenizers are not on disk here)."""
    for concept in ("color", "shape", "position"):
        assert run_problems(config, "toy", concept, TOY) == []
    for concept in ("gender", "age", "race"):
        assert run_problems(config, "sd15", concept) == []
    assert run_problems(config, "sdxl", "president") == []


def test_more_shards_than_batches_are_refused_naming_the_keys(config):
    """A shard without a batch failed only when its generation job ran."""
    config["models"]["toy"]["n_shards"] = 9  # 4 x 250 localization images: 8 batches of 125
    problems = run_problems(config, "toy", "color", TOY)
    assert problems == [
        "models.toy.n_shards: 9 shards, but color's localization images (concepts.color."
        "prompts x concepts.color.samples_per_prompt = 1000) make 8 batches of 125: lower "
        "n_shards or raise the count"]
    config["models"]["toy"]["n_shards"] = 8
    assert run_problems(config, "toy", "color", TOY) == []


def test_a_localization_too_small_for_the_probes_is_refused(config):
    config["concepts"]["color"]["samples_per_prompt"] = 2  # 4 prompts x 2 < 3 classes x 10
    problems = run_problems(config, "toy", "color", TOY)
    assert any(p.startswith("probes.min_per_class: 3 classes need 30 labelled images, but "
                            "color's localization generates 8") for p in problems), problems


def test_a_prompt_the_text_encoder_would_cut_is_refused_with_its_token_count(config, tmp_path):
    """Counted by the model's own tokenizer where it is on disk: the toy's (8 tokens), and a
    CLIP tokenizer of SD1.5's length (77) in a model folder."""
    from icm.models.tokenizer import build_clip_tokenizer

    config["concepts"]["color"]["prompts"] = ["a red circle", "a b c d e f g h"]
    problems = run_problems(config, "toy", "color", TOY)
    assert problems == ["concepts.color.prompts[1]: 'a b c d e f g h' is 10 tokens, but toy's "
                        "text encoder reads 8: the rest would be cut"]
    build_clip_tokenizer(tmp_path / "tokenizer", words=["person"]).save_pretrained(
        tmp_path / "tokenizer")
    long = " ".join(["person"] * 76)
    config["concepts"]["gender"]["prompts"].append(long)
    problems = run_problems(config, "sd15", "gender", tmp_path)
    index = len(config["concepts"]["gender"]["prompts"]) - 1
    assert problems == [f"concepts.gender.prompts[{index}]: {long!r} is 78 tokens, but sd15's "
                        "text encoder reads 77: the rest would be cut"]
    assert run_problems(config, "sd15", "gender") == []  # no tokenizer on disk: not checked


def test_hrv_on_joint_attention_is_refused_and_the_other_sources_pass(config):
    """FLUX's word maps are joint attention, where HRV's votes have no meaning: a study
    asking for them fails at start; the same study without them passes, and on a UNet both
    pass."""
    objects = config["concepts"]["objects"]["head_maps"]  # the toy study: hrv by default
    assert "hrv" in objects["relevance"]
    flux = run_problems(config, "tiny-flux", "objects")
    assert [p for p in flux if ".relevance" in p] == [
        "concepts.objects.head_maps.relevance: ['hrv'] on tiny-flux: HRV's concept-word "
        "voting needs cross-attention, whose keys are the text encoder's states; flux's "
        "joint attention reads the text stream of the blocks before it, which no word encoded "
        "alone has: choose its heads by oracle, agreement, concentration or stability"]
    objects["relevance"] = ["oracle", "agreement"]
    assert not [p for p in run_problems(config, "tiny-flux", "objects") if ".relevance" in p]
    objects["relevance"] = ["hrv", "hrv-published"]
    assert not [p for p in run_problems(config, "tiny-sd15", "objects") if ".relevance" in p]


def test_token_counts_are_kept_by_the_tokenizer_s_content(tmp_path, monkeypatch):
    """A warm cache counts without loading the tokenizer; the counts are the tokenizer's."""
    import shutil

    import icm.checks as checks

    folder = tmp_path / "tokenizer"
    shutil.copytree(TOY / "tokenizer", folder)
    prompts = ["a circle", "a b c d e f g h"]
    monkeypatch.setenv("ICM_CODE_CACHE", "")
    plain = checks.token_counts(str(folder), prompts)
    monkeypatch.setenv("ICM_CODE_CACHE", str(tmp_path / "cache"))
    assert checks.token_counts(str(folder), prompts) == plain
    assert plain[1]["a b c d e f g h"] == 10 and plain[0] == 8

    def unused(folder):
        raise AssertionError("a warm cache loads no tokenizer")

    monkeypatch.setattr(checks, "_tokenizer", unused)
    assert checks.token_counts(str(folder), prompts) == plain
    with pytest.raises(AssertionError):  # a new prompt is counted by the tokenizer
        checks.token_counts(str(folder), ["a square"])
