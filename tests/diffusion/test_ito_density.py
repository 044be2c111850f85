"""The Itô density estimator judged against exact log-densities of Gaussian mixtures: its error
shrinks with the steps at a measured order under VP and EDM, its bias vanishes on a Gaussian
target although it drops the Laplacian that the ordinary chain rule would keep (an O(10)-nat
offset there), its path is Euler–Maruyama's, and it is deterministic, vmappable and checks its
arguments before tracing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion, problems

STEPS = (25, 50, 100, 200)
PATHS = 256

MIXTURE = problems.gaussian_mixture(
    [0.3, 0.7],
    [[-2.0, 0.0], [2.0, 1.0]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.4, -0.15], [-0.15, 0.3]]],
).eigen()

# One correlated Gaussian, written as two identical halves so that it has the mixture's shapes
# and every compiled program below serves both targets.
GAUSSIAN = problems.gaussian_mixture(
    [0.5, 0.5], [[1.0, -0.5], [1.0, -0.5]], [[[2.0, 0.3], [0.3, 0.5]]] * 2
).eigen()

PROCESSES = {"vp": "uniform_time", "edm": "karras"}


def exact_model(sde, law):
    return diffusion.Model(lambda x, t: law.score(x, sde.alpha(t), sde.sigma(t)), "score")


@functools.cache
def runner(sde_name):
    """``(law, noise, x_T, grid) -> (x, log q-hat, exact log q_{t_N}(x), info)`` over paths,
    compiled once per process and grid length (the law is an argument)."""
    sde = diffusion.make_sde(sde_name)

    @jax.jit
    def run(law, noise, x_T, grid):
        def one(z, x):
            return diffusion.reverse_sde_log_density(
                None, exact_model(sde, law), sde, x, grid, noise=z
            )

        x, log_density, info = jax.vmap(one)(noise, x_T)
        t_end = grid[-1]
        exact = jax.vmap(lambda y: law.log_prob(y, sde.alpha(t_end), sde.sigma(t_end)))(x)
        return x, log_density, exact, info

    return sde, run


def errors(sde_name, law, seed=0):
    """Signed errors log q-hat - log q_{t_N}(x) over PATHS paths for each number of steps."""
    sde, run = runner(sde_name)
    rng = np.random.default_rng(seed)
    x_T = (sde.prior_std * rng.standard_normal((PATHS, 2))).astype(np.float32)
    out = []
    for n in STEPS:
        grid = jnp.asarray(diffusion.time_grid(sde, PROCESSES[sde_name], n), jnp.float32)
        noise = rng.standard_normal((PATHS, n, 1, 2)).astype(np.float32)
        _, log_density, exact, info = run(law, noise, x_T, grid)
        assert np.all(np.asarray(info.nfe) == n) and np.all(np.asarray(info.nonfinite_step) == -1)
        out.append(np.asarray(log_density - exact, np.float64))
    return out


@pytest.mark.parametrize("sde_name", sorted(PROCESSES))
def test_error_shrinks_with_the_steps_at_a_measured_order(sde_name):
    """Mean |log q-hat - log q_{t_min}(x)| over 256 paths at 25/50/100/200 Euler–Maruyama
    steps: decreasing, with a log-log slope clearly positive (strong order 1/2 is expected from
    the mean-zero second-order terms of each increment, and the bias decays like order 1)."""
    mean_abs = [np.mean(np.abs(e)) for e in errors(sde_name, MIXTURE)]
    slope = -np.polyfit(np.log(STEPS), np.log(mean_abs), 1)[0]
    assert np.all(np.diff(mean_abs) < 0), mean_abs
    assert slope > 0.4, (slope, mean_abs)


def test_no_laplacian_on_a_gaussian_target():
    """On a Gaussian, Delta log q_t = -tr(C_t^-1) is known exactly.  The ordinary chain rule
    (Fokker–Planck's d/dt log q, Laplacian included, plus <s, dx>) would exceed the Itô
    estimate by sum 1/2 g^2 Delta log q dt > 0, several nats on VP; the estimate's bias (mean
    signed error against the exact log-density) instead shrinks with the steps to a small
    fraction of that and to within Monte Carlo error of zero, so the Laplacian terms of Itô's
    formula and of Fokker–Planck do cancel."""
    sde_name = "vp"
    sde = diffusion.make_sde(sde_name)
    signed = errors(sde_name, GAUSSIAN, seed=1)
    bias = [np.mean(e) for e in signed]
    se = [np.std(e) / np.sqrt(PATHS) for e in signed]
    grid = diffusion.time_grid(sde, PROCESSES[sde_name], STEPS[-1])
    eigvals = np.asarray(GAUSSIAN.eigvals[0], np.float64)
    alpha, sigma = np.asarray(sde.alpha(grid[:-1])), np.asarray(sde.sigma(grid[:-1]))
    laplacian = -np.sum(1.0 / (alpha[:, None] ** 2 * eigvals + sigma[:, None] ** 2), axis=1)
    chain_rule_offset = np.sum(
        0.5 * np.asarray(sde.diffusion_squared(grid[:-1])) * laplacian * np.diff(grid)
    )
    assert chain_rule_offset > 5.0, chain_rule_offset
    assert abs(bias[-1]) < 0.05 * chain_rule_offset, (bias, chain_rule_offset)
    assert abs(bias[-1]) < abs(bias[0]) / 3, bias
    assert abs(bias[-1]) < 0.1 + 4 * se[-1], (bias, se)


KEYED = diffusion.make_sde("vp")
KEYED_GRID = jnp.asarray(diffusion.time_grid(KEYED, "uniform_time", 40), jnp.float32)
KEYED_MODEL = exact_model(KEYED, MIXTURE)


@jax.jit
def keyed_batch(key, x_T):
    """The estimator over rows with key fold_in(key, i), and Euler–Maruyama with the same keys."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x_T.shape[0]))
    ito = jax.vmap(
        lambda k, x: diffusion.reverse_sde_log_density(k, KEYED_MODEL, KEYED, x, KEYED_GRID)
    )(keys, x_T)
    em, _ = jax.vmap(
        lambda k, x: diffusion.euler_maruyama(k, KEYED_MODEL, KEYED, x, KEYED_GRID, final="none")
    )(keys, x_T)
    return ito, em


def test_keys_vmap_and_the_euler_maruyama_path():
    """Same key, same bits; each vmapped row equals its own unbatched run; the path is
    Euler–Maruyama's (same draws); one evaluation a step."""
    x_T = jnp.asarray(np.random.default_rng(2).standard_normal((4, 2)), jnp.float32)
    key = jax.random.key(3)
    (x, log_density, info), em = keyed_batch(key, x_T)
    (x_again, log_density_again, _), _ = keyed_batch(key, x_T)
    np.testing.assert_array_equal(x, x_again)
    np.testing.assert_array_equal(log_density, log_density_again)
    np.testing.assert_allclose(x, em, rtol=1e-6, atol=1e-6)
    single = jax.jit(
        lambda k, x: diffusion.reverse_sde_log_density(k, KEYED_MODEL, KEYED, x, KEYED_GRID)
    )
    for i in (0, 3):
        x_i, log_density_i, info_i = single(jax.random.fold_in(key, i), x_T[i])
        np.testing.assert_allclose(x_i, x[i], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(log_density_i, log_density[i], rtol=1e-6, atol=1e-5)
        assert int(info_i.nfe) == 40 and int(info_i.nonfinite_step) == -1
    assert np.all(np.asarray(info.nfe) == 40)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(grid=jnp.array([0.5, 1.0])), ValueError, "strictly decreasing"),
        (dict(grid=jnp.array([1.0])), ValueError, "at least two times"),
        (dict(key=0), TypeError, "key must be a PRNG key"),
        (dict(x_T=jnp.ones(2, jnp.int32)), TypeError, "x must be a float array"),
        (dict(noise=jnp.zeros((3, 1, 2))), ValueError, "noise must have shape"),
    ],
)
def test_bad_arguments_raise_before_tracing(kwargs, error, match):
    arguments = dict(
        key=jax.random.key(0), x_T=jnp.ones(2), grid=jnp.array([1.0, 0.5, 0.1]), noise=None
    )
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        diffusion.reverse_sde_log_density(
            arguments["key"],
            KEYED_MODEL,
            KEYED,
            arguments["x_T"],
            arguments["grid"],
            noise=arguments["noise"],
        )


def test_increment_is_the_formula():
    """One increment against the formula written out: <s, dx> + (-d f - f <x, s> +
    g^2 |s|^2 / 2) dt, with dt = t_next - t < 0."""
    sde = diffusion.make_sde("vp")
    x, x_next = jnp.array([0.3, -1.2]), jnp.array([0.1, -0.9])
    s = jnp.array([0.7, 0.2])
    t, t_next = 0.6, 0.55
    f, g2 = float(sde.drift_coefficient(t)), float(sde.diffusion_squared(t))
    expected = float(s @ (x_next - x)) + (-2 * f - f * float(x @ s) + 0.5 * g2 * float(s @ s)) * (
        t_next - t
    )
    got = diffusion.ito_log_density_increment(sde, s, x, x_next, t, t_next)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
