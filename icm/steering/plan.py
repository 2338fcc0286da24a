"""A steering plan: which sites a variant pushes, along which probe directions, from which
step, toward which class in each batch, and how strongly (paper section 3.2, appendix B),
and the loop that generates batches under it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from icm.generation.samples import SAMPLE_COLUMNS
from icm.generation.shard import (
    SamplerSettings,
    batches,
    generate_images,
)
from icm.hooks.clock import pipeline_timesteps, same_timesteps, start_step
from icm.hooks.steering import steer_activations
from icm.io.finite import nonfinite_steps
from icm.probing.probes import Pair
from icm.steering.batch_targets import target_probabilities
from icm.steering.pushes import ExplicitPush, class_pushes, explicit_pushes
from icm.steering.selection import sites_per_pair

STEER_COLUMNS = [*SAMPLE_COLUMNS, "target", "steered"]


def load_directions(pairs: Sequence[Sequence[str]], paths: Sequence[str | Path],
                    sites: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """{pair name: {site: (steps, channels)}} for each pair's chosen ``sites[pair]``, from
    the probes' safetensors; ``paths`` are in the order of ``pairs``."""
    from safetensors.numpy import load_file

    out = {}
    for pair, path in zip(pairs, paths, strict=True):
        name = Pair(*pair).name
        out[name] = {s: v for s, v in load_file(str(path)).items() if s in sites[name]}
    return out


def probe_step_axis(metas: Sequence[str | Path]) -> np.ndarray:
    """The timesteps (one per step) the probes were fitted on, the same for every pair
    (they read the same stores)."""
    records = [json.loads(Path(m).read_text()) for m in metas]
    axes = [np.asarray(r["timesteps"], dtype=np.float64) for r in records]
    if any(not same_timesteps(axes[0], a) for a in axes[1:]):
        raise ValueError(f"the probes of {[r['pair'] for r in records]} were fitted on "
                         "different step axes; refit them from one generation")
    return axes[0]


@dataclass
class SteeringPlan:
    """What a variant steers, read off the probes and the ranking: per pair its sites and
    direction rows, the step axis and start, and how each class is reached."""

    classes: list[str]
    pushes: dict
    probs: np.ndarray
    sites: dict[str, list[str]]
    vectors: dict[str, dict]
    timesteps: np.ndarray | None
    start_step: int | None
    start_rule: str | None
    alpha_unit: str = "absolute"
    #: ``sites: explicit``: per class its hand-picked sites and signed strength (or None)
    explicit: dict[str, ExplicitPush | None] | None = None

    def push_for(self, target: str, alpha: float) -> tuple[dict[str, np.ndarray], float] | None:
        """The vectors (site -> (steps, channels)) and strength a batch toward ``target``
        is steered with, or None when it stays unsteered."""
        if self.explicit is not None:
            chosen = self.explicit[target]
            if chosen is None:
                return None
            return {s: self.vectors[chosen.pair][s] for s in chosen.sites}, chosen.strength
        push = self.pushes[target]
        if push is None or not self.sites[push.pair] or alpha == 0:
            return None
        return {s: push.sign * self.vectors[push.pair][s] for s in self.sites[push.pair]}, alpha

    def sites_by_target(self) -> dict[str, list[str]]:
        if self.explicit is not None:
            return {c: [] if e is None else list(e.sites) for c, e in self.explicit.items()}
        return {c: [] if p is None else self.sites[p.pair] for c, p in self.pushes.items()}

    def check_pipeline(self, pipe: Any, steps: int, resolution: int) -> np.ndarray:
        """The pipeline's planned timesteps, which must be the probes' when it steers."""
        planned = pipeline_timesteps(pipe, steps, resolution)
        if self.timesteps is not None and not same_timesteps(planned, self.timesteps):
            raise ValueError(
                f"{type(pipe.scheduler).__name__} with {steps} steps runs {len(planned)} "
                f"steps at timesteps {planned.round(1).tolist()}, but the probes were fitted "
                f"at {len(self.timesteps)} steps, timesteps {self.timesteps.round(1).tolist()}:"
                " steer with the model settings of the generation run, or regenerate and refit")
        return planned


def plan_steering(concept: Mapping[str, Any], variant: Mapping[str, Any],
                  ranking: str | Path | None, pair_ranking: str | Path | None,
                  directions: Sequence[str | Path], directions_meta: Sequence[str | Path],
                  start: str | Path | None) -> SteeringPlan:
    """The ``SteeringPlan`` of a resolved variant (``sites``, ``seed``, ``k``, ``alpha_unit``,
    ``direction_steps``); the original (``sites: none``) reads no probe output. With
    ``direction_steps`` K every step gets one vector, the mean of the K steps' directions
    from the start step (``one_vector``). With ``alpha_unit: spread`` each
    direction row is scaled by its site's spread at that step (``directions.json``), so
    alpha counts within-class standard deviations along the probe axis."""
    classes = list(concept["classes"])
    pairs = [tuple(p) for p in concept["pairs"]]
    names = [Pair(*p).name for p in pairs]
    pushes = class_pushes(classes, pairs)
    probs = target_probabilities(classes, concept["steering"]["target_probs"])
    if variant["sites"] == "none":
        return SteeringPlan(classes, pushes, probs, {n: [] for n in names}, {}, None, None, None)
    if variant["sites"] == "explicit":
        return plan_explicit(classes, pairs, pushes, probs, variant["explicit"], directions,
                             directions_meta)
    sites = sites_per_pair(
        pd.read_csv(ranking) if ranking else None,
        pd.read_csv(pair_ranking) if pair_ranking else None,
        names, variant["sites"], variant.get("k"), variant["seed"])
    vectors = load_directions(pairs, directions, sites)
    timesteps = probe_step_axis(directions_meta)
    chosen = json.loads(Path(start).read_text())
    start_step = int(chosen["start_step"])
    if abs(timesteps[start_step] - chosen["start_timestep"]) > 1e-3:
        raise ValueError(f"{start}: start step {start_step} is timestep "
                         f"{chosen['start_timestep']} there but {timesteps[start_step]} "
                         "in the probes; rerun the ranking")
    unit = variant.get("alpha_unit", "absolute")
    check_vectors(vectors, timesteps, unit)
    if variant.get("direction_steps"):
        vectors = {pair: {site: one_vector(v, start_step, variant["direction_steps"], site)
                          for site, v in per_site.items()} for pair, per_site in vectors.items()}
    if unit == "spread":
        vectors = scale_by_spread(vectors, pairs, directions_meta)
    elif unit != "absolute":
        raise ValueError(f"alpha_unit {unit!r}: use 'spread' or 'absolute'")
    check_vectors(vectors, timesteps, unit)
    return SteeringPlan(classes, pushes, probs, sites, vectors, timesteps, start_step,
                        chosen["start_rule"], unit)


def plan_explicit(classes: list[str], pairs: Sequence[tuple[str, str]], pushes: dict,
                  probs: np.ndarray, explicit: Mapping[str, Any], directions: Sequence[str | Path],
                  directions_meta: Sequence[str | Path]) -> SteeringPlan:
    """The plan of a ``sites: explicit`` variant: per target class the configured sites and
    signed strength (``explicit["targets"]``, absolute units: the probes' unit directions, as
    the paper's Table 6) from ``explicit["start_step"]``, a step of 50 mapped by timestep
    (``icm.hooks.clock.start_step``: the paper's 15 is timestep 681, step 16 of PNDM's loop).
    A site the probes do not have (a typo, another model's name) is an error listing the
    sites there are."""
    from safetensors import safe_open

    chosen = explicit_pushes(classes, pairs, explicit["targets"])
    names = [Pair(*p).name for p in pairs]
    sites = {n: sorted({s for e in chosen.values() if e and e.pair == n for s in e.sites})
             for n in names}
    vectors = load_directions(pairs, directions, sites)
    for pair, path in zip(names, directions, strict=True):
        missing = [s for s in sites[pair] if s not in vectors[pair]]
        if missing:  # only now read which sites there are, for the message
            with safe_open(str(path), "numpy") as f:
                known = list(f.keys())
            raise ValueError(f"explicit sites {missing} (pair {pair}) are not sites of this "
                             f"model; its sites are: {', '.join(known)}")
    timesteps = probe_step_axis(directions_meta)
    of_50 = int(explicit["start_step"])
    train = int(json.loads(Path(directions_meta[0]).read_text()).get("num_train_timesteps",
                                                                      1000))
    start = start_step(timesteps, train, of_50)
    check_vectors(vectors, timesteps, "absolute")
    return SteeringPlan(classes, pushes, probs, sites, vectors, timesteps, start,
                        f"explicit: step {of_50} of 50 (config), mapped by timestep to step "
                        f"{start}, timestep {timesteps[start]:g}", "absolute", chosen)


def one_vector(rows: np.ndarray, start: int, steps: int, site: str) -> np.ndarray:
    """One direction for every step (the paper's appendix G: a single vector from five
    steps): the unit mean of the unit direction rows ``start`` .. ``start + steps - 1``,
    repeated over the step axis so steering (and spread units) index it as before."""
    if start + steps > len(rows):
        raise ValueError(f"{site}: direction_steps {steps} from the start step {start} needs "
                         f"{start + steps} steps, the probes have {len(rows)}")
    mean = rows[start:start + steps].astype(np.float64).mean(axis=0)
    norm = np.linalg.norm(mean)
    if norm < 1e-6:
        raise ValueError(f"{site}: the directions of steps {start}-{start + steps - 1} cancel "
                         "out (their mean is 0): use per-step directions")
    return np.broadcast_to((mean / norm).astype(rows.dtype), rows.shape).copy()


def check_vectors(vectors: Mapping[str, Mapping[str, np.ndarray]], timesteps: np.ndarray,
                  unit: str) -> None:
    """Refuse directions steering cannot use: a step count other than the probes', or NaN
    or inf rows (a NaN vector turns every steered image black)."""
    for pair, per_site in vectors.items():
        for site, v in per_site.items():
            if v.shape[0] != len(timesteps):
                raise ValueError(f"{pair} direction of {site} has {v.shape[0]} steps but its "
                                 f"probes list {len(timesteps)} timesteps: refit the probes")
            bad = nonfinite_steps(v, 0)
            if bad:
                raise ValueError(f"{pair} direction of {site} is NaN or inf at steps {bad} "
                                 f"(alpha unit {unit}): refit the probes")


def scale_by_spread(vectors: Mapping[str, Mapping[str, np.ndarray]],
                    pairs: Sequence[Sequence[str]],
                    metas: Sequence[str | Path]) -> dict[str, dict[str, np.ndarray]]:
    """Each pair's unit direction rows times the site's spread at that step, read from the
    probes' ``directions.json`` (in the order of ``pairs``)."""
    out = {}
    for pair, meta in zip(pairs, metas, strict=True):
        name = Pair(*pair).name
        entries = json.loads(Path(meta).read_text())["entries"]
        if entries and "spread" not in entries[0]:
            raise ValueError(f"{meta} has no spreads (probes fitted before alpha_unit): "
                             "refit the probes, or set steering.alpha_unit: absolute")
        spread: dict[str, dict[int, float]] = {}
        for e in entries:
            spread.setdefault(e["site"], {})[int(e["step"])] = float(e["spread"])
        out[name] = {}
        for site, v in vectors[name].items():
            scale = np.array([spread[site][step] for step in range(v.shape[0])], dtype=v.dtype)
            out[name][site] = v * scale[:, None]
    return out


def steer_batches(pipe: Any, plan: SteeringPlan, samples: Sequence, batch_size: int,
                  alpha: float, settings: SamplerSettings,
                  target_of: Callable[[Sequence], str]) -> Iterator[tuple[Sequence, list, str,
                                                                           bool]]:
    """(batch, images, target, steered) for each batch of ``samples`` (cut on the global
    batch grid): ``target_of(batch)`` is the batch's target class
    (``icm.steering.batch_targets.target_rule``, shard-independent), and the batch is steered
    toward it when the class has a direction, the variant sites and alpha is not 0."""
    for batch in batches(samples, batch_size):
        target = target_of(batch)
        push = plan.push_for(target, alpha)
        if push is not None:
            chosen, strength = push
            with steer_activations(pipe, chosen, strength, plan.start_step,
                                   timesteps=plan.timesteps):
                images = generate_images(pipe, batch, settings)
        else:
            images = generate_images(pipe, batch, settings)
        yield batch, images, target, push is not None


def explicit_text(explicit: Mapping[str, ExplicitPush | None]) -> str:
    """The table's alpha cell of an explicit variant: ``woman -10; man 10``."""
    return "; ".join(f"{c} {e.strength:g}" for c, e in explicit.items() if e is not None)


def resolve_alpha(variant: Mapping[str, Any], name: str,
                  alphas: str | Path | None) -> tuple[float, str]:
    """The variant's alpha and the rule that gave it: the configured number, or with
    ``auto`` the calibration's choice (``calibration/{variant}.alpha.json``); an explicit
    variant's strengths are per target (``SteeringPlan.explicit``)."""
    if variant["sites"] == "explicit":
        return 1.0, "explicit per target (config)"
    if variant["alpha"] != "auto":
        return float(variant["alpha"]), "fixed in config"
    if alphas is None:
        raise ValueError(f"variant {name}: alpha auto needs the calibration's choice")
    chosen = json.loads(Path(alphas).read_text())
    return float(chosen["alpha"]), chosen["alpha_rule"]
