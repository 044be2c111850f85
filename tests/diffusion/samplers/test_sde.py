"""Reverse-SDE samplers (Euler–Maruyama, predictor–corrector): the measured weak order from the
exact output law on a Gaussian target, predictor–corrector's mode weights and snr bias by Monte
Carlo, and option errors."""

import math

import jax
import jax.numpy as jnp
import pytest

from shufflesgd import diffusion
from support.samplers import MIXTURE, exact_model, order


@pytest.mark.parametrize(
    "name, sde_name, steps, expected",
    [
        ("euler_maruyama", "edm", [20, 40, 80, 160], -2.0),
    ],
)
def test_measured_orders_on_the_exact_gaussian_law(name, sde_name, steps, expected, x64):
    slope, kls = order(name, diffusion.make_sde(sde_name), steps)
    assert abs(slope - expected) < 0.35, (slope, kls)


def test_predictor_corrector_mode_weights_and_its_per_sample_step_bias(x64):
    """PC is not affine in its noise (the Langevin step uses |z|), so judge it by Monte Carlo:
    the right mode's weight (0.7) within 4 binomial standard errors at a small snr. A
    per-sample step eps(x) = 2 (r |z| / |s(x)|)^2 depends on x, so Langevin leaves
    p / eps ~ p |s|^2 invariant rather than p: at a large snr the narrow left mode gains weight."""
    sde = diffusion.make_sde("ve")
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_time", 100))
    n = 2000
    x_T = sde.prior_sample(jax.random.key(0), (n, 2))
    model = exact_model(sde, MIXTURE)
    sweep = jax.jit(
        lambda k, x, r: diffusion.sample_batch(
            diffusion.predictor_corrector, k, model, sde, x, grid, snr=r
        )
    )
    samples, info = sweep(jax.random.key(1), x_T, 0.01)
    assert abs(float(jnp.mean(samples[:, 0] > 0)) - 0.7) < 4 * math.sqrt(0.21 / n)
    assert int(info.nfe[0]) == 100 * 2 + 1  # N (M + 1) plus the final denoising evaluation
    biased, _ = sweep(jax.random.key(1), x_T, 0.3)
    assert float(jnp.mean(biased[:, 0] > 0)) < 0.7 - 4 * math.sqrt(0.21 / n)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: diffusion.predictor_corrector(
                jax.random.key(0),
                exact_model(diffusion.make_sde("vp")),
                diffusion.make_sde("vp"),
                jnp.ones(2),
                jnp.array([1.0, 0.5]),
                snr=0.0,
            ),
            "snr must be positive",
        ),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
