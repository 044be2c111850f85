"""Conditional models: the exact conditional mixture model against the closed-form class and
unconditional laws, both branches in one call, and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion
from shufflesgd.diffusion.guidance import NULL_LABEL, ConditionalModel, conditional_mixture_model
from shufflesgd.problems import conditional_mixture, gaussian_mixture

MEANS = np.array([[2.0, 0.0], [1.5, 1.0], [-2.0, 0.5]])
COVS = np.array([np.eye(2) * 0.3, [[0.4, 0.1], [0.1, 0.2]], np.eye(2) * 0.5])
WEIGHTS = np.array([0.2, 0.3, 0.5])
LABELS = np.array([0, 0, 1])


def _mixture(**kwargs):
    return conditional_mixture(WEIGHTS, MEANS, COVS, LABELS, **kwargs)


def test_class_laws_are_the_renormalised_components():
    mix = _mixture()
    np.testing.assert_allclose(
        np.exp(mix.class_log_weights(0)), [0.4, 0.6, 0.0], rtol=1e-6, atol=1e-12
    )
    np.testing.assert_allclose(np.exp(mix.class_log_prior()), [0.5, 0.5], rtol=1e-6)
    samples = mix.conditional(1).sample(jax.random.key(0), 200)
    assert np.all(np.abs(np.asarray(samples)[:, 0] - (-2.0)) < 4.0)


@pytest.mark.parametrize("process", ["vp", "edm"])
def test_exact_scores_of_every_branch(process):
    sde = diffusion.make_sde(process)
    mix = _mixture()
    model = conditional_mixture_model(sde, mix)
    x, t = jnp.array([0.3, -0.7]), jnp.asarray(0.4 if process == "vp" else 1.3)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    for label in (0, 1):
        expected = mix.conditional(label).diffuse(alpha, sigma).score(x)
        np.testing.assert_allclose(model.fn(x, t, label), expected, rtol=1e-5, atol=1e-6)
    expected_u = mix.mixture.diffuse(alpha, sigma).score(x)
    np.testing.assert_allclose(model.fn(x, t, NULL_LABEL), expected_u, rtol=1e-5, atol=1e-6)
    cond, uncond = jax.jit(model.branches)(x, t, 1)
    np.testing.assert_allclose(cond, model.fn(x, t, 1), rtol=1e-6)
    np.testing.assert_allclose(uncond, expected_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.given(0).fn(x, t), model.fn(x, t, 0), rtol=1e-6)
    np.testing.assert_allclose(model.unconditional().fn(x, t), expected_u, rtol=1e-5, atol=1e-6)


def test_a_separate_unconditional_law_and_the_velocity_output():
    sde = diffusion.make_sde("flow")
    wide = gaussian_mixture([1.0], [[0.0, 0.0]], [np.eye(2) * 3.0])
    mix = _mixture(unconditional=wide)
    model = conditional_mixture_model(sde, mix, output="velocity")
    x, t = jnp.array([0.3, -0.7]), jnp.asarray(0.6)
    reference = diffusion.mixture_model(sde, wide.eigen(), "velocity").fn(x, t)
    np.testing.assert_allclose(model.fn(x, t, NULL_LABEL), reference, rtol=1e-5, atol=1e-6)
    assert model.output == "velocity"
    # the derivative through the null branch is finite (the masked class is never evaluated)
    grad = jax.jacfwd(lambda y: model.fn(y, t, NULL_LABEL))(x)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": [0, 0]}, "labels must be 3 ints"),
        ({"labels": [0, 2, 2]}, "every class"),
        ({"labels": [0.0, 1.0, 1.0]}, "labels must be 3 ints"),
        ({"unconditional": gaussian_mixture([1.0], [[0.0]], [[[1.0]]])}, "unconditional"),
    ],
)
def test_bad_conditional_mixtures(kwargs, message):
    args = {"labels": LABELS, **kwargs}
    with pytest.raises(ValueError, match=message):
        conditional_mixture(WEIGHTS, MEANS, COVS, **args)


def test_branches_are_one_batched_call():
    calls = []

    def fn(x, t, label):
        calls.append(label.shape)
        return x * (label + 2.0)

    cond, uncond = ConditionalModel(fn, "eps").branches(jnp.ones(2), jnp.asarray(0.5), 3)
    assert len(calls) == 1
    np.testing.assert_allclose(cond, 5.0)
    np.testing.assert_allclose(uncond, 1.0)
