"""The model-family table: what differs between SD1.5, SDXL, SANA, FLUX and the toy model.

Everything that depends on the architecture is a row here, so capture, steering, ranking and
listing read one table instead of branching on the family name:

* **site kinds**: which modules are sites (a pattern on the diffusers module path), what to
  call them, and where the image stream is in their output (the tensor itself, or one
  element of a tuple: FLUX's blocks return ``(text, image)``, joint attention returns
  ``(image, text)``); the UNets' bottleneck (``mid_block``, kind ``h-space``) is a baseline
  kind, steered only by its own selection;
* **families**: the denoiser attribute and class, the kinds it has, the kinds the layer
  selections steer (``top``, ``random``, ``worst``: self-attention for UNets and SANA, the
  block outputs for FLUX, as the ICM paper's appendix F), the forward order of top-level
  module groups, and the guidance layout (``batched``: one ``[uncond, cond]`` batch per
  step; ``embedded``: FLUX.1-dev's guidance embedding, every row conditional), and the
  scale of the timestep the denoiser is given (FLUX's pipeline passes ``t / 1000``); with
  ``separate_uncond``, a second denoiser call at the same timestep is a separate
  unconditional branch (FLUX with ``true_cfg_scale > 1``), which hooks skip; ``schedule``
  names how the pipeline sets its timesteps (FLUX's shift by the image's token count);
  ``text_encoding`` how a prompt becomes the text positions cross-attention attends to
  (SANA's instruction prefix and Gemma tokens, FLUX's T5 tokens, ``icm.head_maps.tokens``),
  ``map_kind`` the sites whose heads give word maps (FLUX: the joint attention), and
  ``text_projection`` the denoiser's modules the encoder's states pass before any
  cross-attention (SANA's caption projection and norm).

Full-size configs of each family's denoiser are in ``icm.models.configs``.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch is imported where tensors are met: the Snakefile reads this table
    import torch
    from torch import nn

Guidance = Literal["batched", "embedded"]


@dataclass(frozen=True)
class SiteKind:
    """Modules of one kind: ``pattern`` fully matches their module paths; the image stream
    of their output is the tensor itself, or element ``image`` of a tuple."""

    name: str
    label: str
    pattern: str
    image: int = 0
    width: str = "to_out.0"  # the submodule whose out_features (out_channels) is the width
    # A baseline kind (the UNet bottleneck) is captured, probed and ranked like any site,
    # but only its own selection steers it: not `top`, `random`, `worst` nor `all`.
    baseline: bool = False

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None


#: Every site kind, in the order kinds are tried when a path is classified.
KINDS: dict[str, SiteKind] = {k.name: k for k in (
    SiteKind("attn1", "self-attention", r"(?:.+\.)?attn1"),
    SiteKind("attn2", "cross-attention", r"(?:.+\.)?attn2"),
    SiteKind("single", "single-stream block", r"single_transformer_blocks\.\d+", image=1,
             width="proj_out"),
    SiteKind("double", "double-stream block", r"transformer_blocks\.\d+", image=1,
             width="ff.net.2"),
    # The joint attention inside a double-stream block (FLUX): image and text queries over
    # one sequence of text and image keys. Not captured nor steered (the block is); its
    # image-query to text-key probabilities are the family's word maps (``Family.map_kind``).
    SiteKind("joint", "joint attention (image queries to text keys)",
             r"transformer_blocks\.\d+\.attn"),
    # The UNet bottleneck, the mid-block output (B, C, H, W) that h-space methods edit
    # (arXiv:2210.10960, Asyrp): pooled over positions and steered at every position.
    SiteKind("h-space", "bottleneck (mid-block output)", r"mid_block", width="resnets.1.conv2",
             baseline=True),
)}


@dataclass(frozen=True)
class Family:
    """One architecture family (see the module docstring)."""

    name: str
    denoiser: str  # pipeline attribute: "unet" or "transformer"
    denoiser_class: str
    kinds: tuple[str, ...]
    steer_kinds: tuple[str, ...]
    guidance: Guidance
    order: tuple[str, ...] = ()  # top-level module groups in forward order (others: 1)
    timestep_scale: float = 1.0  # scheduler timestep = what the denoiser is given x this
    separate_uncond: bool = False  # a second denoiser call per step can be the uncond branch
    cross_kind: str | None = "attn2"  # what the `cross` selection steers (None: no such sites)
    # how the pipeline sets timesteps (icm.hooks.clock.pipeline_timesteps)
    schedule: str = "scheduler"
    text_encoding: str = "padded"  # which token is at each text position (icm.head_maps.tokens)
    text_projection: tuple[str, ...] = ()  # denoiser modules the text states pass before attn2
    # What LoRA finetuning (icm.finetuning.lora) trains the denoiser to predict: "noise", the
    # scheduler's prediction type on noised latents (epsilon or v); "flow", the velocity
    # noise - x0 of rectified flow (SANA, FLUX). The projections of a site it adapts; how
    # the denoiser takes latents ("grid": (B, C, H, W); "packed": FLUX's 2 x 2 patch
    # tokens); and the inputs shared by every row (FLUX's 2-d position ids).
    objective: str = "noise"
    lora_projections: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    latent_layout: str = "grid"
    # The diffusers pipeline classes of this family (model_index.json's `_class_name`), so a
    # model folder names its family (`python -m icm sites FOLDER`).
    pipelines: tuple[str, ...] = ()
    # The tokenizer (pipeline subfolder) of the text encoder whose positions the denoiser
    # reads, and how many tokens it keeps: the tokenizer's own length, or where the pipeline
    # sets it, (its argument, the default) (icm.checks.prompt_problems).
    prompt_tokenizer: str = "tokenizer"
    prompt_length: tuple[str, int] | None = None
    shared_inputs: tuple[str, ...] = ()
    # Where per-head word maps are read (icm.hooks.head_maps): cross-attention, or FLUX's
    # joint attention (its image queries' probabilities on the text keys); None: nowhere.
    map_kind: str | None = "attn2"

    def selects(self, selection: str) -> bool:
        """Whether a layer selection exists in this family: ``cross`` needs cross-attention
        sites, which FLUX's joint attention has none of; ``h-space`` a UNet bottleneck."""
        if selection == "cross":
            return self.cross_kind is not None
        if selection == "h-space":
            return "h-space" in self.kinds
        return True


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd15", "unet", "UNet2DConditionModel", ("attn1", "attn2", "h-space"),
           ("attn1",), "batched",
           ("down_blocks", "mid_block", "up_blocks"), pipelines=("StableDiffusionPipeline",)),
    Family("sdxl", "unet", "UNet2DConditionModel", ("attn1", "attn2", "h-space"),
           ("attn1",), "batched",
           ("down_blocks", "mid_block", "up_blocks"), pipelines=("StableDiffusionXLPipeline",)),
    Family("toy", "unet", "UNet2DConditionModel", ("attn1", "attn2", "h-space"),
           ("attn1",), "batched",
           ("down_blocks", "mid_block", "up_blocks"), pipelines=("ToyPipeline",)),
    Family("sana", "transformer", "SanaTransformer2DModel", ("attn1", "attn2"), ("attn1",),
           "batched", text_encoding="sana",
           text_projection=("caption_projection", "caption_norm"), objective="flow",
           pipelines=("SanaPipeline",), prompt_length=("max_sequence_length", 300)),
    Family("flux", "transformer", "FluxTransformer2DModel", ("double", "single"),
           ("double", "single"), "embedded", ("transformer_blocks", "single_transformer_blocks"),
           timestep_scale=1000.0, separate_uncond=True, cross_kind=None, schedule="flux",
           objective="flow", lora_projections=("attn.to_q", "attn.to_k", "attn.to_v"),
           latent_layout="packed", shared_inputs=("txt_ids", "img_ids"),
           pipelines=("FluxPipeline",), prompt_tokenizer="tokenizer_2",
           prompt_length=("max_sequence_length", 512), text_encoding="t5", map_kind="joint"),
)}


def family_of_folder(folder: str | Path) -> Family | None:
    """The family of a diffusers model folder, by the pipeline class its
    ``model_index.json`` names; None where there is none or no family claims it."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    name = json.loads(index.read_text()).get("_class_name")
    return next((f for f in FAMILIES.values() if name in f.pipelines), None)


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(denoiser: nn.Module) -> Family:
    """The (first) family whose denoiser class this is: families sharing a class (the UNets)
    share their site kinds and order, which is all a denoiser alone decides. Another class
    is an error naming it (an SD3 transformer must not be read as a UNet)."""
    cls = type(denoiser).__name__
    for family in FAMILIES.values():
        if family.denoiser_class == cls:
            return family
    raise ValueError(f"no family has the denoiser class {cls}; the families' are "
                     f"{sorted({f.denoiser_class for f in FAMILIES.values()})}")


@functools.lru_cache(maxsize=4096)
def kind_of(site: str, family: Family | None = None) -> SiteKind:
    """The kind of a site path: among ``family``'s kinds, or among all kinds (cached: the
    hooks ask on every call)."""
    names = family.kinds if family else tuple(KINDS)
    for name in names:
        if KINDS[name].matches(site):
            return KINDS[name]
    raise ValueError(f"{site!r} is no site of kinds {list(names)}")


def site_width(denoiser: nn.Module, site: str) -> int:
    """Channels of a site's image stream, read off the module (no forward pass: works on
    the meta device)."""
    module = denoiser.get_submodule(site).get_submodule(kind_of(site).width)
    return int(getattr(module, "out_features", None) or module.out_channels)


def image_stream(site: str, output: Any) -> torch.Tensor:
    """The image-stream hidden states in a site's output."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output:
        index = kind_of(site).image
        if index < len(output) and isinstance(output[index], torch.Tensor):
            return output[index]
    raise TypeError(f"{site}: cannot read hidden states from an output of type "
                    f"{type(output).__name__}")


def replace_image_stream(site: str, output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its image stream replaced by ``hidden`` (the rest untouched)."""
    if not isinstance(output, tuple):  # the tensor itself
        return hidden
    index = kind_of(site).image
    return (*output[:index], hidden, *output[index + 1:])
