"""The ensemble smoothed score and the ensemble walk: the estimate against the closed-form
smoothed score (its 1/N mean squared error, its standard errors, the fresh-draw estimate as
its one-point special case), the walk's stationary moments on a Gaussian (closed-form ULA law
with the estimate's noise) and on a two-mode mixture (against the exact-score walk), the exact
density-evaluation count, tracing, divergence and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc, problems
from shufflesgd.mcmc.ensemble import (
    EnsembleInfo,
    EnsembleState,
    ensemble_smoothed_score,
    ensemble_walk_jump,
)
from support.smoothing_targets import MEAN, S2, gaussian_logdensity, gaussian_smoothed_score


def test_coinciding_members_give_the_fresh_draw_estimate(x64):
    """All members at y: the proposal mixture is N(y, sigma^2 I) itself, so the estimate is
    importance_smoothed_score's with M = N and the same draws, to rounding."""
    y, sigma, n = jnp.array([0.3, -0.2]), 0.7, 64
    key = jax.random.key(0)
    same_draws = jax.random.clone(key)

    @jax.jit
    def both(key, same_draws):
        members = jnp.broadcast_to(y, (n, 2))
        return (
            ensemble_smoothed_score(gaussian_logdensity, key, members, sigma),
            mcmc.importance_smoothed_score(gaussian_logdensity, same_draws, y, sigma, n),
        )

    ensemble, fresh = both(key, same_draws)
    np.testing.assert_allclose(ensemble.score, jnp.broadcast_to(fresh.score, (n, 2)), atol=1e-12)
    np.testing.assert_allclose(ensemble.standard_error[0], fresh.standard_error, atol=1e-12)
    np.testing.assert_allclose(ensemble.effective_sample_size[0], fresh.effective_sample_size)


def test_ensemble_score_mean_squared_error_decreases_like_one_over_n(x64):
    """Target N(m, s^2 I), ensembles of N i.i.d. draws of p_sigma (a walk at stationarity),
    16 independent replicates per N: the mean squared error against the closed-form smoothed
    score falls by 16 from N = 64 to 1024 (the 1/sqrt(N) rate of the error; within 4 standard
    errors of the replicate means, in log scale), the reported standard errors fall as
    1/sqrt(N) as well, and they do not understate the error (the stratified draws make the
    plug-in conservative)."""
    sigma, replicates = 0.7, 16
    tau2 = S2 + sigma**2

    def replicate(key, n):
        ensemble_key, score_key = jax.random.split(key)
        ensemble = MEAN + math.sqrt(tau2) * jax.random.normal(ensemble_key, (n, 2))
        est = ensemble_smoothed_score(gaussian_logdensity, score_key, ensemble, sigma)
        truth = gaussian_smoothed_score(None, ensemble, sigma)
        return jnp.mean((est.score - truth) ** 2), jnp.mean(est.standard_error**2)

    stats = {}
    for i, n in enumerate((64, 1024)):
        keys = jax.random.split(jax.random.key(i), replicates)
        mse, se2 = jax.jit(jax.vmap(lambda k, n=n: replicate(k, n)))(keys)
        mse, se2 = np.asarray(mse), np.asarray(se2)
        rse = mse.std(ddof=1) / math.sqrt(replicates) / mse.mean()
        assert mse.mean() < se2.mean() * (1 + 4 * rse), (n, mse.mean(), se2.mean())
        stats[n] = (mse.mean(), rse, se2.mean())
    log_ratio = math.log(stats[64][0] / stats[1024][0])
    tolerance = 4 * math.hypot(stats[64][1], stats[1024][1])
    assert abs(log_ratio - math.log(16)) < tolerance, (math.exp(log_ratio), tolerance)
    np.testing.assert_allclose(stats[64][2] / stats[1024][2], 16, rtol=0.1)


def assert_moments(a, b=None, mean_b=None, var_b=None):
    """Mean and second central moment (about ``mean_b``, else ``b``'s mean) per coordinate of
    the draws ``a`` ``[chains, draws, d]`` against those of the draws ``b`` (same shape) or the
    values ``mean_b, var_b``, within 4 ESS-based standard errors (of both, when both are
    draws)."""
    runs = [np.asarray(x, np.float64) for x in ((a,) if b is None else (a, b))]
    centre = np.asarray(mean_b) if mean_b is not None else runs[1].mean(axis=(0, 1))
    series = np.concatenate([f for x in runs for f in (x, (x - centre) ** 2)], axis=-1)
    ess = np.asarray(jax.jit(mcmc.effective_sample_size)(series))  # one compiled call
    means = series.mean(axis=(0, 1))
    ses = series.std(axis=(0, 1)) / np.sqrt(ess)
    d = runs[0].shape[-1]
    m_a, v_a, se_m_a, se_v_a = means[:d], means[d : 2 * d], ses[:d], ses[d : 2 * d]
    if b is None:
        m_b, v_b, se_m_b, se_v_b = mean_b, var_b, 0.0, 0.0
    else:
        m_b, v_b = means[2 * d : 3 * d], means[3 * d :]
        se_m_b, se_v_b = ses[2 * d : 3 * d], ses[3 * d :]
    np.testing.assert_array_less(np.abs(m_a - m_b), 4 * np.hypot(se_m_a, se_m_b))
    np.testing.assert_array_less(np.abs(v_a - v_b), 4 * np.hypot(se_v_a, se_v_b))


def test_ensemble_walk_on_a_gaussian_matches_the_ula_law_with_the_estimate_noise(x64):
    """Target N(m, s^2 I), sigma = 0.5: with the exact score the walk is ULA on N(m, tau^2 I),
    stationary variance 2h / (1 - (1 - h/tau^2)^2); a score noise of variance v per coordinate
    adds h^2 v to the numerator, v = Var[x | y] / (sigma^4 ESS) with the posterior variance
    s^2 sigma^2 / tau^2 and the mean ESS the infos report.  512 members x 500 steps from the
    ULA law (with 512 members the estimate's O(1/N) bias is below the errors); ESS-based
    errors."""
    sigma, h, n, steps = 0.5, 0.05, 512, 500
    tau2 = S2 + sigma**2
    contraction = 1 - (1 - h / tau2) ** 2
    kernel = ensemble_walk_jump(gaussian_logdensity)
    start = MEAN + math.sqrt(2 * h / contraction) * jax.random.normal(jax.random.key(0), (n, 2))
    run = jax.jit(lambda k, s: mcmc.run_chain(kernel, k, kernel.init(s), steps, h, sigma))
    _, ys, infos = run(jax.random.key(1), start)
    assert int(infos.num_density_evals.sum()) == n * steps and int(infos.num_grad_evals.sum()) == 0
    assert int(mcmc.first_nonfinite_step(infos)) == -1
    noise = S2 * sigma**2 / tau2 / sigma**4 / float(jnp.mean(infos.effective_sample_size))
    variance = (2 * h + h**2 * noise) / contraction
    assert_moments(jnp.swapaxes(ys, 0, 1), mean_b=np.asarray(MEAN), var_b=variance)


def test_ensemble_walk_on_a_two_mode_mixture_matches_the_exact_score_walk(x64):
    """Two-mode 2-D mixture, sigma = 0.6, h = 0.05: the ensemble walk (256 members) and the
    walk with the exact smoothed score (256 chains), both started from p_sigma, have the same
    ULA law up to the estimate's noise, whose inflation of the variance (about h v / 2 kappa,
    v ~ 1 / (sigma^2 ESS) with the mean ESS ~ 40 here, kappa ~ 1 the curvature: ~1e-3) is
    below a tenth of the standard errors; means and variances agree within 4 ESS-based
    standard errors of both runs."""
    sigma, h, n, steps = 0.6, 0.05, 256, 300
    mixture = problems.gaussian_mixture(
        [0.4, 0.6],
        [[-1.5, 0.0], [1.5, 0.5]],
        [[[0.3, 0.0], [0.0, 0.3]], [[0.5, 0.1], [0.1, 0.4]]],
    )
    kernel = ensemble_walk_jump(mixture.log_prob)
    exact = mcmc.walk_jump(mcmc.mixture_smoothed_score(mixture))

    @jax.jit
    def both(key):
        start_key, noise_key, ensemble_key, exact_key = jax.random.split(key, 4)
        start = mixture.sample(start_key, n) + sigma * jax.random.normal(noise_key, (n, 2))
        _, ys, infos = mcmc.run_chain(kernel, ensemble_key, kernel.init(start), steps, h, sigma)
        exact_ys = jax.vmap(
            lambda k, y: mcmc.run_chain(exact, k, exact.init(y), steps, h, sigma)[1]
        )(jax.random.split(exact_key, n), start)
        return ys, exact_ys, infos

    ys, exact_ys, infos = both(jax.random.key(2))
    assert float(jnp.mean(infos.effective_sample_size)) > 20
    assert_moments(jnp.swapaxes(ys, 0, 1), exact_ys)


def test_density_evaluations_are_counted_exactly():
    """A log-density that reports each call: one call per member and step, as info says."""
    calls = []

    def logdensity(x):
        jax.debug.callback(lambda v: calls.append(v.shape), x)
        return gaussian_logdensity(x)

    n, steps = 5, 3
    kernel = ensemble_walk_jump(logdensity)
    _, _, infos = jax.jit(
        lambda k: mcmc.run_chain(kernel, k, kernel.init(jnp.zeros((n, 2))), steps, 0.1, 0.5)
    )(jax.random.key(0))
    jax.effects_barrier()
    assert len(calls) == n * steps == int(infos.num_density_evals.sum())
    assert all(shape == (2,) for shape in calls)


def test_one_program_for_every_step_size_and_sigma_vmap_over_chains():
    kernel = ensemble_walk_jump(gaussian_logdensity)
    traces = []

    @jax.jit
    def step(key, state, h, sigma):
        traces.append(None)
        return kernel.step(key, state, h, sigma)

    state = kernel.init(jnp.zeros((8, 2)))
    for i, (h, sigma) in enumerate([(0.1, 0.5), (0.05, 1.0)]):
        new, info = step(jax.random.key(i), state, h, sigma)
        assert isinstance(new, EnsembleState) and isinstance(info, EnsembleInfo)
        assert bool(info.is_finite) and info.effective_sample_size.shape == (8,)
    assert len(traces) == 1
    chains = jax.jit(jax.vmap(lambda k, s: kernel.step(k, s, 0.1, 0.5)[0]))
    states = jax.vmap(kernel.init)(jnp.zeros((3, 8, 2)))
    out = chains(jax.random.split(jax.random.key(5), 3), states)
    again = chains(jax.random.split(jax.random.key(5), 3), states)
    assert out.position.shape == (3, 8, 2)
    np.testing.assert_array_equal(out.position, again.position)


def test_a_nonfinite_density_is_reported():
    """The estimate is bounded by the spread of its draws, so the walk does not overflow at a
    large step; a log-density that is NaN outside the ball of radius 3 turns the state
    non-finite at the first step whose draws leave it (step 1 here: step 0 draws within
    0.5 sd of the origin, then a step of h = 20 throws the members out)."""

    def logdensity(x):
        return gaussian_logdensity(x) + jnp.log(9.0 - x @ x)

    kernel = ensemble_walk_jump(logdensity)
    _, _, infos = mcmc.run_chain(
        kernel, jax.random.key(0), kernel.init(jnp.zeros((16, 2))), 5, 20.0, 0.5
    )
    assert int(mcmc.first_nonfinite_step(infos)) == 1
    assert not bool(infos.is_finite[-1])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: ensemble_walk_jump(gaussian_logdensity).init(jnp.zeros(2)),
            ValueError,
            "position must be a \\[num_particles, d\\]",
        ),
        (
            lambda: ensemble_walk_jump(gaussian_logdensity).init(jnp.zeros((4, 2), jnp.int32)),
            TypeError,
            "position must be a float",
        ),
        (
            lambda: ensemble_smoothed_score(
                gaussian_logdensity, jax.random.key(0), jnp.zeros((4, 2)), 0.0
            ),
            ValueError,
            "sigma must be positive",
        ),
        (
            lambda: ensemble_smoothed_score(lambda x: x, jax.random.key(0), jnp.zeros((4, 2)), 0.5),
            ValueError,
            "logdensity_fn must return a real scalar",
        ),
        (
            lambda: ensemble_smoothed_score(
                lambda x: x @ jnp.ones(3), jax.random.key(0), jnp.zeros((4, 2)), 0.5
            ),
            ValueError,
            "logdensity_fn cannot be evaluated",
        ),
        (
            lambda: ensemble_walk_jump(gaussian_logdensity).step(
                jax.random.key(0), EnsembleState(jnp.zeros((4, 2))), -0.1, 0.5
            ),
            ValueError,
            "step_size must be positive",
        ),
        (
            lambda: ensemble_walk_jump(gaussian_logdensity).step(
                1, EnsembleState(jnp.zeros((4, 2))), 0.1, 0.5
            ),
            TypeError,
            "key must be a PRNG key",
        ),
    ],
)
def test_bad_arguments_raise_before_compiling(call, error, match):
    with pytest.raises(error, match=match):
        call()
