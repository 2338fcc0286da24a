"""Batched solvers of L2-regularised logistic regression: many probes, one call.

Every problem minimises sum(log-loss) + ||w||^2 / 2 over a design ``z`` whose last column is
the intercept (penalty 0 there and on covariates), scikit-learn's default objective at C=1.
Problems of one width are stacked (P, N, C) and solved together: damped Newton on the primal
(C x C) or dual (N x N) system, truncated conjugate gradients on Hessian-vector products, or
L-BFGS with a free line search (``choose_solver`` picks by shape, from the timings in
benchmarks/README.md). ``icm.probing.probes.fit_torch`` prepares the designs (standardising,
warm starts across steps) and calls these."""

from __future__ import annotations

import numpy as np
import torch

from icm.probing.pairs import Pair  # noqa: F401  (re-exported: icm.probing.probes.Pair)


def matvec(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Z v per problem: (P, N, C) x (P, C) -> (P, N), as the row vector v' Z'. On the CPU
    (MKL), a batched matrix-vector bmm with several problems took 7 to 10 times as long
    as the same product with the vector on the left (2 x 800 x 321: 413 against 59 us);
    with one problem the two are equal."""
    return torch.bmm(v.unsqueeze(1), z.transpose(1, 2)).squeeze(1)


def _objective(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
               penalty: torch.Tensor) -> torch.Tensor:
    """sum(log-loss) + ||w||^2 / 2 per problem, accumulated in float64 so that float32 noise
    does not decide the line search."""
    logits, w = logits.double(), w.double()
    loss = torch.nn.functional.softplus(logits) - y.double() * logits
    return loss.sum(dim=1) + 0.5 * (penalty.double() * w * w).sum(dim=1)


def _primal_step(z: torch.Tensor, d: torch.Tensor, grad: torch.Tensor,
                 penalty: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Newton direction from the (C+1)^2 Hessian Z'DZ + diag(penalty): 2NC^2 per problem.
    ``scratch`` (at least z's shape) holds DZ, so no block of z's size is allocated per call."""
    weighted = torch.mul(z, d.unsqueeze(-1), out=scratch[: len(z)])
    hessian = torch.bmm(weighted.transpose(1, 2), z)
    hessian.diagonal(dim1=-2, dim2=-1).add_(penalty + 1e-6)  # 1e-6: intercept-only cases
    factor, info = torch.linalg.cholesky_ex(hessian)
    if bool(info.any()):  # not positive definite numerically: fall back to LU
        return torch.linalg.solve(hessian, grad.unsqueeze(-1)).squeeze(-1)
    return torch.cholesky_solve(grad.unsqueeze(-1), factor).squeeze(-1)


def _dual_step(z: torch.Tensor, gram: torch.Tensor, d: torch.Tensor,
               grad: torch.Tensor) -> torch.Tensor:
    """The same Newton direction through the N x N Gram matrix K = XX' (N^3/3 per problem),
    for features wider than the sample count.

    With A = X'DX + I (weights) and s = sqrt(d), Woodbury gives
    A^-1 v = v - X' S (I + SKS)^-1 S X v, where I + SKS has eigenvalues >= 1; the
    unpenalised intercept is eliminated through its Schur complement c - u'A^-1 u,
    u = X'd, c = sum(d).
    """
    x = z[..., :-1]
    s = d.sqrt()
    inner = gram * s.unsqueeze(2) * s.unsqueeze(1)
    inner.diagonal(dim1=-2, dim2=-1).add_(1.0)
    factor = torch.linalg.cholesky(inner)
    u = torch.bmm(d.unsqueeze(1), x).squeeze(1)
    rhs = torch.stack([grad[:, :-1], u], dim=-1)  # (P, C, 2)
    inner_solution = torch.cholesky_solve(s.unsqueeze(-1) * torch.bmm(x, rhs), factor)
    solved = rhs - torch.bmm(x.transpose(1, 2), s.unsqueeze(-1) * inner_solution)
    a_grad, a_u = solved[..., 0], solved[..., 1]
    schur = d.sum(dim=1) - (u * a_u).sum(dim=1) + 1e-6
    intercept = (grad[:, -1] - (u * a_grad).sum(dim=1)) / schur
    return torch.cat([a_grad - intercept.unsqueeze(1) * a_u, intercept.unsqueeze(1)], dim=1)


def _cg_step(z: torch.Tensor, d: torch.Tensor, grad: torch.Tensor, penalty: torch.Tensor,
             squares: torch.Tensor, forcing: torch.Tensor, max_iter: int) -> torch.Tensor:
    """The Newton direction by preconditioned conjugate gradients on H s = grad, H = Z'DZ +
    diag(penalty), from Hessian-vector products only (Z'(d * Zv): 4NC per iteration, never
    the C x C Hessian), stopped per problem once ||r|| <= forcing * ||grad|| (truncated
    Newton). Jacobi preconditioner diag(H) = d'(Z*Z) + penalty from the step's ``squares``:
    the intercept and prompt-indicator columns have their own scales."""
    diag = torch.bmm(d.unsqueeze(1), squares).squeeze(1) + penalty + 1e-6
    solution = torch.zeros_like(grad)
    residual = grad.clone()
    pre = residual / diag
    direction = pre.clone()
    rho = (residual * pre).sum(dim=1)
    target = forcing * grad.norm(dim=1)
    active = torch.ones(len(grad), dtype=torch.bool, device=grad.device)
    for _ in range(max_iter):
        zp = matvec(z, direction)  # (P, N)
        hp = torch.bmm((d * zp).unsqueeze(1), z).squeeze(1) + (penalty + 1e-6) * direction
        curvature = (direction * hp).sum(dim=1)
        alpha = torch.where(active, rho / curvature.clamp_min(1e-30), torch.zeros_like(rho))
        solution += alpha.unsqueeze(1) * direction
        residual -= alpha.unsqueeze(1) * hp
        active &= residual.norm(dim=1) > target
        if not bool(active.any()):
            break
        pre = residual / diag
        rho_next = (residual * pre).sum(dim=1)
        direction = pre + (rho_next / rho.clamp_min(1e-30)).unsqueeze(1) * direction
        rho = rho_next
    return solution


def _line_minimum(zp: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                  direction: torch.Tensor, penalty: torch.Tensor,
                  start: float = 1.0, iterations: int = 1, rtol: float = 1e-3) -> torch.Tensor:
    """Step length along ``direction`` per problem by safeguarded one-dimensional Newton
    iterations from ``start`` (1, the quasi-Newton step; 0 for an unscaled first direction),
    stopping early once no step moves t by more than ``rtol`` relative. The logits along the
    line are ``logits + t * zp`` (zp = Z direction), so each trial costs O(N), never a pass
    over Z. One iteration is the default: the objective is nearly quadratic around the
    quasi-Newton step, and iterating to the exact minimum (2.7 iterations on average) left
    the L-BFGS iterations unchanged (673 against 679 at 2,400 x 1,281) for 23 % more time."""
    zp64, base, y64 = zp.double(), logits.double(), y.double()
    wd = (penalty * w * direction).sum(dim=1).double()  # d/dt of the penalty at t = 0
    dd = (penalty * direction * direction).sum(dim=1).double()
    t = torch.full((len(zp),), start, dtype=torch.float64, device=zp.device)
    low, high = torch.zeros_like(t), torch.full_like(t, float("inf"))  # a descent direction
    for _ in range(iterations):
        p = torch.sigmoid(torch.addcmul(base, t.unsqueeze(1), zp64))
        first = torch.linalg.vecdot(p - y64, zp64) + wd + t * dd
        second = torch.linalg.vecdot(p * (1 - p), zp64 * zp64) + dd + 1e-12
        low = torch.where(first < 0, t, low)
        high = torch.where(first > 0, t, high)
        trial = t - first / second
        outside = (trial <= low) | (trial >= high)
        bisect = torch.where(torch.isinf(high), 2 * low + 1, 0.5 * (low + high))
        trial = torch.where(outside, bisect, trial)
        moved = (trial - t).abs() > rtol * t.abs().clamp_min(1e-3)
        t = trial
        if not bool(moved.any()):
            break
    return t.to(logits.dtype)


def _quasi_newton_direction(grad: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-H grad for the L-BFGS inverse Hessian H of the pairs ``s``, ``y`` (P, m, C), oldest
    first, in the compact form of Byrd, Nocedal and Schnabel (1994; Nocedal and Wright, eq.
    7.24) with H0 = gamma I, gamma = s'y / y'y of the newest pair. It equals the two-loop
    recursion, in a fixed dozen batched products and two m x m triangular solves instead
    of 4m small vector operations: on the CPU the recursion's per-operation cost, not its
    arithmetic, dominated at widths of a few hundred. The m x m algebra is in float64."""
    g = grad.unsqueeze(-1)
    sy = torch.bmm(s, y.transpose(1, 2)).double()  # (P, m, m): s_i' y_j
    yy = torch.bmm(y, y.transpose(1, 2)).double()
    sg, yg = torch.bmm(s, g).double(), torch.bmm(y, g).double()  # (P, m, 1)
    upper = torch.triu(sy)
    diag = torch.diagonal(sy, dim1=1, dim2=2).unsqueeze(-1)  # s_i' y_i > 0: strongly convex
    gamma = (diag[:, -1] / torch.diagonal(yy, dim1=1, dim2=2)[:, -1:]).unsqueeze(-1)  # (P,1,1)
    u = torch.linalg.solve_triangular(upper, sg, upper=True)
    top = torch.linalg.solve_triangular(upper.transpose(1, 2),
                                        diag * u + gamma * (torch.bmm(yy, u) - yg), upper=False)
    hg = (gamma.to(g.dtype) * g + torch.bmm(s.transpose(1, 2), top.to(g.dtype))
          - gamma.to(g.dtype) * torch.bmm(y.transpose(1, 2), u.to(g.dtype))).squeeze(-1)
    bad = ~torch.isfinite(hg).all(dim=1)  # a degenerate pair (a zero step): steepest descent
    return -torch.where(bad.unsqueeze(1), grad, hg)


def solve_lbfgs(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, penalty: torch.Tensor,
                tol: float, iterations: int, memory: int = 10, step_tol: float = 0.0,
                n_iter: torch.Tensor | None = None) -> torch.Tensor:
    """Batched L-BFGS on every problem of ``z`` (P, N, C+1) from ``w`` (P, C+1), in place.

    Two passes over Z per iteration (Z p for the line, Z'(sigma - y) for the gradient), as
    scikit-learn's lbfgs, but the line search is exact and free: along p the logits are
    affine in the step length (``_line_minimum``). A warm start that is worse than zero is
    dropped (steps of unrelated problems). The objective is strongly convex, so every
    curvature pair has s'y >= ||s||^2_penalty > 0 and none needs skipping. Converged
    problems leave the batch: those whose gradient meets ``tol`` and, with ``step_tol``,
    whose last step moved the penalised weights by at most that fraction of their norm.
    Returns a mask of the problems that met both; ``n_iter`` (P,), if given, counts each
    problem's iterations.
    """
    problems, samples, width = z.shape
    active = torch.arange(problems, device=w.device)
    za, wa = z, w.clone()
    logits = matvec(za, wa)
    cold = _objective(logits, y, wa, penalty) > samples * np.log(2.0)  # worse than w = 0
    wa[cold], logits[cold] = 0.0, 0.0

    def gradient(logits: torch.Tensor, wa: torch.Tensor, za: torch.Tensor) -> torch.Tensor:
        residual = (torch.sigmoid(logits) - y).unsqueeze(1)
        return torch.bmm(residual, za).squeeze(1) + penalty * wa

    grad = gradient(logits, wa, za)
    s_hist = torch.zeros(problems, memory, width, dtype=w.dtype, device=w.device)
    y_hist = torch.zeros_like(s_hist)
    converged = torch.zeros(problems, dtype=torch.bool, device=w.device)
    settled = torch.zeros(problems, dtype=torch.bool, device=w.device)
    for it in range(iterations):
        done = (grad.abs().amax(dim=1) <= tol * samples) & (settled | (step_tol <= 0))
        if bool(done.any()):
            converged[active[done]] = True
            w[active[done]] = wa[done]
            keep = ~done
            if not bool(keep.any()):
                return converged
            active, za, wa, grad, logits = (active[keep], za[keep], wa[keep], grad[keep],
                                            logits[keep])
            s_hist, y_hist, settled = s_hist[keep], y_hist[keep], settled[keep]
        if n_iter is not None:
            n_iter[active] += 1
        pairs = min(it, memory)  # the pair of iteration i is in slot i % memory
        if pairs:
            index = torch.arange(it - pairs, it, device=w.device) % memory  # oldest first
            direction = _quasi_newton_direction(grad, s_hist[:, index], y_hist[:, index])
        else:
            direction = -grad
        zp = matvec(za, direction)
        t = _line_minimum(zp, logits, y, wa, direction, penalty, start=1.0 if pairs else 0.0)
        step = t.unsqueeze(1) * direction
        wa = wa + step
        settled = ((penalty * step * step).sum(dim=1)
                   <= step_tol**2 * (penalty * wa * wa).sum(dim=1)) & (pairs > 0)
        logits = logits + t.unsqueeze(1) * zp
        new_grad = gradient(logits, wa, za)
        s_hist[:, it % memory], y_hist[:, it % memory] = step, new_grad - grad
        grad = new_grad
    w[active] = wa
    return converged


#: Widths up to this solve the exact (C+1)^2 Newton system (cheap at such widths: on the
#: toy's 64 channels it beats conjugate gradients 5x on real activations).
PRIMAL_MAX_WIDTH = 256

#: The solvers ``fit_torch`` and ``BatchedLogisticRegression`` accept by name.
SOLVERS = ("primal", "dual", "cg", "lbfgs")


def choose_solver(samples: int, channels: int, covariates: bool = False) -> str:
    """How a problem shape is solved, from the timings on 2 CPU cores in benchmarks/README.md:
    the exact (C+1)^2 Newton system for narrow features, batched L-BFGS otherwise (two passes
    over the data per iteration, as scikit-learn's lbfgs, in float32 with a free line
    search: 2.8x scikit-learn at 2,400 training samples x 1,280 channels, 5.8x at
    800 x 1,280, where Newton-CG and the dual Newton system were slower than L-BFGS).
    ``samples`` and ``covariates`` are kept for the dual and CG forms, which remain
    selectable by name."""
    del samples, covariates
    if channels <= PRIMAL_MAX_WIDTH:
        return "primal"
    return "lbfgs"


def solve_newton(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, penalty: torch.Tensor,
                 tol: float, iterations: int, gram: torch.Tensor | None = None,
                 scratch: torch.Tensor | None = None, squares: torch.Tensor | None = None,
                 cg_iterations: int = 100, n_iter: torch.Tensor | None = None) -> torch.Tensor:
    """Damped Newton on every problem of ``z`` (P, N, C+1) at once, from ``w`` (P, C+1).

    Converged problems leave the batch (active set), so the Newton system, the dominant
    cost, is only solved for those still moving. A step that raises the objective is halved
    (backtracking), which keeps warm starts safe. With ``gram`` (P, N, N; X X' without the
    intercept column) the step is solved in the N-dimensional dual form; with ``squares``
    (z * z) by truncated conjugate gradients (Newton-CG). Returns a mask of the problems
    that met ``tol``; ``n_iter`` (P,), if given, counts each problem's Newton steps.
    """
    active = torch.arange(len(w), device=w.device)
    za = z
    if scratch is None and gram is None and squares is None:
        scratch = torch.empty_like(z)
    logits = matvec(za, w)
    objective = _objective(logits, y, w, penalty)
    converged = torch.zeros(len(w), dtype=torch.bool, device=w.device)
    for _ in range(iterations):
        wa = w[active]
        p = torch.sigmoid(logits)
        grad = torch.bmm((p - y).unsqueeze(1), za).squeeze(1) + penalty * wa
        done = grad.abs().amax(dim=1) <= tol * len(y)
        converged[active[done]] = True
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = ~done
            active, za, wa, p = active[keep], za[keep], wa[keep], p[keep]
            grad, logits, objective = grad[keep], logits[keep], objective[keep]
            gram = gram[keep] if gram is not None else None
            squares = squares[keep] if squares is not None else None
        if n_iter is not None:
            n_iter[active] += 1
        d = p * (1 - p)
        if squares is not None:
            # Eisenstat-Walker forcing: loose while far, tight near the optimum.
            forcing = (grad.norm(dim=1) / len(y)).clamp(max=0.1)
            step = _cg_step(za, d, grad, penalty, squares, forcing, cg_iterations)
        elif gram is None:
            step = _primal_step(za, d, grad, penalty, scratch)
        else:
            step = _dual_step(za, gram, d, grad)
        size = torch.ones(len(wa), 1, dtype=wa.dtype, device=wa.device)
        for _ in range(20):
            trial = wa - size * step
            trial_logits = matvec(za, trial)
            trial_objective = _objective(trial_logits, y, trial, penalty)
            worse = trial_objective > objective + 1e-6 * (1 + objective.abs())
            if not bool(worse.any()):
                break
            size[worse] /= 2
        w[active], logits, objective = trial, trial_logits, trial_objective
    return converged


#: Bytes of one site group's design matrix that Newton-CG's repeated products keep in cache.
CG_GROUP_BYTES = 16 * 2**20


#: The L-BFGS stopping rule's second half: the last step moved the weights by at most this
#: fraction of their norm. The gradient rule alone (scikit-learn's) stops where the optimum
#: is flat, with the direction off by up to 1.5 % in cosine when the training rows are about
#: as many as the channels; the step, about H^-1 g, estimates the distance to the optimum.
LBFGS_STEP_TOL = 0.01


def steps_per_solve(sites: int, samples: int, width: int, steps: int,
                    itemsize: int = 4) -> int:
    """How many steps one L-BFGS solve batches (as more problems) so that its designs fill
    about CG_GROUP_BYTES: with a few narrow sites, each iteration's dozens of small tensor
    operations, not arithmetic, take the time (2 sites x 800 x 321: about 2 ms an
    iteration, as scikit-learn's per probe). Wide or many sites: one step at a time."""
    return max(1, min(steps, CG_GROUP_BYTES // (sites * samples * width * itemsize)))


def cache_groups(sites: int, samples: int, width: int, itemsize: int = 4) -> list[slice]:
    """Slices of the sites, each group's (samples x width) designs within CG_GROUP_BYTES."""
    per = max(1, CG_GROUP_BYTES // (samples * width * itemsize))
    return [slice(i, min(i + per, sites)) for i in range(0, sites, per)]


class BatchedLogisticRegression:
    """Many binary logistic regressions of one shape, fitted together, scikit-learn style.

    The problem is ``sklearn.linear_model.LogisticRegression(C=C)``'s: L2 penalty, the
    intercept unpenalised, features used as given (no scaling); ``fit`` takes ``X`` of shape
    (n_problems, n_samples, n_features), or (n_samples, n_features) for one problem, and
    labels ``y`` in {0, 1} shared by every problem (as the probes of one class pair are).
    After it: ``coef_`` (n_problems, n_features), ``intercept_`` (n_problems,), ``n_iter_``
    (n_problems,), ``converged_`` (n_problems,); for one problem, ``coef_`` is (1, n_features)
    and the others (1,), as scikit-learn's. ``solver`` is one of ``SOLVERS`` or "auto"
    (``choose_solver``). ``benchmarks/probe_speed.py`` times it against scikit-learn's."""

    def __init__(self, C: float = 1.0, solver: str = "auto", tol: float = 1e-4,
                 max_iter: int | None = None, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu") -> None:
        self.C, self.solver, self.tol, self.max_iter = C, solver, tol, max_iter
        self.dtype, self.device = dtype, torch.device(device)

    def fit(self, X: np.ndarray, y: np.ndarray) -> BatchedLogisticRegression:
        x = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
        if x.dim() == 2:
            x = x.unsqueeze(0)
        problems, samples, features = x.shape
        labels = np.asarray(y)
        if set(np.unique(labels)) - {0, 1}:
            raise ValueError("y must hold 0 and 1")
        target = torch.as_tensor(labels, dtype=self.dtype, device=self.device)
        z = torch.cat([x, torch.ones(problems, samples, 1, dtype=self.dtype,
                                     device=self.device)], dim=2)
        penalty = torch.full((features + 1,), 1.0 / self.C, dtype=self.dtype, device=self.device)
        penalty[-1] = 0.0  # the intercept
        w = torch.zeros(problems, features + 1, dtype=self.dtype, device=self.device)
        n_iter = torch.zeros(problems, dtype=torch.long, device=self.device)
        solver = choose_solver(samples, features + 1) if self.solver == "auto" else self.solver
        if solver not in SOLVERS:
            raise ValueError(f"solver {self.solver!r}: use one of {SOLVERS} or 'auto'")
        if solver == "lbfgs":
            converged = solve_lbfgs(z, target, w, penalty, self.tol, self.max_iter or 1000,
                                    step_tol=LBFGS_STEP_TOL, n_iter=n_iter)
        else:
            converged = solve_newton(
                z, target, w, penalty, self.tol, self.max_iter or 100,
                gram=torch.bmm(x, x.transpose(1, 2)) if solver == "dual" else None,
                squares=z * z if solver == "cg" else None, n_iter=n_iter)
        self.coef_ = w[:, :features].cpu().numpy()
        self.intercept_ = w[:, features].cpu().numpy()
        self.n_iter_ = n_iter.cpu().numpy()
        self.converged_ = converged.cpu().numpy()
        self.solver_ = solver
        self.classes_ = np.array([0, 1])
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits, (n_problems, n_samples) for stacked ``X``, (n_samples,) for one problem."""
        x = np.asarray(X, dtype=np.float64)
        if x.ndim == 2:
            return x @ self.coef_[0] + self.intercept_[0]
        return np.einsum("psf,pf->ps", x, self.coef_) + self.intercept_[:, None]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(int)

    def score(self, X: np.ndarray, y: np.ndarray) -> np.ndarray | float:
        """Accuracy per problem (a float for one problem)."""
        right = self.predict(X) == np.asarray(y)
        return right.mean(axis=-1)
