"""Flow matching: the rectified-flow and trigonometric interpolants at their ends, the velocity
output, the probability-flow ODE from t = 1 (diffusers' FlowMatchEuler step, exactly), every
registered sampler on the new processes and the measured orders of the ODE solvers."""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from shufflesgd import diffusion
from support.samplers import (
    MIXTURE,
    TARGET,
    exact_model,
    exact_velocity_model,
    flow_kls,
    kl,
    slope,
)

FLOWS = ["flow", "trig"]
MEAN, COV = np.asarray(TARGET.means[0], np.float64), np.asarray(TARGET.covariances[0], np.float64)
AFFINE = sorted(name for name, spec in diffusion.SAMPLERS.items() if spec.affine)


@pytest.mark.parametrize("name", FLOWS)
def test_interpolants_end_exactly_at_data_and_noise(name, x64):
    """alpha(0) = 1, sigma(0) = 0, alpha(1) = 0, sigma(1) = 1 exactly; the log-SNR runs from +inf
    to -inf and its inverse maps the infinities back to the ends; f and g^2 blow up at t = 1."""
    sde = diffusion.make_sde(name)
    assert (float(sde.alpha(0.0)), float(sde.sigma(0.0))) == (1.0, 0.0)
    assert (float(sde.alpha(1.0)), float(sde.sigma(1.0))) == (0.0, 1.0)
    assert float(sde.log_snr(0.0)) == math.inf and float(sde.log_snr(1.0)) == -math.inf
    assert float(sde.time_of_log_snr(math.inf)) == 0.0
    np.testing.assert_allclose(float(sde.time_of_log_snr(-math.inf)), 1.0, rtol=1e-15)
    assert float(sde.drift_coefficient(1.0)) == -math.inf
    assert float(sde.diffusion_squared(1.0)) == math.inf
    assert sde.prior_std == 1.0 and sde.velocity_drift
    assert (sde.t_min, sde.t_max) == (1e-3, 1.0 - 1e-3)


@pytest.mark.parametrize("name", FLOWS)
def test_closed_forms_and_analytic_derivatives(name, x64):
    sde = diffusion.make_sde(name)
    t = jnp.linspace(0.0, 1.0, 11)
    if name == "flow":
        alpha, sigma = 1.0 - t, t
    else:
        alpha, sigma = jnp.cos(0.5 * np.pi * t), jnp.sin(0.5 * np.pi * t)
    np.testing.assert_allclose(sde.alpha(t), alpha, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(sde.sigma(t), sigma, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(
        sde.alpha_dot(t), jax.vmap(jax.grad(sde.alpha))(t), rtol=1e-13, atol=1e-15
    )
    np.testing.assert_allclose(
        sde.sigma_dot(t), jax.vmap(jax.grad(sde.sigma))(t), rtol=1e-13, atol=1e-15
    )


@pytest.mark.parametrize("name", ["vp", "subvp", "ve", "edm"])
def test_generic_time_derivatives_of_the_diffusions(name, x64):
    """The base class differentiates alpha and sigma forward-mode: alpha' = f alpha and
    sigma' = (g^2 + 2 f sigma^2) / (2 sigma) from the definitions of f and g^2."""
    sde = diffusion.make_sde(name)
    t = jnp.linspace(sde.t_min, sde.t_max, 7)
    f, g2, sigma = sde.drift_coefficient(t), sde.diffusion_squared(t), sde.sigma(t)
    np.testing.assert_allclose(sde.alpha_dot(t), f * sde.alpha(t), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sde.sigma_dot(t), (g2 + 2 * f * sigma**2) / (2 * sigma), rtol=1e-9)


def test_velocity_of_the_two_interpolants(x64):
    """Rectified flow: u = eps - x0.  Trigonometric: u = (pi/2) (alpha eps - sigma x0), Salimans
    & Ho's v rescaled."""
    x, t = jnp.array([0.7, -0.3]), jnp.asarray(0.35)
    for name in FLOWS:
        sde = diffusion.make_sde(name)
        velocity = exact_velocity_model(sde, MIXTURE).fn(x, t)
        x0, eps, v = (
            diffusion.convert(velocity, "velocity", out, x, t, sde) for out in ("x0", "eps", "v")
        )
        expected = eps - x0 if name == "flow" else 0.5 * np.pi * v
        np.testing.assert_allclose(velocity, expected, rtol=1e-12)


@pytest.mark.parametrize("name", FLOWS)
def test_a_velocity_model_is_finite_at_t_equal_1(name, x64):
    """At t = 1, x_1 = eps carries nothing about the data: x0 = E[x0] (the mixture's mean),
    eps = x, score = -x and v = -x0, all finite from the velocity; a score model cannot say."""
    sde = diffusion.make_sde(name, t_max=1.0)
    x, t = jnp.array([0.7, -0.3]), jnp.asarray(1.0)
    velocity = exact_velocity_model(sde, MIXTURE).fn(x, t)
    weights = np.exp(np.asarray(MIXTURE.log_weights, np.float64))
    mean = weights / weights.sum() @ np.asarray(MIXTURE.means, np.float64)
    convert = lambda out: diffusion.convert(velocity, "velocity", out, x, t, sde)  # noqa: E731
    np.testing.assert_allclose(convert("x0"), mean, rtol=1e-12)
    np.testing.assert_allclose(convert("eps"), x, rtol=1e-12)
    np.testing.assert_allclose(convert("score"), -x, rtol=1e-12)
    np.testing.assert_allclose(convert("v"), -mean, rtol=1e-12)
    for out in ("x0", "v"):  # and back to the velocity from an x0 or v model
        np.testing.assert_allclose(
            diffusion.convert(convert(out), out, "velocity", x, t, sde), velocity, rtol=1e-12
        )
    assert not np.all(np.isfinite(diffusion.convert(-x, "score", "velocity", x, t, sde)))


def test_ddim_is_euler_on_the_rectified_flow(x64):
    """DDIM's step alpha_s x0 + sigma_s eps equals x + (s - t)(eps - x0) when alpha = 1 - t,
    sigma = t: the two samplers agree for every model output."""
    for sde, model in (
        (diffusion.make_sde("flow"), exact_model(diffusion.make_sde("flow"), MIXTURE)),
        (
            diffusion.make_sde("flow", t_max=1.0),
            exact_velocity_model(diffusion.make_sde("flow"), MIXTURE),
        ),
    ):
        grid = jnp.asarray(diffusion.time_grid(sde, "shifted", 12))
        x_T = sde.prior_sample(jax.random.key(0), (2,))
        euler, _ = diffusion.pf_ode_euler(None, model, sde, x_T, grid, final="none")
        ddim, _ = diffusion.ddim(
            jax.random.key(1), model, sde, x_T, grid, final="none", noise=jnp.zeros((12, 1, 2))
        )
        np.testing.assert_allclose(euler, ddim, rtol=1e-12, atol=1e-12)


def test_pf_ode_euler_is_flow_match_euler_from_t_equal_1(x64):
    """pf_ode_euler with a velocity model on the rectified flow from t = 1 to 0 is diffusers'
    FlowMatchEulerDiscreteScheduler: sigmas = shift s / (1 + (shift - 1) s) on s = 1 - i/N,
    prev_sample = sample + (sigma_next - sigma) * model_output.  Every model call is recorded and
    the NumPy loop replays the recursion on the recorded outputs, checking the (x, t) of each
    call to the last bit: the state after a step is x + (t_next - t) u rounded once (XLA on CPU
    fuses the multiply-add, computed here exactly with fractions) or rounded twice (NumPy's
    unfused arithmetic, as PyTorch evaluates the scheduler); the outputs are the exact velocity."""
    sde = diffusion.make_sde("flow", t_min=0.0, t_max=1.0)
    n, shift = 10, 3.0
    grid = diffusion.time_grid(sde, "shifted", n, shift=shift)
    s = np.linspace(1.0, 0.0, n + 1)
    np.testing.assert_allclose(grid, shift * s / (1 + (shift - 1) * s), rtol=1e-14, atol=0)
    assert grid[0] == 1.0 and grid[-1] == 0.0
    exact = exact_velocity_model(sde, MIXTURE)
    calls = []

    def record(x, t, u):
        calls.append((np.asarray(x), float(t), np.asarray(u)))
        return np.zeros((), np.float64)

    def fn(x, t):
        u = exact.fn(x, t)
        tick = io_callback(record, jax.ShapeDtypeStruct((), jnp.float64), x, t, u, ordered=True)
        return u + tick

    x_T = sde.prior_sample(jax.random.key(4), (2,))
    run = jax.jit(
        lambda x: diffusion.pf_ode_euler(
            None, diffusion.Model(fn, "velocity"), sde, x, jnp.asarray(grid), final="none"
        )
    )
    ours, info = run(x_T)
    assert int(info.nfe) == n == len(calls)
    x, unfused = np.asarray(x_T), np.asarray(x_T)
    states = [x_called for x_called, _, _ in calls[1:]] + [np.asarray(ours)]
    for i, ((x_called, t_called, u), x_next) in enumerate(zip(calls, states)):
        np.testing.assert_array_equal(x_called, x)
        assert t_called == grid[i]
        np.testing.assert_allclose(u, exact.fn(jnp.asarray(x), grid[i]), rtol=1e-12)
        dt = grid[i + 1] - grid[i]
        once = [float(Fraction(a) + Fraction(dt) * Fraction(b)) for a, b in zip(x, u)]
        twice = x + dt * u  # FlowMatchEulerDiscreteScheduler.step
        assert np.all((x_next == once) | (x_next == twice)), (x_next, once, twice)
        x = x_next
        unfused = unfused + dt * u
    np.testing.assert_allclose(ours, unfused, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", FLOWS)
def test_the_velocity_path_from_t_equal_1_converges_to_the_data(name, x64):
    """From the exact prior N(0, I) at t = 1 to t = 0 on the shifted grid, with the exact
    velocity: no prior mismatch, so the KL to the data itself goes to 0, as N^-2 for Euler (order
    1) and N^-4 for Heun (order 2); DDIM converges too."""
    sde = diffusion.make_sde(name, t_min=0.0, t_max=1.0)
    model = exact_velocity_model(sde)
    steps = [10, 20, 40]
    points = jnp.concatenate([jnp.zeros((1, 2)), jnp.eye(2)])

    def kls(sampler):  # the affine map x_T -> x from three runs, its law under N(0, I)
        out = []
        for n in steps:
            grid = jnp.asarray(diffusion.time_grid(sde, "shifted", n))
            run = jax.vmap(
                lambda x, grid=grid, n=n: diffusion.make_sampler(sampler)(
                    None, model, sde, x, grid, final="none", noise=jnp.zeros((n, 1, 2))
                )[0]
            )
            x = np.asarray(jax.jit(run)(points))
            a = (x[1:] - x[0]).T
            out.append(kl(x[0], a @ a.T, MEAN, COV))
        return out

    euler, heun, ddim = kls("pf_ode_euler"), kls("pf_ode_heun"), kls("ddim")
    assert abs(slope(steps, euler) + 2.0) < 0.35, euler
    assert abs(slope(steps, heun) + 4.0) < 0.35, heun
    assert np.all(np.diff(ddim) < 0) and ddim[-1] < 1e-2, ddim


@pytest.mark.parametrize("name, output", [("flow", "x0"), ("trig", "v")])
def test_the_adaptive_solve_from_t_equal_1_with_an_x0_or_v_model(name, output, x64):
    """The drift of an x0 or v model is its velocity, finite at t = 1: Dopri5 from the exact
    prior at t = 1 down to t_min, then the denoiser, lands on the data (KL ~ 1e-12)."""
    sde = diffusion.make_sde(name, t_max=1.0)
    velocity = exact_velocity_model(sde)
    model = diffusion.Model(
        lambda x, t: diffusion.convert(velocity.fn(x, t), "velocity", output, x, t, sde), output
    )
    grid = jnp.asarray([1.0, sde.t_min])
    points = jnp.concatenate([jnp.zeros((1, 2)), jnp.eye(2)])
    solve = jax.vmap(
        lambda x: diffusion.pf_ode_adaptive(None, model, sde, x, grid, rtol=1e-8, atol=1e-8)
    )
    x, info = jax.jit(solve)(points)
    x = np.asarray(x)
    a = (x[1:] - x[0]).T
    assert np.all(np.asarray(info.nonfinite_step) == -1)
    assert kl(x[0], a @ a.T, MEAN, COV) < 1e-9


@pytest.mark.parametrize("name", AFFINE)
def test_every_affine_sampler_converges_on_the_rectified_flow(name, x64):
    """The defaults t in [1e-3, 1 - 1e-3] keep f and g^2 finite: every registered sampler runs
    unchanged (its defaults, the exact score model), and its exact output law approaches the data
    as the grid is refined (uniform in the log-SNR, where the reverse SDE's stiffness near t = 1,
    f = -1/(1-t), is resolved): 64 steps at least 3 times better than 16 (not necessarily
    monotone between: DPM-Solver-v3's pseudo-order corrector measured 7.8e-5, 9.1e-5, 4.8e-6 at
    N = 16, 32, 64)."""
    sde = diffusion.make_sde("flow")
    law = jax.jit(lambda g: diffusion.gaussian_sampler_law(name, sde, MEAN, COV, g).kl)
    kls = [
        float(law(jnp.asarray(diffusion.time_grid(sde, "uniform_log_snr", n)))) for n in (16, 64)
    ]
    assert kls[-1] < min(kls[0] / 3, 0.05), kls


@pytest.mark.parametrize("sde_name", FLOWS)
@pytest.mark.parametrize(
    "name, grid_kind, steps, expected",
    [
        ("pf_ode_euler", "uniform_time", [20, 40, 80, 160], -2.0),  # order 1: KL ~ N^-2
        ("dpm_solver_pp_2m", "uniform_log_snr", [20, 40, 80, 160], -4.0),  # order 2
    ],
)
def test_measured_orders_against_the_exact_flow(sde_name, name, grid_kind, steps, expected, x64):
    """KL to the exact probability-flow map's law (no prior-mismatch floor)."""
    kls = flow_kls(name, diffusion.make_sde(sde_name), grid_kind, steps)
    assert abs(slope(steps, kls) - expected) < 0.35, kls


@pytest.mark.parametrize("name", ["flow", "trig", "vp"])
def test_library_mixture_velocity_equals_the_independent_closed_form(name, x64):
    """diffusion.mixture_model(..., output="velocity") (EigenMixture.velocity) against the test
    suite's own closed form, at t = 0, inside and at t = 1 of the interpolants, and against the
    conversion from the exact score where that is finite."""
    t_max = 1.0 if name != "vp" else None
    sde = diffusion.make_sde(name, **({} if t_max is None else {"t_max": t_max}))
    ours = diffusion.mixture_model(sde, MIXTURE.eigen(), output="velocity")
    reference = exact_velocity_model(sde, MIXTURE)
    score = diffusion.mixture_model(sde, MIXTURE.eigen())
    x = jax.random.normal(jax.random.key(4), (2,), jnp.float64) * 2.0
    for t in (sde.t_min, 0.3, 0.7, sde.t_max):
        t = jnp.asarray(t, jnp.float64)
        got = ours.fn(x, t)
        assert np.all(np.isfinite(got)), (name, t)
        np.testing.assert_allclose(got, reference.fn(x, t), rtol=1e-12, atol=1e-12)
        if float(sde.alpha(t)) > 1e-3:
            converted = score.predict(sde, x, t, "velocity")
            np.testing.assert_allclose(got, converted, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="output must be 'score' or 'velocity'"):
        diffusion.mixture_model(sde, MIXTURE.eigen(), output="eps")
