"""MCMC kernels: invariance on Gaussians within Monte Carlo error, ULA's closed-form bias,
acceptance against step size, determinism and errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc
from support.gaussian_target import COV, MEAN, gaussian_logdensity


def exact_draws(key, n):
    return MEAN + jax.random.normal(key, (n, 2)) @ jnp.linalg.cholesky(COV).T


def chains_after(kernel, num_chains, num_steps, *hyper, seed=0):
    """Independent chains started at exact draws: at stationarity every step's law is the target."""
    start = exact_draws(jax.random.key(seed), num_chains)
    keys = jax.random.split(jax.random.key(seed + 1), num_chains)

    @jax.jit
    def run(keys, start):
        def one(key, x0):
            state, _, infos = mcmc.run_chain(kernel, key, kernel.init(x0), num_steps, *hyper)
            return state.position, infos.acceptance_rate.mean()

        return jax.vmap(one)(keys, start)

    return run(keys, start)


@pytest.mark.parametrize("name, hyper", [("mala", (0.5,)), ("hmc", (0.3, 1.0))])
def test_adjusted_kernels_leave_the_gaussian_invariant(name, hyper, x64):
    kernel = mcmc.mala(gaussian_logdensity) if name == "mala" else mcmc.hmc(gaussian_logdensity, 5)
    n = 20000
    final, acceptance = chains_after(kernel, n, 20, *hyper)
    # independent chains: standard errors sigma / sqrt(n) for the mean, sqrt(2/n) sigma^2 for the
    # variance
    se_mean = np.sqrt(np.diag(COV) / n)
    np.testing.assert_array_less(np.abs(np.mean(final, axis=0) - MEAN), 4 * se_mean)
    np.testing.assert_array_less(
        np.abs(np.var(final, axis=0) - np.diag(COV)), 4 * np.diag(COV) * math.sqrt(2 / n)
    )
    assert 0.3 < float(jnp.mean(acceptance)) < 1.0


@pytest.mark.parametrize("name", ["mala", "hmc"])
def test_acceptance_falls_as_the_step_size_grows(name):
    kernel = mcmc.mala(gaussian_logdensity) if name == "mala" else mcmc.hmc(gaussian_logdensity, 10)
    steps = [0.05, 0.4, 1.2, 2.0]
    rates = []
    for h in steps:
        _, acceptance = chains_after(kernel, 500, 30, h)
        rates.append(float(jnp.mean(acceptance)))
    assert all(a > b for a, b in zip(rates, rates[1:])), rates


def test_same_key_same_bits_and_compiles_once():
    kernel = mcmc.mala(gaussian_logdensity)
    state = kernel.init(jnp.zeros(2))
    step = jax.jit(chex.assert_max_traces(kernel.step, n=1))
    a, _ = step(jax.random.key(3), state, 0.1)
    b, _ = step(jax.random.key(3), state, 0.2)  # a new step size does not recompile
    c, _ = step(jax.random.key(3), state, 0.1)
    np.testing.assert_array_equal(a.position, c.position)
    assert not np.array_equal(a.position, b.position)


def test_pytree_positions():
    def logdensity(params):
        return -0.5 * jnp.sum(params["w"] ** 2) - 0.5 * params["b"] ** 2

    kernel = mcmc.hmc(logdensity, 3)
    state = kernel.init({"w": jnp.ones(3), "b": jnp.array(0.5)})
    state, info = jax.jit(kernel.step)(jax.random.key(0), state, 0.1)
    chex.assert_shape(state.position["w"], (3,))
    assert int(info.num_grad_evals) == 3


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: mcmc.mala(gaussian_logdensity).step(
                jax.random.key(0), mcmc.mala(gaussian_logdensity).init(jnp.zeros(2)), 0.0
            ),
            "step_size must be positive",
        ),
        (
            lambda: mcmc.ula(gaussian_logdensity).step(
                jax.random.key(0), mcmc.ula(gaussian_logdensity).init(jnp.zeros(2)), -1.0
            ),
            "step_size must be positive",
        ),
        (lambda: mcmc.hmc(gaussian_logdensity, 0), "num_leapfrog must be a positive int"),
        (
            lambda: mcmc.hmc(gaussian_logdensity, 3).step(
                jax.random.key(0), mcmc.hmc(gaussian_logdensity, 3).init(jnp.zeros(2)), 0.1, -1.0
            ),
            "inverse_mass must be positive",
        ),
        (
            lambda: mcmc.mala(lambda x: x).init(jnp.zeros(2)),
            "logdensity_fn must return a real scalar",
        ),
    ],
)
def test_bad_arguments_raise_before_compiling(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------ stochastic gradients
