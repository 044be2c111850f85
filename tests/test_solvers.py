"""Samplers judged exactly on a Gaussian target: orders from the exact output law, plus
batch independence, determinism, finiteness at sigma -> 0, gradients and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import problems
from shufflesgd import sde as S
from shufflesgd import solvers as V

TARGET = problems.gaussian_mixture([1.0], [[1.0, -0.5]], [[[2.0, 0.3], [0.3, 0.5]]])
MIXTURE = problems.gaussian_mixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [np.eye(2) * 0.2, np.eye(2) * 0.4])


def exact_model(sde, mixture=TARGET, output="score"):
    def fn(x, t):
        score = mixture.diffuse(sde.alpha(t), sde.sigma(t)).score(x)
        return S.convert(score, "score", output, x, t, sde)

    return V.Model(fn, output)


def exact_kl(name, sde, num_steps, grid_kind="uniform_log_snr", draws=1, **options):
    grid = jnp.asarray(S.time_grid(sde, grid_kind, num_steps))
    mean, cov = jax.jit(
        lambda g: V.exact_gaussian_law(V.SAMPLERS[name], exact_model(sde), sde, g, 2, draws, final="none", **options)
    )(grid)
    target = TARGET.diffuse(sde.alpha(sde.t_min), sde.sigma(sde.t_min))
    return float(problems.gaussian_kl(mean, cov, target.means[0], target.covariances[0]))


def order(name, sde, steps, **options):
    kls = [exact_kl(name, sde, n, **options) for n in steps]
    return np.polyfit(np.log(steps), np.log(kls), 1)[0], kls


@pytest.mark.parametrize(
    "name, sde_name, steps, expected",
    [
        ("pf_ode_euler", "edm", [20, 40, 80, 160], -2.0),  # first order: KL ~ error^2 ~ N^-2
        ("ddim", "vp", [20, 40, 80, 160], -2.0),
        ("euler_maruyama", "edm", [20, 40, 80, 160], -2.0),
        ("pf_ode_heun", "edm", [5, 10, 20, 40], -4.0),  # second order: KL ~ N^-4
    ],
)
def test_measured_orders_on_the_exact_gaussian_law(name, sde_name, steps, expected, x64):
    slope, kls = order(name, S.make_sde(sde_name), steps)
    assert abs(slope - expected) < 0.35, (slope, kls)


def test_heun_reaches_the_prior_mismatch_floor_on_vp(x64):
    """A perfect ODE solver's KL to p_eps is at least KL(prior || p_T) (transported by the flow)."""
    sde = S.make_sde("vp")
    p_T = TARGET.diffuse(sde.alpha(sde.t_max), sde.sigma(sde.t_max))
    floor = float(problems.gaussian_kl(jnp.zeros(2), jnp.eye(2), p_T.means[0], p_T.covariances[0]))
    fine = exact_kl("pf_ode_heun", sde, 400)
    assert abs(fine - floor) < 0.05 * floor


def test_exact_law_matches_monte_carlo(x64):
    sde = S.make_sde("vp")
    grid = jnp.asarray(S.time_grid(sde, "uniform_log_snr", 20))
    model = exact_model(sde)
    mean, cov = V.exact_gaussian_law(V.euler_maruyama, model, sde, grid, 2, 1, final="none")
    n = 20000
    x_T = sde.prior_sample(jax.random.key(0), (n, 2))
    samples, info = jax.jit(lambda k, x: V.sample_batch(V.euler_maruyama, k, model, sde, x, grid, final="none"))(
        jax.random.key(1), x_T
    )
    stderr = np.sqrt(np.diag(np.asarray(cov)) / n)
    np.testing.assert_array_less(np.abs(np.mean(samples, axis=0) - mean), 4 * stderr)
    np.testing.assert_allclose(np.cov(np.asarray(samples).T), cov, atol=4 * float(np.max(np.diag(cov))) * np.sqrt(2 / n))
    assert int(info.nfe[0]) == 20


def test_predictor_corrector_mode_weights_and_its_per_sample_step_bias(x64):
    """PC is not affine in its noise (the Langevin step uses |z|), so judge it by Monte Carlo:
    the right mode's weight (0.7) within 4 binomial standard errors at a small snr. A
    per-sample step eps(x) = 2 (r |z| / |s(x)|)^2 depends on x, so Langevin leaves
    p / eps ~ p |s|^2 invariant rather than p: at a large snr the narrow left mode gains weight."""
    sde = S.make_sde("ve")
    grid = jnp.asarray(S.time_grid(sde, "uniform_time", 100))
    n = 2000
    x_T = sde.prior_sample(jax.random.key(0), (n, 2))
    model = exact_model(sde, MIXTURE)
    sweep = jax.jit(lambda k, x, r: V.sample_batch(V.predictor_corrector, k, model, sde, x, grid, snr=r))
    samples, info = sweep(jax.random.key(1), x_T, 0.01)
    assert abs(float(jnp.mean(samples[:, 0] > 0)) - 0.7) < 4 * math.sqrt(0.21 / n)
    assert int(info.nfe[0]) == 100 * 2 + 1  # N (M + 1) plus the final denoising evaluation
    biased, _ = sweep(jax.random.key(1), x_T, 0.3)
    assert float(jnp.mean(biased[:, 0] > 0)) < 0.7 - 4 * math.sqrt(0.21 / n)


@pytest.mark.parametrize("name", sorted(V.SAMPLERS))
def test_a_sample_is_the_same_alone_and_in_a_batch(name):
    sde = S.make_sde("vp")
    grid = jnp.asarray(S.time_grid(sde, "karras", 8))
    model = exact_model(sde, MIXTURE)
    x_T = sde.prior_sample(jax.random.key(0), (16, 2))
    batch, _ = V.sample_batch(V.SAMPLERS[name], jax.random.key(3), model, sde, x_T, grid)
    alone, _ = V.SAMPLERS[name](jax.random.fold_in(jax.random.key(3), 5), model, sde, x_T[5], grid)
    np.testing.assert_allclose(batch[5], alone, rtol=1e-5, atol=1e-6)
    again, _ = V.sample_batch(V.SAMPLERS[name], jax.random.key(3), model, sde, x_T, grid)
    np.testing.assert_array_equal(batch, again)


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "edm"])
@pytest.mark.parametrize("grid_kind", S.GRIDS)
@pytest.mark.parametrize("final", V.FINALS)
def test_outputs_are_finite_near_sigma_zero(sde_name, grid_kind, final):
    sde = S.make_sde(sde_name)
    grid = jnp.asarray(S.time_grid(sde, grid_kind, 10))
    x, info = V.ddim(jax.random.key(0), exact_model(sde, MIXTURE, "x0"), sde, sde.prior_sample(jax.random.key(1), (2,)),
                     grid, eta=0.5, final=final)
    assert np.all(np.isfinite(x)) and int(info.nonfinite_step) == -1
    assert int(info.nfe) == 10 + (final != "none")


def test_gradient_through_a_deterministic_sampler(x64):
    sde = S.make_sde("edm")
    grid = jnp.asarray(S.time_grid(sde, "karras", 10))
    model = exact_model(sde)

    def output(x_T):
        return V.pf_ode_heun(jax.random.key(0), model, sde, x_T, grid, final="none")[0]

    jac = jax.jacfwd(output)(jnp.zeros(2))
    jac_rev = jax.jacrev(output)(jnp.zeros(2))
    np.testing.assert_allclose(jac, jac_rev, rtol=1e-8)
    x = jnp.array([30.0, -10.0])  # affine: output(x) = output(0) + J x
    np.testing.assert_allclose(output(x), output(jnp.zeros(2)) + jac @ x, rtol=1e-8)


def test_nan_mid_trajectory_is_reported_with_its_step():
    sde = S.make_sde("vp")
    grid = jnp.asarray(S.time_grid(sde, "uniform_time", 10))
    good = exact_model(sde, MIXTURE)
    broken = V.Model(lambda x, t: jnp.where(t < 0.45, jnp.nan, 1.0) * good.fn(x, t), "score")
    x, info = V.pf_ode_euler(jax.random.key(0), broken, sde, jnp.ones(2), grid)
    first_bad = int(np.argmax(np.asarray(grid)[:-1] < 0.45))
    assert int(info.nonfinite_step) == first_bad


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: V.make_sampler("bogus"), "sampler must be one of"),
        (lambda: V.ddim(jax.random.key(0), exact_model(S.make_sde("vp")), S.make_sde("vp"), jnp.ones(2), jnp.array([1.0])),
         "at least two times"),
        (lambda: V.ddim(jax.random.key(0), exact_model(S.make_sde("vp")), S.make_sde("vp"), jnp.ones(2),
                        jnp.array([0.5, 1.0])), "strictly decreasing"),
        (lambda: V.ddim(jax.random.key(0), exact_model(S.make_sde("vp")), S.make_sde("vp"), jnp.ones(2),
                        jnp.array([1.0, 0.5]), eta=1.5), "eta must lie in"),
        (lambda: V.predictor_corrector(jax.random.key(0), exact_model(S.make_sde("vp")), S.make_sde("vp"), jnp.ones(2),
                                       jnp.array([1.0, 0.5]), snr=0.0), "snr must be positive"),
        (lambda: V.pf_ode_euler(jax.random.key(0), exact_model(S.make_sde("vp")), S.make_sde("vp"), jnp.ones(2),
                                jnp.array([1.0, 0.5]), final="bogus"), "final must be one of"),
        (lambda: V.check_model_output("logits"), "model output must be one of"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
