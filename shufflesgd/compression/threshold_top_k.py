r"""Top-k by a threshold: an exact select on the magnitude bits, and a sampled estimate.

Both compressors keep the entries of :math:`x` whose magnitude reaches a threshold and
never sort or gather the whole vector (only a sample and one block of 255): each pass over
memory is one elementwise comparison and one count per vector, which partitions along any
leading (worker) axis, so under ``vmap`` with the workers sharded over a mesh each device
selects for its own workers without an all-gather.  The message is dense, shaped like
``x``, with the dropped entries zeroed.

**The magnitude bits.**  The bit pattern of a non-negative float32, read as ``uint32``, is
ordered like the float, so selecting on :math:`b_i = \mathrm{bits}(|x_i|) < 2^{31}` is
selecting on :math:`|x_i|`: the k-th largest magnitude is
:math:`t = \max\{v : \#\{i : b_i \ge v\} \ge k\}`, found by a select on integers
(radix select, Alabi, Blanchard, Gordon, Steinbach 2012, "Fast k-selection algorithms for
graphics processing units", Alg. 3, is its bit-by-bit form).

**Exact select** (:func:`threshold_top_k`), per vector, in passes over memory:

1. bracket (one strided read of :math:`s \approx 16384` entries, then 2 counting passes):
   two order statistics of the sample placed three binomial standard deviations either
   side of the expected rank :math:`ks/d` give :math:`lo < hi` with
   :math:`c(lo) \ge k > c(hi)`, where :math:`c(v) = \#\{i : b_i \ge v\}` (the sample
   ranks of Floyd & Rivest 1975, "Expected time bounds for selection", Alg. SELECT); a
   failed side falls back to :math:`lo = 0` or :math:`hi = 2^{31}`;
2. refine (one counting pass each): a candidate :math:`m \in (lo, hi)` by the Illinois
   regula falsi on :math:`f(v) = c(v) - k` between the bracket ends (linear interpolation,
   with the weight of an end kept twice in a row halved so neither end stalls; Dowell &
   Jarratt 1971, "A modified regula falsi method for computing the root of an equation",
   BIT 11), replacing the end on its side, until :math:`c(lo) = k`, :math:`hi = lo + 1`
   (all entries in :math:`[lo, hi)` tied) or at most 64 entries lie in :math:`[lo, hi)`.
   Counts within a narrow bracket are nearly linear in the bits, so a few passes usually
   suffice (the last steps, which would have to land between two adjacent entries, are
   left to step 3); under ``vmap`` every vector waits for the slowest one;
3. keep (two passes): one pass counts the entries in :math:`[lo, hi)` per block of 255;
   the blocks holding the first 64 of them (and the :math:`(k - c(hi))`-th) are read
   again, which locates them; when they are all the entries in :math:`[lo, hi)` the k-th
   largest :math:`t` is taken among them and the bracket becomes :math:`[t, t + 1)`.
   Then one pass writes the message: every entry with :math:`b_i \ge hi` (:math:`c(hi) < k`
   of them) and, of those in :math:`[lo, hi)`, the lowest-index :math:`k - c(hi)`, the
   cut-off index being located in the same way.  Ties at :math:`t` thus go to the lower
   index, as in ``lax.top_k``, so the kept set is ``lax.top_k``'s on every input.

The magnitude bits are recomputed from ``x`` in every pass, never stored.

**Sampled threshold** (:func:`sampled_threshold_top_k`, after Lin, Han, Mao, Wang, Dally
2018, "Deep Gradient Compression", ICLR, whose system-performance section estimates the
Top-k threshold from a 0.1%-1% random sample and computes a precise threshold among the
selected entries only when too many pass it): the threshold is an order statistic of a
key-driven uniform sample, counted in two passes (2 candidates), then the keep step.  The
message has at most ``k`` slots: the lower candidate whose count fits in ``k`` is used,
and when neither fits the exact refinement above runs from the bracket the sample gives.
The kept set is always a top-:math:`m` set, :math:`1 \le m \le k`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from shufflesgd.compression.base import (
    FLOAT_BITS,
    Compressor,
    _index_bits,
    _no_state,
    _size,
    _stateless,
    checked_compressor,
)
from shufflesgd.compression.sparsification import _check_count, _count

#: The bracket's side in binomial standard deviations of the sample rank.
_MARGIN_SDS = 3.0
#: Entries in the exact select's strided sample (all of them for shorter vectors).
_SAMPLE_SIZE = 16384
_UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def magnitude_bits(x: jax.Array) -> jax.Array:
    """The bit patterns of ``|x|`` as unsigned integers of the same width: ordered like the
    magnitudes, all below the largest pattern of the width (NaN's too)."""
    return jax.lax.bitcast_convert_type(jnp.abs(x), _UINT[x.dtype.itemsize])


def _top(x: jax.Array) -> jax.Array:
    """:math:`2^{w-1}` for the ``w``-bit patterns of ``x``: above every magnitude, so
    :math:`c = 0`."""
    return jnp.asarray(1 << (8 * x.dtype.itemsize - 1), _UINT[x.dtype.itemsize])


#: Entries per block of the counting pass: block counts fit in ``uint8``.
_BLOCK = 255
#: The refinement stops once this few entries lie in the bracket: they are located and sorted.
_FEW = 64


def _count_true(mask: jax.Array) -> jax.Array:
    """The number of ``True`` entries of a vector, summed in ``uint8`` over blocks of 255
    and then in ``int32`` (XLA:CPU vectorises the narrow sums)."""
    whole = mask.shape[-1] // _BLOCK * _BLOCK
    in_blocks = jnp.sum(
        jnp.sum(mask[:whole].reshape(-1, _BLOCK), -1, dtype=jnp.uint8), dtype=jnp.int32
    )
    return in_blocks + jnp.sum(mask[whole:], dtype=jnp.int32)


def _count_at_least(x: jax.Array, value: jax.Array) -> jax.Array:
    """:math:`c(v) = \\#\\{i : b_i \\ge v\\}` for a vector (one counting pass)."""
    return _count_true(magnitude_bits(x) >= value)


def _sample_ranks(k: int, d: int, s: int) -> tuple[int, int]:
    """1-based ranks (from the top) of the sample order statistics that bracket the k-th
    largest of ``d`` from a sample of ``s``: ``(high, low)``, three binomial standard
    deviations either side of the expected rank ``k s / d``."""
    mean = k * s / d
    spread = _MARGIN_SDS * math.sqrt(mean * (1.0 - k / d)) + 1.0
    return max(1, math.floor(mean - spread)), min(s, math.ceil(mean + spread))


def _refine(x: jax.Array, k: jax.Array, lo, c_lo, hi, c_hi):
    """Shrink a bracket :math:`c(lo) \\ge k > c(hi)` until :math:`c(lo) = k`,
    :math:`hi = lo + 1` or at most :data:`_FEW` entries lie in :math:`[lo, hi)`, by the
    Illinois regula falsi on :math:`f(v) = c(v) - k` (one counting pass a step)."""

    def unfinished(state):
        lo, c_lo, hi, c_hi, _, _, _ = state
        return (c_lo != k) & (hi - lo > 1) & (c_lo - c_hi > _FEW)

    def step(state):
        lo, c_lo, hi, c_hi, w_lo, w_hi, lo_moved = state
        width = hi - lo
        f_lo = (c_lo - k).astype(jnp.float32) * w_lo
        f_hi = (c_hi - k).astype(jnp.float32) * w_hi
        guess = (width.astype(jnp.float32) * (f_lo / (f_lo - f_hi))).astype(width.dtype)
        mid = lo + jnp.clip(guess, 1, width - 1)
        c_mid = _count_at_least(x, mid)
        above = c_mid >= k
        # the end kept twice in a row has its weight halved (Illinois); the replaced one 1
        w_lo = jnp.where(above, 1.0, jnp.where(lo_moved == 0, w_lo / 2, w_lo))
        w_hi = jnp.where(above, jnp.where(lo_moved == 1, w_hi / 2, w_hi), 1.0)
        return (
            jnp.where(above, mid, lo),
            jnp.where(above, c_mid, c_lo),
            jnp.where(above, hi, mid),
            jnp.where(above, c_hi, c_mid),
            w_lo,
            w_hi,
            above.astype(jnp.int8),
        )

    one, first = jnp.float32(1.0), jnp.int8(-1)
    lo, c_lo, hi, c_hi, _, _, _ = jax.lax.while_loop(
        unfinished, step, (lo, c_lo, hi, c_hi, one, one, first)
    )
    return lo, c_lo, hi, c_hi


def _locate(x: jax.Array, lo, hi, ranks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Indices and magnitude bits of the entries of ``x`` in :math:`[lo, hi)` of the given
    ranks (1-based, in index order; a rank past the last such entry gives a meaningless
    pair).  One pass counts the entries per block of 255; each rank's block is then read
    again."""
    d = x.shape[-1]
    width = min(_BLOCK, d)
    whole = d // width * width
    bits = magnitude_bits(x)
    inside = (bits >= lo) & (bits < hi)
    blocks = jnp.sum(inside[:whole].reshape(-1, width), -1, dtype=jnp.uint8)
    blocks = jnp.concatenate(
        [blocks.astype(jnp.int32), jnp.sum(inside[whole:], dtype=jnp.int32)[None]]
    )
    through = jnp.cumsum(blocks)

    def one(rank):
        block = jnp.minimum(jnp.searchsorted(through, rank), blocks.shape[0] - 1)
        start = jnp.minimum(block * width, d - width)
        window = magnitude_bits(jax.lax.dynamic_slice(x, (start,), (width,)))
        at = start + jnp.arange(width)
        in_window = (window >= lo) & (window < hi) & (at >= block * width)
        before = through[block] - blocks[block]
        offset = jnp.minimum(
            jnp.sum(before + jnp.cumsum(in_window, dtype=jnp.int32) < rank), width - 1
        )
        return start + offset, window[offset]

    return jax.vmap(one)(ranks)


def _keep_mask(x: jax.Array, k: jax.Array, lo, c_lo, hi, c_hi) -> jax.Array:
    """The mask of the k largest entries, ties to the lower index, given a bracket from
    :func:`_refine`.

    With at most :data:`_FEW` entries in :math:`[lo, hi)` they are located and the k-th
    largest bits :math:`t` is taken among them and the bracket becomes :math:`[t, t + 1)`;
    otherwise it stays (its entries all tied, or all kept).  Kept: the entries at or above
    the bracket's top, and the lowest-index ones in the bracket that make up ``k``."""
    need = k - c_hi
    ranks = jnp.arange(1, _FEW + 2, dtype=jnp.int32).at[-1].set(need)
    located, value = _locate(x, lo, hi, ranks)
    index, value, valid = located[:-1], value[:-1], ranks[:-1] <= c_lo - c_hi
    value = jnp.where(valid, value, jnp.zeros_like(value))
    t = jnp.sort(value)[_FEW - need]  # the need-th largest inside, if all are located
    tied = valid & (value == t)
    need_t = need - jnp.sum(valid & (value > t))
    cut_t = index[jnp.argmax(tied & (jnp.cumsum(tied) >= need_t))] + 1
    few = c_lo - c_hi <= _FEW
    low, high = jnp.where(few, t, lo), jnp.where(few, t + 1, hi)
    cut = jnp.where(few, cut_t, located[-1] + 1)
    bits = magnitude_bits(x)
    return (bits >= high) | ((bits >= low) & (bits < high) & (jnp.arange(x.shape[-1]) < cut))


def _exact_select(x: jax.Array, k: int) -> jax.Array:
    """The mask of ``lax.top_k(|x|, k)``'s indices, for a vector ``x``.  The magnitude bits
    are recomputed in every pass rather than stored (a stored copy costs a pass to write)."""
    d = x.shape[-1]
    stride = max(1, d // _SAMPLE_SIZE)
    sample = magnitude_bits(x[::stride])
    high_rank, low_rank = _sample_ranks(k, d, sample.shape[-1])
    ordered = jnp.sort(sample)
    a, b = ordered[-low_rank], ordered[-high_rank]  # a <= b
    c_a, c_b = _count_at_least(x, a), _count_at_least(x, b)
    lo = jnp.where(c_b >= k, b, jnp.where(c_a >= k, a, jnp.zeros_like(a)))
    c_lo = jnp.where(c_b >= k, c_b, jnp.where(c_a >= k, c_a, d))
    hi = jnp.where(c_a < k, a, jnp.where(c_b < k, b, _top(x)))
    c_hi = jnp.where(c_a < k, c_a, jnp.where(c_b < k, c_b, 0))
    bracket = _refine(x, jnp.int32(k), lo, c_lo, hi, c_hi)
    return _keep_mask(x, jnp.int32(k), *bracket)


def _bits(count):
    return lambda shape: count(shape) * (FLOAT_BITS + _index_bits(_size(shape)))


def threshold_top_k(k: int | None = None, *, fraction: float | None = None) -> Compressor:
    r"""Top-k by an exact select of the k-th largest magnitude's bit pattern.

    Keeps the same entries as :func:`~shufflesgd.compression.top_k` (``lax.top_k``'s,
    ties to the lower index) through counting passes over the magnitude bits instead of a
    sort (the algorithm and its cost are in this module's docstring; Alabi et al. 2012,
    Alg. 3; Floyd & Rivest 1975).  Contractive with :math:`\alpha = k/d` (Stich,
    Cordonnier, Jaggi 2018, Lemma A.1); bits :math:`k\,(32 + \lceil\log_2 d\rceil)`.
    ``k`` or ``fraction`` as for ``top_k``; ``k > d`` raises ``ValueError`` before
    tracing.
    """
    count = _count(k, fraction)

    def fn(key: jax.Array, x: jax.Array) -> jax.Array:
        flat = x.reshape(-1)
        keep = _exact_select(flat, count(x.shape))
        return jnp.where(keep, flat, jnp.zeros_like(flat)).reshape(x.shape)

    return checked_compressor(
        "threshold_top_k",
        _no_state,
        _stateless(fn),
        contraction=lambda shape: count(shape) / _size(shape),
        variance=None,
        bits=_bits(count),
        check=_check_count(count),
    )


def _sample_size(sample_fraction: float, d: int) -> int:
    return max(1, math.ceil(round(sample_fraction * d, 9)))


def sampled_contraction(k: int, d: int, s: int) -> float:
    r""":math:`\alpha` of :func:`sampled_threshold_top_k` for ``k`` of ``d`` with ``s``
    samples: :math:`\max_{j \le k} (j/d)\,P[\mathrm{Bin}(s, (j-1)/d) < r]`, ``r`` the
    higher candidate's sample rank.

    The message is a top-:math:`m` set with :math:`m \ge \min(k, c(\hat t_r))`, and
    :math:`c(\hat t_r) < j` only if :math:`r` or more of the ``s`` uniform draws fall
    among the :math:`j - 1` largest magnitudes; a top-:math:`m` set leaves at most
    :math:`(1 - m/d)\|x\|^2`, so :math:`E\|C(x) - x\|^2 \le (1 - \alpha)\|x\|^2` for every
    ``x``, whatever its distribution.
    """
    high_rank, _ = _sample_ranks(k, d, s)
    j = np.arange(1, k + 1)
    return float(np.max(j / d * stats.binom.cdf(high_rank - 1, s, (j - 1) / d)))


def sampled_threshold_top_k(
    k: int | None = None, *, fraction: float | None = None, sample_fraction: float = 0.01
) -> Compressor:
    r"""Top-k with the threshold estimated from a random sample (Lin, Han, Mao, Wang, Dally
    2018, "Deep Gradient Compression", ICLR, the sampled threshold of their
    system-performance section).

    ``s = ceil(sample_fraction * d)`` magnitudes drawn uniformly with replacement (from
    ``key``) give two candidate thresholds, the sample's order statistics at rank
    :math:`\lceil ks/d \rceil` (DGC's estimate) and at a rank :math:`r` three binomial
    standard deviations above it (a higher threshold); both are counted in one pass and the
    message keeps every entry at or above the lower candidate whose count is at most ``k``.
    When neither fits (both counts exceed ``k``) the exact refinement of
    :func:`threshold_top_k` runs from the higher one, so the
    message is always a top-:math:`m` set with :math:`1 \le m \le k` (a sample value is an
    entry, so it is reached by at least one) and has at most ``k`` slots: bits
    :math:`k\,(32 + \lceil\log_2 d\rceil)`, an upper bound on what is sent.

    Contraction: the distribution-free :func:`sampled_contraction`, below :math:`k/d`.
    """
    count = _count(k, fraction)
    if not 0.0 < sample_fraction <= 1.0:
        raise ValueError(
            f"sample_fraction must lie in (0, 1], got sample_fraction={sample_fraction!r}"
        )

    def fn(key: jax.Array, x: jax.Array) -> jax.Array:
        flat = x.reshape(-1)
        d, kept = flat.shape[0], count(x.shape)
        s = _sample_size(sample_fraction, d)
        sample = magnitude_bits(flat[jax.random.randint(key, (s,), 0, d)])
        high_rank, _ = _sample_ranks(kept, d, s)
        low_rank = max(high_rank, min(s, math.ceil(round(kept * s / d, 9))))
        ordered = jnp.sort(sample)
        a, b = ordered[-low_rank], ordered[-high_rank]  # a <= b
        c_a, c_b = _count_at_least(flat, a), _count_at_least(flat, b)
        fits = (c_a <= kept) | (c_b <= kept)
        t, c_t = jnp.where(c_a <= kept, a, b), jnp.where(c_a <= kept, c_a, c_b)
        # fits: the target is m = c(t) and the bracket [t, top) is final; else refine to k
        target = jnp.where(fits, c_t, kept)
        lo, c_lo = jnp.where(fits, t, b), jnp.where(fits, c_t, c_b)
        bracket = _refine(flat, target, lo, c_lo, _top(flat), jnp.int32(0))
        keep = _keep_mask(flat, target, *bracket)
        return jnp.where(keep, flat, jnp.zeros_like(flat)).reshape(x.shape)

    return checked_compressor(
        "sampled_threshold_top_k",
        _no_state,
        _stateless(fn),
        contraction=lambda shape: sampled_contraction(
            count(shape), _size(shape), _sample_size(sample_fraction, _size(shape))
        ),
        variance=None,
        bits=_bits(count),
        check=_check_count(count),
    )
