r"""Walk–jump sampling, with Langevin or underdamped walks, and its multi-measurement form, the
chain of log-concave Markov chains.

Walk–jump (Saremi & Hyvärinen 2019, "Neural Empirical Bayes", JMLR 20) samples a density
:math:`p` through its Gaussian smoothing :math:`p_\sigma = p * N(0, \sigma^2 I)`
(:mod:`shufflesgd.mcmc.smoothing`): it *walks* with Langevin dynamics on :math:`p_\sigma`,
which is better conditioned than :math:`p`, and *jumps* back to the clean space with
Tweedie's estimate :math:`\hat x(y) = y + \sigma^2\nabla\log p_\sigma(y)`.  Since
:math:`\nabla^2\log p_\sigma(y) = (\mathrm{Cov}[x\mid y] - \sigma^2 I)/\sigma^4 \succeq
-I/\sigma^2`, :math:`-\log p_\sigma` is :math:`1/\sigma^2`-smooth whatever :math:`p` is, and
modes closer than about :math:`\sigma` merge.

The chain of log-concave Markov chains (Saremi, Park & Bach 2024, ICLR, arXiv:2305.19473)
takes :math:`m` measurements :math:`y_j = x + \sigma\varepsilon_j` of the same :math:`x`,
walking one at a time on its conditional law given the earlier ones: the joint density
depends on :math:`x` only through the running mean, so each conditional is a smoothed score
at the reduced noise :math:`\sigma/\sqrt{k+1}` plus a quadratic, log-concave once the
posterior of :math:`x` is narrower than :math:`\sigma`; the jump is Tweedie's formula at
noise :math:`\sigma/\sqrt m`.

Every kernel takes a :data:`shufflesgd.mcmc.smoothing.SmoothedScore` (exact or Monte Carlo)
and is an ``(init, step)`` pair whose hyper-parameters (step size, :math:`\sigma`, friction)
are traced ``step`` arguments; ``info.num_grad_evals`` counts smoothed-score evaluations.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_float_array, check_int, check_key, check_positive
from shufflesgd.mcmc.base import SamplingAlgorithm, _all_finite, _info
from shufflesgd.mcmc.integrators import baoab
from shufflesgd.mcmc.smoothing import SmoothedScore, tweedie_denoiser


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
        check_float_array("position", position)
        return WalkState(jnp.asarray(position))

    def step(key: jax.Array, state: WalkState, step_size: jax.Array, sigma: jax.Array):
        check_key("key", key)
        check_positive("step_size", step_size)
        check_positive("sigma", sigma)
        score_key, noise_key = jax.random.split(key)
        y = state.position
        drift = y + step_size * smoothed_score(score_key, y, sigma)
        noise = jax.random.normal(noise_key, y.shape, y.dtype)
        new = WalkState(drift + jnp.sqrt(2.0 * step_size) * noise)
        return new, _info(1.0, True, 1, _all_finite(new))

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
        check_float_array("position", position)
        position = jnp.asarray(position)
        return UnderdampedWalkState(position, jnp.zeros_like(position))

    def step(
        key: jax.Array,
        state: UnderdampedWalkState,
        step_size: jax.Array,
        sigma: jax.Array,
        friction: jax.Array,
    ):
        check_key("key", key)
        check_positive("step_size", step_size)
        check_positive("sigma", sigma)
        check_positive("friction", friction)
        first_key, noise_key, second_key = jax.random.split(key, 3)
        y, v = state
        z = jax.random.normal(noise_key, v.shape, v.dtype)
        y, v = baoab(
            lambda y: smoothed_score(first_key, y, sigma),
            lambda y: smoothed_score(second_key, y, sigma),
            y,
            v,
            z,
            step_size,
            friction,
        )
        return UnderdampedWalkState(y, v), _info(1.0, True, 2, _all_finite(y, v))

    return SamplingAlgorithm(init, step)


def jump(
    smoothed_score: SmoothedScore,
    key: jax.Array | None,
    y: jax.Array,
    sigma: jax.Array,
) -> jax.Array:
    r"""The jump of walk–jump sampling: :func:`shufflesgd.mcmc.tweedie_denoiser` at ``y`` with
    the smoothed score, :math:`\hat x(y) = y + \sigma^2\nabla\log p_\sigma(y)` (vmap it over
    the walk)."""
    if key is not None:  # an exact smoothed score needs no key
        check_key("key", key)
    check_positive("sigma", sigma)
    return tweedie_denoiser(y, smoothed_score(key, y, sigma), sigma)


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
    smoothed_score: SmoothedScore,
    key: jax.Array,
    y: jax.Array,
    measurement_sum: jax.Array,
    num_measurements: jax.Array,
    sigma: jax.Array,
) -> jax.Array:
    r""":math:`\nabla_y\log p(y \mid y_{1:k}) = \frac{1}{k+1}\nabla\log
    p_{\sigma/\sqrt{k+1}}(\bar y) - (y - \bar y)/\sigma^2`, :math:`\bar y =
    (\sum_{j\le k}y_j + y)/(k+1)`: the score of the next measurement given :math:`k` earlier
    ones of the same :math:`x` (derivation in :func:`chain_of_log_concave_chains`)."""
    count = (num_measurements + 1).astype(y.dtype)
    mean = (measurement_sum + y) / count
    return smoothed_score(key, mean, sigma / jnp.sqrt(count)) / count - (y - mean) / sigma**2


def chain_of_log_concave_chains(
    smoothed_score: SmoothedScore,
    steps_per_measurement: int,
) -> SamplingAlgorithm:
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
    from it.  :math:`m` measurements take ``m * steps_per_measurement`` steps;
    :math:`k = 0` is walk–jump's walk.

    The walks here are ULA, whose :math:`O(h)` bias adds up over the stages (step size
    :math:`h \lesssim \sigma^2` is stable at every stage since each conditional is
    :math:`1/\sigma^2`-smooth); the paper's experiments use underdamped walks.

    ``init(position) -> MultiMeasurementState``; ``step(key, state, step_size, sigma)``.
    """
    check_int("steps_per_measurement", steps_per_measurement)

    def init(position: jax.Array) -> MultiMeasurementState:
        check_float_array("position", position)
        position = jnp.asarray(position)
        zero = jnp.zeros((), jnp.int32)
        return MultiMeasurementState(position, jnp.zeros_like(position), zero, zero)

    def step(key: jax.Array, state: MultiMeasurementState, step_size: jax.Array, sigma: jax.Array):
        check_key("key", key)
        check_positive("step_size", step_size)
        check_positive("sigma", sigma)
        score_key, noise_key = jax.random.split(key)
        y, total, k = state.position, state.measurement_sum, state.num_measurements
        grad = conditional_measurement_score(smoothed_score, score_key, y, total, k, sigma)
        noise = jax.random.normal(noise_key, y.shape, y.dtype)
        y = y + step_size * grad + jnp.sqrt(2.0 * step_size) * noise
        done = state.stage_step + 1 == steps_per_measurement
        new = MultiMeasurementState(
            y,
            jnp.where(done, total + y, total),
            k + done.astype(jnp.int32),
            jnp.where(done, 0, state.stage_step + 1),
        )
        return new, _info(1.0, True, 1, _all_finite(new.position, new.measurement_sum))

    return SamplingAlgorithm(init, step)


def multimeasurement_jump(
    smoothed_score: SmoothedScore,
    key: jax.Array | None,
    state: MultiMeasurementState,
    sigma: jax.Array,
) -> jax.Array:
    r"""The jump from :math:`k \ge 1` accepted measurements (Saremi et al. 2024; Tweedie's
    formula at noise :math:`\sigma/\sqrt k`): :math:`E[x \mid y_{1:k}] = \bar y +
    \frac{\sigma^2}{k}\nabla\log p_{\sigma/\sqrt k}(\bar y)`, :math:`\bar y` their mean.
    With no accepted measurement (:math:`k = 0`) the result is NaN."""
    if key is not None:  # an exact smoothed score needs no key
        check_key("key", key)
    check_positive("sigma", sigma)
    count = state.num_measurements.astype(state.position.dtype)
    mean = state.measurement_sum / count
    noise = sigma / jnp.sqrt(count)
    return tweedie_denoiser(mean, smoothed_score(key, mean, noise), noise)
