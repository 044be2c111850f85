"""Finite sums: optima checked against independent solvers and first-order conditions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import problems


def test_least_squares_optimum_matches_numpy_lstsq(x64):
    a, b = problems.synthetic_regression(0, 40, 5, noise=0.5, condition=10.0)
    p = problems.least_squares(a, b)
    x_lstsq = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(p.x_star, x_lstsq, rtol=1e-10)
    assert float(jnp.linalg.norm(p.gradient(p.x_star))) < 1e-12
    np.testing.assert_allclose(p.loss(p.x_star), p.f_star, rtol=1e-12)
    eigs = np.linalg.eigvalsh(a.T @ a / 40)
    np.testing.assert_allclose(p.mu, eigs[0], rtol=1e-10)
    np.testing.assert_allclose(p.smoothness, np.max(np.sum(a**2, axis=1)), rtol=1e-12)


def test_ridge_first_order_condition_and_suboptimality_is_quadratic(x64):
    a, b = problems.synthetic_regression(1, 10, 20, noise=1.0)  # d > n: needs l2
    p = problems.least_squares(a, b, l2=0.3)
    assert float(jnp.linalg.norm(p.gradient(p.x_star))) < 1e-12
    delta = jnp.asarray(np.random.default_rng(0).standard_normal(20)) * 1e-2
    hessian = a.T @ a / 10 + 0.3 * np.eye(20)
    expected = 0.5 * delta @ hessian @ delta
    np.testing.assert_allclose(p.suboptimality(p.x_star + delta), expected, rtol=1e-6)


def test_logistic_regression_newton_optimum(x64):
    a, y = problems.synthetic_classification(2, 200, 6, margin=3.0)
    p = problems.logistic_regression(a, y, l2=1e-2)
    assert float(jnp.linalg.norm(p.gradient(p.x_star))) < 1e-11
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert float(p.suboptimality(p.x_star + 1e-3 * rng.standard_normal(6))) > 0
    # smoothness bound: max_i ||a_i||^2 / 4 + l2 dominates every component Hessian
    assert float(p.smoothness) >= float(jnp.max(jnp.sum(p.data[0] ** 2, axis=1))) / 4


def test_component_losses_vectorise_and_jit():
    a, b = problems.synthetic_regression(0, 8, 3)
    p = problems.least_squares(a, b)
    x = jnp.ones(3)
    per_example = jax.jit(lambda q, x: q.component_losses(x, jnp.array([0, 3])))(p, x)
    expected = 0.5 * (a[[0, 3]] @ np.ones(3) - b[[0, 3]]) ** 2
    np.testing.assert_allclose(per_example, expected, rtol=1e-5)
    batched = jax.vmap(p.loss)(jnp.stack([x, 2 * x]))
    assert batched.shape == (2,)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: problems.least_squares(np.ones(3), np.ones(3)), "features must be a matrix"),
        (lambda: problems.least_squares(np.ones((3, 2)), np.ones(4)), "targets must have shape"),
        (
            lambda: problems.least_squares(np.ones((3, 2)), np.ones(3), l2=-1.0),
            "l2 must be non-negative",
        ),
        (lambda: problems.least_squares(np.ones((3, 2)), np.ones(3)), "not strongly convex"),
        (
            lambda: problems.logistic_regression(np.ones((3, 2)), np.ones(3), l2=0.0),
            "l2 must be positive",
        ),
        (
            lambda: problems.logistic_regression(np.ones((3, 2)), np.array([0.0, 1, 1]), l2=1.0),
            "labels",
        ),
        (lambda: problems.synthetic_regression(0, 0, 3), "n and d must be positive"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_synthetic_instances_are_nested_in_n():
    a_small, b_small = problems.synthetic_regression(3, 10, 4)
    a_big, b_big = problems.synthetic_regression(3, 25, 4)
    np.testing.assert_array_equal(a_small, a_big[:10])
    np.testing.assert_array_equal(b_small, b_big[:10])
    f_small, y_small = problems.synthetic_classification(3, 10, 4)
    f_big, y_big = problems.synthetic_classification(3, 25, 4)
    np.testing.assert_array_equal(f_small, f_big[:10])
    np.testing.assert_array_equal(y_small, y_big[:10])
