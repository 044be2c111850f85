r"""Distributed sums: a finite sum split over workers, with its optimum and smoothness constants.

A :class:`DistributedSum` is :math:`f = \frac1n\sum_i f_i`, worker ``i`` holding
:math:`f_i(x) = \frac1m\sum_j \ell(x, \text{example}_{ij})`, with the minimiser
:math:`x^\star`, :math:`f^\star`, the strong convexity :math:`\mu` and smoothness :math:`L` of
:math:`f`, and the workers' smoothness constants :math:`L_i` that error-feedback step sizes
depend on (their quadratic mean in EF21, Richtárik, Sokolov, Fatkhullin 2021; their
arithmetic mean in EF21-W, Richtárik, Gasanov, Burlachenko 2024).  Builders:

* :func:`distributed_least_squares`, :func:`distributed_logistic_regression` -- a
  :class:`~shufflesgd.problems.FiniteSum` split row-wise, its optimum solved in float64;
* :func:`heterogeneous_regression` -- regression rows scaled so the :math:`L_i` span a chosen
  spread;
* :func:`distributed_quadratic` -- quadratics with exactly the :math:`L_i` asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from shufflesgd._checks import check_int
from shufflesgd.problems._casting import default_float
from shufflesgd.problems.finite_sums import (
    FiniteSum,
    _squared_error,
    least_squares,
    logistic_regression,
    synthetic_regression,
)

PyTree = Any


@struct.dataclass
class DistributedSum:
    r"""A finite sum split over workers: :math:`f = \frac1n\sum_i f_i`,
    :math:`f_i(x) = \frac1m\sum_j \ell(x, \text{example}_{ij})`.

    Attributes:
      data: pytree of arrays with leading axes ``[num_workers, m]``.
      x_star, f_star, mu: optimum, minimum and strong convexity of ``f``.
      smoothness: ``L``, the smoothness constant of ``f``.
      worker_smoothness: ``[num_workers]``, the smoothness constants ``L_i`` of the ``f_i``.
      component_loss: ``(x, example) -> scalar``, static.
    """

    data: PyTree
    x_star: jax.Array
    f_star: jax.Array
    mu: jax.Array
    smoothness: jax.Array
    worker_smoothness: jax.Array
    component_loss: Callable[[jax.Array, PyTree], jax.Array] = struct.field(pytree_node=False)

    @property
    def num_workers(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]

    @property
    def examples_per_worker(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[1]

    def worker_loss(
        self, x: jax.Array, worker_data: PyTree, indices: jax.Array | None = None
    ) -> jax.Array:
        """``f_i(x)`` from one worker's data (or the mean over ``indices`` of it)."""
        if indices is not None:
            worker_data = jax.tree.map(lambda leaf: leaf[indices], worker_data)
        return jnp.mean(jax.vmap(self.component_loss, in_axes=(None, 0))(x, worker_data))

    def worker_gradients(self, x: jax.Array, indices: jax.Array | None = None) -> jax.Array:
        """``[num_workers, ...]`` gradients of the ``f_i`` at ``x`` (minibatch ``indices[i]``
        of worker ``i`` when given, an ``[num_workers, b]`` integer array)."""
        grad = jax.grad(self.worker_loss)
        if indices is None:
            return jax.vmap(grad, in_axes=(None, 0))(x, self.data)
        return jax.vmap(grad, in_axes=(None, 0, 0))(x, self.data, indices)

    def loss(self, x: jax.Array) -> jax.Array:
        return jnp.mean(jax.vmap(self.worker_loss, in_axes=(None, 0))(x, self.data))

    def gradient(self, x: jax.Array) -> jax.Array:
        return jax.grad(self.loss)(x)

    def suboptimality(self, x: jax.Array) -> jax.Array:
        return self.loss(x) - self.f_star


def _split_rows(num_rows: int, num_workers: int, order: np.ndarray) -> np.ndarray:
    check_int("num_workers", num_workers)
    if num_rows % num_workers:
        raise ValueError(f"num_workers={num_workers} does not divide the {num_rows} examples")
    return order.reshape(num_workers, num_rows // num_workers)


def _distribute(problem: FiniteSum, groups: np.ndarray, curvature: float) -> DistributedSum:
    """Split a linear-model FiniteSum (data ``(features, targets, l2)``) into worker groups.

    ``L_i = curvature * lambda_max(A_i^T A_i / m) + l2`` and ``L = curvature *
    lambda_max(A^T A / N) + l2`` (curvature 1 for squared loss, 1/4 for logistic loss).
    """
    features = np.asarray(problem.data[0], np.float64)
    l2 = float(np.asarray(problem.data[2])[0])
    worker_features = features[groups]
    worker_smoothness = np.array(
        [curvature * np.linalg.eigvalsh(a.T @ a / len(a))[-1] + l2 for a in worker_features]
    )
    smoothness = curvature * np.linalg.eigvalsh(features.T @ features / len(features))[-1] + l2
    return DistributedSum(
        data=jax.tree.map(lambda leaf: leaf[groups], problem.data),
        x_star=problem.x_star,
        f_star=problem.f_star,
        mu=problem.mu,
        smoothness=default_float(smoothness),
        worker_smoothness=default_float(worker_smoothness),
        component_loss=problem.component_loss,
    )


def distributed_least_squares(
    features: Any, targets: Any, num_workers: int, l2: float = 0.0
) -> DistributedSum:
    """:func:`least_squares` with consecutive rows split evenly over ``num_workers``.

    Make the workers heterogeneous by how the rows are ordered (e.g. scale the rows of
    each block, :func:`heterogeneous_regression`)."""
    problem = least_squares(features, targets, l2)
    groups = _split_rows(problem.num_examples, num_workers, np.arange(problem.num_examples))
    return _distribute(problem, groups, curvature=1.0)


def distributed_logistic_regression(
    features: Any, labels: Any, num_workers: int, l2: float, *, split_by_label: bool = False
) -> DistributedSum:
    """:func:`logistic_regression` split over ``num_workers``: consecutive rows, or sorted by
    label first (``split_by_label=True``) so that workers see different classes."""
    problem = logistic_regression(features, labels, l2)
    order = np.arange(problem.num_examples)
    if split_by_label:
        order = np.argsort(np.asarray(labels), kind="stable")
    groups = _split_rows(problem.num_examples, num_workers, order)
    return _distribute(problem, groups, curvature=0.25)


def heterogeneous_regression(
    seed: int,
    num_workers: int,
    examples_per_worker: int,
    d: int,
    spread: float,
    noise: float = 0.1,
    profile: str = "geometric",
) -> tuple[np.ndarray, np.ndarray]:
    r"""Regression data whose per-worker smoothness spans ``spread`` (``L_max / L_min``).

    Worker ``i``'s rows (features and targets) are scaled by :math:`\sqrt{s_i}`, so
    :math:`L_i \propto s_i`: the setting where EF21-W's :math:`L_{AM}` beats EF21's
    :math:`L_{QM}`.  ``profile="geometric"``: :math:`s_i` log-spaced over
    :math:`[1, \text{spread}]` (then :math:`L_{QM}/L_{AM}` grows only like
    :math:`\sqrt{\log \text{spread}}`); ``profile="outlier"``: one worker at ``spread``,
    the others at 1 (then :math:`L_{QM}/L_{AM} \to \sqrt n`, the regime of the large gains
    in Richtárik, Gasanov, Burlachenko 2024).  Rows come in worker order (pass the result
    to :func:`distributed_least_squares`).
    """
    if spread < 1:
        raise ValueError(f"spread must be at least 1, got spread={spread}")
    if profile not in ("geometric", "outlier"):
        raise ValueError(f"profile must be 'geometric' or 'outlier', got {profile!r}")
    a, b = synthetic_regression(seed, num_workers * examples_per_worker, d, noise=noise)
    if profile == "geometric":
        worker_scale = np.geomspace(1.0, spread, num_workers)
    else:
        worker_scale = np.ones(num_workers)
        worker_scale[-1] = spread
    scale = np.sqrt(np.repeat(worker_scale, examples_per_worker))
    return a * scale[:, None], b * scale


def _orthonormal_columns(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A Haar-distributed ``rows x cols`` matrix with orthonormal columns (QR of a Gaussian,
    signs fixed by the diagonal of ``R``)."""
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def distributed_quadratic(
    worker_smoothness: Any,
    dim: int,
    seed: int,
    *,
    condition: float = 10.0,
    examples_per_worker: int | None = None,
) -> DistributedSum:
    r"""Quadratics whose workers' smoothness constants are exactly ``worker_smoothness``.

    Worker ``i`` holds :math:`f_i(x) = \frac12(x - c_i)^\top H_i(x - c_i)` with
    :math:`H_i = Q_i\,\mathrm{diag}(s_i)\,Q_i^\top`, :math:`Q_i` a random rotation, the
    spectrum :math:`s_i` log-spaced from :math:`L_i` down to :math:`L_i/\text{condition}`
    (so :math:`\lambda_{\max}(H_i) = L_i` and each :math:`f_i` is
    :math:`L_i/\text{condition}`-strongly convex) and the worker's minimiser
    :math:`c_i \sim N(0, I)`, so the workers disagree.  It is stored as least squares over
    ``m = examples_per_worker`` rows (default ``dim``): rows :math:`F_i = \sqrt m\,U_i
    \mathrm{diag}(\sqrt{s_i})Q_i^\top` (:math:`U_i` with orthonormal columns) and targets
    :math:`F_i c_i`, so that :math:`\frac1{2m}\|F_i x - F_i c_i\|^2 = f_i(x)` and minibatches
    of rows are stochastic gradients.  The optimum of :math:`f = \frac1n\sum_i f_i`,
    :math:`x^\star = H^{-1}\frac1n\sum_i H_i c_i` with :math:`H = \frac1n\sum_i H_i`, its value
    :math:`f^\star`, :math:`\mu = \lambda_{\min}(H)` and :math:`L = \lambda_{\max}(H)` are
    computed in float64 NumPy; ``worker_smoothness`` is returned as given.  The same
    ``seed`` builds the same instance.
    """
    smoothness = np.asarray(worker_smoothness, np.float64)
    positive = np.all(np.isfinite(smoothness) & (smoothness > 0))
    if smoothness.ndim != 1 or smoothness.size == 0 or not positive:
        raise ValueError(
            "worker_smoothness must be a vector of positive finite numbers, "
            f"got {worker_smoothness!r}"
        )
    dim = check_int("dim", dim)
    seed = check_int("seed", seed, minimum=0)
    if not (np.isfinite(condition) and condition >= 1.0):
        raise ValueError(f"condition must be a finite number >= 1, got condition={condition!r}")
    if examples_per_worker is None:
        examples_per_worker = dim
    m = check_int("examples_per_worker", examples_per_worker)
    if m < dim:
        raise ValueError(
            f"examples_per_worker={m} must be at least dim={dim} for the Hessian to have full rank"
        )
    rng = np.random.default_rng(seed)
    shape = np.geomspace(1.0, 1.0 / condition, dim)  # shape[0] == 1.0 exactly
    features, targets, hessians, centres = [], [], [], []
    for worker_l in smoothness:
        spectrum = worker_l * shape
        rotation = _orthonormal_columns(rng, dim, dim)
        rows = np.sqrt(m) * _orthonormal_columns(rng, m, dim) * np.sqrt(spectrum) @ rotation.T
        centre = rng.standard_normal(dim)
        features.append(rows)
        targets.append(rows @ centre)
        hessians.append(rotation * spectrum @ rotation.T)
        centres.append(centre)
    hessian = np.mean(hessians, axis=0)
    x_star = np.linalg.solve(hessian, np.mean([h @ c for h, c in zip(hessians, centres)], axis=0))
    f_star = np.mean([0.5 * (x_star - c) @ h @ (x_star - c) for h, c in zip(hessians, centres)])
    eigenvalues = np.linalg.eigvalsh(hessian)
    features, targets = np.stack(features), np.stack(targets)
    return DistributedSum(
        data=(
            default_float(features),
            default_float(targets),
            default_float(np.zeros(targets.shape)),
        ),
        x_star=default_float(x_star),
        f_star=default_float(f_star),
        mu=default_float(eigenvalues[0]),
        smoothness=default_float(eigenvalues[-1]),
        worker_smoothness=default_float(smoothness),
        component_loss=_squared_error,
    )
