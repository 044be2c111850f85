"""Threshold Top-k: the exact select keeps lax.top_k's entries (ties to the lower index),
also under jit, vmap and a sharded worker axis without an all-gather; the sampled threshold
keeps a top-m set, 1 <= m <= k, and contracts at least by its documented alpha."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from shufflesgd import compression, parallel
from shufflesgd.compression.registry import make_compressor
from shufflesgd.compression.threshold_top_k import sampled_threshold_top_k, threshold_top_k
from support.compressor_inputs import D, inputs


def message(compressor, x, key=None):
    return compressor.step(jax.random.key(0) if key is None else key, None, x)[1]


def tied_inputs():
    rng = np.random.default_rng(5)
    return [
        jnp.asarray(np.round(rng.standard_normal(D) * 2) + 0.5, jnp.float32),  # many ties
        jnp.asarray(rng.choice([-1.0, 1.0], D), jnp.float32),  # all magnitudes tied
        jnp.zeros(D),
    ]


@pytest.mark.parametrize("k", [1, 15, D])
def test_exact_select_equals_top_k_under_jit_and_vmap(k):
    xs = inputs() + tied_inputs()
    exact, reference = threshold_top_k(k), compression.top_k(k)
    for x in xs:
        np.testing.assert_array_equal(message(exact, x), message(reference, x))
    stacked = jnp.stack(xs)
    keys = jax.random.split(jax.random.key(1), len(xs))
    batched = jax.jit(jax.vmap(lambda key, x: exact.step(key, None, x)[1]))(keys, stacked)
    np.testing.assert_array_equal(batched, jnp.stack([message(reference, x) for x in xs]))


def test_ties_keep_exactly_k_and_every_kept_magnitude_dominates():
    for x in tied_inputs()[:2]:
        for k in (1, 7, 60, D - 1):
            out = np.asarray(message(threshold_top_k(k), x))
            kept = out != 0  # these inputs have no zero entries
            assert kept.sum() == k
            assert np.abs(x)[kept].min() >= np.abs(x)[~kept].max()


def test_tie_cut_off_is_placed_in_any_block_of_255_and_in_the_tail():
    d = 4 * 255 + 100  # four whole blocks and a partial one
    rng = np.random.default_rng(6)
    signs = jnp.asarray(rng.choice([-1.0, 1.0], d), jnp.float32)  # every magnitude tied
    rounded = jnp.asarray(np.round(rng.standard_normal(d)), jnp.float32)
    for x in (signs, rounded):
        for k in (1, 254, 255, 256, 600, 4 * 255, 4 * 255 + 1, d - 1):
            np.testing.assert_array_equal(
                message(threshold_top_k(k), x), message(compression.top_k(k), x)
            )


def test_float32_bits_order_like_magnitudes_and_negative_entries_are_kept_signed():
    x = jnp.asarray([-3.0, 1e-30, -0.0, 2.0, -7.5, 0.5, np.inf, -np.inf])
    np.testing.assert_array_equal(
        message(threshold_top_k(3), x), jnp.asarray([0, 0, 0, 0, -7.5, 0, np.inf, -np.inf])
    )


@pytest.mark.parametrize(
    "compressor", [threshold_top_k(5), sampled_threshold_top_k(5, sample_fraction=0.25)]
)
def test_sharded_selection_has_no_all_gather_and_equals_unsharded(compressor):
    mesh = parallel.worker_mesh(8)
    workers = NamedSharding(mesh, jax.P("workers"))
    x = jax.random.normal(jax.random.key(2), (8, 96))
    keys, same_keys = (jax.random.split(jax.random.key(3), 8) for _ in range(2))
    select = jax.vmap(lambda key, v: compressor.step(key, None, v)[1])
    sharded = jax.jit(select, in_shardings=(workers, workers), out_shardings=workers)
    hlo = sharded.lower(keys, x).compile().as_text()
    assert "all-gather" not in hlo
    assert "f32[1,96]" in hlo  # each device holds its own worker's row
    np.testing.assert_array_equal(sharded(keys, x), jax.jit(select)(same_keys, x))


@pytest.mark.parametrize("heavy_tailed", [False, True])
def test_sampled_threshold_keeps_a_top_m_set_and_contracts_by_at_least_alpha(heavy_tailed):
    d, k = 4000, 80
    compressor = sampled_threshold_top_k(k, sample_fraction=0.1)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_cauchy(d) if heavy_tailed else rng.standard_normal(d))
    keys = jax.random.split(jax.random.key(4), 64)
    out = np.asarray(jax.jit(jax.vmap(lambda key: compressor.step(key, None, x)[1]))(keys))
    magnitudes, xs = np.abs(np.asarray(x)), np.asarray(x)
    kept_counts = (out != 0).sum(axis=1)
    assert kept_counts.min() >= 1 and kept_counts.max() <= k
    for row in out:
        kept = row != 0
        assert magnitudes[kept].min() >= magnitudes[~kept].max()
        np.testing.assert_array_equal(row[kept], xs[kept])
    ratio = ((out - xs) ** 2).sum(axis=1) / (xs**2).sum()
    exact = float(((message(threshold_top_k(k), x) - x) ** 2).sum() / (x**2).sum())
    alpha = compressor.contraction((d,))
    print(
        f"heavy_tailed={heavy_tailed}: mean kept {kept_counts.mean():.1f} of {k}, realised "
        f"||C(x)-x||^2/||x||^2 {ratio.mean():.4f} (exact top-k {exact:.4f}, 1 - alpha "
        f"{1 - alpha:.4f}, 1 - k/d {1 - k / d:.4f})"
    )
    assert 0 < alpha < k / d
    assert np.all(ratio >= exact - 1e-6)  # never better than exact Top-k
    assert ratio.mean() <= 1 - alpha  # holds for every draw: a top-m set with m >= 1
    assert np.all(ratio <= 1 - kept_counts / d + 1e-6)


def test_sampled_threshold_on_zeros_is_finite_and_uses_its_key():
    compressor = sampled_threshold_top_k(3, sample_fraction=0.5)
    assert np.all(np.asarray(message(compressor, jnp.zeros(D))) == 0)
    x = inputs()[0]
    np.testing.assert_array_equal(
        message(compressor, x, jax.random.key(9)), message(compressor, x, jax.random.key(9))
    )
    many = [message(compressor, x, key) for key in jax.random.split(jax.random.key(10), 8)]
    assert len({int((m != 0).sum()) for m in many}) > 1  # the sample, hence the count, varies


def test_arguments_are_checked_before_tracing_and_registered():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sample_fraction"):
            sampled_threshold_top_k(3, sample_fraction=bad)
    for make in (threshold_top_k, sampled_threshold_top_k):
        with pytest.raises(ValueError, match="k="):
            make(D + 1).step(jax.random.key(0), None, jnp.zeros(D))
        with pytest.raises(ValueError, match="exactly one of k and fraction"):
            make(3, fraction=0.1)
        compressor = make(fraction=0.05)
        assert compressor.bits((D,)) == 10 * (32 + 8)
    assert threshold_top_k(10).contraction((D,)) == 10 / D
    assert make_compressor("threshold_top_k", k=3).name == "threshold_top_k"
    assert make_compressor("sampled_threshold_top_k", k=3).name == "sampled_threshold_top_k"
