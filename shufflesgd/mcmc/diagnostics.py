r"""Convergence diagnostics of MCMC output: the effective sample size and split-:math:`\hat R`.

Both read draws shaped ``[num_chains, num_draws, ...]`` and return one value per trailing
entry (shape ``[...]``).  The estimators are BlackJAX's (:mod:`blackjax.diagnostics`), so
both are pure JAX: they run under ``jax.jit`` and ``jax.vmap`` (over sweeps of runs, say)
and the draws never leave the device.

With :math:`M` chains of :math:`N` draws, :math:`W` the mean within-chain variance and
:math:`B/N` the variance of the chain means, the pooled variance estimate is
:math:`\widehat{\mathrm{var}}^+ = \frac{N-1}{N}W + \frac BN` (Gelman et al. 2013, "Bayesian
Data Analysis", 3rd ed., Eq. 11.3).

* Effective sample size (Geyer 1992, "Practical Markov chain Monte Carlo", Statist. Sci. 7;
  Vehtari, Gelman, Simpson, Carpenter, Bürkner 2021, "Rank-normalization, folding, and
  localization: An improved :math:`\hat R`", Bayesian Analysis 16, Eq. 10-11, without the
  rank normalisation): the multi-chain autocorrelations :math:`\hat\rho_t = 1 -
  (W - \bar\gamma_t)/\widehat{\mathrm{var}}^+`, with :math:`\bar\gamma_t` the chains' mean
  autocovariance at lag :math:`t` (by FFT), are summed in pairs
  :math:`P_k = \hat\rho_{2k} + \hat\rho_{2k+1}` up to the first non-positive pair
  :math:`K` (Geyer's initial positive sequence), made non-increasing (his initial monotone
  sequence), and :math:`\mathrm{ESS} = MN/\hat\tau`,
  :math:`\hat\tau = -1 + 2\sum_{k<K}P_k + \hat\rho_{2K}^+`.  The last term is Stan's
  correction for antithetic chains (Stan Reference Manual, "Effective sample size"), capped
  by the monotone sequence; :math:`\hat\tau` is floored at :math:`1/\log_{10}(MN)`.
* Split-:math:`\hat R` (Gelman et al. 2013, Eq. 11.4; Vehtari et al. 2021, Eq. 4): each chain
  is cut into its first and last :math:`\lfloor N/2\rfloor` draws (the middle one dropped
  when :math:`N` is odd), and Gelman & Rubin's (1992) potential scale reduction
  :math:`\hat R = \sqrt{\widehat{\mathrm{var}}^+/W}` is taken over the :math:`2M`
  half-chains, so that a chain drifting within itself counts as disagreeing chains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def _as_draws(name: str, chains: Any, min_draws: int) -> jax.Array:
    """``chains`` as a floating array ``[num_chains, num_draws, ...]``, checked by shape only."""
    x = jnp.asarray(chains)
    if x.ndim < 2 or x.shape[0] < 1 or x.shape[1] < min_draws:
        raise ValueError(
            f"{name} must be shaped [num_chains, num_draws, ...] with num_chains >= 1 and "
            f"num_draws >= {min_draws}, got shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _per_entry(estimator: Callable[..., jax.Array], x: jax.Array) -> jax.Array:
    """``estimator`` on ``[m, n, k]`` (trailing entries flattened), reshaped to ``x.shape[2:]``
    (BlackJAX squeezes every unit axis, trailing ones included)."""
    flat = x.reshape(x.shape[:2] + (-1,))
    return estimator(flat, chain_axis=0, sample_axis=1).reshape(x.shape[2:])


def effective_sample_size(chains: Any) -> jax.Array:
    r"""Multi-chain effective sample size of ``chains`` ``[num_chains, num_draws, ...]``, one
    per trailing entry: :func:`blackjax.diagnostics.effective_sample_size` (Geyer's initial
    monotone sequence over the pooled autocorrelations of Vehtari et al. 2021, Eq. 10-11; see
    the module docstring).  Needs at least 2 draws; one chain is allowed.  A constant entry
    has ESS 0, an entry with a NaN draw has ESS NaN."""
    from blackjax import diagnostics  # on first use: importing blackjax starts JAX's backend

    return _per_entry(diagnostics.effective_sample_size, _as_draws("chains", chains, 2))


def split_rhat(chains: Any) -> jax.Array:
    r"""Split-:math:`\hat R` of ``chains`` ``[num_chains, num_draws, ...]``, one per trailing
    entry (Gelman et al. 2013, Eq. 11.4; Vehtari et al. 2021, Eq. 4): every chain is cut into
    its first and last ``num_draws // 2`` draws and
    :func:`blackjax.diagnostics.potential_scale_reduction` is taken over the half-chains.
    Needs at least 4 draws; one chain is allowed.  Values near 1 say the (half-)chains agree;
    Vehtari et al. recommend :math:`\hat R < 1.01`."""
    from blackjax import diagnostics  # on first use: importing blackjax starts JAX's backend

    x = _as_draws("chains", chains, 4)
    n, half = x.shape[1], x.shape[1] // 2
    halves = jnp.concatenate([x[:, :half], x[:, n - half :]], axis=0)
    return _per_entry(diagnostics.potential_scale_reduction, halves)
