r"""Shuffling SGD on a finite sum with a known optimum, one jitted program per sweep.

:func:`make_sgd_run` closes over the static choices (problem structure, scheme, number of
epochs, batch size, optimizer family) and returns a pure function
``run(key, x0, learning_rate) -> SGDResult``.  Each epoch follows the scheme's order
:math:`\sigma_k` (epoch key ``fold_in(key, k)``) in minibatches :math:`B` and steps
:math:`x \leftarrow x - \eta \frac{1}{|B|}\sum_{i\in B}\nabla f_i(x)` (or any optax update of
that gradient) -- the epoch loop is :func:`shufflesgd.drivers.scan_epochs`, which also feeds a
herding scheme (GraB) each example's gradient.  After every epoch the run records
:math:`f(x) - f^*` and :math:`\|\nabla f(x)\|^2`, so a rate is a measured slope (Mishchenko,
Khaled & Richtárik 2020; Lu, Guo & De Sa 2022).  The learning rate is a traced argument, so
``jax.vmap(run, in_axes=(0, None, 0))`` sweeps seeds and step sizes in one compiled program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from shufflesgd._checks import check_int, check_key, check_like
from shufflesgd.drivers import check_batch_size, check_learning_rate, first_nonfinite, scan_epochs
from shufflesgd.problems.finite_sums import FiniteSum
from shufflesgd.shuffling.schemes import ShufflingScheme

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
    fed each example's gradient at the current iterate through ``scheme.observe`` by the
    epoch driver :func:`shufflesgd.drivers.scan_epochs`; epoch ``k``'s order is drawn with
    ``fold_in(key, k)`` (and ``scheme.init`` gets ``key``).
    ``optimizer`` is any factory from a (traced) learning rate to an optax transform,
    e.g. ``optax.sgd``, ``optax.adam`` or ``lambda lr: optax.sgd(schedule(lr))``.

    All arguments are validated here, before anything is traced; ``run`` checks its
    ``key`` (a PRNG key), ``x0`` (a float array shaped like ``problem.x_star``) and a
    concrete ``learning_rate`` (a traced one is the caller's to check, with
    :func:`shufflesgd.drivers.check_learning_rate`, before the sweep is compiled).
    """
    if scheme.num_examples != problem.num_examples:
        raise ValueError(
            f"scheme is over {scheme.num_examples} examples but problem has {problem.num_examples}"
        )
    num_epochs = check_int("num_epochs", num_epochs)
    check_batch_size(scheme.epoch_length, batch_size, drop_remainder)
    if not callable(optimizer):
        raise TypeError(
            "optimizer must be a callable learning_rate -> optax.GradientTransformation"
        )

    def minibatch_gradient(x: jax.Array, batch: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """The minibatch gradient, and the per-example gradients when the scheme herds."""
        if not scheme.uses_gradients:
            return jax.grad(lambda p: jnp.mean(problem.component_losses(p, batch)))(x), None
        grads = jax.vmap(jax.grad(problem.component_loss), in_axes=(None, 0))(
            x, problem.examples(batch)
        )
        return jax.tree.map(lambda g: jnp.mean(g, axis=0), grads), grads

    def run(key: jax.Array, x0: jax.Array, learning_rate: jax.Array) -> SGDResult:
        check_key("key", key)
        check_like("x0", x0, problem.x_star, "problem.x_star")
        check_learning_rate(learning_rate)
        opt = optimizer(learning_rate)

        def step(_: None, carry: tuple[jax.Array, optax.OptState], batch: jax.Array):
            x, opt_state = carry
            grad, example_grads = minibatch_gradient(x, batch)
            updates, opt_state = opt.update(grad, opt_state, x)
            return (optax.apply_updates(x, updates), opt_state), None, example_grads

        def summary(
            carry: tuple[jax.Array, optax.OptState], _: None
        ) -> tuple[jax.Array, jax.Array]:
            x, _ = carry
            return problem.suboptimality(x), optax.tree.norm(problem.gradient(x), squared=True)

        (x, _), _, (subopt, grad_norm_sq) = scan_epochs(
            step,
            scheme,
            key,
            None,
            (x0, opt.init(x0)),
            scheme.init(key, x0),
            num_epochs,
            batch_size=batch_size,
            drop_remainder=drop_remainder,
            summary=summary,
        )
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
