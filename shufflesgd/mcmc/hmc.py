r"""Hamiltonian Monte Carlo (Duane, Kennedy, Pendleton & Roweth 1987, "Hybrid Monte Carlo",
Phys. Lett. B 195; Neal 2011, "MCMC using Hamiltonian dynamics", Handbook of MCMC, ch. 5).

The position :math:`x` is augmented with a momentum :math:`p \sim N(0, M)` and the
Hamiltonian :math:`H(x, p) = -\log\pi(x) + \frac12 p^\top M^{-1}p`, whose flow preserves
:math:`\pi(x)N(p; 0, M)`.  A step draws a fresh momentum, follows the flow with :math:`L`
leapfrog steps of size :math:`\epsilon` (a volume-preserving, reversible integrator; Neal
2011, Eq. 5.18-5.20),

.. math:: p_{1/2} = p + \tfrac\epsilon2\nabla\log\pi(x), \quad
          x' = x + \epsilon M^{-1}p_{1/2}, \quad
          p' = p_{1/2} + \tfrac\epsilon2\nabla\log\pi(x'),

and accepts the end point with probability :math:`\min(1, e^{-\Delta H})`, which corrects the
integrator's energy error :math:`\Delta H`.  :math:`L` gradients a step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from shufflesgd._checks import check_int, check_key, check_positive
from shufflesgd.mcmc.base import (
    GradientState,
    LogDensity,
    SamplingAlgorithm,
    _all_finite,
    _info,
    _value_and_grad,
    check_logdensity,
)

PyTree = Any


def hmc(logdensity_fn: LogDensity, num_leapfrog: int) -> SamplingAlgorithm:
    r"""Hamiltonian Monte Carlo with a leapfrog integrator (Duane et al. 1987; Neal 2011,
    "MCMC using Hamiltonian dynamics", Fig. 2).

    Momentum :math:`p \sim N(0, M)` with a diagonal mass ``inverse_mass`` :math:`= M^{-1}`;
    ``num_leapfrog`` (static) leapfrog steps of size :math:`\epsilon`; accept with
    probability :math:`\min(1, e^{-\Delta H})`, :math:`H = -\log\pi(x) + \frac12 p^\top
    M^{-1}p`.  ``num_leapfrog`` gradients a step.  ``step(key, state, step_size,
    inverse_mass=1.0)``."""
    num_leapfrog = check_int("num_leapfrog", num_leapfrog)

    def init(position: PyTree) -> GradientState:
        check_logdensity(logdensity_fn, position)
        return _value_and_grad(logdensity_fn, position)

    def step(key: jax.Array, state: GradientState, step_size: jax.Array, inverse_mass: Any = 1.0):
        check_key("key", key)
        check_positive("step_size", step_size)
        check_positive("inverse_mass", inverse_mass)
        flat, unravel = ravel_pytree(state.position)
        inv_mass = jnp.broadcast_to(jnp.asarray(inverse_mass, flat.dtype), flat.shape)
        momentum_key, accept_key = jax.random.split(key)
        p0 = jax.random.normal(momentum_key, flat.shape, flat.dtype) / jnp.sqrt(inv_mass)

        def flat_grad(s: GradientState) -> jax.Array:
            return ravel_pytree(s.logdensity_grad)[0]

        def leapfrog(carry, _):
            s, p = carry
            p = p + 0.5 * step_size * flat_grad(s)
            x = ravel_pytree(s.position)[0] + step_size * inv_mass * p
            s = _value_and_grad(logdensity_fn, unravel(x))
            p = p + 0.5 * step_size * flat_grad(s)
            return (s, p), None

        (proposal, p1), _ = jax.lax.scan(leapfrog, (state, p0), length=num_leapfrog)
        kinetic = lambda p: 0.5 * jnp.sum(inv_mass * p**2)  # noqa: E731
        energy_error = (-proposal.logdensity + kinetic(p1)) - (-state.logdensity + kinetic(p0))
        energy_error = jnp.where(jnp.isnan(energy_error), jnp.inf, energy_error)
        acceptance = jnp.exp(jnp.minimum(-energy_error, 0.0))
        accepted = jax.random.uniform(accept_key) < acceptance
        new = jax.tree.map(lambda a, b: jnp.where(accepted, a, b), proposal, state)
        return new, _info(acceptance, accepted, num_leapfrog, _all_finite(new), energy_error)

    return SamplingAlgorithm(init, step)
