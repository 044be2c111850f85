"""The lax.scan drivers: keys by fold_in, resuming by a start offset, compiling once, vmap over
seeds, GraB's observations in visiting order, one scheme per worker, and minibatching."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import drivers, shuffling

N, D, BATCH = 12, 3, 4
TABLE = jnp.asarray(np.random.default_rng(0).standard_normal((N, D)), jnp.float32)


def noisy_step(key, x, step_size):
    """A random walk with drift: ``x <- (1 - h) x + sqrt(h) z``."""
    x = (1 - step_size) * x + jnp.sqrt(step_size) * jax.random.normal(key, x.shape)
    return x, jnp.sum(x**2)


def batch_step(key, x, indices, step_size):
    """Noisy SGD on ``0.5 ||x - a_i||^2``: per-example gradients ``x - a_i`` for the scheme."""
    grads = x - TABLE[indices]
    x = x - step_size * jnp.mean(grads, axis=0) + 0.01 * jax.random.normal(key, x.shape)
    return x, jnp.sum(x**2), grads


def keys_of(seed):
    """The scheme's and the steps' keys of a run (fresh key objects on every call)."""
    return jax.random.split(jax.random.key(seed))


def run_epochs(scheme, seed, num_epochs, step_size=0.1, start=0, state=None, **options):
    scheme_key, step_key = keys_of(seed) if isinstance(seed, int) else jax.random.split(seed)
    if state is None:
        state = (jnp.zeros(D), scheme.init(scheme_key, jnp.zeros(D)))
    return drivers.scan_epochs(
        batch_step,
        scheme,
        scheme_key,
        step_key,
        *state,
        num_epochs,
        step_size,
        batch_size=BATCH,
        start=start,
        **options,
    )


# ------------------------------------------------------------------ scan_steps


def test_scan_steps_keys_are_fold_in_of_the_step_and_resume_by_start():
    key = jax.random.key(0)
    state, infos = drivers.scan_steps(noisy_step, key, jnp.ones(2), 10, 0.1)
    x = jnp.ones(2)
    for t in range(10):
        x, _ = noisy_step(jax.random.fold_in(key, t), x, 0.1)
    np.testing.assert_allclose(state, x, rtol=1e-6)  # op by op here, fused in the scan
    half, first = drivers.scan_steps(noisy_step, key, jnp.ones(2), 4, 0.1)
    resume = jax.jit(lambda s, start: drivers.scan_steps(noisy_step, key, s, 6, 0.1, start=start))
    resumed, rest = resume(half, jnp.int32(4))  # a traced offset
    np.testing.assert_array_equal(resumed, state)
    np.testing.assert_array_equal(jnp.concatenate([first, rest]), infos)


def test_scan_steps_compiles_once_across_hyper_parameters():
    step = chex.assert_max_traces(noisy_step, n=1)
    run = jax.jit(lambda key, h: drivers.scan_steps(step, key, jnp.zeros(2), 20, h))
    for h in (0.1, 0.2, 0.3):
        run(jax.random.key(1), jnp.float32(h))


def test_scan_steps_vmaps_over_seeds():
    keys = jax.random.split(jax.random.key(2), 3)
    run = lambda k: drivers.scan_steps(noisy_step, k, jnp.zeros(2), 8, 0.2)
    batched, _ = jax.jit(jax.vmap(run))(keys)
    for i in range(3):
        single, _ = run(jax.random.split(jax.random.key(2), 3)[i])
        np.testing.assert_array_equal(batched[i], single)


# ------------------------------------------------------------------ scan_epochs


def hand_loop(scheme, seed, num_epochs, step_size=0.1):
    """The epoch driver written out: orders from ``fold_in(scheme_key, k)``, steps from
    ``fold_in(step_key, t)``, and every example observed in visiting order."""
    scheme_key, step_key = keys_of(seed)
    x, scheme_state = jnp.zeros(D), scheme.init(scheme_key, jnp.zeros(D))
    orders, infos, t = [], [], 0
    for k in range(num_epochs):
        scheme_state, order = scheme.step(jax.random.fold_in(scheme_key, k), scheme_state)
        orders.append(np.asarray(order))
        for indices in np.asarray(order).reshape(-1, BATCH):
            key = jax.random.fold_in(step_key, t)
            x, info, grads = batch_step(key, x, jnp.asarray(indices), step_size)
            infos.append(info)
            for i, g in zip(indices, grads):
                scheme_state = scheme.observe(scheme_state, jnp.int32(i), g)
            t += 1
    return x, scheme_state, orders, jnp.stack(infos)


@pytest.mark.parametrize("name", ["random_reshuffle", "grab_mean_balance", "grab_pair_balance"])
def test_scan_epochs_equals_the_hand_loop_with_observations_in_visiting_order(name, x64):
    scheme = shuffling.make_scheme(name, N)
    x, scheme_state, infos = jax.jit(lambda: run_epochs(scheme, 3, 4))()
    want_x, want_state, orders, want_infos = hand_loop(scheme, 3, 4)
    chex.assert_trees_all_close(
        (x, scheme_state, infos), (want_x, want_state, want_infos), rtol=1e-12
    )
    if scheme.uses_gradients:  # the herded order differs from the first epoch's permutation
        np.testing.assert_array_equal(np.asarray(scheme_state.order), orders[-1])
        assert not np.array_equal(orders[1], orders[0])


@pytest.mark.parametrize("name", ["random_reshuffle", "flipflop", "rs2", "grab_pair_balance"])
def test_resume_by_start_offset_equals_the_uninterrupted_run(name):
    scheme = shuffling.make_scheme(name, N, **({"ratio": 2 / 3} if name == "rs2" else {}))
    x, scheme_state, infos = run_epochs(scheme, 4, 5)
    mid_x, mid_state, first = run_epochs(scheme, 4, 2)
    resumed = jax.jit(lambda state, start: run_epochs(scheme, 4, 3, start=start, state=state))
    end_x, end_state, rest = resumed((mid_x, mid_state), jnp.int32(2))
    chex.assert_trees_all_equal((end_x, end_state), (x, scheme_state))
    np.testing.assert_array_equal(jnp.concatenate([first, rest]), infos)


def test_scan_epochs_compiles_once_across_step_sizes():
    counted = chex.assert_max_traces(batch_step, n=1)
    scheme = shuffling.grab_mean_balance(N)

    @jax.jit
    def run(key, step_size):
        scheme_key, step_key = jax.random.split(key)
        scheme_state = scheme.init(scheme_key, jnp.zeros(D))
        return drivers.scan_epochs(
            counted,
            scheme,
            scheme_key,
            step_key,
            jnp.zeros(D),
            scheme_state,
            3,
            step_size,
            batch_size=BATCH,
        )

    for h in (0.1, 0.2, 0.3):
        run(jax.random.key(5), jnp.float32(h))


def test_scan_epochs_vmaps_over_seeds_and_summaries_keep_epoch_ends():
    scheme = shuffling.grab_pair_balance(N)
    keys = lambda: jax.random.split(jax.random.key(6), 3)  # noqa: E731  (fresh keys for each side)
    summary = lambda x, infos: (x, infos[-1])  # noqa: E731
    run = jax.jit(jax.vmap(lambda k: run_epochs(scheme, k, 3, summary=summary)))
    xs, _, (ends, last_infos) = run(keys())
    chex.assert_shape(ends, (3, 3, D))
    for i in range(3):
        x, _, infos = run_epochs(scheme, jax.random.split(jax.random.key(6), 3)[i], 3)
        np.testing.assert_array_equal(xs[i], x)
        np.testing.assert_array_equal(ends[i, -1], x)
        np.testing.assert_array_equal(last_infos[i], infos[N // BATCH - 1 :: N // BATCH])


def test_one_scheme_per_worker_when_the_key_has_a_worker_axis():
    """Worker ``i`` with key ``keys[i]`` visits the orders of the single scheme with that key."""
    scheme = shuffling.random_reshuffle(N)
    keys = lambda: jax.random.split(jax.random.key(7), 2)  # noqa: E731  (fresh keys for each use)
    states = jax.vmap(scheme.init, in_axes=(0, None))(keys(), None)

    def step(key, x, indices):
        assert indices.shape == (2, BATCH)  # [workers, batch]
        return x, indices, None

    _, _, visited = drivers.scan_epochs(
        step, scheme, keys(), jax.random.key(8), jnp.zeros(()), states, 2, batch_size=BATCH
    )
    seen = np.asarray(visited).reshape(2, N // BATCH, 2, BATCH)  # [epochs, batches, workers, batch]
    for worker in range(2):
        key = keys()[worker]
        state = scheme.init(key, None)
        for k in range(2):
            state, order = scheme.step(jax.random.fold_in(key, k), state)
            np.testing.assert_array_equal(seen[k, :, worker].ravel(), order)


def test_a_herding_scheme_needs_per_example_gradients():
    scheme = shuffling.grab_mean_balance(N)
    with pytest.raises(ValueError, match="grads=None"):
        drivers.scan_epochs(
            lambda key, x, indices: (x, None, None),
            scheme,
            jax.random.key(0),
            None,
            jnp.zeros(D),
            scheme.init(jax.random.key(1), jnp.zeros(D)),
            1,
            batch_size=BATCH,
        )
    with pytest.raises(ValueError, match="batch_size=5 does not divide"):
        drivers.scan_epochs(
            batch_step, scheme, jax.random.key(0), None, jnp.zeros(D), None, 1, 0.1, batch_size=5
        )


# ------------------------------------------------------------------ minibatches and validation


def test_minibatches_reshape_in_order():
    order = jnp.arange(12, dtype=jnp.int32)[::-1]
    batches = drivers.minibatches(order, 4)
    np.testing.assert_array_equal(batches, np.arange(12)[::-1].reshape(3, 4))
    dropped = drivers.minibatches(order, 5, drop_remainder=True)
    np.testing.assert_array_equal(dropped, np.arange(12)[::-1][:10].reshape(2, 5))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: drivers.check_batch_size(10, 0), "batch_size must be positive"),
        (lambda: drivers.check_batch_size(10, 11), "batch_size=11 exceeds"),
        (lambda: drivers.check_batch_size(10, 3), "does not divide"),
        (lambda: drivers.scan_steps(noisy_step, jax.random.key(0), jnp.zeros(2), 2.5), "num_steps"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_integer_batch_size_raises_type_error():
    with pytest.raises(TypeError, match="batch_size must be a Python int"):
        drivers.check_batch_size(10, 2.0)
