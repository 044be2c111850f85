"""Walk–jump samplers: walk–jump's smoothed and denoised moments against their closed forms
(ULA bias included; BAOAB exact), the chain of log-concave Markov chains against brute-force
joint densities and its closed-form ULA recursion, determinism, tracing and errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc
from support.smoothing_targets import MEAN, S2, gaussian_smoothed_score, mixture


def assert_moments(samples, mean, var):
    """Mean and variance of ``samples [chains, draws, d]`` within 4 ESS-based standard errors."""
    x = np.asarray(samples, np.float64)
    ess = mcmc.effective_sample_size(x)
    se_mean = np.sqrt(var / ess)
    sq = (x - np.asarray(mean)) ** 2
    se_var = sq.std(axis=(0, 1)) / np.sqrt(mcmc.effective_sample_size(sq))
    np.testing.assert_array_less(np.abs(x.mean(axis=(0, 1)) - mean), 4 * se_mean)
    np.testing.assert_array_less(np.abs(sq.mean(axis=(0, 1)) - var), 4 * se_var)
    return x.mean(axis=(0, 1)), sq.mean(axis=(0, 1)), se_var


def test_walk_jump_samples_the_smoothed_gaussian_up_to_the_ula_bias(x64):
    """Target N(m, s^2 I), sigma = 0.5: the walk is ULA on N(m, tau^2 I), tau^2 = s^2 + sigma^2,
    whose stationary law is N(m, tau^2 / (1 - h / (2 tau^2)) I) exactly (the closed-form
    discretisation allowance); the jumps m + s^2/tau^2 (y - m) then have variance
    (s^2/tau^2)^2 times that.  256 chains x 2000 steps from stationary draws, ESS-based errors."""
    sigma, h, chains, steps = 0.5, 0.05, 256, 2000
    tau2 = S2 + sigma**2
    walk_var = tau2 / (1 - h / (2 * tau2))
    kernel = mcmc.walk_jump(gaussian_smoothed_score)
    start = MEAN + math.sqrt(walk_var) * jax.random.normal(jax.random.key(0), (chains, 2))

    @jax.jit
    def run(keys, start):
        def one(key, y0):
            walk_key, jump_key = jax.random.split(key)
            _, ys, infos = mcmc.run_chain(kernel, walk_key, kernel.init(y0), steps, h, sigma)
            jumps = jax.vmap(lambda k, y: mcmc.jump(gaussian_smoothed_score, k, y, sigma))(
                jax.random.split(jump_key, steps), ys
            )
            return ys, jumps, infos.num_grad_evals.sum()

        return jax.vmap(one)(keys, start)

    ys, jumps, evals = run(jax.random.split(jax.random.key(1), chains), start)
    assert int(evals[0]) == steps
    assert_moments(ys, MEAN, walk_var)
    assert_moments(jumps, MEAN, (S2 / tau2) ** 2 * walk_var)


def test_underdamped_walk_samples_the_smoothed_gaussian_exactly(x64):
    """BAOAB's positions are exact for a Gaussian at any stable step (Leimkuhler & Matthews
    2013): at h = 0.5 (where ULA's stationary variance would be 1.5 tau^2) the walk's
    y-marginal is N(m, tau^2 I) within ESS-based errors; 128 chains x 1000 steps from
    stationary positions and velocities."""
    sigma, h, friction, chains, steps = 0.5, 0.5, 1.0, 128, 1000
    tau2 = S2 + sigma**2
    kernel = mcmc.underdamped_walk_jump(gaussian_smoothed_score)
    start = mcmc.UnderdampedWalkState(
        MEAN + math.sqrt(tau2) * jax.random.normal(jax.random.key(0), (chains, 2)),
        jax.random.normal(jax.random.key(1), (chains, 2)),
    )
    run = jax.jit(
        jax.vmap(lambda k, s: mcmc.run_chain(kernel, k, s, steps, h, sigma, friction)[1:])
    )
    ys, infos = run(jax.random.split(jax.random.key(2), chains), start)
    assert int(infos.num_grad_evals[0].sum()) == 2 * steps
    assert_moments(ys, MEAN, tau2)


def joint_measurement_mixture(m, num, sigma, ys):
    """Responsibilities and score at ``ys [num, d]`` of the law of (y_1, ..., y_num),
    y_j = x + sigma eps_j with x ~ m: a mixture in dimension num * d with tiled means and
    covariances 1 1^T (x) Sigma_c + sigma^2 I (plain NumPy, independent of the library)."""
    u = np.asarray(ys, np.float64).ravel()
    log_terms, scores = [], []
    for log_w, mu, cov in zip(
        np.asarray(m.log_weights), np.asarray(m.means), np.asarray(m.covariances)
    ):
        joint_cov = np.kron(np.ones((num, num)), cov) + sigma**2 * np.eye(num * len(mu))
        diff = u - np.tile(mu, num)
        solved = np.linalg.solve(joint_cov, diff)
        log_terms.append(log_w - 0.5 * (diff @ solved + np.linalg.slogdet(joint_cov)[1]))
        scores.append(-solved)
    log_terms = np.array(log_terms)
    weights = np.exp(log_terms - log_terms.max())
    weights /= weights.sum()
    return weights, weights @ np.array(scores)


def test_multimeasurement_formulas_match_the_brute_force_joint_density(x64):
    """The conditional score of y_{k+1} (gradient of the joint mixture density of all k+1
    measurements in its last block) and E[x | y_{1:k}] (responsibility-weighted component
    posteriors of the joint mixture of k measurements) against the running-mean formulas."""
    m, sigma = mixture(), 0.8
    score = mcmc.mixture_smoothed_score(m)
    ys = np.random.default_rng(0).standard_normal((4, 2))
    for k in range(4):
        brute = joint_measurement_mixture(m, k + 1, sigma, ys[: k + 1])[1][-2:]
        formula = mcmc.conditional_measurement_score(
            score, None, jnp.asarray(ys[k]), jnp.asarray(ys[:k].sum(0)), jnp.asarray(k), sigma
        )
        np.testing.assert_allclose(formula, brute, rtol=1e-9, atol=1e-12)
    for k in range(1, 5):
        weights = joint_measurement_mixture(m, k, sigma, ys[:k])[0]
        ybar = ys[:k].mean(0)
        means, covs = np.asarray(m.means), np.asarray(m.covariances)
        gains = np.linalg.solve(covs + sigma**2 / k * np.eye(2), (ybar - means)[..., None])[..., 0]
        brute = weights @ (means + np.einsum("cij,cj->ci", covs, gains))
        state = mcmc.MultiMeasurementState(
            jnp.asarray(ys[k - 1]), jnp.asarray(ys[:k].sum(0)), jnp.asarray(k), jnp.asarray(0)
        )
        np.testing.assert_allclose(
            mcmc.multimeasurement_jump(score, None, state, sigma), brute, rtol=1e-9
        )


def multimeasurement_ula_moments(num_measurements, steps, h, sigma, m, s2, start_var):
    """Per-coordinate mean and variance of the jump after the sequential ULA walks on the
    Gaussian target N(m, s2), by propagating the exact first two moments of the linear
    recursion in (y, S = sum of accepted y's).  With K = k + 1 measurements in play and
    c = 1 / (s2 + sigma^2 / K), the conditional score is
    -c (ybar - m) / K - (y - ybar) / sigma^2, ybar = (S + y) / K (the Gaussian case, written
    out independently of the library)."""
    mean, cov = np.array([m, 0.0]), np.diag([start_var, 0.0])
    for k in range(num_measurements):
        big_k = k + 1
        c = 1.0 / (s2 + sigma**2 / big_k)
        d_y = -c / big_k**2 - (1 - 1 / big_k) / sigma**2
        d_s = -c / big_k**2 + 1 / (big_k * sigma**2)
        step = np.array([[1 + h * d_y, h * d_s], [0.0, 1.0]])
        for _ in range(steps):
            mean = step @ mean + np.array([h * c * m / big_k, 0.0])
            cov = step @ cov @ step.T + np.diag([2 * h, 0.0])
        accept = np.array([[1.0, 0.0], [1.0, 1.0]])
        mean, cov = accept @ mean, accept @ cov @ accept.T
    gain = (
        s2 / (s2 + sigma**2 / num_measurements) / num_measurements
    )  # x_hat = m + gain (S - num m)
    return m + gain * (mean[1] - num_measurements * m), gain**2 * cov[1, 1]


def test_chain_of_log_concave_chains_on_a_gaussian(x64):
    """4 measurements x 100 ULA steps at sigma = 1: the jumps E[x | y_{1:4}] of 4000
    independent runs match the closed-form moments of the sequential ULA recursion within 4
    standard errors.  That recursion's jump variance, 0.3459, exceeds the exact law's
    s^2 - (1/s^2 + 4/sigma^2)^{-1} = 1/3 by 3.8%: about 1.8% of ULA bias (0.3395 with
    walks 4x longer) and 2.1% from each walk's memory of its start, the previous
    measurement (0.3404 as h -> 0 at the same walk time h * steps = 5)."""
    sigma, h, num, steps, n = 1.0, 0.05, 4, 100, 4000
    kernel = mcmc.chain_of_log_concave_chains(gaussian_smoothed_score, steps)
    start = MEAN + math.sqrt(S2 + sigma**2) * jax.random.normal(jax.random.key(0), (n, 2))

    @jax.jit
    def run(keys, start):
        def one(key, y0):
            walk_key, jump_key = jax.random.split(key)
            state, _, _ = mcmc.run_chain(kernel, walk_key, kernel.init(y0), num * steps, h, sigma)
            x_hat = mcmc.multimeasurement_jump(gaussian_smoothed_score, jump_key, state, sigma)
            return x_hat, state.num_measurements

        return jax.vmap(one)(keys, start)

    jumps, counts = run(jax.random.split(jax.random.key(1), n), start)
    assert np.all(np.asarray(counts) == num)
    exact_var = S2 - 1 / (1 / S2 + num / sigma**2)
    for i in range(2):
        mean_i, var_i = multimeasurement_ula_moments(
            num, steps, h, sigma, float(MEAN[i]), S2, S2 + sigma**2
        )
        assert abs(var_i - exact_var) < 0.05 * exact_var and abs(mean_i - float(MEAN[i])) < 1e-3
        x = np.asarray(jumps[:, i])
        assert abs(x.mean() - mean_i) < 4 * math.sqrt(var_i / n)
        assert abs(x.var() - var_i) < 4 * var_i * math.sqrt(2 / n)


KERNELS = {
    "walk_jump": (
        lambda: mcmc.walk_jump(mcmc.mixture_smoothed_score(mixture())),
        (0.1, 0.5),
        (0.2, 0.7),
    ),
    "walk_jump_monte_carlo": (
        lambda: mcmc.walk_jump(mcmc.monte_carlo_smoothed_score(mixture().log_prob, 64)),
        (0.1, 0.5),
        (0.2, 0.7),
    ),
    "chain_of_log_concave": (
        lambda: mcmc.chain_of_log_concave_chains(mcmc.mixture_smoothed_score(mixture()), 3),
        (0.1, 0.5),
        (0.2, 0.7),
    ),
    "underdamped_walk_jump": (
        lambda: mcmc.underdamped_walk_jump(mcmc.mixture_smoothed_score(mixture())),
        (0.1, 0.5, 1.0),
        (0.2, 0.7, 2.0),
    ),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_same_key_same_bits_compiles_once_and_runs_under_vmap(name):
    make, hyper, other = KERNELS[name]
    # the counter is keyed by the step's code, shared by two kernels here
    chex.clear_trace_counter()
    kernel = make()
    state = kernel.init(jnp.array([0.3, -0.2]))
    step = jax.jit(chex.assert_max_traces(kernel.step, n=1))
    a, info = step(jax.random.key(3), state, *hyper)
    b, _ = step(jax.random.key(3), state, *other)  # new hyper-parameter values do not recompile
    c, _ = step(jax.random.key(3), state, *hyper)
    np.testing.assert_array_equal(a.position, c.position)
    assert not other or not np.array_equal(a.position, b.position)
    assert int(info.num_grad_evals) == (2 if name.startswith("underdamped") else 1) and bool(
        info.is_accepted
    )
    # a vmapped run over chains (and over a hyper-parameter, where there is one): keys from fold_in,
    # no reuse
    keys = jax.random.split(jax.random.key(4), 3)
    hyper_batch = tuple(jnp.full(3, v) for v in hyper)
    run = jax.jit(jax.vmap(lambda k, *hp: mcmc.run_chain(kernel, k, state, 12, *hp)[1]))
    positions = run(keys, *hyper_batch)
    chex.assert_shape(positions, (3, 12, 2))
    chex.assert_tree_all_finite(positions)
    np.testing.assert_array_equal(positions, run(keys, *hyper_batch))


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: mcmc.walk_jump(gaussian_smoothed_score).step(
                jax.random.key(0), mcmc.WalkState(jnp.zeros(2)), 0.0, 0.5
            ),
            "step_size must be positive",
        ),
        (
            lambda: mcmc.walk_jump(gaussian_smoothed_score).step(
                jax.random.key(0), mcmc.WalkState(jnp.zeros(2)), 0.1, -1.0
            ),
            "sigma must be positive",
        ),
        (
            lambda: mcmc.jump(gaussian_smoothed_score, None, jnp.zeros(2), 0.0),
            "sigma must be positive",
        ),
        (
            lambda: mcmc.chain_of_log_concave_chains(gaussian_smoothed_score, 0),
            "steps_per_measurement",
        ),
        (
            lambda: mcmc.chain_of_log_concave_chains(gaussian_smoothed_score, 2).step(
                jax.random.key(0),
                mcmc.chain_of_log_concave_chains(gaussian_smoothed_score, 2).init(jnp.zeros(2)),
                0.1,
                0.0,
            ),
            "sigma must be positive",
        ),
        # inside jit the shape check still fires while tracing, before anything compiles
        (
            lambda: jax.jit(mcmc.walk_jump(mcmc.monte_carlo_smoothed_score(lambda x: x, 8)).step)(
                jax.random.key(0), mcmc.WalkState(jnp.zeros(2)), 0.1, 0.5
            ),
            "logdensity_fn must return a real scalar",
        ),
    ],
)
def test_bad_arguments_raise_before_compiling(call, match):
    with pytest.raises(ValueError, match=match):
        call()
