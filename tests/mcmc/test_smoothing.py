"""Smoothed scores: the importance-sampling score against closed forms, its standard error's
calibration, Tweedie's denoiser, and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc
from support.smoothing_targets import (
    MEAN,
    S2,
    gaussian_logdensity,
    gaussian_smoothed_score,
    mixture,
)

POINTS = jnp.array([[0.0, 0.0], [1.5, 0.5], [-3.0, 1.0]])


@pytest.mark.parametrize("target", ["gaussian", "mixture"])
def test_importance_score_converges_to_the_exact_smoothed_score(target, x64):
    """At each sample count the error is within 4 of the estimator's own delta-method
    standard errors, and those shrink like 1/sqrt(N) (tenfold from N = 1e3 to 1e5)."""
    sigma = 0.7
    if target == "gaussian":
        logdensity, exact, points = gaussian_logdensity, gaussian_smoothed_score, MEAN + POINTS / 2
    else:
        m = mixture()
        logdensity, exact, points = m.log_prob, mcmc.mixture_smoothed_score(m), POINTS
    truth = jax.vmap(lambda y: exact(None, y, sigma))(points)
    errors = []
    for i, n in enumerate([1_000, 100_000]):
        keys = jax.random.split(jax.random.key(i), len(points))
        estimate = jax.vmap(
            lambda k, y, n=n: mcmc.importance_smoothed_score(logdensity, k, y, sigma, n)
        )
        est = jax.jit(estimate)(keys, points)
        np.testing.assert_array_less(np.abs(est.score - truth), 4 * est.standard_error)
        errors.append(np.asarray(est.standard_error))
    np.testing.assert_allclose(errors[0] / errors[1], 10.0, rtol=0.15)


def test_importance_standard_error_is_calibrated(x64):
    """Across 256 independent estimates at N = 1000, the errors divided by the reported
    standard errors have mean square 1 (chi-square: 4 sd = 4 sqrt(2 / (256 * 6)) = 0.14)."""
    m = mixture()
    sigma, n, reps = 0.7, 1_000, 256
    truth = jax.vmap(lambda y: mcmc.mixture_smoothed_score(m)(None, y, sigma))(POINTS)
    keys = jax.random.split(jax.random.key(7), (reps, len(POINTS)))
    estimate = jax.jit(
        jax.vmap(jax.vmap(lambda k, y: mcmc.importance_smoothed_score(m.log_prob, k, y, sigma, n)))
    )
    est = estimate(keys, jnp.broadcast_to(POINTS, (reps,) + POINTS.shape))
    z2 = float(jnp.mean(((est.score - truth) / est.standard_error) ** 2))
    assert abs(z2 - 1.0) < 4 * math.sqrt(2 / (reps * POINTS.size)), z2


def test_tweedie_denoiser_is_the_posterior_mean(x64):
    """For a Gaussian target E[x | y] = m + s^2/(s^2 + sigma^2)(y - m)."""
    sigma, y = 0.6, jnp.array([0.3, 2.0])
    denoised = mcmc.tweedie_denoiser(y, gaussian_smoothed_score(None, y, sigma), sigma)
    np.testing.assert_allclose(denoised, MEAN + S2 / (S2 + sigma**2) * (y - MEAN), rtol=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: mcmc.monte_carlo_smoothed_score(gaussian_logdensity, 0),
            "num_samples must be a positive int",
        ),
        (
            lambda: mcmc.importance_smoothed_score(
                gaussian_logdensity, jax.random.key(0), jnp.zeros(2), 0.5, 2.5
            ),
            "num_samples must be a positive int",
        ),
        (
            lambda: mcmc.importance_smoothed_score(
                lambda x: x, jax.random.key(0), jnp.zeros(2), 0.5, 8
            ),
            "logdensity_fn must return a real scalar",
        ),
    ],
)
def test_bad_arguments_raise_before_compiling(call, match):
    with pytest.raises(ValueError, match=match):
        call()
