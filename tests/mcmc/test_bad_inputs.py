"""Bad inputs to the MCMC family: each a ValueError/TypeError naming the argument, raised in
Python before anything compiles (PRNG keys, counts, targets, positions, diagnostics' draws);
a traced key of the right kind passes.  A hypothesis test throws random bad keys, step sizes
and integer positions of random sizes at every kernel."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shufflesgd import mcmc, shuffling
from support.gaussian_target import gaussian_logdensity
from support.smoothing_targets import gaussian_smoothed_score

X0 = jnp.zeros(2)
FLOAT_KEY = jnp.array([0.5, 1.0])
INT_KEY = 3


def grad_estimator(x, batch):
    return -x


def ula():
    return mcmc.ula(gaussian_logdensity)


def step_with(kernel, key, *hyper, batch=None):
    """``kernel.step(key, kernel.init(X0), [batch,] *hyper)``."""
    state = kernel.init(X0)
    return lambda: kernel.step(key, state, *(() if batch is None else (batch,)), *hyper)


BATCH = jnp.arange(2)
KERNELS = {
    "ula": (lambda: mcmc.ula(gaussian_logdensity), (0.1,), None),
    "mala": (lambda: mcmc.mala(gaussian_logdensity), (0.1,), None),
    "hmc": (lambda: mcmc.hmc(gaussian_logdensity, 2), (0.1,), None),
    "sgld": (lambda: mcmc.sgld(grad_estimator), (0.1,), BATCH),
    "sghmc": (lambda: mcmc.sghmc(grad_estimator), (0.1, 1.0), BATCH),
    "cyclical_sgld": (lambda: mcmc.cyclical_sgld(grad_estimator, 10, 2), (0.1, 0.5), BATCH),
    "cyclical_sghmc": (lambda: mcmc.cyclical_sghmc(grad_estimator, 10, 2), (0.1, 0.5, 1.0), BATCH),
    "sgnht": (lambda: mcmc.sgnht(grad_estimator), (0.1, 1.0), BATCH),
    "entropy_mcmc": (lambda: mcmc.entropy_mcmc(grad_estimator), (0.1, 1.0), BATCH),
    "walk_jump": (lambda: mcmc.walk_jump(gaussian_smoothed_score), (0.1, 0.5), None),
    "underdamped_walk_jump": (
        lambda: mcmc.underdamped_walk_jump(gaussian_smoothed_score),
        (0.1, 0.5, 1.0),
        None,
    ),
    "chain_of_log_concave_chains": (
        lambda: mcmc.chain_of_log_concave_chains(gaussian_smoothed_score, 3),
        (0.1, 0.5),
        None,
    ),
    "follmer": (lambda: mcmc.follmer(gaussian_logdensity, 4, 4), (), None),
}


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("key", [FLOAT_KEY, INT_KEY, jnp.zeros(3, jnp.uint32)], ids=str)
def test_every_kernel_step_names_a_bad_key(name, key):
    make, hyper, batch = KERNELS[name]
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        step_with(make(), key, *hyper, batch=batch)()


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_kernel_accepts_typed_raw_and_traced_keys(name):
    make, hyper, batch = KERNELS[name]
    kernel = make()
    for make_key in (jax.random.key, jax.random.PRNGKey):
        step_with(kernel, make_key(0), *hyper, batch=batch)()
        jax.jit(lambda k: step_with(kernel, k, *hyper, batch=batch)())(make_key(1))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: mcmc.run_chain(ula(), INT_KEY, ula().init(X0), 5, 0.1),
            TypeError,
            "key must be a PRNG key",
        ),
        (
            lambda: mcmc.run_chain(ula(), FLOAT_KEY, ula().init(X0), 5, 0.1),
            TypeError,
            "key must be a PRNG key",
        ),
        (
            lambda: mcmc.run_chain(ula(), jax.random.key(0), ula().init(X0), -5, 0.1),
            ValueError,
            "num_steps must be a non-negative int",
        ),
        (
            lambda: mcmc.run_minibatch_chain(
                mcmc.sgld(grad_estimator),
                FLOAT_KEY,
                mcmc.sgld(grad_estimator).init(X0),
                shuffling.random_reshuffle(4),
                2,
                2,
                0.1,
            ),
            TypeError,
            "key must be a PRNG key",
        ),
        (
            lambda: mcmc.adapt_step_size(
                mcmc.mala(gaussian_logdensity), INT_KEY, ula().init(X0), 0.1, 10
            ),
            TypeError,
            "key must be a PRNG key",
        ),
        (
            lambda: mcmc.adapt_step_size(
                mcmc.mala(gaussian_logdensity), jax.random.key(0), ula().init(X0), 0.1, 10, -0.5
            ),
            ValueError,
            "target must lie in",
        ),
        (
            lambda: mcmc.adapt_step_size(
                mcmc.mala(gaussian_logdensity),
                jax.random.key(0),
                ula().init(X0),
                0.1,
                10,
                float("nan"),
            ),
            ValueError,
            "target must lie in",
        ),
        (lambda: mcmc.jump(gaussian_smoothed_score, FLOAT_KEY, X0, 0.5), TypeError, "key must"),
        (lambda: mcmc.effective_sample_size(jnp.zeros((0, 10))), ValueError, "chains must"),
        (lambda: mcmc.effective_sample_size(jnp.zeros(10)), ValueError, "chains must"),
        (lambda: mcmc.effective_sample_size([]), ValueError, "chains must"),
        (lambda: mcmc.split_rhat(jnp.zeros((0, 10))), ValueError, "chains must"),
        (lambda: mcmc.split_rhat(jnp.zeros(10)), ValueError, "chains must"),
        (lambda: ula().init(jnp.zeros(2, jnp.int32)), TypeError, "position must be a float"),
        (lambda: mcmc.hmc(gaussian_logdensity, 2).init(jnp.zeros(3)), ValueError, "position"),
        (lambda: mcmc.mala(gaussian_logdensity).init(jnp.zeros(3)), ValueError, "logdensity_fn"),
        (
            lambda: mcmc.follmer(gaussian_logdensity, 4, 4).init(jnp.zeros(3)),
            ValueError,
            "position of shape",
        ),
        (lambda: mcmc.sgld(grad_estimator).init(jnp.zeros(2, jnp.int32)), TypeError, "position"),
        (lambda: mcmc.sghmc(grad_estimator).init(jnp.zeros(2, jnp.int32)), TypeError, "position"),
        (
            lambda: mcmc.walk_jump(gaussian_smoothed_score).init(jnp.zeros(2, jnp.int32)),
            TypeError,
            "position",
        ),
        (
            lambda: mcmc.follmer(gaussian_logdensity, 4, 4).init(jnp.zeros(2, jnp.int32)),
            TypeError,
            "position",
        ),
    ],
)
def test_bad_driver_and_init_inputs_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _bad_key(draw: int, pick: int):
    return [
        1 + draw,
        float(draw),
        jnp.zeros(2 + draw, jnp.float32),
        np.arange(3 + draw, dtype=np.uint32),
        jnp.zeros((2,), jnp.int32) + draw,
    ][pick % 5]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(sorted(KERNELS)),
    what=st.sampled_from(["key", "step_size", "position"]),
    draw=st.integers(0, 5),
    pick=st.integers(0, 10),
)
def test_bad_inputs_property(name, what, draw, pick):
    """Every kernel names a bad key, a non-positive or NaN step size and an integer position
    (of any length), from a shufflesgd frame."""
    make, hyper, batch = KERNELS[name]
    kernel = make()
    if what == "key":
        call, expected = step_with(kernel, _bad_key(draw, pick), *hyper, batch=batch), "key"
    elif what == "step_size" and hyper:
        bad = [0.0, -0.1 * (1 + draw), math.nan, -math.inf][pick % 4]
        call = step_with(kernel, jax.random.key(0), bad, *hyper[1:], batch=batch)
        expected = "step_size"
    else:
        call, expected = (lambda: kernel.init(jnp.zeros(1 + draw, jnp.int32))), "position"
    with pytest.raises((ValueError, TypeError)) as excinfo:
        call()
    assert expected in str(excinfo.value), str(excinfo.value)
    raised_in = str(excinfo.traceback[-1].path)
    assert "shufflesgd" in raised_in and "/jax/" not in raised_in, raised_in
