r"""Splitting integrators for underdamped (kinetic) Langevin dynamics.

With unit mass, friction :math:`\gamma` and force :math:`F = \nabla\log\pi`,

.. math:: dx = v\,dt, \qquad dv = F(x)\,dt - \gamma v\,dt + \sqrt{2\gamma}\,dW_t

leaves :math:`\pi(x)N(v; 0, I)` invariant.  The generator splits into a kick B
(:math:`\dot v = F(x)`), a drift A (:math:`\dot x = v`) and an Ornstein–Uhlenbeck part O
(:math:`dv = -\gamma v\,dt + \sqrt{2\gamma}\,dW`, solved exactly); BAOAB composes them
symmetrically as B(h/2) A(h/2) O(h) A(h/2) B(h/2) (Leimkuhler & Matthews 2013, "Rational
construction of stochastic numerical methods for molecular sampling", AMRX 2013(1)).  Its
configurational marginal is second-order accurate in :math:`h` and exact for Gaussian
targets at any stable step size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from shufflesgd.mcmc.base import _axpy

PyTree = Any


def baoab(
    first_force: Callable[[PyTree], PyTree],
    second_force: Callable[[PyTree], PyTree],
    position: PyTree,
    velocity: PyTree,
    noise: PyTree,
    step_size: jax.Array,
    friction: jax.Array,
) -> tuple[PyTree, PyTree]:
    r"""One BAOAB step of underdamped Langevin dynamics with unit mass (Leimkuhler & Matthews
    2013, "Rational construction of stochastic numerical methods for molecular sampling",
    AMRX): half kick B :math:`v \mathrel{+}= \frac h2 F(x)`, half drift A
    :math:`x \mathrel{+}= \frac h2 v`, exact Ornstein–Uhlenbeck O
    :math:`v \leftarrow e^{-\gamma h}v + \sqrt{1-e^{-2\gamma h}}\,z`, A, B.  The first kick uses
    ``first_force`` and the last ``second_force`` (the same function, or one with its own
    randomness); ``noise`` is :math:`z`, shaped like ``velocity``."""
    half = 0.5 * step_size
    velocity = _axpy(half, first_force(position), velocity)
    position = _axpy(half, velocity, position)
    decay = jnp.exp(-friction * step_size)
    velocity = jax.tree.map(lambda v, z: decay * v + jnp.sqrt(1.0 - decay**2) * z, velocity, noise)
    position = _axpy(half, velocity, position)
    return position, _axpy(half, second_force(position), velocity)
