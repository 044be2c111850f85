r"""Cyclical stochastic-gradient MCMC: cSGLD and cSGHMC with the cosine step-size cycles of
Zhang, Li, Zhang, Chen & Wilson (2020), "Cyclical Stochastic Gradient MCMC for Bayesian Deep
Learning", ICLR.

A run of :math:`K` steps is cut into :math:`M` cycles of :math:`C = \lceil K/M\rceil` steps.
Step :math:`t = 0, 1, \dots` (the paper's :math:`k = t + 1`) has the cycle fraction and the
step size of their Eq. 1,

.. math:: r(t) = \frac{\operatorname{mod}(t, C)}{C}, \qquad
          h_t = \frac{h_0}{2}\bigl[\cos(\pi\, r(t)) + 1\bigr],

so each cycle starts at :math:`h_0` and decays to nearly 0; beyond :math:`K` the schedule
simply repeats.  Their Algorithm 1 splits each cycle at a proportion :math:`\beta`: while
:math:`r(t) < \beta` (exploration) the step is the optimiser's, without noise, and once
:math:`r(t) \ge \beta` (sampling) it is the SG-MCMC step, whose draws are the ones kept.  The
kernels report which stage a step was in (:attr:`CyclicalInfo.is_sampling`), so a driver keeps
the positions of sampling steps only.

Scaling.  With :math:`\hat g` an unbiased estimate of :math:`\nabla\log\pi = -\nabla U`
(:data:`~shufflesgd.mcmc.stochastic_gradient.GradientEstimator`), cSGLD is the library's
:func:`~shufflesgd.mcmc.sgld`, :math:`x' = x + h_t\hat g(x) + \sqrt{2h_t}\,z`, which is the
paper's SGLD :math:`\theta_k = \theta_{k-1} - \alpha_k\nabla\tilde U(\theta_{k-1}) +
\sqrt{2\alpha_k}\,\xi_k` with :math:`\alpha_k = h_t` (Welling & Teh's :math:`\epsilon` is
:math:`2h`).  cSGHMC is the Euler SGHMC of :func:`~shufflesgd.mcmc.sghmc` with unit mass and
friction :math:`\gamma`; in the momentum form of Chen, Fox & Guestrin (2014, Eq. 15),
:math:`u = h v`, :math:`u' = (1 - \alpha)u - \eta\nabla\tilde U +
\sqrt{2\alpha\eta}\,z`, :math:`\theta' = \theta + u'`, this is learning rate
:math:`\eta = h^2` and momentum decay :math:`\alpha = \gamma h` (exactly so while
:math:`h` is constant).

The step counter lives in the state (:class:`CyclicalState`), not in the arguments, so the
kernels run under the library's drivers (:func:`~shufflesgd.mcmc.run_chain`,
:func:`~shufflesgd.mcmc.run_minibatch_chain`) that pass the same hyper-parameters to every
step, and a run resumed from a saved state continues the schedule where it stopped.  The
counts :math:`K, M` fix the schedule's shape and are static (given to the kernel's factory);
:math:`h_0`, :math:`\beta` and :math:`\gamma` are traced step arguments, so one compiled
program serves a ``vmap``-ped sweep over them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shufflesgd._checks import (
    check_float_array,
    check_int,
    check_key,
    check_positive,
    is_concrete,
)
from shufflesgd.mcmc.base import SamplingAlgorithm, _all_finite, _axpy, _info, _normal_like
from shufflesgd.mcmc.stochastic_gradient import GradientEstimator

PyTree = Any


class CyclicalState(NamedTuple):
    """Position, momentum (``None`` for cSGLD) and the number of steps taken so far."""

    position: PyTree
    momentum: PyTree
    count: jax.Array


class CyclicalInfo(NamedTuple):
    """The fields of :class:`~shufflesgd.mcmc.base.MCMCInfo` (acceptance 1, one gradient a
    step), plus the stage and step size of the step.

    Attributes:
      is_sampling: whether the step was a sampling step (:math:`r(t) \\ge \\beta`): keep its
        position as a draw; an exploration step's position is an optimiser iterate.
      step_size: :math:`h_t`, the step size the step used.
    """

    acceptance_rate: jax.Array
    is_accepted: jax.Array
    num_grad_evals: jax.Array
    energy_error: jax.Array
    is_finite: jax.Array
    is_sampling: jax.Array
    step_size: jax.Array


def _cycle_length(num_steps: int, num_cycles: int) -> int:
    num_steps = check_int("num_steps", num_steps)
    num_cycles = check_int("num_cycles", num_cycles)
    if num_cycles > num_steps:
        raise ValueError(
            f"num_cycles must not exceed num_steps, got num_cycles={num_cycles} "
            f"and num_steps={num_steps}"
        )
    return -(-num_steps // num_cycles)


def _check_step(step: Any) -> jax.Array:
    step = jnp.asarray(step)
    if not jnp.issubdtype(step.dtype, jnp.integer):
        raise TypeError(f"step must be an integer array, got step of dtype {step.dtype}")
    if is_concrete(step) and np.any(np.asarray(step) < 0):
        raise ValueError(f"step must be non-negative, got step={step!r}")
    return step


def _check_fraction(exploration_fraction: Any) -> None:
    if is_concrete(exploration_fraction):
        value = np.asarray(exploration_fraction)
        if not np.all((value >= 0) & (value <= 1)):
            raise ValueError(
                f"exploration_fraction must lie in [0, 1], "
                f"got exploration_fraction={exploration_fraction!r}"
            )


def cycle_fraction(step: jax.Array, num_steps: int, num_cycles: int) -> jax.Array:
    r"""The position within its cycle of step ``step`` (counted from 0), Zhang et al. (2020),
    Algorithm 1: :math:`r = \operatorname{mod}(t, C)/C \in [0, 1)` with
    :math:`C = \lceil K/M\rceil`, :math:`K` = ``num_steps`` and :math:`M` = ``num_cycles``.

    ``step`` is an integer array (traced or not, any shape); the counts are static Python
    ints with ``1 <= num_cycles <= num_steps``.  Raises ``ValueError`` naming ``num_steps``,
    ``num_cycles`` or a negative ``step`` and ``TypeError`` naming a non-integer ``step``.
    """
    length = _cycle_length(num_steps, num_cycles)
    step = _check_step(step)
    return jnp.mod(step, length) / length


def cyclical_step_size(
    step: jax.Array, initial_step_size: jax.Array, num_steps: int, num_cycles: int
) -> jax.Array:
    r"""The cosine cyclical step size of Zhang et al. (2020), Eq. 1, at step ``step``
    (counted from 0, the paper's :math:`k - 1`):

    .. math:: h_t = \frac{h_0}{2}\bigl[\cos(\pi\,r(t)) + 1\bigr], \qquad
              r(t) = \frac{\operatorname{mod}(t, \lceil K/M\rceil)}{\lceil K/M\rceil}.

    It is :math:`h_0` at the start of each cycle, :math:`h_0/2` half-way and periodic with
    period :math:`\lceil K/M\rceil`.  ``initial_step_size`` :math:`h_0` may be traced; see
    :func:`cycle_fraction` for ``step`` and the counts.  Raises ``ValueError`` naming a
    non-positive ``initial_step_size``.
    """
    check_positive("initial_step_size", initial_step_size)
    r = cycle_fraction(step, num_steps, num_cycles)
    return 0.5 * initial_step_size * (jnp.cos(jnp.pi * r) + 1.0)


def _stage(
    count: jax.Array,
    initial_step_size: jax.Array,
    exploration_fraction: jax.Array,
    num_steps: int,
    num_cycles: int,
) -> tuple[jax.Array, jax.Array]:
    """The step size and whether the step samples (``r >= beta``) at step ``count``."""
    step_size = cyclical_step_size(count, initial_step_size, num_steps, num_cycles)
    sampling = cycle_fraction(count, num_steps, num_cycles) >= exploration_fraction
    return step_size, sampling


def _init(position: PyTree, momentum: PyTree) -> CyclicalState:
    return CyclicalState(position, momentum, jnp.zeros((), jnp.int32))


def cyclical_sgld(
    grad_estimator: GradientEstimator, num_steps: int, num_cycles: int
) -> SamplingAlgorithm:
    r"""Cyclical SGLD (Zhang, Li, Zhang, Chen & Wilson 2020, ICLR, Algorithm 1 with SGLD).

    At step :math:`t` with step size :math:`h_t` (:func:`cyclical_step_size`, Eq. 1) and cycle
    fraction :math:`r(t)` (:func:`cycle_fraction`):

    .. math:: x' = x + h_t\,\hat g(x) + \mathbb 1[r(t) \ge \beta]\sqrt{2h_t}\,z,

    gradient ascent on :math:`\log\pi` (SGD on :math:`U`) in the exploration stage
    :math:`r(t) < \beta` and :func:`~shufflesgd.mcmc.sgld` with step :math:`h_t` in the
    sampling stage.  ``num_steps`` :math:`K` and ``num_cycles`` :math:`M` are static;
    ``step(key, state, batch_indices, initial_step_size, exploration_fraction)`` with
    :math:`h_0` and :math:`\beta \in [0, 1]` traced.  One gradient a step; the info is a
    :class:`CyclicalInfo`.  Raises ``ValueError`` naming ``num_steps`` or ``num_cycles`` at
    construction.
    """
    _cycle_length(num_steps, num_cycles)

    def init(position: PyTree) -> CyclicalState:
        check_float_array("position", position)
        return _init(position, None)

    def step(
        key: jax.Array,
        state: CyclicalState,
        batch: jax.Array,
        initial_step_size: jax.Array,
        exploration_fraction: jax.Array,
    ) -> tuple[CyclicalState, CyclicalInfo]:
        check_key("key", key)
        _check_fraction(exploration_fraction)
        step_size, sampling = _stage(
            state.count, initial_step_size, exploration_fraction, num_steps, num_cycles
        )
        drift = _axpy(step_size, grad_estimator(state.position, batch), state.position)
        noise_scale = jnp.where(sampling, jnp.sqrt(2.0 * step_size), 0.0)
        position = _axpy(noise_scale, _normal_like(key, state.position), drift)
        new = CyclicalState(position, None, state.count + 1)
        return new, CyclicalInfo(*_info(1.0, True, 1, _all_finite(position)), sampling, step_size)

    return SamplingAlgorithm(init, step)


def cyclical_sghmc(
    grad_estimator: GradientEstimator, num_steps: int, num_cycles: int
) -> SamplingAlgorithm:
    r"""Cyclical SGHMC (Zhang, Li, Zhang, Chen & Wilson 2020, ICLR, Algorithm 1 with SGHMC).

    Euler SGHMC (Chen, Fox & Guestrin 2014, Eq. 9; :func:`~shufflesgd.mcmc.sghmc`) with unit
    mass, friction :math:`\gamma` and the cyclical step size :math:`h_t` (Eq. 1):

    .. math:: v' = v + h_t\hat g(x) - h_t\gamma v
              + \mathbb 1[r(t) \ge \beta]\sqrt{2\gamma h_t}\,z, \qquad x' = x + h_t v',

    SGD with momentum in the exploration stage :math:`r(t) < \beta` and SGHMC in the sampling
    stage.  ``step(key, state, batch_indices, initial_step_size, exploration_fraction,
    friction)``, all three traced; ``init`` starts at zero momentum.  One gradient a step;
    the info is a :class:`CyclicalInfo`.  Raises ``ValueError`` naming ``num_steps`` or
    ``num_cycles`` at construction.
    """
    _cycle_length(num_steps, num_cycles)

    def init(position: PyTree) -> CyclicalState:
        check_float_array("position", position)
        return _init(position, optax.tree.zeros_like(position))

    def step(
        key: jax.Array,
        state: CyclicalState,
        batch: jax.Array,
        initial_step_size: jax.Array,
        exploration_fraction: jax.Array,
        friction: jax.Array,
    ) -> tuple[CyclicalState, CyclicalInfo]:
        check_key("key", key)
        _check_fraction(exploration_fraction)
        check_positive("friction", friction)
        h, sampling = _stage(
            state.count, initial_step_size, exploration_fraction, num_steps, num_cycles
        )
        x, v, count = state
        noise_scale = jnp.where(sampling, jnp.sqrt(2.0 * friction * h), 0.0)
        v = jax.tree.map(
            lambda v, g, z: v + h * g - h * friction * v + noise_scale * z,
            v,
            grad_estimator(x, batch),
            _normal_like(key, v),
        )
        new = CyclicalState(_axpy(h, v, x), v, count + 1)
        return new, CyclicalInfo(*_info(1.0, True, 1, _all_finite(new)), sampling, h)

    return SamplingAlgorithm(init, step)
