"""The SGD driver: exact small cases, rates as measured slopes, vmap/jit, divergence, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shufflesgd import drivers, problems, shuffling


def small_problem(n=8, d=3, seed=0):
    a, b = problems.synthetic_regression(seed, n, d, noise=1.0)
    return problems.least_squares(a, b)


def test_incremental_sgd_matches_a_hand_written_loop(x64):
    p = small_problem()
    a, b = (np.asarray(t) for t in p.data[:2])
    lr, num_epochs = 0.05, 3
    run = shuffling.make_sgd_run(p, shuffling.incremental(8), num_epochs=num_epochs, batch_size=2)
    result = jax.jit(run)(jax.random.key(0), jnp.zeros(3), lr)
    x = np.zeros(3)
    for _ in range(num_epochs):
        for batch in np.arange(8).reshape(4, 2):
            x = x - lr * np.mean([(a[i] @ x - b[i]) * a[i] for i in batch], axis=0)
    np.testing.assert_allclose(result.params, x, rtol=1e-12)
    np.testing.assert_allclose(
        result.suboptimality[-1], float(p.loss(jnp.asarray(x)) - p.f_star), rtol=1e-10
    )


def test_full_batch_is_gradient_descent_with_linear_rate(x64):
    p = small_problem()
    lr = 1.0 / float(p.smoothness)
    run = shuffling.make_sgd_run(p, shuffling.random_reshuffle(8), num_epochs=60, batch_size=8)
    sub = np.asarray(run(jax.random.key(0), jnp.zeros(3), lr).suboptimality)
    # GD on a quadratic: f - f* contracts by at most (1 - lr*mu)^2 per step
    bound = (1 - lr * float(p.mu)) ** 2
    ratios = sub[1:] / sub[:-1]
    assert np.all(ratios <= bound + 1e-9)


def test_vmap_over_seeds_and_step_sizes_equals_separate_runs(x64):
    p = small_problem()
    scheme = shuffling.grab_pair_balance(8)
    run = shuffling.make_sgd_run(p, scheme, num_epochs=5, batch_size=2)
    keys = jax.random.split(jax.random.key(1), 3)
    lrs = jnp.array([0.01, 0.05])
    sweep = jax.jit(jax.vmap(jax.vmap(run, in_axes=(None, None, 0)), in_axes=(0, None, None)))
    batched = sweep(keys, jnp.zeros(3), lrs)
    chex.assert_shape(batched.suboptimality, (3, 2, 5))
    for i in range(3):
        for j in range(2):
            key = jax.random.split(jax.random.key(1), 3)[i]  # the same key, drawn afresh
            single = jax.jit(run)(key, jnp.zeros(3), lrs[j])
            np.testing.assert_allclose(
                batched.suboptimality[i, j], single.suboptimality, rtol=1e-10
            )


def test_run_compiles_once_across_step_sizes():
    p = small_problem()
    run = shuffling.make_sgd_run(p, shuffling.random_reshuffle(8), num_epochs=2)
    traced = jax.jit(chex.assert_max_traces(run, n=1))
    for lr in (0.01, 0.02, 0.03):
        traced(jax.random.key(0), jnp.zeros(3), jnp.float32(lr))


def test_same_seed_same_bits():
    p = small_problem()
    run = jax.jit(shuffling.make_sgd_run(p, shuffling.grab_mean_balance(8), num_epochs=4))
    a = run(jax.random.key(9), jnp.zeros(3), 0.02)
    b = run(jax.random.key(9), jnp.zeros(3), 0.02)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.suboptimality, b.suboptimality)


def test_divergence_is_reported_with_its_epoch():
    p = small_problem()
    run = shuffling.make_sgd_run(p, shuffling.random_reshuffle(8), num_epochs=40)
    result = run(jax.random.key(0), jnp.zeros(3), 10.0 / float(p.smoothness) * 20)
    epoch = int(result.diverged_epoch)
    assert 0 <= epoch < 40
    assert np.all(np.isfinite(result.suboptimality[:epoch]))
    assert not np.isfinite(result.suboptimality[epoch])
    fine = run(jax.random.key(0), jnp.zeros(3), 0.01)
    assert int(fine.diverged_epoch) == -1


def test_any_optax_optimizer_plugs_in(x64):
    p = small_problem()
    run = shuffling.make_sgd_run(
        p, shuffling.random_reshuffle(8), num_epochs=200, optimizer=optax.adam
    )
    result = run(jax.random.key(0), jnp.zeros(3), 0.01)
    assert float(result.suboptimality[-1]) < 1e-2 * float(result.suboptimality[0])


def test_theory_step_size_formula():
    p = small_problem()
    eta = shuffling.theory_step_size(p, 100, c=3.0)
    np.testing.assert_allclose(eta, 3.0 * np.log(800) / (float(p.mu) * 800), rtol=1e-6)


def final_suboptimality(p, name, epochs, seeds=16, c=3.0):
    """Mean over seeds of f(x_K) - f* for each K, in one vmapped call (run K_max epochs)."""
    scheme = shuffling.make_scheme(name, p.num_examples)
    run = shuffling.make_sgd_run(p, scheme, num_epochs=max(epochs))
    lrs = jnp.array([shuffling.theory_step_size(p, k, c=c) for k in epochs])
    keys = jax.random.split(jax.random.key(0), seeds)
    sweep = jax.jit(jax.vmap(jax.vmap(run, in_axes=(None, None, 0)), in_axes=(0, None, None)))
    sub = np.asarray(sweep(keys, jnp.zeros_like(p.x_star), lrs).suboptimality)
    return np.array([sub[:, i, k - 1].mean() for i, k in enumerate(epochs)])


def test_rates_with_replacement_is_one_over_k_and_shuffling_is_faster(x64):
    """Measured log-log slopes on least squares (n=32, d=4): with replacement ~ -1,
    RR steeper than -2 (Safran & Shamir 2020: 1/(nK)^2 + 1/(nK^3) on quadratics), SS ~ -2."""
    p = small_problem(n=32, d=4)
    epochs = [16, 32, 64, 128, 256]
    slope = {
        name: np.polyfit(np.log(epochs), np.log(final_suboptimality(p, name, epochs)), 1)[0]
        for name in ["with_replacement", "random_reshuffle", "single_shuffle"]
    }
    assert -1.3 < slope["with_replacement"] < -0.7, slope
    assert slope["random_reshuffle"] < -2.0, slope
    assert -2.4 < slope["single_shuffle"] < -1.5, slope


def test_bad_arguments_raise_before_tracing():
    p = small_problem()
    with pytest.raises(ValueError, match="num_epochs must be a positive int"):
        shuffling.make_sgd_run(p, shuffling.random_reshuffle(8), num_epochs=0)
    with pytest.raises(ValueError, match="scheme is over 9 examples"):
        shuffling.make_sgd_run(p, shuffling.random_reshuffle(9), num_epochs=1)
    with pytest.raises(ValueError, match="does not divide"):
        shuffling.make_sgd_run(p, shuffling.random_reshuffle(8), num_epochs=1, batch_size=3)
    run = shuffling.make_sgd_run(p, shuffling.random_reshuffle(8), num_epochs=1)
    with pytest.raises(ValueError, match="learning_rate must be positive and finite"):
        run(jax.random.key(0), jnp.zeros(3), -0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        drivers.check_learning_rate(np.array([0.1, -1.0]))
    with pytest.raises(TypeError, match="optimizer must be a callable"):
        shuffling.make_sgd_run(
            p, shuffling.random_reshuffle(8), num_epochs=1, optimizer=optax.sgd(0.1)
        )
