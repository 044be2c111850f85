r"""Shuffling schemes: the order in which SGD visits the components of a finite sum.

For :math:`f(x) = \frac1n \sum_{i=0}^{n-1} f_i(x)`, one epoch of shuffling SGD visits
the components in an order :math:`\sigma_k` and steps
:math:`x \leftarrow x - \eta \nabla f_{\sigma_k(t)}(x)`.  The schemes differ only in how
:math:`\sigma_k` is chosen.  Every scheme here is a :class:`ShufflingScheme`, a small set
of pure functions in the manner of optax's ``GradientTransformation``:

* ``init(key, params) -> state``;
* ``next_epoch(state) -> (state, order)`` with ``order`` an ``int32[epoch_length]`` array;
* ``observe(state, index, grad) -> state``, fed each visited example's gradient in
  visiting order (the identity for the schemes that ignore gradients; GraB uses it to
  build the next epoch's order with ``O(d)`` memory).

Randomness is explicit: the order of epoch ``k`` is a pure function of ``(key, k)`` via
``jax.random.fold_in``, so a run resumed at epoch ``k`` replays exactly.  All functions are
jit-, vmap- and scan-compatible; ``n`` and the epoch length are static Python ints.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
OrderFn = Callable[[jax.Array, jax.Array], jax.Array]


class ShufflingScheme(NamedTuple):
    """A shuffling scheme: pure ``init`` / ``next_epoch`` / ``observe`` functions.

    Attributes:
      init: ``(key, params) -> state``; ``params`` is a pytree shaped like one gradient
        (only GraB reads it, to size its running sums).
      next_epoch: ``state -> (state, order)``, the ``int32[epoch_length]`` indices of the
        next epoch.
      observe: ``(state, index, grad) -> state``, called for every visited example in
        visiting order with the gradient used for the update.
      num_examples: ``n``, the number of components.
      epoch_length: how many indices one epoch visits (``n``, or ``ceil(r n)`` for RS2).
      uses_gradients: whether ``observe`` does anything (so loops can skip per-example
        gradients for the other schemes).
    """

    init: Callable[[jax.Array, PyTree], PyTree]
    next_epoch: Callable[[PyTree], tuple[PyTree, jax.Array]]
    observe: Callable[[PyTree, jax.Array, PyTree], PyTree]
    num_examples: int
    epoch_length: int
    uses_gradients: bool


class EpochState(NamedTuple):
    """State of the schemes whose order depends only on ``(key, epoch)``."""

    key: jax.Array
    epoch: jax.Array


def _check_num_examples(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be a Python int, got {type(n).__name__}")
    if n <= 0:
        raise ValueError(f"n must be positive, got n={n}")


def _ignore_gradient(state: PyTree, index: jax.Array, grad: PyTree) -> PyTree:
    del index, grad
    return state


def _order_scheme(n: int, order_fn: OrderFn, epoch_length: int | None = None) -> ShufflingScheme:
    """A scheme whose epoch-``k`` order is ``order_fn(key, k)``."""

    def init(key: jax.Array, params: PyTree = None) -> EpochState:
        del params
        return EpochState(key=key, epoch=jnp.zeros((), jnp.int32))

    def next_epoch(state: EpochState) -> tuple[EpochState, jax.Array]:
        order = order_fn(state.key, state.epoch).astype(jnp.int32)
        return state._replace(epoch=state.epoch + 1), order

    return ShufflingScheme(init, next_epoch, _ignore_gradient, n, epoch_length or n, False)


def _permutation(key: jax.Array, k: jax.Array, n: int) -> jax.Array:
    return jax.random.permutation(jax.random.fold_in(key, k), n)


def with_replacement(n: int) -> ShufflingScheme:
    """SGD with replacement: ``n`` i.i.d. uniform indices per epoch (Robbins & Monro 1951).

    Each epoch is ``n`` draws :math:`i_t \\sim \\mathrm{Unif}\\{0,\\dots,n-1\\}`; the
    suboptimality with step :math:`\\eta \\propto \\log(nK)/(\\mu n K)` decays as
    :math:`\\tilde O(1/(nK))` (e.g. Mishchenko, Khaled, Richtárik 2020, Sec. 3).
    """
    _check_num_examples(n)
    return _order_scheme(
        n, lambda key, k: jax.random.randint(jax.random.fold_in(key, k), (n,), 0, n)
    )


def random_reshuffle(n: int) -> ShufflingScheme:
    """Random reshuffling (RR): a fresh uniform permutation every epoch.

    Mishchenko, Khaled, Richtárik (NeurIPS 2020), "Random Reshuffling: Simple Analysis
    with Vast Improvements", Thm. 1: with :math:`\\eta \\lesssim 1/L`,
    :math:`E\\|x_K - x_*\\|^2 \\le (1-\\eta\\mu)^{nK}\\|x_0-x_*\\|^2
    + 2\\eta^2 n \\sigma_*^2/\\mu`, i.e. :math:`\\tilde O(1/(nK^2))` for
    :math:`\\eta = \\Theta(\\log(nK)/(\\mu n K))`.
    """
    _check_num_examples(n)
    return _order_scheme(n, lambda key, k: _permutation(key, k, n))


def single_shuffle(n: int) -> ShufflingScheme:
    """Single shuffle / shuffle once (SS): one uniform permutation, reused every epoch.

    Same :math:`\\tilde O(1/(nK^2))` upper bound as RR for strongly convex sums
    (Mishchenko, Khaled, Richtárik 2020, Thm. 3; Safran & Shamir 2020).
    """
    _check_num_examples(n)
    return _order_scheme(n, lambda key, k: _permutation(key, 0, n))


def incremental(n: int) -> ShufflingScheme:
    """Incremental gradient (IG): the fixed order ``0, 1, ..., n-1`` every epoch.

    Deterministic; its error is :math:`\\tilde O(1/K^2)` with no :math:`1/n` gain
    (Gürbüzbalaban, Ozdaglar, Parrilo 2019; Mishchenko et al. 2020, Thm. 3).
    """
    _check_num_examples(n)
    return _order_scheme(n, lambda key, k: jnp.arange(n))


_FLIPFLOP_BASES: dict[str, Callable[[int], OrderFn]] = {
    "random_reshuffle": lambda n: lambda key, k: _permutation(key, k, n),
    "single_shuffle": lambda n: lambda key, k: _permutation(key, 0, n),
    "incremental": lambda n: lambda key, k: jnp.arange(n),
}


def flipflop(n: int, base: str = "random_reshuffle") -> ShufflingScheme:
    """FlipFlop: epochs in pairs, a permutation then its reverse.

    Rajput, Lee, Papailiopoulos (ICLR 2022), "Permutation-Based SGD: Is Random Optimal?",
    Sec. 5 (FlipFlop): epoch :math:`2j` uses :math:`\\sigma_j` from the ``base`` scheme
    (RR draws a new one per pair, SS reuses one, IG is the identity) and epoch
    :math:`2j+1` uses :math:`\\sigma_j` reversed, which cancels the leading error term on
    quadratics.
    """
    _check_num_examples(n)
    if base not in _FLIPFLOP_BASES:
        raise ValueError(f"base must be one of {sorted(_FLIPFLOP_BASES)}, got {base!r}")
    base_order = _FLIPFLOP_BASES[base](n)

    def order_fn(key: jax.Array, k: jax.Array) -> jax.Array:
        order = base_order(key, k // 2)
        return jnp.where(k % 2 == 1, order[::-1], order)

    return _order_scheme(n, order_fn)


def rs2_subset_size(n: int, ratio: float) -> int:
    """``ceil(ratio * n)``, the number of examples one RS2 epoch visits."""
    return max(1, math.ceil(round(ratio * n, 9)))


def rs2(n: int, ratio: float) -> ShufflingScheme:
    """RS2 without replacement: each epoch a random subset of size ``m = ceil(ratio n)``.

    Okanovic et al. (2023), "Repeated Random Sampling for Minimizing the Time-to-Accuracy
    of Learning", Alg. 1 (without replacement): shuffle the data once per pass and take
    successive chunks of ``m`` until it is exhausted, then reshuffle.  With ``P =
    ceil(n/m)`` epochs per pass, epoch ``k`` is chunk ``j = k mod P`` of the permutation of
    pass ``p = k // P``; when ``m`` does not divide ``n`` the last chunk wraps to the start
    of the same permutation, so every epoch is a set of distinct indices and no example is
    seen twice before every example has been seen once.
    """
    _check_num_examples(n)
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got ratio={ratio!r}")
    m = rs2_subset_size(n, ratio)
    epochs_per_pass = -(-n // m)

    def order_fn(key: jax.Array, k: jax.Array) -> jax.Array:
        perm = _permutation(key, k // epochs_per_pass, n)
        return perm[((k % epochs_per_pass) * m + jnp.arange(m)) % n]

    return _order_scheme(n, order_fn, epoch_length=m)


# ----------------------------------------------------------------------------- GraB


class MeanBalanceState(NamedTuple):
    """GraB mean-balance state: ``O(n)`` integers and three gradient-shaped sums."""

    epoch: jax.Array
    order: jax.Array  # int32[n], the order being visited
    next_order: jax.Array  # int32[n], filled from both ends while visiting
    left: jax.Array  # next free slot from the front
    right: jax.Array  # next free slot from the back
    run_sum: PyTree  # signed sum of centred gradients (the herding walk)
    stale_mean: PyTree  # previous epoch's mean gradient
    epoch_sum: PyTree  # sum of this epoch's gradients


class PairBalanceState(NamedTuple):
    """GraB pair-balance state: ``O(n)`` integers, the walk and one pending gradient."""

    epoch: jax.Array
    order: jax.Array
    next_order: jax.Array
    left: jax.Array
    right: jax.Array
    run_sum: PyTree
    pending: PyTree  # gradient of the first example of an unfinished pair
    pending_index: jax.Array
    has_pending: jax.Array


def _zeros_like_tree(params: PyTree) -> PyTree:
    return optax.tree.zeros_like(params)


def _grab_order_state(key: jax.Array, n: int) -> dict[str, jax.Array]:
    # left = n, right = n - 1: "every slot already placed", so the first next_epoch
    # returns the initial random permutation unchanged.
    perm = _permutation(key, 0, n).astype(jnp.int32)
    return dict(
        epoch=jnp.zeros((), jnp.int32),
        order=perm,
        next_order=perm,
        left=jnp.asarray(n, jnp.int32),
        right=jnp.asarray(n - 1, jnp.int32),
    )


def _completed_next_order(state: MeanBalanceState | PairBalanceState, n: int) -> jax.Array:
    """The herded order, with any examples not observed this epoch kept in the middle.

    Observed examples fill ``next_order[:left]`` and ``next_order[right+1:]``; the
    unobserved ones are the tail ``order[placed:]`` of the visiting order, copied into the
    free slots ``left..right`` in their visiting order.
    """
    placed = state.left + (n - 1 - state.right)
    slots = jnp.arange(n)
    free = (slots >= state.left) & (slots <= state.right)
    source = jnp.clip(placed + slots - state.left, 0, n - 1)
    return jnp.where(free, state.order[source], state.next_order)


def _place(next_order: jax.Array, slot: jax.Array, index: jax.Array) -> jax.Array:
    return next_order.at[slot].set(index.astype(jnp.int32))


def _signed_add(run_sum: PyTree, vector: PyTree, plus: jax.Array) -> PyTree:
    return jax.tree.map(lambda s, v: s + jnp.where(plus, v, -v), run_sum, vector)


def _balance_sign(run_sum: PyTree, vector: PyTree) -> jax.Array:
    """GraB's deterministic balancing: ``+1`` iff ``||s + v|| < ||s - v||``, i.e. ``<s, v> < 0``."""
    return optax.tree.vdot(run_sum, vector) < 0


def grab_mean_balance(n: int) -> ShufflingScheme:
    """GraB with online mean-balancing (herding against the stale mean).

    Lu, Guo, De Sa (NeurIPS 2022), "GraB: Finding Provably Better Data Permutations than
    Random Reshuffling", Alg. 4 with the deterministic balance of Alg. 5.  In epoch
    :math:`k`, for the visited gradients :math:`g_t` and the previous epoch's mean
    :math:`m_{k-1}` (zero in the first epoch), :math:`c_t = g_t - m_{k-1}`;
    :math:`\\epsilon_t = +1` iff :math:`\\|s + c_t\\| < \\|s - c_t\\|`, then
    :math:`s \\leftarrow s + \\epsilon_t c_t`.  Examples with :math:`+1` fill the next
    order from the front in visiting order, those with :math:`-1` from the back, so the
    ``-1`` ones appear reversed.  The first epoch is a uniform permutation.  Memory per
    step is ``O(d)`` (three sums), plus the ``O(n)`` integer orders.
    """
    _check_num_examples(n)

    def init(key: jax.Array, params: PyTree) -> MeanBalanceState:
        zeros = _zeros_like_tree(params)
        return MeanBalanceState(
            **_grab_order_state(key, n), run_sum=zeros, stale_mean=zeros, epoch_sum=zeros
        )

    def next_epoch(state: MeanBalanceState) -> tuple[MeanBalanceState, jax.Array]:
        order = _completed_next_order(state, n)
        observed = state.left + (n - 1 - state.right)
        stale_mean = jax.tree.map(
            lambda total, old: jnp.where(observed > 0, total / jnp.maximum(observed, 1), old),
            state.epoch_sum,
            state.stale_mean,
        )
        zeros = _zeros_like_tree(state.run_sum)
        new_state = MeanBalanceState(
            epoch=state.epoch + 1,
            order=order,
            next_order=order,
            left=jnp.zeros((), jnp.int32),
            right=jnp.asarray(n - 1, jnp.int32),
            run_sum=zeros,
            stale_mean=stale_mean,
            epoch_sum=zeros,
        )
        return new_state, order

    def observe(state: MeanBalanceState, index: jax.Array, grad: PyTree) -> MeanBalanceState:
        centred = optax.tree.sub(grad, state.stale_mean)
        plus = _balance_sign(state.run_sum, centred)
        slot = jnp.where(plus, state.left, state.right)
        return state._replace(
            next_order=_place(state.next_order, slot, index),
            left=state.left + plus,
            right=state.right - (~plus),
            run_sum=_signed_add(state.run_sum, centred, plus),
            epoch_sum=optax.tree.add(state.epoch_sum, grad),
        )

    return ShufflingScheme(init, next_epoch, observe, n, n, True)


def grab_pair_balance(n: int) -> ShufflingScheme:
    """GraB with pair-balancing: herding on differences of consecutive gradients.

    Cooper, Guo, et al. (NeurIPS 2023), "CD-GraB: Coordinating Distributed Example Orders
    for Provably Accelerated Training", Alg. 2 (PairBalance, one worker).  Visited
    gradients are taken in pairs :math:`(g_a, g_b)`; with :math:`d = g_a - g_b`, if
    :math:`\\|s + d\\| < \\|s - d\\|` then :math:`s \\leftarrow s + d`, ``a`` goes to the
    front and ``b`` to the back of the next order; otherwise :math:`s \\leftarrow s - d`
    and the roles swap.  No stale mean is needed (the difference removes it).  With odd
    ``n`` the last example keeps its place in the middle.
    """
    _check_num_examples(n)

    def init(key: jax.Array, params: PyTree) -> PairBalanceState:
        zeros = _zeros_like_tree(params)
        return PairBalanceState(
            **_grab_order_state(key, n),
            run_sum=zeros,
            pending=zeros,
            pending_index=jnp.zeros((), jnp.int32),
            has_pending=jnp.zeros((), bool),
        )

    def next_epoch(state: PairBalanceState) -> tuple[PairBalanceState, jax.Array]:
        order = _completed_next_order(state, n)
        new_state = state._replace(
            epoch=state.epoch + 1,
            order=order,
            next_order=order,
            left=jnp.zeros((), jnp.int32),
            right=jnp.asarray(n - 1, jnp.int32),
            run_sum=_zeros_like_tree(state.run_sum),
            has_pending=jnp.zeros((), bool),
        )
        return new_state, order

    def observe(state: PairBalanceState, index: jax.Array, grad: PyTree) -> PairBalanceState:
        difference = optax.tree.sub(state.pending, grad)
        plus = _balance_sign(state.run_sum, difference)
        closes = state.has_pending
        first_slot = jnp.where(plus, state.left, state.right)
        second_slot = jnp.where(plus, state.right, state.left)
        # guard the two writes, not the whole order: O(1) per example, not O(n)
        next_order = state.next_order
        next_order = _place(next_order, first_slot, jnp.where(closes, state.pending_index, next_order[first_slot]))
        next_order = _place(next_order, second_slot, jnp.where(closes, index, next_order[second_slot]))
        return state._replace(
            next_order=next_order,
            left=state.left + closes,
            right=state.right - closes,
            run_sum=jax.tree.map(
                lambda new, old: jnp.where(closes, new, old),
                _signed_add(state.run_sum, difference, plus),
                state.run_sum,
            ),
            pending=grad,
            pending_index=index.astype(jnp.int32),
            has_pending=~closes,
        )

    return ShufflingScheme(init, next_epoch, observe, n, n, True)


# ------------------------------------------------------------------ names and batches

SCHEMES: dict[str, Callable[..., ShufflingScheme]] = {
    "with_replacement": with_replacement,
    "random_reshuffle": random_reshuffle,
    "single_shuffle": single_shuffle,
    "incremental": incremental,
    "flipflop": flipflop,
    "rs2": rs2,
    "grab_mean_balance": grab_mean_balance,
    "grab_pair_balance": grab_pair_balance,
}


def make_scheme(name: str, n: int, **options: Any) -> ShufflingScheme:
    """The scheme called ``name`` (a key of :data:`SCHEMES`) over ``n`` examples.

    ``options`` go to the constructor (``ratio`` for ``rs2``, ``base`` for ``flipflop``).
    Raises ``ValueError`` naming ``scheme`` for an unknown name.
    """
    if name not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {name!r}")
    return SCHEMES[name](n, **options)


def check_batch_size(epoch_length: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Validate ``batch_size`` for epochs of ``epoch_length`` indices; return batches per epoch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be a Python int, got {type(batch_size).__name__}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got batch_size={batch_size}")
    if batch_size > epoch_length:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {epoch_length} examples of an epoch"
        )
    if epoch_length % batch_size and not drop_remainder:
        raise ValueError(
            f"batch_size={batch_size} does not divide the epoch length {epoch_length}; "
            "pass drop_remainder=True to drop the last partial batch"
        )
    return epoch_length // batch_size


def minibatches(order: jax.Array, batch_size: int, drop_remainder: bool = False) -> jax.Array:
    """Reshape an epoch order into ``int32[num_batches, batch_size]`` consecutive batches."""
    num_batches = check_batch_size(order.shape[0], batch_size, drop_remainder)
    return order[: num_batches * batch_size].reshape(num_batches, batch_size)
