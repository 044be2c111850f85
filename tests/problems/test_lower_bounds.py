"""Tests for the lower-bound finite sums: optima, validation, transformations, and rates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import problems, shuffling

BUILDERS = {
    "piecewise_kappa8": lambda n: problems.piecewise_quadratic(n, mu=1.0, smoothness=8.0),
    "piecewise_scaled": lambda n: problems.piecewise_quadratic(
        n, mu=0.5, smoothness=3.0, noise=2.5
    ),
    "safran_shamir_ss": lambda n: problems.safran_shamir_quadratic(
        n, construction="single_shuffle"
    ),
    "safran_shamir_rr": lambda n: problems.safran_shamir_quadratic(
        n, lam=2.0, lam_max=7.0, noise=0.3, construction="random_reshuffle"
    ),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("n", [2, 16, 50])
def test_optimum_is_exact(x64, name, n):
    problem = BUILDERS[name](n)
    x_star = problem.x_star
    assert x_star.dtype == jnp.float64
    np.testing.assert_allclose(problem.gradient(x_star), 0.0, atol=1e-10)
    np.testing.assert_allclose(problem.loss(x_star), problem.f_star, atol=1e-12)
    rng = np.random.default_rng(0)
    for scale in (1e-6, 1e-3, 1.0):
        for _ in range(8):
            nearby = x_star + scale * rng.standard_normal(x_star.shape)
            assert problem.suboptimality(nearby) >= -1e-15


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_mu_and_smoothness_hold(x64, name):
    """F is mu-strongly convex and each f_i has an L-Lipschitz gradient, on random pairs."""
    problem = BUILDERS[name](8)
    mu, lip = float(problem.mu), float(problem.smoothness)
    rng = np.random.default_rng(1)
    d = problem.x_star.shape[0]
    x, y = rng.standard_normal((2, 200, d)) * 3.0
    f = jax.vmap(problem.loss)
    g = jax.vmap(problem.gradient)
    lower = f(x) + jnp.sum(g(x) * (y - x), axis=1) + 0.5 * mu * jnp.sum((y - x) ** 2, axis=1)
    assert np.all(np.asarray(f(y)) >= np.asarray(lower) - 1e-12)
    component_grad = jax.vmap(jax.vmap(jax.grad(problem.component_loss), (0, None)), (None, 0))
    gx, gy = component_grad(x, problem.data), component_grad(y, problem.data)  # [n, 200, d]
    ratio = jnp.linalg.norm(gx - gy, axis=-1) / jnp.linalg.norm(x - y, axis=-1)
    assert float(ratio.max()) <= lip * (1 + 1e-12)


def test_piecewise_values_and_gradients(x64):
    problem = problems.piecewise_quadratic(4, mu=1.0, smoothness=8.0, noise=2.0)
    assert problem.x_star.shape == (1,)
    assert float(problem.f_star) == 0.0
    assert (float(problem.mu), float(problem.smoothness)) == (1.0, 8.0)
    grad = jax.grad(problem.component_loss)
    example = problem.examples(jnp.array([0, 3]))
    first = jax.tree.map(lambda leaf: leaf[0], example)  # sign +1
    last = jax.tree.map(lambda leaf: leaf[1], example)  # sign -1
    np.testing.assert_allclose(grad(jnp.array([-0.5]), first), [8.0 * -0.5 + 2.0])
    np.testing.assert_allclose(grad(jnp.array([0.5]), first), [0.5 + 2.0])
    np.testing.assert_allclose(grad(jnp.array([0.5]), last), [0.5 - 2.0])
    np.testing.assert_allclose(grad(jnp.array([0.0]), last), [-2.0])
    np.testing.assert_allclose(problem.loss(jnp.array([-1.0])), 4.0)
    np.testing.assert_allclose(problem.loss(jnp.array([1.0])), 0.5)


def test_safran_shamir_constants(x64):
    ss = problems.safran_shamir_quadratic(6, lam=2.0, lam_max=7.0, construction="single_shuffle")
    rr = problems.safran_shamir_quadratic(6, lam=2.0, lam_max=7.0, construction="random_reshuffle")
    assert (float(ss.mu), float(ss.smoothness)) == (2.0, 7.0)
    assert (float(rr.mu), float(rr.smoothness)) == (2.0, 7.0)
    np.testing.assert_array_equal(ss.x_star, [0.0, 0.0])
    x = jnp.array([0.3, -1.2])
    np.testing.assert_allclose(ss.loss(x), 0.5 * 2.0 * 0.09 + 0.5 * 7.0 * 1.44)
    np.testing.assert_allclose(rr.loss(x), 0.5 * 2.0 * 0.09 + 0.25 * 7.0 * 1.44)
    wide = problems.safran_shamir_quadratic(
        6, lam=5.0, lam_max=6.0, construction="random_reshuffle"
    )
    assert float(wide.mu) == 3.0  # min(lam, lam_max / 2)


@pytest.mark.parametrize(
    "builder, kwargs, field",
    [
        (problems.piecewise_quadratic, {"n": 7}, "n"),
        (problems.piecewise_quadratic, {"n": 0}, "n"),
        (problems.piecewise_quadratic, {"n": -4}, "n"),
        (problems.piecewise_quadratic, {"n": 8.0}, "n"),
        (problems.piecewise_quadratic, {"n": True}, "n"),
        (problems.piecewise_quadratic, {"n": 8, "mu": 0.0}, "mu"),
        (problems.piecewise_quadratic, {"n": 8, "mu": float("nan")}, "mu"),
        (problems.piecewise_quadratic, {"n": 8, "smoothness": -1.0}, "smoothness"),
        (problems.piecewise_quadratic, {"n": 8, "mu": 2.0, "smoothness": 1.0}, "smoothness"),
        (problems.piecewise_quadratic, {"n": 8, "noise": 0.0}, "noise"),
        (problems.safran_shamir_quadratic, {"n": 5}, "n"),
        (problems.safran_shamir_quadratic, {"n": 8, "lam": -1.0}, "lam"),
        (problems.safran_shamir_quadratic, {"n": 8, "lam_max": 0.0}, "lam_max"),
        (problems.safran_shamir_quadratic, {"n": 8, "noise": float("inf")}, "noise"),
        (problems.safran_shamir_quadratic, {"n": 8, "construction": "rr"}, "construction"),
    ],
)
def test_bad_arguments_raise(builder, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        builder(**kwargs)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_jit_and_vmap(x64, name):
    problem = BUILDERS[name](10)
    d = problem.x_star.shape[0]
    xs = jnp.asarray(np.random.default_rng(2).standard_normal((5, d)))
    eager = np.array([problem.loss(x) for x in xs])
    np.testing.assert_allclose(jax.vmap(problem.loss)(xs), eager, rtol=1e-14)
    np.testing.assert_allclose(jax.jit(jax.vmap(problem.loss))(xs), eager, rtol=1e-14)
    # The problem is a pytree: it can be a (traced) argument of a jitted function.
    grad_fn = jax.jit(lambda p, x: p.gradient(x))
    np.testing.assert_allclose(grad_fn(problem, xs[0]), problem.gradient(xs[0]), rtol=1e-14)
    losses = jax.jit(lambda p, x: p.component_losses(x))(problem, xs[0])
    assert losses.shape == (10,)


# --------------------------------------------------------------------- rate check
#
# Measured (float64, eta = theory_step_size(c=3), x0 = x* + 1, mean of f(x_K) - f*) on
# piecewise_quadratic(mu=1, smoothness=8, noise=1); slopes of log(subopt / log(nK)^2), the
# log^2 being the step size's own factor, spread over independent seed sets:
#   RR, n=16, K in 32..512, 16 seeds (25 sets):      K-slope -2.07 +- 0.075 sd, [-2.24, -1.91]
#   RR, K=128, n in 8..64, 32 seeds (20 sets):       n-slope -1.06 +- 0.11 sd,  [-1.28, -0.85]
#   GraB mean-balance, same sweep (20 sets):         n-slope -2.12 +- 0.033 sd, [-2.19, -2.06]
# Every bound below is >= 4 sd of that spread away from the measured mean.


def _mean_final_suboptimality(problem, scheme, Ks, num_seeds, seed):
    run = shuffling.make_sgd_run(
        problem, shuffling.make_scheme(scheme, problem.num_examples), num_epochs=int(max(Ks))
    )
    lrs = jnp.array([shuffling.theory_step_size(problem, int(K), c=3.0) for K in Ks])
    keys = jax.random.split(jax.random.key(seed), num_seeds)
    sweep = jax.vmap(jax.vmap(run, in_axes=(None, None, 0)), in_axes=(0, None, None))
    result = jax.jit(sweep)(keys, problem.x_star + 1.0, lrs)
    assert int(jnp.max(result.diverged_epoch)) == -1
    subopt = np.asarray(result.suboptimality)
    return np.array([subopt[:, i, K - 1].mean() for i, K in enumerate(Ks)])


def _log_corrected_slope(x, n_times_k, values):
    return np.polyfit(np.log(x), np.log(values / np.log(n_times_k) ** 2), 1)[0]


@pytest.mark.slow
def test_piecewise_rates_rr_vs_grab(x64):
    Ks = np.array([32, 64, 128, 256, 512])
    rr_k = _mean_final_suboptimality(
        problems.piecewise_quadratic(16), "random_reshuffle", Ks, num_seeds=16, seed=0
    )
    rr_k_slope = _log_corrected_slope(Ks, 16 * Ks, rr_k)
    assert abs(rr_k_slope + 2.0) < 0.4, rr_k_slope

    ns, K = np.array([8, 16, 32, 64]), 128
    slopes = {}
    for scheme in ("random_reshuffle", "grab_mean_balance"):
        values = np.array(
            [
                _mean_final_suboptimality(
                    problems.piecewise_quadratic(int(n)), scheme, [K], num_seeds=32, seed=1
                )[0]
                for n in ns
            ]
        )
        slopes[scheme] = _log_corrected_slope(ns, ns * K, values)
    assert -1.6 < slopes["random_reshuffle"] < -0.4, slopes
    assert -2.5 < slopes["grab_mean_balance"] < -1.7, slopes
    assert slopes["grab_mean_balance"] < slopes["random_reshuffle"] - 0.4, slopes
