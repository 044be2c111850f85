"""Shuffling schemes: valid orders, the defining property of each scheme, GraB vs NumPy.

A scheme is driven here as the drivers drive it: epoch ``k`` is ``scheme.step(fold_in(key, k),
state)`` after ``scheme.init(key, params)``."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shufflesgd import shuffling
from shufflesgd.shuffling import schemes
from support.epochs import epoch_key, epochs, is_permutation

ORDER_SCHEMES = [
    "with_replacement",
    "random_reshuffle",
    "single_shuffle",
    "incremental",
    "flipflop",
]
GRAB_SCHEMES = ["grab_mean_balance", "grab_pair_balance"]


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
@pytest.mark.parametrize(
    "name", ["random_reshuffle", "single_shuffle", "incremental", "flipflop"] + GRAB_SCHEMES
)
def test_every_epoch_is_a_permutation(name, n, seed):
    orders = epochs(shuffling.make_scheme(name, n), jax.random.key(seed), 4)
    assert orders.dtype == np.int32
    for order in orders:
        assert is_permutation(order, n)


@pytest.mark.parametrize("n", [1, 2, 3, 32, 33, schemes.RANKED_PERMUTATION_MAX, 129])
def test_permutation_is_jax_random_permutation_bit_for_bit(n):
    """The ranked permutation (n <= 128; 129 takes JAX's own sort) is
    ``jax.random.permutation(fold_in(key, k), n)``: 64 keys × 3 epochs, jitted and vmapped as
    the sweeps run it, random reshuffling's epochs, and in float64 mode (int64 indices).  A JAX
    release that draws its permutations differently fails here."""

    def over_keys_and_epochs(permutation):
        one = lambda key, k: permutation(jax.random.fold_in(key, k), n)
        return jax.jit(jax.vmap(jax.vmap(one, (None, 0)), (0, None)))

    keys, epochs_k = jax.random.split(jax.random.key(n), 64), jnp.arange(3)
    ours = over_keys_and_epochs(schemes._random_permutation)(keys, epochs_k)
    jax_own = over_keys_and_epochs(jax.random.permutation)(keys, epochs_k)
    assert ours.dtype == jax_own.dtype
    np.testing.assert_array_equal(ours, jax_own)
    key = jax.random.key(n + 1)  # random reshuffling's epochs, driven as the drivers do
    for k, order in enumerate(epochs(shuffling.make_scheme("random_reshuffle", n), key, 3)):
        np.testing.assert_array_equal(order, jax.random.permutation(epoch_key(key, k), n))
    with jax.enable_x64(True):
        key = jax.random.key(7)
        ours, jax_own = (
            schemes._permutation(key, 1, n),
            jax.random.permutation(jax.random.fold_in(key, 1), n),
        )
        assert ours.dtype == jax_own.dtype
        np.testing.assert_array_equal(ours, jax_own)


@settings(max_examples=30, deadline=None)
@given(words=st.lists(st.integers(0, 3), min_size=1, max_size=40))
def test_ranking_is_a_stable_argsort_also_with_ties(words):
    """Few distinct words, so most draws tie: ranks put tied elements in index order, as a
    stable sort does (NumPy's)."""
    ours = schemes._stable_argsort_by_ranks(jnp.asarray(words, dtype=jnp.uint32))
    np.testing.assert_array_equal(ours, np.argsort(np.asarray(words), kind="stable"))


def test_with_replacement_draws_uniform_indices():
    n, num_epochs = 10, 2000
    orders = epochs(shuffling.with_replacement(n), jax.random.key(0), num_epochs)
    counts = np.bincount(orders.ravel(), minlength=n)
    expected = n * num_epochs / n
    # chi-square with n-1 = 9 degrees of freedom: P(chi2 > 27.9) = 0.001
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 27.9
    assert not all(is_permutation(o, n) for o in orders[:10])


def test_single_shuffle_repeats_and_random_reshuffle_does_not():
    n = 20
    ss = epochs(shuffling.single_shuffle(n), jax.random.key(1), 5)
    rr = epochs(shuffling.random_reshuffle(n), jax.random.key(1), 5)
    assert all(np.array_equal(ss[0], o) for o in ss)
    assert not np.array_equal(ss[0], np.arange(n))
    assert len({tuple(o) for o in rr}) == 5


def test_incremental_is_the_identity():
    orders = epochs(shuffling.incremental(7), jax.random.key(0), 3)
    np.testing.assert_array_equal(orders, np.tile(np.arange(7), (3, 1)))


@pytest.mark.parametrize("name", ORDER_SCHEMES + GRAB_SCHEMES + ["rs2"])
def test_same_key_same_bits_and_different_keys_differ(name):
    options = {"ratio": 0.5} if name == "rs2" else {}
    scheme = shuffling.make_scheme(name, 16, **options)
    a = epochs(scheme, jax.random.key(3), 3)
    b = epochs(scheme, jax.random.key(3), 3)
    np.testing.assert_array_equal(a, b)
    if name != "incremental":
        assert not np.array_equal(a, epochs(scheme, jax.random.key(4), 3))


@pytest.mark.parametrize("name", ORDER_SCHEMES + GRAB_SCHEMES)
def test_epoch_k_is_a_pure_function_of_key_and_k(name):
    """Resuming from the state after k epochs replays exactly what a straight run draws."""
    scheme = shuffling.make_scheme(name, 9)
    key = jax.random.key(5)
    straight = epochs(scheme, key, 6)
    state = scheme.init(key, jnp.zeros(3))
    for k in range(3):
        state, _ = scheme.step(epoch_key(key, k), state)
    resumed = [scheme.step(epoch_key(key, 3), state)[1]]
    state, _ = scheme.step(epoch_key(key, 3), state)
    resumed.append(scheme.step(epoch_key(key, 4), state)[1])
    np.testing.assert_array_equal(straight[3:5], np.asarray(resumed))


@pytest.mark.parametrize("name", ORDER_SCHEMES + GRAB_SCHEMES)
def test_jit_vmap_over_seeds(name):
    scheme = shuffling.make_scheme(name, 11)
    keys = jax.random.split(jax.random.key(0), 4)

    @jax.jit
    @jax.vmap
    def first_two(key):
        state = scheme.init(key, jnp.zeros(2))
        state, a = scheme.step(epoch_key(key, 0), state)
        _, b = scheme.step(epoch_key(key, 1), state)
        return jnp.stack([a, b])

    batched = np.asarray(first_two(keys))
    chex.assert_shape(batched, (4, 2, 11))
    for i in range(4):
        np.testing.assert_array_equal(batched[i], epochs(scheme, keys[i], 2))


def test_step_compiles_once():
    scheme = shuffling.random_reshuffle(8)
    step = jax.jit(chex.assert_max_traces(scheme.step, n=1))
    key = jax.random.key(0)
    state = scheme.init(key, None)
    for k in range(4):
        state, _ = step(epoch_key(key, k), state)
    assert int(state.epoch) == 4


# ------------------------------------------------------------------ GraB vs NumPy


def numpy_mean_balance(first_order, grads_per_epoch):
    """Lu, Guo, De Sa (2022) Alg. 4 + 5 written directly: herd centred gradients, reorder."""
    order = list(first_order)
    stale_mean = np.zeros(grads_per_epoch[0].shape[1])
    orders = [np.array(order)]
    for grads in grads_per_epoch:  # grads[i] is the gradient of example i this epoch
        s = np.zeros_like(stale_mean)
        front, back = [], []
        for i in order:
            c = grads[i] - stale_mean
            if np.linalg.norm(s + c) < np.linalg.norm(s - c):
                s += c
                front.append(i)
            else:
                s -= c
                back.append(i)
        stale_mean = grads[order].mean(axis=0)
        order = front + back[::-1]
        orders.append(np.array(order))
    return orders


def numpy_pair_balance(first_order, grads_per_epoch):
    """Cooper et al. (2023) PairBalance written directly on consecutive pairs."""
    order = list(first_order)
    orders = [np.array(order)]
    for grads in grads_per_epoch:
        s = np.zeros(grads.shape[1])
        front, back = [], []
        for a, b in zip(order[0::2], order[1::2]):
            d = grads[a] - grads[b]
            if np.linalg.norm(s + d) < np.linalg.norm(s - d):
                s += d
                front.append(a)
                back.append(b)
            else:
                s -= d
                front.append(b)
                back.append(a)
        order = front + ([order[-1]] if len(order) % 2 else []) + back[::-1]
        orders.append(np.array(order))
    return orders


@pytest.mark.parametrize(
    "name, reference, n",
    [
        ("grab_mean_balance", numpy_mean_balance, 12),
        ("grab_pair_balance", numpy_pair_balance, 12),
        ("grab_pair_balance", numpy_pair_balance, 11),
    ],
)
def test_grab_matches_numpy_reference(name, reference, n):
    d, num_epochs = 5, 4
    rng = np.random.default_rng(0)
    grads_per_epoch = rng.standard_normal((num_epochs, n, d)) + rng.standard_normal(d)
    scheme = shuffling.make_scheme(name, n)
    key = jax.random.key(7)
    state = scheme.init(key, jnp.zeros(d))
    observe = jax.jit(scheme.observe)
    orders = []
    for epoch in range(num_epochs + 1):
        state, order = jax.jit(scheme.step)(epoch_key(key, epoch), state)
        orders.append(np.asarray(order))
        if epoch < num_epochs:
            for i in orders[-1]:
                grad = jnp.asarray(grads_per_epoch[epoch, i], jnp.float32)
                state = observe(state, jnp.int32(i), grad)
    expected = reference(orders[0], grads_per_epoch.astype(np.float32).astype(np.float64))
    for got, want in zip(orders, expected):
        np.testing.assert_array_equal(got, want)


def test_grab_memory_is_order_d():
    """The state holds O(n) integers and O(1) gradient-shaped sums, never n gradients."""
    n, d = 50, 7
    for name in GRAB_SCHEMES:
        state = shuffling.make_scheme(name, n).init(jax.random.key(0), jnp.zeros(d))
        float_sizes = [
            leaf.size for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)
        ]
        assert sum(float_sizes) <= 3 * d


def test_grab_keeps_unobserved_examples():
    """A partial epoch (e.g. drop_remainder) still yields a permutation next epoch."""
    scheme = shuffling.grab_mean_balance(10)
    key = jax.random.key(0)
    state, order = scheme.step(epoch_key(key, 0), scheme.init(key, jnp.zeros(2)))
    for i in order[:7]:
        state = scheme.observe(state, i, jnp.ones(2) * i)
    _, next_order = scheme.step(epoch_key(key, 1), state)
    assert is_permutation(np.asarray(next_order), 10)
    left = int(state.left)  # observed examples fill [0, left) and (left + 2, 10)
    np.testing.assert_array_equal(np.asarray(next_order)[left : left + 3], np.asarray(order)[7:10])


def test_grab_balances_better_than_random():
    """Herding makes prefix sums of centred gradients small: max prefix norm well below RR's."""
    n, d = 256, 4
    rng = np.random.default_rng(1)
    grads = rng.standard_normal((n, d))
    centred = grads - grads.mean(axis=0)
    scheme = shuffling.grab_pair_balance(n)
    key = jax.random.key(0)
    state, order = scheme.step(epoch_key(key, 0), scheme.init(key, jnp.zeros(d)))
    step = jax.jit(scheme.observe)
    for i in np.asarray(order):
        state = step(state, jnp.int32(i), jnp.asarray(grads[i], jnp.float32))
    _, herded = scheme.step(epoch_key(key, 1), state)

    def discrepancy(o):
        return np.max(np.linalg.norm(np.cumsum(centred[np.asarray(o)], axis=0), axis=1))

    random_discrepancies = [discrepancy(rng.permutation(n)) for _ in range(50)]
    assert discrepancy(herded) < 0.5 * np.median(random_discrepancies)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: shuffling.random_reshuffle(0), "n must be positive"),
        (lambda: shuffling.grab_pair_balance(-3), "n must be positive"),
        (lambda: shuffling.make_scheme("bogus", 5), "scheme must be one of"),
        (lambda: shuffling.rs2(10, 0.0), "ratio"),
        (lambda: shuffling.rs2(10, 1.5), "ratio"),
        (lambda: shuffling.flipflop(10, base="bogus"), "base must be one of"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_non_integer_sizes_raise_type_error():
    with pytest.raises(TypeError, match="n must be a Python int"):
        shuffling.random_reshuffle(4.0)
