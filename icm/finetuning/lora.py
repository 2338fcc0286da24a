"""ICM finetuning: LoRA (peft) on the attention projections of chosen sites only (the
paper's section 3.2 and appendix C; LoRA: arXiv:2106.09685, "LoRA: Low-Rank Adaptation of
Large Language Models").

The training set pairs images generated from class-specific prompts ("a photo of a woman")
with a general prompt ("a photo of a person"), classes mixed per the target distribution, so
the adapted model answers the general prompt with that mix. The loss is the standard one of
the model's own scheduler: noise the image's latents (the VAE's, or the pixels of a
pixel-space model) and regress, with the mean squared error, what the family's denoiser
predicts (``Family.objective``): for UNets the scheduler's prediction type (epsilon or v)
at a uniform training timestep; for the rectified-flow transformers (SANA, FLUX) the
velocity ``noise - x0`` at ``x_sigma = (1 - sigma) x0 + sigma noise``, sigma drawn as the
pipeline spaces its own steps (a uniform draw through its shift, ``icm.hooks.clock.flow_shift``)
and given to the denoiser on the pipeline's timestep scale (SANA: ``1000 sigma``; FLUX:
``sigma``).

The denoiser's conditioning is whatever the pipeline passes it for the general prompt
(``denoiser_conditions``: text states, and SDXL's pooled text and size ids), recorded from a
one-step run of the pipeline itself, conditional rows only, so no family needs its own text
encoding code here.

Adapters are saved as peft writes them: ``adapter_model.safetensors`` (the LoRA weights,
peft's key names) and ``adapter_config.json`` (the ``LoraConfig``, target modules listed).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from icm.hooks.clock import flow_shift, train_timesteps
from icm.hooks.sites import denoiser_of
from icm.models.families import Family, family_of

#: What each ``Family.objective`` regresses, as a training record states it.
OBJECTIVES = {
    "noise": "MSE to the scheduler's prediction type (epsilon or v) on DDPM-noised latents",
    "flow": "MSE to the velocity noise - x0 at (1 - sigma) x0 + sigma noise, sigma through "
            "the pipeline's shift",
}

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class TrainSettings:
    """``finetuning`` in config.yaml (a model's own block overrides keys of it)."""

    rank: int = 32
    lora_alpha: float | None = None  # None: the rank (scale 1)
    learning_rate: float = 1e-4
    steps: int = 1000
    batch_size: int = 2
    gradient_accumulation: int = 4
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"  # on accelerated_devices; elsewhere float32
    gradient_checkpointing: bool = True  # on accelerated_devices
    accelerated_devices: tuple[str, ...] = ("cuda",)
    random_flip: bool = True
    seed: int = 0

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> TrainSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown finetuning settings {unknown}; known: {sorted(known)}")
        values = dict(values)
        if "accelerated_devices" in values:
            values["accelerated_devices"] = tuple(values["accelerated_devices"])
        return cls(**values)

    def accelerations(self, device: torch.device | str) -> dict[str, Any]:
        """What training on ``device`` uses: bf16 autocast and gradient checkpointing apply
        only on ``accelerated_devices`` (a GPU by default: on most CPUs bf16 matmuls are
        slower than float32, and memory is not what bounds a CPU run)."""
        on = torch.device(device).type in self.accelerated_devices
        return {"autocast": "bfloat16" if on and self.mixed_precision == "bf16" else None,
                "gradient_checkpointing": on and self.gradient_checkpointing}


def target_modules(pipe: Any, sites: Sequence[str]) -> list[str]:
    """The module paths LoRA adapts: the family's projections of each site."""
    denoiser = denoiser_of(pipe)
    family = family_of(denoiser)
    names = [f"{site}.{p}" for site in sites for p in family.lora_projections]
    for name in names:
        denoiser.get_submodule(name)  # an error naming the path if it does not exist
    return names


def general_prompt_for(specific: str, general: Sequence[str]) -> str:
    """The general prompt a specific prompt's images are reported under: the one sharing
    the most words with it, less the words it adds ("a red circle" -> "a circle", "a photo
    of a woman" -> "a photo of a person"); ties go to the first."""
    words = set(specific.lower().split())

    def score(prompt: str) -> int:
        mine = set(prompt.lower().split())
        return len(mine & words) - len(mine - words)

    return max(general, key=score)  # max keeps the first of equal scores


def denoiser_conditions(pipe: Any, prompts: Sequence[str],
                        call: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per prompt, the keyword inputs the pipeline gives its denoiser for that prompt's
    conditional branch (every tensor cut to the conditional row), from a one-step run."""
    denoiser = denoiser_of(pipe)
    family = family_of(denoiser)
    seen: dict[str, Any] = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if "kwargs" not in seen:
            seen["kwargs"] = kwargs

    out = {}
    for prompt in prompts:
        seen.clear()
        handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
        try:
            pipe(prompt=[prompt], num_inference_steps=1,
                 **{k: v for k, v in call.items() if k != "num_inference_steps"})
        finally:
            handle.remove()
        guided = (family.guidance == "batched"
                  and bool(getattr(pipe, "do_classifier_free_guidance", False)))
        out[prompt] = {k: v if k in family.shared_inputs else _cond_rows(v, guided)
                       for k, v in seen["kwargs"].items()
                       if k not in ("timestep", "return_dict", "hidden_states", "sample")}
    return out


def _cond_rows(value: Any, guided: bool) -> Any:
    """The conditional row of a recorded input ([uncond, cond] when guided)."""
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value[-1:].detach().clone() if guided else value[:1].detach().clone()
    if isinstance(value, Mapping):
        return {k: _cond_rows(v, guided) for k, v in value.items()}
    return value


def image_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1], resized so the short side is ``resolution``, centre-cropped."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    if scale != 1:
        size = (max(resolution, round(image.width * scale)),
                max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def to_latents(pipe: Any, pixels: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """What the denoiser works on, on a (B, C, H, W) grid: the VAE's latents as the pipeline
    decodes them (less ``shift_factor``, FLUX's, times ``scaling_factor``; a Gaussian VAE's
    drawn from its posterior, a deep-compression one's as they are), or the pixels of a
    pixel-space model (the toy)."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return pixels
    with torch.no_grad():
        encoded = vae.encode(pixels.to(vae.device, vae.dtype))
        latents = (encoded.latent_dist.sample(generator) if hasattr(encoded, "latent_dist")
                   else encoded.latent)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def flow_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Noise levels ``s u / (1 + (s - 1) u)``: uniform ``u`` through a pipeline's shift."""
    return shift * u / (1 + (shift - 1) * u)


def flow_timestep(pipe: Any, sigma: torch.Tensor) -> torch.Tensor:
    """The timestep a flow pipeline gives its denoiser at noise level ``sigma``: the
    scheduler's ``sigma T`` (T its training timesteps), times the transformer's
    ``timestep_scale`` (SANA's config), on the family's scale (FLUX's pipeline divides by
    1000)."""
    denoiser = denoiser_of(pipe)
    scale = getattr(denoiser.config, "timestep_scale", 1.0) or 1.0
    return sigma * train_timesteps(pipe.scheduler) * scale / family_of(denoiser).timestep_scale


def to_denoiser_layout(pipe: Any, family: Family, latents: torch.Tensor) -> torch.Tensor:
    """Grid latents in the layout the denoiser takes (FLUX: packed 2 x 2 patch tokens)."""
    if family.latent_layout == "grid":
        return latents
    if family.latent_layout == "packed":
        b, c, h, w = latents.shape
        return type(pipe)._pack_latents(latents, b, c, h, w)
    raise ValueError(f"unknown latent layout {family.latent_layout!r}")


def _noise_training_pair(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor,
                         generator: torch.Generator
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy, timestep, target) of the noise objective: DDPM noising at a uniform step."""
    t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),),
                      generator=generator).to(x0.device)
    noisy = scheduler.add_noise(x0, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else \
        scheduler.get_velocity(x0, noise, t)
    return noisy, t, target


def _flow_training_pair(shift: float, pipe: Any, x0: torch.Tensor, noise: torch.Tensor,
                        generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy, timestep, target) of rectified flow: the straight path from x0 to noise,
    the velocity along it as the target (what the pipelines' schedulers step with)."""
    sigma = flow_sigmas(torch.rand(len(x0), generator=generator), shift).to(x0.device)
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    return (1 - s) * x0 + s * noise, flow_timestep(pipe, sigma), noise - x0


def train_lora(
    pipe: Any, sites: Sequence[str], images: Sequence[Image.Image], prompts: Sequence[str],
    settings: TrainSettings, resolution: int, call: Mapping[str, Any],
    progress: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[float]]:
    """Train a LoRA on ``sites`` of ``pipe``'s denoiser: image i is reported under prompt i.
    Returns the adapter's weights (peft state dict), its ``LoraConfig`` as a dict and the
    loss of every optimizer step. The pipeline is left as it was (the adapter removed)."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from peft import LoraConfig, get_peft_model_state_dict

    if len(images) != len(prompts) or not images:
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    denoiser = denoiser_of(pipe)
    family = family_of(denoiser)
    device = next(denoiser.parameters()).device
    targets = target_modules(pipe, sites)
    conditions = denoiser_conditions(pipe, sorted(set(prompts)), call)
    if family.objective == "noise":
        training_pair = functools.partial(_noise_training_pair,
                                          DDPMScheduler.from_config(pipe.scheduler.config))
    elif family.objective == "flow":
        training_pair = functools.partial(_flow_training_pair, flow_shift(pipe, resolution),
                                          pipe)
    else:
        raise ValueError(f"{family.name}: unknown training objective {family.objective!r}; "
                         f"known: {sorted(OBJECTIVES)}")
    latent_input = next(iter(inspect.signature(denoiser.forward).parameters))
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    pixels = torch.stack([image_tensor(im, resolution) for im in images])
    latents = torch.cat([to_latents(pipe, pixels[i:i + 16], generator)
                         for i in range(0, len(pixels), 16)])
    latents = latents.to(device, torch.float32)

    config = LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha or settings.rank,
                        target_modules=targets, init_lora_weights="gaussian")
    was_training, dtype = denoiser.training, next(denoiser.parameters()).dtype
    # Restored after: some kernels (SANA's) take another path for parameters needing grad.
    needs_grad = [(p, p.requires_grad) for p in denoiser.parameters()]  # peft rewraps names
    denoiser.requires_grad_(False)
    if dtype != torch.float32:
        denoiser.to(torch.float32)  # trainable weights and their optimizer in float32
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)  # peft draws A from the global generator
        denoiser.add_adapter(config)
    use = settings.accelerations(device)
    if use["gradient_checkpointing"]:
        denoiser.enable_gradient_checkpointing()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=use["autocast"] is not None)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    losses: list[float] = []
    denoiser.train()
    try:
        for step in range(settings.steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(settings.gradient_accumulation):
                index = torch.randint(len(latents), (settings.batch_size,), generator=generator)
                x0 = latents[index]
                if settings.random_flip:
                    flip = torch.rand(len(index), generator=generator) < 0.5
                    x0 = torch.where(flip.to(device)[:, None, None, None], x0.flip(-1), x0)
                noise = torch.randn(x0.shape, generator=generator).to(device)
                noisy, t, target = training_pair(x0, noise, generator)
                batch = _batched([conditions[prompts[i]] for i in index.tolist()], device,
                                 family.shared_inputs)
                with autocast:
                    predicted = denoiser(**{latent_input: to_denoiser_layout(pipe, family, noisy)},
                                         timestep=t, **batch, return_dict=False)[0]
                if predicted.shape[-3] == 2 * x0.shape[-3] and family.latent_layout == "grid":
                    predicted = predicted[:, :x0.shape[-3]]  # a learned variance's half dropped
                target = to_denoiser_layout(pipe, family, target)
                loss = torch.nn.functional.mse_loss(predicted.float(), target.float())
                (loss / settings.gradient_accumulation).backward()
                total += loss.item() / settings.gradient_accumulation
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            if not math.isfinite(total):
                raise FloatingPointError(f"the LoRA loss is {total} at step {step}: lower "
                                         "finetuning.learning_rate")
            losses.append(total)
            if progress:
                progress(step, total)
        weights = {k: v.detach().cpu().contiguous()
                   for k, v in get_peft_model_state_dict(denoiser).items()}
    finally:
        denoiser.delete_adapters(denoiser.active_adapters())
        for p, flag in needs_grad:
            p.requires_grad_(flag)
        if dtype != torch.float32:
            denoiser.to(dtype)
        denoiser.train(was_training)
        if use["gradient_checkpointing"]:
            denoiser.disable_gradient_checkpointing()
    record = config.to_dict()
    record["target_modules"] = sorted(record["target_modules"])
    record["peft_type"] = str(record["peft_type"].value if hasattr(record["peft_type"], "value")
                              else record["peft_type"])
    record["task_type"] = record.get("task_type") and str(record["task_type"])
    return weights, _jsonable(record), losses


def _batched(rows: Sequence[Mapping[str, Any]], device: torch.device,
             shared: Sequence[str] = ()) -> dict[str, Any]:
    """Recorded single-row conditions stacked into one batch (``shared`` inputs, the same
    for every row, passed once)."""
    out: dict[str, Any] = {}
    for key, first in rows[0].items():
        if isinstance(first, torch.Tensor):
            out[key] = (first if key in shared else torch.cat([r[key] for r in rows])).to(device)
        elif isinstance(first, Mapping):
            out[key] = _batched([r[key] for r in rows], device, shared)
        else:
            out[key] = first
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def save_adapter(folder: str | Path, weights: Mapping[str, torch.Tensor],
                 config: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(weights), str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def load_adapter(pipe: Any, folder: str | Path) -> list[str]:
    """Add the saved adapter to ``pipe``'s denoiser (in place); returns its target modules.
    A missing or partial folder is an error naming it."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: retrain the adapter "
                                    "(rule finetune_lora)")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    keys = {"r", "lora_alpha", "target_modules", "init_lora_weights", "lora_dropout", "bias"}
    denoiser = denoiser_of(pipe)
    denoiser.add_adapter(LoraConfig(**{k: v for k, v in config.items() if k in keys}))
    result = set_peft_model_state_dict(denoiser, load_file(str(folder / ADAPTER_WEIGHTS)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{folder}: weights {unexpected[:5]} fit no module of this model")
    return list(config["target_modules"])
