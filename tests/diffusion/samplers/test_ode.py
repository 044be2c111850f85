"""Probability-flow ODE solvers and DDIM: measured orders from the exact output law on a Gaussian
target, Heun at the prior-mismatch floor, gradients through a deterministic sampler, the adaptive
Dopri5 solve at the floor with every model call counted, a failed solve reported, option errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion, metrics
from support.samplers import TARGET, call_sampler, exact_kl, exact_model, kl, order


@pytest.mark.parametrize(
    "name, sde_name, steps, expected",
    [
        ("pf_ode_euler", "edm", [20, 40, 80, 160], -2.0),  # first order: KL ~ error^2 ~ N^-2
        ("ddim", "vp", [20, 40, 80, 160], -2.0),
        ("pf_ode_heun", "edm", [5, 10, 20, 40], -4.0),  # second order: KL ~ N^-4
    ],
)
def test_measured_orders_on_the_exact_gaussian_law(name, sde_name, steps, expected, x64):
    slope, kls = order(name, diffusion.make_sde(sde_name), steps)
    assert abs(slope - expected) < 0.35, (slope, kls)


def test_heun_reaches_the_prior_mismatch_floor_on_vp(x64):
    """A perfect ODE solver's KL to p_eps is at least KL(prior || p_T) (transported by the flow)."""
    sde = diffusion.make_sde("vp")
    p_T = TARGET.diffuse(sde.alpha(sde.t_max), sde.sigma(sde.t_max))
    floor = float(metrics.gaussian_kl(jnp.zeros(2), jnp.eye(2), p_T.means[0], p_T.covariances[0]))
    fine = exact_kl("pf_ode_heun", sde, 400)
    assert abs(fine - floor) < 0.05 * floor


def test_gradient_through_a_deterministic_sampler(x64):
    sde = diffusion.make_sde("edm")
    grid = jnp.asarray(diffusion.time_grid(sde, "karras", 10))
    model = exact_model(sde)

    def output(x_T):
        return diffusion.pf_ode_heun(jax.random.key(0), model, sde, x_T, grid, final="none")[0]

    jac = jax.jacfwd(output)(jnp.zeros(2))
    jac_rev = jax.jacrev(output)(jnp.zeros(2))
    np.testing.assert_allclose(jac, jac_rev, rtol=1e-8)
    x = jnp.array([30.0, -10.0])  # affine: output(x) = output(0) + J x
    np.testing.assert_allclose(output(x), output(jnp.zeros(2)) + jac @ x, rtol=1e-8)


def test_pf_ode_adaptive_reaches_the_floor_with_counted_nfe(x64):
    """An accurate PF-ODE solve maps the prior to a law at KL(prior || p_T) from p_eps (the floor).
    The law comes from three solves (affine up to the tolerance); every model call is counted on
    the host and equals the reported 6 * num_steps + 1."""
    sde = diffusion.make_sde("edm", sigma_max=2.0)
    p_T = TARGET.diffuse(1.0, sde.t_max)
    floor = float(
        metrics.gaussian_kl(jnp.zeros(2), 4.0 * jnp.eye(2), p_T.means[0], p_T.covariances[0])
    )
    target = TARGET.diffuse(1.0, sde.t_min)
    calls = [0]

    def count():
        calls[0] += 1

    exact = exact_model(sde)

    def fn(x, t):
        jax.debug.callback(count)
        return exact.fn(x, t)

    grid = jnp.asarray([sde.t_max, 1.0, sde.t_min])  # only the end points matter
    counted = diffusion.Model(fn, "score")
    run = jax.jit(
        lambda x: diffusion.pf_ode_adaptive(
            None, counted, sde, x, grid, rtol=1e-6, atol=1e-6, final="none"
        )
    )
    outs = []
    for x_T in (jnp.zeros(2), 2.0 * jnp.eye(2)[0], 2.0 * jnp.eye(2)[1]):
        calls[0] = 0
        x, info = run(x_T)
        x.block_until_ready()
        outs.append(np.asarray(x))
        assert int(info.nfe) == calls[0] and int(info.nonfinite_step) == -1
    a = np.stack([outs[1] - outs[0], outs[2] - outs[0]], axis=1) / 2.0
    value = kl(outs[0], 4.0 * a @ a.T, target.means[0], target.covariances[0])
    assert abs(value - floor) < 1e-3 * floor, (value, floor)


def test_pf_ode_adaptive_reports_a_failed_solve():
    sde = diffusion.make_sde("edm")
    grid = jnp.asarray([sde.t_max, sde.t_min])
    x, info = jax.jit(
        lambda x: diffusion.pf_ode_adaptive(
            None, exact_model(sde), sde, x, grid, rtol=1e-8, atol=1e-8, max_steps=3
        )
    )(jnp.ones(2))
    assert np.all(np.isnan(x)) and int(info.nonfinite_step) == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: diffusion.ddim(
                jax.random.key(0),
                exact_model(diffusion.make_sde("vp")),
                diffusion.make_sde("vp"),
                jnp.ones(2),
                jnp.array([1.0, 0.5]),
                eta=1.5,
            ),
            "eta must lie in",
        ),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (call_sampler("pf_ode_adaptive", rtol=0.0), "rtol must be positive"),
        (call_sampler("pf_ode_adaptive", atol=-1.0), "atol must be positive"),
        (call_sampler("pf_ode_adaptive", max_steps=0), "max_steps must be a positive int"),
        (call_sampler("pf_ode_adaptive", grid=jnp.array([80.0, 1.0, 0.0])), "ends at sigma > 0"),
    ],
)
def test_bad_options(call, match):
    with pytest.raises(ValueError, match=match):
        call()
