r"""Jitted drivers: shuffling SGD on finite sums, and compressed methods on distributed sums.

:func:`make_sgd_run` closes over the static choices (problem structure, scheme, number of
epochs, batch size, optimizer family) and returns a pure function
``run(key, x0, learning_rate) -> SGDResult``: ``lax.scan`` over epochs, and inside each
epoch ``lax.scan`` over the minibatches of the scheme's order.  The learning rate is a
traced argument, so ``jax.vmap(run, in_axes=(0, None, 0))`` sweeps seeds and step sizes
in one compiled program.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from shufflesgd._checks import check_int, check_positive_finite
from shufflesgd.error_feedback import ErrorFeedback
from shufflesgd.problems import DistributedSum, FiniteSum
from shufflesgd.shuffling import (
    ShufflingScheme,
    check_batch_size,
    make_scheme,
    minibatches,
)

PyTree = Any
OptimizerFactory = Callable[[jax.Array], optax.GradientTransformation]


class SGDResult(NamedTuple):
    """What one run returns.

    Attributes:
      params: the final iterate.
      suboptimality: ``f(x_k) - f*`` after each epoch, shape ``[num_epochs]``.
      grad_norm_sq: ``||∇f(x_k)||^2`` after each epoch, shape ``[num_epochs]``.
      diverged_epoch: the first epoch (0-based) whose iterate is not finite, or ``-1``.
    """

    params: jax.Array
    suboptimality: jax.Array
    grad_norm_sq: jax.Array
    diverged_epoch: jax.Array


def first_nonfinite(values: jax.Array) -> jax.Array:
    """Index of the first non-finite entry along the last axis, or ``-1`` if all are finite."""
    bad = ~jnp.isfinite(values)
    return jnp.where(bad.any(axis=-1), jnp.argmax(bad, axis=-1), -1)


def check_learning_rate(learning_rate: Any) -> None:
    """Raise ``ValueError`` for a learning rate that is not positive and finite (no-op on tracers)."""
    check_positive_finite(learning_rate=learning_rate)


def make_sgd_run(
    problem: FiniteSum,
    scheme: ShufflingScheme,
    *,
    num_epochs: int,
    batch_size: int = 1,
    drop_remainder: bool = False,
    optimizer: OptimizerFactory = optax.sgd,
) -> Callable[[jax.Array, jax.Array, jax.Array], SGDResult]:
    r"""Build ``run(key, x0, learning_rate) -> SGDResult`` for shuffling SGD on ``problem``.

    Each step takes the minibatch :math:`B` of the current epoch order and applies
    ``optimizer(learning_rate)`` to :math:`\frac{1}{|B|}\sum_{i\in B}\nabla f_i(x)`
    (plain SGD :math:`x \leftarrow x - \eta g` by default).  Schemes that herd (GraB) are
    fed each example's gradient at the current iterate through ``scheme.observe``.
    ``optimizer`` is any factory from a (traced) learning rate to an optax transform,
    e.g. ``optax.sgd``, ``optax.adam`` or ``lambda lr: optax.sgd(schedule(lr))``.

    All arguments are validated here, before anything is traced; ``run`` checks a
    concrete ``learning_rate`` (a traced one is the caller's to check, with
    :func:`check_learning_rate`, before the sweep is compiled).
    """
    if scheme.num_examples != problem.num_examples:
        raise ValueError(
            f"scheme is over {scheme.num_examples} examples but problem has {problem.num_examples}"
        )
    num_epochs = check_int("num_epochs", num_epochs)
    check_batch_size(scheme.epoch_length, batch_size, drop_remainder)
    if not callable(optimizer):
        raise TypeError("optimizer must be a callable learning_rate -> optax.GradientTransformation")

    def minibatch_gradient(x: jax.Array, batch: jax.Array, scheme_state: PyTree):
        if not scheme.uses_gradients:
            return jax.grad(lambda p: jnp.mean(problem.component_losses(p, batch)))(x), scheme_state
        grads = jax.vmap(jax.grad(problem.component_loss), in_axes=(None, 0))(
            x, problem.examples(batch)
        )

        def observe(state: PyTree, item: tuple[jax.Array, PyTree]) -> tuple[PyTree, None]:
            return scheme.observe(state, *item), None

        scheme_state, _ = jax.lax.scan(observe, scheme_state, (batch, grads))
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), scheme_state

    def run(key: jax.Array, x0: jax.Array, learning_rate: jax.Array) -> SGDResult:
        check_learning_rate(learning_rate)
        opt = optimizer(learning_rate)

        def step(carry, batch):
            x, opt_state, scheme_state = carry
            grad, scheme_state = minibatch_gradient(x, batch, scheme_state)
            updates, opt_state = opt.update(grad, opt_state, x)
            return (optax.apply_updates(x, updates), opt_state, scheme_state), None

        def epoch(carry, _):
            x, opt_state, scheme_state = carry
            scheme_state, order = scheme.next_epoch(scheme_state)
            batches = minibatches(order, batch_size, drop_remainder)
            (x, opt_state, scheme_state), _ = jax.lax.scan(
                step, (x, opt_state, scheme_state), batches
            )
            gradient = problem.gradient(x)
            metrics = (problem.suboptimality(x), optax.tree.norm(gradient, squared=True))
            return (x, opt_state, scheme_state), metrics

        carry = (x0, opt.init(x0), scheme.init(key, x0))
        (x, _, _), (subopt, grad_norm_sq) = jax.lax.scan(epoch, carry, length=num_epochs)
        return SGDResult(x, subopt, grad_norm_sq, first_nonfinite(subopt))

    return run


def theory_step_size(problem: FiniteSum, num_epochs: int, c: float = 2.0) -> float:
    r"""The step size :math:`\eta = c \log(nK) / (\mu n K)` of the shuffling-SGD analyses.

    Mishchenko, Khaled, Richtárik (2020), Cor. 1; Lu, Guo, De Sa (2022), Thm. 2.  With
    :math:`c \ge 1` the initial distance is contracted by :math:`(nK)^{-c}`; the
    analyses need :math:`\eta \le 1/L`, i.e. :math:`K \gtrsim c\,\kappa \log(nK)/n`.
    """
    n = problem.num_examples
    return float(c * jnp.log(n * num_epochs) / (problem.mu * n * num_epochs))


class DistributedResult(NamedTuple):
    """What one compressed distributed run returns (per-step arrays of length ``num_steps``).

    Attributes:
      params: the final model.
      grad_norm_sq: ``||∇f(x_t)||^2`` after each step.
      suboptimality: ``f(x_t) - f*`` after each step.
      distance_sq: ``||x_t - x*||^2`` after each step.
      bits_up: cumulative bits sent per worker (uplink) after each step.
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
    scheme: str = "random_reshuffle",
) -> Callable[[jax.Array, jax.Array, jax.Array], DistributedResult]:
    r"""Build ``run(key, x0, step_size) -> DistributedResult`` for a compressed method.

    Each step the ``n`` workers evaluate their gradients at the model ``state.x`` and
    ``method.step`` compresses, aggregates and updates.  With ``batch_size=None`` the
    workers use full local gradients; otherwise each worker takes minibatches of
    ``batch_size`` of its ``m`` examples in the order of its own shuffling ``scheme``
    (any non-herding scheme of :mod:`shufflesgd.shuffling`), which makes EF21 into
    EF21-SGD; ``num_steps`` must then be whole epochs of ``m / batch_size`` steps.
    Step ``t`` uses ``fold_in(key, t)``, so the randomness does not depend on how the
    loop is split.  The step size is a traced argument.
    """
    num_steps = check_int("num_steps", num_steps)
    m = problem.examples_per_worker
    if batch_size is None:
        steps_per_epoch, local_scheme = 1, None
    else:
        steps_per_epoch = check_batch_size(m, batch_size)
        local_scheme = make_scheme(scheme, m)
        if local_scheme.uses_gradients:
            raise ValueError(f"scheme={scheme!r} herds gradients; use a non-herding scheme for EF21-SGD")
    if num_steps % steps_per_epoch:
        raise ValueError(
            f"num_steps={num_steps} must be a multiple of the {steps_per_epoch} steps of a local epoch"
        )
    n = problem.num_workers

    def run(key: jax.Array, x0: jax.Array, step_size: jax.Array) -> DistributedResult:
        check_learning_rate(step_size)
        init_key, order_key, step_key = jax.random.split(key, 3)
        state = method.init(init_key, x0, n)

        def one_step(state, inputs):
            t, indices = inputs
            grads = problem.worker_gradients(state.x, indices)
            state, info = method.step(state, grads, jax.random.fold_in(step_key, t), step_size)
            metrics = (optax.tree.norm(problem.gradient(state.x), squared=True),
                       problem.suboptimality(state.x),
                       optax.tree.norm(optax.tree.sub(state.x, problem.x_star), squared=True),
                       info.bits_up, info.bits_down)
            return state, metrics

        def epoch(carry, first_step):
            state, orders = carry
            steps = first_step + jnp.arange(steps_per_epoch)
            orders, epoch_orders = jax.vmap(local_scheme.next_epoch)(orders)
            batches = jnp.swapaxes(jax.vmap(lambda o: minibatches(o, batch_size))(epoch_orders), 0, 1)
            state, metrics = jax.lax.scan(one_step, state, (steps, batches))
            return (state, orders), metrics

        if local_scheme is None:
            state, metrics = jax.lax.scan(one_step, state, (jnp.arange(num_steps), None))
        else:
            orders = jax.vmap(lambda i: local_scheme.init(jax.random.fold_in(order_key, i), None))(jnp.arange(n))
            firsts = jnp.arange(0, num_steps, steps_per_epoch)
            (state, _), metrics = jax.lax.scan(epoch, (state, orders), firsts)
            metrics = jax.tree.map(lambda v: v.reshape(num_steps), metrics)
        grad_norm_sq, subopt, distance_sq, bits_up, bits_down = metrics
        return DistributedResult(state.x, grad_norm_sq, subopt, distance_sq, jnp.cumsum(bits_up),
                                 jnp.cumsum(bits_down), first_nonfinite(grad_norm_sq))

    return run
