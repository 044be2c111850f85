"""ULA: its closed-form O(h) stationary bias on a Gaussian."""

import math

import jax
import jax.numpy as jnp

from shufflesgd import mcmc


def test_ula_has_its_closed_form_stationary_bias(x64):
    """On N(0, s^2), ULA is x' = (1 - h/s^2) x + sqrt(2h) z, stationary variance
    s^2 / (1 - h/(2 s^2))."""
    s2, h = 2.0, 0.4
    kernel = mcmc.ula(lambda x: -0.5 * jnp.sum(x**2) / s2)
    n = 20000
    start = jnp.sqrt(s2) * jax.random.normal(jax.random.key(0), (n, 1))
    keys = jax.random.split(jax.random.key(1), n)
    final = jax.jit(
        jax.vmap(lambda k, x: mcmc.run_chain(kernel, k, kernel.init(x), 200, h)[0].position)
    )(keys, start)
    expected = s2 / (1 - h / (2 * s2))
    assert abs(float(jnp.var(final)) - expected) < 4 * expected * math.sqrt(2 / n)
    assert float(jnp.var(final)) > s2 + 4 * s2 * math.sqrt(2 / n)  # the bias is really there
