"""Epsilon Scaling: the identity at k = 0, b = 1; every output kind agrees with eps / lambda; the
exact output law of DDIM and ancestral sampling with the scaled model against an affine map
composed in NumPy; the authors' EDM-ES denoiser; traced k and b; argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion, problems
from support.samplers import MIXTURE, TARGET, exact_model

OUTPUTS = ("score", "eps", "x0", "v")


def _points(sde, n=64):
    """Random states and times spread over the process's time range."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (n, 2)), np.float64) * 2.0
    t = np.geomspace(max(sde.t_min, 1e-3), sde.t_max, n)
    return jnp.asarray(x), jnp.asarray(t)


@pytest.mark.parametrize("sde_name", ["vp", "edm"])
def test_unit_scale_returns_the_model_output_bit_for_bit(sde_name, x64):
    """k = 0, b = 1: the wrapped function returns the model's output bit for bit, eagerly and
    compiled (k, b traced); a sampler's output then agrees to round-off (XLA may contract the
    multiply-adds of a different program differently)."""
    sde = diffusion.make_sde(sde_name)
    x, t = _points(sde)
    grid = jnp.asarray(diffusion.time_grid(sde, "karras", 6))
    for output in OUTPUTS:
        model = exact_model(sde, MIXTURE, output)
        scaled = diffusion.epsilon_scaling(model, sde, 0.0, 1.0)
        assert scaled.output == output
        np.testing.assert_array_equal(scaled.fn(x[17], t[17]), model.fn(x[17], t[17]))  # eagerly
        compiled = jax.jit(
            jax.vmap(
                lambda x, t, k, b, m=model: diffusion.epsilon_scaling(m, sde, k, b).fn(x, t),
                in_axes=(0, 0, None, None),
            )
        )
        np.testing.assert_array_equal(compiled(x, t, 0.0, 1.0), jax.jit(jax.vmap(model.fn))(x, t))
    name, output = {"vp": ("dpm_solver_pp_2m", "v"), "edm": ("edm_heun", "x0")}[sde_name]
    model, sampler = exact_model(sde, MIXTURE, output), diffusion.make_sampler(name)
    scaled = jax.jit(
        lambda k, b: sampler(
            jax.random.key(0), diffusion.epsilon_scaling(model, sde, k, b), sde, x[3], grid
        )[0]
    )
    plain = jax.jit(lambda: sampler(jax.random.key(0), model, sde, x[3], grid)[0])
    np.testing.assert_allclose(scaled(0.0, 1.0), plain(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sde_name", ["vp", "edm"])
def test_every_output_kind_is_the_scaled_noise_prediction(sde_name, x64):
    """Whatever the model predicts, every conversion of the wrapped output is that of
    eps / (k t + b), eps the exact noise prediction (computed from the score here)."""
    sde = diffusion.make_sde(sde_name)
    x, t = _points(sde)
    k, b = (0.3, 1.05) if sde_name == "vp" else (0.002, 0.97)
    eps = jax.vmap(exact_model(sde, MIXTURE, "eps").fn)(x, t)
    scaled_eps = eps / (k * t + b)[:, None]
    for source in OUTPUTS:
        model = diffusion.epsilon_scaling(exact_model(sde, MIXTURE, source), sde, k, b)
        for target in OUTPUTS:
            ours = jax.vmap(lambda x, t, m=model, o=target: m.predict(sde, x, t, o))(x, t)
            want = jax.vmap(lambda e, x, t, o=target: diffusion.convert(e, "eps", o, x, t, sde))(
                scaled_eps, x, t
            )
            np.testing.assert_allclose(ours, want, rtol=1e-10, atol=1e-10, err_msg=source + target)


def test_edm_denoiser_is_the_authors_edm_es(x64):
    """EDM-ES (the authors' generate.py): eps = (x - D) / sigma, eps /= lambda,
    D' = x - eps * sigma; with alpha = 1 this is the x0 output of epsilon_scaling."""
    sde = diffusion.make_sde("edm")
    x, t = _points(sde)
    model = exact_model(sde, MIXTURE, "x0")
    scaled = diffusion.epsilon_scaling(model, sde, 0.0, 1.0048)
    d = np.asarray(jax.vmap(model.fn)(x, t))
    xs, ts = np.asarray(x), np.asarray(t)[:, None]
    want = xs - (xs - d) / ts / 1.0048 * ts
    np.testing.assert_allclose(jax.vmap(scaled.fn)(x, t), want, rtol=1e-12, atol=1e-12)


def reference_law(target, sde, grid, k, b, eta, final):
    """The output law of DDIM (eta = 0) or ancestral sampling (eta = 1) with the exact Gaussian
    noise prediction divided by lambda(t) = k t + b, composed in NumPy: the Gaussian target's
    eps(x, t) = sigma C_t^-1 (x - alpha mu), C_t = alpha^2 Sigma + sigma^2 I, makes every step
    the affine map x -> A x + B z + c (DDIM, Song et al. 2021, Eq. 12)."""
    mu, cov = np.asarray(target.means[0], np.float64), np.asarray(target.covariances[0])
    eye = np.eye(2)

    def coefficients(t):
        t = float(t)
        a, s = float(sde.alpha(t)), float(sde.sigma(t))
        gain = s * np.linalg.inv(a * a * cov + s * s * eye) / (k * t + b)  # eps' = G (x - a mu)
        return a, s, gain

    a_tot, b_cols, c_tot = eye.copy(), [], np.zeros(2)
    for t, t_next in zip(grid[:-1], grid[1:]):
        a, s, gain = coefficients(t)
        a_n, s_n = float(sde.alpha(t_next)), float(sde.sigma(t_next))
        c = eta * (s_n / s) * np.sqrt(max(s * s - (a / a_n) ** 2 * s_n * s_n, 0.0))
        # x_n = a_n (x - s eps') / a + sqrt(s_n^2 - c^2) eps' + c z
        w = np.sqrt(max(s_n * s_n - c * c, 0.0)) - a_n * s / a
        step = (a_n / a) * eye + w * gain
        shift = -w * gain @ (a * mu)
        a_tot, c_tot = step @ a_tot, step @ c_tot + shift
        b_cols = [step @ col for col in b_cols] + [c * eye]
    if final == "denoise":
        a, s, gain = coefficients(grid[-1])
        step, shift = eye / a - (s / a) * gain, (s / a) * gain @ (a * mu)
        a_tot, c_tot = step @ a_tot, step @ c_tot + shift
        b_cols = [step @ col for col in b_cols]
    bb = sum(col @ col.T for col in b_cols)
    return c_tot, sde.prior_std**2 * a_tot @ a_tot.T + bb


@pytest.mark.parametrize(
    "sde_name, output, k, b, name, final",
    [
        ("vp", "eps", 0.0, 1.1, "ddim", "none"),
        ("vp", "v", 0.25, 0.95, "ancestral", "denoise"),
        ("edm", "x0", 0.001, 1.0, "ddim", "denoise"),
    ],
)
def test_exact_law_with_scaling_is_the_closed_form(sde_name, output, k, b, name, final, x64):
    """exact_gaussian_law of DDIM / ancestral sampling run with the wrapped model (any output
    kind) equals the affine map composed in NumPy from eps / lambda; and the scaling moved it."""
    target = problems.gaussian_mixture([1.0], TARGET.means, TARGET.covariances)  # in float64
    sde = diffusion.make_sde(sde_name)
    grid = diffusion.time_grid(sde, "karras", 8)
    model = diffusion.epsilon_scaling(exact_model(sde, target, output), sde, k, b)
    sampler = diffusion.make_sampler(name)
    mean, cov = diffusion.exact_gaussian_law(
        sampler, model, sde, jnp.asarray(grid), 2, 1, final=final
    )
    eta = {"ddim": 0.0, "ancestral": 1.0}[name]
    ref_mean, ref_cov = reference_law(target, sde, grid, k, b, eta, final)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-12)
    plain_mean, plain_cov = reference_law(target, sde, grid, 0.0, 1.0, eta, final)
    assert np.max(np.abs(ref_cov - plain_cov)) > 1e-3 * np.max(np.abs(plain_cov))


def test_k_and_b_are_traced(x64):
    """One compiled program serves a sweep over (k, b): vmapped rows equal separate runs."""
    sde = diffusion.make_sde("vp")
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_log_snr", 5))
    model = exact_model(sde, MIXTURE, "eps")
    x_T = jnp.array([0.4, -1.1])

    def run(k, b):
        return diffusion.ddim(
            jax.random.key(0), diffusion.epsilon_scaling(model, sde, k, b), sde, x_T, grid
        )[0]

    ks, bs = jnp.array([0.0, 0.1, -0.05]), jnp.array([1.0, 1.02, 1.1])
    swept = jax.jit(jax.vmap(run))(ks, bs)
    one = jax.jit(run)
    for row, k, b in zip(swept, ks, bs):
        np.testing.assert_allclose(row, one(k, b), rtol=1e-12)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, s: diffusion.epsilon_scaling(m.fn, s, 0.0, 1.0), TypeError, "model must be"),
        (
            lambda m, s: diffusion.epsilon_scaling(diffusion.Model(m.fn, "logits"), s, 0.0, 1.0),
            ValueError,
            "model output must be one of",
        ),
        (lambda m, s: diffusion.epsilon_scaling(m, s, float("nan"), 1.0), ValueError, "k must be"),
        (lambda m, s: diffusion.epsilon_scaling(m, s, 0.0, float("inf")), ValueError, "b must be"),
        (lambda m, s: diffusion.epsilon_scaling(m, s, 0.0, 0.0), ValueError, "must be positive"),
        (lambda m, s: diffusion.epsilon_scaling(m, s, -2.0, 1.0), ValueError, "must be positive"),
        (lambda m, s: diffusion.epsilon_scaling(m, s, 0.0, [1.0, 1.1]), ValueError, "scalars"),
    ],
)
def test_bad_arguments(call, error, match):
    sde = diffusion.make_sde("vp")
    with pytest.raises(error, match=match):
        call(exact_model(sde), sde)
