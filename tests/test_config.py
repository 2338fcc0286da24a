"""config.yaml against its schema: every key documented, defaults filled, bad input refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "config.schema.yaml"


def config():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def walk(schema, path="config"):
    """Yield (path, subschema) for every property in the schema."""
    for name, sub in schema.get("properties", {}).items():
        yield f"{path}.{name}", sub
        yield from walk(sub, f"{path}.{name}")
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        yield from walk(extra, f"{path}.<name>")


def test_every_key_has_a_description_and_a_default():
    schema = yaml.safe_load(SCHEMA.read_text())
    keys = list(walk(schema))
    assert len(keys) > 20
    for path, sub in keys:
        assert sub.get("description"), f"{path} has no description"
        assert "default" in sub, f"{path} has no default"


def test_config_validates_and_defaults_are_filled():
    cfg = config()
    validate(cfg, str(SCHEMA))
    assert cfg["models"]["sd15"]["n_shards"] == 4
    assert cfg["models"]["sana"]["scheduler"] == "default"  # filled in from the schema
    # The paper's sampler, named: the SD checkpoints ship PNDM, whose 50 steps are 51 calls.
    assert cfg["models"]["sd15"]["scheduler"] == cfg["models"]["sdxl"]["scheduler"] == \
        "DDIMScheduler" == cfg["models"]["tiny-sd15"]["scheduler"]
    assert cfg["steering"]["sites_per"] == "pair"
    assert set(cfg["models"]) >= {"sd15", "sdxl", "sana", "flux", "toy", "tiny-sd15"}


@pytest.mark.parametrize("mutate", [
    lambda c: c["models"]["sd15"].update(dtype="float8"),
    lambda c: c["models"]["sd15"].update(stepz=3),
    lambda c: c["concepts"]["gender"].update(prompts=[""]),  # none at all: icm.checks
    lambda c: c["generation"].update(base_seed=-1),
    lambda c: c["probes"].update(steer_start=80),   # of 50: was clamped to the last step
    lambda c: c["models"].update({"bad name": {"family": "sd15"}}),
    # A misspelt key of the evaluation's labeler (weight: for weights:), checked by the
    # concept labeler's schema.
    lambda c: c["concepts"]["gender"]["evaluation"]["labeler"].update(weight="x.pt"),
    lambda c: c["concepts"]["gender"]["evaluation"].update(labeler={"type": "fairfce"}),
    # Class names become paths and wildcards (target-{class}, pairs joined by '-').
    lambda c: c["concepts"]["gender"].update(classes=["woman", "men/boys"]),
    lambda c: c["concepts"]["gender"].update(classes=["woman", "older man"]),
])
def test_bad_config_is_refused(mutate):
    cfg = copy.deepcopy(config())
    mutate(cfg)
    with pytest.raises(WorkflowError, match="validating"):
        validate(cfg, str(SCHEMA))
