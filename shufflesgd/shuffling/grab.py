r"""GraB: herding the examples into an order whose gradient prefix sums stay small.

Lu, Guo & De Sa (NeurIPS 2022), "GraB: Finding Provably Better Data Permutations than Random
Reshuffling": shuffling SGD's error is governed by how far the prefix sums
:math:`\max_s \|\sum_{t\le s}(\nabla f_{\sigma(t)} - \nabla f)\|` of its orders stray (about
:math:`\sqrt n` for a random permutation), and a herding walk over the previous epoch's
gradients builds orders whose prefix sums stay bounded, online.  While epoch :math:`k`
visits :math:`\sigma_k`, every visited gradient :math:`g_t` (or a difference of two) gets a
sign :math:`\epsilon_t = \pm 1` that keeps the walk :math:`w = \sum \epsilon_t v_t` short
(:math:`\epsilon_t = +1` iff :math:`\|w + v_t\| < \|w - v_t\|`, i.e. :math:`\langle w, v_t
\rangle < 0`); the ``+1`` examples fill :math:`\sigma_{k+1}` from the front in visiting order,
the ``-1`` ones from the back.  Two balancers: :func:`grab_mean_balance` (Alg. 4 with the
deterministic balance of Alg. 5, centring by the stale mean) and :func:`grab_pair_balance`
(Cooper et al. 2023, CD-GraB, Alg. 2 on one worker, signing differences of consecutive
gradients).  Both are :class:`~shufflesgd.shuffling.schemes.ShufflingScheme`\ s with
``observe``: the driver (:mod:`shufflesgd.drivers`) feeds each example's gradient in visiting
order, and ``step`` returns the herded order (the epoch key is unused; the first epoch is the
uniform permutation drawn at ``init`` from ``fold_in(key, 0)``, RR's first epoch).  Memory is
``O(n)`` integers and ``O(d)`` floats: the orders and at most three gradient-shaped sums,
never the ``n`` gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from shufflesgd._checks import check_float_array
from shufflesgd.shuffling.schemes import (
    ShufflingScheme,
    _check_num_examples,
    _permutation,
    checked_scheme,
)

PyTree = Any


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


def _check_params(params: PyTree) -> None:
    """GraB sums gradients shaped like ``params``: a non-empty pytree of float arrays
    (an integer leaf would truncate the sums)."""
    if not jax.tree.leaves(params):
        raise ValueError("params must hold at least one array (GraB balances gradients like it)")
    check_float_array("params", params)


def _grab_order_state(key: jax.Array, n: int) -> dict[str, jax.Array]:
    # left = n, right = n - 1: "every slot already placed", so the first step
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
        _check_params(params)
        zeros = _zeros_like_tree(params)
        return MeanBalanceState(
            **_grab_order_state(key, n), run_sum=zeros, stale_mean=zeros, epoch_sum=zeros
        )

    def step(key: jax.Array, state: MeanBalanceState) -> tuple[MeanBalanceState, jax.Array]:
        del key
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

    return checked_scheme(init, step, observe, n, n, True)


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
        _check_params(params)
        zeros = _zeros_like_tree(params)
        return PairBalanceState(
            **_grab_order_state(key, n),
            run_sum=zeros,
            pending=zeros,
            pending_index=jnp.zeros((), jnp.int32),
            has_pending=jnp.zeros((), bool),
        )

    def step(key: jax.Array, state: PairBalanceState) -> tuple[PairBalanceState, jax.Array]:
        del key
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
        first = jnp.where(closes, state.pending_index, next_order[first_slot])
        next_order = _place(next_order, first_slot, first)
        second = jnp.where(closes, index, next_order[second_slot])
        next_order = _place(next_order, second_slot, second)
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

    return checked_scheme(init, step, observe, n, n, True)
