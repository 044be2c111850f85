r"""Sequential Monte Carlo: self-normalised weights, the effective sample size, resampling and
one adaptive reweight–resample step.

A particle system is :math:`N` particles (a pytree whose leaves have a leading axis of length
:math:`N`) with log-weights :math:`\log w_n`.  One :func:`step` of the generic SMC recursion
(Del Moral, Doucet & Jasra 2006, "Sequential Monte Carlo samplers", JRSS B; Doucet &
Johansen 2009, "A tutorial on particle filtering and smoothing: fifteen years later", the
generic SMC algorithm with adaptive resampling) multiplies the weights by incremental weights
:math:`G_n`, normalises them, accumulates the evidence estimate

.. math:: \log\hat Z \mathrel{+}= \log\sum_n \bar w_n G_n,

with :math:`\bar w` the weights normalised before the step, and resamples when the effective
sample size :math:`1/\sum_n\bar w_n^2` (Kong, Liu & Wong 1994, "Sequential imputations and
Bayesian missing data problems", JASA; Liu & Chen 1995) falls below a fraction of :math:`N`,
the adaptive rule analysed by Del Moral, Doucet & Jasra (2012), "On adaptive resampling
strategies for sequential Monte Carlo methods", Bernoulli.  Resampling (:func:`resample`)
draws ancestor indices with expected offspring counts :math:`N\bar w_n` by one of the schemes
of Douc, Cappé & Moulines (2005), "Comparison of resampling schemes for particle filtering",
ISPA, pp. 64-69: multinomial, stratified or systematic (:data:`RESAMPLING`; their residual
scheme is not here).  The section and equation numbers of these papers were not checked
against the papers themselves, so none are given.

:func:`init` and :func:`step` are the ``(init, step)`` pair of the house (the key first,
``step`` returning ``(state, info)``); everything is pure and works under ``jit``, ``vmap``
(over independent systems, over ``ess_threshold``) and inside ``lax.scan``.  The choice
whether to resample is a select, not a branch, so ``jit`` and ``vmap`` run the same
computation (a ``cond`` would turn into a select under ``vmap`` only).  Bits can still differ
between a batched and an unbatched program where XLA orders a reduction over the particles
differently: the normalised weights then agree to float32 rounding, and a resampling uniform
that falls within that rounding of a cumulative weight picks the neighbouring ancestor.

Non-finite increments.  A particle whose increment is :math:`-\infty` gets weight 0 and is
never drawn by :func:`resample`.  When every weight is zero the evidence increment is
:math:`-\infty` and the normalised log-weights are NaN; a NaN increment (or :math:`+\infty`)
makes the evidence or the log-weights NaN.  Either way the state shows it, and nothing is
silently renormalised.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_float_array, check_key, is_concrete

Array = jax.Array
PyTree = Any


#: The resampling schemes of :func:`resample` (Douc, Cappé & Moulines 2005).
RESAMPLING = ("multinomial", "systematic", "stratified")


class SMCState(NamedTuple):
    """A weighted particle system.

    Attributes:
      particles: a pytree whose leaves have a leading axis of length :math:`N`.
      log_weights: ``[N]``, self-normalised (their ``logsumexp`` is 0).
      log_normalizer: the running log-evidence estimate, the sum over steps of
        ``logsumexp(previous log_weights + increments)``.
    """

    particles: PyTree
    log_weights: Array
    log_normalizer: Array


class SMCInfo(NamedTuple):
    """Diagnostics of one :func:`step`.

    Attributes:
      ess: the effective sample size after reweighting, before resampling.
      resampled: whether the step resampled.
      ancestors: ``int32[N]``, the index each new particle was copied from (the identity
        when the step did not resample).
      log_normalizer_increment: ``logsumexp(previous log_weights + increments)``.
    """

    ess: Array
    resampled: Array
    ancestors: Array
    log_normalizer_increment: Array


def check_scheme(scheme: str) -> None:
    """``ValueError`` unless ``scheme`` is one of :data:`RESAMPLING`."""
    if scheme not in RESAMPLING:
        raise ValueError(f"scheme must be one of {list(RESAMPLING)}, got scheme={scheme!r}")


def check_ess_threshold(ess_threshold: Any) -> None:
    """``ValueError`` unless a concrete ``ess_threshold`` lies in :math:`[0, 1]` (NaN fails;
    a traced one passes)."""
    if is_concrete(ess_threshold):
        value = np.asarray(ess_threshold, np.float64)
        if not np.all((value >= 0.0) & (value <= 1.0)):
            raise ValueError(
                f"ess_threshold must lie in [0, 1], got ess_threshold={ess_threshold!r}"
            )


def _check_log_weights(name: str, log_weights: Any) -> None:
    check_float_array(name, log_weights)
    if np.ndim(log_weights) != 1:
        raise ValueError(
            f"{name} must be 1-D (one entry a particle), got shape {np.shape(log_weights)}"
        )


def effective_sample_size(log_weights: Array) -> Array:
    r"""The effective sample size :math:`1/\sum_n\bar w_n^2` of the self-normalised weights
    :math:`\bar w_n = w_n/\sum_m w_m` (Kong, Liu & Wong 1994; Liu & Chen 1995), computed in log
    space as :math:`\exp(2\,\mathrm{logsumexp}(\log w) - \mathrm{logsumexp}(2\log w))`, so the
    weights need not be normalised and may span any range.  :math:`N` for equal weights, 1 for
    a single non-zero weight; NaN when every weight is zero.  ``TypeError`` unless
    ``log_weights`` are floating, ``ValueError`` unless they are 1-D."""
    _check_log_weights("log_weights", log_weights)
    log_weights = jnp.asarray(log_weights)
    return jnp.exp(2.0 * jax.nn.logsumexp(log_weights) - jax.nn.logsumexp(2.0 * log_weights))


def resample(key: Array, log_weights: Array, scheme: str = "systematic") -> Array:
    r"""Ancestor indices ``int32[N]`` drawn from the normalised weights by ``scheme`` (Douc,
    Cappé & Moulines 2005, "Comparison of resampling schemes for particle filtering").

    Every scheme inverts the cumulative weights :math:`c_n = \sum_{m \le n}\bar w_m` at
    :math:`N` points :math:`u_k \in [0, 1)`: ancestor :math:`k` is the first :math:`n` with
    :math:`c_n > u_k`, so that particle :math:`n` receives the :math:`u_k` that fall in
    :math:`[c_{n-1}, c_n)` and its expected number of offspring is :math:`N\bar w_n`.

    * ``"multinomial"``: :math:`N` i.i.d. uniforms (sorted), i.e. :math:`N` i.i.d. categorical
      draws;
    * ``"stratified"``: :math:`u_k = (k + U_k)/N`, one uniform per stratum;
    * ``"systematic"``: :math:`u_k = (k + U)/N`, one uniform for all; particle :math:`n` then
      gets :math:`\lfloor N\bar w_n\rfloor` or :math:`\lceil N\bar w_n\rceil` offspring.

    The ancestors come out non-decreasing.  Guards: the cumulative sum is set to exactly 1
    from the last particle of positive weight on, and the indices are capped there, so no index
    reaches :math:`N` (a rounded :math:`c_{N-1} < 1`, or :math:`u_k` rounded up to 1) and no
    particle of zero weight is drawn (its :math:`c_n` equals :math:`c_{n-1}`).  ``TypeError``
    for a bad ``key`` or ``log_weights`` that are not floating; ``ValueError`` for an unknown
    ``scheme`` or ``log_weights`` that are not 1-D."""
    check_key("key", key)
    check_scheme(scheme)
    _check_log_weights("log_weights", log_weights)
    log_weights = jnp.asarray(log_weights)
    n = log_weights.shape[0]
    dtype = log_weights.dtype
    weights = jnp.exp(log_weights - jax.nn.logsumexp(log_weights))
    index = jnp.arange(n, dtype=jnp.int32)
    last = (n - 1 - jnp.argmax((weights > 0)[::-1])).astype(jnp.int32)
    cdf = jnp.where(index >= last, jnp.ones((), dtype), jnp.cumsum(weights))
    if scheme == "systematic":
        u = (index.astype(dtype) + jax.random.uniform(key, (), dtype)) / n
    elif scheme == "stratified":
        u = (index.astype(dtype) + jax.random.uniform(key, (n,), dtype)) / n
    else:
        u = jnp.sort(jax.random.uniform(key, (n,), dtype))
    ancestors = jnp.searchsorted(cdf, u, side="right").astype(jnp.int32)
    return jnp.minimum(ancestors, last)


def init(particles: PyTree) -> SMCState:
    r"""An equally weighted system: log-weights :math:`-\log N`, log-evidence 0.  ``ValueError``
    unless every leaf of ``particles`` has the same leading axis :math:`N \ge 1`."""
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else 0 for leaf in jax.tree.leaves(particles)}
    if len(sizes) != 1 or min(sizes) < 1:
        raise ValueError(
            "particles must be a pytree whose leaves share a leading axis N >= 1, got leading "
            f"sizes {sorted(sizes)}"
        )
    n = sizes.pop()
    dtype = jnp.result_type(float)
    return SMCState(particles, jnp.full((n,), -np.log(n), dtype), jnp.zeros((), dtype))


def step(
    key: Array,
    state: SMCState,
    log_increments: Array,
    *,
    scheme: str = "systematic",
    ess_threshold: float | Array = 0.5,
) -> tuple[SMCState, SMCInfo]:
    r"""Reweight by ``log_increments``, update the evidence, and resample when the effective
    sample size falls below ``ess_threshold`` :math:`\cdot N` (Del Moral, Doucet & Jasra 2012,
    "On adaptive resampling strategies for sequential Monte Carlo methods"; Doucet & Johansen
    2009, the generic SMC algorithm).

    With :math:`\log\bar w` the state's normalised log-weights and :math:`\log G` the
    increments: :math:`\ell = \mathrm{logsumexp}(\log\bar w + \log G)` is the evidence
    increment (the exact log of the weighted mean of :math:`G`), the new normalised
    log-weights are :math:`\log\bar w + \log G - \ell`, and if their ESS is below
    ``ess_threshold`` :math:`\cdot N` the particles are replaced by ``particles[ancestors]``
    (:func:`resample` with ``scheme`` and ``key``) and the log-weights reset to
    :math:`-\log N`.  ``ess_threshold=0`` never resamples, ``1`` resamples unless the weights
    are equal.  ``ess_threshold`` may be a traced array (a hyper-parameter); ``scheme`` is a
    static choice.  The ancestors are drawn whether used or not and the choice is a select (the
    same computation under ``jit`` and ``vmap``); the same key gives the same bits.

    ``TypeError`` for a bad ``key`` or ``log_increments`` that are not floating; ``ValueError``
    for an unknown ``scheme``, a concrete ``ess_threshold`` outside :math:`[0, 1]`, or
    ``log_increments`` not of shape ``[N]``."""
    check_key("key", key)
    check_scheme(scheme)
    check_ess_threshold(ess_threshold)
    _check_log_weights("log_increments", log_increments)
    n = state.log_weights.shape[0]
    if np.shape(log_increments) != (n,):
        raise ValueError(
            f"log_increments must have shape ({n},), one per particle, got shape "
            f"{np.shape(log_increments)}"
        )
    log_weights = state.log_weights + log_increments
    increment = jax.nn.logsumexp(log_weights)
    log_weights = log_weights - increment
    ess = effective_sample_size(log_weights)
    resampled = ess < ess_threshold * n
    ancestors = jnp.where(
        resampled, resample(key, log_weights, scheme), jnp.arange(n, dtype=jnp.int32)
    )
    particles = jax.tree.map(lambda leaf: leaf[ancestors], state.particles)
    log_weights = jnp.where(resampled, jnp.full_like(log_weights, -np.log(n)), log_weights)
    new_state = SMCState(particles, log_weights, state.log_normalizer + increment)
    return new_state, SMCInfo(ess, resampled, ancestors, increment)
