"""Predictor–corrector guidance against exact laws: on Gaussian branches its output law is
exactly Gaussian, and its KL divergence to the γ-powered target p(x|c)^γ p(x)^(1-γ) falls as the
corrector steps grow, while CFG with DDIM misses the target by far; with no corrector it is
conditional DDIM, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion
from shufflesgd.diffusion.guidance import (
    classifier_free_guidance,
    conditional_mixture_model,
    predictor_corrector_guidance,
)
from shufflesgd.metrics import gaussian_kl
from shufflesgd.problems import conditional_mixture, gaussian_mixture

SDE = diffusion.make_sde("vp")
MC, SC = np.array([1.0, -0.5]), np.array([[0.3, 0.1], [0.1, 0.2]])
MU, SU = np.array([0.2, 0.1]), np.array([[1.5, 0.3], [0.3, 1.0]])
MODEL = conditional_mixture_model(
    SDE,
    conditional_mixture([1.0], [MC], [SC], [0], unconditional=gaussian_mixture([1.0], [MU], [SU])),
)
GRID = diffusion.time_grid(SDE, "uniform_time", 30)


def _powered_target(gamma):
    pc, pu = np.linalg.inv(SC), np.linalg.inv(SU)
    cov = np.linalg.inv(gamma * pc + (1 - gamma) * pu)
    return cov @ (gamma * pc @ MC + (1 - gamma) * pu @ MU), cov


def test_corrector_steps_approach_the_powered_target_that_cfg_misses():
    gamma = 4.0
    mean, cov = _powered_target(gamma)
    cfg = classifier_free_guidance(MODEL, 0, gamma)
    law = jax.jit(lambda: diffusion.exact_gaussian_law(diffusion.ddim, cfg, SDE, GRID, 2, 1))()
    kl_cfg = float(gaussian_kl(*law, mean, cov))
    kls = []
    for steps in (1, 4):
        law = jax.jit(
            lambda steps=steps: diffusion.exact_gaussian_law(
                predictor_corrector_guidance, MODEL, SDE, GRID, 2, steps,
                label=0, scale=gamma, corrector_steps=steps, step_scale=0.5 / gamma,
            )
        )()  # fmt: skip
        kls.append(float(gaussian_kl(*law, mean, cov)))
    assert kl_cfg > 1.0
    assert kls[0] < kl_cfg / 10
    assert kls[1] < kls[0] / 4


def test_no_corrector_is_conditional_ddim_and_the_cost_is_counted():
    x_T = jax.random.normal(jax.random.key(1), (2,))
    key = jax.random.key(2)
    pcg, info = predictor_corrector_guidance(
        key, MODEL, SDE, x_T, GRID, label=0, scale=3.0, corrector_steps=0, final="none"
    )
    ddim, _ = diffusion.ddim(key, MODEL.given(0), SDE, x_T, GRID, final="none")
    np.testing.assert_array_equal(pcg, ddim)
    assert int(info.nfe) == 30
    _, info = predictor_corrector_guidance(
        key, MODEL, SDE, x_T, GRID, label=0, scale=3.0, corrector_steps=2
    )
    assert int(info.nfe) == 30 * (1 + 2 * 2) + 2
    assert int(info.nonfinite_step) == -1
    # with explicit noise the key is not used: the output is a function of (x_T, noise)
    noise = jax.random.normal(jax.random.key(3), (30, 2, 2))
    by_noise = [
        predictor_corrector_guidance(
            k, MODEL, SDE, x_T, GRID, label=0, scale=3.0, corrector_steps=2, noise=noise
        )[0]
        for k in (None, jax.random.key(4))
    ]
    np.testing.assert_array_equal(*by_noise)


def test_same_key_same_bits_and_batches():
    run = jax.jit(
        lambda key, x, scale: diffusion.sample_batch(
            predictor_corrector_guidance, key, MODEL, SDE, x, GRID,
            label=0, scale=scale, corrector_steps=2,
        )[0]
    )  # fmt: skip
    x_T = jax.random.normal(jax.random.key(3), (4, 2))
    first = run(jax.random.key(4), x_T, 2.0)
    np.testing.assert_array_equal(first, run(jax.random.key(4), x_T, 2.0))
    np.testing.assert_array_equal(first[1:3], run(jax.random.key(4), x_T, 2.0)[1:3])
    assert not np.array_equal(first, run(jax.random.key(5), x_T, 2.0))


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"corrector_steps": -1}, ValueError, "corrector_steps"),
        ({"step_scale": 0.0}, ValueError, "step_scale"),
        ({"scale": -0.5}, ValueError, "scale"),
        ({"label": 0.0}, TypeError, "label"),
    ],
)
def test_bad_options_fail_before_tracing(options, error, message):
    def untraceable(x, t, label):
        raise AssertionError("the model was traced")

    model = MODEL._replace(fn=untraceable)
    arguments = {"label": 0, "scale": 2.0, **options}
    with pytest.raises(error, match=message):
        predictor_corrector_guidance(jax.random.key(0), model, SDE, jnp.zeros(2), GRID, **arguments)
