"""Feynman–Kac correctors against exact Gaussian targets: the product of two experts, the
annealed law and the exact CFG target (each a Gaussian in closed form at the end of the grid,
mapped through the final denoising, which is affine for a Gaussian), the plain reverse SDE on
the combined score as the foil that the weights correct, the special-case weights and the
documented noise recomputed by hand over a whole run, determinism, vmap over systems,
divergence reporting and argument errors.

Statistical tolerances.  The weighted estimates come from R independent systems of N
particles (one vmapped program); their standard error is the spread of the R per-system
estimates over sqrt(R).  The Kish ESS of a system's weights does not give it: resampling makes
particles share ancestors, so a system carries less information than its ESS says.  Second
moments are taken about the exact mean, so subtracting the weighted mean adds no downward
bias.  Tolerance: 5 standard errors (R = 16: a t statistic with 15 degrees of freedom).

All runs share three compiled programs (the vmapped systems, the reference computed by hand
for one system, and Euler–Maruyama through ``sample_batch``); each run is made once."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion, problems
from shufflesgd.diffusion.feynman_kac import FKInfo, feynman_kac_corrector, resample_final

SDE = diffusion.make_sde("vp")
NUM_STEPS = 200
GRID = jnp.asarray(diffusion.time_grid(SDE, "uniform_time", NUM_STEPS))
R, N = 16, 1024


def _gaussian(mean, cov):
    return np.asarray(mean, np.float64), np.asarray(cov, np.float64)


# product of experts: two anisotropic, differently oriented Gaussians
EXPERT_1 = _gaussian([1.0, -0.5], [[1.0, 0.4], [0.4, 0.5]])
EXPERT_2 = _gaussian([-0.5, 1.0], [[0.6, -0.2], [-0.2, 1.5]])
# CFG: the conditional is narrower than the unconditional (S_c <= S_u), so that
# 3 P_c - 2 P_u stays positive definite at every noise level
CONDITIONAL = _gaussian([1.0, 0.5], [[0.8, 0.2], [0.2, 0.6]])
UNCONDITIONAL = _gaussian([0.0, 0.0], [[1.2, 0.3], [0.3, 0.9]])


def _law(gaussian):
    return problems.gaussian_mixture([1.0], [gaussian[0]], [gaussian[1]]).eigen()


def _laws(*gaussians):
    return tuple(_law(g) for g in gaussians)


def _fk(key, x_T, laws, exponents, ess_threshold):
    """Two models given by their (traced) laws, so that every target shares one program."""
    models = [diffusion.mixture_model(SDE, law) for law in laws]
    return feynman_kac_corrector(
        key, models, exponents, SDE, x_T, GRID, ess_threshold=ess_threshold, final="denoise"
    )


SYSTEMS = jax.jit(jax.vmap(_fk, in_axes=(0, 0, None, None, None)))


def _keys(seed):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(R))


def _x_T(seed):
    return SDE.prior_sample(jax.random.key(seed), (R, N, 2))


def _exact(exponents, gaussians):
    r"""Mean and covariance of the denoised target.  At t = ``GRID[-1]``,
    :math:`\prod_i p_{i,t}^{\beta_i}` with :math:`p_{i,t} = N(\alpha m_i, C_i)`,
    :math:`C_i = \alpha^2 S_i + \sigma^2 I`, is :math:`N(\mu, P^{-1})` with
    :math:`P = \sum_i\beta_i C_i^{-1}`; the combined score is :math:`-P(x - \mu)`, so the final
    denoising :math:`x_0 = (x + \sigma^2 S)/\alpha` is affine: mean :math:`\mu/\alpha`,
    covariance :math:`A P^{-1} A^\top` with :math:`A = (I - \sigma^2 P)/\alpha`."""
    alpha, sigma = float(SDE.alpha(GRID[-1])), float(SDE.sigma(GRID[-1]))
    precisions = [np.linalg.inv(alpha**2 * s + sigma**2 * np.eye(2)) for _, s in gaussians]
    precision = sum(b * p for b, p in zip(exponents, precisions))
    cov = np.linalg.inv(precision)
    mean = cov @ sum(b * p @ (alpha * m) for b, p, (m, _) in zip(exponents, precisions, gaussians))
    a = (np.eye(2) - sigma**2 * precision) / alpha
    return mean / alpha, a @ cov @ a.T


def _statistics(x, log_weights, mean):
    """Per system: the weighted mean and the weighted second moments about ``mean``
    (entries 00, 01, 11), ``[R, 5]``."""
    w = np.exp(np.asarray(log_weights, np.float64))
    x = np.asarray(x, np.float64)
    dev = x - mean
    means = np.einsum("rn,rnd->rd", w, x)
    moments = np.einsum("rn,rnd,rne->rde", w, dev, dev).reshape(-1, 4)[:, [0, 1, 3]]
    return np.concatenate([means, moments], axis=1)


def _check(out, exponents, gaussians, label):
    """Assert that the weighted estimates match the exact target within 5 standard errors;
    return (errors, standard errors, exact values)."""
    x, log_weights, info = out
    mean, cov = _exact(exponents, gaussians)
    exact = np.concatenate([mean, cov.ravel()[[0, 1, 3]]])
    estimates = _statistics(x, log_weights, mean)
    error = estimates.mean(0) - exact
    se = estimates.std(0, ddof=1) / math.sqrt(R)
    assert np.all(np.abs(error) < 5 * se), (label, error, se)
    assert np.all(np.asarray(info.nonfinite_step) == -1)
    return error, se, exact


def _check_plain_run_is_off(out, exact, se):
    """The plain reverse SDE on the combined score (a run without resampling, its weights
    ignored) lies outside both its own and the weighted run's 5-standard-error bands."""
    x, _, info = out
    assert int(info.num_resampling.sum()) == 0
    estimates = _statistics(x, jnp.full(x.shape[:2], -math.log(N)), exact[:2])
    plain_se = estimates.std(0, ddof=1) / math.sqrt(R)
    offset = np.abs(estimates.mean(0) - exact) / (5 * np.maximum(plain_se, se))
    assert offset.max() > 1, (estimates.mean(0) - exact, plain_se, se)
    return estimates.mean(0) - exact


#: name: (the two laws, the exponents, the seed of the keys and of x_T)
CASES = {
    "product": ((EXPERT_1, EXPERT_2), (1.0, 1.0), 0),
    "cfg": ((CONDITIONAL, UNCONDITIONAL), (3.0, -2.0), 2),
    "anneal 2": ((EXPERT_1, EXPERT_1), (2.0, 0.0), 3),
    "anneal 0.5": ((EXPERT_1, EXPERT_1), (0.5, 0.0), 4),
    "model": ((EXPERT_1, EXPERT_2), (1.0, 0.0), 5),
    "diverging": ((EXPERT_1, EXPERT_2), (1e3, 1e3), 6),
}


@functools.cache
def _run(name, ess_threshold):
    """R systems of case ``name`` (each run computed once per module)."""
    gaussians, exponents, seed = CASES[name]
    return SYSTEMS(
        _keys(seed), _x_T(100 + seed), _laws(*gaussians), jnp.array(exponents), ess_threshold
    )


@pytest.mark.parametrize(
    "name, exponents, gaussians",
    [
        ("product", [1.0, 1.0], [EXPERT_1, EXPERT_2]),
        ("cfg", [3.0, -2.0], [CONDITIONAL, UNCONDITIONAL]),
        ("anneal 2", [2.0], [EXPERT_1]),
        ("anneal 0.5", [0.5], [EXPERT_1]),
    ],
)
def test_weighted_particles_match_the_exact_target(name, exponents, gaussians):
    """Product of experts (precision sum), CFG with gamma = 3 (precision 3 P_c - 2 P_u) and
    annealing (N(m, S / beta) before diffusion; one model, the second slot has exponent 0 so
    the compiled program is shared).  In each case the plain reverse SDE on the combined score
    is measurably off: the weights matter."""
    _, se, exact = _check(_run(name, 0.5), exponents, gaussians, name)
    _check_plain_run_is_off(_run(name, 0.0), exact, se)


def test_info_is_consistent():
    _, _, info = _run("product", 0.5)
    assert isinstance(info, FKInfo)
    assert info.ess.shape == (R, NUM_STEPS) and info.resampled.shape == (R, NUM_STEPS)
    np.testing.assert_array_equal(info.num_resampling, info.resampled.sum(axis=1))
    ess = np.asarray(info.ess)
    assert np.all(ess <= N * (1 + 1e-5)) and np.all(ess >= 1)
    # each resampling happened exactly where the ESS fell below half the particles
    np.testing.assert_array_equal(info.resampled, ess < 0.5 * N)
    assert np.all(np.asarray(info.num_resampling) > 0)
    np.testing.assert_array_equal(info.nfe, 2 * (NUM_STEPS + 1))  # and the final denoising
    assert np.all(np.isfinite(np.asarray(info.log_normalizer)))


def test_same_key_same_bits_through_resampling():
    first = _run("product", 0.5)
    gaussians, exponents, seed = CASES["product"]
    again = SYSTEMS(_keys(seed), _x_T(100 + seed), _laws(*gaussians), jnp.array(exponents), 0.5)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0][0], first[0][1])


def test_a_diverging_run_reports_its_first_bad_step():
    """Exponents of 1000 make the combined score stiff: Euler–Maruyama overflows."""
    x, _, info = _run("diverging", 0.5)
    bad = np.asarray(info.nonfinite_step)
    assert np.all((0 <= bad) & (bad < NUM_STEPS))
    assert not bool(jnp.all(jnp.isfinite(x))) or not bool(
        jnp.all(jnp.isfinite(info.log_normalizer))
    )


@jax.jit
def _by_hand(key, x_T, laws, exponents):
    """One system without resampling, recomputed from the documented convention: particle n
    draws normal(fold_in(fold_in(fold_in(fold_in(key, 0), n), i), 0)) at step i and moves by
    Euler–Maruyama on the combined score; returns Tweedie's x0 of the combined score at the end
    and the sums over steps of g^2 ds <s_1, s_2>, g^2 ds |s_1|^2 and g^2 ds |s_1 - s_2|^2 at
    the left points, from which each special case's weights follow."""
    particle_keys = jax.vmap(lambda n: jax.random.fold_in(jax.random.fold_in(key, 0), n))(
        jnp.arange(x_T.shape[0])
    )

    def scores(x, t):
        return [jax.vmap(lambda y, w=w: w.score(y, SDE.alpha(t), SDE.sigma(t)))(x) for w in laws]

    def step(carry, inputs):
        x, sums = carry
        i, t, t_next = inputs
        s1, s2 = scores(x, t)
        g2_ds = SDE.diffusion_squared(t) * (t - t_next)
        terms = jnp.stack([jnp.sum(s1 * s2, -1), jnp.sum(s1**2, -1), jnp.sum((s1 - s2) ** 2, -1)])
        draw = lambda k: jax.random.normal(jax.random.fold_in(jax.random.fold_in(k, i), 0), (2,))
        z = jax.vmap(draw)(particle_keys)
        combined = exponents[0] * s1 + exponents[1] * s2
        x = x + SDE.reverse_drift(x, t, combined) * (t_next - t) + jnp.sqrt(g2_ds) * z
        return (x, sums + g2_ds * terms), None

    start = (x_T, jnp.zeros((3, x_T.shape[0])))
    steps = (jnp.arange(NUM_STEPS), GRID[:-1], GRID[1:])
    (x, sums), _ = jax.lax.scan(step, start, steps)
    s1, s2 = scores(x, GRID[-1])
    combined = exponents[0] * s1 + exponents[1] * s2
    return diffusion.convert(combined, "score", "x0", x, GRID[-1], SDE), sums


def _assert_log_weights(log_weights, increments):
    increments = np.asarray(increments, np.float64)
    expected = increments - np.logaddexp.reduce(increments)
    np.testing.assert_allclose(log_weights, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["product", "cfg", "anneal 2", "model"])
def test_vmapped_systems_are_the_special_cases_computed_one_by_one(name):
    """Systems 0 and 1 of a vmapped run without resampling against the computation by hand,
    one system at a time: the particles (the documented noise, Euler–Maruyama on the combined
    score, Tweedie's x0 at the end) and the weights of the special cases: product
    g^2 <s_1, s_2> ds; CFG g^2 gamma (gamma - 1) |s_c - s_u|^2 ds / 2; annealing
    g^2 beta (beta - 1) |s|^2 ds / 2; each with (sum(beta) - 1) log prior(x_T) at the start.
    The model itself (beta = 1) gets no correction at all.  Float32 rounding differs between
    the two computations (XLA may order a batched reduction differently, which is also why a
    run that resamples can draw a neighbouring ancestor where a uniform falls within that
    rounding of a cumulative weight), hence the tolerances."""
    gaussians, exponents, seed = CASES[name]
    x, log_weights, info = _run(name, 0.0)
    beta = exponents[0]
    for i in range(2):
        x_T = _x_T(100 + seed)[i]
        x0, sums = _by_hand(_keys(seed)[i], x_T, _laws(*gaussians), jnp.array(exponents))
        np.testing.assert_allclose(x[i], x0, rtol=1e-4, atol=1e-4)
        inner, norm_1, difference = np.asarray(sums, np.float64)
        log_prior = np.asarray(SDE.prior_log_prob(x_T), np.float64)
        increments = {
            "product": inner + log_prior,
            "cfg": 0.5 * beta * (beta - 1) * difference,
            "anneal 2": 0.5 * beta * (beta - 1) * norm_1 + (beta - 1) * log_prior,
            "model": np.zeros(N),
        }[name]
        _assert_log_weights(log_weights[i], increments)
    if name == "model":
        np.testing.assert_allclose(log_weights, np.full((R, N), -math.log(N)), atol=1e-6)
        np.testing.assert_allclose(info.log_normalizer, 0.0, atol=1e-5)


def test_without_resampling_the_particles_are_euler_maruyama_samples_of_the_combined_score():
    """Particle n draws what euler_maruyama draws with key fold_in(fold_in(key, 0), n):
    sample_batch's row n with key fold_in(key, 0)."""
    gaussians, exponents, seed = CASES["product"]
    x, _, _ = _run("product", 0.0)
    s1, s2 = (diffusion.mixture_model(SDE, law).fn for law in _laws(*gaussians))
    combined = diffusion.Model(
        lambda y, t: exponents[0] * s1(y, t) + exponents[1] * s2(y, t), "score"
    )
    euler = jax.jit(
        lambda key, x_T: diffusion.sample_batch(
            diffusion.euler_maruyama, key, combined, SDE, x_T, GRID, final="denoise"
        )
    )
    # rows are independent of their batch-mates, so the first 64 particles suffice
    reference, _ = euler(jax.random.fold_in(_keys(seed)[0], 0), _x_T(100 + seed)[0, :64])
    np.testing.assert_allclose(x[0, :64], reference, rtol=1e-4, atol=1e-4)


def test_resample_final_gives_equally_weighted_copies():
    particles = jnp.arange(12.0).reshape(6, 2)
    log_weights = jnp.log(jnp.array([0.0, 0.5, 0.0, 0.25, 0.25, 0.0]))
    out = jax.jit(resample_final, static_argnames="scheme")(
        jax.random.key(0), particles, log_weights, scheme="systematic"
    )
    # systematic counts are floor or ceil of N w = (0, 3, 0, 1.5, 1.5, 0)
    rows = [int(r[0]) // 2 for r in np.asarray(out)]
    assert rows.count(1) == 3 and {rows.count(3), rows.count(4)} == {1, 2}
    np.testing.assert_array_equal(np.asarray(out)[:, 1], np.asarray(out)[:, 0] + 1)
    with pytest.raises(ValueError, match="particles must have a leading axis"):
        resample_final(jax.random.key(1), particles[:5], log_weights)


def _exploding(x, t):
    raise AssertionError("the model was called: the arguments were not checked first")


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"models": []}, ValueError, "models must hold at least one Model"),
        ({"models": diffusion.Model(_exploding, "score")}, TypeError, "models must be a sequence"),
        ({"models": [_exploding]}, TypeError, r"models\[0\] must be a Model"),
        ({"models": [diffusion.Model(_exploding, "logits")]}, ValueError, "model output must be"),
        ({"exponents": jnp.ones(3)}, ValueError, r"exponents must have shape \(2,\)"),
        ({"exponents": jnp.array([1.0, jnp.nan])}, ValueError, "exponents must be finite"),
        ({"x_T": jnp.zeros((0, 2))}, ValueError, "x_T must have a leading particle axis"),
        ({"x_T": jnp.zeros((4, 2), jnp.int32)}, TypeError, "x_T must be a float array"),
        ({"grid": jnp.array([0.5, 0.6])}, ValueError, "grid must be strictly decreasing"),
        ({"final": "euler_to_zero"}, ValueError, r"final must be one of \['none', 'denoise'\]"),
        ({"scheme": "residual"}, ValueError, "scheme must be one of"),
        ({"ess_threshold": 2.0}, ValueError, "ess_threshold must lie in"),
        ({"key": 0}, TypeError, "key must be a PRNG key"),
    ],
)
def test_bad_arguments_raise_before_anything_is_traced(change, error, match):
    arguments = {
        "key": jax.random.key(0),
        "models": [diffusion.Model(_exploding, "score")] * 2,
        "exponents": jnp.array([1.0, 1.0]),
        "sde": SDE,
        "x_T": jnp.zeros((4, 2)),
        "grid": jnp.array([0.6, 0.5]),
    }
    options = {"scheme": "systematic", "ess_threshold": 0.5, "final": "none"}
    for name, value in change.items():
        (arguments if name in arguments else options)[name] = value
    with pytest.raises(error, match=match):
        feynman_kac_corrector(*arguments.values(), **options)
