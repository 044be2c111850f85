r"""The shuffling-scheme protocol, and the schemes whose epoch order is one draw or a fixed order.

For :math:`f(x) = \frac1n \sum_{i=0}^{n-1} f_i(x)`, one epoch of shuffling SGD visits the
components in an order :math:`\sigma_k` and steps :math:`x \leftarrow x - \eta
\nabla f_{\sigma_k(t)}(x)`; the schemes differ only in how :math:`\sigma_k` is chosen.  Every
scheme is a :class:`ShufflingScheme`, an ``(init, step)`` pair in the manner of optax's
``GradientTransformation`` and BlackJAX's ``SamplingAlgorithm``, plus ``observe`` for herding:

* ``init(key, params) -> state``, with the scheme's key;
* ``step(key, state) -> (state, order)``: ``key`` is epoch ``k``'s key
  :math:`\mathrm{fold\_in}(\text{key}, k)`, which the driver (:mod:`shufflesgd.drivers`)
  passes, and ``order`` the ``int32[epoch_length]`` indices the epoch visits;
* ``observe(state, index, grad) -> state``, fed every visited example's gradient in visiting
  order (the identity here; GraB builds its next order from it).

So a run resumed at epoch ``k`` draws exactly what the uninterrupted run drew.  This file
holds the protocol and four schemes: SGD with replacement and random reshuffling draw epoch
``k`` from the epoch key; single shuffle draws one permutation at ``init`` (from
:math:`\mathrm{fold\_in}(\text{key}, 0)`, the key of epoch 0) and incremental gradient uses the
identity.  FlipFlop is in :mod:`shufflesgd.shuffling.flipflop`, RS2 in
:mod:`shufflesgd.shuffling.rs2`, GraB in :mod:`shufflesgd.shuffling.grab`, and the registry by
name in :mod:`shufflesgd.shuffling.registry`.  All functions are jit-, vmap- and
scan-compatible; ``n`` and the epoch length are static Python ints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_key

PyTree = Any


class ShufflingScheme(NamedTuple):
    """A shuffling scheme: pure ``init`` / ``step`` / ``observe`` functions.

    Attributes:
      init: ``(key, params) -> state``; ``params`` is a pytree shaped like one gradient
        (only GraB reads it, to size its running sums).
      step: ``(key, state) -> (state, order)``, with ``key`` the epoch's key
        ``fold_in(key, epoch)`` and ``order`` the ``int32[epoch_length]`` indices the epoch
        visits.
      observe: ``(state, index, grad) -> state``, called for every visited example in
        visiting order with the gradient used for the update.
      num_examples: ``n``, the number of components.
      epoch_length: how many indices one epoch visits (``n``, or ``ceil(r n)`` for RS2).
      uses_gradients: whether ``observe`` does anything (so drivers can skip per-example
        gradients for the other schemes).
    """

    init: Callable[[jax.Array, PyTree], PyTree]
    step: Callable[[jax.Array, PyTree], tuple[PyTree, jax.Array]]
    observe: Callable[[PyTree, jax.Array, PyTree], PyTree]
    num_examples: int
    epoch_length: int
    uses_gradients: bool


def checked_scheme(
    init: Callable[[jax.Array, PyTree], PyTree],
    step: Callable[[jax.Array, PyTree], tuple[PyTree, jax.Array]],
    observe: Callable[[PyTree, jax.Array, PyTree], PyTree],
    num_examples: int,
    epoch_length: int,
    uses_gradients: bool,
) -> ShufflingScheme:
    """A :class:`ShufflingScheme` whose ``init`` and ``step`` check in Python, before
    tracing, that their ``key`` is a PRNG key (``TypeError`` naming ``key``; a traced key of
    the right kind passes)."""

    def checked_init(key: jax.Array, params: PyTree = None) -> PyTree:
        check_key("key", key)
        return init(key, params)

    def checked_step(key: jax.Array, state: PyTree) -> tuple[PyTree, jax.Array]:
        check_key("key", key)
        return step(key, state)

    return ShufflingScheme(
        checked_init, checked_step, observe, num_examples, epoch_length, uses_gradients
    )


class EpochState(NamedTuple):
    """State of with replacement, random reshuffling and incremental: the epochs drawn."""

    epoch: jax.Array


class FixedOrderState(NamedTuple):
    """State of single shuffle: the epochs drawn and the one order every epoch visits."""

    epoch: jax.Array
    order: jax.Array


class KeyedEpochState(NamedTuple):
    """State of FlipFlop and RS2, whose epochs share draws: the scheme's key and the epochs drawn.

    Epoch ``k`` draws from ``fold_in(key, j)`` with ``j`` its pair (FlipFlop) or pass (RS2), so
    these schemes keep the key ``init`` was given rather than use the epoch key.
    """

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


def _zero_epoch() -> jax.Array:
    return jnp.zeros((), jnp.int32)


def _epoch_key_scheme(n: int, order_fn: Callable[[jax.Array], jax.Array]) -> ShufflingScheme:
    """A scheme whose epoch order is ``order_fn(epoch key)``."""

    def init(key: jax.Array, params: PyTree = None) -> EpochState:
        del key, params
        return EpochState(epoch=_zero_epoch())

    def step(key: jax.Array, state: EpochState) -> tuple[EpochState, jax.Array]:
        return EpochState(epoch=state.epoch + 1), order_fn(key).astype(jnp.int32)

    return checked_scheme(init, step, _ignore_gradient, n, n, False)


def _keyed_epoch_scheme(
    n: int, order_fn: Callable[[jax.Array, jax.Array], jax.Array], epoch_length: int
) -> ShufflingScheme:
    """A scheme whose epoch-``k`` order is ``order_fn(key, k)`` for the key given to ``init``."""

    def init(key: jax.Array, params: PyTree = None) -> KeyedEpochState:
        del params
        return KeyedEpochState(key=key, epoch=_zero_epoch())

    def step(key: jax.Array, state: KeyedEpochState) -> tuple[KeyedEpochState, jax.Array]:
        del key
        order = order_fn(state.key, state.epoch).astype(jnp.int32)
        return state._replace(epoch=state.epoch + 1), order

    return checked_scheme(init, step, _ignore_gradient, n, epoch_length, False)


#: Largest ``n`` whose uniform permutations the schemes compute from ranks rather than a sort.
RANKED_PERMUTATION_MAX = 128


def _permutation(key: jax.Array, k: jax.Array, n: int) -> jax.Array:
    """The uniform permutation of ``range(n)`` drawn from ``fold_in(key, k)``."""
    return _random_permutation(jax.random.fold_in(key, k), n)


def _random_permutation(key: jax.Array, n: int) -> jax.Array:
    r"""The uniform permutation of ``range(n)`` drawn from ``key``: bit for bit
    ``jax.random.permutation(key, n)``.

    JAX draws one 32-bit word :math:`b_i` per element from the second key of a split and
    sorts ``range(n)`` stably by them, repeating with fresh words while
    :math:`3 \log n / \log(2^{32} - 1)` rounds are due (one for :math:`n \le 1625`): the
    repeated random-key sort of XLA's random ops, whose ties vanish with each round.  For
    :math:`n \le` :data:`RANKED_PERMUTATION_MAX` the one round's stable sort is computed as
    ranks instead, element :math:`i` going to position :math:`r_i = \#\{j : b_j < b_i\} +
    \#\{j < i : b_j = b_i\}`: the :math:`n^2` comparisons vectorise across a vmapped batch
    of seeds, where XLA:CPU sorts the rows of a batch one after another.  Longer permutations
    are JAX's own.
    """
    if n > RANKED_PERMUTATION_MAX:
        return jax.random.permutation(key, n)
    return _stable_argsort_by_ranks(jax.random.bits(jax.random.split(key)[1], (n,), jnp.uint32))


def _stable_argsort_by_ranks(words: jax.Array) -> jax.Array:
    r"""``argsort(words, stable=True)`` of a 1-D array by ranking: position
    :math:`r_i = \#\{j : w_j < w_i\} + \#\{j < i : w_j = w_i\}` holds :math:`i`."""
    index = jnp.arange(words.shape[0])
    before = (words[None, :] < words[:, None]) | (
        (words[None, :] == words[:, None]) & (index[None, :] < index[:, None])
    )
    rank = before.sum(axis=1)
    return jnp.zeros_like(index).at[rank].set(index, unique_indices=True)


def with_replacement(n: int) -> ShufflingScheme:
    """SGD with replacement: ``n`` i.i.d. uniform indices per epoch (Robbins & Monro 1951).

    Each epoch is ``n`` draws :math:`i_t \\sim \\mathrm{Unif}\\{0,\\dots,n-1\\}` from the
    epoch key; the suboptimality with step :math:`\\eta \\propto \\log(nK)/(\\mu n K)` decays
    as :math:`\\tilde O(1/(nK))` (e.g. Mishchenko, Khaled, Richtárik 2020, Sec. 3).
    """
    _check_num_examples(n)
    return _epoch_key_scheme(n, lambda key: jax.random.randint(key, (n,), 0, n))


def random_reshuffle(n: int) -> ShufflingScheme:
    """Random reshuffling (RR): a fresh uniform permutation every epoch, from the epoch key.

    Mishchenko, Khaled, Richtárik (NeurIPS 2020), "Random Reshuffling: Simple Analysis
    with Vast Improvements", Thm. 1: with :math:`\\eta \\lesssim 1/L`,
    :math:`E\\|x_K - x_*\\|^2 \\le (1-\\eta\\mu)^{nK}\\|x_0-x_*\\|^2
    + 2\\eta^2 n \\sigma_*^2/\\mu`, i.e. :math:`\\tilde O(1/(nK^2))` for
    :math:`\\eta = \\Theta(\\log(nK)/(\\mu n K))`.
    """
    _check_num_examples(n)
    return _epoch_key_scheme(n, lambda key: _random_permutation(key, n))


def single_shuffle(n: int) -> ShufflingScheme:
    """Single shuffle / shuffle once (SS): one uniform permutation, reused every epoch.

    The permutation is drawn at ``init`` from ``fold_in(key, 0)`` (epoch 0's key, so SS's
    first epoch is RR's).  Same :math:`\\tilde O(1/(nK^2))` upper bound as RR for strongly
    convex sums (Mishchenko, Khaled, Richtárik 2020, Thm. 3; Safran & Shamir 2020).
    """
    _check_num_examples(n)

    def init(key: jax.Array, params: PyTree = None) -> FixedOrderState:
        del params
        return FixedOrderState(epoch=_zero_epoch(), order=_permutation(key, 0, n).astype(jnp.int32))

    def step(key: jax.Array, state: FixedOrderState) -> tuple[FixedOrderState, jax.Array]:
        del key
        return state._replace(epoch=state.epoch + 1), state.order

    return checked_scheme(init, step, _ignore_gradient, n, n, False)


def incremental(n: int) -> ShufflingScheme:
    """Incremental gradient (IG): the fixed order ``0, 1, ..., n-1`` every epoch.

    Deterministic (the epoch key is unused); its error is :math:`\\tilde O(1/K^2)` with no
    :math:`1/n` gain (Gürbüzbalaban, Ozdaglar, Parrilo 2019; Mishchenko et al. 2020, Thm. 3).
    """
    _check_num_examples(n)
    return _epoch_key_scheme(n, lambda key: jnp.arange(n))
