"""Probes and ranking: a planted signal is found, the fast path agrees with scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from icm.probing.probes import (
    Pair,
    ProbeDataError,
    choose_solver,
    fit_pair,
    fit_sklearn,
    fit_torch,
    prompt_covariates,
    split_indices,
)
from icm.probing.ranking import kind_summary, plot_heatmap, rank_per_pair, rank_sites

PAIR = Pair(negative="red", positive="green")


def planted(n=240, steps=8, seed=0, signal_site="mid.attn1", from_step=3):
    """Four sites of two widths; only ``signal_site`` carries the label, from ``from_step``."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(n) < 0.5, "green", "red")
    sites = {"down.attn1": 16, "down.attn2": 16, "mid.attn1": 24, "mid.attn2": 24}
    scales = {s: rng.uniform(0.5, 4.0, w) for s, w in sites.items()}  # unequal channel scales
    acts = {s: rng.standard_normal((n, steps, w)) * scales[s] for s, w in sites.items()}
    shift = np.where(labels == "green", 1.0, -1.0)[:, None] * 2.0 * scales[signal_site][3]
    acts[signal_site][:, from_step:, 3] += shift
    return acts, labels


def scores_frame(results):
    return pd.DataFrame([{"site": r.site, "step": s, "pair": r.pair.name, "test_acc": a}
                         for r in results for s, a in enumerate(r.test_acc)])


def test_planted_site_ranks_first_and_only_after_it_appears():
    acts, labels = planted()
    results = fit_pair(acts, labels, PAIR)
    ranking = rank_sites(scores_frame(results), t0=3)
    assert ranking.iloc[0]["site"] == "mid.attn1"
    signal = next(r for r in results if r.site == "mid.attn1")
    assert signal.test_acc[3:].min() > 0.85 and signal.test_acc[:3].max() < 0.75
    assert list(kind_summary(ranking)["kind"]) == ["attn1", "attn2"]


def test_fast_path_agrees_with_scikit_learn():
    acts, labels = planted(seed=1)
    fast = {r.site: r for r in fit_pair(acts, labels, PAIR, backend="torch")}
    reference = {r.site: r for r in fit_pair(acts, labels, PAIR, backend="sklearn")}
    gaps = [np.abs(fast[s].test_acc - reference[s].test_acc).mean() for s in acts]
    assert np.mean(gaps) < 0.01
    for site in acts:
        cosine = np.sum(fast[site].directions * reference[site].directions, axis=1)
        assert cosine.min() > 0.999


def test_direction_is_unit_and_points_to_the_positive_class():
    acts, labels = planted(seed=2)
    signal = next(r for r in fit_pair(acts, labels, PAIR) if r.site == "mid.attn1")
    np.testing.assert_allclose(np.linalg.norm(signal.directions, axis=1), 1.0, rtol=1e-6)
    x = acts["mid.attn1"][:, 5]
    projection = x @ signal.directions[5]
    assert projection[labels == "green"].mean() > projection[labels == "red"].mean()
    assert abs(signal.directions[5][3]) == np.abs(signal.directions[5]).max()


def test_spread_follows_the_activation_scale_and_measures_the_class_gap():
    acts, labels = planted(seed=2)
    fitted = {r.site: r for r in fit_pair(acts, labels, PAIR)}
    louder = {r.site: r for r in fit_pair({s: 10 * a for s, a in acts.items()}, labels, PAIR)}
    signal = fitted["mid.attn1"]
    assert signal.spread.shape == (8,) and (signal.spread > 0).all()
    # ten times the activations: the same direction, ten times the spread, so alpha in
    # spread units pushes ten times harder in raw units, the same in units of the data
    np.testing.assert_allclose(louder["mid.attn1"].spread, 10 * signal.spread, rtol=1e-3)
    y = labels == "green"
    for step in (3, 5, 7):  # the planted classes are 4 noise std apart on channel 3
        projection = acts["mid.attn1"][:, step] @ signal.directions[step]
        gap = projection[y].mean() - projection[~y].mean()
        assert 3 < gap / signal.spread[step] < 5


def test_too_few_samples_name_the_class():
    acts, labels = planted(n=60)
    labels = labels.copy()
    labels[np.flatnonzero(labels == "green")[3:]] = "blue"  # 3 greens left
    with pytest.raises(ProbeDataError, match=r"too few samples of green .*'green': 3"):
        fit_pair(acts, labels, PAIR)


def test_heatmap_is_drawn(tmp_path):
    acts, labels = planted()
    scores = scores_frame(fit_pair(acts, labels, PAIR))
    plot_heatmap(scores, rank_sites(scores, 3), tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_dual_form_solves_the_same_problem_as_the_primal():
    """Features wider than the training set: the Gram-matrix (Woodbury) Newton step must give
    the primal solution, which scikit-learn confirms."""
    rng = np.random.default_rng(3)
    n, steps, width = 80, 3, 120
    y = (rng.random(n) < 0.5).astype(np.int64)
    x = rng.standard_normal((n, 2, steps, width)) * rng.uniform(0.5, 3.0, width)
    x[:, :, :, 0] += np.where(y == 1, 1.5, -1.5)[:, None, None]
    train, test = split_indices(y, 0.25, 0)
    primal = fit_torch(x, y, train, test, solver="primal", dtype=torch.float64)[:3]
    dual = fit_torch(x, y, train, test, solver="dual", dtype=torch.float64)[:3]
    np.testing.assert_allclose(dual[2], primal[2], atol=1e-6)
    np.testing.assert_array_equal(dual[1], primal[1])
    reference = fit_sklearn(x[:, 0], y, train, test)
    assert np.sum(reference[2] * dual[2][0], axis=1).min() > 0.999


def covariate_problem(seed: int):
    """Two sites of 3 steps, 40 channels of unequal scales, a signal in 3 of them, three
    prompts as covariates; site 1's channels are correlated (harder for CG)."""
    rng = np.random.default_rng(seed)
    n, steps, width = 300, 3, 40
    y = (rng.random(n) < 0.4).astype(np.int64)
    groups = rng.integers(0, 3, n)
    x = rng.standard_normal((n, 2, steps, width)) * rng.uniform(0.5, 3.0, width)
    x[:, :, :, :3] += np.where(y == 1, 0.8, -0.8)[:, None, None, None]
    x[:, 1] += rng.standard_normal((n, 1, width)) * 2
    train, test = split_indices(y, 0.25, 0)
    return x, y, train, test, prompt_covariates(groups)


def test_conjugate_gradients_solve_the_same_problem_with_prompt_covariates():
    """Newton-CG (Hessian-vector products, Jacobi-preconditioned) reaches the primal
    Newton solution, prompt indicators included, and scikit-learn agrees."""
    x, y, train, test, covariates = covariate_problem(5)
    primal = fit_torch(x, y, train, test, solver="primal", dtype=torch.float64,
                       covariates=covariates)
    cg = fit_torch(x, y, train, test, solver="cg", dtype=torch.float64, covariates=covariates)
    assert np.abs(cg[1] - primal[1]).max() <= 1 / len(test) + 1e-12  # at most one sample
    assert np.sum(cg[2] * primal[2], axis=-1).min() > 0.999
    reference = fit_sklearn(x[:, 0], y, train, test, covariates=covariates)
    assert np.sum(reference[2] * cg[2][0], axis=1).min() > 0.99


def test_lbfgs_reaches_the_newton_optimum_with_prompt_covariates():
    """Batched L-BFGS with the exact line search (two passes over the data per iteration)
    reaches the exact Newton optimum when asked for a tight tolerance, prompt indicators
    included; at the default tolerance it agrees with scikit-learn's lbfgs."""
    x, y, train, test, covariates = covariate_problem(6)
    exact = fit_torch(x, y, train, test, solver="primal", dtype=torch.float64,
                      covariates=covariates, tol=1e-10)
    tight = fit_torch(x, y, train, test, solver="lbfgs", dtype=torch.float64,
                      covariates=covariates, tol=1e-10)
    np.testing.assert_allclose(tight[2], exact[2], atol=1e-6)
    np.testing.assert_array_equal(tight[1], exact[1])
    default = fit_torch(x, y, train, test, solver="lbfgs", covariates=covariates)
    reference = fit_sklearn(x[:, 1], y, train, test, covariates=covariates)
    assert np.sum(reference[2] * default[2][1], axis=1).min() > 0.99
    assert np.abs(reference[1] - default[1][1]).max() <= 1 / len(test) + 1e-12
    # The shape decides: the exact Newton system for narrow features, L-BFGS for wide ones.
    assert choose_solver(2400, 65) == "primal" and choose_solver(2400, 1281) == "lbfgs"
    assert choose_solver(800, 3073) == "lbfgs"


def test_steps_solved_together_give_the_answers_of_steps_solved_one_by_one(monkeypatch):
    """A few narrow sites: L-BFGS solves several steps as one batch (``steps_per_solve``),
    each warm-started from its site's previous block. At a tight tolerance the answers are
    those of the step-by-step chain, block boundaries included (5 steps, blocks of 2)."""
    from icm.probing import probes

    x, y, train, test, covariates = covariate_problem(8)
    x = np.concatenate([x, x[:, :, ::-1]], axis=2)[:, :, :5]  # 5 steps
    assert probes.steps_per_solve(2, len(train), 41, 5) == 5  # small: all steps at once
    assert probes.steps_per_solve(2, 2400, 1281, 10) == 1  # SD-wide: one at a time
    kwargs = dict(solver="lbfgs", dtype=torch.float64, covariates=covariates, tol=1e-10)
    monkeypatch.setattr(probes, "steps_per_solve", lambda *args: 2)
    blocks = fit_torch(x, y, train, test, **kwargs)
    monkeypatch.setattr(probes, "steps_per_solve", lambda *args: 1)
    chain = fit_torch(x, y, train, test, **kwargs)
    np.testing.assert_allclose(blocks[2], chain[2], atol=1e-6)
    np.testing.assert_array_equal(blocks[1], chain[1])
    np.testing.assert_allclose(blocks[3], chain[3], rtol=1e-6)


def test_lbfgs_stops_near_the_optimum_where_the_gradient_rule_alone_stops_early(monkeypatch):
    """Weak signal, training rows fewer than channels: the optimum is flat, and the
    gradient rule alone (scikit-learn's, 1e-4) stops with the direction 1 - cos >= 3e-4
    off the exact optimum. Also requiring the last step to be 1 % of the weights' norm
    (``LBFGS_STEP_TOL``) brings it within 2e-4, closer than scikit-learn."""
    from icm.probing import probes

    rng = np.random.default_rng(0)
    n, width = 500, 1000
    y = (rng.random(n) < 0.4).astype(np.int64)
    x = rng.standard_normal((n, 1, 2, width)).astype(np.float32)
    x[..., :8] += np.where(y == 1, 0.15, -0.15)[:, None, None, None]
    train, test = split_indices(y, 0.2, 0)
    exact = fit_torch(x, y, train, test, solver="lbfgs", dtype=torch.float64, tol=1e-9)[2]
    default = np.sum(fit_torch(x, y, train, test)[2] * exact, axis=-1).min()
    monkeypatch.setattr(probes, "LBFGS_STEP_TOL", 0.0)
    gradient_only = np.sum(fit_torch(x, y, train, test)[2] * exact, axis=-1).min()
    reference = np.sum(fit_sklearn(x[:, 0], y, train, test)[2] * exact[0], axis=-1).min()
    assert gradient_only < 0.9997 < 0.9998 < default, (gradient_only, default)
    assert default > reference


def test_compact_quasi_newton_direction_equals_the_two_loop_recursion():
    """The compact L-BFGS form (a few batched products) gives the direction of the textbook
    two-loop recursion (Nocedal and Wright, algorithm 7.4), written out here in float64."""
    from icm.probing.solvers import _quasi_newton_direction

    rng = np.random.default_rng(7)
    problems, pairs, width = 3, 5, 9
    a = rng.standard_normal((problems, width, width))
    hessians = a @ a.transpose(0, 2, 1) + np.eye(width)  # convex: s'y > 0 for every pair
    s = rng.standard_normal((problems, pairs, width))
    y = np.einsum("pij,pkj->pki", hessians, s)
    grad = rng.standard_normal((problems, width))
    expected = np.empty_like(grad)
    for k in range(problems):
        q, alphas = grad[k].copy(), []
        for i in reversed(range(pairs)):  # newest first
            alpha = s[k, i] @ q / (s[k, i] @ y[k, i])
            q -= alpha * y[k, i]
            alphas.append(alpha)
        q *= s[k, -1] @ y[k, -1] / (y[k, -1] @ y[k, -1])
        for i, alpha in zip(range(pairs), reversed(alphas)):  # oldest first
            q += (alpha - y[k, i] @ q / (s[k, i] @ y[k, i])) * s[k, i]
        expected[k] = -q
    got = _quasi_newton_direction(*(torch.as_tensor(v) for v in (grad, s, y)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver", ["primal", "cg", "lbfgs"])
def test_warm_starts_survive_a_label_flip_between_steps(solver, monkeypatch):
    """Each step starts from the previous step's solution; when the signal reverses sign
    between steps that start is far off, and every solver must still reach the optimum."""
    monkeypatch.setattr("icm.probing.probes.steps_per_solve", lambda *args: 1)  # one step at a time
    rng = np.random.default_rng(4)
    n, width = 200, 12
    y = (rng.random(n) < 0.5).astype(np.int64)
    sign = np.where(y == 1, 1.0, -1.0)
    x = rng.standard_normal((n, 1, 4, width))
    x[:, 0, :, 0] += 4.0 * sign[:, None] * np.array([1.0, -1.0, 1.0, -1.0])  # nearly separable
    train, test = split_indices(y, 0.2, 0)
    fast = fit_torch(x, y, train, test, solver=solver)[:3]
    reference = fit_sklearn(x[:, 0], y, train, test)
    assert np.sum(reference[2] * fast[2][0], axis=1).min() > 0.999
    assert np.sign(fast[2][0, :, 0]).tolist() == [1.0, -1.0, 1.0, -1.0]


def test_constant_channel_is_left_alone_as_scikit_learn_does():
    """A channel constant over the samples (float32, |value| ~ 1) must not be scaled up from
    its centring residual: its direction component is 0 and the directions agree."""
    acts, labels = planted(n=400, steps=4)
    x = np.asarray(acts["mid.attn1"], dtype=np.float32)
    x[:, :, 5] = np.float32(0.7131)  # exactly constant, not representable in binary
    y = (labels == "green").astype(np.int64)
    train, test = split_indices(y, 0.2, 0)
    _, _, reference = fit_sklearn(x, y, train, test)
    _, _, fast, _ = fit_torch(x[:, None], y, train, test)
    cosine = np.sum(reference * fast[0], axis=1)
    assert cosine.min() >= 0.999, cosine
    np.testing.assert_allclose(fast[0][:, 5], 0.0, atol=1e-6)
    np.testing.assert_allclose(reference[:, 5], 0.0, atol=1e-6)


def test_each_pair_is_ranked_on_its_own_probes():
    """Two pairs whose signals live in different sites rank different sites first."""
    acts_a, labels_a = planted(signal_site="mid.attn1", seed=1)
    acts_b, labels_b = planted(signal_site="down.attn1", seed=2)
    labels_b = np.where(labels_b == "red", "blue", labels_b)
    scores = pd.concat([
        scores_frame(fit_pair(acts_a, labels_a, PAIR)),
        scores_frame(fit_pair(acts_b, labels_b, Pair("blue", "green"))),
    ], ignore_index=True)
    by_pair = rank_per_pair(scores, t0=3)
    firsts = by_pair[by_pair["rank"] == 1].set_index("pair")["site"]
    assert firsts.to_dict() == {"red-green": "mid.attn1", "blue-green": "down.attn1"}


def prompt_world(n=1000, steps=5, seed=0):
    """Two prompts, 90% and 10% green. ``prompt.attn1`` carries only the prompt's identity
    (strongly); ``decision.attn1`` the per-sample class (weakly, 1 sd), from step 2."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, 2, n)
    green = rng.random(n) < np.where(prompts == 1, 0.9, 0.1)
    labels = np.where(green, "green", "red")
    acts = {s: rng.standard_normal((n, steps, 8)) for s in ("prompt.attn1", "decision.attn1")}
    acts["prompt.attn1"][:, :, 0] += 4.0 * prompts[:, None]
    acts["decision.attn1"][:, 2:, 0] += 1.0 * np.where(green, 1.0, -1.0)[:, None]
    return acts, labels, prompts


def with_baseline(results):
    frame = scores_frame(results)
    frame["prompt_acc"] = [r.prompt_acc for r in results for _ in r.test_acc]
    return frame


def test_a_site_that_only_knows_the_prompt_does_not_outrank_the_decision():
    acts, labels, prompts = prompt_world()
    raw = rank_sites(scores_frame(fit_pair(acts, labels, PAIR)), t0=2)
    assert raw.iloc[0]["site"] == "prompt.attn1"  # fooled: the prompt predicts 90% right
    controlled = fit_pair(acts, labels, PAIR, groups=prompts)
    ranked = rank_sites(with_baseline(controlled), t0=2).set_index("site")
    assert ranked.index[0] == "decision.attn1"
    assert abs(ranked.loc["prompt.attn1", "mean_gain"]) < 0.01  # adds nothing to the prompt
    assert ranked.loc["decision.attn1", "mean_gain"] > ranked.loc["prompt.attn1", "mean_gain"]
    assert 0.85 < controlled[0].prompt_acc < 0.95  # the prompt alone: each prompt's majority
    # scikit-learn, with the prompt as (nearly) unpenalised covariates, agrees.
    reference = fit_pair(acts, labels, PAIR, groups=prompts, backend="sklearn")
    for fast, slow in zip(controlled, reference):
        assert np.abs(fast.test_acc - slow.test_acc).max() <= 0.02
        assert np.sum(fast.directions * slow.directions, axis=1).min() > 0.99


def start_frame(results):
    return pd.DataFrame([{"site": r.site, "kind": "attn1", "step": s, "pair": PAIR.name,
                          "test_acc": a, "prompt_acc": r.prompt_acc,
                          "chance_acc": r.chance_acc, "n_test": r.n_test}
                         for r in results for s, a in enumerate(r.test_acc)])


def test_automatic_start_is_the_first_step_that_beats_the_prompt_significantly():
    from icm.probing.ranking import auto_start_step

    acts, labels, prompts = prompt_world(n=600, steps=8)
    acts["decision.attn1"][:, 2:, 0] *= 0  # the decision appears at step 4 only
    acts["decision.attn1"][:, 4:, 0] += 2.0 * np.where(labels == "green", 1.0, -1.0)[:, None]
    frame = start_frame(fit_pair(acts, labels, PAIR, groups=prompts))
    options = {"baseline": "prompt", "correction": "none"}
    start, pvalues = auto_start_step(frame, k=1, level=0.01, **options)
    assert start == 4 and pvalues[4] < 0.01 and (pvalues[:4] >= 0.01).all()
    # One selection for the concept (steering.sites_per: concept): its best site is the same.
    assert auto_start_step(frame, k=1, level=0.01, sites_per="concept", **options)[0] == 4
    # A prompt that decides everything leaves nothing to beat: no start.
    frame["prompt_acc"] = 1.0
    assert auto_start_step(frame, k=1, level=0.01, **options)[0] is None


def skewed_world(n=800, steps=10, onset=6, seed=1):
    """A skewed pair (about 88% old) whose choice the activations carry from ``onset`` on,
    under 100 prompts that each hold mostly one class: the prompt-only baseline is near
    0.9, chance (the majority rate) near 0.88."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, 100, n)
    old = rng.random(n) < np.where(prompts < 12, 0.05, 0.99)
    labels = np.where(old, "green", "red")
    acts = {s: rng.standard_normal((n, steps, 8)) for s in ("a.attn1", "b.attn1")}
    acts["a.attn1"][:, onset:, 0] += 3.0 * np.where(old, 1.0, -1.0)[:, None]
    return acts, labels, prompts


def test_the_papers_start_rule_beats_chance_on_a_skewed_pair_where_the_prompt_rule_cannot():
    """Section 4.1 starts steering once the probes "significantly exceed a random guess":
    against chance, corrected for testing every step, the start is the planted onset; the
    prompt-only baseline of a skewed pair is about as good as the probes, so that rule
    finds no step, and the ranking then stops with an error naming the pair and its best
    scores (it used to steer only at the last step, with a warning)."""
    import json

    from icm.jobs.probing import rank_sites_job
    from icm.probing.ranking import auto_start_step, no_start_message

    acts, labels, prompts = skewed_world()
    frame = start_frame(fit_pair(acts, labels, PAIR, groups=prompts, control=False))
    assert 0.85 < frame["chance_acc"].iloc[0] < 0.92
    start, pvalues = auto_start_step(frame, k=1, level=0.01)  # chance, Bonferroni
    assert start == 6 and pvalues[6] < 0.01 / 10
    assert auto_start_step(frame, k=1, level=0.01, baseline="prompt")[0] is None
    message = no_start_message(frame, 1, "prompt", 0.01, "bonferroni")
    assert "red-green: best step" in message and "steer_start" in message
    # Uncorrected, chance fluctuations at the noise steps can pass: the correction is
    # what keeps a start from being found before the onset on null steps.
    null = start_frame(fit_pair({"a.attn1": acts["b.attn1"], "b.attn1": acts["b.attn1"]},
                                labels, PAIR))
    assert auto_start_step(null, k=1, level=0.01)[0] is None

    scores = tmp = None
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        scores = frame.assign(timestep=lambda f: 1000 - 100 * f["step"], num_train_timesteps=1000)
        scores.to_csv(tmp / "scores.csv", index=False)
        outputs = [tmp / n for n in ("r.csv", "p.csv", "k.csv", "h.png", "start.json")]
        auto = {"steer_start": "auto", "start_level": 0.01, "start_correction": "bonferroni"}
        rank_sites_job(auto | {"start_baseline": "chance"}, 1, [tmp / "scores.csv"], *outputs)
        assert json.loads(outputs[-1].read_text())["start_step"] == 6
        with pytest.raises(ValueError, match="no step's probes beat the prompt baseline"):
            rank_sites_job(auto | {"start_baseline": "prompt"}, 1, [tmp / "scores.csv"],
                           *outputs)


def rare_class_world(prompts=106, per_prompt=5, seed=0):
    """Section 4.1's localization set: 100 neutral prompts of mixed classes and six
    rare-class prompts ("a person with gray hair") whose images are all one class. The
    class is read along a known axis (channel 0) of a 64-channel site."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(prompts), per_prompt)
    rare = groups >= prompts - 6
    green = np.where(rare, True, rng.random(len(groups)) < 0.1)
    y = np.where(green, 1.0, -1.0)
    x = rng.standard_normal((len(groups), 1, 64))
    x[:, 0, 0] += 0.5 * y
    x[:, 0, 1:4] += 0.6 * rng.standard_normal((prompts, 3))[groups]  # prompt style
    return {"s.attn1": x}, np.where(green, "green", "red"), groups


@pytest.mark.parametrize("seed", [0, 1])
def test_prompt_control_keeps_what_single_class_prompts_teach_the_direction(seed):
    """An unpenalised indicator per prompt explains every row of a prompt whose rows are
    all one class, so a controlled fit learns nothing from the rare-class prompts. The
    direction is the plain probe's either way: its cosine with the true axis is the same
    with control as without (within 0.05); the controlled score stays on the ranking."""
    from icm.probing.probes import SiteStack, fit_torch, prompt_covariates, split_indices

    acts, labels, groups = rare_class_world(seed=seed)
    axis = np.eye(64)[0]
    plain = fit_pair(acts, labels, PAIR, groups=groups, control=False, min_per_class=5)[0]
    controlled = fit_pair(acts, labels, PAIR, groups=groups, control=True, min_per_class=5)[0]
    cosine = {name: float(r.directions[0] @ axis) for name, r in (("plain", plain),
                                                                   ("controlled", controlled))}
    assert cosine["plain"] > 0.5
    assert abs(cosine["controlled"] - cosine["plain"]) < 0.05
    # The direction of a probe fitted with the prompt covariates loses the rare prompts.
    y = (labels == "green").astype(np.int64)
    train, test = split_indices(y, 0.2, 0)
    covaried = fit_torch(SiteStack(acts), y, train, test, covariates=prompt_covariates(groups))
    assert float(covaried[2][0][0] @ axis) < cosine["plain"] - 0.1
    assert not np.array_equal(plain.test_acc, controlled.test_acc)  # scored apart
    for backend in ("sklearn",):  # the reference agrees
        other = fit_pair(acts, labels, PAIR, groups=groups, control=True, min_per_class=5,
                         backend=backend)[0]
        assert float(other.directions[0] @ controlled.directions[0]) > 0.99


def test_probes_read_step_by_step_give_the_in_memory_result(tmp_path):
    """Two shards read lazily (one step of the group in memory at a time) fit the same
    probes as the arrays in memory, and each step is read once, in order."""
    from icm.generation.samples import plan_samples
    from icm.hooks.capture import CapturedBatch
    from icm.io.activations import ActivationStoreWriter, StepStack

    acts, labels = planted(n=160, steps=6, seed=4)
    group = ["mid.attn1", "mid.attn2"]  # one width (24)
    plan = plan_samples(["a shape"], 160, base_seed=0)
    stores = []
    for shard, part in enumerate((slice(0, 96), slice(96, 160))):
        stores.append(tmp_path / f"shard-{shard}.zarr")
        with ActivationStoreWriter(stores[-1], plan[part], {}, chunk_samples=32) as writer:
            writer.write(CapturedBatch({s: acts[s][part].astype(np.float32) for s in group},
                                       np.arange(6.0)))
    rows = np.flatnonzero(labels != "")[::-1].copy()  # any order and subset of samples

    class Counting(StepStack):
        reads: list[int] = []

        def step(self, step):
            if self._step is None or self._step[0] != step:
                self.reads.append(step)
            return super().step(step)

    lazy = fit_pair(Counting(stores, group, rows=rows), labels[rows], PAIR)
    eager = fit_pair({s: acts[s][rows].astype(np.float32) for s in group}, labels[rows], PAIR)
    assert Counting.reads == list(range(6))
    # one site per batched fit (a tiny memory budget) gives the same probes
    alone = [fit_pair(StepStack(stores, [s], rows=rows), labels[rows], PAIR)[0] for s in group]
    for a, b, c in zip(lazy, eager, alone, strict=True):
        assert a.site == b.site == c.site
        np.testing.assert_array_equal(a.test_acc, b.test_acc)
        np.testing.assert_array_equal(a.test_acc, c.test_acc)
        np.testing.assert_allclose(a.directions, b.directions, atol=1e-6)
        np.testing.assert_allclose(a.directions, c.directions, atol=1e-6)
        np.testing.assert_allclose(a.spread, b.spread, rtol=1e-5)


def test_sites_per_fit_follows_the_memory_budget():
    from icm.probing.probes import FIT_BYTES_PER_VALUE, sites_per_fit

    # SDXL's widest group at N = 2,000 under a 4 GB budget
    per_site = FIT_BYTES_PER_VALUE * 2000 * 1280
    assert sites_per_fit(2000, 1280, 4096) == 4096 * 2**20 // per_site
    assert sites_per_fit(2000, 1280, 4096) * per_site <= 4096 * 2**20
    assert sites_per_fit(10**7, 1280, 1) == 1  # never zero


def _probe_inputs(tmp_path, poison=None):
    """A two-site store of 40 planted samples and its labels.csv; ``poison(array)`` edits
    the first site's activations before they are written behind the writer's back."""
    import zarr

    from icm.generation.samples import plan_samples
    from icm.hooks.capture import CapturedBatch
    from icm.io.activations import ActivationStoreWriter

    rng = np.random.default_rng(0)
    samples = plan_samples(["p0", "p1"], 20, base_seed=0)
    labels = np.array(["red", "blue"] * 20)
    sites = {"down.attn1": 6, "down.attn2": 6}
    acts = {s: rng.standard_normal((40, 3, w)).astype(np.float32) for s, w in sites.items()}
    acts["down.attn1"][:, :, 0] += np.where(labels == "red", 3.0, -3.0)[:, None]
    store = tmp_path / "s.zarr"
    with ActivationStoreWriter(store, samples, {"sites": list(sites), "n_samples": 40},
                               chunk_samples=8) as writer:
        writer.write(CapturedBatch(acts, np.array([900.0, 500.0, 100.0])))
    if poison:
        array = zarr.open_group(store, mode="r+")["down.attn1"]
        values = array[:]
        poison(values)
        array[:] = values
    pd.DataFrame({"sample": [s.sample for s in samples],
                  "prompt_index": [s.prompt_index for s in samples], "label": labels,
                  "kept": True}).to_csv(tmp_path / "labels.csv", index=False)
    return store, tmp_path / "labels.csv"


def _fit(tmp_path, store, labels):
    from icm.jobs import fit_probes_job

    out = tmp_path / "probes"
    fit_probes_job(concept={"prompts": ["p0", "p1"], "classes": ["red", "blue"]},
                   probes={"control": "none", "device": "cpu", "backend": "torch",
                           "test_size": 0.25, "seed": 0, "min_per_class": 5},
                   pair=("red", "blue"), labels_csv=labels, stores=[store],
                   output_scores=out / "scores.csv", output_directions=out / "d.safetensors",
                   output_meta=out / "d.json", output_heatmap=out / "heatmap.png")
    return out


def test_the_probe_job_reports_label_counts_and_refuses_nonfinite_stores(tmp_path):
    import json

    from icm.io.activations import StoreDataError

    store, labels = _probe_inputs(tmp_path / "good")
    out = _fit(tmp_path / "good", store, labels)
    meta = json.loads((out / "d.json").read_text())
    assert meta["labels"]["used"] == 40 and meta["labels"]["unlabelled"] == 0

    def nan_at_step_1(values):
        values[3, 1, 2] = np.nan

    store, labels = _probe_inputs(tmp_path / "bad", poison=nan_at_step_1)
    with pytest.raises(StoreDataError, match=r"site down.attn1 step 1: 1 of .* NaN or inf"):
        _fit(tmp_path / "bad", store, labels)
    assert not (tmp_path / "bad" / "probes").exists()  # nothing half-written


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_nonfinite_activations_are_refused_naming_site_and_step(backend):
    x, labels = planted(n=80, steps=3)
    poisoned = {site: a.copy() for site, a in x.items()}
    site = next(iter(poisoned))
    poisoned[site][5, 2, 0] = np.nan
    with pytest.raises(ValueError, match=rf"site {site}: NaN or inf activations at step 2"):
        fit_pair(poisoned, labels, Pair("red", "green"), backend=backend, min_per_class=5)


def test_probes_fitted_in_site_groups_and_merged_equal_one_job(tmp_path):
    """probes.site_groups: each group's job fits only its share of the sites; the merge
    writes what one job writes (scores, directions, record), in store order."""
    import json

    import pandas as pd
    from safetensors.numpy import load_file

    from icm.jobs import fit_probes_job, merge_probes_job
    from icm.probing.stored import group_sites

    assert [group_sites(list("abcde"), 3, g) for g in range(3)] == [["a", "b"], ["c", "d"],
                                                                     ["e"]]
    store, labels = _probe_inputs(tmp_path)
    whole = _fit(tmp_path, store, labels)
    parts = []
    for g in range(2):
        out = tmp_path / f"group-{g}"
        fit_probes_job(concept={"prompts": ["p0", "p1"], "classes": ["red", "blue"]},
                       probes={"control": "none", "device": "cpu", "backend": "torch",
                               "test_size": 0.25, "seed": 0, "min_per_class": 5},
                       pair=("red", "blue"), labels_csv=labels, stores=[store],
                       output_scores=out / "scores.csv", output_directions=out / "d.safetensors",
                       output_meta=out / "d.json", group=(g, 2))
        assert set(pd.read_csv(out / "scores.csv")["site"]) == {["down.attn1", "down.attn2"][g]}
        assert not (out / "heatmap.png").exists()
        parts.append((out / "scores.csv", out / "d.safetensors", out / "d.json"))
    merged = tmp_path / "merged"
    merged.mkdir()
    merge_probes_job(parts, merged / "scores.csv", merged / "d.safetensors", merged / "d.json",
                     merged / "heatmap.png")
    pd.testing.assert_frame_equal(pd.read_csv(merged / "scores.csv"),
                                  pd.read_csv(whole / "scores.csv"))
    one, joined = load_file(str(whole / "d.safetensors")), load_file(str(merged / "d.safetensors"))
    assert list(one) == list(joined)
    for site in one:
        # Batched with other sites or alone: the same fit up to float32 rounding.
        np.testing.assert_allclose(joined[site], one[site], atol=1e-6)
    records = [json.loads((path / "d.json").read_text()) for path in (merged, whole)]
    drop = ("versions", "entries")  # entries: the scores' floats, compared above
    assert {k: v for k, v in records[0].items() if k not in drop} == \
        {k: v for k, v in records[1].items() if k not in drop}
    assert [(e["site"], e["step"]) for e in records[0]["entries"]] == \
        [(e["site"], e["step"]) for e in records[1]["entries"]]
    assert (merged / "heatmap.png").exists()


def test_the_sd15_stage_benchmark_runs_the_stage_and_agrees_with_scikit_learn(tmp_path):
    """benchmarks/probe_stage.py at a small size: SD1.5's 32 sites, three pairs through
    fit_probes_job, the planted signal read at the last step, and scikit-learn's answers
    on a refitted site close to the stage's."""
    import json
    import subprocess
    import sys

    out = tmp_path / "stage.json"
    subprocess.run([sys.executable, "benchmarks/probe_stage.py", "--device", "cpu",
                    "--samples", "400", "--steps", "3", "--check-sites", "1", "--threads", "1",
                    "--folder", str(tmp_path / "data"), "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["sites"] == 32 and result["probes"] == 32 * 3 * 3
    assert set(result["pair_s"]) == {"a-b", "a-c", "a-d"}
    scores = pd.read_csv(tmp_path / "data/probes/a-b/scores.csv")
    by_step = scores.groupby("step")["test_acc"].mean()
    assert by_step[2] > by_step[0] + 0.05 and by_step[2] > 0.6  # the signal grows over steps
    check = result["sklearn_check"]
    assert check["mean_gap_points"] < 3 and check["min_cosine"] > 0.99, check
    # The pair jobs side by side, each its own process, write the same probes.
    subprocess.run([sys.executable, "benchmarks/probe_stage.py", "--device", "cpu",
                    "--samples", "400", "--steps", "3", "--threads", "2", "--jobs", "1", "2",
                    "--folder", str(tmp_path / "side"), "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    runs = json.loads(out.read_text())["runs"]
    assert [(r["jobs"], r["threads_per_job"]) for r in runs] == [(1, 2), (2, 1)]
    for pair in ("a-b", "a-c", "a-d"):  # two jobs of one thread, as the first run's one
        side = pd.read_csv(tmp_path / f"side/probes-2-jobs/{pair}/scores.csv")
        alone = pd.read_csv(tmp_path / f"data/probes/{pair}/scores.csv")
        pd.testing.assert_frame_equal(side, alone)


def test_a_one_vs_rest_direction_leads_toward_its_class_where_a_pairwise_one_need_not(tmp_path):
    """Square above circle, triangle beside circle: square-circle's direction points down,
    so a triangle pushed "toward circle" along it stays a triangle. The one-vs-rest probe
    for circle (pairs: one-vs-rest) points from the rest toward circle, so a triangle
    pushed as far (the square-circle distance) along it lands on circle."""
    import json

    from safetensors.numpy import load_file

    from icm.generation.samples import plan_samples
    from icm.hooks.capture import CapturedBatch
    from icm.io.activations import ActivationStoreWriter
    from icm.jobs import fit_probes_job
    from icm.probing.pairs import REST, concept_pairs

    classes = ["circle", "square", "triangle"]
    assert concept_pairs({"classes": classes, "pairs": "one-vs-rest"}) == [
        (REST, c) for c in classes]
    rng = np.random.default_rng(0)
    n = 300
    labels = np.array(classes * (n // 3))
    centre = {"circle": (0.0, 0.0), "square": (0.0, 2.0), "triangle": (3.0, 0.0)}
    x = rng.standard_normal((n, 2, 6)).astype(np.float32) * 0.5
    x[:, :, :2] += np.array([centre[c] for c in labels], dtype=np.float32)[:, None, :]
    samples = plan_samples(["p"], n, base_seed=0)
    store = tmp_path / "s.zarr"
    with ActivationStoreWriter(store, samples, {"sites": ["a.attn1"], "n_samples": n},
                               chunk_samples=64) as writer:
        writer.write(CapturedBatch({"a.attn1": x}, np.array([900.0, 100.0])))
    pd.DataFrame({"sample": [s.sample for s in samples], "prompt_index": 0, "label": labels,
                  "kept": True}).to_csv(tmp_path / "labels.csv", index=False)
    probes = {"control": "none", "device": "cpu", "backend": "torch", "test_size": 0.25,
              "seed": 0, "min_per_class": 5}
    directions = {}
    for pair in (("square", "circle"), (REST, "circle")):
        out = tmp_path / "-".join(pair)
        fit_probes_job({"classes": classes, "prompts": ["p"]}, probes, pair,
                       tmp_path / "labels.csv", [store], out / "scores.csv",
                       out / "d.safetensors", out / "d.json")
        directions[pair[0]] = load_file(str(out / "d.safetensors"))["a.attn1"][0, :2]
        meta = json.loads((out / "d.json").read_text())
    assert meta["labels"]["used"] == n  # one-vs-rest uses every labelled image

    def nearest(point):
        return min(centre, key=lambda c: np.hypot(*(np.asarray(point) - centre[c])))

    triangle = np.array(centre["triangle"])
    pushed = {name: triangle + 3.0 * v / np.linalg.norm(v) for name, v in directions.items()}
    assert nearest(pushed[REST]) == "circle"
    assert nearest(pushed["square"]) == "triangle"
