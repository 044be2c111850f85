"""Sign, QSGD and natural compression: outputs on their grids and variances at their closed-form
omega."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd import compression
from support.compressor_inputs import D, draws, inputs


def test_natural_compression_attains_omega_one_eighth():
    """At t = (4/3) 2^a the rounding variance is exactly t^2 / 8 (Horváth et al. 2019, Thm. 1)."""
    x = jnp.full((D,), 4.0 / 3.0 * 2.0**-3)
    errors = np.asarray(jnp.sum((draws(compression.natural_compression(), x) - x) ** 2, axis=1))
    expected = float(x @ x) / 8
    assert abs(errors.mean() - expected) < 4 * errors.std() / math.sqrt(len(errors))
    powers = jnp.array([0.25, -1.0, 0.0, 8.0])  # powers of two (and zero) pass unchanged
    np.testing.assert_array_equal(
        compression.natural_compression().step(jax.random.key(0), None, powers)[1], powers
    )


def test_qsgd_outputs_lie_on_the_level_grid():
    x = inputs()[0]
    out = np.asarray(compression.qsgd(4).step(jax.random.key(3), None, x)[1])
    levels = np.abs(out) / np.linalg.norm(np.asarray(x)) * 4
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)


def test_sign_is_the_sign():
    x = jnp.array([-2.0, 0.0, 3.0])
    np.testing.assert_array_equal(
        compression.sign().step(jax.random.key(0), None, x)[1], [-1.0, 0.0, 1.0]
    )
    assert compression.sign().contraction is None and compression.sign().variance is None
