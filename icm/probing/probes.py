"""Linear probes per (site, step): where does the implicit choice become linearly readable?

Reference path (the paper's, appendix A): scikit-learn ``StandardScaler`` +
``LogisticRegression(max_iter=1000)`` per (site, step), stratified train/test split.

Fast path: the same objective (L2-regularised logistic regression, C=1, unpenalised
intercept, on standardised features) solved for all equal-width sites at once by damped,
batched Newton iterations in torch, on the GPU when present: steps in order, each
warm-started from the previous step's solution, with converged problems leaving the batch.
Each shape is solved as it calls for (``choose_solver``): Newton steps on the primal (C x C
Hessian) system for narrow features, batched L-BFGS with a free line search for wide ones
(the dual N x N Newton system and truncated conjugate gradients remain selectable). Same problem,
same split, so the two backends agree to solver tolerance; ``benchmarks/probe_speed.py``
measures the speed-up.

A steering direction is the probe weight mapped back to unscaled space (divided by the
scaler's scale) and unit-normalised: adding it to an activation moves along the probe's
decision axis toward the positive class.

Prompt control (an option; the paper's probes have none): with several general prompts the
chosen class depends on the prompt ("a circle" is mostly red), so a probe could score by
reading which prompt it is. Given each sample's prompt (``groups``), ``fit_pair`` reports
``prompt_acc``, the test accuracy of each prompt's majority training class, and with
``control`` scores a second probe that has the prompt as unpenalised covariates (one
indicator per prompt): its accuracy counts only what the activations add beyond the prompt.
The steering direction always comes from the probe without prompt covariates: an
unpenalised indicator explains every row of a prompt whose training rows are all one class,
so a controlled direction would learn nothing from exactly the rare-class prompts ("a person
with gray hair") that localization adds (planted in the tests, 106 prompts x 5 images:
cosine with the true axis 0.62 without the covariates, 0.46 with them). ``chance_acc``, the
majority-class rate of the test split, is the baseline the paper's start rule compares with.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from icm.io.finite import nonfinite_steps
from icm.probing.pairs import Pair  # noqa: F401  (re-exported: icm.probing.probes.Pair)
from icm.probing.solvers import (
    LBFGS_STEP_TOL,
    cache_groups,
    choose_solver,
    matvec,
    solve_lbfgs,
    solve_newton,
    steps_per_solve,
)

Backend = Literal["torch", "sklearn"]
log = logging.getLogger(__name__)


class ProbeDataError(ValueError):
    """Too few labelled samples to fit a probe."""


@dataclass
class ProbeResult:
    """All steps of one site for one pair."""

    site: str
    pair: Pair
    train_acc: np.ndarray  # (steps,)
    test_acc: np.ndarray  # (steps,)
    directions: np.ndarray  # (steps, channels), unit norm, unscaled space
    n_train: int
    n_test: int
    counts: dict[str, int]
    prompt_acc: float = float("nan")  # test accuracy of the prompt alone (no groups: NaN)
    spread: np.ndarray | None = None  # (steps,) within-class std along the direction (train)
    chance_acc: float = float("nan")  # majority-class rate of the test split


#: Bytes of fitting memory per (sample, site, channel) of a batched torch fit: the step read,
#: its centred copy, the standardised design and the Newton scratch, with temporaries
#: (measured: benchmarks/probe_memory.py, 36 on 8 sites x 1280 channels).
FIT_BYTES_PER_VALUE = 36


def sites_per_fit(samples: int, width: int, memory_mb: float) -> int:
    """How many equal-width sites one batched fit may hold within ``memory_mb``."""
    return max(1, int(memory_mb * 2**20 // (FIT_BYTES_PER_VALUE * samples * width)))


def split_indices(y: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split of sample positions (shared by both backends)."""
    index = np.arange(len(y))
    train, test = train_test_split(index, test_size=test_size, stratify=y, random_state=seed)
    return np.sort(train), np.sort(test)


def check_counts(labels: Sequence[str], pair: Pair, minimum: int) -> dict[str, int]:
    counts = {c: int(np.sum(np.asarray(labels) == c)) for c in (pair.negative, pair.positive)}
    few = {c: n for c, n in counts.items() if n < minimum}
    if few:
        raise ProbeDataError(
            f"probe {pair.name}: too few samples of {', '.join(few)} "
            f"(counts {counts}; need at least {minimum} per class). Generate more samples, add "
            "prompts that make the class likelier, or lower probes.min_per_class."
        )
    return counts


def prompt_baseline(y: np.ndarray, groups: np.ndarray, train: np.ndarray,
                    test: np.ndarray) -> float:
    """Test accuracy of the label predicted from the prompt alone: each prompt's majority
    class on the training split (the overall training majority for a prompt it lacks)."""
    overall = int(np.mean(y[train]) >= 0.5)
    guess = {}
    for group in np.unique(groups[train]):
        share = np.mean(y[train][groups[train] == group])
        guess[group] = overall if share == 0.5 else int(share > 0.5)
    predicted = np.array([guess.get(g, overall) for g in groups[test]])
    return float(np.mean(predicted == y[test]))


def prompt_covariates(groups: np.ndarray) -> np.ndarray | None:
    """One indicator column per prompt but the first (the intercept stands for it), float32;
    None for a single prompt."""
    names = np.unique(groups)
    if len(names) < 2:
        return None
    return (groups[:, None] == names[None, 1:]).astype(np.float32)


def direction_spread(x: np.ndarray, y: np.ndarray, train: np.ndarray,
                     directions: np.ndarray) -> np.ndarray:
    """(steps,) pooled within-class standard deviation of the training rows of ``x``
    (samples, steps, channels) projected on the unit ``directions`` (steps, channels): how far
    one class's samples spread along the axis, the unit of ``alpha_unit: spread`` steering
    (a step whose activations are small gets a small push)."""
    rows = np.asarray(x[train])
    proj = np.einsum("nsc,sc->ns", rows, directions.astype(rows.dtype))
    return pooled_within_std(proj, y[train] == 1)


def pooled_within_std(projections: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per column of ``projections`` (samples, K), the standard deviation within the two
    classes (``positive`` a boolean per sample), pooled: the spread of one class."""
    proj = np.asarray(projections, dtype=np.float64)
    within = sum(((proj[rows] - proj[rows].mean(axis=0)) ** 2).sum(axis=0)
                 for rows in (positive, ~positive))
    return np.sqrt(within / max(len(proj) - 2, 1))


def _accuracy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Accuracy per problem; logits (problems, samples), y (samples,) in {0, 1}."""
    return ((logits > 0) == y[None, :].astype(bool)).mean(axis=1)


#: scikit-learn penalises every coefficient; a covariate column scaled by this makes the
#: penalty on its effective coefficient negligible (1e-4 of a feature's), i.e. unpenalised.
COVARIATE_SCALE = 100.0


def fit_sklearn(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, max_iter: int = 1000,
    covariates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: one scikit-learn pipeline per step. x (samples, steps, channels), y in {0,1};
    ``covariates`` (samples, G) join the features unscaled and (nearly) unpenalised.

    Returns train accuracy, test accuracy (steps,) and unit directions (steps, channels).
    """
    steps, channels = x.shape[1], x.shape[2]
    train_acc, test_acc = np.empty(steps), np.empty(steps)
    directions = np.empty((steps, channels))
    extra = np.zeros((len(x), 0)) if covariates is None else COVARIATE_SCALE * covariates
    for step in range(steps):
        scaler = StandardScaler().fit(x[train, step])
        scaled = np.hstack([scaler.transform(x[:, step]), extra])
        model = LogisticRegression(max_iter=max_iter).fit(scaled[train], y[train])
        train_acc[step] = model.score(scaled[train], y[train])
        test_acc[step] = model.score(scaled[test], y[test])
        raw = model.coef_[0][:channels] / scaler.scale_
        directions[step] = raw / max(np.linalg.norm(raw), 1e-12)
    return train_acc, test_acc, directions


def fit_torch(
    x: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    device: str | torch.device = "cpu",
    iterations: int = 100,
    tol: float = 1e-4,
    dtype: torch.dtype = torch.float32,
    solver: Literal["auto", "primal", "dual", "cg", "lbfgs"] = "auto",
    covariates: np.ndarray | None = None,
    lbfgs_iterations: int = 1000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fast path: all sites of one width at once. x (samples, sites, steps, channels);
    ``covariates`` (samples, G) join every problem unscaled and unpenalised (the primal
    form then: the dual's Woodbury step eliminates the intercept only).

    Minimises sum(log-loss) + ||w||^2 / 2 (scikit-learn's default objective, C=1, intercept
    unpenalised) on train-standardised features by damped Newton, batched over sites, until
    the gradient of the mean loss is below ``tol``: scikit-learn's lbfgs stopping rule (gtol 1e-4
    on the mean loss), which Newton overshoots by orders of magnitude in its last step.
    Steps are solved in order, each warm-started from the previous step's solution: the
    activations of neighbouring steps are close, so this halves the Newton iterations.
    Only one step's activations are on the device at a time. ``solver`` picks how each
    Newton step is solved: the primal or dual Newton system, or conjugate gradients on
    Hessian-vector products (``cg``, for wide features and many samples); "auto" takes the
    cheapest for the shape (``choose_solver``). Float32 by default: the
    Newton direction tolerates it, and the objective of the line search is summed in float64.

    ``x`` may be any array-like that returns ``x[rows, :, step]`` (``icm.io.activations.StepStack``
    reads one step from the stores at a time), so peak memory is one step of the sites.

    Returns train and test accuracy (sites, steps), unit directions in unscaled space
    (sites, steps, channels) and each direction's spread (sites, steps): the pooled
    within-class std of the training rows projected on it (``direction_spread``).
    """
    device = torch.device(device)
    _, sites, steps, channels = np.shape(x)
    y = np.asarray(y)
    y_train = torch.as_tensor(y[train], dtype=dtype, device=device)
    extra = 0 if covariates is None else covariates.shape[1]
    width = channels + extra + 1  # features, covariates, intercept
    penalty = torch.ones(width, dtype=dtype, device=device)
    penalty[channels:] = 0.0  # covariates and intercept
    train_acc, test_acc = np.empty((sites, steps)), np.empty((sites, steps))
    directions = np.empty((sites, steps, channels))
    spread = np.empty((sites, steps))
    unconverged = 0
    if solver == "dual" and extra:
        raise ValueError("the dual solver takes no covariates")
    chosen = choose_solver(len(train), width, bool(extra)) if solver == "auto" else solver
    dual, cg, lbfgs = chosen == "dual", chosen == "cg", chosen == "lbfgs"
    block = steps_per_solve(sites, len(train), width, steps) if lbfgs else 1
    problems = sites * block  # (site, step of the block), site-major
    previous = torch.zeros(sites, width, dtype=dtype, device=device)  # last step's solution
    # Reused across steps: fresh blocks of this size cost page faults on every step.
    z_all = torch.empty(problems, len(train), width, dtype=dtype, device=device)
    z_all[..., -1] = 1.0  # intercept column
    cov_test = None
    if extra:
        cov = torch.as_tensor(np.asarray(covariates), dtype=dtype, device=device)
        z_all[..., channels:channels + extra] = cov[torch.as_tensor(train, device=device)]
        cov_test = cov[torch.as_tensor(test, device=device)]
    scratch = None if dual or lbfgs else torch.empty_like(z_all)  # cg: the squares of z
    rows = np.concatenate([train, test])  # one read of each step for both splits
    for first in range(0, steps, block):
        chunk = list(range(first, min(first + block, steps)))
        count = sites * len(chunk)
        reads = [torch.as_tensor(x[rows, :, step], device=device).to(dtype) for step in chunk]
        both = (reads[0] if len(chunk) == 1 else  # (rows, sites, steps, C): site-major
                torch.stack(reads, dim=2).reshape(len(rows), count, channels))
        xt, x_test = both[: len(train)], both[len(train):]  # (N, P, C) each, P = site x step
        z = z_all[:count]
        # A channel constant over the training rows is left unscaled, as StandardScaler
        # does. Tested exactly: centring in float32 leaves a residual of about eps * |mean|,
        # which a std > 0 test would scale up to unit variance and a large weight.
        constant = xt.amax(dim=0) == xt.amin(dim=0)  # (P, C)
        # Plain two-pass statistics, in place: on the CPU, torch.var_mean and
        # cat+transpose over this layout are several times slower.
        mean = xt.mean(dim=0)
        xt -= mean
        xt.masked_fill_(constant, 0.0)
        std = xt.square().sum(dim=0).sqrt_() / len(train) ** 0.5  # 4x vector_norm's speed here
        scale = torch.where(constant | (std == 0), torch.ones_like(std), std)
        z[..., :channels].copy_((xt / scale).transpose(0, 1))
        # Every step of the block starts from its site's solution at the step before it.
        weights = previous.repeat_interleave(len(chunk), dim=0)
        gram = None
        if dual:
            gram = torch.bmm(z[..., :channels], z[..., :channels].transpose(1, 2))
        if lbfgs:
            converged = torch.cat([  # site groups small enough to stay in the CPU's cache
                solve_lbfgs(z[g], y_train, weights[g], penalty, tol, lbfgs_iterations,
                       step_tol=LBFGS_STEP_TOL)
                for g in cache_groups(count, len(train), width)])
        elif cg:
            torch.mul(z, z, out=scratch)
            converged = torch.cat([  # site groups small enough to stay in the CPU's cache
                solve_newton(z[g], y_train, weights[g], penalty, tol, iterations,
                        squares=scratch[g]) for g in cache_groups(count, len(train), width)])
        else:
            converged = solve_newton(z, y_train, weights, penalty, tol, iterations, gram, scratch)
        unconverged += int((~converged).sum())
        previous = weights.reshape(sites, len(chunk), width)[:, -1].clone()
        # Unscaled form of the probe, for the held-out rows and the steering direction.
        coef = weights[:, :channels] / scale  # (P, C)
        bias = weights[:, -1] - (mean * coef).sum(dim=1)
        test_logits = torch.einsum("nsc,sc->sn", x_test, coef) + bias[:, None]
        if cov_test is not None:
            test_logits += weights[:, channels:channels + extra] @ cov_test.T
        train_logits = matvec(z, weights)
        at = (slice(None), slice(first, first + len(chunk)))
        train_acc[at] = _accuracy(train_logits.cpu().numpy(), y[train]).reshape(sites, -1)
        test_acc[at] = _accuracy(test_logits.cpu().numpy(), y[test]).reshape(sites, -1)
        raw = coef.double().cpu().numpy()
        unit = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
        directions[at] = unit.reshape(sites, len(chunk), channels)
        # xt holds the centred training rows: project them on the unit directions.
        proj = torch.einsum("nsc,sc->ns", xt, torch.as_tensor(unit, dtype=dtype, device=device))
        spread[at] = pooled_within_std(proj.cpu().numpy(), y[train] == 1).reshape(sites, -1)
    if unconverged:
        log.warning("%d of %d probes did not reach tol=%g in %d Newton iterations",
                    unconverged, sites * steps, tol, iterations)
    return train_acc, test_acc, directions, spread


class SiteStack:
    """Equal-width in-memory sites as one lazy (samples, sites, steps, channels) array, read
    as ``stack[rows, :, step]`` like ``icm.io.activations.StepStack``: each read gathers one step of
    the sites into a new array (a caller may keep several) and checks it for NaN and inf.
    Stacking every step at once instead cost more than the toy's whole probe fit in a fresh
    process (0.17 s of page faults for 72 MB, against 0.11 s of solving)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.sites = list(arrays)
        self.arrays = [np.asarray(arrays[s]) for s in self.sites]
        samples, steps, channels = self.arrays[0].shape
        self.shape = (samples, len(self.sites), steps, channels)

    def __getitem__(self, key: tuple) -> np.ndarray:
        rows, sites, step = key
        if sites != slice(None) or not isinstance(step, (int, np.integer)):
            raise IndexError("a SiteStack is read as stack[rows, :, step]")
        rows = np.arange(self.shape[0])[rows]
        out = np.empty((len(rows), len(self.sites), self.shape[-1]),
                       dtype=np.result_type(*self.arrays))
        for k, (site, values) in enumerate(zip(self.sites, self.arrays)):
            np.take(values[:, step], rows, axis=0, out=out[:, k])
            if not np.isfinite(out[:, k]).all():  # would reach the solver as NaN
                raise ValueError(f"site {site}: NaN or inf activations at step {step}")
        return out


def fit_pair(
    activations: Mapping[str, np.ndarray],
    labels: Sequence[str],
    pair: Pair,
    backend: Backend = "torch",
    test_size: float = 0.2,
    seed: int = 0,
    min_per_class: int = 10,
    device: str | torch.device = "cpu",
    groups: Sequence[int] | None = None,
    control: bool = True,
    **torch_options,
) -> list[ProbeResult]:
    """Probes for every site and step. ``activations[site]`` is (samples, steps, channels),
    rows aligned with ``labels`` (or, for the torch backend, one ``icm.io.activations.StepStack`` of
    equal-width sites, read a step at a time); samples of other classes are left out. With
    ``groups`` (each sample's prompt) the prompt baseline is reported and, with ``control``, the
    accuracies are those of prompt-controlled probes, the directions those of the plain ones
    (module docstring: a StepStack is then read twice). ``torch_options`` (``solver``, ``dtype``,
    ``tol``, ...) go to ``fit_torch``."""
    labels = np.asarray(labels)
    keep = np.flatnonzero(np.isin(labels, [pair.negative, pair.positive]))
    counts = check_counts(labels[keep], pair, min_per_class)
    y = (labels == pair.positive).astype(np.int64)  # rows of other classes are never used
    train, test = (keep[part] for part in split_indices(y[keep], test_size, seed))
    chance_acc = float(max(np.mean(y[test]), 1 - np.mean(y[test])))
    prompt_acc, covariates = float("nan"), None
    if groups is not None:
        groups = np.asarray(groups)
        prompt_acc = prompt_baseline(y, groups, train, test)
        if control:
            covariates = prompt_covariates(groups)

    results: list[ProbeResult] = []
    if backend == "sklearn":
        if hasattr(activations, "sites"):
            raise ValueError("the scikit-learn reference fits in-memory arrays, not a StepStack")
        for site, x in activations.items():
            bad = nonfinite_steps(x, 1)
            if bad:  # a NaN would reach the solver (LinAlgError, or worse, NaN)
                raise ValueError(f"site {site}: NaN or inf activations at step {bad[0]}")
        for site, x in activations.items():
            tr_acc, te_acc, dirs = fit_sklearn(np.asarray(x), y, train, test)
            if covariates is not None:  # scored with the prompt known; the direction without
                tr_acc, te_acc, _ = fit_sklearn(np.asarray(x), y, train, test,
                                                covariates=covariates)
            results.append(ProbeResult(site, pair, tr_acc, te_acc, dirs, len(train), len(test),
                                       counts, prompt_acc,
                                       direction_spread(np.asarray(x), y, train, dirs),
                                       chance_acc))
        return results
    if backend != "torch":
        raise ValueError(f"unknown probe backend {backend!r}; use 'torch' or 'sklearn'")
    # Group equal-width sites so each group is one batched solve over (site, step) problems,
    # read a step at a time (a StepStack, with ``sites``, is one group already); each read
    # checks its step for NaN and inf, so a bad value stops the fit at the step it is in.
    if hasattr(activations, "sites"):
        width_groups = [(list(activations.sites), activations)]
    else:
        by_width: dict[int, list[str]] = {}
        for site, x in activations.items():
            by_width.setdefault(np.shape(x)[-1], []).append(site)
        width_groups = [(sites, SiteStack({s: activations[s] for s in sites}))
                        for sites in by_width.values()]
    for sites, stacked in width_groups:
        tr_acc, te_acc, dirs, spread = fit_torch(stacked, y, train, test, device=device,
                                                 **torch_options)
        if covariates is not None:  # scored with the prompt known; the direction without
            tr_acc, te_acc, _, _ = fit_torch(stacked, y, train, test, device=device,
                                             covariates=covariates, **torch_options)
        for k, site in enumerate(sites):
            results.append(ProbeResult(site, pair, tr_acc[k], te_acc[k], dirs[k], len(train),
                                       len(test), counts, prompt_acc, spread[k], chance_acc))
    order = [r.site for r in results] if hasattr(activations, "sites") else list(activations)
    return sorted(results, key=lambda r: order.index(r.site))
