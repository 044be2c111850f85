r"""The compressor protocol, and compressing a whole pytree.

A :class:`Compressor` is an ``(init, step)`` pair over one array, with its guarantees as
functions of the array's shape:

* ``init(key, shape) -> state`` (``None`` except for PowerSGD's warm-started factor);
* ``step(key, state, x) -> (state, message)``, where ``message`` is the receiver's
  reconstruction :math:`C(x)`, an array shaped like ``x``;
* contractive (biased) compressors: :math:`E\|C(x) - x\|^2 \le (1 - \alpha)\|x\|^2`,
  ``contraction(shape) = alpha``;
* unbiased compressors: :math:`E[C(x)] = x`, :math:`E\|C(x) - x\|^2 \le \omega\|x\|^2`,
  ``variance(shape) = omega``;
* ``bits(shape)``: the number of bits one message of that shape costs, with 32-bit floats
  and :math:`\lceil\log_2 d\rceil`-bit indices (:data:`FLOAT_BITS`).

The two classes are those of Beznosikov, Horváth, Richtárik, Safaryan (2020), "On Biased
Compression for Distributed Learning", Defs. 1-2.  :func:`compress_tree` applies a
compressor to a whole pytree, either to the flattened vector (``leafwise=False``, the
analyses' setting) or to each leaf separately.  Shapes and the static choices (``k``,
``s``, ``rank``) are Python values, checked before tracing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from shufflesgd._checks import check_float_array, check_key

PyTree = Any


Shape = tuple[int, ...]


#: Bits per float in a message (compressors count 32-bit floats).
FLOAT_BITS = 32


class Compressor(NamedTuple):
    """A compression operator and its guarantees.

    Attributes:
      name: what it is, for tables.
      init: ``(key, shape) -> state`` (``None`` for stateless compressors).
      step: ``(key, state, x) -> (state, message)``, the message being :math:`C(x)`.
      contraction: ``shape -> alpha`` for contractive compressors, else ``None``.
      variance: ``shape -> omega`` for unbiased compressors, else ``None``.
      bits: ``shape -> bits`` of one compressed message.
      check: ``shape -> None``, raising ``ValueError`` when the compressor cannot take it.
    """

    name: str
    init: Callable[[jax.Array, Shape], PyTree]
    step: Callable[[jax.Array, PyTree, jax.Array], tuple[PyTree, jax.Array]]
    contraction: Callable[[Shape], float] | None
    variance: Callable[[Shape], float] | None
    bits: Callable[[Shape], int]
    check: Callable[[Shape], None]

    @property
    def unbiased(self) -> bool:
        return self.variance is not None


def checked_compressor(
    name: str,
    init: Callable[[jax.Array, Shape], PyTree],
    step: Callable[[jax.Array, PyTree, jax.Array], tuple[PyTree, jax.Array]],
    *,
    contraction: Callable[[Shape], float] | None,
    variance: Callable[[Shape], float] | None,
    bits: Callable[[Shape], int],
    check: Callable[[Shape], None],
) -> Compressor:
    """A :class:`Compressor` whose ``init`` and ``step`` check their arguments in Python
    before anything is traced: ``key`` must be a PRNG key (``TypeError``), ``x`` a float array
    (``TypeError``; an integer ``x`` would truncate a rescaled message such as Rand-k's
    :math:`d/k`) that ``check`` accepts (``ValueError``, e.g. Top-k's ``k > d``)."""

    def checked_init(key: jax.Array, shape: Shape) -> PyTree:
        check_key("key", key)
        return init(key, shape)

    def checked_step(key: jax.Array, state: PyTree, x: jax.Array) -> tuple[PyTree, jax.Array]:
        check_key("key", key)
        check_float_array("x", x)
        check(tuple(np.shape(x)))
        return step(key, state, x)

    return Compressor(
        name,
        checked_init,
        checked_step,
        contraction=contraction,
        variance=variance,
        bits=bits,
        check=check,
    )


def _size(shape: Shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _index_bits(d: int) -> int:
    return max(1, math.ceil(math.log2(d))) if d > 1 else 0


def _no_state(key: jax.Array, shape: Shape) -> None:
    del key, shape
    return None


def _accept_any(shape: Shape) -> None:
    del shape


def _stateless(
    fn: Callable[[jax.Array, jax.Array], jax.Array],
) -> Callable[[jax.Array, None, jax.Array], tuple[None, jax.Array]]:
    """The ``step`` of a compressor without state: ``fn(key, x)`` is its message."""

    def step(key: jax.Array, state: None, x: jax.Array) -> tuple[None, jax.Array]:
        return state, fn(key, x)

    return step


def identity() -> Compressor:
    """No compression: :math:`\\alpha = 1`, :math:`\\omega = 0`, :math:`32d` bits."""
    return checked_compressor(
        "identity",
        _no_state,
        _stateless(lambda key, x: x),
        contraction=lambda shape: 1.0,
        variance=lambda shape: 0.0,
        bits=lambda shape: FLOAT_BITS * _size(shape),
        check=_accept_any,
    )


def _shapes(tree: PyTree, leafwise: bool) -> list[Shape]:
    leaves = jax.tree.leaves(tree)
    if leafwise:
        return [tuple(np.shape(leaf)) for leaf in leaves]
    return [(sum(_size(np.shape(leaf)) for leaf in leaves),)]


def check_tree(compressor: Compressor, tree: PyTree, leafwise: bool = False) -> None:
    """Raise ``ValueError`` (before tracing) when ``compressor`` cannot take ``tree``."""
    for shape in _shapes(tree, leafwise):
        compressor.check(shape)


def tree_bits(compressor: Compressor, tree: PyTree, leafwise: bool = False) -> int:
    """Bits of one compressed message of ``tree``."""
    return sum(compressor.bits(shape) for shape in _shapes(tree, leafwise))


def tree_contraction(compressor: Compressor, tree: PyTree, leafwise: bool = False) -> float | None:
    """:math:`\\alpha` for the whole tree (the smallest over leaves when leaf-wise)."""
    if compressor.contraction is None:
        return None
    return min(compressor.contraction(shape) for shape in _shapes(tree, leafwise))


def tree_variance(compressor: Compressor, tree: PyTree, leafwise: bool = False) -> float | None:
    """:math:`\\omega` for the whole tree (the largest over leaves when leaf-wise)."""
    if compressor.variance is None:
        return None
    return max(compressor.variance(shape) for shape in _shapes(tree, leafwise))


def init_tree(
    compressor: Compressor, key: jax.Array, tree: PyTree, leafwise: bool = False
) -> PyTree:
    """The compressor state for messages shaped like ``tree`` (one per leaf when leaf-wise)."""
    shapes = _shapes(tree, leafwise)
    keys = jax.random.split(key, len(shapes))
    return tuple(compressor.init(k, shape) for k, shape in zip(keys, shapes))


def compress_tree(
    compressor: Compressor, key: jax.Array, state: PyTree, tree: PyTree, leafwise: bool = False
) -> tuple[PyTree, PyTree]:
    """One compressor step on a pytree, as one flattened vector or leaf by leaf (leaf ``j``
    with the ``j``-th of ``split(key, leaves)``); ``state`` comes from :func:`init_tree`.
    Returns ``(state, message)``, the message shaped like ``tree``."""
    if not leafwise:
        flat, unravel = ravel_pytree(tree)
        leaf_state, flat_hat = compressor.step(key, state[0], flat)
        return (leaf_state,), unravel(flat_hat)
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    results = [compressor.step(k, s, leaf) for k, leaf, s in zip(keys, leaves, state)]
    return tuple(r[0] for r in results), treedef.unflatten([r[1] for r in results])
