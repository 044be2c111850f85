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

Divergence is reported, not hidden: every kernel's info says whether the state after the step
is finite (:attr:`~shufflesgd.mcmc.base.MCMCInfo.is_finite`), both runners keep that flag for
every step, and :func:`first_nonfinite_step` reads the first step :math:`t` whose state is not
finite (``-1`` when the whole run is), in the numbering of the keys above.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_key
from shufflesgd.drivers import check_batch_size, first_nonfinite, scan_epochs, scan_steps
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
    bit for bit either way.  With ``record="epoch"`` the infos are the epoch's last step's,
    except ``is_finite``, which keeps every step's flag (shape ``[num_epochs,
    steps_per_epoch]``, one byte a step), so that :func:`first_nonfinite_step` still finds
    the exact step where the chain diverged.  Raises ``ValueError`` naming ``record``,
    ``batch_size`` or ``scheme`` (a herding scheme: the kernel gives no per-example
    gradients) and ``TypeError`` naming ``key`` before tracing.
    """
    check_key("key", key)
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
        last = jax.tree.map(lambda a: a[-1], infos)
        return chain_state.position, last._replace(is_finite=infos.is_finite)

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
    positions after every step (leading axis ``num_steps``) and the per-step infos
    (``first_nonfinite_step(infos)`` is the first step whose state is not finite).  Raises
    ``TypeError`` naming ``key`` and ``ValueError`` naming ``num_steps`` before tracing."""
    check_key("key", key)

    def step(key: jax.Array, chain_state: Any) -> tuple[Any, tuple[PyTree, MCMCInfo]]:
        chain_state, info = kernel.step(key, chain_state, *hyper)
        return chain_state, (chain_state.position, info)

    state, (positions, infos) = scan_steps(step, key, state, num_steps)
    return state, positions, infos


def first_nonfinite_step(infos: MCMCInfo) -> jax.Array:
    """The first step whose state is not finite, or ``-1`` when every step's is: the first
    ``False`` of ``infos.is_finite`` along the step axis
    (:func:`shufflesgd.drivers.first_nonfinite`), for the infos of :func:`run_chain` or
    :func:`run_minibatch_chain` (either ``record``).  Steps count from 0 as the keys do
    (step ``t`` drew from ``fold_in(key, t)``).  Leading axes (chains ``vmap``-ped together)
    are kept: the result has shape ``infos.num_grad_evals.shape[:-1]``.
    """
    finite = jnp.asarray(infos.is_finite)
    if finite.ndim == jnp.ndim(infos.num_grad_evals) + 1:  # record="epoch": [..., epochs, S]
        finite = finite.reshape(finite.shape[:-2] + (-1,))
    return first_nonfinite(jnp.where(finite, 0.0, jnp.inf))
