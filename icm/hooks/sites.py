"""Capture and steering sites: attention modules named by their diffusers module path.

A site is the path of a module inside the denoiser (``pipe.unet`` or ``pipe.transformer``),
e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn1``. Using the path verbatim keeps
results readable next to the diffusers source and stable across runs. Which modules are
sites, per family, is the family table's business (``icm.models.families``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from icm.models.families import KINDS, family_of, kind_of

#: Site kind -> what it is, for every family (``icm.models.families.KINDS``).
SITE_KINDS: dict[str, str] = {name: kind.label for name, kind in KINDS.items()}


def denoiser_of(pipe: object) -> nn.Module:
    """The pipeline's denoising network: a UNet for SD/SDXL, a transformer for SANA/FLUX."""
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer` module")


def site_kind(site: str) -> str:
    """The kind of a site path (``attn1``, ``attn2``, ``double``, ``single``)."""
    return kind_of(site).name


def list_sites(denoiser: nn.Module, kinds: Iterable[str] | None = None) -> list[str]:
    """All sites of the given kinds (default: every kind of the denoiser's family; its word-map
    kind may be asked for too), in
    forward order: registration order within a top-level group, groups in the family's
    forward order (UNets register ``mid_block`` after ``up_blocks``), a site that holds
    others after them."""
    family = family_of(denoiser)
    wanted = tuple(family.kinds if kinds is None else kinds)
    known = list(dict.fromkeys([*family.kinds, *filter(None, [family.map_kind])]))
    unknown = set(wanted) - set(known)
    if unknown:
        raise ValueError(f"unknown site kinds {sorted(unknown)} for {family.name}; "
                         f"known: {known}")
    rank = {group: i for i, group in enumerate(family.order)}
    names = [name for name, _ in denoiser.named_modules()
             if name and any(KINDS[k].matches(name) for k in wanted)]
    # A site holding other sites (the bottleneck ``mid_block`` around its attention) returns
    # after them: it goes after its last descendant, as its forward hook fires.
    position = {}
    for i, name in enumerate(names):
        inner = [j for j, other in enumerate(names) if other.startswith(name + ".")]
        position[name] = max(inner) + 0.5 if inner else i
    return sorted(names, key=lambda name: (rank.get(name.split(".", 1)[0], 1), position[name]))


def resolve_sites(denoiser: nn.Module, sites: Sequence[str]) -> dict[str, nn.Module]:
    """Map site names to modules, failing with the list of valid names on a typo."""
    modules = dict(denoiser.named_modules())
    missing = [s for s in sites if s not in modules]
    if missing:
        valid = ", ".join(list_sites(denoiser)) or "(none)"
        raise KeyError(f"unknown sites {missing}; this model's sites are: {valid}")
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate sites in {list(sites)}")
    return {s: modules[s] for s in sites}

