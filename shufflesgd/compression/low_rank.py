r"""Low-rank compressors: truncated SVD and PowerSGD.

An array is viewed as a matrix :math:`M \in \mathbb R^{m\times n}` (:func:`matrix_shape`)
and sent as two rank-``r`` factors, :math:`32\,r\,(m+n)` bits.  :func:`low_rank` is the best
rank-``r`` approximation (Eckart–Young), contractive with :math:`\alpha = r/\min(m, n)`;
:func:`power_sgd` (Vogels, Karimireddy, Jaggi 2019, Alg. 1) replaces the SVD by one
warm-started power step, its right factor being the compressor's state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int
from shufflesgd.compression.base import (
    FLOAT_BITS,
    Compressor,
    Shape,
    _no_state,
    _size,
    _stateless,
    checked_compressor,
)

PyTree = Any


def matrix_shape(shape: Shape) -> tuple[int, int]:
    """The matrix a low-rank compressor sees: ``(shape[0], rest)`` for ``ndim >= 2``; a
    vector of length ``d`` becomes ``(r, d // r)`` with ``r`` the largest divisor ``<= sqrt(d)``."""
    if len(shape) >= 2:
        return shape[0], _size(shape[1:])
    d = _size(shape)
    rows = max(r for r in range(1, math.isqrt(d) + 1) if d % r == 0)
    return rows, d // rows


def _check_rank(rank: int) -> Callable[[Shape], None]:
    def check(shape: Shape) -> None:
        if rank > min(matrix_shape(shape)):
            raise ValueError(
                f"rank={rank} exceeds the smaller side of the {matrix_shape(shape)} matrix view"
            )

    return check


def _low_rank_bits(rank: int) -> Callable[[Shape], int]:
    return lambda shape: FLOAT_BITS * rank * sum(matrix_shape(shape))


def low_rank(rank: int) -> Compressor:
    r"""Best rank-r approximation by truncated SVD (Eckart–Young).

    Contractive with :math:`\alpha = r/\min(m, n)`, since the kept r singular values are
    the largest (Vogels, Karimireddy, Jaggi 2019, Sec. 3; Safaryan et al. 2021, Ex. 5).
    Bits: :math:`32\,r\,(m + n)` for the two factors.
    """
    r = check_int("rank", rank)

    def fn(key: jax.Array, x: jax.Array) -> jax.Array:
        u, sv, vt = jnp.linalg.svd(x.reshape(matrix_shape(x.shape)), full_matrices=False)
        return ((u[:, :r] * sv[:r]) @ vt[:r]).reshape(x.shape)

    return checked_compressor(
        f"low_rank_{r}",
        _no_state,
        _stateless(fn),
        contraction=lambda shape: r / min(matrix_shape(shape)),
        variance=None,
        bits=_low_rank_bits(r),
        check=_check_rank(r),
    )


def power_sgd(rank: int) -> Compressor:
    r"""PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019, Alg. 1), one power step, warm start.

    For the matrix view :math:`M` and the previous right factor :math:`Q`:
    :math:`P = \mathrm{orth}(MQ)`, :math:`Q \leftarrow M^\top P`, :math:`\hat M = PQ^\top`;
    :math:`Q` is the state carried to the next call.  Repeated on a fixed :math:`M` it is
    subspace iteration and converges to :func:`low_rank`; a single step has no worst-case
    :math:`\alpha`, so ``contraction`` is ``None``.  Bits: :math:`32\,r\,(m + n)`.
    """
    r = check_int("rank", rank)

    def init(key: jax.Array, shape: Shape) -> jax.Array:
        return jax.random.normal(key, (matrix_shape(shape)[1], r))

    def step(key: jax.Array, q: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        m = x.reshape(matrix_shape(x.shape))
        p, _ = jnp.linalg.qr(m @ q.astype(m.dtype))
        q = m.T @ p
        return q, (p @ q.T).reshape(x.shape)

    return checked_compressor(
        f"power_sgd_{r}",
        init,
        step,
        contraction=None,
        variance=None,
        bits=_low_rank_bits(r),
        check=_check_rank(r),
    )
