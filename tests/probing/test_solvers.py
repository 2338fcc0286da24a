"""The batched solvers as an estimator: scikit-learn's problem, many at once."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from icm.probing.solvers import SOLVERS, BatchedLogisticRegression


def problems(seed: int, n_problems: int = 3, samples: int = 200, features: int = 20):
    """Stacked problems sharing labels read from the first one's features, with noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_problems, samples, features)) + rng.normal(size=features)
    y = (x[0] @ rng.normal(size=features) + rng.normal(size=samples) > 0).astype(int)
    return x, y


@pytest.mark.parametrize("solver", [*SOLVERS, "auto"])
@pytest.mark.parametrize("C", [1.0, 0.1])
def test_each_solver_finds_scikit_learns_optimum_for_every_problem(solver, C):
    x, y = problems(0)
    fitted = BatchedLogisticRegression(C=C, solver=solver, tol=1e-8).fit(x, y)
    assert fitted.coef_.shape == (3, 20) and fitted.intercept_.shape == (3,)
    assert fitted.converged_.all() and (fitted.n_iter_ > 0).all()
    for p in range(3):
        reference = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x[p], y)
        np.testing.assert_allclose(fitted.coef_[p], reference.coef_[0], atol=1e-5)
        np.testing.assert_allclose(fitted.intercept_[p], reference.intercept_[0], atol=1e-5)
        assert fitted.score(x, y)[p] == reference.score(x[p], y)


def test_one_problem_has_scikit_learns_shapes_and_the_signal_is_read():
    x, y = problems(1, n_problems=1, samples=400)
    fitted = BatchedLogisticRegression().fit(x[0], y)
    reference = LogisticRegression().fit(x[0], y)
    assert fitted.coef_.shape == reference.coef_.shape
    assert fitted.intercept_.shape == reference.intercept_.shape
    assert fitted.score(x[0], y) > 0.8  # the planted signal, not noise
    np.testing.assert_array_equal(fitted.predict(x[0]), reference.predict(x[0]))


def test_labels_other_than_0_and_1_and_unknown_solvers_are_refused():
    x, y = problems(2)
    with pytest.raises(ValueError, match="0 and 1"):
        BatchedLogisticRegression().fit(x, y + 1)
    with pytest.raises(ValueError, match="solver"):
        BatchedLogisticRegression(solver="newton").fit(x, y)
