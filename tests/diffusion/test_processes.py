"""Forward processes: drift/diffusion consistent with alpha/sigma (by differentiation and by
integrating the mean and variance ODEs), marginals by simulation, log-SNR inverses, output
conversions (the velocity among them: the probability-flow drift and the time derivative of the
interpolant's conditional expectation), time grids and discrete spacings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion, problems
from support.samplers import exact_model, exact_velocity_model

NAMES = ["vp", "subvp", "ve", "edm", "flow", "trig"]


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


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "flow", "trig"])
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


@pytest.mark.parametrize("name", NAMES)
def test_mean_and_variance_odes_integrate_to_alpha_and_sigma(name, x64):
    """The forward SDE dx = f x dt + g dw moves the mean and variance of x_t | x_0 by
    d alpha/dt = f alpha and d sigma^2/dt = 2 f sigma^2 + g^2; integrated numerically (RK4,
    uniform in t) from t_min, they land on alpha(t) and sigma(t)^2 up to t_max."""
    sde = diffusion.make_sde(name)
    steps = 4000
    ts = np.linspace(sde.t_min, sde.t_max, steps + 1)
    h = (sde.t_max - sde.t_min) / steps

    def rhs(t, y):
        f, g2 = sde.drift_coefficient(t), sde.diffusion_squared(t)
        return jnp.stack([f * y[0], 2.0 * f * y[1] + g2])

    def rk4(y, t):
        k1 = rhs(t, y)
        k2 = rhs(t + h / 2, y + h / 2 * k1)
        k3 = rhs(t + h / 2, y + h / 2 * k2)
        k4 = rhs(t + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y, y

    y0 = jnp.stack([sde.alpha(sde.t_min), sde.sigma(sde.t_min) ** 2])
    _, ys = jax.lax.scan(rk4, y0, jnp.asarray(ts[:-1]))
    t = jnp.asarray(ts[1:])
    np.testing.assert_allclose(ys[:, 0], sde.alpha(t), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ys[:, 1], sde.sigma(t) ** 2, rtol=1e-6, atol=1e-9)


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


@pytest.mark.parametrize("name", NAMES)
def test_velocity_is_the_pf_ode_drift_and_the_time_derivative_of_the_interpolant(name, x64):
    """The velocity converted from the exact score of a Gaussian mixture equals (i) the
    probability-flow drift f x - g^2 s / 2, (ii) E[d x_t / dt | x_t] by central differences of
    alpha and sigma at the conditional expectations E[x0 | x_t], E[eps | x_t], and (iii) the
    closed-form mixture velocity computed per component (support.samplers)."""
    sde = diffusion.make_sde(name)
    mixture = problems.gaussian_mixture(
        [0.4, 0.6], [[0.0, 1.0], [2.0, -1.0]], [np.eye(2) * 0.5, [[1.0, 0.3], [0.3, 0.8]]]
    )
    x = jnp.array([0.7, -0.3])
    h = 1e-5 * sde.t_max
    for t in (jnp.asarray(0.3 * sde.t_max), jnp.asarray(0.8 * sde.t_max)):
        score = exact_model(sde, mixture).fn(x, t)
        velocity = diffusion.convert(score, "score", "velocity", x, t, sde)
        drift = sde.reverse_drift(x, t, score, probability_flow=True)
        np.testing.assert_allclose(velocity, drift, rtol=1e-10, atol=1e-12)
        x0, eps = (diffusion.convert(score, "score", out, x, t, sde) for out in ("x0", "eps"))
        d_alpha = (sde.alpha(t + h) - sde.alpha(t - h)) / (2 * h)
        d_sigma = (sde.sigma(t + h) - sde.sigma(t - h)) / (2 * h)
        np.testing.assert_allclose(velocity, d_alpha * x0 + d_sigma * eps, rtol=1e-7, atol=1e-9)
        closed_form = exact_velocity_model(sde, mixture).fn(x, t)
        np.testing.assert_allclose(velocity, closed_form, rtol=1e-9, atol=1e-12)
        model = diffusion.Model(lambda x, t, u=closed_form: u, "velocity")
        np.testing.assert_array_equal(diffusion.pf_ode_drift(model, sde, x, t), closed_form)


def _reference_convert(output, source, target, x, t, sde):
    """convert() between score, eps, x0 and v as it was before the velocity was added."""
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    if source == target:
        return output
    if source == "score":
        eps = -sigma * output
    elif source == "x0":
        eps = (x - alpha * output) / sigma
    elif source == "v":
        eps = (sigma * x + alpha * output) / (alpha**2 + sigma**2)
    else:
        eps = output
    if target == "eps":
        return eps
    if target == "score":
        return -eps / sigma
    x0 = (x - sigma * eps) / alpha
    if target == "x0":
        return x0
    return alpha * eps - sigma * x0


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "edm"])
def test_conversions_between_the_original_outputs_are_unchanged(name, x64):
    """Adding the velocity leaves the arithmetic of the other conversions bit for bit, and the
    probability-flow drift of a score model is still f x - g^2 s / 2, exactly."""
    sde = diffusion.make_sde(name)
    x, t = jnp.array([0.7, -0.3, 1.9]), jnp.asarray(0.37 * sde.t_max)
    output = jnp.array([0.25, -1.5, 0.8])
    for source in ("score", "eps", "x0", "v"):
        for target in ("score", "eps", "x0", "v"):
            np.testing.assert_array_equal(
                diffusion.convert(output, source, target, x, t, sde),
                _reference_convert(output, source, target, x, t, sde),
            )
        model = diffusion.Model(lambda x, t, source=source: output, source)
        score = _reference_convert(output, source, "score", x, t, sde)
        np.testing.assert_array_equal(
            diffusion.pf_ode_drift(model, sde, x, t),
            sde.drift_coefficient(t) * x - 0.5 * sde.diffusion_squared(t) * score,
        )


def test_interpolants_validate_their_time_range():
    assert diffusion.make_sde("flow", t_max=1.0).t_max == 1.0
    assert diffusion.make_sde("trig", t_min=0.0, t_max=1.0).t_min == 0.0
    for name in ("flow", "trig"):
        with pytest.raises(ValueError, match="t_max must be at most 1"):
            diffusion.make_sde(name, t_max=1.5)
        with pytest.raises(ValueError, match="t_min must be below t_max"):
            diffusion.make_sde(name, t_min=-0.1)
        with pytest.raises(ValueError, match="t_max must be finite"):
            diffusion.make_sde(name, t_max=float("nan"))


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
