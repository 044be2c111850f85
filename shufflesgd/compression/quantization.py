r"""Quantizers: sign, scaled sign, QSGD, natural compression and natural dithering.

Each sends every coordinate with a few bits: sign (Bernstein et al. 2018) keeps one bit
and loses the scale; scaled sign (Karimireddy, Rebjock, Stich, Jaggi 2019) adds the mean
magnitude and is contractive; QSGD (Alistarh et al. 2017) and the natural compressors
(Horváth et al. 2019) round stochastically to a grid, so that :math:`E[C(x)] = x`, and are
unbiased with the variance :math:`\omega` of each paper's theorem.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int
from shufflesgd.compression.base import (
    FLOAT_BITS,
    Compressor,
    Shape,
    _accept_any,
    _no_state,
    _size,
    _stateless,
    checked_compressor,
)

PyTree = Any


def sign() -> Compressor:
    r"""The sign of each entry, :math:`C(x) = \mathrm{sign}(x)` (signSGD; Bernstein et al. 2018).

    Neither contractive nor unbiased (it forgets the scale): no :math:`\alpha` or
    :math:`\omega`; error feedback needs :func:`scaled_sign`.  Bits: :math:`d`.
    """
    return checked_compressor(
        "sign",
        _no_state,
        _stateless(lambda key, x: jnp.sign(x)),
        contraction=None,
        variance=None,
        bits=_size,
        check=_accept_any,
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

    return checked_compressor(
        "scaled_sign",
        _no_state,
        _stateless(fn),
        contraction=lambda shape: 1.0 / _size(shape),
        variance=None,
        bits=lambda shape: _size(shape) + FLOAT_BITS,
        check=_accept_any,
    )


def _stochastic_round(
    key: jax.Array, value: jax.Array, low: jax.Array, high: jax.Array
) -> jax.Array:
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

    return checked_compressor(
        f"qsgd_{s}",
        _no_state,
        _stateless(fn),
        contraction=None,
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

    return checked_compressor(
        "natural",
        _no_state,
        _stateless(fn),
        contraction=None,
        variance=lambda shape: 1.0 / 8.0,
        bits=lambda shape: 9 * _size(shape),
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

    return checked_compressor(
        f"natural_dithering_{s}",
        _no_state,
        _stateless(fn),
        contraction=None,
        variance=variance,
        bits=lambda shape: FLOAT_BITS + _size(shape) * (1 + math.ceil(math.log2(s + 1))),
        check=_accept_any,
    )
