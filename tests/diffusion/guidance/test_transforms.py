"""Guidance transforms against closed forms: CFG is the score of the noised γ-powered Gaussian,
guidance rescale, adaptive guidance and APG against direct NumPy transcriptions of their
papers' formulas and their limiting cases; bad options fail before anything is traced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion
from shufflesgd.diffusion.guidance import (
    NULL_LABEL,
    ConditionalModel,
    adaptive_guidance,
    classifier_free_guidance,
    conditional_mixture_model,
    guided_model,
    projected_guidance,
    rescaled_guidance,
)
from shufflesgd.problems import conditional_mixture, gaussian_mixture

SDE = diffusion.make_sde("vp")
MC, SC = np.array([1.0, -0.5]), np.array([[0.3, 0.1], [0.1, 0.2]])
MU, SU = np.array([0.2, 0.1]), np.array([[1.5, 0.3], [0.3, 1.0]])
MIXTURE = conditional_mixture(
    [1.0], [MC], [SC], [0], unconditional=gaussian_mixture([1.0], [MU], [SU])
)
MODEL = conditional_mixture_model(SDE, MIXTURE)
X, T = jnp.array([0.7, -1.2]), jnp.asarray(0.3)


def _branches(space):
    return [np.asarray(b, np.float64) for b in MODEL.predict_branches(SDE, X, T, 0, space)]


def test_cfg_is_the_score_of_the_noised_powered_gaussian():
    alpha, sigma = float(SDE.alpha(T)), float(SDE.sigma(T))
    for gamma in (0.0, 1.0, 3.0):
        pc = np.linalg.inv(alpha**2 * SC + sigma**2 * np.eye(2))
        pu = np.linalg.inv(alpha**2 * SU + sigma**2 * np.eye(2))
        x = np.asarray(X, np.float64)
        expected = -gamma * pc @ (x - alpha * MC) - (1 - gamma) * pu @ (x - alpha * MU)
        got = classifier_free_guidance(MODEL, 0, gamma).fn(X, T)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_cfg_is_the_same_in_every_output_space():
    eps_model = ConditionalModel(
        lambda x, t, c: diffusion.convert(MODEL.fn(x, t, c), "score", "eps", x, t, SDE), "eps"
    )
    by_eps = classifier_free_guidance(eps_model, 0, 2.5)
    by_score = classifier_free_guidance(MODEL, 0, 2.5)
    np.testing.assert_allclose(
        by_eps.predict(SDE, X, T, "score"), by_score.fn(X, T), rtol=1e-5, atol=1e-5
    )


def test_rescaled_guidance_matches_lin_et_al_algorithm_2():
    cond, uncond = _branches("v")
    gamma, phi = 4.0, 0.7
    cfg = uncond + gamma * (cond - uncond)
    expected = phi * cfg * cond.std() / cfg.std() + (1 - phi) * cfg
    model = rescaled_guidance(MODEL, 0, gamma, sde=SDE, rescale=phi, space="v")
    assert model.output == "v"
    np.testing.assert_allclose(model.fn(X, T), expected, rtol=1e-5)
    plain = rescaled_guidance(MODEL, 0, gamma, sde=SDE, rescale=0.0)
    np.testing.assert_allclose(plain.fn(X, T), classifier_free_guidance(MODEL, 0, gamma).fn(X, T))


def test_adaptive_guidance_switches_on_the_cosine_of_the_eps_branches():
    cond, uncond = _branches("eps")
    cosine = cond @ uncond / np.linalg.norm(cond) / np.linalg.norm(uncond)
    guided = classifier_free_guidance(MODEL, 0, 3.0).fn(X, T)
    conditional = MODEL.fn(X, T, 0)
    below = adaptive_guidance(MODEL, 0, 3.0, sde=SDE, threshold=cosine - 1e-3).fn(X, T)
    above = adaptive_guidance(MODEL, 0, 3.0, sde=SDE, threshold=min(cosine + 1e-3, 1.0)).fn(X, T)
    np.testing.assert_allclose(below, conditional)
    np.testing.assert_allclose(above, guided)
    assert diffusion.guidance_is_off(MODEL, SDE, X, T, 0, cosine - 1e-3)


def test_apg_matches_sadat_et_al_and_reduces_to_cfg():
    cond, uncond = _branches("x0")
    gamma, eta, radius = 5.0, 0.25, 0.3
    delta = cond - uncond
    delta = delta * min(1.0, radius / np.linalg.norm(delta))
    parallel = delta @ cond / (cond @ cond) * cond
    expected = cond + (gamma - 1) * (delta - parallel + eta * parallel)
    apg = projected_guidance(MODEL, 0, gamma, sde=SDE, parallel_weight=eta, radius=radius)
    assert apg.output == "x0"
    np.testing.assert_allclose(apg.fn(X, T), expected, rtol=1e-5)
    as_cfg = projected_guidance(MODEL, 0, gamma, sde=SDE, parallel_weight=1.0)
    cfg = classifier_free_guidance(MODEL, 0, gamma)
    np.testing.assert_allclose(as_cfg.fn(X, T), cfg.predict(SDE, X, T, "x0"), rtol=1e-5, atol=1e-6)
    orthogonal = projected_guidance(MODEL, 0, gamma, sde=SDE).fn(X, T) - cond
    assert abs(float(orthogonal @ cond)) < 1e-5 * np.linalg.norm(orthogonal) * np.linalg.norm(cond)


def test_one_program_serves_a_sweep_over_scales():
    @jax.jit
    @jax.vmap
    def guided(scale):
        return classifier_free_guidance(MODEL, 0, scale).fn(X, T)

    guided(jnp.array([3.0, 4.0, 5.0, 6.0]))
    swept = guided(jnp.array([0.0, 1.0, 2.0, 8.0]))
    np.testing.assert_allclose(swept[0], MODEL.fn(X, T, NULL_LABEL), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(swept[1], MODEL.fn(X, T, 0), rtol=1e-5, atol=1e-6)
    assert guided._cache_size() == 1


def _untraceable(x, t, label):
    raise AssertionError("the model was traced")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: guided_model("cgf", m, 0, 2.0, sde=SDE), ValueError, "method must be one of"),
        (lambda m: guided_model("cfg", m, 0, -1.0, sde=SDE), ValueError, "scale must be"),
        (lambda m: guided_model("apg", m, 0, 2.0, sde=SDE, rescale=0.5), TypeError, "no option"),
        (lambda m: guided_model("cfg", m, 0.5, 2.0, sde=SDE), TypeError, "label must be"),
        (lambda m: guided_model("cfg", m.given(0), 0, 2.0, sde=SDE), TypeError, "ConditionalModel"),
        (lambda m: rescaled_guidance(m, 0, 2.0, sde=SDE, rescale=1.5), ValueError, "rescale"),
        (lambda m: rescaled_guidance(m, 0, 2.0, sde=SDE, space="noise"), ValueError, "space"),
        (lambda m: adaptive_guidance(m, 0, 2.0, sde=SDE, threshold=2.0), ValueError, "threshold"),
        (lambda m: projected_guidance(m, 0, 2.0, sde=SDE, radius=0.0), ValueError, "radius"),
    ],
)
def test_bad_options_fail_before_tracing(call, error, message):
    with pytest.raises(error, match=message):
        call(ConditionalModel(_untraceable, "score"))


def test_guided_model_dispatches_with_its_options():
    by_name = guided_model("rescaled", MODEL, 0, 3.0, sde=SDE, rescale=0.5, space="x0")
    direct = rescaled_guidance(MODEL, 0, 3.0, sde=SDE, rescale=0.5, space="x0")
    np.testing.assert_allclose(by_name.fn(X, T), direct.fn(X, T))
    np.testing.assert_allclose(
        guided_model("cfg", MODEL, 0, 3.0, sde=SDE).fn(X, T),
        classifier_free_guidance(MODEL, 0, 3.0).fn(X, T),
    )
