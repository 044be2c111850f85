"""Sampling targets: the funnel's density against its exact sampler, the conjugate posterior
against a direct solve, per-example gradients against jax.grad, the logistic MAP."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc, problems, shuffling
from shufflesgd.nn import data


def test_funnel_logdensity_is_the_normalised_hierarchy(x64):
    position = jnp.array([0.7, -1.0, 0.3, 2.0])
    v, x = position[0], position[1:]
    expected = jax.scipy.stats.norm.logpdf(v, 0.0, 3.0) + jnp.sum(
        jax.scipy.stats.norm.logpdf(x, 0.0, jnp.exp(v / 2))
    )
    np.testing.assert_allclose(problems.funnel_logdensity(position), expected, rtol=1e-12)
    # normalised: in d = 2 the density integrates to one (trapezoid on a wide grid in x given
    # each v)
    vs = jnp.linspace(-18.0, 18.0, 361)
    xs = jnp.linspace(-1.0, 1.0, 1001)
    at = lambda v, u: problems.funnel_logdensity(jnp.array([v, u * jnp.exp(v / 2) * 12]))
    grid = jax.jit(jax.vmap(lambda v: jax.vmap(lambda u: at(v, u))(xs)))(vs)
    inner = jnp.trapezoid(jnp.exp(grid), xs, axis=1) * jnp.exp(vs / 2) * 12
    assert abs(float(jnp.trapezoid(inner, vs)) - 1.0) < 1e-6


def test_funnel_exact_draws_have_the_exact_marginals_and_match_the_density(x64):
    """v ~ N(0, 9); log|x_i| has mean -(gamma + log 2)/2 and variance 9/4 + pi^2/8; and
    Stein's identity E[grad log pi] = 0 ties the sampler to the log-density."""
    n, dim = 200_000, 5
    draws = np.asarray(problems.funnel_sample(jax.random.key(0), n, dim))
    v, log_abs_x = draws[:, 0], np.log(np.abs(draws[:, 1:]))
    assert abs(v.mean()) < 4 * 3.0 / math.sqrt(n)
    assert abs(v.var() - 9.0) < 4 * 9.0 * math.sqrt(2 / n)
    mean, var = -(np.euler_gamma + np.log(2.0)) / 2, 9 / 4 + np.pi**2 / 8
    np.testing.assert_array_less(np.abs(log_abs_x.mean(axis=0) - mean), 4 * math.sqrt(var / n))
    fourth = np.mean((log_abs_x - log_abs_x.mean(axis=0)) ** 4, axis=0)
    np.testing.assert_array_less(
        np.abs(log_abs_x.var(axis=0) - var), 4 * np.sqrt((fourth - var**2) / n)
    )
    scores = np.asarray(jax.vmap(jax.grad(problems.funnel_logdensity))(jnp.asarray(draws)))
    np.testing.assert_array_less(np.abs(scores.mean(axis=0)), 4 * scores.std(axis=0) / math.sqrt(n))


@pytest.fixture
def diabetes(x64):
    features, y = data.sklearn_dataset("diabetes")
    return (
        features,
        y,
        problems.bayesian_linear_regression(features, y, noise_variance=0.5, prior_variance=2.0),
    )


def test_linear_regression_posterior_is_the_direct_solve(diabetes):
    features, y, (model, posterior) = diabetes
    assert features.shape == (442, 10) and abs(y.std() - 1) < 1e-12
    precision = features.T @ features / 0.5 + np.eye(10) / 2.0
    np.testing.assert_allclose(posterior.covariance, np.linalg.inv(precision), rtol=1e-10)
    np.testing.assert_allclose(
        posterior.mean, np.linalg.solve(precision, features.T @ y / 0.5), rtol=1e-10
    )
    # the log-density is that Gaussian: its gradient is -Sigma^{-1}(w - m) everywhere
    w = jnp.asarray(np.random.default_rng(0).standard_normal(10))
    np.testing.assert_allclose(
        jax.grad(model.logdensity)(w), -precision @ (w - posterior.mean), rtol=1e-9
    )


@pytest.mark.parametrize("name", ["diabetes", "breast_cancer"])
def test_per_example_gradients_and_the_minibatch_estimator(name, x64):
    features, y = data.sklearn_dataset(name)
    if name == "diabetes":
        model, _ = problems.bayesian_linear_regression(features, y, 0.5, 2.0)
    else:
        model = problems.bayesian_logistic_regression(features, y, 4.0)
    w = model.mode + 0.1 * jnp.asarray(np.random.default_rng(1).standard_normal(model.dim))
    batch = jnp.array([3, 17, 40, 2])
    expected = jnp.stack([jax.grad(model.log_likelihood)(w, model.examples(i)) for i in batch])
    np.testing.assert_allclose(jax.jit(model.per_example_grads)(w, batch), expected, rtol=1e-12)
    full = jax.grad(model.logdensity)(w)
    np.testing.assert_allclose(
        jax.jit(model.grad_estimator)(w, jnp.arange(model.num_examples)), full, rtol=1e-10
    )
    # unbiased: the single-example estimates -w/tau^2 + n grad l_i average to the full gradient
    singles = jax.jit(jax.vmap(model.grad_estimator, in_axes=(None, 0)))(
        w, jnp.arange(model.num_examples)[:, None]
    )
    np.testing.assert_allclose(singles.mean(axis=0), full, rtol=1e-9, atol=1e-9)


def test_logistic_map_is_a_stationary_point(x64):
    features, labels = data.sklearn_dataset("breast_cancer")
    assert features.shape == (569, 31) and set(np.unique(labels)) == {-1.0, 1.0}
    model = problems.bayesian_logistic_regression(features, labels, 4.0)
    grad = jax.jit(jax.grad(model.logdensity))(model.mode)
    assert float(jnp.linalg.norm(grad)) < 1e-8 * model.num_examples
    hessian = jax.jit(jax.hessian(model.logdensity))(model.mode)
    assert float(jnp.linalg.eigvalsh(hessian)[-1]) < 0  # a maximum


def test_sgld_with_the_estimator_keeps_the_exact_posterior_mean(diabetes):
    """SGLD under random reshuffling (batches of 26, 10 epochs, h = 0.2 / L with L the
    largest posterior precision) from 256 exact posterior draws: for a Gaussian posterior
    the unbiased linear gradient estimate keeps the mean where it is, so the chains' final
    mean is within 4 standard errors (sd / sqrt(256)) of the exact mean, plus an allowance
    of 5% of a posterior sd for the dependence of the batches within an epoch."""
    _, _, (model, posterior) = diabetes
    kernel = mcmc.sgld(model.grad_estimator)
    scheme = shuffling.random_reshuffle(model.num_examples)  # 442 = 17 batches of 26
    step = 0.2 / float(jnp.linalg.eigvalsh(jnp.linalg.inv(posterior.covariance))[-1])
    chains = 256
    chol = jnp.linalg.cholesky(posterior.covariance)
    start = posterior.mean + jax.random.normal(jax.random.key(0), (chains, model.dim)) @ chol.T
    run = jax.jit(
        jax.vmap(
            lambda k, x0: mcmc.run_minibatch_chain(
                kernel, k, kernel.init(x0), scheme, 10, 26, step
            )[0]
        )
    )
    final = np.asarray(run(jax.random.split(jax.random.key(1), chains), start).position)
    sd = np.sqrt(np.diag(posterior.covariance))
    np.testing.assert_array_less(
        np.abs(final.mean(axis=0) - posterior.mean), 4 * sd / np.sqrt(chains) + 0.05 * sd
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: problems.funnel_sample(jax.random.key(0), 3, 1), "dim must be at least 2"),
        (
            lambda: problems.bayesian_linear_regression(np.ones((3, 2)), np.ones(3), 0.0, 1.0),
            "noise_variance",
        ),
        (
            lambda: problems.bayesian_linear_regression(np.ones((3, 2)), np.ones(2), 1.0, 1.0),
            "features must be",
        ),
        (
            lambda: problems.bayesian_logistic_regression(
                np.ones((3, 2)), np.array([0.0, 1, 1]), 1.0
            ),
            "labels",
        ),
        (
            lambda: problems.bayesian_logistic_regression(np.ones((3, 2)), np.ones(3), -1.0),
            "prior_variance",
        ),
        (lambda: data.sklearn_dataset("iris"), "name must be one of"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
