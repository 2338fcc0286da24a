"""Jobs of the toy world: train its model and feature extractor, measure its quality."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from icm.generation.shard import SamplerSettings
from icm.io.atomic import write_json
from icm.models.devices import resolve_device
from icm.models.loading import ModelSpec, load_pipeline

log = logging.getLogger("icm")


def train_toy_job(
    world: Mapping[str, Any], train: Mapping[str, Any], output: str | Path, threads: int = 2
) -> None:
    """Train the toy diffusion model from scratch (GPU if present) and save it."""
    from icm.toy.train import ToyTrainConfig, save_toy, train_toy
    from icm.toy.world import WorldConfig

    torch.set_num_threads(threads)
    config = ToyTrainConfig(**train, world=WorldConfig(**world))
    pipe, record = train_toy(config, device=str(resolve_device("auto")))
    save_toy(pipe, record, output)
    log.info("trained toy model in %.0f s, final loss %.4f", record["wall_seconds"],
             record["final_loss"])



def train_toy_features_job(
    world: Mapping[str, Any], features: Mapping[str, Any], output: str | Path, threads: int = 2
) -> None:
    """Train the toy world's feature extractor (for FID-style metrics) and save it."""
    from icm.toy.features import save_feature_net, train_feature_net
    from icm.toy.world import WorldConfig

    net = train_feature_net(WorldConfig(**world), n_train=features["n_train"],
                            steps=features["steps"], seed=features["seed"], num_threads=threads)
    save_feature_net(net, output)



def toy_quality_job(
    model_name: str, model: Mapping[str, Any], source: str, output_json: str | Path,
    output_markdown: str | Path, n_per_prompt: int = 64, threads: int = 2,
) -> None:
    """Oracle read-out of the toy model's fidelity and planted bias (docs/toy.md)."""
    from icm.toy.quality import measure_quality, quality_markdown

    torch.set_num_threads(threads)
    spec = ModelSpec.from_config(model_name, {**model, "source": source})
    pipe = load_pipeline(spec, device="auto")
    settings = SamplerSettings.of(spec)
    result = measure_quality(pipe, settings, n_per_prompt=n_per_prompt,
                             batch_size=model["batch_size"])
    result["model"] = {"name": model_name, "source": source}
    write_json(output_json, result)
    Path(output_markdown).write_text(quality_markdown(result) + "\n")
