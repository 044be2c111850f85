"""Exact output laws on a Gaussian target: against Monte Carlo; gaussian_sampler_law against the
four-object path and against Monte Carlo; its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion, metrics, problems
from support.samplers import TARGET, exact_model


def test_exact_law_matches_monte_carlo(x64):
    sde = diffusion.make_sde("vp")
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_log_snr", 20))
    model = exact_model(sde)
    mean, cov = diffusion.exact_gaussian_law(
        diffusion.euler_maruyama, model, sde, grid, 2, 1, final="none"
    )
    n = 20000
    x_T = sde.prior_sample(jax.random.key(0), (n, 2))
    samples, info = jax.jit(
        lambda k, x: diffusion.sample_batch(
            diffusion.euler_maruyama, k, model, sde, x, grid, final="none"
        )
    )(jax.random.key(1), x_T)
    stderr = np.sqrt(np.diag(np.asarray(cov)) / n)
    np.testing.assert_array_less(np.abs(np.mean(samples, axis=0) - mean), 4 * stderr)
    np.testing.assert_allclose(
        np.cov(np.asarray(samples).T), cov, atol=4 * float(np.max(np.diag(cov))) * np.sqrt(2 / n)
    )
    assert int(info.nfe[0]) == 20


MEAN, COV = np.asarray(TARGET.means[0]), np.asarray(TARGET.covariances[0])


# one sampler per family of update and of draw count (every affine sampler goes through
# gaussian_sampler_law in tests/diffusion/test_flow_matching.py); the final denoising step (the
# same code for every sampler, base.finish_at_zero) with four of them
FAMILIES = (
    "euler_maruyama",
    "ddim",
    "pf_ode_heun",
    "dpm_solver_pp_2m",
    "dpm_solver_v3",
    "unipc",
    "ghvb",
    "ancestral",
    "edm_heun",
    "restart",
)
FOUR_OBJECT_CASES = [(name, "none") for name in FAMILIES] + [
    (name, "denoise") for name in ("ddim", "dpm_solver_pp_2m", "restart", "unipc")
]


@pytest.mark.parametrize("name, final", FOUR_OBJECT_CASES)
def test_gaussian_sampler_law_is_the_four_object_path(name, final, x64):
    """One call from a name and the target's moments equals the sampler, exact model, process and
    grid assembled by hand with the draws per step written out (Restart's K, else one), the
    defaults (lower_order_final=True, ...) and the KL to p at grid[-1] ("none") or to the data."""
    sde = diffusion.make_sde("vp")
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_log_snr", 6))
    law = jax.jit(lambda g: diffusion.gaussian_sampler_law(name, sde, MEAN, COV, g, final=final))(
        grid
    )
    data = problems.gaussian_mixture([1.0], [MEAN], [COV])  # in float64, as the call builds it
    sampler, model = diffusion.make_sampler(name), diffusion.mixture_model(sde, data.eigen())
    draws = {"restart": 2}.get(name, 1)
    mean, cov = jax.jit(
        lambda g: diffusion.exact_gaussian_law(sampler, model, sde, g, 2, draws, final=final)
    )(grid)
    target = data.diffuse(sde.alpha(grid[-1]), sde.sigma(grid[-1])) if final == "none" else data
    kl = metrics.gaussian_kl(mean, cov, target.means[0], target.covariances[0])
    np.testing.assert_allclose(law.mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(law.covariance, cov, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(law.target_mean, target.means[0], rtol=1e-12)
    np.testing.assert_allclose(law.target_covariance, target.covariances[0], rtol=1e-12)
    np.testing.assert_allclose(law.kl, kl, rtol=1e-9, atol=1e-14)
    assert int(law.nfe) == diffusion.SAMPLERS[name].nfe(6, final=final)


def test_gaussian_sampler_law_matches_monte_carlo_with_the_samplers_defaults(x64):
    """Ancestral sampling with its defaults (final="denoise": Tweedie at grid[-1]): mean within 4
    standard errors, covariance within 4 standard errors of a sample covariance."""
    sde = diffusion.make_sde("vp")
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_time", 12))
    law = diffusion.gaussian_sampler_law("ancestral", sde, MEAN, COV, grid)
    n = 20000
    x_T = sde.prior_sample(jax.random.key(0), (n, 2))
    model = diffusion.mixture_model(sde, TARGET.eigen())
    samples, info = jax.jit(
        lambda k, x: diffusion.sample_batch(diffusion.ancestral, k, model, sde, x, grid)
    )(jax.random.key(1), x_T)
    samples = np.asarray(samples)
    stderr = np.sqrt(np.diag(np.asarray(law.covariance)) / n)
    np.testing.assert_array_less(np.abs(samples.mean(axis=0) - law.mean), 4 * stderr)
    np.testing.assert_allclose(
        np.cov(samples.T),
        law.covariance,
        atol=4 * float(np.max(np.diag(law.covariance))) * np.sqrt(2 / n),
    )
    assert int(law.nfe) == int(info.nfe[0]) == 13 and float(law.kl) > 0


def test_gaussian_sampler_law_jits_over_grids_and_traced_options(x64):
    sde = diffusion.make_sde("edm")
    law = jax.jit(
        lambda g, churn: diffusion.gaussian_sampler_law(
            "edm_heun", sde, MEAN, COV, g, S_churn=churn, final="none"
        )
    )
    coarse, fine = (jnp.asarray(diffusion.time_grid(sde, "karras", n)) for n in (8, 32))
    for grid in (coarse, fine):
        eager = diffusion.gaussian_sampler_law(
            "edm_heun", sde, MEAN, COV, grid, S_churn=1.0, final="none"
        )
        np.testing.assert_allclose(law(grid, 1.0).kl, eager.kl, rtol=1e-8)
    assert float(law(fine, 0.0).kl) < float(law(coarse, 0.0).kl)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda sde, g: diffusion.gaussian_sampler_law("predictor_corrector", sde, MEAN, COV, g),
            ValueError,
            "not affine",
        ),
        (
            lambda sde, g: diffusion.gaussian_sampler_law("pf_ode_adaptive", sde, MEAN, COV, g),
            ValueError,
            "not affine",
        ),
        (
            lambda sde, g: diffusion.gaussian_sampler_law("bogus", sde, MEAN, COV, g),
            ValueError,
            "sampler must be one of",
        ),
        (
            lambda sde, g: diffusion.gaussian_sampler_law("ddim", sde, MEAN[None], COV, g),
            ValueError,
            r"mean must be a vector",
        ),
        (
            lambda sde, g: diffusion.gaussian_sampler_law("ddim", sde, MEAN, COV[:1], g),
            ValueError,
            r"covariance must have shape \(2, 2\)",
        ),
        (
            lambda sde, g: diffusion.gaussian_sampler_law("ddim", sde, MEAN, -COV, g),
            ValueError,
            "covariance must be symmetric positive definite",
        ),
        (
            lambda sde, g: diffusion.gaussian_sampler_law("ddim", sde, MEAN, COV, g, etaa=0.5),
            TypeError,
            "ddim has no option etaa",
        ),
        (
            lambda sde, g: diffusion.gaussian_sampler_law("ddim", sde, MEAN, COV, g, final="bogus"),
            ValueError,
            "final must be one of",
        ),
    ],
)
def test_gaussian_sampler_law_bad_arguments(call, error, match):
    sde = diffusion.make_sde("vp")
    with pytest.raises(error, match=match):
        call(sde, jnp.asarray(diffusion.time_grid(sde, "uniform_time", 4)))
