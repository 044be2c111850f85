r"""Compressed distributed runs: an error-feedback method on a distributed sum, jitted.

:func:`make_distributed_run` closes over the static choices (problem, method, number of
steps, minibatch size, local shuffling scheme) and returns a pure function
``run(key, x0, step_size, *hyper) -> DistributedResult``: ``lax.scan`` over the steps of
:math:`x_{t+1} = \mathrm{step}(x_t, [\nabla f_i(x_t)]_i)` (or of local minibatch gradients in
the order of each worker's shuffling scheme, EF21-SGD), recording
:math:`\|\nabla f(x_t)\|^2`, :math:`f(x_t) - f^\star`, :math:`\|x_t - x^\star\|^2` and the bits
sent.  The step size and the method's hyper-parameters are traced arguments, so
``jax.vmap`` sweeps seeds, step sizes, EF21-W weights or EF21-PP participation in one
compiled program.  :mod:`shufflesgd.compression.sharded` runs the same program with the
workers spread over a mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from shufflesgd._checks import check_int, check_key, check_like
from shufflesgd.compression.error_feedback import ErrorFeedback
from shufflesgd.drivers import (
    check_batch_size,
    check_learning_rate,
    first_nonfinite,
    scan_epochs,
    scan_steps,
)
from shufflesgd.problems.distributed_sums import DistributedSum
from shufflesgd.shuffling.schemes import ShufflingScheme, random_reshuffle

PyTree = Any


class DistributedResult(NamedTuple):
    """What one compressed distributed run returns (per-step arrays of length ``num_steps``).

    Attributes:
      params: the final model.
      grad_norm_sq: ``||∇f(x_t)||^2`` after each step.
      suboptimality: ``f(x_t) - f*`` after each step.
      distance_sq: ``||x_t - x*||^2`` after each step.
      bits_up: cumulative bits sent per worker (uplink) after each step, counting from the
        messages that gave the server the workers' starting memory
        (the method's ``initial_bits``, zero by default).
      bits_down: cumulative bits broadcast by the server after each step.
      diverged_step: the first step (0-based) at which ``||∇f(x_t)||^2`` is not finite
        (the model or its gradient overflowed), or ``-1``.
    """

    params: jax.Array
    grad_norm_sq: jax.Array
    suboptimality: jax.Array
    distance_sq: jax.Array
    bits_up: jax.Array
    bits_down: jax.Array
    diverged_step: jax.Array


def make_distributed_run(
    problem: DistributedSum,
    method: ErrorFeedback,
    *,
    num_steps: int,
    batch_size: int | None = None,
    scheme: ShufflingScheme | None = None,
) -> Callable[..., DistributedResult]:
    r"""Build ``run(key, x0, step_size, *hyper) -> DistributedResult`` for a compressed method.

    ``hyper`` are the method's hyper-parameters after the step size, named by
    ``method.hyper`` (EF21-W's ``weights``, EF21-PP's ``participation``; none for the
    others): ``run(key, x0, step_size, weights)``.  ``init`` gets the workers' full local
    gradients at ``x0`` (for a method that starts its memory from them, otherwise unused).
    Each step the ``n`` workers evaluate their gradients at the model ``state.x`` and
    ``method.step`` compresses, aggregates and updates.  With ``batch_size=None`` the
    workers use full local gradients; otherwise each worker takes minibatches of
    ``batch_size`` of its ``m`` examples in the order of its own copy of ``scheme``, a
    non-herding :class:`~shufflesgd.shuffling.schemes.ShufflingScheme` over the ``m`` examples
    (random reshuffling, ``shufflesgd.shuffling.random_reshuffle(m)``, by default), which
    makes EF21 into EF21-SGD; ``num_steps`` must then be whole epochs of
    ``epoch_length / batch_size`` steps.  The loops are :func:`shufflesgd.drivers.scan_steps`
    and :func:`shufflesgd.drivers.scan_epochs`: ``key`` is split into the method's, the
    orders' and the steps' keys; step ``t`` uses ``fold_in(step_key, t)`` and worker ``i``'s
    epoch ``k`` the order drawn with ``fold_in(fold_in(order_key, i), k)``, so the randomness
    does not depend on how the loop is split.  The step size and ``hyper`` are
    traced arguments, so one compiled program serves a ``vmap`` over them; concrete values
    are checked before anything runs (``drivers.check_learning_rate``, ``method.check``, as
    are ``key``, a PRNG key, and ``x0``, a float array shaped like ``problem.x_star``),
    traced ones are the caller's to check.
    """
    num_steps = check_int("num_steps", num_steps)
    m = problem.examples_per_worker
    if batch_size is None:
        if scheme is not None:
            raise ValueError(
                "scheme needs a batch_size: with batch_size=None the workers use full local "
                "gradients"
            )
        steps_per_epoch = 1
    else:
        scheme = random_reshuffle(m) if scheme is None else scheme
        if scheme.num_examples != m:
            raise ValueError(
                f"scheme is over {scheme.num_examples} examples but each worker holds m={m}"
            )
        if scheme.uses_gradients:
            raise ValueError("scheme herds gradients (GraB); use a non-herding scheme for EF21-SGD")
        steps_per_epoch = check_batch_size(scheme.epoch_length, batch_size)
    if num_steps % steps_per_epoch:
        raise ValueError(
            f"num_steps={num_steps} must be a multiple of the {steps_per_epoch} steps "
            "of a local epoch"
        )
    n = problem.num_workers

    def run(key: jax.Array, x0: jax.Array, step_size: jax.Array, *hyper: Any) -> DistributedResult:
        check_key("key", key)
        check_like("x0", x0, problem.x_star, "problem.x_star")
        try:
            check_learning_rate(step_size)
        except ValueError as error:
            raise ValueError(f"step_size is the run's learning rate: {error}") from None
        method.check(n, *hyper)
        init_key, order_key, step_key = jax.random.split(key, 3)
        state = method.init(init_key, x0, n, problem.worker_gradients(x0), *hyper)

        def one_step(key, state, indices):
            grads = problem.worker_gradients(state.x, indices)
            state, info = method.step(key, state, grads, step_size, *hyper)
            metrics = (
                optax.tree.norm(problem.gradient(state.x), squared=True),
                problem.suboptimality(state.x),
                optax.tree.norm(optax.tree.sub(state.x, problem.x_star), squared=True),
                info.bits_up,
                info.bits_down,
            )
            return state, metrics

        if scheme is None:
            state, metrics = scan_steps(
                lambda key, state: one_step(key, state, None), step_key, state, num_steps
            )
        else:
            scheme_keys = jax.vmap(lambda i: jax.random.fold_in(order_key, i))(jnp.arange(n))
            scheme_state = jax.vmap(scheme.init, in_axes=(0, None))(scheme_keys, None)
            state, _, metrics = scan_epochs(
                lambda key, state, indices: (*one_step(key, state, indices), None),
                scheme,
                scheme_keys,
                step_key,
                state,
                scheme_state,
                num_steps // steps_per_epoch,
                batch_size=batch_size,
            )
        grad_norm_sq, subopt, distance_sq, bits_up, bits_down = metrics
        return DistributedResult(
            state.x,
            grad_norm_sq,
            subopt,
            distance_sq,
            method.initial_bits(x0) + jnp.cumsum(bits_up),
            jnp.cumsum(bits_down),
            first_nonfinite(grad_norm_sq),
        )

    return run
