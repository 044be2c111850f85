r"""The kernel protocol of the MCMC family, in the manner of BlackJAX (Cabezas, Corenflos,
Lao, Louf et al. 2024, "BlackJAX: Composable Bayesian inference in JAX", arXiv:2402.10797).

A kernel is a :class:`SamplingAlgorithm`, an ``(init, step)`` pair built from a log-density
:math:`\log\pi` (static, unnormalised):

* ``init(position) -> state``;
* ``step(key, state, *hyper) -> (state, info)``, a Markov transition that leaves
  :math:`\pi` invariant (or approximately so, for unadjusted kernels), the PRNG key first
  and the hyper-parameters (step size, mass, friction, ...) as possibly traced arguments, so
  that one compiled program serves a ``vmap``-ped sweep over them.

Positions are pytrees; many chains are ``jax.vmap`` over keys and initial positions.  Kernels
that use gradients carry them in a :class:`GradientState`, so that a rejected proposal costs
no new evaluation, and every ``info`` is an :class:`MCMCInfo` (acceptance probability,
acceptance, gradient evaluations, energy error, finiteness of the new state), so that drivers
never look inside a kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from shufflesgd._checks import check_float_array

PyTree = Any


LogDensity = Callable[[PyTree], jax.Array]


class SamplingAlgorithm(NamedTuple):
    """``init(position) -> state`` and ``step(key, state, *hyper) -> (state, info)``."""

    init: Callable[[PyTree], Any]
    step: Callable[..., tuple[Any, Any]]


class GradientState(NamedTuple):
    """Position with its log-density and gradient (so a rejected move costs nothing)."""

    position: PyTree
    logdensity: jax.Array
    logdensity_grad: PyTree


class MCMCInfo(NamedTuple):
    """Per-step diagnostics.

    Attributes:
      acceptance_rate: the Metropolis–Hastings acceptance probability (1 for unadjusted
        kernels).
      is_accepted: whether the proposal was taken.
      num_grad_evals: gradient evaluations spent by this step.
      energy_error: the change of the Hamiltonian (HMC; 0 elsewhere).
      is_finite: whether the state after the step is finite (every entry of its position and
        of whatever else it carries: log-density and gradient, momentum, running sums).  The
        Metropolis-adjusted kernels (MALA, HMC) reject a non-finite proposal, so their chain
        stays finite from a finite start; the unadjusted ones (ULA, SGLD, SGHMC, walk–jump,
        the chain of log-concave chains, Föllmer) diverge when the step is too large for the
        target's curvature (ULA on a :math:`L`-smooth target needs :math:`h < 2/L`), and
        ``is_finite`` turns ``False`` at the first step that overflows.
        :func:`shufflesgd.mcmc.first_nonfinite_step` finds that step in a run's infos.
    """

    acceptance_rate: jax.Array
    is_accepted: jax.Array
    num_grad_evals: jax.Array
    energy_error: jax.Array
    is_finite: jax.Array


def _value_and_grad(logdensity_fn: LogDensity, position: PyTree) -> GradientState:
    value, grad = jax.value_and_grad(logdensity_fn)(position)
    return GradientState(position, value, grad)


def check_logdensity(logdensity_fn: LogDensity, position: PyTree) -> None:
    """``TypeError`` unless ``position`` is floating (a pytree of float arrays: gradients need
    it); ``ValueError`` unless ``logdensity_fn(position)`` is a real scalar, or when it cannot
    be evaluated at a position of that shape (checked by shape only, with ``jax.eval_shape``,
    before anything compiles)."""
    check_float_array("position", position)
    try:
        out = jax.eval_shape(logdensity_fn, position)
    except (TypeError, ValueError, IndexError) as error:
        shapes = jax.tree.map(lambda leaf: tuple(jnp.shape(leaf)), position)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"logdensity_fn cannot be evaluated at position of shape {shapes}: {first}"
        ) from error
    if out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(
            f"logdensity_fn must return a real scalar, got shape {out.shape} and dtype {out.dtype}"
        )


def _normal_like(key: jax.Array, tree: PyTree) -> PyTree:
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def _axpy(a: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(lambda u, v: a * u + v, x, y)


def _all_finite(*trees: PyTree) -> jax.Array:
    """Whether every entry of every leaf of ``trees`` is finite (``None`` leaves are skipped)."""
    leaves = jax.tree.leaves(trees)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def _info(acceptance: Any, accepted: Any, grads: int, finite: Any, energy: Any = 0.0) -> MCMCInfo:
    return MCMCInfo(
        jnp.asarray(acceptance),
        jnp.asarray(accepted),
        jnp.asarray(grads, jnp.int32),
        jnp.asarray(energy),
        jnp.asarray(finite),
    )
