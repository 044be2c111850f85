r"""Stochastic-gradient MCMC: SGLD and SGHMC, whose gradient is an unbiased minibatch estimate.

For a posterior :math:`\log\pi(x) = \log p(x) + \sum_{i=1}^N \log p(y_i \mid x)`, a
:data:`GradientEstimator` returns, for the indices :math:`B` of a minibatch of size
:math:`b`, the unbiased estimate

.. math:: \hat g(x) = \nabla\log p(x) + \frac Nb\sum_{i \in B}\nabla\log p(y_i \mid x),

in place of :math:`\nabla\log\pi`, with the batches drawn by any scheme of
:mod:`shufflesgd.shuffling` (with replacement, random reshuffling, ...).

* SGLD (Welling & Teh 2011, "Bayesian learning via stochastic gradient Langevin dynamics",
  ICML, Eq. 4) is ULA with :math:`\hat g`: :math:`x' = x + h\hat g(x) + \sqrt{2h}\,z`.
* SGHMC (Chen, Fox & Guestrin 2014, "Stochastic gradient Hamiltonian Monte Carlo", ICML)
  is underdamped Langevin dynamics with friction :math:`\gamma` driven by :math:`\hat g`,
  integrated by their Euler scheme (Eq. 9) or by BAOAB (:mod:`shufflesgd.mcmc.integrators`).

Neither has a Metropolis correction: the step size and the gradient noise set the bias.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from shufflesgd._checks import check_float_array, check_key, check_positive
from shufflesgd.mcmc.base import SamplingAlgorithm, _all_finite, _axpy, _info, _normal_like
from shufflesgd.mcmc.integrators import baoab

PyTree = Any


GradientEstimator = Callable[[PyTree, jax.Array], PyTree]
r"""``(position, batch_indices) -> grad_estimate``: an unbiased estimate of
:math:`\nabla\log\pi(\text{position})` from the minibatch ``batch_indices``."""


class SGState(NamedTuple):
    """Position (and momentum, for SGHMC) of a stochastic-gradient chain."""

    position: PyTree
    momentum: PyTree


def sgld(grad_estimator: GradientEstimator) -> SamplingAlgorithm:
    r"""Stochastic gradient Langevin dynamics (Welling & Teh 2011, Eq. 4), in ULA's scaling:
    :math:`x' = x + h\,\hat g(x) + \sqrt{2h}\,z` with :math:`\hat g` an unbiased estimate of
    :math:`\nabla\log\pi` from a minibatch, e.g. :math:`\nabla\log p(x) + \frac{N}{b}
    \sum_{i\in B}\nabla\log p(y_i|x)`.  ``grad_estimator(position, batch_indices)``;
    ``step(key, state, batch_indices, step_size)``; one gradient a step."""

    def init(position: PyTree) -> SGState:
        check_float_array("position", position)
        return SGState(position, None)

    def step(key: jax.Array, state: SGState, batch: jax.Array, step_size: jax.Array):
        check_key("key", key)
        check_positive("step_size", step_size)
        grad = grad_estimator(state.position, batch)
        drift = _axpy(step_size, grad, state.position)
        position = _axpy(jnp.sqrt(2.0 * step_size), _normal_like(key, state.position), drift)
        return SGState(position, None), _info(1.0, True, 1, _all_finite(position))

    return SamplingAlgorithm(init, step)


SGHMC_INTEGRATORS = ("euler", "baoab")


def sghmc(grad_estimator: GradientEstimator, integrator: str = "euler") -> SamplingAlgorithm:
    r"""Stochastic gradient HMC (Chen, Fox, Guestrin 2014), unit mass, friction :math:`\gamma`.

    ``integrator="euler"`` is their Eq. 9 (with :math:`\hat B = 0`):
    :math:`v' = v + h\hat g(x) - h\gamma v + \sqrt{2\gamma h}\,z`, :math:`x' = x + h v'`; one
    gradient a step.  ``integrator="baoab"`` is :func:`baoab`, the symmetric splitting of
    Leimkuhler & Matthews (2013) for underdamped Langevin, both kicks with the same minibatch
    (symmetric in the data as well); two gradients a step.  With exact gradients BAOAB
    samples a Gaussian target's positions exactly.
    ``step(key, state, batch_indices, step_size, friction)``.
    """
    if integrator not in SGHMC_INTEGRATORS:
        raise ValueError(f"integrator must be one of {list(SGHMC_INTEGRATORS)}, got {integrator!r}")

    def init(position: PyTree) -> SGState:
        check_float_array("position", position)
        return SGState(position, optax.tree.zeros_like(position))

    def step(
        key: jax.Array, state: SGState, batch: jax.Array, step_size: jax.Array, friction: jax.Array
    ):
        check_key("key", key)
        check_positive("step_size", step_size)
        check_positive("friction", friction)
        x, v = state
        z = _normal_like(key, v)
        if integrator == "euler":
            v = jax.tree.map(
                lambda v, g, z: (
                    v
                    + step_size * g
                    - step_size * friction * v
                    + jnp.sqrt(2.0 * friction * step_size) * z
                ),
                v,
                grad_estimator(x, batch),
                z,
            )
            new = SGState(_axpy(step_size, v, x), v)
            return new, _info(1.0, True, 1, _all_finite(new))
        force = lambda position: grad_estimator(position, batch)  # noqa: E731
        new = SGState(*baoab(force, force, x, v, z, step_size, friction))
        return new, _info(1.0, True, 2, _all_finite(new))

    return SamplingAlgorithm(init, step)
