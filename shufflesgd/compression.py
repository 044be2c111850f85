r"""Compression operators for communication-efficient distributed optimisation.

A :class:`Compressor` maps one array to its compressed reconstruction,
``apply(key, x, state) -> (x_hat, state)`` (``state`` is ``None`` except for PowerSGD's
warm-started factor), and carries its guarantees as functions of the array's shape:

* contractive (biased) compressors: :math:`E\|C(x) - x\|^2 \le (1 - \alpha)\|x\|^2`,
  ``contraction(shape) = alpha``;
* unbiased compressors: :math:`E[C(x)] = x`, :math:`E\|C(x) - x\|^2 \le \omega\|x\|^2`,
  ``variance(shape) = omega``;
* ``bits(shape)``: the number of bits one message of that shape costs, with 32-bit floats
  and :math:`\lceil\log_2 d\rceil`-bit indices (:data:`FLOAT_BITS`).

:func:`compress_tree` applies a compressor to a whole pytree, either to the flattened
vector (``leafwise=False``, the analyses' setting) or to each leaf separately.  Shapes and
the static choices (``k``, ``s``, ``rank``) are Python values, checked before tracing.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec

from shufflesgd._checks import check_int

PyTree = Any
Shape = tuple[int, ...]
FLOAT_BITS = 32


class Compressor(NamedTuple):
    """A compression operator and its guarantees.

    Attributes:
      name: what it is, for tables.
      init: ``(key, shape) -> state`` (``None`` for stateless compressors).
      apply: ``(key, x, state) -> (x_hat, state)``.
      contraction: ``shape -> alpha`` for contractive compressors, else ``None``.
      variance: ``shape -> omega`` for unbiased compressors, else ``None``.
      bits: ``shape -> bits`` of one compressed message.
      check: ``shape -> None``, raising ``ValueError`` when the compressor cannot take it.
    """

    name: str
    init: Callable[[jax.Array, Shape], PyTree]
    apply: Callable[[jax.Array, jax.Array, PyTree], tuple[jax.Array, PyTree]]
    contraction: Callable[[Shape], float] | None
    variance: Callable[[Shape], float] | None
    bits: Callable[[Shape], int]
    check: Callable[[Shape], None]

    @property
    def unbiased(self) -> bool:
        return self.variance is not None


def _size(shape: Shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _index_bits(d: int) -> int:
    return max(1, math.ceil(math.log2(d))) if d > 1 else 0


# ------------------------------------------------------------------ row-wise top k, partitionable


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
    def select_rows(axis_size: int, in_batched: list[bool], rows: jax.Array) -> tuple[jax.Array, bool]:
        del axis_size, in_batched
        return top_k_indices(rows, k), True

    return select(values)


def _no_state(key: jax.Array, shape: Shape) -> None:
    del key, shape
    return None


def _accept_any(shape: Shape) -> None:
    del shape


def _stateless(fn: Callable[[jax.Array, jax.Array], jax.Array]):
    def apply(key: jax.Array, x: jax.Array, state: None) -> tuple[jax.Array, None]:
        return fn(key, x), state

    return apply


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

    return Compressor(
        "top_k", _no_state, _stateless(fn),
        contraction=lambda shape: count(shape) / _size(shape), variance=None,
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

    return Compressor(
        "approx_top_k", _no_state, _stateless(fn),
        contraction=lambda shape: recall_target * count(shape) / _size(shape), variance=None,
        bits=lambda shape: count(shape) * (FLOAT_BITS + _index_bits(_size(shape))),
        check=_check_count(count),
    )


def rand_k(k: int | None = None, *, fraction: float | None = None, scaled: bool = True) -> Compressor:
    r"""Rand-k: keep k coordinates chosen uniformly without replacement.

    Scaled by :math:`d/k` it is unbiased with :math:`\omega = d/k - 1`; unscaled it is
    contractive with :math:`\alpha = k/d` (Beznosikov et al. 2020, Sec. 2; Stich et al.
    2018).  The indices come from a key shared with the receiver, so only the values are
    sent: :math:`32k` bits.  They are the ``k`` largest of ``d`` random 30-bit keys (a
    uniform k-subset, up to ties at the k-th key, which have probability about
    :math:`d/2^{30}` and go to the lower index); ``lax.top_k`` on the keys is 20x faster
    on CPU than a full ``jax.random.permutation`` (``benchmarks/ef21_step.py``).
    """
    count = _count(k, fraction)

    def fn(key: jax.Array, x: jax.Array) -> jax.Array:
        d, kept = _size(x.shape), count(x.shape)
        # 30-bit integers read as float32 bit patterns: finite, non-negative and ordered
        bits = jax.random.bits(key, (d,), jnp.uint32) >> 2
        indices = top_k_indices(jax.lax.bitcast_convert_type(bits, jnp.float32), kept)
        return _keep(x, indices, d / kept if scaled else 1.0)

    return Compressor(
        "rand_k" if scaled else "rand_k_unscaled", _no_state, _stateless(fn),
        contraction=None if scaled else (lambda shape: count(shape) / _size(shape)),
        variance=(lambda shape: _size(shape) / count(shape) - 1.0) if scaled else None,
        bits=lambda shape: FLOAT_BITS * count(shape),
        check=_check_count(count),
    )


def sign() -> Compressor:
    r"""The sign of each entry, :math:`C(x) = \mathrm{sign}(x)` (signSGD; Bernstein et al. 2018).

    Neither contractive nor unbiased (it forgets the scale): no :math:`\alpha` or
    :math:`\omega`; error feedback needs :func:`scaled_sign`.  Bits: :math:`d`.
    """
    return Compressor(
        "sign", _no_state, _stateless(lambda key, x: jnp.sign(x)),
        contraction=None, variance=None, bits=_size, check=_accept_any,
    )


def scaled_sign() -> Compressor:
    r"""Scaled sign, :math:`C(x) = \frac{\|x\|_1}{d}\mathrm{sign}(x)`.

    Karimireddy, Rebjock, Stich, Jaggi (ICML 2019), "Error Feedback Fixes SignSGD", Lemma 8:
    contractive with :math:`\alpha = \|x\|_1^2/(d\|x\|_2^2) \ge 1/d` for a vector with no
    zero entries (zeros are kept exactly, since :math:`\mathrm{sign}(0) = 0`, which only
    helps); we report the worst case :math:`1/d`, approached by :math:`e_1 + \epsilon\mathbf 1`.
    Bits: :math:`d + 32`.
    """

    def fn(key: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.abs(x)) / x.size * jnp.sign(x)

    return Compressor(
        "scaled_sign", _no_state, _stateless(fn),
        contraction=lambda shape: 1.0 / _size(shape), variance=None,
        bits=lambda shape: _size(shape) + FLOAT_BITS, check=_accept_any,
    )


def _stochastic_round(key: jax.Array, value: jax.Array, low: jax.Array, high: jax.Array) -> jax.Array:
    """``low`` or ``high`` with the probabilities that make the result unbiased for ``value``."""
    width = jnp.where(high > low, high - low, 1.0)
    up = jax.random.uniform(key, value.shape, value.dtype) < (value - low) / width
    return jnp.where(up, high, low)


def qsgd(levels: int) -> Compressor:
    r"""QSGD with ``s = levels`` uniform levels (Alistarh et al., NeurIPS 2017, Sec. 3.1).

    :math:`Q_s(x)_i = \|x\|_2\,\mathrm{sign}(x_i)\,\xi_i/s`, where :math:`\xi_i` rounds
    :math:`s|x_i|/\|x\|_2` stochastically to a neighbouring integer.  Unbiased with
    :math:`\omega = \min(d/s^2, \sqrt d/s)` (Lemma 3.1).  Bits (no Elias coding):
    :math:`32 + d\,(1 + \lceil\log_2(s+1)\rceil)`.
    """
    s = check_int("levels", levels)

    def fn(key: jax.Array, x: jax.Array) -> jax.Array:
        norm = jnp.linalg.norm(x.reshape(-1))
        scaled = jnp.where(norm > 0, s * jnp.abs(x) / jnp.where(norm > 0, norm, 1.0), 0.0)
        low = jnp.floor(scaled)
        return norm * jnp.sign(x) * _stochastic_round(key, scaled, low, low + 1.0) / s

    return Compressor(
        f"qsgd_{s}", _no_state, _stateless(fn), contraction=None,
        variance=lambda shape: min(_size(shape) / s**2, math.sqrt(_size(shape)) / s),
        bits=lambda shape: FLOAT_BITS + _size(shape) * (1 + math.ceil(math.log2(s + 1))),
        check=_accept_any,
    )


def natural_compression() -> Compressor:
    r"""Natural compression :math:`C_{nat}` (Horváth et al. 2019, "Natural Compression for
    Distributed Deep Learning", Def. 1).

    Each entry :math:`t \in [2^a, 2^{a+1}]` is rounded to :math:`2^a` or :math:`2^{a+1}`
    with the probabilities that keep it unbiased; :math:`\omega = 1/8` (Thm. 1).  Bits: 9
    per entry (sign and an 8-bit exponent).
    """

    def fn(key: jax.Array, x: jax.Array) -> jax.Array:
        magnitude = jnp.abs(x)
        _, exponent = jnp.frexp(magnitude)  # magnitude = m 2^e with m in [0.5, 1)
        low = jnp.where(magnitude > 0, jnp.ldexp(jnp.ones_like(x), exponent - 1), 0.0)
        return jnp.sign(x) * _stochastic_round(key, magnitude, low, 2 * low)

    return Compressor(
        "natural", _no_state, _stateless(fn), contraction=None,
        variance=lambda shape: 1.0 / 8.0, bits=lambda shape: 9 * _size(shape),
        check=_accept_any,
    )


def natural_dithering(levels: int) -> Compressor:
    r"""Natural dithering with ``s`` levels (Horváth et al. 2019, Def. 3, :math:`p = 2`).

    :math:`r_i = |x_i|/\|x\|_2` is rounded stochastically between consecutive levels of
    :math:`\{0, 2^{1-s}, \dots, 1/2, 1\}`; unbiased with
    :math:`\omega = 1/8 + \min(\sqrt d/2^{s-1}, d/2^{2(s-1)})` (Thm. 7).
    Bits: :math:`32 + d\,(1 + \lceil\log_2(s+1)\rceil)`.
    """
    s = check_int("levels", levels)
    smallest = 2.0 ** (1 - s)

    def fn(key: jax.Array, x: jax.Array) -> jax.Array:
        norm = jnp.linalg.norm(x.reshape(-1))
        ratio = jnp.where(norm > 0, jnp.abs(x) / jnp.where(norm > 0, norm, 1.0), 0.0)
        _, exponent = jnp.frexp(ratio)
        power = jnp.ldexp(jnp.ones_like(x), exponent - 1)
        low = jnp.where(ratio < smallest, 0.0, power)
        high = jnp.where(ratio < smallest, smallest, 2 * power)
        return norm * jnp.sign(x) * _stochastic_round(key, ratio, low, high)

    def variance(shape: Shape) -> float:
        d = _size(shape)
        return 1.0 / 8.0 + min(math.sqrt(d) / 2 ** (s - 1), d / 2 ** (2 * (s - 1)))

    return Compressor(
        f"natural_dithering_{s}", _no_state, _stateless(fn), contraction=None,
        variance=variance,
        bits=lambda shape: FLOAT_BITS + _size(shape) * (1 + math.ceil(math.log2(s + 1))),
        check=_accept_any,
    )


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
            raise ValueError(f"rank={rank} exceeds the smaller side of the {matrix_shape(shape)} matrix view")

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

    return Compressor(
        f"low_rank_{r}", _no_state, _stateless(fn),
        contraction=lambda shape: r / min(matrix_shape(shape)), variance=None,
        bits=_low_rank_bits(r), check=_check_rank(r),
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

    def apply(key: jax.Array, x: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
        m = x.reshape(matrix_shape(x.shape))
        p, _ = jnp.linalg.qr(m @ q.astype(m.dtype))
        q = m.T @ p
        return (p @ q.T).reshape(x.shape), q

    return Compressor(
        f"power_sgd_{r}", init, apply, contraction=None, variance=None,
        bits=_low_rank_bits(r), check=_check_rank(r),
    )


def identity() -> Compressor:
    """No compression: :math:`\\alpha = 1`, :math:`\\omega = 0`, :math:`32d` bits."""
    return Compressor(
        "identity", _no_state, _stateless(lambda key, x: x),
        contraction=lambda shape: 1.0, variance=lambda shape: 0.0,
        bits=lambda shape: FLOAT_BITS * _size(shape), check=_accept_any,
    )


# ------------------------------------------------------------------------ pytrees


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


def init_tree(compressor: Compressor, key: jax.Array, tree: PyTree, leafwise: bool = False) -> PyTree:
    """The compressor state for messages shaped like ``tree``."""
    shapes = _shapes(tree, leafwise)
    keys = jax.random.split(key, len(shapes))
    return tuple(compressor.init(k, shape) for k, shape in zip(keys, shapes))


def compress_tree(
    compressor: Compressor, key: jax.Array, tree: PyTree, state: PyTree, leafwise: bool = False
) -> tuple[PyTree, PyTree]:
    """Compress a pytree as one flattened vector or leaf by leaf; returns ``(tree_hat, state)``."""
    if not leafwise:
        flat, unravel = ravel_pytree(tree)
        flat_hat, leaf_state = compressor.apply(key, flat, state[0])
        return unravel(flat_hat), (leaf_state,)
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    results = [compressor.apply(k, leaf, s) for k, leaf, s in zip(keys, leaves, state)]
    return treedef.unflatten([r[0] for r in results]), tuple(r[1] for r in results)


COMPRESSORS: dict[str, Callable[..., Compressor]] = {
    "identity": identity,
    "top_k": top_k,
    "approx_top_k": approx_top_k,
    "rand_k": rand_k,
    "sign": sign,
    "scaled_sign": scaled_sign,
    "qsgd": qsgd,
    "natural": natural_compression,
    "natural_dithering": natural_dithering,
    "low_rank": low_rank,
    "power_sgd": power_sgd,
}


def make_compressor(name: str, **options: Any) -> Compressor:
    """The compressor called ``name`` (a key of :data:`COMPRESSORS`) with ``options``."""
    if name not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {sorted(COMPRESSORS)}, got {name!r}")
    return COMPRESSORS[name](**options)
