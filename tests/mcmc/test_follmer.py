"""The Schrödinger–Föllmer sampler: its moments against the closed-form Euler scheme, the
horizon, determinism, tracing and errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc
from support.smoothing_targets import MEAN, S2, gaussian_logdensity


def follmer_euler_moments(num_steps, m, s2):
    """Mean and variance of the Euler–Maruyama Föllmer chain with the exact drift for
    N(m, s2) from the origin: b(x, t) = ((s2 - 1) x + m) / (1 + t (s2 - 1)) (the Brownian
    bridge's (E[X_1 | X_t = x] - x) / (1 - t)), a linear recursion solved here exactly."""
    h, mean, var = 1.0 / num_steps, np.zeros_like(m), 0.0
    for k in range(num_steps):
        denom = 1 + k * h * (s2 - 1)
        gain = 1 + h * (s2 - 1) / denom
        mean, var = gain * mean + h * m / denom, gain**2 * var + h
    return mean, var


def test_follmer_reaches_the_gaussian_as_its_euler_scheme_says(x64):
    """Independent Föllmer runs (K = 50 steps, 256 importance samples a step) match the
    closed-form moments of the Euler scheme with the exact drift within 4 standard errors
    (0.016 for the mean and for the variance at n = 2000).  The Monte Carlo drift adds an
    O(1/N) bias: measured once with 20000 runs, about 0.02 in the mean and the variance at
    N = 32 and under 0.008 at N = 256, below those errors.  The Euler moments are
    themselves within 2% of the target's (variance 0.5076 against 0.5)."""
    n, num_steps = 2000, 50
    mean_k, var_k = follmer_euler_moments(num_steps, np.asarray(MEAN), S2)
    assert abs(var_k - S2) < 0.02 * S2 and np.allclose(mean_k, MEAN, rtol=0.02)
    kernel = mcmc.follmer(gaussian_logdensity, num_steps, 256)
    run = jax.jit(
        jax.vmap(lambda k: mcmc.run_chain(kernel, k, kernel.init(jnp.zeros(2)), num_steps + 2)[0])
    )
    final = run(jax.random.split(jax.random.key(0), n))
    assert int(final.count[0]) == num_steps  # steps past the horizon do nothing
    x = np.asarray(final.position)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean_k), 4 * np.sqrt(var_k / n))
    np.testing.assert_array_less(np.abs(x.var(0) - var_k), 4 * var_k * math.sqrt(2 / n))


def test_same_key_same_bits_compiles_once_and_runs_under_vmap():
    chex.clear_trace_counter()
    kernel = mcmc.follmer(gaussian_logdensity, 10, 64)
    state = kernel.init(jnp.array([0.3, -0.2]))
    step = jax.jit(chex.assert_max_traces(kernel.step, n=1))
    a, info = step(jax.random.key(3), state)
    c, _ = step(jax.random.key(3), state)
    np.testing.assert_array_equal(a.position, c.position)
    assert int(info.num_grad_evals) == 1 and bool(info.is_accepted)
    # a vmapped run over chains: keys from fold_in, no reuse
    keys = jax.random.split(jax.random.key(4), 3)
    run = jax.jit(jax.vmap(lambda k: mcmc.run_chain(kernel, k, state, 12)[1]))
    positions = run(keys)
    chex.assert_shape(positions, (3, 12, 2))
    chex.assert_tree_all_finite(positions)
    np.testing.assert_array_equal(positions, run(keys))


def test_follmer_state_counts_and_stops_at_the_horizon():
    kernel = mcmc.follmer(gaussian_logdensity, 3, 16)
    state, positions, _ = mcmc.run_chain(kernel, jax.random.key(0), kernel.init(jnp.zeros(2)), 5)
    assert int(state.count) == 3
    np.testing.assert_array_equal(positions[2], positions[4])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mcmc.follmer(gaussian_logdensity, 0, 8), "num_steps must be a positive int"),
        (
            lambda: mcmc.follmer(lambda x: x, 4, 8).init(jnp.zeros(2)),
            "logdensity_fn must return a real scalar",
        ),
    ],
)
def test_bad_arguments_raise_before_compiling(call, match):
    with pytest.raises(ValueError, match=match):
        call()
