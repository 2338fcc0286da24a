"""A model's denoiser on the meta device: its sites and widths without weights or memory.

``python -m icm sites MODEL`` uses it: the full-size architecture from the configs written
out in ``icm.models.configs`` (real models), or the ``config.json`` of a local model folder
(the toy model, the built tiny replicas, a local checkout of real weights).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icm.hooks.sites import list_sites
from icm.models.configs import DENOISER_CONFIGS
from icm.models.families import Family, family_named, kind_of, site_width


def denoiser_config(name: str, model: Mapping[str, Any]) -> tuple[Family, dict[str, Any], str]:
    """(family, denoiser config, where it came from) of config entry ``model`` (named
    ``name``): a local folder's ``{unet,transformer}/config.json`` when the model has one
    (its ``source``, or ``results/models/{name}`` for a built replica), else the family's
    full-size config."""
    family = family_named(model["family"])
    folder = Path(model["source"]) if model.get("source") else (
        Path("results/models") / name if model.get("builder") else None)
    if folder is not None and (folder / family.denoiser / "config.json").is_file():
        path = folder / family.denoiser / "config.json"
        return family, json.loads(path.read_text()), str(path)
    if model.get("builder"):
        raise FileNotFoundError(f"{name} is built by the workflow: run `snakemake --cores 2 "
                                f"results/models/{name}` first")
    if family.name not in DENOISER_CONFIGS:
        raise FileNotFoundError(f"{name}: no {family.denoiser}/config.json under "
                                f"{model.get('source')!r} and no built-in {family.name} config")
    return family, DENOISER_CONFIGS[family.name](), f"icm.models.configs ({family.name})"


def denoiser_on_meta(config: Mapping[str, Any]) -> nn.Module:
    """The denoiser a diffusers config describes, built on the meta device."""
    import diffusers

    values = {k: v for k, v in config.items() if not k.startswith("_")}
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        return cls.from_config(values)


def site_table(denoiser: nn.Module) -> list[dict[str, Any]]:
    """One row per site in forward order: site, kind, what the kind is, width."""
    return [{"site": s, "kind": kind_of(s).name, "label": kind_of(s).label,
             "width": site_width(denoiser, s)} for s in list_sites(denoiser)]
