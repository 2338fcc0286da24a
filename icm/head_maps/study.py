"""A head-map study of a concept (``concepts.<c>.head_maps``): its prompts with their word
slots, the train / held-out split, and the samples of each split.

Torch-free: the Snakefile reads it to plan jobs. Relevance is fitted on the train prompts and
judged on the held-out prompts, each split with its own seeds (the ``head-maps`` seed stream,
prompt indices running over the whole study, so no held-out image shares a seed with a train
image or with any image of the other stages).
"""

from __future__ import annotations

import itertools
import math
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from icm.generation.samples import Sample, plan_samples
from icm.models.families import kind_of

SPLITS = ("train", "held-out")
STREAM = "head-maps"


@dataclass(frozen=True)
class MapPrompt:
    """A fully specified prompt and the word of each of the study's slots in it."""

    prompt: str
    words: tuple[tuple[str, str], ...]  # (slot, word), in slot order

    @property
    def slot_words(self) -> list[str]:
        return [word for _, word in self.words]


def study_prompts(spec: Mapping[str, Any]) -> list[MapPrompt]:
    """Every prompt of the study: ``template`` filled with each combination of the ``slots``
    words, or the ``prompts`` list; each names the same slots, in one order."""
    if spec.get("template"):
        slots = dict(spec.get("slots") or {})
        fields = [name for _, name, _, _ in string.Formatter().parse(spec["template"]) if name]
        if sorted(set(fields)) != sorted(slots):
            raise ValueError(f"head_maps.template {spec['template']!r} names {fields}, but "
                             f"head_maps.slots are {list(slots)}")
        names = list(slots)
        out = [MapPrompt(spec["template"].format(**dict(zip(names, combo, strict=True))),
                         tuple(zip(names, combo, strict=True)))
               for combo in itertools.product(*slots.values())]
    else:
        out = [MapPrompt(p["prompt"], tuple(p["words"].items())) for p in spec.get("prompts", [])]
    if not out:
        return []
    names = [s for s, _ in out[0].words]
    for item in out:
        if [s for s, _ in item.words] != names:
            raise ValueError(f"head_maps.prompts: {item.prompt!r} has slots "
                             f"{[s for s, _ in item.words]}, the first prompt {names}")
        missing = [w for _, w in item.words if w.lower() not in item.prompt.lower()]
        if missing:
            raise ValueError(f"head_maps.prompts: {missing} not in prompt {item.prompt!r}")
    texts = [item.prompt for item in out]
    doubled = sorted({t for t in texts if texts.count(t) > 1})
    if doubled:
        raise ValueError(f"head_maps: prompts {doubled} appear more than once")
    return out


def slot_names(spec: Mapping[str, Any]) -> list[str]:
    prompts = study_prompts(spec)
    return [s for s, _ in prompts[0].words] if prompts else []


def has_study(spec: Mapping[str, Any] | None) -> bool:
    return bool(spec) and bool(study_prompts(spec))


def split_prompts(spec: Mapping[str, Any]) -> dict[str, list[tuple[int, MapPrompt]]]:
    """(study prompt index, prompt) of each split; both splits must be non-empty."""
    prompts = study_prompts(spec)
    held = list(spec.get("held_out") or [])
    unknown = sorted(set(held) - {p.prompt for p in prompts})
    if unknown:
        raise ValueError(f"head_maps.held_out: {unknown} are not prompts of the study")
    out = {"train": [(i, p) for i, p in enumerate(prompts) if p.prompt not in held],
           "held-out": [(i, p) for i, p in enumerate(prompts) if p.prompt in held]}
    empty = [name for name, items in out.items() if not items]
    if empty:
        raise ValueError(f"head_maps: the {empty} split has no prompts (held_out names the "
                         "held-out prompts; every other prompt trains)")
    return out


def split_samples(spec: Mapping[str, Any], split: str, base_seed: int) -> list[Sample]:
    """The samples of one split: ``<split>_samples_per_prompt`` per prompt, ``sample``
    numbered within the split, seeds from the study-wide prompt index."""
    if split not in SPLITS:
        raise ValueError(f"unknown head-map split {split!r}; splits are {list(SPLITS)}")
    per_prompt = spec[f"{split.replace('-', '_')}_samples_per_prompt"]
    texts = [p.prompt for p in study_prompts(spec)]
    everything = {(s.prompt_index, s.repeat): s
                  for s in plan_samples(texts, per_prompt, base_seed, STREAM)}
    out = []
    for index, _ in split_prompts(spec)[split]:
        for repeat in range(per_prompt):
            s = everything[(index, repeat)]
            out.append(Sample(len(out), s.prompt_index, s.repeat, s.prompt, s.seed))
    return out


def hrv_samples(spec: Mapping[str, Any], base_seed: int) -> list[Sample]:
    """The images HRV's votes are counted on where the study gives generic prompts
    (``hrv_prompts``, as HRV's 2,100): ``hrv_samples_per_prompt`` each, in the study's seed
    stream under their own prompt-set tag, so no seed is shared with a map image."""
    return plan_samples(list(spec.get("hrv_prompts") or []),
                        int(spec.get("hrv_samples_per_prompt", 1)), base_seed, STREAM,
                        prompt_set="hrv")


def words_of(spec: Mapping[str, Any], samples: list[Sample]) -> list[list[str]]:
    """Each sample's words, in slot order."""
    prompts = study_prompts(spec)
    return [prompts[s.prompt_index].slot_words for s in samples]


def hrv_concepts(spec: Mapping[str, Any]) -> dict[str, list[str]]:
    """HRV's concept word lists: ``hrv_words``, else each slot's distinct words."""
    if spec.get("hrv_words"):
        return {k: list(v) for k, v in spec["hrv_words"].items()}
    out: dict[str, list[str]] = {}
    for item in study_prompts(spec):
        for slot, word in item.words:
            out.setdefault(slot, [])
            if word not in out[slot]:
                out[slot].append(word)
    return out


def excluded(site: str, exclude: list[str]) -> bool:
    """Whether ``exclude`` (sites or module prefixes) leaves ``site`` out."""
    return any(site == e or site.startswith(e.rstrip(".") + ".") for e in exclude)


#: Why HRV's voting has no joint-attention form: its words are encoded alone and fed as the
#: keys of every site, but a joint attention's text keys are the text stream of the blocks
#: before it, which no word encoded alone has.
HRV_NEEDS_CROSS_ATTENTION = (
    "HRV's concept-word voting needs cross-attention, whose keys are the text encoder's "
    "states; {family}'s joint attention reads the text stream of the blocks before it, which "
    "no word encoded alone has: choose its heads by oracle, agreement, concentration or "
    "stability")


def hrv_refusal(family: Any) -> str | None:
    """Why HRV cannot vote on a family's word maps (``icm.models.families.Family``), None
    where it can: on cross-attention only."""
    if family.map_kind == "attn2":
        return None
    return HRV_NEEDS_CROSS_ATTENTION.format(family=family.name)


#: The sites a study's heads come from (`head_maps.sites`): DAAM's, or every one.
SITE_RULES = {
    "daam": "DAAM's sites: no mid block, no map of factor 8 (castorini/daam 0.2)",
    "every": "every word-map site (cross-attention; FLUX: joint attention)",
}


def daam_keeps(site: str, map_shape: tuple[int, int], default_size: int) -> bool:
    """DAAM's choice of cross-attention maps (castorini/daam 0.2, arXiv:2210.04885), as its
    tracer makes it: the mid block is never hooked, and a map of h x w positions is dropped
    when its factor int(sqrt(L // (h * w))) is 8, where L is DAAM's latent size, 4096 when
    the model's default image side (the denoiser's ``sample_size`` times the VAE's factor) is
    512 or 1024 px, else 9216. On SD1.5 at 512 px that drops only the mid block's 8 x 8
    maps; at other sizes it can drop whole levels. DAAM has no rule for joint attention
    (FLUX): every such site is kept."""
    if kind_of(site).name == "joint":
        return True
    if site == "mid_block" or site.startswith("mid_block."):
        return False
    latent = 4096 if default_size in (512, 1024) else 9216
    return int(math.sqrt(latent // (map_shape[0] * map_shape[1]))) != 8


def site_rule_text(rule: str, exclude: list[str], sites: list[str]) -> str:
    """The site rule as table.csv names it: DAAM's (or every site), what ``exclude`` left
    out, and, where the maps are joint attention (FLUX), that every such site is kept."""
    text = SITE_RULES[rule]
    if rule == "daam" and any(kind_of(s).name == "joint" for s in sites):
        text += "; every joint-attention site (DAAM has no rule for them)"
    return text + (f", without {', '.join(exclude)}" if exclude else "")


def kept_site(site: str, map_shape: tuple[int, int], default_size: int | None, rule: str,
              exclude: list[str]) -> bool:
    """Whether a site's maps enter the study: by the site rule, and not ``exclude``'d."""
    if rule not in SITE_RULES:
        raise ValueError(f"unknown head_maps.sites {rule!r}; use one of {list(SITE_RULES)}")
    if excluded(site, exclude):
        return False
    if rule == "daam":
        if default_size is None:
            raise ValueError("the store does not record the model's default image size "
                             "(`default_size`), which DAAM's site rule needs: capture again")
        return daam_keeps(site, map_shape, default_size)
    return True

