"""Dual-averaging step-size adaptation: the iterates of Hoffman & Gelman's recursion on a
scripted acceptance sequence, BlackJAX's average, HMC reaching its target acceptance, errors."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc
from support.gaussian_target import gaussian_logdensity


class Script(NamedTuple):
    count: jax.Array
    step_sizes: jax.Array  # the step size of every call, recorded


def scripted_kernel(acceptance):
    """A kernel whose ``t``-th step reports ``acceptance(t, step_size)`` and records its step
    size."""

    def init(num_steps):
        return Script(jnp.zeros((), jnp.int32), jnp.zeros(num_steps))

    def step(key, state, step_size):
        del key
        info = mcmc.MCMCInfo(
            jnp.asarray(acceptance(state.count, step_size)),
            jnp.asarray(True),
            jnp.asarray(0, jnp.int32),
            jnp.asarray(0.0),
            jnp.asarray(True),
        )
        return Script(state.count + 1, state.step_sizes.at[state.count].set(step_size)), info

    return mcmc.SamplingAlgorithm(init, step)


def hoffman_gelman(acceptance, initial_step_size, target, gamma=0.05, t0=10.0, kappa=0.75):
    """Hoffman & Gelman (2014), Alg. 5, in NumPy (the library's former recursion, with its
    parameters): the iterates log eps_0..log eps_M and the weighted average of a sequence."""
    mu = np.log(10.0 * initial_step_size)
    h_bar, log_steps = 0.0, [np.log(initial_step_size)]
    for m in range(1, len(acceptance) + 1):
        h_bar = (1.0 - 1.0 / (m + t0)) * h_bar + (target - acceptance[m - 1]) / (m + t0)
        log_steps.append(mu - np.sqrt(m) / gamma * h_bar)

    def average(sequence):
        avg = 0.0
        for m, value in enumerate(sequence, 1):
            avg = m**-kappa * value + (1.0 - m**-kappa) * avg
        return avg

    return np.array(log_steps), average


def test_dual_averaging_on_a_fixed_acceptance_sequence(x64):
    """The step sizes the kernel is run with are Hoffman & Gelman's iterates eps_0..eps_{M-1}
    (gamma = 0.05, t0 = 10, kappa = 0.75, mu = log(10 eps_0)) to float64 rounding; the
    adapted step size is BlackJAX's average, over those same step sizes."""
    acceptance = np.random.default_rng(0).uniform(0.5, 1.0, 500)
    kernel = scripted_kernel(lambda t, step_size: jnp.asarray(acceptance)[t])
    state, step_size = mcmc.adapt_step_size(
        kernel, jax.random.key(0), kernel.init(500), 0.01, 500, target=0.75
    )
    log_steps, average = hoffman_gelman(acceptance, 0.01, 0.75)
    np.testing.assert_allclose(np.log(state.step_sizes), log_steps[:-1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.log(step_size), average(log_steps[:-1]), rtol=1e-12)


def test_dual_averaging_converges_like_alg_5(x64):
    """With acceptance exp(-eps), whose target 0.75 is met at eps* = log(4/3): the iterates
    are Alg. 5's, and BlackJAX's average (over eps_0..eps_{M-1}) is within 1e-5 of Alg. 5's
    (over eps_1..eps_M) after 1000 steps and within 2% of eps*."""
    kernel = scripted_kernel(lambda t, step_size: jnp.exp(-step_size))
    state, step_size = mcmc.adapt_step_size(
        kernel, jax.random.key(0), kernel.init(1000), 0.01, 1000, target=0.75
    )
    acceptance = np.exp(-np.asarray(state.step_sizes))
    log_steps, average = hoffman_gelman(acceptance, 0.01, 0.75)
    np.testing.assert_allclose(np.log(state.step_sizes), log_steps[:-1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(float(step_size), np.exp(average(log_steps[1:])), rtol=1e-5)
    assert abs(float(step_size) / np.log(4 / 3) - 1) < 0.02


def test_dual_averaging_reaches_the_target_acceptance(x64):
    kernel = mcmc.hmc(gaussian_logdensity, 5)
    state = kernel.init(jnp.zeros(2))
    state, step_size = mcmc.adapt_step_size(
        kernel, jax.random.key(0), state, 0.01, 1000, target=0.75
    )
    keys = jax.random.split(jax.random.key(1), 400)
    infos = jax.vmap(lambda k: mcmc.run_chain(kernel, k, state, 50, step_size)[2])(keys)
    assert abs(float(jnp.mean(infos.acceptance_rate)) - 0.75) < 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"initial_step_size": 0.1, "num_steps": 10, "target": 1.5}, "target"),
        ({"initial_step_size": 0.1, "num_steps": 0}, "num_steps must be a positive int"),
        ({"initial_step_size": -0.1, "num_steps": 10}, "initial_step_size must be positive"),
    ],
)
def test_bad_arguments_raise_before_compiling(kwargs, match):
    kernel = mcmc.mala(gaussian_logdensity)
    with pytest.raises(ValueError, match=match):
        mcmc.adapt_step_size(kernel, jax.random.key(0), kernel.init(jnp.zeros(2)), **kwargs)
