"""Forward processes: drift/diffusion consistent with alpha/sigma, marginals by simulation,
log-SNR inverses, output conversions, time grids and discrete spacings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion, problems

NAMES = ["vp", "subvp", "ve", "edm"]


@pytest.mark.parametrize("name", NAMES)
def test_drift_and_diffusion_follow_from_alpha_and_sigma(name, x64):
    """f = d log(alpha)/dt and g^2 = d sigma^2/dt - 2 f sigma^2 (Kingma et al. 2021, App. A)."""
    sde = diffusion.make_sde(name)
    t = jnp.linspace(sde.t_min, sde.t_max, 7)
    f = jax.vmap(jax.grad(sde.log_alpha))(t)
    g2 = jax.vmap(jax.grad(lambda s: sde.sigma(s) ** 2))(t) - 2 * f * sde.sigma(t) ** 2
    np.testing.assert_allclose(f, sde.drift_coefficient(t), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g2, sde.diffusion_squared(t), rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_time_of_log_snr_inverts_log_snr(name, x64):
    sde = diffusion.make_sde(name)
    t = jnp.linspace(sde.t_min, sde.t_max, 9)
    np.testing.assert_allclose(sde.time_of_log_snr(sde.log_snr(t)), t, rtol=1e-9)
    np.testing.assert_allclose(diffusion.time_of_sigma(sde, sde.sigma(t)), t, rtol=1e-7)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_forward_marginals_by_simulation(name, x64):
    """Euler–Maruyama on the forward SDE from x0 reproduces mean alpha x0 and variance sigma^2
    (minus the t=0 offset for VE) within Monte Carlo error."""
    sde = diffusion.make_sde(name)
    x0, t_end, steps, paths = 1.5, 0.5, 2000, 20000
    dt = t_end / steps

    def step(x, inputs):
        t, key = inputs
        z = jax.random.normal(key, x.shape)
        noise = jnp.sqrt(sde.diffusion_squared(t) * dt) * z
        return x + sde.drift_coefficient(t) * x * dt + noise, None

    keys = jax.random.split(jax.random.key(0), steps)
    ts = jnp.arange(steps) * dt
    x, _ = jax.lax.scan(step, jnp.full((paths,), x0), (ts, keys))
    mean_expected = float(sde.alpha(t_end)) * x0
    var_expected = float(sde.sigma(t_end)) ** 2
    if name == "ve":  # data at t=0 already carries N(0, sigma_min^2)
        var_expected -= float(sde.sigma(0.0)) ** 2
    var = float(jnp.var(x))
    assert abs(float(jnp.mean(x)) - mean_expected) < 4 * math.sqrt(var / paths)
    # var of the sample variance of a Gaussian: 2 sigma^4 / n; plus O(dt) discretisation
    assert abs(var - var_expected) < 4 * var_expected * math.sqrt(2 / paths) + 5e-3 * var_expected


def test_gaussian_mixture_diffuses_in_closed_form(x64):
    gm = problems.gaussian_mixture(
        [0.4, 0.6], [[0.0, 1.0], [2.0, -1.0]], [np.eye(2) * 0.5, [[1.0, 0.3], [0.3, 0.8]]]
    )
    sde = diffusion.make_sde("vp")
    t = 0.3
    marginal = gm.diffuse(sde.alpha(t), sde.sigma(t))
    samples = sde.alpha(t) * gm.sample(jax.random.key(0), 200000) + sde.sigma(
        t
    ) * jax.random.normal(jax.random.key(1), (200000, 2))
    sample_mean = jnp.mean(samples, axis=0)
    exact_mean = jnp.sum(jnp.exp(marginal.log_weights)[:, None] * marginal.means, axis=0)
    np.testing.assert_allclose(
        sample_mean, exact_mean, atol=4 * float(jnp.max(jnp.std(samples, axis=0))) / np.sqrt(2e5)
    )
    x = jnp.array([0.3, -0.2])
    np.testing.assert_allclose(marginal.score(x), jax.grad(marginal.log_prob)(x), rtol=1e-10)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("source", diffusion.MODEL_OUTPUTS)
def test_model_output_conversions_round_trip_and_agree_with_the_exact_score(name, source, x64):
    sde = diffusion.make_sde(name)
    gm = problems.gaussian_mixture(
        [0.5, 0.5], [[0.0, 1.0], [2.0, -1.0]], [np.eye(2), np.eye(2) * 0.3]
    )
    t = jnp.asarray(0.4 * sde.t_max)
    x = jnp.array([0.7, -0.3])
    score = gm.diffuse(sde.alpha(t), sde.sigma(t)).score(x)
    output = diffusion.convert(score, "score", source, x, t, sde)
    for target in diffusion.MODEL_OUTPUTS:
        there = diffusion.convert(output, source, target, x, t, sde)
        np.testing.assert_allclose(
            diffusion.convert(there, target, source, x, t, sde), output, rtol=1e-9, atol=1e-12
        )
    eps = diffusion.convert(output, source, "eps", x, t, sde)
    np.testing.assert_allclose(eps, -sde.sigma(t) * score, rtol=1e-9)
    x0 = diffusion.convert(output, source, "x0", x, t, sde)
    np.testing.assert_allclose(sde.alpha(t) * x0 + sde.sigma(t) * eps, x, rtol=1e-9)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: diffusion.make_sde("bogus"), "sde must be one of"),
        (lambda: diffusion.make_sde("vp", t_min=1.0, t_max=0.5), "t_min must be below t_max"),
        (lambda: diffusion.time_grid(diffusion.make_sde("vp"), "bogus", 4), "grid must be one of"),
        (
            lambda: diffusion.time_grid(diffusion.make_sde("vp"), "karras", 0),
            "num_steps must be a positive int",
        ),
        (
            lambda: diffusion.time_grid(
                diffusion.make_sde("vp"), "karras", 4, t_min=0.5, t_max=0.5
            ),
            "t_min must be below t_max",
        ),
        (
            lambda: diffusion.time_grid(diffusion.make_sde("edm"), "karras", 4, rho=0.0),
            "rho must be positive",
        ),
        (
            lambda: diffusion.convert(
                jnp.ones(2), "bogus", "eps", jnp.ones(2), 0.5, diffusion.make_sde("vp")
            ),
            "model output must be",
        ),
        (lambda: diffusion.discrete_timesteps(1000, 10, "bogus"), "spacing must be"),
        (lambda: diffusion.discrete_timesteps(10, 20, "leading"), "num_steps must lie in"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
