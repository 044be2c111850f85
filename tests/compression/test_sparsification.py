"""Top-k (exact, through the partitionable top_k_indices, and approx_max_k) and Rand-k: kept
entries, contraction and variance against their closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd import compression
from support.compressor_inputs import D, draws, inputs


def test_top_k_keeps_the_largest_and_alpha_is_tight_for_flat_vectors():
    x = jnp.asarray(
        np.random.default_rng(0).permutation(np.arange(1.0, 11.0)) * np.array([1, -1] * 5)
    )
    out = compression.top_k(3).step(jax.random.key(0), None, x)[1]
    np.testing.assert_array_equal(np.sort(np.abs(out[out != 0])), [8.0, 9.0, 10.0])
    ones = jnp.ones(D)  # all entries equal: top-k error is exactly (1 - k/d) ||x||^2
    err = jnp.sum((compression.top_k(10).step(jax.random.key(0), None, ones)[1] - ones) ** 2)
    np.testing.assert_allclose(err, (1 - 10 / D) * D, rtol=1e-6)


def test_approx_top_k_equals_top_k_on_cpu():
    for x in inputs():
        np.testing.assert_array_equal(
            compression.approx_top_k(15).step(jax.random.key(0), None, x)[1],
            compression.top_k(15).step(jax.random.key(0), None, x)[1],
        )


def test_unscaled_rand_k_contracts_by_k_over_d_in_expectation():
    x = inputs()[0]
    samples = draws(compression.rand_k(20, scaled=False), x)
    errors = np.asarray(jnp.sum((samples - x) ** 2, axis=1))
    expected = (1 - 20 / D) * float(x @ x)  # exact in expectation
    assert abs(errors.mean() - expected) < 4 * errors.std() / math.sqrt(len(errors))


def test_scaled_rand_k_variance_is_exactly_omega():
    x = inputs()[0]
    errors = np.asarray(jnp.sum((draws(compression.rand_k(20), x) - x) ** 2, axis=1))
    expected = (D / 20 - 1) * float(x @ x)
    assert abs(errors.mean() - expected) < 4 * errors.std() / math.sqrt(len(errors))


def test_top_k_indices_equal_lax_top_k_under_jit_vmap_and_scan():
    values = jax.random.normal(jax.random.key(3), (3, 4, 50))
    expected = jax.lax.top_k(values, 7)[1]
    np.testing.assert_array_equal(compression.top_k_indices(values[0, 0], 7), expected[0, 0])
    nested = jax.jit(jax.vmap(jax.vmap(lambda v: compression.top_k_indices(v, 7))))(values)
    np.testing.assert_array_equal(nested, expected)
    scanned = jax.lax.scan(
        lambda c, v: (c, jax.vmap(lambda u: compression.top_k_indices(u, 7))(v)), 0, values
    )[1]
    np.testing.assert_array_equal(scanned, expected)
