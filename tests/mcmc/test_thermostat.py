"""SGNHT (Ding et al. 2014) on an isotropic Gaussian written as a finite sum, with exact and
with minibatch gradients: the kinetic temperature averages to 1, the positions and the
thermostat obey the stationary identities of the discretised dynamics, and the thermostat
absorbs the unknown gradient noise; the exact stationary identities on a Bayesian
linear-regression posterior; pytree positions, divergence and argument errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from shufflesgd import mcmc
from shufflesgd.mcmc.thermostat import sgnht

S2, A, H, NOISE = 2.0, 1.0, 0.05, 40.0  # target variance, diffusion, step, gradient noise V
DIM, EXAMPLES = 10, 16
# pi(x) = prod_i N(x; a_i, n s^2)-factors with mean 0: a single example's estimate
# -(x - a_i)/s^2 is the exact gradient -x/s^2 plus a_i/s^2, whose coordinates are
# uncorrelated with variance V (orthogonal, centred +-1 columns of a Hadamard matrix).
# Rows EXAMPLES.. are all zero: a chain drawing from them has exact gradients.
OFFSETS = S2 * math.sqrt(NOISE) * scipy.linalg.hadamard(EXAMPLES)[:, 1 : DIM + 1]
DATA = jnp.asarray(np.concatenate([OFFSETS, np.zeros_like(OFFSETS)]), jnp.float32)


def grad_estimator(x, batch):
    return -(x - DATA[batch[0]]) / S2


def _chains(chains=256, num_steps=2000):
    """Per-chain averages over the second half of the run of the statistics below, and each
    chain's thermostat at the start of that half and at the end."""
    kernel = sgnht(grad_estimator)

    def chain(key, noisy):
        start_key, key = jax.random.split(key)
        x0, p0 = jax.random.normal(start_key, (2, DIM))
        state = kernel.init(math.sqrt(S2) * x0, A, p0)
        first = jnp.where(noisy, 0, EXAMPLES)

        def body(state, t):
            step_key, batch_key = jax.random.split(jax.random.fold_in(key, t))
            batch = first + jax.random.randint(batch_key, (1,), 0, EXAMPLES)
            state, _ = kernel.step(step_key, state, batch, H, A)
            x, p, xi = state
            p2, xp, x2 = jnp.mean(p * p), jnp.mean(x * p), jnp.mean(x * x)
            stats = jnp.stack(
                [
                    p2,
                    xi,
                    x2,
                    xi * xp,
                    # the thermostat identity's left side (see the test)
                    xi * p2 - H / 2 * xi**2 * p2 + (1 - H * xi) * xp / S2 - H / 2 * x2 / S2**2,
                ]
            )
            return state, (stats, xi)

        _, (stats, xis) = jax.lax.scan(body, state, jnp.arange(num_steps))
        half = num_steps // 2
        return stats[half:].mean(0), xis[half - 1], xis[-1]

    keys = jax.random.split(jax.random.key(11), 2 * chains)
    flags = jnp.repeat(jnp.array([False, True]), chains)
    stats, xi_start, xi_end = jax.jit(jax.vmap(chain))(keys, flags)
    stats, xi_end = np.asarray(stats, np.float64), np.asarray(xi_end, np.float64)
    return {
        noisy: (
            stats[flags == noisy],
            np.asarray(xi_start, np.float64)[flags == noisy],
            xi_end[flags == noisy],
        )
        for noisy in (False, True)
    }, num_steps // 2


@pytest.fixture(scope="module")
def runs():
    return _chains()


def _mean_and_error(values):
    return values.mean(0), values.std(0) / math.sqrt(values.shape[0])


@pytest.mark.parametrize("noisy", [False, True])
def test_kinetic_temperature_and_positions(runs, noisy):
    r"""The thermostat's update telescopes: over a window of T steps the average of
    p'p/d is 1 + (xi_end - xi_start)/(T h), to float precision; it is 1 within 4.5 standard
    errors across the independent chains.  Stationarity of E|x|^2 and of E[x.p] gives
    E|x|^2/(d s^2) = E|p|^2/d - E[xi x.p]/d, checked to 4.5 standard errors of the per-chain
    difference; since E[x.p]/d = hE|p|^2/(2d), the position variance is
    s^2 (1 - h xi/2) to leading order, so within h * mean(xi) of s^2."""
    (stats, xi_start, xi_end), window = runs[0][noisy], runs[1]
    kinetic = stats[:, 0]
    np.testing.assert_allclose(kinetic, 1 + (xi_end - xi_start) / (window * H), atol=1e-5)
    mean, error = _mean_and_error(kinetic)
    assert abs(mean - 1) < 4.5 * error, (mean, error)
    difference = stats[:, 2] / S2 - stats[:, 0] + stats[:, 3]
    mean, error = _mean_and_error(difference)
    assert abs(mean) < 4.5 * error, (mean, error)
    variance, error = _mean_and_error(stats[:, 2])
    xi = stats[:, 1].mean()
    assert abs(variance / S2 - 1) < H * xi + 4.5 * error / S2, (variance, xi)


def test_thermostat_absorbs_the_gradient_noise(runs):
    r"""Stationarity of E|p|^2 under p' = (1 - h xi) p - h x/s^2 + h n + sqrt(2Ah) z, with the
    batch noise n of variance V per coordinate independent of the state, gives exactly

    E[xi |p|^2 - (h/2) xi^2 |p|^2 + (1 - h xi) x.p/s^2 - (h/2)|x|^2/s^4]/d = A + hV/2,

    the injected diffusion plus the unknown B = hV/2; checked to 4.5 standard errors in both
    runs.  To leading order in h the thermostat's mean is A + B + (h/2) E[xi^2], so the
    noise raises it by at least B (up to the error) and by less than B + h E[xi^2]."""
    means = {}
    for noisy in (False, True):
        stats = runs[0][noisy][0]
        mean, error = _mean_and_error(stats[:, 4])
        expected = A + (H * NOISE / 2 if noisy else 0.0)
        assert abs(mean - expected) < 4.5 * error, (noisy, mean, expected, error)
        means[noisy] = _mean_and_error(stats[:, 1])
    rise = means[True][0] - means[False][0]
    error = math.hypot(means[True][1], means[False][1])
    noise_diffusion = H * NOISE / 2
    assert noise_diffusion - 4.5 * error < rise < noise_diffusion + H * means[True][0] ** 2, rise


def test_pytree_positions_count_every_entry():
    kernel = sgnht(lambda x, b: jax.tree.map(lambda leaf: -leaf, x))
    position = {"a": jnp.array([0.5, -1.0]), "b": jnp.array([[2.0, 0.1, -0.3]])}
    state = kernel.init(position, 0.7)
    new, info = jax.jit(kernel.step)(jax.random.key(0), state, jnp.zeros(1, jnp.int32), 0.1, 2.0)
    squares = np.concatenate([np.ravel(leaf) ** 2 for leaf in jax.tree.leaves(new.momentum)])
    assert float(new.thermostat) == pytest.approx(0.7 + 0.1 * (squares.mean() - 1), rel=1e-6)
    np.testing.assert_allclose(new.position["b"], position["b"] + 0.1 * new.momentum["b"])
    assert bool(info.is_finite) and int(info.num_grad_evals) == 1


def test_divergence_is_reported():
    kernel = sgnht(lambda x, b: -1e4 * x)
    _, _, infos = mcmc.run_chain(
        kernel, jax.random.key(0), kernel.init(jnp.ones(2)), 50, jnp.zeros(1, jnp.int32), 1.0, 1.0
    )
    first = int(mcmc.first_nonfinite_step(infos))
    assert 0 < first < 50 and not bool(jnp.any(infos.is_finite[first:]))


def _step(hyper, key=None):
    kernel = sgnht(lambda x, b: -x)
    state = kernel.init(jnp.zeros(2))
    return lambda: kernel.step(
        jax.random.key(0) if key is None else key, state, jnp.zeros(1, jnp.int32), *hyper
    )


@pytest.mark.parametrize(
    "call, error, match",
    [
        (_step((0.0, 1.0)), ValueError, "step_size must be positive"),
        (_step((0.1, -1.0)), ValueError, "diffusion must be positive"),
        (_step((0.1, math.nan)), ValueError, "diffusion must be positive"),
        (_step((0.1, 1.0), key=3), TypeError, "key must be a PRNG key"),
        (lambda: sgnht(lambda x, b: -x).init(jnp.zeros(2), math.inf), ValueError, "thermostat"),
        (lambda: sgnht(lambda x, b: -x).init(jnp.zeros(2, jnp.int32)), TypeError, "position"),
        (
            lambda: sgnht(lambda x, b: -x).init(jnp.zeros(2), 1.0, jnp.zeros(3)),
            ValueError,
            "momentum must be shaped like position",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_traced_hyper_parameters_sweep():
    kernel = sgnht(lambda x, b: -x)
    state = kernel.init(jnp.ones(3), 1.0, jnp.ones(3))
    sweep = jax.jit(
        jax.vmap(
            lambda h, a: kernel.step(jax.random.key(0), state, jnp.zeros(1, jnp.int32), h, a)[0]
        )
    )
    new = sweep(jnp.array([0.1, 0.2]), jnp.array([0.5, 2.0]))
    assert new.position.shape == (2, 3) and new.thermostat.shape == (2,)


def test_stationary_identities_on_a_bayesian_linear_regression_posterior():
    """With exact gradients g = -P(x - m) on an anisotropic Gaussian posterior (a Bayesian
    linear regression), stationarity of E[u^T p] and of E[p] for u = x - m under the update
    p' = (1 - h xi) p - h P u + sqrt(2Ah) z, u' = u + h p' gives, at every step,

        E[u^T P u] = E[|p|^2] - E[xi u^T p]   and   P E[u] = -E[xi p],

    exactly for the discretised chain.  Both hold within 4 standard errors over 256 chains
    (time averages after a burn-in); a kernel that moved x with the old momentum breaks the
    first by about 23 standard errors (checked once by hand)."""
    from shufflesgd import problems

    rng = np.random.default_rng(3)
    n, d, chains, steps = 32, 3, 256, 4000
    features = rng.standard_normal((n, d)) * np.array([1.0, 0.5, 0.25])
    targets = features @ np.array([0.5, -1.0, 2.0]) + rng.standard_normal(n)
    model, posterior = problems.bayesian_linear_regression(features, targets, 1.0, 1.0)
    precision = jnp.asarray(np.linalg.inv(np.asarray(posterior.covariance)), jnp.float32)
    mean = jnp.asarray(posterior.mean, jnp.float32)
    everything = jnp.arange(n)
    h = 0.2 / math.sqrt(float(np.linalg.eigvalsh(np.asarray(precision))[-1]))
    kernel = sgnht(model.grad_estimator)

    def chain(key):
        state = kernel.init(mean, A)

        def body(state, t):
            state, _ = kernel.step(jax.random.fold_in(key, t), state, everything, h, A)
            u, p, xi = state.position - mean, state.momentum, state.thermostat
            return state, jnp.concatenate(
                [jnp.stack([u @ precision @ u, p @ p, xi * (u @ p)]), precision @ u, xi * p]
            )

        return jax.lax.scan(body, state, jnp.arange(steps))[1][steps // 4 :].mean(0)

    stats = np.asarray(
        jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(12), chains)), np.float64
    )
    energy = stats[:, 0] - stats[:, 1] + stats[:, 2]
    mean_energy, se_energy = _mean_and_error(energy)
    assert abs(mean_energy) < 4 * se_energy, (mean_energy, se_energy)
    drift = stats[:, 3 : 3 + d] + stats[:, 3 + d :]
    mean_drift, se_drift = _mean_and_error(drift)
    np.testing.assert_array_less(np.abs(mean_drift), 4 * se_drift)
    # the identity is not empty: E[u^T P u] is near d (the exact law's), far from 0
    assert abs(stats[:, 0].mean() - d) < 0.2 * d
