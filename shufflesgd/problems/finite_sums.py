r"""Finite sums with known optima, for measuring rates as slopes of ``f(x_K) - f*``.

A :class:`FiniteSum` is :math:`f(x) = \frac1n\sum_i f_i(x)` with ``f_i(x) =
component_loss(x, example_i)``, its minimiser ``x_star``, value ``f_star``, strong
convexity ``mu`` and component smoothness ``L = max_i L_i``.  The optimum is computed
once, in float64 NumPy, when the problem is built (closed form for least squares and
ridge, Newton's method to a gradient norm of 1e-12 for logistic regression), so that a
float64 run can measure suboptimality down to ~1e-14.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from shufflesgd._checks import check_finite
from shufflesgd.problems._casting import default_float

PyTree = Any


@struct.dataclass
class FiniteSum:
    """A finite sum with its optimum; a pytree whose static part is the loss function.

    Attributes:
      data: pytree of arrays with leading axis ``n`` (example ``i`` is ``data[i]``).
      x_star: the minimiser of the full objective.
      f_star: the minimum value.
      mu: strong-convexity constant of the full objective.
      smoothness: ``max_i L_i``, the largest component smoothness constant.
      component_loss: ``(x, example) -> scalar``, static.
    """

    data: PyTree
    x_star: jax.Array
    f_star: jax.Array
    mu: jax.Array
    smoothness: jax.Array
    component_loss: Callable[[jax.Array, PyTree], jax.Array] = struct.field(pytree_node=False)

    @property
    def num_examples(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]

    def examples(self, indices: jax.Array) -> PyTree:
        """The examples at ``indices`` (leading axis ``len(indices)``)."""
        return jax.tree.map(lambda leaf: leaf[indices], self.data)

    def component_losses(self, x: jax.Array, indices: jax.Array | None = None) -> jax.Array:
        """``f_i(x)`` for ``i`` in ``indices`` (all components when ``None``)."""
        batch = self.data if indices is None else self.examples(indices)
        return jax.vmap(self.component_loss, in_axes=(None, 0))(x, batch)

    def loss(self, x: jax.Array) -> jax.Array:
        """The full objective ``f(x) = mean_i f_i(x)``."""
        return jnp.mean(self.component_losses(x))

    def suboptimality(self, x: jax.Array) -> jax.Array:
        """``f(x) - f*``."""
        return self.loss(x) - self.f_star

    def gradient(self, x: jax.Array) -> jax.Array:
        """The full gradient ``∇f(x)``."""
        return jax.grad(self.loss)(x)


def _check_design(features: np.ndarray, targets: np.ndarray, l2: float, name: str) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be a matrix [n, d], got shape {features.shape}")
    if features.size == 0:
        raise ValueError(
            f"features must hold at least one example and one feature, got shape {features.shape}"
        )
    if targets.shape != (features.shape[0],):
        raise ValueError(
            f"{name} must have shape ({features.shape[0]},) to match features, got {targets.shape}"
        )
    check_finite("features", features)
    check_finite(name, targets)
    check_finite("l2", l2)
    if l2 < 0:
        raise ValueError(f"l2 must be non-negative, got l2={l2}")


def _squared_error(x: jax.Array, example: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    a, b, l2 = example
    return 0.5 * (a @ x - b) ** 2 + 0.5 * l2 * (x @ x)


def least_squares(features: Any, targets: Any, l2: float = 0.0) -> FiniteSum:
    r"""Least squares / ridge:
    :math:`f_i(x) = \tfrac12(a_i^\top x - b_i)^2 + \tfrac{\lambda}{2}\|x\|^2`.

    Closed form: :math:`x_* = (A^\top A/n + \lambda I)^{-1} A^\top b / n`, with
    :math:`\mu = \lambda_{\min}(A^\top A/n) + \lambda` and
    :math:`L = \max_i \|a_i\|^2 + \lambda`.  Requires ``mu > 0`` (``n >= d`` with full
    column rank, or ``l2 > 0``).
    """
    a = np.asarray(features, np.float64)
    b = np.asarray(targets, np.float64)
    _check_design(a, b, l2, "targets")
    n, d = a.shape
    hessian = a.T @ a / n + l2 * np.eye(d)
    mu = float(np.linalg.eigvalsh(hessian)[0])
    if mu <= 1e-12:
        raise ValueError("least squares is not strongly convex: rank-deficient features and l2=0")
    x_star = np.linalg.solve(hessian, a.T @ b / n)
    f_star = np.mean(0.5 * (a @ x_star - b) ** 2) + 0.5 * l2 * x_star @ x_star
    smoothness = float(np.max(np.sum(a**2, axis=1))) + l2
    return FiniteSum(
        data=(default_float(a), default_float(b), default_float(np.full(n, l2))),
        x_star=default_float(x_star),
        f_star=default_float(f_star),
        mu=default_float(mu),
        smoothness=default_float(smoothness),
        component_loss=_squared_error,
    )


def _logistic_loss(x: jax.Array, example: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    a, y, l2 = example
    return jnp.logaddexp(0.0, -y * (a @ x)) + 0.5 * l2 * (x @ x)


def _logistic_newton(a: np.ndarray, y: np.ndarray, l2: float, tol: float = 1e-12) -> np.ndarray:
    """Newton's method with backtracking on the float64 regularised logistic loss."""
    n, d = a.shape

    def value(x: np.ndarray) -> float:
        return float(np.mean(np.logaddexp(0.0, -y * (a @ x))) + 0.5 * l2 * x @ x)

    x = np.zeros(d)
    for _ in range(100):
        margins = y * (a @ x)
        sigma = 0.5 * (1.0 - np.tanh(0.5 * margins))  # = 1 / (1 + exp(margin)), stable
        grad = -(a.T @ (y * sigma)) / n + l2 * x
        if np.linalg.norm(grad) <= tol:
            return x
        weights = sigma * (1.0 - sigma)
        hessian = (a.T * weights) @ a / n + l2 * np.eye(d)
        step = np.linalg.solve(hessian, grad)
        t, current = 1.0, value(x)
        while value(x - t * step) > current - 0.25 * t * grad @ step and t > 1e-10:
            t *= 0.5
        x = x - t * step
    raise RuntimeError("Newton's method did not reach a gradient norm of 1e-12 in 100 steps")


def logistic_regression(features: Any, labels: Any, l2: float) -> FiniteSum:
    r"""L2-regularised logistic regression with labels in {-1, +1}.

    :math:`f_i(x) = \log(1 + e^{-y_i a_i^\top x}) + \tfrac{\lambda}{2}\|x\|^2`;
    :math:`\mu = \lambda`, :math:`L = \max_i \|a_i\|^2/4 + \lambda`.  The optimum is found by
    damped Newton in float64 to :math:`\|\nabla f(x_*)\| \le 10^{-12}`.
    """
    a = np.asarray(features, np.float64)
    y = np.asarray(labels, np.float64)
    _check_design(a, y, l2, "labels")
    if l2 <= 0:
        raise ValueError(f"l2 must be positive for a strongly convex logistic loss, got l2={l2}")
    if not np.all(np.isin(y, (-1.0, 1.0))):
        raise ValueError("labels must be -1 or +1")
    n = a.shape[0]
    x_star = _logistic_newton(a, y, l2)
    f_star = np.mean(np.logaddexp(0.0, -y * (a @ x_star))) + 0.5 * l2 * x_star @ x_star
    return FiniteSum(
        data=(default_float(a), default_float(y), default_float(np.full(n, l2))),
        x_star=default_float(x_star),
        f_star=default_float(f_star),
        mu=default_float(l2),
        smoothness=default_float(float(np.max(np.sum(a**2, axis=1))) / 4 + l2),
        component_loss=_logistic_loss,
    )


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent NumPy streams for weights, features and noise, so that the instance
    with ``n`` rows is the first ``n`` rows of any larger one (nested instances)."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]


def synthetic_regression(
    seed: int, n: int, d: int, noise: float = 1.0, condition: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features with covariance spectrum from 1 down to ``1/condition``, noisy targets.

    Returns ``(features [n, d], targets [n])`` with ``b = A x_true + noise * z``.  Built
    with NumPy from an integer seed so that the same instance can be rebuilt anywhere;
    the instance with ``n`` rows is the first ``n`` rows of any larger one.
    """
    if n <= 0 or d <= 0:
        raise ValueError(f"n and d must be positive, got n={n}, d={d}")
    weights_rng, features_rng, noise_rng = _streams(seed)
    x_true = weights_rng.standard_normal(d)
    scales = np.geomspace(1.0, 1.0 / condition, d) ** 0.5
    a = features_rng.standard_normal((n, d)) * scales
    b = a @ x_true + noise * noise_rng.standard_normal(n)
    return a, b


def synthetic_classification(
    seed: int, n: int, d: int, margin: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features and ±1 labels drawn from a logistic model with weight norm ``margin``."""
    if n <= 0 or d <= 0:
        raise ValueError(f"n and d must be positive, got n={n}, d={d}")
    weights_rng, features_rng, noise_rng = _streams(seed)
    w = weights_rng.standard_normal(d)
    w *= margin * np.sqrt(d) / np.linalg.norm(w)
    a = features_rng.standard_normal((n, d)) / np.sqrt(d)
    p = 1.0 / (1.0 + np.exp(-(a @ w)))
    y = np.where(noise_rng.uniform(size=n) < p, 1.0, -1.0)
    return a, y
