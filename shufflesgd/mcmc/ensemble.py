r"""Ensemble smoothed scores: a gradient-free estimate of :math:`\nabla\log p_\sigma` at every
member of a particle ensemble that reuses the whole ensemble as its importance proposal, and
walk–jump sampling driven by it.

Bischoff & Riel (2024, "Enhancing Score-Based Sampling Methods with Ensembles",
arXiv:2401.17539; v2 "Gradient-Free Score-Based Sampling Methods with Ensembles") compute the
drifts of score-based samplers without gradients from the collective state of a particle
ensemble.  Here the idea takes the form of one estimator, :func:`ensemble_smoothed_score`
(the ensemble reused as a deterministic-mixture importance proposal), and one kernel,
:func:`ensemble_walk_jump`: walk–jump's Langevin walk on :math:`p_\sigma`
(:func:`shufflesgd.mcmc.walk_jump`) moving all members at once, each with the ensemble
estimate of its smoothed score.  The fresh-draw estimate of
:func:`shufflesgd.mcmc.importance_smoothed_score` spends :math:`M` density evaluations per
member and step; the ensemble estimate spends one per member and gives every member
:math:`N` importance samples.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_float_array, check_key, check_positive
from shufflesgd.mcmc.base import LogDensity, SamplingAlgorithm, _all_finite, check_logdensity
from shufflesgd.mcmc.smoothing import ImportanceScore


def _check_ensemble(name: str, ensemble: jax.Array) -> None:
    check_float_array(name, ensemble)
    if jnp.ndim(ensemble) != 2:
        raise ValueError(
            f"{name} must be a [num_particles, d] array, got shape {jnp.shape(ensemble)}"
        )


def ensemble_smoothed_score(
    logdensity_fn: LogDensity,
    key: jax.Array,
    ensemble: jax.Array,
    sigma: jax.Array,
) -> ImportanceScore:
    r"""Gradient-free estimates of :math:`\nabla\log p_\sigma(y_i)` at every member
    :math:`y_1, \dots, y_N` of an ensemble (``[N, d]``), from :math:`N` evaluations of an
    unnormalised :math:`\log p`, the ensemble serving as the importance proposal.

    As in :func:`shufflesgd.mcmc.importance_smoothed_score`, :math:`\nabla\log p_\sigma(y) =
    E_{p(x\mid y)}[x - y]/\sigma^2` with :math:`p(x\mid y) \propto p(x)\,N(y; x,
    \sigma^2 I)`.  Each member draws one point :math:`x_j = y_j + \sigma z_j`,
    :math:`z_j \sim N(0, I)`, so the :math:`x_j` are a stratified draw (one per component)
    from the ensemble's smoothed mixture :math:`q(x) = \frac1N\sum_k N(x; y_k,
    \sigma^2 I)`, and every member reuses all of them, weighted against that mixture
    (deterministic-mixture multiple importance sampling: Owen & Zhou 2000, "Safe and effective
    importance sampling", JASA 95; Elvira, Martino, Luengo & Bugallo 2019, "Generalized
    multiple importance sampling", Statistical Science 34):

    .. math:: \log w_{ij} = \log p(x_j) - \frac{\|y_i - x_j\|^2}{2\sigma^2}
              - \log\sum_{k=1}^N e^{-\|x_j - y_k\|^2/2\sigma^2} + c_i, \qquad
              \widehat{\nabla\log p_\sigma}(y_i) = \sum_{j=1}^N w_{ij}\,
              \frac{x_j - y_i}{\sigma^2},

    :math:`w_{i\cdot}` normalised over :math:`j` (a softmax).  How it differs from the
    fresh-draw estimate: there each member :math:`i` draws its own :math:`M` points around
    :math:`y_i` only, with weights :math:`\propto p(x)` (:math:`NM` density evaluations for
    the ensemble, independent across members); here the :math:`N` points are drawn once for
    the whole ensemble (:math:`N` density evaluations, plus :math:`O(N^2 d)` arithmetic and
    :math:`O(N^2)` memory for the Gaussian factors), every member's estimate uses points
    drawn around the other members too, and the estimates of different members are
    dependent (they share the points).  When all members coincide, :math:`q` is the Gaussian
    factor itself and the estimate is the fresh-draw one with :math:`M = N` and the same
    draws.  Since :math:`q \ge N(\cdot; y_i, \sigma^2 I)/N`, member :math:`i`'s density ratio
    :math:`p(x)N(y_i; x, \sigma^2 I)/q(x)` is at most :math:`N p(x)` (members far from
    :math:`y_i` cannot make it blow up).  For an ensemble drawn i.i.d. from a law
    :math:`\rho`, :math:`q \to \rho * N(0, \sigma^2 I) > 0` and the self-normalised estimate
    is consistent, with bias :math:`O(1/N)` and standard error :math:`O(1/\sqrt N)`; it is
    efficient when :math:`\rho` is close to :math:`p_\sigma` (as in a walk at stationarity),
    since then :math:`q \approx p_\sigma * N(0, \sigma^2 I)` covers every posterior
    :math:`p(x\mid y_i)`.

    Returns an :class:`ImportanceScore` of arrays with a leading member axis: the estimates
    ``[N, d]``, the delta-method standard errors :math:`(\sum_j w_{ij}^2 (g_{ij} -
    \hat g_i)^2)^{1/2}` ``[N, d]`` (Owen 2013, Sec. 9.2; for independent but not identically
    distributed draws it is the usual plug-in, conservative for stratified draws) and Kish's
    effective sample sizes :math:`1/\sum_j w_{ij}^2` ``[N]``.
    """
    _check_ensemble("ensemble", ensemble)
    ensemble = jnp.asarray(ensemble)
    check_logdensity(logdensity_fn, jax.ShapeDtypeStruct(ensemble.shape[1:], ensemble.dtype))
    check_key("key", key)
    check_positive("sigma", sigma)
    points = ensemble + sigma * jax.random.normal(key, ensemble.shape, ensemble.dtype)
    logp = jax.vmap(logdensity_fn)(points)
    center = jnp.mean(ensemble, axis=0)
    y, x = ensemble - center, points - center
    # half squared distances over sigma^2, [member i (or component k), point j]
    sq = jnp.sum(y**2, axis=1)[:, None] + jnp.sum(x**2, axis=1)[None, :] - 2.0 * y @ x.T
    sq = 0.5 * jnp.maximum(sq, 0.0) / sigma**2
    log_proposal = jax.scipy.special.logsumexp(-sq, axis=0)
    weights = jax.nn.softmax(logp - sq - log_proposal, axis=1)
    mean = weights @ x  # E[x | y_i] under the weights, centred
    estimate = (mean - y) / sigma**2
    w2 = weights**2
    spread = w2 @ x**2 - 2.0 * mean * (w2 @ x) + mean**2 * jnp.sum(w2, axis=1, keepdims=True)
    standard_error = jnp.sqrt(jnp.maximum(spread, 0.0)) / sigma**2
    return ImportanceScore(estimate, standard_error, 1.0 / jnp.sum(w2, axis=1))


class EnsembleState(NamedTuple):
    """The walkers: ``position`` ``[num_particles, d]``, noisy measurements
    :math:`y_i \\sim p_\\sigma`."""

    position: jax.Array


class EnsembleInfo(NamedTuple):
    """Per-step diagnostics of an ensemble kernel.

    Attributes:
      num_density_evals: evaluations of :math:`\\log p` this step (one per member).
      num_grad_evals: gradient evaluations, none (gradient-free); kept so that a run's infos
        read like every kernel's (e.g. by :func:`shufflesgd.mcmc.first_nonfinite_step`).
      effective_sample_size: Kish's effective sample size of each member's weights ``[N]``.
      is_finite: whether every member's position after the step is finite.
    """

    num_density_evals: jax.Array
    num_grad_evals: jax.Array
    effective_sample_size: jax.Array
    is_finite: jax.Array


def ensemble_walk_jump(logdensity_fn: LogDensity) -> SamplingAlgorithm:
    r"""Walk–jump sampling (Saremi & Hyvärinen 2019, "Neural Empirical Bayes", JMLR 20) of an
    ensemble of :math:`N` walkers driven by the gradient-free ensemble smoothed score
    (:func:`ensemble_smoothed_score`; the ensemble strategy of Bischoff & Riel 2024,
    arXiv:2401.17539): every member takes the unadjusted Langevin step on :math:`p_\sigma`

    .. math:: y_i' = y_i + h\,\widehat{\nabla\log p_\sigma}(y_i) + \sqrt{2h}\,\xi_i,
              \qquad \xi_i \sim N(0, I),

    with the estimates of all members from one set of :math:`N` density evaluations.  With the
    exact score this is :func:`shufflesgd.mcmc.walk_jump`'s walk on each member, stationary
    law :math:`p_\sigma` up to ULA's :math:`O(h)` bias; the estimate adds an
    :math:`O(1/N)` bias and a noise of variance about :math:`\mathrm{Cov}[x\mid y]/
    (\sigma^4\,\mathrm{ESS})` per coordinate, which inflates the stationary spread by
    :math:`O(h)` times that.  Jump with :func:`shufflesgd.mcmc.tweedie_denoiser` and a
    smoothed score at the walkers (e.g. ``ensemble_smoothed_score(...).score``).

    ``init(positions [N, d]) -> EnsembleState``; ``step(key, state, step_size, sigma)``,
    both hyper-parameters traced; ``info`` is an :class:`EnsembleInfo`
    (``num_density_evals`` is :math:`N` a step).  Chains of ensembles are ``vmap`` over keys
    and states.
    """

    def init(position: jax.Array) -> EnsembleState:
        _check_ensemble("position", position)
        return EnsembleState(jnp.asarray(position))

    def step(key: jax.Array, state: EnsembleState, step_size: jax.Array, sigma: jax.Array):
        check_key("key", key)
        check_positive("step_size", step_size)
        check_positive("sigma", sigma)
        score_key, noise_key = jax.random.split(key)
        y = state.position
        estimate = ensemble_smoothed_score(logdensity_fn, score_key, y, sigma)
        noise = jax.random.normal(noise_key, y.shape, y.dtype)
        new = EnsembleState(y + step_size * estimate.score + jnp.sqrt(2.0 * step_size) * noise)
        info = EnsembleInfo(
            jnp.asarray(y.shape[0], jnp.int32),
            jnp.asarray(0, jnp.int32),
            estimate.effective_sample_size,
            _all_finite(new),
        )
        return new, info

    return SamplingAlgorithm(init, step)
