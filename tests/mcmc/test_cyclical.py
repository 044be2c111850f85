"""Cyclical SG-MCMC (Zhang et al. 2020): the cosine schedule in closed form; the sampling stage
is plain SGLD / Euler SGHMC bit for bit and the exploration stage is noise-free; the moments of
the sampling-stage draws match the exact moment recursions of the discretised chains, on a
1-D Gaussian (both kernels) and on a Bayesian linear regression with minibatches drawn with
replacement; divergence and argument errors are reported."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc, problems, shuffling
from shufflesgd.mcmc.cyclical import (
    cycle_fraction,
    cyclical_sghmc,
    cyclical_sgld,
    cyclical_step_size,
)

BATCH = jnp.zeros(1, jnp.int32)


def test_schedule_closed_form_period_and_transforms():
    h0 = 0.3
    # K = 40, M = 4: cycles of 10 steps; start h0, middle h0/2, then down to nearly 0
    values = np.asarray(
        jax.jit(jax.vmap(lambda t: cyclical_step_size(t, h0, 40, 4)))(jnp.arange(80))
    )
    for t, expected in [(0, h0), (10, h0), (30, h0), (5, h0 / 2), (25, h0 / 2)]:
        assert values[t] == pytest.approx(expected, rel=1e-6)
    assert values[9] == pytest.approx(h0 / 2 * (math.cos(0.9 * math.pi) + 1), rel=1e-5)
    np.testing.assert_array_equal(values[10:], values[:-10])  # period ceil(K/M) = 10
    expected = h0 / 2 * (np.cos(np.pi * (np.arange(80) % 10) / 10) + 1)
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    # ceil: K = 10, M = 3 gives cycles of 4 steps
    np.testing.assert_allclose(cycle_fraction(jnp.arange(8), 10, 3), [0, 0.25, 0.5, 0.75] * 2)
    # the initial step size is traced: one program serves a sweep
    sweep = jax.jit(jax.vmap(lambda h: cyclical_step_size(jnp.int32(5), h, 40, 4)))(
        jnp.array([0.1, 0.2])
    )
    np.testing.assert_allclose(sweep, [0.05, 0.1], rtol=1e-6)


def _pair(kind, grad):
    """The cyclical kernel, the plain kernel, and the plain kernel's extra hyper-parameters."""
    if kind == "sgld":
        return cyclical_sgld(grad, 12, 1), mcmc.sgld(grad), ()
    return cyclical_sghmc(grad, 12, 1), mcmc.sghmc(grad, "euler"), (0.7,)


@pytest.mark.parametrize("kind", ["sgld", "sghmc"])
def test_sampling_stage_is_the_plain_kernel_and_exploration_is_noise_free(kind):
    """beta = 0: every step samples, and the chain is SGLD / SGHMC fed h_t of Eq. 1, bit for
    bit.  beta = 1: every step explores, the same for any key, and equals SGD (with momentum)
    on log pi with step h_t."""
    grad = lambda x, batch: -(x - 1.0) / 2.0  # noqa: E731
    cyclical, plain, extra = _pair(kind, grad)
    x0 = jnp.array([0.3, -1.2, 2.0])
    steps = jnp.arange(12)
    sizes = cyclical_step_size(steps, 0.4, 12, 1)

    def run_cyclical(key, fraction):
        def body(state, t):
            state, info = cyclical.step(
                jax.random.fold_in(key, t), state, BATCH, 0.4, fraction, *extra
            )
            return state, (state.position, info.is_sampling, info.step_size)

        return jax.lax.scan(body, cyclical.init(x0), steps)[1]

    def run_plain(key):
        def body(state, t):
            h = cyclical_step_size(t, 0.4, 12, 1)
            state, _ = plain.step(jax.random.fold_in(key, t), state, BATCH, h, *extra)
            return state, state.position

        return jax.lax.scan(body, plain.init(x0), steps)[1]

    key = jax.random.key(3)
    positions, sampling, used = jax.jit(run_cyclical)(key, 0.0)
    assert bool(jnp.all(sampling))
    np.testing.assert_allclose(used, sizes, rtol=1e-6)
    np.testing.assert_array_equal(positions, jax.jit(run_plain)(key))

    explore_a, sampling, _ = jax.jit(run_cyclical)(jax.random.key(4), 1.0)
    explore_b, _, _ = jax.jit(run_cyclical)(jax.random.key(5), 1.0)
    assert not bool(jnp.any(sampling))
    np.testing.assert_array_equal(explore_a, explore_b)
    x, v, expected = np.asarray(x0, np.float64), np.zeros(3), []
    for h in np.asarray(sizes, np.float64):
        if kind == "sgld":
            x = x + h * np.asarray(grad(x, None))
        else:
            v = v + h * np.asarray(grad(x, None)) - h * 0.7 * v
            x = x + h * v
        expected.append(x)
    np.testing.assert_allclose(explore_a, expected, rtol=1e-5, atol=1e-6)


def test_stages_follow_the_cycle_fraction():
    kernel = cyclical_sgld(lambda x, b: -x, 20, 2)  # cycles of 10 steps
    _, _, infos = mcmc.run_chain(
        kernel, jax.random.key(0), kernel.init(jnp.zeros(2)), 25, BATCH, 0.1, 0.5
    )
    expected = (np.arange(25) % 10) >= 5
    np.testing.assert_array_equal(infos.is_sampling, expected)
    np.testing.assert_array_equal(infos.num_grad_evals, np.ones(25))


def _gaussian_moments(kind, sizes, sampling, x0, mean, var, friction):
    """Exact mean vector and covariance after every step of the linear recursion that the
    kernel is on N(mean, var) with exact gradients: state x (SGLD) or (x, v) (SGHMC)."""
    if kind == "sgld":
        mu, cov = np.array([x0]), np.zeros((1, 1))
    else:
        mu, cov = np.array([x0, 0.0]), np.zeros((2, 2))
    means, covs = [], []
    for h, s in zip(sizes, sampling):
        if kind == "sgld":
            a, c, k = np.array([[1 - h / var]]), np.array([h * mean / var]), np.array([[1.0]])
            q = 2 * h * s
        else:  # v' = (1 - h g) v + h (m - x)/var + noise;  x' = x + h v'
            a = np.array([[1 - h * h / var, h * (1 - h * friction)], [-h / var, 1 - h * friction]])
            c = np.array([h * h * mean / var, h * mean / var])
            k, q = np.array([[h], [1.0]]), 2 * friction * h * s
        mu = a @ mu + c
        cov = a @ cov @ a.T + q * k @ k.T
        means.append(mu[0])
        covs.append(cov[0, 0])
    return np.array(means), np.array(covs)


@pytest.mark.parametrize("kind", ["sgld", "sghmc"])
def test_gaussian_sampling_stage_moments_match_the_exact_recursion(kind):
    """N(m, s^2) with exact gradients: the kernel is a linear recursion with Gaussian noise
    in the sampling stage only, so the mean and variance of x_t are known exactly for every
    t.  From x_0 = m + 3s, each chain's averages of x and x^2 over its sampling steps, and
    x and x^2 at the first sampling step of the last cycle, match the recursion's to 4.5
    standard errors of the across-chain averages (the chains are independent).  At that step
    the noise-free exploration has left far less spread than noise all along would have."""
    m, s2, friction, h0, beta = 1.0, 2.0, 1.5, 0.6, 0.4
    num_steps, num_cycles, chains, first_sample = 120, 3, 2000, 2 * 40 + 16
    kernel = (cyclical_sgld if kind == "sgld" else cyclical_sghmc)(
        lambda x, b: -(x - m) / s2, num_steps, num_cycles
    )
    extra = () if kind == "sgld" else (friction,)
    x0 = m + 3 * math.sqrt(s2)

    def chain(key):
        _, xs, infos = mcmc.run_chain(
            kernel, key, kernel.init(jnp.full(1, x0)), num_steps, BATCH, h0, beta, *extra
        )
        keep = infos.is_sampling[:, None]
        count = jnp.sum(keep)
        pooled = jnp.sum(keep * xs) / count, jnp.sum(keep * xs**2) / count
        return pooled + (xs[first_sample, 0], xs[first_sample, 0] ** 2), infos

    stats, infos = jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(7), chains))
    sizes = np.asarray(infos.step_size[0], np.float64)
    sampling = np.asarray(infos.is_sampling[0])
    assert sampling.sum() == num_cycles * 24  # 40-step cycles, the last 60% sample
    assert sampling[first_sample] and not sampling[first_sample - 1]
    means, variances = _gaussian_moments(kind, sizes, sampling, x0, m, s2, friction)
    seconds = variances + means**2
    expected = (
        means[sampling].mean(),
        seconds[sampling].mean(),
        means[first_sample],
        seconds[first_sample],
    )
    errors = [np.std(np.asarray(stat, np.float64)) / math.sqrt(chains) for stat in stats]
    for stat, want, error in zip(stats, expected, errors):
        got = float(np.mean(np.asarray(stat, np.float64)))
        assert abs(got - want) < 4.5 * error, (got, want, error)
    # noise in every step (beta = 0) would be told apart at once
    means0, variances0 = _gaussian_moments(kind, sizes, np.ones_like(sampling), x0, m, s2, friction)
    assert variances0[first_sample] - variances[first_sample] > 20 * errors[3]


def _regression_moments(model, mean, sizes, sampling, batch_size):
    """Exact mean and covariance of SGLD's iterates on a Gaussian posterior with minibatches
    of ``batch_size`` indices drawn with replacement (started at w = 0).  With
    u_i(w) = c_i - M_i w the per-example gradients, the estimate is P(m - w) plus a batch
    noise of conditional covariance (n^2/b) Cov_i[u_i(w)], whose expectation over w ~ (mu, C)
    is (n/b) sum_i [(dc_i - dM_i mu)(.)^T + dM_i C dM_i^T], dc, dM centred over i."""
    a, y, noise_var = (np.asarray(leaf, np.float64) for leaf in model.data)
    n, d = a.shape
    c = a * (y / noise_var)[:, None]
    big_m = a[:, :, None] * a[:, None, :] / noise_var[:, None, None]
    dc, dm = c - c.mean(0), big_m - big_m.mean(0)
    precision = big_m.sum(0) + np.eye(d) / float(model.prior_variance)
    mu, cov = np.zeros(d), np.zeros((d, d))
    means, second = [], []
    for h, s in zip(sizes, sampling):
        r = dc - dm @ mu
        noise = (n / batch_size) * (r.T @ r + np.einsum("iab,bc,idc->ad", dm, cov, dm))
        step = np.eye(d) - h * precision
        mu = mu + h * precision @ (mean - mu)
        cov = step @ cov @ step.T + h * h * noise + 2 * h * s * np.eye(d)
        means.append(mu)
        second.append(np.diag(cov) + mu**2)
    return np.array(means), np.array(second)


def test_bayesian_linear_regression_with_minibatches_matches_the_exact_moments():
    """cSGLD on a Bayesian linear regression, batches of 1 drawn with replacement
    (run_minibatch_chain): the chain's first two moments obey an exact recursion (the batch
    noise's covariance is quadratic in w); the per-chain sampling-stage averages of w and w^2
    match it to 4.5 standard errors in each coordinate, and their mean is the exact posterior
    mean to 4.5 standard errors plus the recursion's own (transient) offset from it.  The
    minibatch noise inflates the second moment well beyond that error."""
    rng = np.random.default_rng(0)
    n, d, batch_size, chains = 16, 2, 1, 1000
    features = rng.standard_normal((n, d))
    targets = features @ np.array([0.5, -1.0]) + rng.standard_normal(n)
    model, posterior = problems.bayesian_linear_regression(features, targets, 1.0, 1.0)
    mean = np.asarray(posterior.mean, np.float64)
    largest = float(np.linalg.eigvalsh(np.linalg.inv(np.asarray(posterior.covariance)))[-1])
    num_epochs, num_cycles = 10, 4  # 160 steps, cycles of 40
    kernel = cyclical_sgld(model.grad_estimator, num_epochs * n // batch_size, num_cycles)
    scheme = shuffling.with_replacement(n)

    def chain(key):
        _, ws, infos = mcmc.run_minibatch_chain(
            kernel,
            key,
            kernel.init(jnp.zeros(d)),
            scheme,
            num_epochs,
            batch_size,
            0.5 / largest,
            0.5,
        )
        keep = infos.is_sampling[:, None]
        count = jnp.sum(keep)
        return jnp.sum(keep * ws, 0) / count, jnp.sum(keep * ws**2, 0) / count, infos

    first, second, infos = jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(2), chains))
    sizes = np.asarray(infos.step_size[0], np.float64)
    sampling = np.asarray(infos.is_sampling[0])
    means, seconds = _regression_moments(model, mean, sizes, sampling, batch_size)
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    se_first = first.std(0) / math.sqrt(chains)
    se_second = second.std(0) / math.sqrt(chains)
    np.testing.assert_array_less(np.abs(first.mean(0) - means[sampling].mean(0)), 4.5 * se_first)
    np.testing.assert_array_less(
        np.abs(second.mean(0) - seconds[sampling].mean(0)), 4.5 * se_second
    )
    offset = np.abs(means[sampling].mean(0) - mean)
    np.testing.assert_array_less(np.abs(first.mean(0) - mean), 4.5 * se_first + offset)
    _, exact_gradient = _regression_moments(model, mean, sizes, sampling, math.inf)
    assert np.all(np.abs(seconds - exact_gradient)[sampling].mean(0) > 10 * se_second)


def test_jit_vmap_over_chains_and_hyper_parameters():
    kernel = cyclical_sghmc(lambda x, b: -x, 10, 2)

    def keys():  # a fresh array for each use: the checker forbids reusing a consumed key
        return jax.random.split(jax.random.key(0), 3)

    states = jax.vmap(kernel.init)(jnp.ones((3, 2)))
    h0, beta = jnp.array([0.1, 0.2, 0.3]), jnp.array([0.0, 0.5, 1.0])
    step = jax.jit(jax.vmap(kernel.step, in_axes=(0, 0, None, 0, 0, None)))
    new, info = step(keys(), states, BATCH, h0, beta, 1.0)
    single = jax.jit(kernel.step)
    for i in range(3):
        one, one_info = single(
            keys()[i], jax.tree.map(lambda a, i=i: a[i], states), BATCH, h0[i], beta[i], 1.0
        )
        np.testing.assert_allclose(new.position[i], one.position, rtol=1e-6)
        assert bool(info.is_sampling[i]) == bool(one_info.is_sampling)
    np.testing.assert_array_equal(new.count, [1, 1, 1])
    np.testing.assert_array_equal(info.is_sampling, [True, False, False])  # r(0) = 0


@pytest.mark.parametrize("make", [cyclical_sgld, cyclical_sghmc])
def test_divergence_is_reported(make):
    """A step far beyond 2/L on a target of curvature L overflows; the info says where."""
    kernel = make(lambda x, b: -1e4 * x, 50, 1)
    extra = (1.0,) if make is cyclical_sghmc else ()
    _, _, infos = mcmc.run_chain(
        kernel, jax.random.key(0), kernel.init(jnp.ones(2)), 50, BATCH, 1.0, 0.0, *extra
    )
    first = int(mcmc.first_nonfinite_step(infos))
    assert 0 < first < 50
    assert bool(jnp.all(infos.is_finite[:first])) and not bool(jnp.any(infos.is_finite[first:]))


def _step(kernel, key=None, x0=None, hyper=(0.1, 0.5)):
    state = kernel.init(jnp.zeros(2) if x0 is None else x0)
    return lambda: kernel.step(jax.random.key(0) if key is None else key, state, BATCH, *hyper)


GRAD = lambda x, b: -x  # noqa: E731


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: cyclical_sgld(GRAD, 0, 1), ValueError, "num_steps must be a positive int"),
        (lambda: cyclical_sgld(GRAD, 10.0, 1), ValueError, "num_steps must be a positive int"),
        (lambda: cyclical_sghmc(GRAD, 10, 0), ValueError, "num_cycles must be a positive int"),
        (lambda: cyclical_sgld(GRAD, 5, 6), ValueError, "num_cycles must not exceed"),
        (lambda: cyclical_step_size(1.5, 0.1, 10, 2), TypeError, "step must be an integer"),
        (lambda: cyclical_step_size(-1, 0.1, 10, 2), ValueError, "step must be non-negative"),
        (lambda: cyclical_step_size(1, 0.0, 10, 2), ValueError, "initial_step_size must be"),
        (lambda: cycle_fraction(jnp.arange(3), 10, 20), ValueError, "num_cycles"),
        (
            lambda: _step(cyclical_sgld(GRAD, 10, 2), hyper=(-0.1, 0.5))(),
            ValueError,
            "initial_step_size must be positive",
        ),
        (
            lambda: _step(cyclical_sgld(GRAD, 10, 2), hyper=(0.1, 1.5))(),
            ValueError,
            "exploration_fraction must lie in",
        ),
        (
            lambda: _step(cyclical_sgld(GRAD, 10, 2), hyper=(0.1, math.nan))(),
            ValueError,
            "exploration_fraction must lie in",
        ),
        (
            lambda: _step(cyclical_sghmc(GRAD, 10, 2), hyper=(0.1, 0.5, 0.0))(),
            ValueError,
            "friction must be positive",
        ),
        (
            lambda: _step(cyclical_sgld(GRAD, 10, 2), key=jnp.zeros(2))(),
            TypeError,
            "key must be a PRNG key",
        ),
        (
            lambda: cyclical_sghmc(GRAD, 10, 2).init(jnp.zeros(2, jnp.int32)),
            TypeError,
            "position must be a float",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_traced_hyper_parameters_pass_the_checks():
    kernel = cyclical_sgld(GRAD, 10, 2)
    state = kernel.init(jnp.zeros(2))
    out = jax.jit(lambda h, b: kernel.step(jax.random.key(1), state, BATCH, h, b)[1].step_size)(
        0.2, 0.5
    )
    assert float(out) == pytest.approx(0.2)
