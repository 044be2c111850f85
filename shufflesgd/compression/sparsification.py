r"""Sparsifiers: Top-k, its approximate TPU selection, and Rand-k.

A sparsifier keeps ``k`` of the ``d`` coordinates of :math:`x` (``k`` given directly or as
``fraction`` of ``d``) and sends them with their indices:

* Top-k keeps the ``k`` largest magnitudes, contractive with :math:`\alpha = k/d`
  (Stich, Cordonnier, Jaggi 2018, Lemma A.1);
* approximate Top-k selects through ``lax.approx_max_k`` (Chern et al. 2022, "TPU-KNN");
* Rand-k keeps a uniform k-subset, unbiased with :math:`\omega = d/k - 1` when scaled by
  :math:`d/k` and contractive with :math:`\alpha = k/d` when not (Beznosikov, Horváth,
  Richtárik, Safaryan 2020, Sec. 2).

:func:`top_k_indices` is the selection they share: ``lax.top_k`` whose batched form stays
on each device when the workers are sharded over a mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from shufflesgd._checks import check_int
from shufflesgd.compression.base import (
    FLOAT_BITS,
    Compressor,
    Shape,
    _index_bits,
    _no_state,
    _size,
    _stateless,
    checked_compressor,
)

PyTree = Any


def _rows_sharding(mesh: Any, operand: Any) -> NamedSharding:
    """The operand's sharding with its last (selection) axis replicated."""
    spec = tuple(operand.sharding.spec)
    spec += (None,) * (len(operand.shape) - len(spec))
    return NamedSharding(mesh, PartitionSpec(*spec[:-1], None))


@functools.partial(custom_partitioning, static_argnums=(1,))
def _rows_top_k(values: jax.Array, k: int) -> jax.Array:
    return jax.lax.top_k(values, k)[1]


def _infer_rows_top_k(k: int, mesh: Any, operands: Any, result: Any) -> NamedSharding:
    del k, result
    return _rows_sharding(mesh, operands[0])


def _partition_rows_top_k(k: int, mesh: Any, operands: Any, result: Any):
    del result
    sharding = _rows_sharding(mesh, operands[0])
    return mesh, lambda values: jax.lax.top_k(values, k)[1], sharding, (sharding,)


_rows_top_k.def_partition(
    infer_sharding_from_operands=_infer_rows_top_k,
    partition=_partition_rows_top_k,
    sharding_rule="... d -> ... k",
)


def top_k_indices(values: jax.Array, k: int) -> jax.Array:
    """Indices of the ``k`` largest entries of a vector (``lax.top_k``'s), which stay local
    to each device when the vector is one of many stacked along a sharded axis.

    Under ``vmap`` over workers, ``lax.top_k`` becomes one TopK over ``[n, d]``, which XLA's
    partitioner (jax 0.10) does not split along ``n``: with the workers sharded over a mesh
    it all-gathers every worker's ``d`` values to every device first.  Here the batched call
    is a ``custom_partitioning`` op whose rule says that every leading axis partitions
    freely and only the selected axis must be whole, so each device selects for its own
    workers; ``custom_vmap`` turns each ``vmap`` level (workers, seeds...) into leading axes
    of that op.  Without a mesh it is ``lax.top_k``, at the same speed.
    """

    @jax.custom_batching.custom_vmap
    def select(values: jax.Array) -> jax.Array:
        return _rows_top_k(values, k)

    @select.def_vmap
    def select_rows(
        axis_size: int, in_batched: list[bool], rows: jax.Array
    ) -> tuple[jax.Array, bool]:
        del axis_size, in_batched
        return top_k_indices(rows, k), True

    return select(values)


def _count(k: int | None, fraction: float | None) -> Callable[[Shape], int]:
    """``k`` or ``ceil(fraction * d)``: how many coordinates a sparsifier keeps."""
    if (k is None) == (fraction is None):
        raise ValueError("give exactly one of k and fraction")
    if k is not None:
        k = check_int("k", k)
        return lambda shape: k
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got fraction={fraction!r}")
    return lambda shape: max(1, math.ceil(round(fraction * _size(shape), 9)))


def _check_count(count: Callable[[Shape], int]) -> Callable[[Shape], None]:
    def check(shape: Shape) -> None:
        if count(shape) > _size(shape):
            raise ValueError(f"k={count(shape)} exceeds the dimension d={_size(shape)}")

    return check


def _keep(x: jax.Array, indices: jax.Array, scale: float | jax.Array = 1.0) -> jax.Array:
    flat = x.reshape(-1)
    return jnp.zeros_like(flat).at[indices].set(scale * flat[indices]).reshape(x.shape)


def top_k(k: int | None = None, *, fraction: float | None = None) -> Compressor:
    r"""Top-k sparsification: keep the k entries of largest magnitude.

    Contractive with :math:`\alpha = k/d` (Stich, Cordonnier, Jaggi 2018, Lemma A.1;
    Beznosikov et al. 2020, Def. 2).  Exact selection by :func:`top_k_indices` (``lax.top_k``).
    Bits: :math:`k\,(32 + \lceil\log_2 d\rceil)` (value and index per entry).
    """
    count = _count(k, fraction)

    def fn(key: jax.Array, x: jax.Array) -> jax.Array:
        indices = top_k_indices(jnp.abs(x.reshape(-1)), count(x.shape))
        return _keep(x, indices)

    return checked_compressor(
        "top_k",
        _no_state,
        _stateless(fn),
        contraction=lambda shape: count(shape) / _size(shape),
        variance=None,
        bits=lambda shape: count(shape) * (FLOAT_BITS + _index_bits(_size(shape))),
        check=_check_count(count),
    )


def approx_top_k(
    k: int | None = None, *, fraction: float | None = None, recall_target: float = 0.95
) -> Compressor:
    r"""Top-k through ``lax.approx_max_k``, the accelerator-friendly approximate selection.

    Chern et al. (2022), "TPU-KNN": on TPU the selection has expected recall at least
    ``recall_target``; elsewhere XLA falls back to exact top-k (:math:`\alpha = k/d`).
    A selection that recalls :math:`rk` of the true top-k keeps entries whose squares sum
    to at least :math:`(rk/d)\|x\|^2`, so we report :math:`\alpha = r\,k/d`; XLA's
    recall is an expected value, so on TPU this holds on average.  Bits as :func:`top_k`.
    """
    if not 0.0 < recall_target <= 1.0:
        raise ValueError(f"recall_target must lie in (0, 1], got {recall_target!r}")
    count = _count(k, fraction)

    def fn(key: jax.Array, x: jax.Array) -> jax.Array:
        _, indices = jax.lax.approx_max_k(
            jnp.abs(x.reshape(-1)), count(x.shape), recall_target=recall_target
        )
        return _keep(x, indices)

    return checked_compressor(
        "approx_top_k",
        _no_state,
        _stateless(fn),
        contraction=lambda shape: recall_target * count(shape) / _size(shape),
        variance=None,
        bits=lambda shape: count(shape) * (FLOAT_BITS + _index_bits(_size(shape))),
        check=_check_count(count),
    )


def rand_k(
    k: int | None = None, *, fraction: float | None = None, scaled: bool = True
) -> Compressor:
    r"""Rand-k: keep k coordinates chosen uniformly without replacement.

    Scaled by :math:`d/k` it is unbiased with :math:`\omega = d/k - 1`; unscaled it is
    contractive with :math:`\alpha = k/d` (Beznosikov et al. 2020, Sec. 2; Stich et al.
    2018).  The indices come from a key shared with the receiver, so only the values are
    sent: :math:`32k` bits.  They are the ``k`` largest of ``d`` random 30-bit keys (a
    uniform k-subset, up to ties at the k-th key, which have probability about
    :math:`d/2^{30}` and go to the lower index); ``lax.top_k`` on the keys is much faster
    on CPU than a full ``jax.random.permutation`` (see the benchmarks' README).
    """
    count = _count(k, fraction)

    def fn(key: jax.Array, x: jax.Array) -> jax.Array:
        d, kept = _size(x.shape), count(x.shape)
        # 30-bit integers read as float32 bit patterns: finite, non-negative and ordered
        bits = jax.random.bits(key, (d,), jnp.uint32) >> 2
        indices = top_k_indices(jax.lax.bitcast_convert_type(bits, jnp.float32), kept)
        return _keep(x, indices, d / kept if scaled else 1.0)

    return checked_compressor(
        "rand_k" if scaled else "rand_k_unscaled",
        _no_state,
        _stateless(fn),
        contraction=None if scaled else (lambda shape: count(shape) / _size(shape)),
        variance=(lambda shape: _size(shape) / count(shape) - 1.0) if scaled else None,
        bits=lambda shape: FLOAT_BITS * count(shape),
        check=_check_count(count),
    )
