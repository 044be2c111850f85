r"""Samplers built on the Gaussian-smoothed density: walk–jump, the chain of log-concave
Markov chains, and the gradient-free Föllmer sampler.

For :math:`y = x + \sigma\varepsilon`, :math:`x \sim p`, the measurement density is the
smoothed :math:`p_\sigma = p * N(0, \sigma^2 I)`, and the least-squares (empirical Bayes)
estimate of :math:`x` is Tweedie's formula (Robbins 1956; Miyasawa 1961)

.. math:: \hat x(y) = E[x \mid y] = y + \sigma^2\nabla\log p_\sigma(y).

Everything here is written against one signature for the smoothed score,
:data:`SmoothedScore` ``(key, y, sigma) -> grad log p_sigma(y)`` (``y`` a flat ``[d]``
array, ``sigma`` a possibly traced scalar), with two providers:

* :func:`mixture_smoothed_score`: exact, for a :class:`shufflesgd.problems.GaussianMixture`,
  whose smoothed law is again a mixture, ``mixture.diffuse(1, sigma)``; the key is not used.
* :func:`monte_carlo_smoothed_score`: gradient-free, from the unnormalised log-density only,
  by self-normalised importance sampling (:func:`importance_smoothed_score`).

Kernels are ``(init, step)`` pairs (:class:`shufflesgd.mcmc.SamplingAlgorithm`) with the
hyper-parameters as traced arguments; drive them with :func:`shufflesgd.mcmc.run_chain`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int, check_positive
from shufflesgd.mcmc import (
    LogDensity,
    MCMCInfo,
    SamplingAlgorithm,
    baoab,
    check_logdensity,
)
from shufflesgd.problems import GaussianMixture

SmoothedScore = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""``(key, y, sigma) -> grad log p_sigma(y)`` for a flat ``y``."""


def _unadjusted_info(score_evals: int) -> MCMCInfo:
    """Diagnostics of an unadjusted move; ``num_grad_evals`` counts smoothed-score evaluations."""
    return MCMCInfo(jnp.asarray(1.0), jnp.asarray(True), jnp.asarray(score_evals, jnp.int32), jnp.asarray(0.0))


# ------------------------------------------------------------------ the smoothed score


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
    logdensity_fn: LogDensity, key: jax.Array, y: jax.Array, sigma: jax.Array, num_samples: int,
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
    drift) and of the ensemble samplers of Bischoff & Riel (2024, "Enhancing Score-Based
    Sampling Methods with Ensembles", arXiv:2401.17539).  ``num_samples`` is static.
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


# ------------------------------------------------------------------ walk–jump


class WalkState(NamedTuple):
    """The walker: a noisy measurement ``position`` :math:`y \\sim p_\\sigma`."""

    position: jax.Array


def walk_jump(smoothed_score: SmoothedScore) -> SamplingAlgorithm:
    r"""Walk–jump sampling (Saremi & Hyvärinen 2019, "Neural Empirical Bayes", JMLR 20):
    walk on the smoothed density :math:`p_\sigma`, and jump back to the clean space with
    :func:`jump` whenever a sample is wanted.  Smoothing helps the walk:
    :math:`\nabla^2\log p_\sigma(y) = (\mathrm{Cov}[x\mid y] - \sigma^2 I)/\sigma^4
    \succeq -I/\sigma^2`, so :math:`-\log p_\sigma` is :math:`1/\sigma^2`-smooth whatever
    :math:`p` is, and its modes are merged or bridged at the scale :math:`\sigma`.

    The walk here is the unadjusted Langevin algorithm on :math:`p_\sigma`,
    :math:`y' = y + h\nabla\log p_\sigma(y) + \sqrt{2h}\,z` (one smoothed-score evaluation a
    step), so the walk's stationary law is :math:`p_\sigma` up to ULA's :math:`O(h)` bias
    (for :math:`p_\sigma = N(m, \tau^2 I)` exactly :math:`N(m, \tau^2/(1 - h/(2\tau^2)) I)`).
    The jumps :math:`\hat x(y)` are posterior means, not draws: for a Gaussian target
    :math:`N(m, s^2 I)` they are :math:`N(m, s^4/(s^2+\sigma^2) I)`, narrower than :math:`p`
    by the posterior variance (the "jump" concentrates as :math:`\sigma \to 0`).

    ``init(position) -> WalkState``; ``step(key, state, step_size, sigma)``; positions are
    flat ``[d]`` arrays.  ``info.num_grad_evals`` counts smoothed-score evaluations.
    """

    def init(position: jax.Array) -> WalkState:
        return WalkState(jnp.asarray(position))

    def step(key: jax.Array, state: WalkState, step_size: jax.Array, sigma: jax.Array):
        check_positive("step_size", step_size)
        check_positive("sigma", sigma)
        score_key, noise_key = jax.random.split(key)
        y = state.position
        drift = y + step_size * smoothed_score(score_key, y, sigma)
        noise = jax.random.normal(noise_key, y.shape, y.dtype)
        return WalkState(drift + jnp.sqrt(2.0 * step_size) * noise), _unadjusted_info(1)

    return SamplingAlgorithm(init, step)


class UnderdampedWalkState(NamedTuple):
    """The walker :math:`y` with its velocity (unit mass)."""

    position: jax.Array
    momentum: jax.Array


def underdamped_walk_jump(smoothed_score: SmoothedScore) -> SamplingAlgorithm:
    r"""Walk–jump (Saremi & Hyvärinen 2019) with an underdamped Langevin walk on
    :math:`p_\sigma`, integrated by BAOAB (Leimkuhler & Matthews 2013,
    :func:`shufflesgd.mcmc.baoab`, as in :func:`shufflesgd.mcmc.sghmc`), each kick with the
    smoothed score.  For a Gaussian :math:`p_\sigma` its positions are exact at any stable step
    (no ULA bias).  Two smoothed-score evaluations a step (the score is not cached, so a
    changed :math:`\sigma` is used at once).  Jump with :func:`jump`.

    ``init(position)`` starts at rest; ``step(key, state, step_size, sigma, friction)``.
    """

    def init(position: jax.Array) -> UnderdampedWalkState:
        position = jnp.asarray(position)
        return UnderdampedWalkState(position, jnp.zeros_like(position))

    def step(key: jax.Array, state: UnderdampedWalkState, step_size: jax.Array, sigma: jax.Array,
             friction: jax.Array):
        check_positive("step_size", step_size)
        check_positive("sigma", sigma)
        check_positive("friction", friction)
        first_key, noise_key, second_key = jax.random.split(key, 3)
        y, v = state
        z = jax.random.normal(noise_key, v.shape, v.dtype)
        y, v = baoab(lambda y: smoothed_score(first_key, y, sigma), lambda y: smoothed_score(second_key, y, sigma),
                     y, v, z, step_size, friction)
        return UnderdampedWalkState(y, v), _unadjusted_info(2)

    return SamplingAlgorithm(init, step)


def jump(smoothed_score: SmoothedScore, key: jax.Array, y: jax.Array, sigma: jax.Array) -> jax.Array:
    r"""The jump of walk–jump sampling: :func:`tweedie_denoiser` at ``y`` with the smoothed
    score, :math:`\hat x(y) = y + \sigma^2\nabla\log p_\sigma(y)` (vmap it over the walk)."""
    check_positive("sigma", sigma)
    return tweedie_denoiser(y, smoothed_score(key, y, sigma), sigma)


# ------------------------------------------------------------------ Föllmer


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
    :math:`\sigma = \sqrt{1-t}`, which :func:`importance_smoothed_score` estimates from
    ``num_samples`` evaluations of :math:`\log f(u) = \log\pi(u) + \|u - a\|^2/2` (the
    gradient-free, Stein-identity form of the drift in Huang et al.).  ``num_steps`` = K
    Euler–Maruyama steps :math:`X_{k+1} = X_k + h\,\hat b(X_k, t_k) + \sqrt h\,z_k`,
    :math:`h = 1/K`, :math:`t_k = kh` (their Euler scheme; the last step uses
    :math:`\sigma = \sqrt h > 0`); steps after the K-th leave the state unchanged (they still
    evaluate the score, under ``vmap`` a branch would too, and count it).  The
    same Monte Carlo score in a reverse diffusion from a Gaussian is the ensemble/Monte-Carlo
    score sampler of Bischoff & Riel (2024, "Enhancing Score-Based Sampling Methods with
    Ensembles", arXiv:2401.17539).

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
        new = FollmerState(jnp.where(live, moved, x), state.anchor, state.count + live.astype(jnp.int32))
        return new, _unadjusted_info(1)

    return SamplingAlgorithm(init, step)


# ------------------------------------------------------------------ chain of log-concave Markov chains


class MultiMeasurementState(NamedTuple):
    """Sequential multi-measurement sampling.

    Attributes:
      position: the measurement being walked, :math:`y_{k+1}`.
      measurement_sum: :math:`\\sum_{j\\le k} y_j` over the accepted measurements.
      num_measurements: :math:`k`.
      stage_step: Langevin steps taken so far on :math:`y_{k+1}`.
    """

    position: jax.Array
    measurement_sum: jax.Array
    num_measurements: jax.Array
    stage_step: jax.Array


def conditional_measurement_score(
    smoothed_score: SmoothedScore, key: jax.Array, y: jax.Array, measurement_sum: jax.Array,
    num_measurements: jax.Array, sigma: jax.Array,
) -> jax.Array:
    r""":math:`\nabla_y\log p(y \mid y_{1:k}) = \frac{1}{k+1}\nabla\log
    p_{\sigma/\sqrt{k+1}}(\bar y) - (y - \bar y)/\sigma^2`, :math:`\bar y =
    (\sum_{j\le k}y_j + y)/(k+1)`: the score of the next measurement given :math:`k` earlier
    ones of the same :math:`x` (derivation in :func:`chain_of_log_concave_chains`)."""
    count = (num_measurements + 1).astype(y.dtype)
    mean = (measurement_sum + y) / count
    return smoothed_score(key, mean, sigma / jnp.sqrt(count)) / count - (y - mean) / sigma**2


def chain_of_log_concave_chains(smoothed_score: SmoothedScore, steps_per_measurement: int) -> SamplingAlgorithm:
    r"""Chain of log-concave Markov chains (Saremi, Park & Bach 2024, "Chain of Log-Concave
    Markov Chains", ICLR 2024, arXiv:2305.19473): walk–jump with :math:`m` measurements
    :math:`y_j = x + \sigma\varepsilon_j` of the same :math:`x`, sampled one at a time.

    Because :math:`\prod_j N(y_j; x, \sigma^2 I) = N(\bar y; x, \frac{\sigma^2}{m} I)\,
    c(y_{1:m})` with :math:`c \propto \exp(-\sum_j\|y_j - \bar y\|^2/2\sigma^2)`, the joint
    density depends on :math:`x` only through :math:`\bar y = \frac1m\sum_j y_j`:

    .. math:: \log p(y_{1:m}) = \log p_{\sigma/\sqrt m}(\bar y)
              - \tfrac{1}{2\sigma^2}\textstyle\sum_j\|y_j - \bar y\|^2 + \text{const},

    so the empirical-Bayes jump is :math:`E[x \mid y_{1:m}] = \bar y + \frac{\sigma^2}{m}
    \nabla\log p_{\sigma/\sqrt m}(\bar y)` (:func:`multimeasurement_jump`) and the
    conditional score of the next measurement given :math:`k` accepted ones, with
    :math:`\bar y = (\sum_{j\le k}y_j + y)/(k+1)`, is

    .. math:: \nabla_y\log p(y \mid y_{1:k}) = \tfrac{1}{k+1}\nabla\log
              p_{\sigma/\sqrt{k+1}}(\bar y) - (y - \bar y)/\sigma^2 .

    Differentiating once more, :math:`-\nabla_y^2\log p(y \mid y_{1:k}) = I/\sigma^2 -
    \mathrm{Cov}[x \mid y_{1:k}, y]/\sigma^4`: every conditional is :math:`1/\sigma^2`-smooth,
    and it is log-concave wherever the posterior covariance of :math:`x` is below
    :math:`\sigma^2 I` (at every stage when the data lie in a ball of radius
    :math:`R < \sigma`), the posterior contracting as measurements accumulate while the
    effective noise of the jump, :math:`\sigma/\sqrt m`, goes to zero: sampling at one
    fixed, large :math:`\sigma` becomes a chain of log-concave problems.
    The walk is the unadjusted Langevin algorithm on that conditional,
    ``steps_per_measurement`` (static) steps per measurement; then :math:`y_{k+1}` is
    accepted (added to the running sum, the only history kept) and the next chain starts
    from it.  ``num_measurements`` = m measurements take ``m * steps_per_measurement``
    steps of :func:`shufflesgd.mcmc.run_chain`; :math:`k = 0` is walk–jump's walk.

    The walks here are ULA, whose :math:`O(h)` bias adds up over the stages (step size
    :math:`h \lesssim \sigma^2` is stable at every stage since each conditional is
    :math:`1/\sigma^2`-smooth); the paper's experiments use underdamped walks.

    ``init(position) -> MultiMeasurementState``; ``step(key, state, step_size, sigma)``.
    """
    check_int("steps_per_measurement", steps_per_measurement)

    def init(position: jax.Array) -> MultiMeasurementState:
        position = jnp.asarray(position)
        zero = jnp.zeros((), jnp.int32)
        return MultiMeasurementState(position, jnp.zeros_like(position), zero, zero)

    def step(key: jax.Array, state: MultiMeasurementState, step_size: jax.Array, sigma: jax.Array):
        check_positive("step_size", step_size)
        check_positive("sigma", sigma)
        score_key, noise_key = jax.random.split(key)
        y, total, k = state.position, state.measurement_sum, state.num_measurements
        grad = conditional_measurement_score(smoothed_score, score_key, y, total, k, sigma)
        y = y + step_size * grad + jnp.sqrt(2.0 * step_size) * jax.random.normal(noise_key, y.shape, y.dtype)
        done = state.stage_step + 1 == steps_per_measurement
        new = MultiMeasurementState(
            y, jnp.where(done, total + y, total), k + done.astype(jnp.int32),
            jnp.where(done, 0, state.stage_step + 1),
        )
        return new, _unadjusted_info(1)

    return SamplingAlgorithm(init, step)


def multimeasurement_jump(
    smoothed_score: SmoothedScore, key: jax.Array, state: MultiMeasurementState, sigma: jax.Array,
) -> jax.Array:
    r"""The jump from :math:`k \ge 1` accepted measurements (Saremi et al. 2024; Tweedie's
    formula at noise :math:`\sigma/\sqrt k`): :math:`E[x \mid y_{1:k}] = \bar y +
    \frac{\sigma^2}{k}\nabla\log p_{\sigma/\sqrt k}(\bar y)`, :math:`\bar y` their mean.
    With no accepted measurement (:math:`k = 0`) the result is NaN."""
    check_positive("sigma", sigma)
    count = state.num_measurements.astype(state.position.dtype)
    mean = state.measurement_sum / count
    noise = sigma / jnp.sqrt(count)
    return tweedie_denoiser(mean, smoothed_score(key, mean, noise), noise)
