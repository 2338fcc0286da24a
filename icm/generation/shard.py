"""Generate a shard of samples: PNG images, a sample table and an activation store.

Everything is written under temporary names and moved into place at the end, so a failed or
killed job leaves nothing that looks finished.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from icm.generation.samples import SAMPLE_COLUMNS, Sample
from icm.hooks.capture import capture_activations
from icm.hooks.clock import pipeline_timesteps, same_timesteps, train_timesteps
from icm.hooks.sites import denoiser_of, list_sites
from icm.io.activations import ActivationStoreWriter
from icm.io.atomic import atomic_directory, write_table
from icm.io.provenance import package_versions
from icm.models.families import family_of
from icm.models.loading import check_own_arguments

#: What the stored rows are, per guidance layout of the family table.
GUIDANCE_ROWS = {
    "batched": "conditional (second half of the [uncond, cond] batch; every row when "
               "guidance is off)",
    "embedded": "every row (the guidance is an embedding: no unconditional rows)",
}


@dataclass(frozen=True)
class SamplerSettings:
    """How each image is denoised; recorded in every artifact. ``arguments``: the model's
    further pipeline arguments (``models.<m>.pipeline_arguments``, e.g. SANA's
    ``use_resolution_binning``), passed to every call."""

    steps: int
    guidance_scale: float
    resolution: int
    arguments: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        check_own_arguments(self.arguments)

    @classmethod
    def of(cls, spec: Any) -> SamplerSettings:
        """The settings of a ``ModelSpec``."""
        return cls(spec.steps, spec.guidance_scale, spec.resolution,
                   dict(spec.pipeline_arguments))

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "height": self.resolution,
            "width": self.resolution,
            **self.arguments,
        }

    def record(self) -> dict[str, Any]:
        """What artifacts record (JSON-ready)."""
        return {"steps": self.steps, "guidance_scale": self.guidance_scale,
                "resolution": self.resolution, "arguments": dict(self.arguments)}


def generators(samples: Sequence[Sample]) -> list[torch.Generator]:
    """One CPU generator per sample: diffusers draws each latent from its own generator on
    the CPU, so an image depends on its seed only (not batch, shard or device)."""
    return [torch.Generator("cpu").manual_seed(s.seed) for s in samples]


def generate_images(
    pipe: Any, samples: Sequence[Sample], settings: SamplerSettings, **extra: Any
) -> list[Image.Image]:
    """Plain generation of ``samples`` in one pipeline call (no hooks)."""
    result = pipe(
        prompt=[s.prompt for s in samples],
        generator=generators(samples),
        output_type="pil",
        **settings.pipeline_kwargs(),
        **extra,
    )
    return list(result.images)


def batches(items: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    if size < 1:
        raise ValueError("batch size must be at least 1")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def image_name(sample: Sample) -> str:
    return f"{sample.sample:06d}.png"


def generate_shard(
    pipe: Any,
    samples: Sequence[Sample],
    settings: SamplerSettings,
    images_dir: str | Path,
    table_path: str | Path,
    store_path: str | Path,
    *,
    batch_size: int = 8,
    sites: Sequence[str] | None = None,
    store_dtype: str = "float32",
    chunk_samples: int = 128,
    attrs: dict[str, Any] | None = None,
    progress: bool = True,
) -> None:
    """Generate ``samples`` in batches with capture on, writing images, table and store.

    ``images_dir`` and ``store_path`` must not exist. Image paths in the table are relative
    to the table's folder, so a results folder can be moved as a whole.
    """
    images_dir, table_path = Path(images_dir), Path(table_path)
    sites = list(sites) if sites is not None else list_sites(denoiser_of(pipe))
    planned = pipeline_timesteps(pipe, settings.steps, settings.resolution)
    attrs = {
        **(attrs or {}),
        "sites": sites,
        "n_samples": len(samples),
        "sampler": settings.record(),
        # The step axis is the pipeline's loop: PNDM runs 51 iterations for 50 steps.
        "denoising_steps": len(planned),
        "num_train_timesteps": train_timesteps(pipe.scheduler),
        "scheduler": {"class": type(pipe.scheduler).__name__,
                      "config": {k: v for k, v in pipe.scheduler.config.items()
                                 if not k.startswith("_")}},
        "pooling": "mean over image tokens of each site's output (its image stream)",
        "cfg_half": GUIDANCE_ROWS[family_of(denoiser_of(pipe)).guidance],
        "store_dtype": store_dtype,
        "versions": package_versions(),
    }
    rows: list[dict[str, object]] = []
    rel_images = Path(_relpath(images_dir, table_path.parent))
    with (
        atomic_directory(images_dir) as partial_images,
        ActivationStoreWriter(store_path, samples, attrs, store_dtype, chunk_samples) as store,
        capture_activations(pipe, sites) as cap,
        tqdm(total=len(samples), desc="generate", unit="img", file=sys.stderr,
             disable=not progress) as bar,
    ):
        partial_images.mkdir()
        for batch in batches(samples, batch_size):
            images = generate_images(pipe, batch, settings)
            captured = cap.pop()
            if not same_timesteps(captured.timesteps, planned):  # the plan steering relies on
                raise RuntimeError(
                    f"the pipeline ran timesteps {captured.timesteps.round(1).tolist()}, but "
                    f"{type(pipe.scheduler).__name__} planned {planned.round(1).tolist()}: "
                    "icm.hooks.clock.pipeline_timesteps does not know how this pipeline sets them")
            store.write(captured)
            for sample, image in zip(batch, images, strict=True):
                image.save(partial_images / image_name(sample))
                rows.append({**sample.as_row(), "image": str(rel_images / image_name(sample))})
            bar.update(len(batch))
    write_table(table_path, rows, SAMPLE_COLUMNS)


def _relpath(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())
