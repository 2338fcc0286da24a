"""Load the pipeline a config entry names, failing with an actionable message.

Compute nodes usually have no internet, so a missing model must say where we
looked and how to put the weights there, instead of a bare hub traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import diffusers
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError

from icm.hooks.clock import check_scheduler
from icm.models.devices import resolve_device  # noqa: F401 (re-exported)

Family = Literal["sd15", "sdxl", "sana", "flux", "toy"]
DType = Literal["float32", "float16", "bfloat16"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# "owner/name" or a bare legacy name such as "gpt2".
_REPO_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")
# Errors meaning "the files are not here / the hub cannot be reached"; others propagate.
_NOT_AVAILABLE = (OSError, EntryNotFoundError)


#: Pipeline arguments the workflow sets itself, which ``pipeline_arguments`` may not name.
OWN_ARGUMENTS = frozenset({"prompt", "generator", "output_type", "num_inference_steps",
                           "guidance_scale", "height", "width", "num_images_per_prompt",
                           "latents", "return_dict"})


def check_own_arguments(arguments: Mapping[str, Any]) -> None:
    taken = sorted(OWN_ARGUMENTS & set(arguments))
    if taken:
        raise ValueError(f"pipeline_arguments may not set {taken}: the workflow sets them "
                         "(steps, guidance_scale and resolution are model keys)")


def check_pipeline_arguments(pipeline: type, arguments: Mapping[str, Any]) -> None:
    """Refuse arguments the pipeline's ``__call__`` does not take, before any image (the
    workflow's own arguments are refused earlier, by ``check_own_arguments``)."""
    accepted = inspect.signature(pipeline.__call__).parameters
    unknown = sorted(set(arguments) - set(accepted))
    if unknown:
        raise ValueError(f"{pipeline.__name__} takes no argument {unknown} "
                         "(models.<name>.pipeline_arguments in config.yaml)")


class ModelNotAvailableError(RuntimeError):
    """The weights are neither at the given path nor in the local HF cache."""


@dataclass(frozen=True)
class ModelSpec:
    """One ``models.<name>`` entry of config.yaml."""

    name: str
    family: Family
    source: str  # hub id ("owner/name") or path to a diffusers directory
    dtype: DType = "float16"
    steps: int = 30
    guidance_scale: float = 7.5
    resolution: int = 512
    scheduler: str = "default"  # or a diffusers scheduler class name
    variant: str | None = None
    pipeline_arguments: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.family not in get_args(Family):
            families = get_args(Family)
            raise ValueError(f"model {self.name!r}: family {self.family!r} not in {families}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"model {self.name!r}: dtype {self.dtype!r} not in {tuple(_DTYPES)}")

    @classmethod
    def from_config(cls, name: str, mapping: Mapping[str, Any]) -> ModelSpec:
        """Build from a ``models.<name>`` mapping.

        Keys that are not fields (batch_size, n_shards, resources, builder, ...)
        belong to the workflow and are ignored; the config schema checks them.
        """
        fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
        values = {k: v for k, v in mapping.items() if k in fields}
        for key, cast in (("steps", int), ("guidance_scale", float), ("resolution", int)):
            if key in values:
                values[key] = cast(values[key])
        if "source" not in values:
            raise ValueError(f"model {name!r}: no 'source' (hub id or local diffusers directory)")
        values["source"] = str(values["source"])
        values["pipeline_arguments"] = dict(values.get("pipeline_arguments") or {})
        return cls(name=name, **values)


def _scheduler_class(name: str) -> type[SchedulerMixin]:
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(
            n for n in dir(diffusers)
            if n.endswith("Scheduler") and isinstance(getattr(diffusers, n, None), type)
        )  # fmt: skip
        raise ValueError(f"unknown scheduler {name!r}; use 'default' or one of: {', '.join(known)}")
    return cls


def _looks_like_path(source: str) -> bool:
    if source.startswith(("/", "./", "../", "~")) or source in (".", ".."):
        return True
    seps = {os.sep, os.altsep} - {None}
    return any(s in source for s in seps) and not _REPO_ID.match(source)


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "")
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or hf_constants.is_offline_mode()


def _not_available(
    spec: ModelSpec, tried: str, why: str, *, local: bool = False
) -> ModelNotAvailableError:
    config_hint = f"point `models.{spec.name}.source` in config.yaml at a local diffusers directory"
    if local:
        how = [f"create that directory (e.g. `save_pretrained`), or {config_hint} or a hub id."]
    else:
        how = [
            f"on a machine with internet run `hf download {spec.source}`, then copy that",
            "  machine's HF cache into the directory above (or set HF_HUB_CACHE), or",
            f"{config_hint}.",
        ]
    return ModelNotAvailableError(
        f"model {spec.name!r} is not available: {why}\n"
        f"  tried: {tried}\n"
        f"  HF cache looked in: {hf_constants.HF_HUB_CACHE}\n"
        "To provide the weights:\n  " + "\n  ".join(how)
    )


def pipeline_class(family: str) -> type[DiffusionPipeline]:
    """The class that loads a family: diffusers picks SD/SDXL/SANA/FLUX from model_index.json;
    the toy pipeline is ours, so diffusers cannot find it by name."""
    if family == "toy":
        from icm.toy.pipeline import ToyPipeline

        return ToyPipeline
    return DiffusionPipeline


def _from_hub(spec: ModelSpec, **kwargs: Any) -> DiffusionPipeline:
    """Cache first; one online try only when allowed (it fails fast without a network)."""
    cls = pipeline_class(spec.family)
    try:
        return cls.from_pretrained(spec.source, local_files_only=True, **kwargs)
    except _NOT_AVAILABLE as cached_error:
        if _offline():
            raise _not_available(
                spec, f"hub id {spec.source!r} (HF_HUB_OFFLINE is set)", "not in the local cache"
            ) from cached_error
    try:
        return cls.from_pretrained(spec.source, **kwargs)
    except _NOT_AVAILABLE as online_error:
        raise _not_available(
            spec, f"hub id {spec.source!r}", "not in the local cache and the download failed"
        ) from online_error


#: Denoisers of families this project does not have, with why (one sentence each).
REFUSED = {
    "SD3Transformer2DModel": "Stable Diffusion 3 and 3.5 (MMDiT) are not supported: their "
    "text and image streams meet in joint attention, which none of the families' site kinds "
    "reads (their `attn2` is image-only self-attention in SD3.5, absent in SD3-medium), so "
    "capture and steering would silently miss the text stream",
}


def check_denoiser(pipe: DiffusionPipeline, spec: ModelSpec) -> None:
    """The loaded denoiser is the configured family's: a model of another architecture
    would be read with the wrong site kinds (an SD3 model taken for SD1.5), so it stops
    here, naming the class and the family."""
    from icm.models.families import FAMILIES, family_named

    family = family_named(spec.family)
    denoiser = getattr(pipe, family.denoiser, None)
    if denoiser is None:  # the denoiser under the other families' attribute, if any
        denoiser = next((d for a in ("unet", "transformer")
                         if (d := getattr(pipe, a, None)) is not None), None)
    cls = type(denoiser).__name__
    pipeline = type(pipe).__name__
    if cls == family.denoiser_class:
        # The UNet families share a denoiser class: their pipelines tell them apart.
        others = [f.name for f in FAMILIES.values() if pipeline in f.pipelines]
        if family.pipelines and pipeline not in family.pipelines and others:
            raise ValueError(f"model {spec.name!r} ({spec.source}) is configured as family "
                             f"{spec.family!r} but is a {pipeline}, family {others[0]}'s: "
                             f"set `family: {others[0]}`")
        return
    if cls in REFUSED:
        raise ValueError(f"model {spec.name!r} ({spec.source}): its denoiser is {cls}. "
                         f"{REFUSED[cls]}.")
    known = [f.name for f in FAMILIES.values() if pipeline in f.pipelines] or \
        [f.name for f in FAMILIES.values() if f.denoiser_class == cls]
    hint = f"; it is family {known[0]}'s: set `family: {known[0]}`" if known else ""
    raise ValueError(f"model {spec.name!r} ({spec.source}) is configured as family "
                     f"{spec.family!r}, whose denoiser (pipe.{family.denoiser}) is a "
                     f"{family.denoiser_class}, but it loaded a {cls}{hint}")


def load_pipeline(spec: ModelSpec, device: str | torch.device = "auto") -> DiffusionPipeline:
    """Load ``spec.source`` (local directory or hub id) ready for inference on ``device``."""
    target = resolve_device(device)
    check_own_arguments(spec.pipeline_arguments)
    scheduler_cls = None if spec.scheduler == "default" else _scheduler_class(spec.scheduler)
    dtype = _DTYPES[spec.dtype]
    if dtype == torch.float16 and target.type == "cpu":
        warnings.warn(
            f"model {spec.name!r}: float16 on CPU is slow or unsupported; using float32",
            stacklevel=2,
        )
        dtype = torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.variant is not None:
        kwargs["variant"] = spec.variant

    local = Path(spec.source).expanduser()
    if local.is_dir():
        pipe = pipeline_class(spec.family).from_pretrained(str(local), **kwargs)
    elif _looks_like_path(spec.source):
        raise _not_available(spec, f"local path {str(local)!r}", "no such directory", local=True)
    else:
        pipe = _from_hub(spec, **kwargs)

    check_denoiser(pipe, spec)  # before any work: a model taken for another family
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    check_scheduler(pipe.scheduler)  # before any work: order-2 schedulers are refused
    check_pipeline_arguments(type(pipe), spec.pipeline_arguments)
    pipe.set_progress_bar_config(disable=True)  # callers draw their own progress
    return pipe.to(target)
