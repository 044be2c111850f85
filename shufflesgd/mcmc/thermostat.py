r"""The stochastic gradient Nosé–Hoover thermostat (SGNHT) of Ding, Fang, Babbush, Chen, Skeel
& Neven (2014), "Bayesian Sampling Using Stochastic Gradient Thermostats", NeurIPS.

SGHMC (:func:`~shufflesgd.mcmc.sghmc`) needs the friction to match the noise it is fed; the
noise of a minibatch gradient :math:`\hat g` is unknown.  SGNHT makes the friction a dynamic
variable :math:`\xi`, a Nosé–Hoover thermostat, driven by the kinetic temperature: in the
continuous dynamics (their Eq. 5, unit mass, :math:`d` coordinates)

.. math:: d\theta = p\,dt, \quad dp = \hat g(\theta)\,dt - \xi p\,dt + \sqrt{2A}\,dW, \quad
          d\xi = \Bigl(\tfrac1d p^\top p - 1\Bigr)dt,

:math:`\xi` grows while :math:`p^\top p/d` exceeds 1 (too hot) and shrinks while it is below.
If the gradient noise adds an unknown diffusion :math:`B` (a scalar, per coordinate) to the
injected :math:`A`, the joint law
:math:`\pi(\theta)\,N(p; 0, I)\,N(\xi; A + B, 1/d)` is invariant: the thermostat settles where
its friction balances all the noise, known or not, and the positions still follow
:math:`\pi`.  With an Euler step of size :math:`h` the gradient noise of covariance
:math:`V` per coordinate contributes :math:`B = hV/2`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from shufflesgd._checks import (
    check_finite,
    check_float_array,
    check_key,
    check_like,
    check_positive,
)
from shufflesgd.mcmc.base import (
    MCMCInfo,
    SamplingAlgorithm,
    _all_finite,
    _axpy,
    _info,
    _normal_like,
)
from shufflesgd.mcmc.stochastic_gradient import GradientEstimator

PyTree = Any


class SGNHTState(NamedTuple):
    """Position :math:`\\theta`, momentum :math:`p` and thermostat :math:`\\xi` (a scalar)."""

    position: PyTree
    momentum: PyTree
    thermostat: jax.Array


def sgnht(grad_estimator: GradientEstimator) -> SamplingAlgorithm:
    r"""SGNHT (Ding, Fang, Babbush, Chen, Skeel & Neven 2014, NeurIPS, Algorithm 2):

    .. math:: p' = p - h\,\xi p + h\,\hat g(\theta) + \sqrt{2Ah}\,z, \qquad
              \theta' = \theta + h\,p', \qquad
              \xi' = \xi + h\Bigl(\tfrac1d\,p'^\top p' - 1\Bigr),

    with :math:`d` the number of entries of the position (all leaves of the pytree together),
    :math:`\hat g` an unbiased estimate of :math:`\nabla\log\pi` from the minibatch
    ``batch_indices`` and :math:`A > 0` the injected diffusion.

    ``init(position, thermostat=1.0, momentum=None)``: the paper starts at
    :math:`p \sim N(0, I)` and :math:`\xi = A`; pass ``momentum`` (shaped like ``position``)
    and ``thermostat=diffusion`` for that start.  The defaults, zero momentum as in
    :func:`~shufflesgd.mcmc.sghmc` and :math:`\xi = 1`, keep the protocol's
    ``init(position)``; the thermostat corrects either start within a transient.
    ``step(key, state, batch_indices, step_size, diffusion)`` with :math:`h` and :math:`A`
    traced; one gradient a step.

    Summing the thermostat's update over :math:`T` steps gives
    :math:`\frac1T\sum_t p_t^\top p_t/d = 1 + (\xi_T - \xi_0)/(Th)`: the time-averaged kinetic
    temperature is 1 exactly, up to the thermostat's drift.
    """

    def init(
        position: PyTree, thermostat: jax.Array = 1.0, momentum: PyTree | None = None
    ) -> SGNHTState:
        check_float_array("position", position)
        check_finite("thermostat", thermostat)
        if momentum is None:
            momentum = optax.tree.zeros_like(position)
        else:
            check_like("momentum", momentum, position, "position")
        dtype = jnp.result_type(*jax.tree.leaves(position))
        return SGNHTState(position, momentum, jnp.asarray(thermostat, dtype))

    def step(
        key: jax.Array,
        state: SGNHTState,
        batch: jax.Array,
        step_size: jax.Array,
        diffusion: jax.Array,
    ) -> tuple[SGNHTState, MCMCInfo]:
        check_key("key", key)
        check_positive("step_size", step_size)
        check_positive("diffusion", diffusion)
        x, p, xi = state
        noise_scale = jnp.sqrt(2.0 * diffusion * step_size)
        p = jax.tree.map(
            lambda p, g, z: p - step_size * xi * p + step_size * g + noise_scale * z,
            p,
            grad_estimator(x, batch),
            _normal_like(key, p),
        )
        leaves = jax.tree.leaves(p)
        kinetic = sum(jnp.sum(leaf**2) for leaf in leaves) / sum(leaf.size for leaf in leaves)
        xi = xi + step_size * (kinetic - 1.0)
        new = SGNHTState(_axpy(step_size, p, x), p, xi)
        return new, _info(1.0, True, 1, _all_finite(new))

    return SamplingAlgorithm(init, step)
