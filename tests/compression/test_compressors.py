"""Compressors: alpha / omega measured on random inputs, exact bit counts, pytrees, errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import compression
from support.compressor_inputs import draws, inputs

DETERMINISTIC_CONTRACTIVE = [
    compression.top_k(10),
    compression.top_k(fraction=0.3),
    compression.approx_top_k(20),
    compression.scaled_sign(),
    compression.low_rank(2),
]


@pytest.mark.parametrize("compressor", DETERMINISTIC_CONTRACTIVE, ids=lambda c: c.name)
def test_contraction_holds_on_every_input(compressor):
    for x in inputs():
        alpha = compressor.contraction(x.shape)
        error = float(jnp.sum((compressor.step(jax.random.key(0), None, x)[1] - x) ** 2))
        assert error <= (1 - alpha) * float(x @ x) * (1 + 1e-5)


UNBIASED = [
    compression.rand_k(20),
    compression.qsgd(4),
    compression.qsgd(64),
    compression.natural_compression(),
    compression.natural_dithering(3),
    compression.identity(),
]


@pytest.mark.parametrize("compressor", UNBIASED, ids=lambda c: c.name)
def test_unbiased_with_variance_at_most_omega(compressor):
    for x in inputs(num=4):
        samples = np.asarray(draws(compressor, x, num=20000), np.float64)
        n, target = samples.shape[0], np.asarray(x, np.float64)
        errors = np.sum((samples - target) ** 2, axis=1)
        # unbiased: ||mean - x||^2 has expectation E||C(x) - x||^2 / n; a bias would add
        # ||bias||^2. Allow 6x the expectation (a chi-square tail) plus float32 rounding.
        bias_sq = float(np.sum((samples.mean(axis=0) - target) ** 2))
        assert bias_sq <= 6 * errors.mean() / n + 1e-10 * float(target @ target)
        omega = compressor.variance(x.shape)
        assert (
            errors.mean()
            <= omega * float(target @ target) * (1 + 1e-4) + 4 * errors.std() / math.sqrt(n) + 1e-9
        )


@pytest.mark.parametrize(
    "compressor, shape, bits",
    [
        (compression.top_k(10), (1000,), 10 * (32 + 10)),
        (compression.top_k(fraction=0.01), (1000,), 10 * (32 + 10)),
        (compression.rand_k(10), (1000,), 320),
        (compression.sign(), (1000,), 1000),
        (compression.scaled_sign(), (1000,), 1032),
        (compression.qsgd(4), (1000,), 32 + 1000 * 4),
        (compression.qsgd(1), (1000,), 32 + 1000 * 2),
        (compression.natural_compression(), (1000,), 9000),
        (compression.natural_dithering(3), (1000,), 32 + 1000 * 3),
        (compression.low_rank(2), (30, 40), 32 * 2 * 70),
        (compression.power_sgd(1), (1000,), 32 * (25 + 40)),
        (compression.identity(), (7, 3), 32 * 21),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_bit_counts_are_exact(compressor, shape, bits):
    assert compressor.bits(shape) == bits


def test_pytrees_flat_and_leafwise():
    tree = {"w": jnp.arange(12.0).reshape(3, 4) - 5.0, "b": jnp.array([10.0, -0.5])}
    top = compression.top_k(3)
    state = compression.init_tree(top, jax.random.key(0), tree)
    _, flat = compression.compress_tree(top, jax.random.key(0), state, tree)
    assert int(sum(jnp.count_nonzero(v) for v in jax.tree.leaves(flat))) == 3
    assert float(flat["b"][0]) == 10.0  # the largest entry overall is in "b"
    assert compression.tree_bits(top, tree) == 3 * (32 + 4)
    assert compression.tree_contraction(top, tree) == 3 / 14
    quarter = compression.top_k(fraction=0.25)  # k = ceil(d / 4) per leaf: 3 of 12, 1 of 2
    leafwise_state = compression.init_tree(quarter, jax.random.key(0), tree, leafwise=True)
    _, per_leaf = compression.compress_tree(
        quarter, jax.random.key(0), leafwise_state, tree, leafwise=True
    )
    assert int(jnp.count_nonzero(per_leaf["w"])) == 3 and int(jnp.count_nonzero(per_leaf["b"])) == 1
    assert compression.tree_bits(quarter, tree, leafwise=True) == 3 * (32 + 4) + 1 * (32 + 1)
    assert compression.tree_contraction(quarter, tree, leafwise=True) == min(3 / 12, 1 / 2)
    assert compression.tree_variance(compression.rand_k(fraction=0.5), tree, leafwise=True) == max(
        12 / 6 - 1, 2 / 1 - 1
    )
    with pytest.raises(ValueError, match="k=3 exceeds the dimension d=2"):
        compression.check_tree(top, tree, leafwise=True)


def test_compress_tree_jits_and_vmaps_over_workers():
    compressor = compression.power_sgd(1)
    tree = {"w": jnp.ones((4, 3)), "b": jnp.ones(4)}
    workers = jax.tree.map(lambda v: jnp.stack([v, 2 * v, 3 * v]), tree)
    states = jax.vmap(lambda k: compression.init_tree(compressor, k, tree, leafwise=True))(
        jax.random.split(jax.random.key(0), 3)
    )
    keys = jax.random.split(jax.random.key(1), 3)
    new_states, out = jax.jit(
        jax.vmap(lambda k, s, t: compression.compress_tree(compressor, k, s, t, leafwise=True))
    )(keys, states, workers)
    chex.assert_trees_all_equal_shapes(out, workers)
    np.testing.assert_allclose(
        out["w"][2], 3 * jnp.ones((4, 3)), rtol=1e-5
    )  # rank-1 input is exact


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: compression.top_k(0), "k must be a positive int"),
        (lambda: compression.rand_k(-2), "k must be a positive int"),
        (lambda: compression.top_k(fraction=1.5), "fraction must lie in"),
        (lambda: compression.top_k(), "exactly one of k and fraction"),
        (lambda: compression.qsgd(0), "levels must be a positive int"),
        (lambda: compression.natural_dithering(-1), "levels must be a positive int"),
        (lambda: compression.low_rank(0), "rank must be a positive int"),
        (lambda: compression.power_sgd(-1), "rank must be a positive int"),
        (
            lambda: compression.check_tree(compression.top_k(11), jnp.ones(10)),
            "k=11 exceeds the dimension d=10",
        ),
        (
            lambda: compression.check_tree(compression.low_rank(5), jnp.ones((4, 6))),
            "rank=5 exceeds",
        ),
        (lambda: compression.make_compressor("bogus"), "compressor must be one of"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
