r"""Langevin kernels: the unadjusted Langevin algorithm (ULA) and its Metropolis-adjusted
form (MALA).

The overdamped Langevin diffusion :math:`dX_t = \nabla\log\pi(X_t)\,dt + \sqrt2\,dW_t` has
:math:`\pi` as its invariant law.  Its Euler–Maruyama discretisation with step :math:`h`,

.. math:: x' = x + h\nabla\log\pi(x) + \sqrt{2h}\,z, \qquad z \sim N(0, I),

is ULA (Roberts & Tweedie 1996, "Exponential convergence of Langevin distributions and their
discrete approximations", Bernoulli 2(4), Eq. 1.3; Durmus & Moulines 2017, Ann. Appl.
Probab. 27), whose stationary law is :math:`\pi` up to an :math:`O(h)` bias.  MALA (Roberts &
Tweedie 1996, Sec. 1.4; Besag 1994) uses it as a proposal
:math:`q(x' \mid x) = N(x + h\nabla\log\pi(x), 2hI)` in a Metropolis–Hastings step accepted
with probability :math:`\min\{1, \pi(x')q(x \mid x')/(\pi(x)q(x' \mid x))\}`, which removes
the bias.  Both spend one gradient a step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from shufflesgd._checks import check_key, check_positive
from shufflesgd.mcmc.base import (
    GradientState,
    LogDensity,
    SamplingAlgorithm,
    _all_finite,
    _axpy,
    _info,
    _normal_like,
    _value_and_grad,
    check_logdensity,
)

PyTree = Any


def _langevin_proposal(state: GradientState, step_size: jax.Array, noise: PyTree) -> PyTree:
    drift = _axpy(step_size, state.logdensity_grad, state.position)
    return _axpy(jnp.sqrt(2.0 * step_size), noise, drift)


def ula(logdensity_fn: LogDensity) -> SamplingAlgorithm:
    r"""Unadjusted Langevin algorithm (Roberts & Tweedie 1996, Eq. 1.3; Durmus & Moulines 2017):
    :math:`x' = x + h\nabla\log\pi(x) + \sqrt{2h}\,z`.  Biased at :math:`O(h)`; one gradient
    a step.  ``step(key, state, step_size)``."""

    def init(position: PyTree) -> GradientState:
        check_logdensity(logdensity_fn, position)
        return _value_and_grad(logdensity_fn, position)

    def step(key: jax.Array, state: GradientState, step_size: jax.Array):
        check_key("key", key)
        check_positive("step_size", step_size)
        proposal = _langevin_proposal(state, step_size, _normal_like(key, state.position))
        new = _value_and_grad(logdensity_fn, proposal)
        return new, _info(1.0, True, 1, _all_finite(new))

    return SamplingAlgorithm(init, step)


def mala(logdensity_fn: LogDensity) -> SamplingAlgorithm:
    r"""Metropolis-adjusted Langevin (Roberts & Tweedie 1996, Sec. 1.4): the ULA proposal
    :math:`q(x'|x) = N(x + h\nabla\log\pi(x), 2h I)` accepted with probability
    :math:`\min(1, \pi(x')q(x|x')/(\pi(x)q(x'|x)))`, which makes :math:`\pi` invariant.
    One gradient a step.  ``step(key, state, step_size)``."""

    def log_q(to: GradientState, frm: GradientState, step_size: jax.Array) -> jax.Array:
        mean = _axpy(step_size, frm.logdensity_grad, frm.position)
        diff = optax.tree.sub(to.position, mean)
        return -optax.tree.norm(diff, squared=True) / (4.0 * step_size)

    def init(position: PyTree) -> GradientState:
        check_logdensity(logdensity_fn, position)
        return _value_and_grad(logdensity_fn, position)

    def step(key: jax.Array, state: GradientState, step_size: jax.Array):
        check_key("key", key)
        check_positive("step_size", step_size)
        noise_key, accept_key = jax.random.split(key)
        noise = _normal_like(noise_key, state.position)
        proposal = _value_and_grad(logdensity_fn, _langevin_proposal(state, step_size, noise))
        log_ratio = (
            proposal.logdensity
            + log_q(state, proposal, step_size)
            - state.logdensity
            - log_q(proposal, state, step_size)
        )
        log_ratio = jnp.where(jnp.isnan(log_ratio), -jnp.inf, log_ratio)
        acceptance = jnp.exp(jnp.minimum(log_ratio, 0.0))
        accepted = jnp.log(jax.random.uniform(accept_key)) < log_ratio
        new = jax.tree.map(lambda p, s: jnp.where(accepted, p, s), proposal, state)
        return new, _info(acceptance, accepted, 1, _all_finite(new))

    return SamplingAlgorithm(init, step)
