r"""Step-size adaptation by dual averaging (Hoffman & Gelman 2014, "The No-U-Turn Sampler",
JMLR 15, Sec. 3.2.1 and Alg. 5, after Nesterov 2009, "Primal-dual subgradient methods for
convex problems", Math. Program. 120).

To reach a mean acceptance probability :math:`\delta`, the statistic
:math:`H_m = \delta - \alpha_m` (the target minus the acceptance probability of step
:math:`m`) is driven to zero in expectation by dual averaging on :math:`x = \log\epsilon`,
shrunk towards :math:`\mu = \log(10\,\epsilon_0)`:

.. math:: \bar H_m = \Big(1 - \frac{1}{m + t_0}\Big)\bar H_{m-1} + \frac{H_m}{m + t_0},
          \qquad \log\epsilon_m = \mu - \frac{\sqrt m}{\gamma}\bar H_m,

with the paper's :math:`\gamma = 0.05`, :math:`t_0 = 10`, :math:`\kappa = 0.75`.  Step
:math:`m` runs the kernel with :math:`\epsilon_{m-1}`.  The iterates are noisy; the step size
kept after :math:`M` steps is their weighted average :math:`\bar\epsilon_M`,

.. math:: \log\bar\epsilon_m = m^{-\kappa}\log\epsilon_{m-1}
          + (1 - m^{-\kappa})\log\bar\epsilon_{m-1}, \qquad \bar\epsilon_0 = 1.

The recursion is BlackJAX's (:func:`blackjax.optimizers.dual_averaging.dual_averaging`),
whose average runs over the step sizes the kernel was run with,
:math:`\epsilon_0, \dots, \epsilon_{M-1}`; Hoffman & Gelman's Alg. 5 averages
:math:`\epsilon_1, \dots, \epsilon_M`, one iterate later, with the same weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int, check_key, check_positive
from shufflesgd.drivers import scan_steps
from shufflesgd.mcmc.base import SamplingAlgorithm


def adapt_step_size(
    kernel: SamplingAlgorithm,
    key: jax.Array,
    state: Any,
    initial_step_size: float,
    num_steps: int,
    target: float = 0.8,
    **hyper: Any,
) -> tuple[Any, jax.Array]:
    r"""Run ``num_steps`` of ``kernel`` (step ``t`` with key ``fold_in(key, t)`` and step size
    :math:`\epsilon_t`, other hyper-parameters ``**hyper``) while dual averaging tunes
    :math:`\epsilon` towards the mean acceptance ``target`` :math:`\delta`, from
    :math:`\epsilon_0` = ``initial_step_size``; return the final chain state and the adapted
    step size :math:`\bar\epsilon` (see the module docstring)."""
    check_key("key", key)
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must lie in (0, 1), got target={target}")
    num_steps = check_int("num_steps", num_steps)
    check_positive("initial_step_size", initial_step_size)
    # Imported here: importing blackjax starts JAX's backend (it evaluates jnp.log(2.0) at
    # import), which must wait for parallel.initialize_distributed in a multi-process run.
    from blackjax.optimizers.dual_averaging import DualAveragingState, dual_averaging

    da_init, da_update, da_final = dual_averaging(t0=10, gamma=0.05, kappa=0.75)

    Carry = tuple[Any, DualAveragingState]

    def adapt(key: jax.Array, carry: Carry) -> tuple[Carry, None]:
        chain_state, da = carry
        chain_state, info = kernel.step(key, chain_state, jnp.exp(da.log_x), **hyper)
        return (chain_state, da_update(da, target - info.acceptance_rate)), None

    (state, da), _ = scan_steps(adapt, key, (state, da_init(initial_step_size)), num_steps)
    return state, da_final(da)
