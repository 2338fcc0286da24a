"""Prompt injection read as a localization (the paper's section 4.5, appendix H): which
prompt each concept class is injected with, and how often injecting at a site flips the
image's label."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: samples.csv of an injection run: the sample's plan, then where and what was injected
#: (site and class empty for the uninjected baseline of each seed).
INJECTION_COLUMNS = ["sample", "prompt_index", "repeat", "prompt", "seed", "site",
                     "injected_class", "injected_prompt", "image"]


def injected_prompts(concept: Mapping[str, Any]) -> dict[str, str]:
    """Class -> the prompt injected for it: ``injection.injected``, else each class's first
    specific prompt; every class needs one."""
    chosen = dict(concept["injection"].get("injected") or {})
    for name, prompts in (concept.get("specific_prompts") or {}).items():
        chosen.setdefault(name, prompts[0])
    missing = [c for c in concept["classes"] if c not in chosen]
    if missing:
        raise ValueError(f"no prompt to inject for {missing}: set injection.injected or "
                         "specific_prompts for them")
    return {c: chosen[c] for c in concept["classes"]}


def flip_table(samples: Any, labels: Any) -> Any:
    """Per (site, injected class): the images, how many seeds' uninjected image is not that
    class (``eligible``), how many of those the injection turned into it (``flips``), the
    ``flip_rate`` (flips / eligible) and ``share_class``, the injected images of that class."""
    import pandas as pd

    table = samples.merge(labels[["sample", "label"]], on="sample", validate="one_to_one")
    base = table[table["site"] == ""].set_index(["prompt_index", "repeat"])["label"]
    injected = table[table["site"] != ""].copy()
    injected["before"] = base.reindex(
        pd.MultiIndex.from_frame(injected[["prompt_index", "repeat"]])).to_numpy()
    injected["eligible"] = injected["before"] != injected["injected_class"]
    injected["is_class"] = injected["label"] == injected["injected_class"]
    injected["flip"] = injected["eligible"] & injected["is_class"]
    flips = (injected.groupby(["site", "injected_class"], sort=False)
             .agg(images=("sample", "size"), eligible=("eligible", "sum"),
                  flips=("flip", "sum"), share_class=("is_class", "mean"))
             .reset_index())
    flips["flip_rate"] = flips["flips"] / flips["eligible"].where(flips["eligible"] > 0)
    return flips
