"""EDM's Heun sampler: without churn it is second-order Heun (pf_ode_heun on EDM, N^-4 on VP); with
churn it follows Karras et al.'s Alg. 2 written out in NumPy; the churn is a traced argument; option
errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion
from support.samplers import MIXTURE, call_sampler, exact_model, flow_kls, jitted, slope


def test_edm_heun_without_churn_is_second_order_heun(x64):
    """On EDM (alpha = 1, sigma = t) it is pf_ode_heun; on VP (Heun in sigma/alpha on x/alpha) its
    KL to the exact flow's law still falls as N^-4."""
    sde = diffusion.make_sde("edm")
    grid = diffusion.time_grid(sde, "karras", 10)
    model = exact_model(sde, MIXTURE)
    x_T = sde.prior_sample(jax.random.key(0), (2,))
    ours, info = jitted("edm_heun", model, sde, grid, final="none")(jax.random.key(1), x_T)
    heun, _ = jitted("pf_ode_heun", model, sde, grid, final="none")(None, x_T)
    np.testing.assert_allclose(ours, heun, rtol=1e-12)
    assert int(info.nfe) == 20
    steps = [10, 20, 40]
    kls = flow_kls("edm_heun", diffusion.make_sde("vp"), "uniform_log_snr", steps)
    assert abs(slope(steps, kls) + 4.0) < 0.35, kls


def test_edm_heun_churn_follows_algorithm_2(x64):
    """Karras et al. Alg. 2 in NumPy with a linear denoiser D(x; sigma) = k x, explicit noise, a
    grid ending at sigma = 0 (Euler last step) and a churn window [S_tmin, S_tmax]."""
    sde = diffusion.make_sde("edm")
    grid = np.array([10.0, 5.0, 2.0, 1.0, 0.3, 0.0])
    k, churn, s_tmin, s_tmax, s_noise = 0.3, 4.0, 0.5, 6.0, 1.1
    model = diffusion.Model(lambda x, t: k * x, "x0")
    noise = jax.random.normal(jax.random.key(2), (5, 1, 2))
    x_T = jnp.array([4.0, -7.0])
    ours, info = jax.jit(
        lambda x: diffusion.edm_heun(
            None,
            model,
            sde,
            x,
            jnp.asarray(grid),
            S_churn=churn,
            S_tmin=s_tmin,
            S_tmax=s_tmax,
            S_noise=s_noise,
            final="denoise",
            noise=noise,
        )
    )(x_T)
    x, n = np.asarray(x_T), len(grid) - 1
    for i in range(n):
        s, s_next = grid[i], grid[i + 1]
        gamma = min(churn / n, np.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        x_hat = x + np.sqrt(s_hat**2 - s**2) * s_noise * np.asarray(noise[i, 0])
        d = (x_hat - k * x_hat) / s_hat
        x = x_hat + (s_next - s_hat) * d
        if s_next > 0:
            x = x_hat + (s_next - s_hat) * 0.5 * (d + (x - k * x) / s_next)
    np.testing.assert_allclose(ours, x, rtol=1e-12)
    assert int(info.nfe) == 2 * n - 1  # Euler last step; no denoising at sigma = 0


def test_hyper_parameters_are_traced():
    """One compiled program serves a vmapped sweep of churn (and restart intervals, above; threshold
    quantiles in the thresholding test)."""
    sde = diffusion.make_sde("edm")
    grid = jnp.asarray(diffusion.time_grid(sde, "karras", 6))
    model = exact_model(sde, MIXTURE)
    x_T = jnp.array([30.0, -50.0])

    def churn(c):
        return diffusion.edm_heun(jax.random.key(0), model, sde, x_T, grid, S_churn=c)[0]

    values = [0.0, 3.0, 40.0]
    swept = jax.jit(jax.vmap(churn))(jnp.array(values))
    one = jax.jit(churn)
    for row, value in zip(swept, values):
        np.testing.assert_allclose(row, one(value), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(swept[1] - swept[0])) > 1e-3  # churn does change the sample


@pytest.mark.parametrize(
    "call, match",
    [
        (call_sampler("edm_heun", S_churn=-1.0), "S_churn must be >= 0"),
        (call_sampler("edm_heun", S_noise=0.0), "S_noise must be positive"),
        (call_sampler("edm_heun", S_tmin=2.0, S_tmax=1.0), "S_tmin must not exceed S_tmax"),
        (call_sampler("edm_heun", grid=jnp.array([1.0, 2.0])), "strictly decreasing"),
    ],
)
def test_bad_options(call, match):
    with pytest.raises(ValueError, match=match):
        call()
