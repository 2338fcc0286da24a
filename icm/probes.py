"""Linear probes per (site, step): where does the implicit choice become linearly readable?

Reference path (the paper's, appendix A): scikit-learn ``StandardScaler`` +
``LogisticRegression(max_iter=1000)`` per (site, step), stratified train/test split.

Fast path: the same objective (L2-regularised logistic regression, C=1, unpenalised
intercept, on standardised features) solved for all steps of all equal-width sites at once by
batched Newton iterations in torch, on the GPU when present. Same problem, same split, so the
two agree to solver tolerance; ``benchmarks/probe_speed.py`` measures the speed-up.

A steering direction is the probe weight mapped back to unscaled space (divided by the
scaler's scale) and unit-normalised: adding it to an activation moves along the probe's
decision axis toward the positive class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

Backend = Literal["torch", "sklearn"]


class ProbeDataError(ValueError):
    """Too few labelled samples to fit a probe."""


@dataclass(frozen=True)
class Pair:
    """A binary probe: ``positive`` against ``negative`` (direction points to positive)."""

    negative: str
    positive: str

    @property
    def name(self) -> str:
        return f"{self.negative}-{self.positive}"


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


def _accuracy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Accuracy per problem; logits (problems, samples), y (samples,) in {0, 1}."""
    return ((logits > 0) == y[None, :].astype(bool)).mean(axis=1)


def fit_sklearn(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, max_iter: int = 1000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: one scikit-learn pipeline per step. x (samples, steps, channels), y in {0,1}.

    Returns train accuracy, test accuracy (steps,) and unit directions (steps, channels).
    """
    steps = x.shape[1]
    train_acc, test_acc = np.empty(steps), np.empty(steps)
    directions = np.empty((steps, x.shape[2]))
    for step in range(steps):
        scaler = StandardScaler().fit(x[train, step])
        model = LogisticRegression(max_iter=max_iter).fit(scaler.transform(x[train, step]), y[train])
        train_acc[step] = model.score(scaler.transform(x[train, step]), y[train])
        test_acc[step] = model.score(scaler.transform(x[test, step]), y[test])
        raw = model.coef_[0] / scaler.scale_
        directions[step] = raw / max(np.linalg.norm(raw), 1e-12)
    return train_acc, test_acc, directions


def fit_torch(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    device: str | torch.device = "cpu",
    iterations: int = 50,
    tol: float = 1e-5,
    chunk_bytes: int = 1 << 29,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fast path: every problem in ``x`` (samples, problems, channels) at once.

    Minimises sum(log-loss) + ||w||^2 / 2 (scikit-learn's default objective, C=1, intercept
    unpenalised) on train-standardised features by Newton's method, batched over problems,
    until the gradient of the mean loss is below ``tol`` everywhere (scikit-learn's lbfgs
    stops at 1e-4 on the same scale).
    Float64 on the CPU; float32 on a GPU, where the Hessian (at least the identity on the
    weights) is well enough conditioned for a Cholesky solve and float64 is slow.
    """
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    x = torch.as_tensor(x, device=device).to(dtype).transpose(0, 1)  # (P, N, C)
    problems, _, channels = x.shape
    y_all = torch.as_tensor(y, dtype=dtype, device=device)
    tr = torch.as_tensor(train, device=device)
    mean = x[:, tr].mean(dim=1, keepdim=True)
    scale = x[:, tr].std(dim=1, unbiased=False, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # as StandardScaler does
    z = torch.cat([(x - mean) / scale, torch.ones_like(x[..., :1])], dim=-1)  # (P, N, C+1)
    penalty = torch.ones(channels + 1, dtype=dtype, device=device)
    penalty[-1] = 0.0  # intercept

    weights = torch.zeros(problems, channels + 1, dtype=dtype, device=device)
    per_problem = (channels + 1) ** 2 * x.element_size() * 3
    chunk = max(1, chunk_bytes // per_problem)
    zt, yt = z[:, tr], y_all[tr]
    for start in range(0, problems, chunk):
        part = slice(start, start + chunk)
        w, zp = weights[part], zt[part]
        for _ in range(iterations):
            p = torch.sigmoid(torch.einsum("pnc,pc->pn", zp, w))
            grad = torch.einsum("pnc,pn->pc", zp, p - yt) + penalty * w
            if grad.abs().max() <= tol * len(tr):
                break
            curvature = (p * (1 - p)).unsqueeze(-1)
            hessian = torch.bmm((zp * curvature).transpose(1, 2), zp) + torch.diag(penalty)
            hessian.diagonal(dim1=-2, dim2=-1).add_(1e-6)  # intercept-only degenerate cases
            factor, info = torch.linalg.cholesky_ex(hessian)
            if bool(info.any()):  # not positive definite numerically: fall back to LU
                step = torch.linalg.solve(hessian, grad.unsqueeze(-1)).squeeze(-1)
            else:
                step = torch.cholesky_solve(grad.unsqueeze(-1), factor).squeeze(-1)
            w -= step
        weights[part] = w

    logits = torch.einsum("pnc,pc->pn", z, weights).cpu().numpy()
    y_np = np.asarray(y)
    train_acc = _accuracy(logits[:, train], y_np[train])
    test_acc = _accuracy(logits[:, test], y_np[test])
    raw = (weights[:, :-1] / scale.squeeze(1)).cpu().numpy()
    directions = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    return train_acc, test_acc, directions


def fit_pair(
    activations: Mapping[str, np.ndarray],
    labels: Sequence[str],
    pair: Pair,
    backend: Backend = "torch",
    test_size: float = 0.2,
    seed: int = 0,
    min_per_class: int = 10,
    device: str | torch.device = "cpu",
) -> list[ProbeResult]:
    """Probes for every site and step. ``activations[site]`` is (samples, steps, channels),
    rows aligned with ``labels``; samples of other classes are left out."""
    labels = np.asarray(labels)
    keep = np.isin(labels, [pair.negative, pair.positive])
    counts = check_counts(labels[keep], pair, min_per_class)
    y = (labels[keep] == pair.positive).astype(np.int64)
    train, test = split_indices(y, test_size, seed)

    results: list[ProbeResult] = []
    if backend == "sklearn":
        for site, x in activations.items():
            tr_acc, te_acc, dirs = fit_sklearn(np.asarray(x)[keep], y, train, test)
            results.append(ProbeResult(site, pair, tr_acc, te_acc, dirs, len(train), len(test),
                                       counts))
        return results
    if backend != "torch":
        raise ValueError(f"unknown probe backend {backend!r}; use 'torch' or 'sklearn'")
    # Group equal-width sites so each group is one batched solve over (site, step) problems.
    by_width: dict[int, list[str]] = {}
    for site, x in activations.items():
        by_width.setdefault(np.shape(x)[-1], []).append(site)
    for sites in by_width.values():
        stacked = np.concatenate([np.asarray(activations[s])[keep] for s in sites], axis=1)
        tr_acc, te_acc, dirs = fit_torch(stacked, y, train, test, device=device)
        steps = np.shape(activations[sites[0]])[1]
        for k, site in enumerate(sites):
            part = slice(k * steps, (k + 1) * steps)
            results.append(ProbeResult(site, pair, tr_acc[part], te_acc[part], dirs[part],
                                       len(train), len(test), counts))
    order = list(activations)
    return sorted(results, key=lambda r: order.index(r.site))
