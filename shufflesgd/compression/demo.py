r"""DeMo, decoupled momentum optimisation, as an optax ``GradientTransformation``.

Peng, Quesnelle, Kingma (2024), "DeMo: Decoupled Momentum Optimization" (arXiv 2411.19870),
Algorithm 1.  Each of ``n`` workers keeps its own momentum and sends only its "fast"
components, the largest DCT coefficients of each chunk; what it sends is taken out of its
momentum and what it keeps keeps accumulating.  Per step and per worker :math:`i`:

.. math::

    m_i &\leftarrow \beta\, m_i + g_i, \\
    q_i &= \mathrm{ExtractFastComponents}(m_i; s, k), \\
    m_i &\leftarrow m_i - q_i, \\
    Q   &= \mathrm{Synchronize}(q_1, \dots, q_n) = \tfrac1n \textstyle\sum_i q_i
          \quad(\text{or } \operatorname{sign}(\tfrac1n\sum_i q_i)),

and the parameters move by :math:`-\eta\,Q`, which here is the rest of an optax
chain: ``optax.chain(demo(...), optax.add_decayed_weights(wd), optax.scale(-lr))``.

``ExtractFastComponents``, as in the paper: the leaf is flattened and cut into chunks
of ``chunk`` :math:`= s` entries; each chunk goes through the orthonormal DCT-II
:math:`C` (:func:`dct_matrix`, ``scipy.fft.dct(..., norm="ortho")`` as a matrix), the
``topk`` :math:`= k` coefficients of largest magnitude are kept (the rest set to zero),
and :math:`q` is the inverse DCT of what is kept.  As :math:`C` is orthogonal, :math:`q`
is the orthogonal projection of :math:`m` onto :math:`k` basis vectors per chunk, so
:math:`\|m - q\|^2 = \|m\|^2 - \|q\|^2`, and with ``topk == chunk`` the momentum is emptied
every step and :math:`Q` is the mean gradient (DeMo is then SGD on the averaged gradient).

A leaf of :math:`d \le s` entries is one chunk of its own length :math:`d`, of which
:math:`\min(k, d)` coefficients are kept (a bias, a scalar); a larger leaf must be a
whole number of chunks, :math:`s \mid d`, and any other size raises ``ValueError`` (naming
``chunk``, the leaf and the divisors of :math:`d` nearest to :math:`s`) before anything is
traced, rather than being padded or cut to other lengths behind the caller's back.

One worker sends, per chunk, its kept coefficients as 32-bit floats and their positions as
:math:`\lceil\log_2 s\rceil`-bit indices (:func:`demo_bits`); the sign, when applied, is
applied by the receiver to the average, as in the reference implementation, so it does not
change what is sent.

Differences from the reference implementation (github.com/bloc97/DeMo):

* chunks are 1-D, over the flattened leaf, as in Algorithm 1; the reference cuts a matrix
  into :math:`s_1 \times s_2` tiles and applies the DCT along both axes (a 2-D DCT, top-k
  over the :math:`s_1 s_2` coefficients of each tile), picking per axis the largest divisor
  of the dimension not above ``chunk`` where this raises;
* the momentum accumulates the gradient, :math:`m \leftarrow \beta m + g`, as in
  Algorithm 1; the reference accumulates :math:`\beta m + \eta g` (the step size inside the
  momentum, which matters when :math:`\eta` varies or without the sign);
* :math:`Q` is the mean over all workers of the :math:`q_i`; the reference scatters the
  gathered coefficients with a per-coordinate mean over the workers that sent that
  coordinate (a coefficient sent by one worker enters at full size);
* the sign is optional (``sign=True``); the reference always takes it, and applies the
  decoupled weight decay before the step, which ``optax.add_decayed_weights`` does here.

:math:`\beta` may be a traced value (a ``vmap`` over it shares one compiled program; with
``optax.inject_hyperparams(demo, static_args=("num_workers", "chunk", "topk", "sign"))``
it lives in the optimiser state); ``num_workers``, ``chunk``, ``topk`` and ``sign`` are
static and checked in Python before anything is traced.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shufflesgd._checks import check_float_array, check_int, check_like, is_concrete
from shufflesgd.compression.base import FLOAT_BITS, _index_bits, _size
from shufflesgd.compression.error_feedback import mean_over_workers
from shufflesgd.compression.threshold_top_k import magnitude_bits

PyTree = Any


class DeMoState(NamedTuple):
    """State of :func:`demo`.

    Attributes:
      momentum: per-worker momenta :math:`m_i`, each leaf ``[num_workers, *param.shape]``.
      count: number of steps taken.
    """

    momentum: PyTree
    count: jax.Array


def check_chunking(chunk: Any, topk: Any) -> tuple[int, int]:
    """``(chunk, topk)`` as Python ints; ``ValueError`` unless ``chunk >= 1`` and
    ``1 <= topk <= chunk``."""
    chunk = check_int("chunk", chunk)
    topk = check_int("topk", topk)
    if topk > chunk:
        raise ValueError(f"topk must be at most chunk={chunk}, got topk={topk}")
    return chunk, topk


def _nearest_divisors(d: int, chunk: int) -> list[int]:
    """The divisors of ``d`` just below and just above ``chunk`` (those that exist)."""
    divisors = [q for q in range(1, d + 1) if d % q == 0]
    below = [q for q in divisors if q < chunk][-1:]
    above = [q for q in divisors if q > chunk][:1]
    return below + above


def check_leaf_size(d: int, chunk: int, where: str = "a leaf") -> None:
    """``ValueError`` naming ``chunk`` when a leaf of ``d > chunk`` entries is not a whole
    number of chunks."""
    if d > chunk and d % chunk:
        raise ValueError(
            f"chunk={chunk} does not divide the {d} entries of {where}: a leaf larger than "
            f"chunk must be a whole number of chunks (divisors of {d} near {chunk}: "
            f"{_nearest_divisors(d, chunk)})"
        )


def check_beta(beta: Any) -> None:
    """``ValueError`` unless ``beta`` is a scalar and, when concrete, lies in :math:`[0, 1)`
    (a traced value is the caller's to check)."""
    if np.shape(beta) != ():
        raise ValueError(f"beta must be a scalar, got shape {np.shape(beta)}")
    if is_concrete(beta) and not 0.0 <= float(beta) < 1.0:
        raise ValueError(f"beta must lie in [0, 1), got beta={beta!r}")


def dct_matrix(length: int) -> np.ndarray:
    r"""The orthonormal DCT-II matrix :math:`C_{ij} = c_i\cos(\pi(2j+1)i/(2s))`,
    :math:`c_0 = \sqrt{1/s}`, :math:`c_{i>0} = \sqrt{2/s}` (float64; :math:`C^{-1} = C^T`),
    which is ``scipy.fft.dct(..., norm="ortho")`` as a matrix."""
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    matrix = np.sqrt(2.0 / length) * np.cos(np.pi * (2 * j + 1) * i / (2 * length))
    matrix[0] /= np.sqrt(2.0)
    return matrix


def _project(blocks: jax.Array, topk: int) -> jax.Array:
    """Each row's projection onto its ``topk`` largest orthonormal DCT-II coefficients.  The
    short transforms are products with the DCT matrix (on XLA:CPU several times faster than
    ``jax.scipy.fft.dct``, which goes through an FFT)."""
    matrix = jnp.asarray(dct_matrix(blocks.shape[-1]), blocks.dtype)
    highest = jax.lax.Precision.HIGHEST
    coefficients = jnp.matmul(blocks, matrix.T, precision=highest)
    kept = _top_k_mask(coefficients, topk)
    return jnp.matmul(jnp.where(kept, coefficients, 0), matrix, precision=highest)


def _top_k_mask(rows: jax.Array, k: int) -> jax.Array:
    """The ``k`` largest magnitudes of each short row as a mask, ties going to the lower
    index (``lax.top_k``'s set).  Bisection on the magnitudes' bit patterns, which order as
    unsigned integers: after one halving per bit the largest pattern ``t`` with at least
    ``k`` entries at or above it is the ``k``-th largest; every entry above ``t`` is kept,
    and the first ``k - #{> t}`` entries equal to ``t``.  On XLA:CPU this is several times
    faster than a batched ``lax.top_k`` over many short rows."""
    bits = magnitude_bits(rows)
    width = 8 * bits.dtype.itemsize
    top = jnp.asarray(np.iinfo(bits.dtype).max >> 1, bits.dtype)  # above +inf's pattern

    def halve(_, bounds):  # count(bits >= low) >= k > count(bits >= high)
        low, high = bounds
        middle = low + (high - low) // 2
        enough = jnp.sum(bits >= middle[..., None], axis=-1, dtype=jnp.int32) >= k
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

    start = (jnp.zeros(bits.shape[:-1], bits.dtype), jnp.full(bits.shape[:-1], top))
    threshold = jax.lax.fori_loop(0, width - 1, halve, start)[0][..., None]
    above = bits > threshold
    need = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
    tied = bits == threshold
    return above | (tied & (jnp.cumsum(tied, axis=-1, dtype=jnp.int32) <= need))


def extract_fast_components(x: jax.Array, chunk: int, topk: int) -> jax.Array:
    r"""``ExtractFastComponents`` of Peng, Quesnelle, Kingma (2024), Alg. 1, on one
    array: ``x`` flattened, cut into chunks of ``chunk`` entries (one chunk of ``x.size``
    entries when that is smaller), each projected onto its ``topk`` (at most the chunk's
    length) largest orthonormal DCT-II coefficients.  Returns :math:`q`, shaped like ``x``.
    ``ValueError`` naming ``chunk`` when ``x.size > chunk`` is not a multiple of it."""
    check_float_array("x", x)
    chunk, topk = check_chunking(chunk, topk)
    d = int(np.size(x))
    check_leaf_size(d, chunk, f"x, shaped {tuple(np.shape(x))}")
    if d == 0:
        return x
    length = min(chunk, d)
    blocks = jnp.reshape(x, (-1, length))
    return _project(blocks, min(topk, length)).reshape(jnp.shape(x))


def demo_bits(params: PyTree, chunk: int, topk: int) -> int:
    r"""Bits one worker sends per step for parameters shaped like ``params``: per chunk,
    :math:`\min(k, \ell)` 32-bit values and as many indices of :math:`\lceil\log_2
    \ell\rceil` bits, :math:`\ell` the chunk's length (``chunk``, or the leaf's size when
    that is smaller; no index bits when :math:`\ell = 1`)."""
    chunk, topk = check_chunking(chunk, topk)
    total = 0
    for path, leaf in jax.tree.leaves_with_path(params):
        d = _size(np.shape(leaf))
        check_leaf_size(d, chunk, f"the leaf {jax.tree_util.keystr(path)}, shaped {np.shape(leaf)}")
        if d:
            length = min(chunk, d)
            total += (d // length) * min(topk, length) * (FLOAT_BITS + _index_bits(length))
    return total


def demo(
    num_workers: int,
    beta: float | jax.Array = 0.999,
    chunk: int = 64,
    topk: int = 32,
    sign: bool = False,
) -> optax.GradientTransformation:
    r"""DeMo (Peng, Quesnelle, Kingma 2024, Alg. 1) over a leading worker axis.

    Args:
      num_workers: :math:`n`, the length of the leading axis of the incoming updates.
      beta: the momentum decay :math:`\beta \in [0, 1)`, possibly traced.
      chunk: the chunk length :math:`s` of the DCT; every leaf larger than ``chunk`` must
        be a multiple of it (checked by ``init``).
      topk: :math:`k`, the DCT coefficients each worker sends per chunk (``<= chunk``).
      sign: output :math:`\operatorname{sign}(Q)` instead of :math:`Q` (the paper's
        signum variant).

    Returns:
      An optax ``GradientTransformation``: ``init(params) -> DeMoState`` with zero momenta
      ``[n, *param.shape]``; ``update(updates, state, params=None)`` takes the per-worker
      gradients (each leaf ``[n, *param.shape]``) and returns :math:`Q`, shaped like the
      params (no worker axis), and the new state.
    """
    num_workers = check_int("num_workers", num_workers)
    chunk, topk = check_chunking(chunk, topk)
    check_beta(beta)
    if not isinstance(sign, bool):
        raise TypeError(f"sign must be a bool, got sign={sign!r}")

    def init(params: PyTree) -> DeMoState:
        check_float_array("params", params)
        for path, leaf in jax.tree.leaves_with_path(params):
            where = f"the leaf {jax.tree_util.keystr(path)}, shaped {tuple(jnp.shape(leaf))}"
            check_leaf_size(int(np.size(leaf)), chunk, where)
        momentum = jax.tree.map(
            lambda p: jnp.zeros((num_workers, *jnp.shape(p)), jnp.result_type(p)), params
        )
        return DeMoState(momentum=momentum, count=jnp.zeros([], jnp.int32))

    def leaf_update(g: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
        m = jnp.asarray(beta, m.dtype) * m + g
        q = jax.vmap(lambda x: extract_fast_components(x, chunk, topk))(m)
        sent = mean_over_workers(q)
        return (jnp.sign(sent) if sign else sent), m - q

    def update(
        updates: PyTree, state: DeMoState, params: PyTree | None = None
    ) -> tuple[PyTree, DeMoState]:
        del params
        check_like("updates", updates, state.momentum, "the momenta [num_workers, *param.shape]")
        pairs = jax.tree.map(leaf_update, updates, state.momentum)
        treedef = jax.tree.structure(updates)
        out, momentum = jax.tree.transpose(treedef, jax.tree.structure((0, 0)), pairs)
        return out, DeMoState(momentum=momentum, count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)
