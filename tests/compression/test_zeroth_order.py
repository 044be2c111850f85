"""Shared-randomness zeroth-order updates: the SPSA identity and mean, the quantiser's bounds,
bit-identical reconstruction, exact bit counts, convergence, transforms and errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd.compression.zeroth_order import (
    ZOState,
    apply_codes,
    dequantize,
    direction,
    quantize,
    reconstruct,
    spsa_projected_gradient,
    zeroth_order,
)
from shufflesgd.drivers import scan_steps


def quadratic(params, batch):
    """0.5 x^T A x + b^T x + 0.5 |y|^2 c over params {"x": [3], "y": [2]}; batch = (A, b, c)."""
    a, b, c = batch
    x, y = params["x"], params["y"]
    return 0.5 * x @ a @ x + b @ x + 0.5 * c * y @ y


def quadratic_batch(seed=0):
    m = np.random.default_rng(seed).normal(size=(3, 3))
    return jnp.asarray(m @ m.T + np.eye(3)), jnp.asarray([1.0, -2.0, 0.5]), jnp.asarray(3.0)


def least_squares(params, batch):
    a, b = batch
    return 0.5 * jnp.mean((a @ params - b) ** 2)


def least_squares_workers(n=4, m=16, d=6, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, m, d))
    b = a @ rng.normal(size=d) + 0.1 * rng.normal(size=(n, m))
    return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


def test_two_point_difference_is_exactly_the_directional_derivative_on_a_quadratic(x64):
    params = {"x": jnp.array([0.3, -1.0, 2.0]), "y": jnp.array([1.5, -0.5])}
    batch = quadratic_batch()
    a, b, c = batch
    grad = {"x": a @ params["x"] + b, "y": c * params["y"]}
    for seed in range(3):
        for epsilon in (1e-3, 1.0, 10.0):
            key = jax.random.key(seed)
            p, loss = spsa_projected_gradient(quadratic, params, batch, key, epsilon)
            z = direction(jax.random.key(seed), params)
            chex.assert_trees_all_equal_shapes(z, params)
            exact = sum(float(jnp.vdot(z[k], grad[k])) for k in params)
            np.testing.assert_allclose(float(p), exact, rtol=1e-9, atol=1e-12)
            curvature = 0.5 * (z["x"] @ a @ z["x"] + c * z["y"] @ z["y"])
            expected = quadratic(params, batch) + epsilon**2 * curvature
            np.testing.assert_allclose(float(loss), float(expected), rtol=1e-9)


def test_spsa_estimate_is_unbiased_for_the_gradient_of_log_sum_exp(x64):
    """E_z[p z] = grad L + O(eps^2) and E_z[p] = O(eps^2): Monte Carlo means within 4 SE."""
    w = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4)))
    theta = jnp.array([0.2, -0.4, 1.0, 0.1])

    def lse(params, batch):
        return jax.scipy.special.logsumexp(batch @ params)

    draws = 4000
    keys = jax.random.split(jax.random.key(7), draws)

    def estimate(key):
        p, _ = spsa_projected_gradient(lse, theta, w, key, 1e-3)
        return p, p * direction(jax.random.clone(key), theta)

    p, pz = (np.asarray(t) for t in jax.jit(jax.vmap(estimate))(keys))
    grad = np.asarray(jax.grad(lse)(theta, w))
    se = pz.std(axis=0) / math.sqrt(draws)
    assert np.all(np.abs(pz.mean(axis=0) - grad) < 4 * se), (pz.mean(axis=0), grad, se)
    assert abs(p.mean()) < 4 * p.std() / math.sqrt(draws)
    # E[p^2] = |grad|^2 for Gaussian z: p carries the gradient's scale
    p_sq_se = (p**2).std() / math.sqrt(draws)
    assert abs((p**2).mean() - grad @ grad) < 4 * p_sq_se


@pytest.mark.parametrize(
    "bits, dtype",
    [
        (1, "float32"),
        (2, "float32"),
        (3, "float32"),
        (8, "float32"),
        (16, "float32"),
        (32, "float64"),
    ],
)
def test_nearest_rounding_error_is_within_half_a_step_on_the_whole_range(bits, dtype, x64):
    r = 2.5
    dtype = np.dtype(dtype)
    levels = 2**bits - 1
    edges = np.nextafter(np.array([-r, r], dtype), np.array([0.0, 0.0], dtype))
    values = np.concatenate(
        [np.linspace(-r, r, 20001, dtype=dtype), np.array([-r, r, 0.0], dtype), edges]
    ).astype(dtype)
    values = np.concatenate([values, np.random.default_rng(0).uniform(-r, r, 5000).astype(dtype)])
    codes, clipped = quantize(jnp.asarray(values), r, bits)
    assert codes.dtype == jnp.uint32 and not np.any(clipped)
    codes = np.asarray(codes, np.int64)
    assert codes.min() == 0 and codes.max() == levels  # -r and r are the end levels
    error = np.abs(np.asarray(dequantize(codes, r, bits, dtype), np.float64) - values)
    slack = 4 * np.finfo(dtype).eps * r
    assert error.max() <= r / levels + slack, (error.max(), r / levels)
    if bits <= 8:  # every level is reached and decodes to itself
        grid = np.asarray(dequantize(jnp.arange(levels + 1, dtype=jnp.uint32), r, bits, dtype))
        np.testing.assert_array_equal(
            np.asarray(quantize(jnp.asarray(grid), r, bits)[0]), np.arange(levels + 1)
        )
        np.testing.assert_allclose(np.diff(grid), 2 * r / levels, rtol=0, atol=slack)


def test_values_outside_the_range_are_clipped_and_counted():
    r, bits = 1.0, 4
    values = jnp.array([-np.inf, -3.0, -1.0, 0.2, 1.0, 1.5, np.inf, np.nan])
    codes, clipped = quantize(values, r, bits)
    np.testing.assert_array_equal(clipped, [True, True, False, False, False, True, True, False])
    decoded = np.asarray(dequantize(codes, r, bits))
    np.testing.assert_allclose(decoded[[0, 1, 2]], -1.0)
    np.testing.assert_allclose(decoded[[4, 5, 6]], 1.0)
    # NaN is coded as 0 is
    assert int(codes[-1]) == int(quantize(jnp.zeros(1), r, bits)[0][0])


def test_stochastic_rounding_is_unbiased_with_the_stated_variance():
    r, bits, draws = 1.0, 2, 20000
    step = 2 * r / 3
    values = jnp.array([-0.9, -0.1, 0.25, 0.6, 1.0])
    keys = jax.random.split(jax.random.key(3), draws)
    decoded = jax.vmap(lambda k: dequantize(quantize(values, r, bits, key=k)[0], r, bits))(keys)
    decoded, values = np.asarray(decoded, np.float64), np.asarray(values, np.float64)
    low = -r + np.floor((values + r) / step + 1e-6) * step
    high = np.minimum(low + step, r)
    # only the two neighbouring levels
    assert np.all(np.isclose(decoded, low, atol=1e-6) | np.isclose(decoded, high, atol=1e-6))
    variance = (high - values) * (values - low)  # Bernoulli between the neighbours
    assert np.all(variance <= step**2 / 4 + 1e-12)
    se = np.sqrt(np.maximum(variance, 1e-12) / draws)
    assert np.all(np.abs(decoded.mean(axis=0) - values) < 4 * se + 1e-6)
    np.testing.assert_allclose(decoded.var(axis=0), variance, atol=4 * step**2 / math.sqrt(draws))


def test_server_and_workers_rebuild_the_same_update_bit_for_bit():
    a, b = least_squares_workers()
    method = zeroth_order(least_squares, num_directions=3, bits=8)
    state = method.init(jax.random.key(0), jnp.zeros(6))
    step_size, epsilon, radius = 0.05, 1e-2, 20.0
    new, info = jax.jit(method.step)(jax.random.key(11), state, (a, b), step_size, epsilon, radius)
    direction_key = jax.random.split(jax.random.key(11))[0]
    # each worker, on its own, from the shared key and its own batch
    for i in range(4):
        for j in range(3):
            p, _ = jax.jit(spsa_projected_gradient, static_argnums=0)(
                least_squares,
                state.params,
                (a[i], b[i]),
                jax.random.fold_in(direction_key, j),
                epsilon,
            )
            code = quantize(p, radius, 8)[0]
            assert int(code) == int(info.codes[i, j]), (i, j)
    # the server and each worker, each compiling its own copy, rebuild the new params from
    # the step's key and the n x K codes alone (no d-vector)
    for party in ("server", "worker"):
        rebuilt = jax.jit(apply_codes, static_argnums=5)(
            jax.random.key(11), state.params, info.codes, step_size, radius, 8
        )
        np.testing.assert_array_equal(rebuilt, new.params, err_msg=f"party {party}")
    other = apply_codes(jax.random.key(12), state.params, info.codes, step_size, radius, 8)
    assert not np.allclose(other, new.params)  # another key, other directions


def test_fine_quantisation_gives_the_average_of_single_worker_mezo_steps(x64):
    a, b = (jnp.asarray(t, jnp.float64) for t in least_squares_workers())
    params = jnp.asarray(np.random.default_rng(2).normal(size=6))
    step_size, epsilon, radius, k = 0.1, 1e-3, 100.0, 3
    direction_key = jax.random.split(jax.random.key(5))[0]
    mezo = []
    for i in range(4):  # Malladi et al. (2023), Alg. 1 on worker i's batch alone
        update = np.zeros(6)
        for j in range(k):
            z = np.asarray(direction(jax.random.fold_in(direction_key, j), params))
            x = np.asarray(params)
            plus, minus = (
                0.5 * np.mean((np.asarray(a[i]) @ v - np.asarray(b[i])) ** 2)
                for v in (x + epsilon * z, x - epsilon * z)
            )
            update += (plus - minus) / (2 * epsilon) * z / k
        mezo.append(np.asarray(params) - step_size * update)
    state = ZOState(params, jnp.zeros((), jnp.int32))
    for bits, close in ((32, True), (4, False)):
        method = zeroth_order(least_squares, num_directions=k, bits=bits)
        new, _ = jax.jit(method.step)(jax.random.key(5), state, (a, b), step_size, epsilon, radius)
        same = np.allclose(new.params, np.mean(mezo, axis=0), rtol=0, atol=1e-7)
        assert same == close, bits


@pytest.mark.parametrize("num_directions, bits", [(1, 8), (3, 1), (2, 32), (5, 12)])
def test_bits_evaluations_and_clipping_are_counted_exactly(num_directions, bits):
    a, b = least_squares_workers(n=3)
    method = zeroth_order(least_squares, num_directions=num_directions, bits=bits)
    state = method.init(jax.random.key(0), jnp.ones(6))
    step = jax.jit(method.step)

    @jax.jit
    def projected(direction_key):
        def one(i, j):
            batch = (a[i], b[i])
            shared = jax.random.fold_in(direction_key, j)
            return spsa_projected_gradient(least_squares, state.params, batch, shared, 1e-2)[0]

        workers, directions = jnp.meshgrid(jnp.arange(3), jnp.arange(num_directions), indexing="ij")
        return jax.vmap(jax.vmap(one))(workers, directions)

    counts = []
    for seed, radius in enumerate((1e-6, 1.0, 1e6)):
        _, info = step(jax.random.key(seed + 1), state, (a, b), 0.01, 1e-2, radius)
        assert int(info.bits_up) == num_directions * bits == method.bits
        assert int(info.function_evaluations) == 2 * num_directions
        chex.assert_shape(info.codes, (3, num_directions))
        assert int(np.max(np.asarray(info.codes, np.int64))) <= 2**bits - 1
        p = np.asarray(projected(jax.random.split(jax.random.key(seed + 1))[0]))
        assert int(info.clipped) == int(np.sum(np.abs(p) > radius))
        counts.append(int(info.clipped))
    assert counts[0] == 3 * num_directions and counts[-1] == 0


def test_converges_on_least_squares_with_four_workers():
    a, b = least_squares_workers()
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    x_star = np.linalg.lstsq(a64.reshape(-1, 6), b64.reshape(-1), rcond=None)[0]

    def objective(x):
        return 0.5 * np.mean((a64 @ x - b64) ** 2)

    method = zeroth_order(least_squares, num_directions=2, bits=8)
    state = method.init(jax.random.key(0), jnp.zeros(6))
    run = jax.jit(
        lambda key, state: scan_steps(method.step, key, state, 300, (a, b), 0.05, 1e-3, 8.0)
    )
    final, info = run(jax.random.key(1), state)
    start = objective(np.zeros(6)) - objective(x_star)
    end = objective(np.asarray(final.params, np.float64)) - objective(x_star)
    assert end < 1e-4 * start, (start, end)
    assert int(final.step) == 300 and np.all(np.isfinite(info.loss))


def test_non_finite_loss_shows_in_info():
    def loss(params, batch):
        return jnp.sum(jnp.exp(batch * params))

    method = zeroth_order(loss)
    state = method.init(jax.random.key(0), jnp.ones(2))
    batches = jnp.array([[1.0, 1.0], [1e30, 1.0]])
    _, info = jax.jit(method.step)(jax.random.key(1), state, batches, 0.1, 1e-3, 1.0)
    assert not np.isfinite(float(info.loss))


def test_same_key_same_bits_vmap_over_seeds_and_step_sizes_equals_a_loop():
    a, b = least_squares_workers()
    method = zeroth_order(least_squares, num_directions=2, bits=8, rounding="stochastic")
    state = method.init(jax.random.key(0), jnp.zeros(6))

    def run(key, step_size):
        return scan_steps(method.step, key, state, 5, (a, b), step_size, 1e-2, 10.0)

    first = jax.jit(run)(jax.random.key(2), 0.05)
    again = jax.jit(run)(jax.random.key(2), 0.05)
    chex.assert_trees_all_equal(first, again)
    seeds = jnp.arange(3)
    step_sizes = jnp.array([0.01, 0.05, 0.1])
    batched = jax.jit(jax.vmap(lambda s, g: run(jax.random.key(s), g)))(seeds, step_sizes)
    for s, g in zip(range(3), step_sizes):
        looped = jax.jit(run)(jax.random.key(s), g)
        chex.assert_trees_all_close(jax.tree.map(lambda t, s=s: t[s], batched), looped, rtol=1e-6)
        np.testing.assert_array_equal(batched[1].codes[s], looped[1].codes)


def test_step_compiles_once_for_new_hyper_parameters():
    a, b = least_squares_workers()
    method = zeroth_order(least_squares, num_directions=2)
    state = method.init(jax.random.key(0), jnp.zeros(6))
    step = jax.jit(chex.assert_max_traces(method.step, n=1))
    for t in range(3):
        state, info = step(
            jax.random.key(t + 1),
            state,
            (a, b),
            jnp.float32(0.01 * (t + 1)),
            jnp.float32(1e-3 * (t + 1)),
            jnp.float32(5.0 + t),
        )
    assert int(state.step) == 3


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: zeroth_order(least_squares, bits=0), ValueError, "bits must be a positive"),
        (lambda: zeroth_order(least_squares, bits=33), ValueError, "bits must be at most 32"),
        (lambda: zeroth_order(least_squares, num_directions=0), ValueError, "num_directions"),
        (lambda: zeroth_order(least_squares, rounding="up"), ValueError, "rounding"),
        (lambda: zeroth_order("loss"), TypeError, "loss_fn"),
        (lambda: quantize(jnp.zeros(2), 1.0, 40), ValueError, "bits must be at most"),
        (lambda: quantize(jnp.zeros(2), 0.0, 8), ValueError, "radius must be positive"),
        (lambda: dequantize(jnp.zeros(2, jnp.uint32), 1.0, 0), ValueError, "bits"),
        (lambda: direction(jnp.zeros(2), jnp.zeros(2)), TypeError, "key"),
        (
            lambda: spsa_projected_gradient(
                least_squares, jnp.zeros(6), least_squares_workers(n=1), jax.random.key(0), 0.0
            ),
            ValueError,
            "epsilon",
        ),
        (
            lambda: apply_codes(
                jax.random.key(0), jnp.zeros(2), jnp.zeros((2, 3), jnp.int32), 0.1, 1.0, 8
            ),
            ValueError,
            "codes must be a uint32",
        ),
        (
            lambda: reconstruct(jax.random.key(0), jnp.zeros(2), jnp.zeros((2, 2))),
            ValueError,
            "coefficients",
        ),
    ],
)
def test_bad_arguments_raise_before_tracing(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "batches, hyper, match",
    [
        ((jnp.zeros((0, 16, 6)), jnp.zeros((0, 16))), (0.1, 1e-3, 1.0), "at least one worker"),
        ((jnp.zeros((4, 16, 6)), jnp.zeros((3, 16))), (0.1, 1e-3, 1.0), "worker_batches"),
        ((jnp.zeros((4, 16, 6)), jnp.zeros((4, 16))), (0.1, 0.0, 1.0), "epsilon"),
        ((jnp.zeros((4, 16, 6)), jnp.zeros((4, 16))), (0.1, -1e-3, 1.0), "epsilon"),
        ((jnp.zeros((4, 16, 6)), jnp.zeros((4, 16))), (np.nan, 1e-3, 1.0), "step_size"),
        ((jnp.zeros((4, 16, 6)), jnp.zeros((4, 16))), (0.1, 1e-3, -2.0), "radius"),
    ],
)
def test_bad_step_arguments_raise_before_tracing(batches, hyper, match):
    def loss(params, batch):
        raise AssertionError("traced before the check")

    method = zeroth_order(loss)
    state = method.init(jax.random.key(0), jnp.zeros(6))
    with pytest.raises(ValueError, match=match):
        method.step(jax.random.key(1), state, batches, *hyper)
