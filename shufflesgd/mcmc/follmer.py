r"""The gradient-free Schrödinger–Föllmer sampler (Huang, Jiao, Kang, Liao, Liu & Liu 2021,
"Schrödinger-Föllmer sampler: sampling without ergodicity", arXiv:2106.10880; Föllmer 1985).

Among all diffusions :math:`dX_t = b(X_t, t)\,dt + dB_t` on :math:`t \in [0, 1]` that start
at a point :math:`a` and end at :math:`X_1 \sim \pi`, the Föllmer process is the one closest
in relative entropy to Brownian motion (the Schrödinger bridge from a point mass): Brownian
motion from :math:`a` with its path law reweighted by the density ratio
:math:`f = \pi / N(a, I)` at time 1.  Its drift is the heat-semigroup score of :math:`f`,

.. math:: b(x, t) = \nabla\log(Q_{1-t}f)(x), \qquad (Q_s f)(x) = E f(x + \sqrt s\,Z),

that is the Gaussian-smoothed score of the unnormalised :math:`f` at noise
:math:`\sigma = \sqrt{1-t}`, estimated here without gradients by self-normalised importance
sampling (:func:`shufflesgd.mcmc.importance_smoothed_score`).  The sampler reaches
:math:`\pi` at the finite time 1 with no ergodicity or mixing argument; its error comes from
the Euler–Maruyama step and the Monte Carlo drift.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int, check_key
from shufflesgd.mcmc.base import (
    LogDensity,
    SamplingAlgorithm,
    _all_finite,
    _info,
    check_logdensity,
)
from shufflesgd.mcmc.smoothing import importance_smoothed_score


class FollmerState(NamedTuple):
    """Föllmer sampler state: ``position`` :math:`X_{t_k}`, the start ``anchor`` :math:`a`
    and the step count :math:`k` (:math:`t_k = k/K`)."""

    position: jax.Array
    anchor: jax.Array
    count: jax.Array


def follmer(logdensity_fn: LogDensity, num_steps: int, num_samples: int) -> SamplingAlgorithm:
    r"""Gradient-free Schrödinger–Föllmer sampler (Huang, Jiao, Kang, Liao, Liu, Liu 2021,
    "Schrödinger-Föllmer sampler: sampling without ergodicity", arXiv:2106.10880, IEEE
    Trans. Inf. Theory 2025; Föllmer 1985), from the point mass at ``anchor`` :math:`a` to
    :math:`\pi \propto e^{\log\pi}` on :math:`t \in [0, 1]`.

    The Föllmer process :math:`dX_t = b(X_t, t)\,dt + dB_t`, :math:`X_0 = a`, is Brownian
    motion from :math:`a` with its path law reweighted by :math:`f(X_1)`, so that
    :math:`X_1 \sim \pi`; its drift is the heat-semigroup score of the density ratio
    :math:`f = \pi / N(a, I)`,

    .. math:: b(x, t) = \nabla\log(Q_{1-t}f)(x), \qquad (Q_s f)(x) = E f(x + \sqrt s\,Z),

    i.e. the smoothed score of the unnormalised density :math:`f` at noise
    :math:`\sigma = \sqrt{1-t}`, which :func:`shufflesgd.mcmc.importance_smoothed_score`
    estimates from ``num_samples`` evaluations of
    :math:`\log f(u) = \log\pi(u) + \|u - a\|^2/2` (the gradient-free, Stein-identity form
    of the drift in Huang et al.).  ``num_steps`` = K
    Euler–Maruyama steps :math:`X_{k+1} = X_k + h\,\hat b(X_k, t_k) + \sqrt h\,z_k`,
    :math:`h = 1/K`, :math:`t_k = kh` (their Euler scheme; the last step uses
    :math:`\sigma = \sqrt h > 0`); steps after the K-th leave the state unchanged (they still
    evaluate the score, under ``vmap`` a branch would too, and count it).  The
    same kind of Monte Carlo drift, estimated from a particle ensemble rather than fresh
    draws, underlies the ensemble samplers of Bischoff & Riel (2024, "Enhancing Score-Based
    Sampling Methods with Ensembles", arXiv:2401.17539; :mod:`shufflesgd.mcmc.ensemble`).

    Caveat (as in Huang et al.): the importance weights :math:`f` must have finite variance
    under the Gaussian proposals, e.g. for :math:`\pi = N(m, s^2 I)` one needs roughly
    :math:`s^2 < 2`; wider targets need a wider reference.

    ``init(anchor) -> FollmerState``; ``step(key, state)``; ``info.num_grad_evals`` counts
    smoothed-score evaluations (each ``num_samples`` log-density calls, no gradients).
    """
    check_int("num_steps", num_steps)
    check_int("num_samples", num_samples)

    def init(position: jax.Array) -> FollmerState:
        position = jnp.asarray(position)
        check_logdensity(logdensity_fn, position)
        return FollmerState(position, position, jnp.zeros((), jnp.int32))

    def step(key: jax.Array, state: FollmerState):
        check_key("key", key)
        score_key, noise_key = jax.random.split(key)
        h = 1.0 / num_steps
        t = state.count * h
        x = state.position

        def log_ratio(u: jax.Array) -> jax.Array:
            return logdensity_fn(u) + 0.5 * jnp.sum((u - state.anchor) ** 2)

        sigma = jnp.sqrt(jnp.maximum(1.0 - t, h))  # = sqrt(1 - t) on every live step
        drift = importance_smoothed_score(log_ratio, score_key, x, sigma, num_samples).score
        moved = x + h * drift + jnp.sqrt(h) * jax.random.normal(noise_key, x.shape, x.dtype)
        live = state.count < num_steps
        count = state.count + live.astype(jnp.int32)
        new = FollmerState(jnp.where(live, moved, x), state.anchor, count)
        return new, _info(1.0, True, 1, _all_finite(new.position))

    return SamplingAlgorithm(init, step)
