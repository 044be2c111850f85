"""SGLD and SGHMC (Euler, BAOAB): SGLD with exact gradients is ULA, BAOAB samples a Gaussian's
positions exactly and Euler does not, argument errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc
from support.gaussian_target import gaussian_logdensity


def test_sgld_with_exact_gradients_is_ula():
    ula = mcmc.ula(gaussian_logdensity)
    sgld = mcmc.sgld(lambda x, batch: jax.grad(gaussian_logdensity)(x))
    x0 = jnp.array([0.3, 0.1])
    a, _ = ula.step(jax.random.key(0), ula.init(x0), 0.1)
    b, info = sgld.step(jax.random.key(0), sgld.init(x0), jnp.arange(2), 0.1)
    np.testing.assert_allclose(a.position, b.position, rtol=1e-6)
    assert int(info.num_grad_evals) == 1


def test_baoab_samples_gaussian_positions_exactly_and_euler_does_not(x64):
    """Leimkuhler & Matthews (2013): BAOAB's positions are exact for a harmonic potential at
    any stable step; Euler SGHMC's variance is off by O(h), exactly as its recursion says."""
    s2, h, friction, n = 1.5, 0.8, 1.0, 20000
    grad = lambda x, batch: -x / s2  # noqa: E731
    start = jnp.sqrt(s2) * jax.random.normal(jax.random.key(0), (n, 1))
    variances = {}
    for integrator in ("baoab", "euler"):
        kernel = mcmc.sghmc(grad, integrator)

        def chain(key, x0, kernel=kernel):
            state = mcmc.SGState(x0, jax.random.normal(jax.random.fold_in(key, 99), x0.shape))
            t = jnp.arange(300)
            final, _ = jax.lax.scan(
                lambda s, i: (
                    kernel.step(
                        jax.random.fold_in(key, i), s, jnp.zeros(1, jnp.int32), h, friction
                    )[0],
                    None,
                ),
                state,
                t,
            )
            return final.position

        final = jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(1), n), start)
        variances[integrator] = float(jnp.var(final))
    # Euler is the linear recursion (x, v)' = A (x, v) + B z: its stationary covariance
    # solves P = A P A^T + B B^T (1.824 here, against the target's 1.5).
    transition = np.array([[1 - h * h / s2, h * (1 - h * friction)], [-h / s2, 1 - h * friction]])
    kick = np.sqrt(2 * friction * h) * np.array([[h], [1.0]])
    cov = np.eye(2)
    for _ in range(2000):
        cov = transition @ cov @ transition.T + kick @ kick.T
    for integrator, expected in (("baoab", s2), ("euler", cov[0, 0])):
        assert abs(variances[integrator] - expected) < 4 * expected * math.sqrt(2 / n), variances
    assert cov[0, 0] > s2 + 8 * s2 * math.sqrt(2 / n)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mcmc.sghmc(lambda x, b: x, "leapfrog"), "integrator must be one of"),
        (
            lambda: mcmc.sghmc(lambda x, b: -x).step(
                jax.random.key(0),
                mcmc.sghmc(lambda x, b: -x).init(jnp.zeros(1)),
                jnp.zeros(1, jnp.int32),
                0.1,
                0.0,
            ),
            "friction must be positive",
        ),
        (
            lambda: mcmc.sgld(lambda x, b: -x).step(
                jax.random.key(0),
                mcmc.sgld(lambda x, b: -x).init(jnp.zeros(1)),
                jnp.zeros(1, jnp.int32),
                -0.1,
            ),
            "step_size must be positive",
        ),
    ],
)
def test_stochastic_gradient_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
