r"""Running an MCMC kernel: a chain of steps, or minibatch epochs in a shuffling scheme's order.

A kernel is an ``(init, step)`` pair (:class:`~shufflesgd.mcmc.base.SamplingAlgorithm`) with
``step(key, state, *hyper) -> (state, info)``.  Both runners here are thin MCMC views of the
drivers of :mod:`shufflesgd.drivers`, which own the loops and the keys:

* :func:`run_chain` -- :func:`shufflesgd.drivers.scan_steps`: step :math:`t` draws from
  :math:`\mathrm{fold\_in}(\text{key}, t)`; the positions after every step are kept.
* :func:`run_minibatch_chain` -- :func:`shufflesgd.drivers.scan_epochs`: a stochastic-gradient
  kernel (SGLD, SGHMC; Welling & Teh 2011, Chen, Fox & Guestrin 2014) whose minibatches
  :math:`B_{k,j}` follow the epoch orders of a non-herding
  :class:`~shufflesgd.shuffling.schemes.ShufflingScheme` (with replacement, random reshuffling,
  single shuffle, FlipFlop, ...), so the gradient noise of an epoch sums to zero for the
  schemes without replacement.

Chains are ``jax.vmap`` over keys and initial positions; positions are pytrees.
"""

from __future__ import annotations

from typing import Any

import jax

from shufflesgd.drivers import check_batch_size, scan_epochs, scan_steps
from shufflesgd.mcmc.base import MCMCInfo, SamplingAlgorithm
from shufflesgd.mcmc.stochastic_gradient import SGState
from shufflesgd.shuffling.schemes import ShufflingScheme

PyTree = Any


def run_minibatch_chain(
    kernel: SamplingAlgorithm,
    key: jax.Array,
    state: SGState,
    scheme: ShufflingScheme,
    num_epochs: int,
    batch_size: int,
    *hyper: Any,
    record: str = "step",
) -> tuple[SGState, PyTree, MCMCInfo]:
    """A stochastic-gradient chain whose minibatches follow a shuffling scheme of
    :mod:`shufflesgd.shuffling`: ``num_epochs`` epochs of ``epoch_length / batch_size`` steps
    of ``kernel.step(key, state, batch, *hyper)``.

    ``key`` is split into the scheme's key (epoch ``k``'s order from ``fold_in(., k)``) and
    the steps' key (step ``t`` draws from ``fold_in(., t)``).  ``record="step"`` returns the
    position and info after every step (leading axis ``num_epochs * steps_per_epoch``);
    ``record="epoch"`` only after each epoch's last step (leading axis ``num_epochs``), which
    keeps memory flat in the chain length: the orders of shuffled schemes are only balanced
    over whole epochs, so that is where their bias is measured.  The chain itself is the same
    bit for bit either way.  Raises ``ValueError`` naming ``record``, ``batch_size`` or
    ``scheme`` (a herding scheme: the kernel gives no per-example gradients) before tracing.
    """
    if record not in ("step", "epoch"):
        raise ValueError(f"record must be 'step' or 'epoch', got record={record!r}")
    check_batch_size(scheme.epoch_length, batch_size)
    if scheme.uses_gradients:
        raise ValueError(
            "scheme herds gradients (GraB); a stochastic-gradient kernel gives no "
            "per-example gradients, so use a non-herding scheme"
        )
    order_key, step_key = jax.random.split(key)

    def step(key: jax.Array, chain_state: SGState, batch: jax.Array) -> tuple[SGState, Any, None]:
        chain_state, info = kernel.step(key, chain_state, batch, *hyper)
        return chain_state, ((chain_state.position, info) if record == "step" else info), None

    def at_epoch_end(chain_state: SGState, infos: MCMCInfo) -> tuple[PyTree, MCMCInfo]:
        return chain_state.position, jax.tree.map(lambda a: a[-1], infos)

    state, _, (positions, infos) = scan_epochs(
        step,
        scheme,
        order_key,
        step_key,
        state,
        scheme.init(order_key, None),
        num_epochs,
        batch_size=batch_size,
        summary=at_epoch_end if record == "epoch" else None,
    )
    return state, positions, infos


def run_chain(
    kernel: SamplingAlgorithm,
    key: jax.Array,
    state: Any,
    num_steps: int,
    *hyper: Any,
) -> tuple[Any, PyTree, MCMCInfo]:
    """``num_steps`` of ``kernel`` with keys ``fold_in(key, t)``: returns the final state, the
    positions after every step (leading axis ``num_steps``) and the per-step infos."""

    def step(key: jax.Array, chain_state: Any) -> tuple[Any, tuple[PyTree, MCMCInfo]]:
        chain_state, info = kernel.step(key, chain_state, *hyper)
        return chain_state, (chain_state.position, info)

    state, (positions, infos) = scan_steps(step, key, state, num_steps)
    return state, positions, infos
