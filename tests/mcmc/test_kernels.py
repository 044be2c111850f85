"""MCMC kernels: invariance on Gaussians within Monte Carlo error, ULA's closed-form bias,
acceptance against step size, determinism and errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc, shuffling
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


def test_minibatch_chain_follows_a_shuffling_scheme(x64):
    """Bayesian linear regression y = a x + noise with a N(0, 1) prior: the chain's mean
    approaches the exact posterior mean; epochs follow the scheme's order."""
    from shufflesgd import mcmc

    rng = np.random.default_rng(0)
    n_data = 64
    a = jnp.asarray(rng.standard_normal(n_data))
    y = 0.7 * a + 0.5 * jnp.asarray(rng.standard_normal(n_data))
    noise_var = 0.25
    posterior_var = 1.0 / (1.0 + jnp.sum(a**2) / noise_var)
    posterior_mean = posterior_var * jnp.sum(a * y) / noise_var

    def grad_estimator(x, batch):
        return (
            -x + n_data / batch.shape[0] * jnp.sum(a[batch] * (y[batch] - a[batch] * x)) / noise_var
        )

    kernel = mcmc.sgld(grad_estimator)
    scheme = shuffling.random_reshuffle(n_data)
    state, positions, infos = jax.jit(
        lambda k: mcmc.run_minibatch_chain(
            kernel, k, kernel.init(jnp.asarray(0.0)), scheme, 200, 8, 1e-4
        )
    )(jax.random.key(0))
    assert positions.shape == (200 * 8,) and int(jnp.sum(infos.num_grad_evals)) == 1600
    burned = np.asarray(positions[400:])
    se = float(np.sqrt(posterior_var / mcmc.effective_sample_size(burned[None, :])))
    assert abs(burned.mean() - float(posterior_mean)) < 4 * se + 0.01 * float(
        jnp.sqrt(posterior_var)
    )
    end_state, ends, end_infos = jax.jit(
        lambda k: mcmc.run_minibatch_chain(
            kernel, k, kernel.init(jnp.asarray(0.0)), scheme, 200, 8, 1e-4, record="epoch"
        )
    )(jax.random.key(0))
    np.testing.assert_array_equal(ends, positions[7::8])  # the same chain, kept at epoch ends
    np.testing.assert_array_equal(end_state.position, state.position)
    assert end_infos.num_grad_evals.shape == (200,)
    with pytest.raises(ValueError, match="record must be"):
        mcmc.run_minibatch_chain(
            kernel,
            jax.random.key(0),
            kernel.init(jnp.asarray(0.0)),
            scheme,
            2,
            8,
            1e-4,
            record="every",
        )
    with pytest.raises(ValueError, match="scheme herds gradients"):
        mcmc.run_minibatch_chain(
            kernel,
            jax.random.key(0),
            kernel.init(jnp.asarray(0.0)),
            shuffling.grab_pair_balance(n_data),
            2,
            8,
            1e-4,
        )


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
