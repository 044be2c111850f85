"""SuperDiff with exact models of Gaussian mixtures.  OR: the samples have the mixture's
component masses, mean and covariance within Monte Carlo error, and the weights are the exact
posterior responsibilities along the path, closer with more steps.  AND: the exact log-density
gap of two Gaussians stays at its initial value (equal covariances) or moves by the curvature
term that the projected noise leaves uncancelled (unequal ones), far less than with plain
averaging; three models keep three estimates equal.  Keys, vmap, the final denoising step and
argument errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion, problems

SDE = diffusion.make_sde("vp")

P1 = problems.gaussian_mixture([0.5, 0.5], [[-2.0, 1.5], [2.0, 1.5]], [np.eye(2) * 0.3] * 2)
P2 = problems.gaussian_mixture(
    [0.4, 0.6], [[0.0, -2.0], [1.5, 0.0]], [[[0.3, 0.1], [0.1, 0.2]], np.eye(2) * 0.25]
)
MIXTURES = (P1.eigen(), P2.eigen())

EQUAL = tuple(
    problems.gaussian_mixture([1.0], [mean], [[[0.6, 0.2], [0.2, 0.5]]]).eigen()
    for mean in ([-1.0, 0.0], [1.0, 1.0])
)
UNEQUAL = tuple(
    problems.gaussian_mixture([1.0], [mean], [cov]).eigen()
    for mean, cov in (
        ([-1.0, 0.0], [[1.0, 0.3], [0.3, 0.6]]),
        ([1.0, 1.0], [[0.5, 0.0], [0.0, 1.0]]),
    )
)
THREE = tuple(
    problems.gaussian_mixture([1.0], [mean], [np.eye(2) * var]).eigen()
    for mean, var in (([-1.0, 0.0], 0.5), ([1.0, 1.0], 0.8), ([0.5, -1.5], 0.6))
)


def exact_models(laws):
    return [
        diffusion.Model(lambda x, t, law=law: law.score(x, SDE.alpha(t), SDE.sigma(t)), "score")
        for law in laws
    ]


def grid(n):
    return jnp.asarray(diffusion.time_grid(SDE, "uniform_time", n), jnp.float32)


@functools.partial(jax.jit, static_argnames="mode")
def run(laws, noise, x_T, grid, log_w, *, mode):
    """SuperDiff over paths with explicit noise; the laws and weights are arguments, so one
    program serves every pair of laws of the same shapes."""

    def one(z, x):
        return diffusion.superdiff(
            None, exact_models(laws), SDE, x, grid, mode=mode, log_mixture_weights=log_w, noise=z
        )

    return jax.vmap(one)(noise, x_T)


@jax.jit
def replay_step(laws, x, kappa, z, t, t_next):
    """One Euler–Maruyama step of sum_i kappa_i s_i with exact scores, written out here
    independently of the library, and at the step's start point x: the exact log q^i_t(x)
    [P, M] and, with d the unit vector along s_1 - s_M, d^T (Hessian of log q^i_t) d [P, M]."""
    a, s = SDE.alpha(t), SDE.sigma(t)
    scores, log_q, hessians = [], [], []
    for law in laws:
        log_prob = functools.partial(law.log_prob, alpha=a, sigma=s)
        scores.append(jax.vmap(jax.grad(log_prob))(x))
        log_q.append(jax.vmap(log_prob)(x))
        hessians.append(jax.vmap(jax.hessian(log_prob))(x))
    scores, log_q, hessians = jnp.stack(scores, 1), jnp.stack(log_q, 1), jnp.stack(hessians, 1)
    # s_M + sum_{i<M} kappa_i (s_i - s_M): the AND weights are large and of opposite signs
    last = scores[:, -1]
    combined = last + jnp.einsum("pm,pmd->pd", kappa[:, :-1], scores[:, :-1] - last[:, None])
    dt = t_next - t
    g2 = SDE.diffusion_squared(t)
    x_next = x + (SDE.drift_coefficient(t) * x - g2 * combined) * dt + jnp.sqrt(g2 * -dt) * z
    d = scores[:, 0] - last
    d = d / jnp.linalg.norm(d, axis=1, keepdims=True)
    return x_next, log_q, jnp.einsum("pi,pmij,pj->pm", d, hessians, d)


def replay(laws, x_T, kappa, noise, times):
    """The path of SuperDiff given its weights: the final state, the exact log q^i at every
    point [P, N + 1, M] and the uncancelled Itô term 1/2 g^2 |dt| d^T H_i d of each step
    [P, N, M]."""
    x, logs, curvature = x_T, [], []
    half_g2_dt = 0.5 * np.asarray(SDE.diffusion_squared(times[:-1])) * -np.diff(times)
    for i in range(len(times) - 1):
        x, log_q, c = replay_step(laws, x, kappa[:, i], noise[:, i, 0], times[i], times[i + 1])
        logs.append(log_q)
        curvature.append(half_g2_dt[i] * np.asarray(c))
    logs.append(replay_step(laws, x, kappa[:, -1], noise[:, -1, 0], times[-1], times[-1])[1])
    return np.asarray(x), np.stack(logs, 1), np.stack(curvature, 1)


@functools.cache
def or_run(n, weights=(0.5, 0.5), paths=512):
    rng = np.random.default_rng(n)
    x_T = rng.standard_normal((paths, 2)).astype(np.float32)
    noise = rng.standard_normal((paths, n, 1, 2)).astype(np.float32)
    log_w = jnp.log(jnp.asarray(weights, jnp.float32))
    x, info = run(MIXTURES, noise, x_T, grid(n), log_w, mode="or")
    return x_T, noise, np.asarray(x), info, log_w


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def exact_mixture(weights):
    """The target sum_i w_i p_i diffused to t_min, as NumPy (masses, means, covariances) of all
    its components."""
    laws = (P1, P2)
    alpha, sigma = float(SDE.alpha(SDE.t_min)), float(SDE.sigma(SDE.t_min))
    masses = np.concatenate([w * np.exp(np.asarray(p.log_weights)) for w, p in zip(weights, laws)])
    means = alpha * np.concatenate([np.asarray(p.means) for p in laws])
    covariances = alpha**2 * np.concatenate([np.asarray(p.covariances) for p in laws])
    return masses, means, covariances + sigma**2 * np.eye(2)


def responsibilities(masses, means, covariances, x):
    """Posterior component probabilities [P, K] of x under the mixture, in NumPy."""
    diff = x[:, None, :] - means[None]
    solved = np.linalg.solve(covariances[None], diff[..., None])[..., 0]
    log_det = np.linalg.slogdet(covariances)[1]
    return softmax(np.log(masses) - 0.5 * (np.sum(diff * solved, -1) + log_det))


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.3, 0.7)])
def test_or_samples_the_mixture(weights):
    """512 OR samples at 200 steps against the exact mixture sum_i w_i p_i: each of its four
    components' mass E[r_k(x)] = w_k, the mean and the covariance, each within 4 Monte Carlo
    standard errors of the samples' own statistics (plus 0.01 for the discretisation)."""
    x = np.asarray(or_run(200, weights)[2], np.float64)
    masses, means, covariances = exact_mixture(weights)
    n = x.shape[0]
    r = responsibilities(masses, means, covariances, x)
    se = r.std(0) / np.sqrt(n)
    assert np.all(np.abs(r.mean(0) - masses) < 4 * se + 0.01), (r.mean(0), masses, se)
    mean = masses @ means
    centred = means - mean
    cov = np.einsum("k,kij->ij", masses, covariances + centred[:, :, None] * centred[:, None, :])
    assert np.all(np.abs(x.mean(0) - mean) < 4 * x.std(0) / np.sqrt(n) + 0.01)
    products = (x - mean)[:, :, None] * (x - mean)[:, None, :]
    assert np.all(np.abs(products.mean(0) - cov) < 4 * products.std(0) / np.sqrt(n) + 0.01), (
        products.mean(0),
        cov,
    )


def test_or_weights_are_the_posterior_responsibilities():
    """kappa at every step against the exact responsibilities softmax(log q^i_t(x_t) + log w_i)
    on the replayed path: mean absolute error small, and smaller at 200 steps than at 50; the
    final Itô estimates' weights too."""
    errors = []
    for n in (50, 200):
        x_T, noise, x, info, log_w = or_run(n, (0.5, 0.5))
        x_end, logs, _ = replay(MIXTURES, x_T, np.asarray(info.kappa), noise, np.asarray(grid(n)))
        np.testing.assert_allclose(x_end, x, atol=1e-4)
        exact = softmax(logs + np.asarray(log_w))
        errors.append(np.mean(np.abs(np.asarray(info.kappa) - exact[:, :-1])))
        final = softmax(np.asarray(info.log_densities + log_w))
        assert np.mean(np.abs(final - exact[:, -1])) < 0.05
        assert np.all(np.asarray(info.nfe) == 2 * n)
        assert np.all(np.asarray(info.nonfinite_step) == -1)
    assert errors[1] < errors[0] and errors[1] < 0.02, errors


def data_log_prob(law, x):
    """log N(x; mu, Sigma) of a one-component law, in NumPy."""
    coords = np.einsum("ji,pj->pi", np.asarray(law.eigvecs[0]), x - np.asarray(law.means[0]))
    eigvals = np.asarray(law.eigvals[0])
    return -0.5 * np.sum(coords**2 / eigvals + np.log(2 * np.pi * eigvals), 1)


@functools.cache
def and_paths(pair, n=200, paths=256):
    """AND and plain averaging (kappa = 1/2) on the same noise: the exact gaps log q^1 - log q^2
    along each path [P, N + 1] with the final data-level gaps |log p_1 - log p_2| [P], the
    uncancelled-curvature prediction of the AND gap's drift [P] and the run's info."""
    laws = EQUAL if pair == "equal" else UNEQUAL
    rng = np.random.default_rng(7)
    x_T = rng.standard_normal((paths, 2)).astype(np.float32)
    noise = rng.standard_normal((paths, n, 1, 2)).astype(np.float32)
    times = np.asarray(grid(n))
    x, info = run(laws, noise, x_T, grid(n), None, mode="and")
    out = {"info": info}
    for name, kappa in (("and", np.asarray(info.kappa)), ("avg", np.full((paths, n, 2), 0.5))):
        x_end, logs, curvature = replay(laws, x_T, kappa, noise, times)
        if name == "and":
            np.testing.assert_allclose(x_end, x, atol=1e-4)
            out["predicted"] = np.sum(curvature[:, :, 1] - curvature[:, :, 0], 1)
        data_gap = data_log_prob(laws[0], x_end) - data_log_prob(laws[1], x_end)
        out[name] = logs[:, :, 0] - logs[:, :, 1], np.abs(data_gap)
    return out


def test_and_keeps_equal_covariance_gaussians_at_equal_density():
    """Two Gaussians of equal covariance: along every path the exact gap log q^1_t - log q^2_t
    stays at its value at t_max (its largest departure over the path, averaged over paths, is
    a small fraction of a nat and under 5% of plain averaging's), the samples end near
    {log p_1 = log p_2} while averaged ones do not, and the two Itô estimates stay equal."""
    out = and_paths("equal")
    gaps, ends = out["and"]
    avg_gaps, avg_ends = out["avg"]
    departure = np.mean(np.max(np.abs(gaps - gaps[:, :1]), 1))
    averaged = np.mean(np.max(np.abs(avg_gaps - avg_gaps[:, :1]), 1))
    assert departure < 0.05 and departure < 0.05 * averaged, (departure, averaged)
    assert np.median(ends) < 0.05 * np.median(avg_ends), (np.median(ends), np.median(avg_ends))
    log_densities = np.asarray(out["info"].log_densities)
    np.testing.assert_allclose(log_densities[:, 0], log_densities[:, 1], atol=1e-3)


def test_and_gap_drift_is_the_uncancelled_curvature():
    """Two Gaussians of different covariances: the AND step removes the noise along
    d = s_1 - s_2, so the Itô estimator's Laplacian cancellation misses 1/2 g^2 |dt| d^T H_i d
    per step, and the exact gap drifts by sum 1/2 g^2 |dt| d^T (H_2 - H_1) d rather than staying
    put.  The realised drift matches that prediction path by path, and is still far below the
    drift of plain averaging."""
    out = and_paths("unequal")
    gaps, _ = out["and"]
    realised = gaps[:, -1] - gaps[:, 0]
    residual = np.mean(np.abs(realised - out["predicted"]))
    assert np.mean(np.abs(realised)) > 0.1, realised
    assert residual < 0.25 * np.mean(np.abs(realised)), (residual, np.mean(np.abs(realised)))
    avg_gaps, _ = out["avg"]
    assert np.mean(np.abs(realised)) < 0.25 * np.mean(np.abs(avg_gaps[:, -1] - avg_gaps[:, 0]))


def test_and_with_three_models_keeps_three_estimates_equal():
    """M = 3 in d = 2: the (M - 1) x (M - 1) Gram system; the weights sum to one at every step
    and the three Itô estimates stay equal; 3 evaluations a step."""
    n, paths = 50, 64
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal((paths, 2)).astype(np.float32)
    noise = rng.standard_normal((paths, n, 1, 2)).astype(np.float32)
    x, info = run(THREE, noise, x_T, grid(n), None, mode="and")
    np.testing.assert_allclose(np.sum(info.kappa, -1), 1.0, atol=1e-3)
    log_densities = np.asarray(info.log_densities)
    np.testing.assert_allclose(log_densities, log_densities[:, :1] * np.ones((1, 3)), atol=2e-3)
    assert np.all(np.asarray(info.nfe) == 3 * n) and np.all(np.asarray(info.nonfinite_step) == -1)
    assert np.all(np.isfinite(x))


KEY_GRID = grid(30)
KEY_MODELS = exact_models(MIXTURES)


@jax.jit
def keyed(key, x_T):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x_T.shape[0]))
    return jax.vmap(lambda k, x: diffusion.superdiff(k, KEY_MODELS, SDE, x, KEY_GRID))(keys, x_T)


def test_keys_vmap_and_the_final_denoising_step():
    """Same key, same bits.  One path run alone with ``final="denoise"`` has the kappa and
    estimates of its row in the vmapped run with ``final="none"``, and returns
    sum_i kappa_i x0_i at grid[-1] with the OR weights of the final estimates, at M more
    evaluations."""
    x_T = jnp.asarray(np.random.default_rng(4).standard_normal((4, 2)), jnp.float32)
    key = jax.random.key(5)
    x, info = keyed(key, x_T)
    x_again, info_again = keyed(key, x_T)
    np.testing.assert_array_equal(x, x_again)
    np.testing.assert_array_equal(info.log_densities, info_again.log_densities)
    assert np.all(np.asarray(info.nfe) == 60) and info.kappa.shape == (4, 30, 2)

    x_T, noise, x, info, log_w = or_run(50, (0.5, 0.5))
    models, t = exact_models(MIXTURES), grid(50)[-1]

    @jax.jit
    def single(z, x_T, x):
        run = diffusion.superdiff(
            None, models, SDE, x_T, grid(50), log_mixture_weights=log_w, final="denoise", noise=z
        )
        return run, jnp.stack([m.predict(SDE, x, t, "x0") for m in models])

    row = 3
    (x0, info0), x0_each = single(noise[row], x_T[row], x[row])
    np.testing.assert_allclose(info0.kappa, info.kappa[row], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(info0.log_densities, info.log_densities[row], rtol=1e-5)
    weights = softmax(np.asarray(info.log_densities[row] + log_w))
    np.testing.assert_allclose(x0, weights @ np.asarray(x0_each), atol=1e-4)
    assert int(info0.nfe) == 2 * 50 + 2 and int(info0.nonfinite_step) == -1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mode="xor"), ValueError, r"mode must be one of \['or', 'and'\]"),
        (dict(final="euler_to_zero"), ValueError, "final must be one of"),
        (dict(models=KEY_MODELS[:1]), ValueError, "models must hold at least two"),
        (dict(models=KEY_MODELS[0]), ValueError, "models must be a sequence"),
        (dict(models=[KEY_MODELS[0], len]), TypeError, "models must hold Model"),
        (dict(log_mixture_weights=jnp.zeros(3)), ValueError, "one entry per model"),
        (dict(log_mixture_weights=jnp.zeros(2), mode="and"), ValueError, "mode='or' only"),
        (dict(log_mixture_weights=jnp.array([0.0, jnp.nan])), ValueError, "must be finite"),
        (dict(grid=jnp.array([0.5, 1.0])), ValueError, "strictly decreasing"),
        (dict(key=1), TypeError, "key must be a PRNG key"),
        (dict(noise=jnp.zeros((3, 1, 2))), ValueError, "noise must have shape"),
    ],
)
def test_bad_arguments_raise_before_tracing(kwargs, error, match):
    arguments = dict(
        key=jax.random.key(0),
        models=KEY_MODELS,
        grid=jnp.array([1.0, 0.5, 0.1]),
        mode="or",
        log_mixture_weights=None,
        final="none",
        noise=None,
    )
    arguments.update(kwargs)
    key, models, times = arguments.pop("key"), arguments.pop("models"), arguments.pop("grid")
    with pytest.raises(error, match=match):
        diffusion.superdiff(key, models, SDE, jnp.ones(2), times, **arguments)
