"""The probability-flow ODE likelihood judged against exact log-densities of Gaussian
mixtures: exact up to the prior mismatch (and exact with the true p_T as prior), exact with no
mismatch at all on the flow-matching interpolants from t = 1 with a velocity model, an unbiased
Hutchinson estimate, an exact evaluation count, jit/vmap, determinism and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from shufflesgd import diffusion, problems
from support.samplers import exact_velocity_model


def gaussian():
    """One correlated Gaussian (built inside the tests, so in float64 under ``x64``)."""
    return problems.gaussian_mixture([1.0], [[1.0, -0.5]], [[[2.0, 0.3], [0.3, 0.5]]])


def mixture():
    """Two anisotropic, correlated components: the Hessian of log p_t is not diagonal, so
    neither probe kind has zero variance."""
    return problems.gaussian_mixture(
        [0.3, 0.7],
        [[-2.0, 0.0], [2.0, 1.0]],
        [[[0.3, 0.1], [0.1, 0.2]], [[0.4, -0.15], [-0.15, 0.3]]],
    )


POINTS = np.array([[1.5, 0.7], [-2.2, 0.3], [0.0, 0.0], [3.0, 2.0]])
TIGHT = dict(rtol=1e-9, atol=1e-9)


class Marginal:
    """The marginal p_t = sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I) of a mixture,
    evaluated in each component's eigenbasis (decomposed once, in NumPy) with matrix products
    only.  GaussianMixture.score and .log_prob call batched LAPACK (solve, cholesky), and two
    such calls at once inside a vmapped diffrax while loop deadlocked jaxlib 0.10.2's CPU
    thread pool on 2 cores; the last test checks the two agree."""

    def __init__(self, law, alpha, sigma):
        vals, vecs = np.linalg.eigh(np.asarray(law.covariances, np.float64))
        dtype = law.means.dtype
        self.vecs, self.log_weights = jnp.asarray(vecs, dtype), law.log_weights
        self.scales = alpha**2 * jnp.asarray(vals, dtype) + sigma**2  # [K, d]
        self.means = alpha * law.means

    def _parts(self, x):
        coords = jnp.einsum("kji,kj->ki", self.vecs, x - self.means)  # U_k^T (x - m_k)
        log_joint = self.log_weights - 0.5 * (
            jnp.sum(coords**2 / self.scales + jnp.log(self.scales), axis=-1)
            + x.shape[-1] * np.log(2 * np.pi)
        )
        return coords, log_joint

    def log_prob(self, x):
        return jax.nn.logsumexp(self._parts(x)[1])

    def score(self, x):
        coords, log_joint = self._parts(x)
        return jax.nn.softmax(log_joint) @ -jnp.einsum(
            "kij,kj->ki", self.vecs, coords / self.scales
        )


def marginal(sde, law, t):
    return Marginal(law, sde.alpha(t), sde.sigma(t))


def exact_model(sde, law):
    return diffusion.Model(lambda x, t: marginal(sde, law, t).score(x), "score")


@pytest.mark.parametrize("sde_name", ["vp", "ve", "flow", "trig"])
@pytest.mark.parametrize("target", ["gaussian", "mixture"])
def test_pf_ode_log_likelihood_is_exact_up_to_the_prior_mismatch(sde_name, target, x64):
    """The flow maps p_T onto p_eps exactly, so with the exact marginal p_T as the prior the
    ODE gives log p_eps(x) itself, and with the process's prior it is off by exactly
    log p_T(x_T) - prior(x_T)."""
    sde, law = diffusion.make_sde(sde_name), gaussian() if target == "gaussian" else mixture()
    p_T = marginal(sde, law, sde.t_max)
    model = exact_model(sde, law)
    result = jax.jit(
        lambda k, xs: diffusion.log_likelihood_batch(
            k, model, sde, xs, prior_log_prob=p_T.log_prob, **TIGHT
        )
    )(jax.random.key(0), jnp.asarray(POINTS))
    exact = jax.vmap(marginal(sde, law, sde.t_min).log_prob)(POINTS)
    assert np.all(result.success)
    np.testing.assert_allclose(result.log_prob_nats, exact, atol=1e-6)
    np.testing.assert_allclose(
        result.log_prob_nats, result.prior_log_prob + result.delta_log_prob, rtol=1e-14
    )
    np.testing.assert_allclose(
        result.bits_per_dim, -result.log_prob_nats / (2 * np.log(2.0)), rtol=1e-14
    )
    # with the process's prior N(0, prior_std^2 I) instead:
    with_prior = sde.prior_log_prob(result.latent) + result.delta_log_prob
    mismatch = jax.vmap(p_T.log_prob)(result.latent) - sde.prior_log_prob(result.latent)
    np.testing.assert_allclose(exact - with_prior, mismatch, atol=1e-6)
    # and that mismatch is real (VE's sigma_max = 50 dwarfs the data; VP's p_T is nearly N(0, I),
    # and so are the interpolants' at t_max = 1 - 1e-3)
    assert np.all(np.abs(mismatch) > 1e-4)


@pytest.mark.parametrize("sde_name", ["flow", "trig"])
@pytest.mark.parametrize("target", ["gaussian", "mixture"])
def test_flow_likelihood_from_noise_to_data_is_the_exact_density(sde_name, target, x64):
    """On an interpolant with t in [0, 1] exactly, p_1 = N(0, I) is the process's own prior and
    p_0 the data: the velocity model's ODE from t = 0 to 1 gives the data's log-density with
    neither a prior mismatch nor a t_min offset (the drift is the velocity, finite at both
    ends)."""
    sde = diffusion.make_sde(sde_name, t_min=0.0, t_max=1.0)
    law = gaussian() if target == "gaussian" else mixture()
    model = exact_velocity_model(sde, law)
    result = jax.jit(lambda k, xs: diffusion.log_likelihood_batch(k, model, sde, xs, **TIGHT))(
        jax.random.key(0), jnp.asarray(POINTS)
    )
    exact = jax.vmap(Marginal(law, 1.0, 0.0).log_prob)(POINTS)
    assert np.all(result.success)
    np.testing.assert_allclose(result.log_prob_nats, exact, atol=1e-6)
    np.testing.assert_allclose(result.prior_log_prob, sde.prior_log_prob(result.latent))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe, x64):
    """Mean over probes within 4 standard errors of the exact log-density (which the
    exact-divergence ODE reproduces to 1e-6, test above; the exact p_T is the prior here so
    that no prior mismatch enters)."""
    sde, law = diffusion.make_sde("vp"), mixture()
    model = exact_model(sde, law)
    x = jnp.asarray(POINTS[0])
    p_T = marginal(sde, law, sde.t_max)
    n = 400
    keys = jax.random.split(jax.random.key(1), n)
    estimates = jax.jit(
        jax.vmap(
            lambda k: (
                diffusion.log_likelihood(
                    k,
                    model,
                    sde,
                    x,
                    divergence="hutchinson",
                    probe=probe,
                    prior_log_prob=p_T.log_prob,
                    rtol=1e-7,
                    atol=1e-7,
                ).log_prob_nats
            )
        )
    )(keys)
    estimates = np.asarray(estimates)
    exact = float(marginal(sde, law, sde.t_min).log_prob(x))
    stderr = estimates.std(ddof=1) / np.sqrt(n)
    assert stderr > 1e-3  # a genuinely random estimate (a zero-variance probe would prove nothing)
    assert abs(estimates.mean() - exact) < 4 * stderr, (estimates.mean(), exact, stderr)


def test_nfe_counts_every_evaluation_of_the_vector_field(x64):
    sde, law = diffusion.make_sde("ve"), mixture()
    calls = []

    def record(t):
        calls.append(float(t))
        return np.zeros((), np.float64)

    def fn(x, t):
        tick = io_callback(record, jax.ShapeDtypeStruct((), jnp.float64), t, ordered=True)
        return marginal(sde, law, t).score(x) + tick

    result = jax.jit(
        lambda k, x: diffusion.log_likelihood(
            k, diffusion.Model(fn, "score"), sde, x, divergence="hutchinson"
        )
    )(jax.random.key(0), jnp.asarray(POINTS[1]))
    assert int(result.nfe) == len(calls) > 10


def test_jit_vmap_batch_rows_determinism_and_traced_tolerances(x64):
    sde = diffusion.make_sde("vp")
    model = exact_model(sde, mixture())
    xs = jnp.asarray(POINTS)

    @jax.jit
    def batch(key, xs, tol):
        return diffusion.log_likelihood_batch(
            key, model, sde, xs, divergence="hutchinson", probe="gaussian", rtol=tol, atol=tol
        )

    loose = batch(jax.random.key(3), xs, 1e-4)
    tight = batch(jax.random.key(3), xs, 1e-8)  # the same program: the tolerance is traced
    assert np.all(tight.nfe > loose.nfe)
    np.testing.assert_allclose(loose.log_prob_nats, tight.log_prob_nats, atol=1e-2)
    # the same key gives the same bits; another key another estimate (Gaussian probes: a 2-D
    # Rademacher probe takes only two distinct values up to sign)
    again = batch(jax.random.key(3), xs, 1e-8)
    other = batch(jax.random.key(4), xs, 1e-8)
    np.testing.assert_array_equal(tight.bits_per_dim, again.bits_per_dim)
    assert np.all(tight.bits_per_dim != other.bits_per_dim)
    # row i depends on x_i and fold_in(key, i) only: changing row 0 leaves the others alone
    moved = batch(jax.random.key(3), xs.at[0].set(jnp.array([5.0, -4.0])), 1e-8)
    assert moved.log_prob_nats[0] != tight.log_prob_nats[0]
    np.testing.assert_array_equal(moved.log_prob_nats[1:], tight.log_prob_nats[1:])
    np.testing.assert_array_equal(moved.nfe[1:], tight.nfe[1:])


def test_float32_default_and_a_failed_solve_is_reported_not_hidden():
    sde, law = diffusion.make_sde("vp"), mixture()
    model = exact_model(sde, law)
    x = jnp.asarray(POINTS[0], jnp.float32)
    run = jax.jit(
        lambda x, tol: diffusion.log_likelihood(
            jax.random.key(0), model, sde, x, rtol=tol, atol=tol, max_steps=512
        )
    )
    result = run(x, 1e-5)
    assert result.log_prob_nats.dtype == jnp.float32 and bool(result.success)
    exact = float(marginal(sde, law, sde.t_min).log_prob(x))
    # prior mismatch 2e-3 plus float32 tolerance
    assert abs(float(result.log_prob_nats) - exact) < 0.01
    failed = run(x, 1e-12)  # unreachable in float32 within 512 steps
    assert not bool(failed.success)
    assert np.isnan(float(failed.log_prob_nats))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"divergence": "trace"}, "divergence must be one of"),
        ({"divergence": "hutchinson", "probe": "uniform"}, "probe must be one of"),
        ({"rtol": 0.0}, "rtol must be positive"),
        ({"atol": -1e-5}, "atol must be positive"),
        ({"t_min": 0.5, "t_max": 0.5}, "t_min must be below t_max"),
        ({"t_min": 0.9, "t_max": 0.1}, "t_min must be below t_max"),
        ({"t_min": -0.1}, "t_min must be >= 0"),
        ({"max_steps": 0}, "max_steps must be a positive int"),
    ],
)
def test_bad_arguments_raise_before_anything_is_traced(options, match):
    sde = diffusion.make_sde("vp")
    called = []
    model = diffusion.Model(lambda x, t: called.append(1) or -x, "score")
    with pytest.raises(ValueError, match=match):
        diffusion.log_likelihood(jax.random.key(0), model, sde, jnp.zeros(2), **options)
    with pytest.raises(ValueError, match=match):
        diffusion.log_likelihood_batch(jax.random.key(0), model, sde, jnp.zeros((3, 2)), **options)
    assert not called


def test_the_eigenbasis_marginal_is_the_mixture_marginal(x64):
    sde, law = diffusion.make_sde("vp"), mixture()
    for t in (sde.t_min, 0.3, sde.t_max):
        ours, theirs = marginal(sde, law, t), law.diffuse(sde.alpha(t), sde.sigma(t))
        for x in jnp.asarray(POINTS):
            np.testing.assert_allclose(ours.log_prob(x), theirs.log_prob(x), rtol=1e-12)
            np.testing.assert_allclose(ours.score(x), theirs.score(x), rtol=1e-10, atol=1e-12)
