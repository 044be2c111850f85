r"""Gaussian-smoothed densities and their scores: Tweedie's formula and the smoothed-score
providers that the walk–jump and Föllmer samplers share.

For :math:`y = x + \sigma\varepsilon`, :math:`x \sim p`, :math:`\varepsilon \sim N(0, I)`,
the measurement density is the smoothed :math:`p_\sigma = p * N(0, \sigma^2 I)`, and the
least-squares (empirical Bayes) estimate of :math:`x` is Tweedie's formula (Robbins 1956,
"An empirical Bayes approach to statistics"; Miyasawa 1961; Efron 2011, "Tweedie's formula
and selection bias", JASA 106)

.. math:: \hat x(y) = E[x \mid y] = y + \sigma^2\nabla\log p_\sigma(y).

Samplers consume the smoothed score through one signature, :data:`SmoothedScore`
``(key, y, sigma) -> grad log p_sigma(y)`` (``y`` a flat ``[d]`` array, ``sigma`` a possibly
traced scalar), with two providers:

* :func:`mixture_smoothed_score`: exact, for a
  :class:`shufflesgd.problems.GaussianMixture`, whose smoothed law is again a mixture, with
  covariances :math:`\Sigma_k + \sigma^2 I`; the key is not used.
* :func:`monte_carlo_smoothed_score`: gradient-free, from the unnormalised log-density only,
  by self-normalised importance sampling of the posterior :math:`p(x \mid y)`
  (:func:`importance_smoothed_score`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int, check_positive
from shufflesgd.mcmc.base import LogDensity, check_logdensity
from shufflesgd.problems.mixtures import GaussianMixture

SmoothedScore = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""``(key, y, sigma) -> grad log p_sigma(y)`` for a flat ``y``."""


def tweedie_denoiser(y: jax.Array, smoothed_score: jax.Array, sigma: jax.Array) -> jax.Array:
    r"""The empirical-Bayes estimate :math:`\hat x(y) = y + \sigma^2\nabla\log p_\sigma(y)`
    (Robbins 1956; Miyasawa 1961; Saremi & Hyvärinen 2019, "Neural Empirical Bayes",
    JMLR 20), from the smoothed score at ``y``."""
    return y + sigma**2 * smoothed_score


def mixture_smoothed_score(mixture: GaussianMixture) -> SmoothedScore:
    r"""The exact :math:`\nabla\log p_\sigma` of a Gaussian mixture: :math:`p_\sigma` is the
    mixture with covariances :math:`\Sigma_k + \sigma^2 I`, evaluated in the components'
    eigenbases (:meth:`GaussianMixture.eigen`, decomposed once) so that a per-chain
    :math:`\sigma` costs matrix products only, not a factorisation per chain and step."""
    law = mixture.eigen()

    def score(key: jax.Array, y: jax.Array, sigma: jax.Array) -> jax.Array:
        del key  # exact: no randomness
        return law.score(y, 1.0, sigma)

    return score


class ImportanceScore(NamedTuple):
    """A self-normalised importance-sampling estimate of the smoothed score.

    Attributes:
      score: the estimate of :math:`\\nabla\\log p_\\sigma(y)`.
      standard_error: per coordinate, the delta-method standard error
        :math:`(\\sum_j w_j^2 (g_j - \\hat g)^2)^{1/2}` of a self-normalised estimator
        (Owen 2013, "Monte Carlo theory, methods and examples", Sec. 9.2).
      effective_sample_size: Kish's :math:`1/\\sum_j w_j^2`.
    """

    score: jax.Array
    standard_error: jax.Array
    effective_sample_size: jax.Array


def importance_smoothed_score(
    logdensity_fn: LogDensity,
    key: jax.Array,
    y: jax.Array,
    sigma: jax.Array,
    num_samples: int,
) -> ImportanceScore:
    r"""Gradient-free estimate of :math:`\nabla\log p_\sigma(y)` from an unnormalised
    :math:`\log p`.

    The posterior of the clean point is :math:`p(x\mid y) \propto p(x)\,N(y; x, \sigma^2 I)`,
    and differentiating :math:`p_\sigma(y) = \int p(x) N(y; x, \sigma^2 I)\,dx` under the
    integral gives :math:`\nabla\log p_\sigma(y) = E_{p(x\mid y)}[x - y]/\sigma^2`.  Drawing
    :math:`x_j = y + \sigma z_j`, :math:`z_j \sim N(0, I)` (the Gaussian factor itself as the
    proposal), the importance weights reduce to :math:`w_j \propto p(x_j)`, so

    .. math:: \widehat{\nabla\log p_\sigma}(y) = \frac1\sigma\sum_{j=1}^N w_j z_j,
              \qquad w = \mathrm{softmax}(\log p(x_1), \dots, \log p(x_N)).

    Consistent as :math:`N \to \infty` with bias :math:`O(1/N)` and standard error
    :math:`O(1/\sqrt N)`; the weights degenerate when :math:`\sigma` is large against the
    scale of :math:`p`.  This is the Monte Carlo score of the Schrödinger–Föllmer sampler
    (Huang, Jiao, Kang, Liao, Liu, Liu 2021, arXiv:2106.10880, the Stein-identity form of its
    drift); Bischoff & Riel (2024, "Enhancing Score-Based Sampling Methods with Ensembles",
    arXiv:2401.17539) estimate such drifts from a particle ensemble instead
    (:mod:`shufflesgd.mcmc.ensemble`).  ``num_samples`` is static.
    """
    check_logdensity(logdensity_fn, y)
    check_positive("sigma", sigma)
    check_int("num_samples", num_samples)
    z = jax.random.normal(key, (num_samples,) + y.shape, y.dtype)
    weights = jax.nn.softmax(jax.vmap(logdensity_fn)(y + sigma * z))
    g = z / sigma
    estimate = weights @ g
    standard_error = jnp.sqrt(weights**2 @ (g - estimate) ** 2)
    return ImportanceScore(estimate, standard_error, 1.0 / jnp.sum(weights**2))


def monte_carlo_smoothed_score(logdensity_fn: LogDensity, num_samples: int) -> SmoothedScore:
    """:func:`importance_smoothed_score` with ``num_samples`` draws, as a :data:`SmoothedScore`."""
    check_int("num_samples", num_samples)

    def score(key: jax.Array, y: jax.Array, sigma: jax.Array) -> jax.Array:
        return importance_smoothed_score(logdensity_fn, key, y, sigma, num_samples).score

    return score
