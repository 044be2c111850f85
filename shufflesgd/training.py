r"""One jitted SGD driver for finite sums, fed by any shuffling scheme and optax optimizer.

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
import numpy as np
import optax

from shufflesgd.problems import FiniteSum
from shufflesgd.shuffling import ShufflingScheme, check_batch_size, minibatches

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
    """Raise ``ValueError`` for a negative or non-finite learning rate (no-op on tracers)."""
    if isinstance(learning_rate, jax.core.Tracer):
        return
    values = np.asarray(learning_rate, dtype=float)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"learning_rate must be finite and non-negative, got {learning_rate!r}")


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
    if isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs <= 0:
        raise ValueError(f"num_epochs must be a positive int, got num_epochs={num_epochs!r}")
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
