r"""Finite sums with known optima, for measuring rates as slopes of ``f(x_K) - f*``.

A :class:`FiniteSum` is :math:`f(x) = \frac1n\sum_i f_i(x)` with ``f_i(x) =
component_loss(x, example_i)``, its minimiser ``x_star``, value ``f_star``, strong
convexity ``mu`` and component smoothness ``L = max_i L_i``.  The optimum is computed
once, in float64 NumPy, when the problem is built (closed form for least squares and
ridge, Newton's method to a gradient norm of 1e-12 for logistic regression), so that a
float64 run can measure suboptimality down to ~1e-14.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from shufflesgd._checks import check_int, check_positive_finite

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


def _float(array: np.ndarray) -> jax.Array:
    """To the default JAX float dtype (float64 when x64 is on, else float32)."""
    return jnp.asarray(array, dtype=jnp.result_type(float))


# ------------------------------------------------------- reductions over a mixture's short axes

SHORT_AXIS = 8


def _fold(op: Callable[[jax.Array, jax.Array], jax.Array], a: jax.Array, axis: int) -> jax.Array:
    """Reduce ``a`` over ``axis`` with the binary ``op``: unrolled into elementwise ``op`` of
    slices when the axis has at most :data:`SHORT_AXIS` entries.

    Why: a mixture's per-point arrays are ``[K]`` or ``[K, d]`` with K and d often 2 to 8, and
    under ``vmap`` their reductions become reductions over a short minor axis of ``[B, K, d]``,
    which XLA:CPU runs as a scalar loop (about 2 to 4 ns per element measured, jaxlib 0.10.2)
    while the unrolled form is one vectorised elementwise fusion over the batch.  For the
    2-D, 4-component score at batch 4096 on one core this took one evaluation from 190 us to
    34 us.  Long axes keep XLA's reduction.
    """
    a = jnp.moveaxis(a, axis, 0)
    if a.shape[0] > SHORT_AXIS:
        reducer = {jnp.add: jnp.sum, jnp.maximum: jnp.max}[op]
        return reducer(a, axis=0)
    total = a[0]
    for i in range(1, a.shape[0]):
        total = op(total, a[i])
    return total


def _sum(a: jax.Array, axis: int) -> jax.Array:
    return _fold(jnp.add, a, axis)


def _log_normaliser_and_probs(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(logsumexp(logits), softmax(logits))`` over the last axis, with the short-axis
    reductions of :func:`_fold` and the maximum held constant under differentiation."""
    shift = jax.lax.stop_gradient(_fold(jnp.maximum, logits, -1))
    exps = jnp.exp(logits - shift[..., None])
    total = _sum(exps, -1)
    return shift + jnp.log(total), exps / total[..., None]


def _check_design(features: np.ndarray, targets: np.ndarray, l2: float, name: str) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be a matrix [n, d], got shape {features.shape}")
    if targets.shape != (features.shape[0],):
        raise ValueError(
            f"{name} must have shape ({features.shape[0]},) to match features, got {targets.shape}"
        )
    if l2 < 0:
        raise ValueError(f"l2 must be non-negative, got l2={l2}")


def _squared_error(x: jax.Array, example: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    a, b, l2 = example
    return 0.5 * (a @ x - b) ** 2 + 0.5 * l2 * (x @ x)


def least_squares(features: Any, targets: Any, l2: float = 0.0) -> FiniteSum:
    r"""Least squares / ridge: :math:`f_i(x) = \tfrac12(a_i^\top x - b_i)^2 + \tfrac{\lambda}{2}\|x\|^2`.

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
        data=(_float(a), _float(b), _float(np.full(n, l2))),
        x_star=_float(x_star),
        f_star=_float(f_star),
        mu=_float(mu),
        smoothness=_float(smoothness),
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
        data=(_float(a), _float(y), _float(np.full(n, l2))),
        x_star=_float(x_star),
        f_star=_float(f_star),
        mu=_float(l2),
        smoothness=_float(float(np.max(np.sum(a**2, axis=1))) / 4 + l2),
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


def synthetic_classification(seed: int, n: int, d: int, margin: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
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


# ------------------------------------------------------------------ lower-bound instances
#
# Hard finite sums from the lower-bound literature for shuffling SGD.  Both are separable
# quadratics (or piecewise quadratics) whose components differ only by a linear term with
# balanced signs, so the optimum is known in closed form; it is still computed here, in
# float64 NumPy, from the general formula, so that unbalanced variants stay correct.


def _check_even_n(n: Any) -> int:
    if check_int("n", n) % 2:
        raise ValueError(f"n must be a positive even int, got n={n}")
    return int(n)


def _balanced_signs(n: int) -> np.ndarray:
    """``+1`` for the first ``n/2`` components, ``-1`` for the rest (exactly balanced)."""
    return np.where(np.arange(n) < n // 2, 1.0, -1.0)


def _diagonal_quadratic(x: jax.Array, example: tuple[jax.Array, jax.Array]) -> jax.Array:
    curvature, linear = example
    return 0.5 * jnp.sum(curvature * x * x) + jnp.sum(linear * x)


_SAFRAN_SHAMIR_CONSTRUCTIONS = ("single_shuffle", "random_reshuffle")


def safran_shamir_quadratic(
    n: int,
    lam: float = 1.0,
    lam_max: float = 10.0,
    noise: float = 1.0,
    construction: str = "single_shuffle",
) -> FiniteSum:
    r"""The 2-D quadratic lower-bound instances of Safran & Shamir (COLT 2020).

    Safran & Shamir, "How Good is SGD with Random Shuffling?", COLT 2020 (PMLR 125:3250-3284;
    arXiv:1908.00045).  With balanced signs :math:`\sigma_i = +1` for :math:`i < n/2` and
    :math:`-1` otherwise (:math:`\sum_i \sigma_i = 0`), :math:`x = (x_1, x_2)` and
    :math:`G` = ``noise``:

    * ``construction="single_shuffle"`` (their Eq. (1), the single-shuffling lower bound
      :math:`\Omega(1/(nk^2))`): every component has the same Hessian,

      .. math:: f_i(x) = \tfrac{\lambda}{2} x_1^2 + \tfrac{\lambda_{\max}}{2} x_2^2
                + \tfrac{G}{2}\sigma_i x_2,

      so :math:`F(x) = \tfrac{\lambda}{2}x_1^2 + \tfrac{\lambda_{\max}}{2}x_2^2`,
      :math:`\mu = \min(\lambda, \lambda_{\max})`, :math:`L = \max(\lambda, \lambda_{\max})`.
    * ``construction="random_reshuffle"`` (their Eq. (2), the random-reshuffling lower bound
      :math:`\Omega(1/(nk)^2 + 1/(nk^3))`): only the :math:`\sigma_i = -1` half carries the
      curvature in :math:`x_2`,

      .. math:: f_i(x) = \tfrac{\lambda}{2} x_1^2
                + \tfrac{1-\sigma_i}{2}\,\tfrac{\lambda_{\max}}{2} x_2^2
                + \tfrac{G}{2}\sigma_i x_2,

      so :math:`F(x) = \tfrac{\lambda}{2}x_1^2 + \tfrac{\lambda_{\max}}{4}x_2^2`,
      :math:`\mu = \min(\lambda, \lambda_{\max}/2)`, :math:`L = \max(\lambda, \lambda_{\max})`.

    In both, :math:`x_* = 0` and :math:`F_* = 0`.  The :math:`x_1` coordinate carries no
    noise; it makes the bound hold for step sizes too small to forget the initial point.
    The forms above were checked against the authors' released experiment script (whose SGD
    updates are :math:`x_2 \leftarrow (1-\eta\lambda_{\max})x_2 + \eta\frac{G}{2}\sigma_i`
    for Eq. (1) and :math:`x_2 \leftarrow (1-\eta\lambda_{\max}\frac{1-\sigma_i}{2})x_2 +
    \eta\frac{G}{2}\sigma_i` for Eq. (2); the sign of the linear term is immaterial since
    the :math:`\sigma_i` are balanced), not against the paper's text.  The script starts at
    :math:`x_0 = (-G/(2\lambda), -G/(2\lambda_{\max}))` with :math:`\eta = \log(nk)/(\lambda n k)`.

    Components are stored as ``data = (curvature [n, 2], linear [n, 2])`` with
    :math:`f_i(x) = \tfrac12\sum_j c_{ij}x_j^2 + \sum_j b_{ij}x_j`.
    """
    n = _check_even_n(n)
    check_positive_finite(lam=lam, lam_max=lam_max, noise=noise)
    if construction not in _SAFRAN_SHAMIR_CONSTRUCTIONS:
        raise ValueError(
            f"construction must be one of {list(_SAFRAN_SHAMIR_CONSTRUCTIONS)}, got {construction!r}"
        )
    sign = _balanced_signs(n)
    curvature = np.zeros((n, 2))
    curvature[:, 0] = lam
    if construction == "single_shuffle":
        curvature[:, 1] = lam_max
    else:
        curvature[:, 1] = lam_max * (1.0 - sign) / 2.0
    linear = np.zeros((n, 2))
    linear[:, 1] = 0.5 * noise * sign
    # The mean of diagonal quadratics is the diagonal quadratic of the means.
    mean_curvature = curvature.mean(axis=0)
    x_star = -linear.mean(axis=0) / mean_curvature + 0.0  # + 0.0 turns -0.0 into 0.0
    f_star = np.mean(0.5 * curvature @ x_star**2 + linear @ x_star)
    return FiniteSum(
        data=(_float(curvature), _float(linear)),
        x_star=_float(x_star),
        f_star=_float(f_star),
        mu=_float(float(mean_curvature.min())),
        smoothness=_float(float(curvature.max())),
        component_loss=_diagonal_quadratic,
    )


def _piecewise_quadratic_loss(
    x: jax.Array, example: tuple[jax.Array, jax.Array, jax.Array]
) -> jax.Array:
    curvature_neg, curvature_pos, linear = example
    curvature = jnp.where(x < 0, curvature_neg, curvature_pos)
    return 0.5 * jnp.sum(curvature * x * x) + jnp.sum(linear * x)


def piecewise_quadratic(
    n: int, mu: float = 1.0, smoothness: float = 8.0, noise: float = 1.0
) -> FiniteSum:
    r"""The 1-D piecewise quadratic on which random reshuffling is stuck at :math:`\Theta(1/(nK^2))`.

    With balanced signs :math:`\sigma_i = +1` for :math:`i < n/2`, :math:`-1` otherwise,
    :math:`G` = ``noise``, :math:`L` = ``smoothness`` and :math:`x \in \mathbb{R}^1`,

    .. math:: f_i(x) = \tfrac12\big(L\,\mathbb{1}[x<0] + \mu\,\mathbb{1}[x\ge0]\big)\,x^2
              + G\sigma_i x,
       \qquad F(x) = \tfrac12\big(L\,\mathbb{1}[x<0] + \mu\,\mathbb{1}[x\ge0]\big)\,x^2,

    so every :math:`f_i` is convex and :math:`L`-smooth, :math:`F` is :math:`\mu`-strongly
    convex, :math:`x_* = 0` and :math:`F_* = 0`.

    Why it is hard: within an epoch the shuffled iterate makes an excursion
    :math:`\eta G \sum_{t\le j}\sigma_{\pi(t)}` of size :math:`\eta G\sqrt n` (RR, SS).  On a
    quadratic the excursions' effect averages out; here the restoring force is :math:`L`
    times stronger on the negative side, so the epoch's mean gradient vanishes only when
    the iterate sits at an offset :math:`\propto \eta G\sqrt n` (growing with
    :math:`\kappa = L/\mu`) to the right of :math:`x_*`.  That bias gives
    :math:`F(x_K) - F_* = \Theta(\mu\eta^2G^2 n)`, i.e. :math:`\tilde\Theta(G^2/(\mu n K^2))`
    for :math:`\eta \asymp \log(nK)/(\mu n K)`, matching the upper bound of random
    reshuffling.  Orders with :math:`O(G)` prefix sums (GraB's herding) shrink the excursion
    to :math:`O(\eta G)` and the error to :math:`\tilde O(1/(n^2K^2))`; the fixed order
    ``0..n-1`` (all :math:`+G` first) has excursions :math:`\eta G n/2`, so
    :math:`\tilde\Theta(1/K^2)`.

    This is the key one-dimensional piece of the random-reshuffling lower bound of Cha, Lee
    & Yun, "Tighter Lower Bounds for Shuffling SGD: Random Permutations and Beyond", ICML
    2023 (arXiv:2303.07160), Thm. 3.1, whose :math:`\Omega(1/(nK^2))`-order bound (with its
    :math:`\kappa` dependence) is built on components with curvature :math:`L` on one side
    of the optimum and
    :math:`\mu` on the other plus :math:`\pm G x`; Rajput, Gupta & Papailiopoulos, "Closing
    the convergence gap of SGD without replacement", ICML 2020 (arXiv:2002.10400), Thm. 2,
    first proved :math:`\Omega(1/(nK^2))` for smooth strongly convex sums with a 1-D
    construction of the same asymmetric-curvature kind.  The papers' full constructions add
    further coordinates to cover every constant step size and fix exact constants; this
    builder implements only the piece above (the exact paper formulas could not be checked
    here).

    Components are stored as ``data = (curvature_neg [n], curvature_pos [n], linear [n])``.
    """
    n = _check_even_n(n)
    check_positive_finite(mu=mu, smoothness=smoothness, noise=noise)
    if smoothness < mu:
        raise ValueError(f"smoothness must be >= mu, got smoothness={smoothness} < mu={mu}")
    curvature_neg = np.full(n, float(smoothness))
    curvature_pos = np.full(n, float(mu))
    linear = noise * _balanced_signs(n)
    # F'(x) = c(x) x + mean(linear) with c = L on x < 0 and mu on x >= 0.
    slope = float(np.mean(linear))
    x_star = -slope / (curvature_pos.mean() if slope <= 0 else curvature_neg.mean()) + 0.0
    curvature_star = curvature_neg if x_star < 0 else curvature_pos
    f_star = np.mean(0.5 * curvature_star * x_star**2 + linear * x_star)
    return FiniteSum(
        data=(_float(curvature_neg), _float(curvature_pos), _float(linear)),
        x_star=_float(np.array([x_star])),
        f_star=_float(f_star),
        mu=_float(float(mu)),
        smoothness=_float(float(smoothness)),
        component_loss=_piecewise_quadratic_loss,
    )


# ------------------------------------------------------------------ distributed sums


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

    def worker_loss(self, x: jax.Array, worker_data: PyTree, indices: jax.Array | None = None) -> jax.Array:
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
        smoothness=_float(smoothness),
        worker_smoothness=_float(worker_smoothness),
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
    seed: int, num_workers: int, examples_per_worker: int, d: int, spread: float,
    noise: float = 0.1, profile: str = "geometric",
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


# ------------------------------------------------------------------ Gaussian mixtures


@struct.dataclass
class GaussianMixture:
    r""":math:`p = \sum_k w_k N(\mu_k, \Sigma_k)` with closed-form score and log-density.

    Under any linear forward process :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` the
    marginal stays a mixture, :math:`p_t = \sum_k w_k N(\alpha_t\mu_k,
    \alpha_t^2\Sigma_k + \sigma_t^2 I)` (:meth:`diffuse`), so the exact score, and through
    :func:`shufflesgd.sde.convert` the exact :math:`\varepsilon`, :math:`x_0` and :math:`v`,
    are available at every t: the analytic test bed for samplers.  Responsibilities are a
    softmax in log space, stable far from every component.
    """

    log_weights: jax.Array  # [K], normalised
    means: jax.Array  # [K, d]
    covariances: jax.Array  # [K, d, d]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def diffuse(self, alpha: jax.Array, sigma: jax.Array) -> "GaussianMixture":
        """The law of :math:`\\alpha x + \\sigma\\varepsilon` for :math:`x \\sim p`."""
        eye = jnp.eye(self.dim, dtype=self.means.dtype)
        return GaussianMixture(self.log_weights, alpha * self.means, alpha**2 * self.covariances + sigma**2 * eye)

    def _inverse_cholesky(self) -> jax.Array:
        r""":math:`L_k^{-1}` with :math:`\Sigma_k = L_k L_k^\top`.  Computed from the
        covariances only, so under ``vmap`` over points it is computed once, and the
        per-point work is matrix-vector products (no batched LAPACK calls)."""
        chol = jnp.linalg.cholesky(self.covariances)
        eye = jnp.broadcast_to(jnp.eye(self.dim, dtype=chol.dtype), chol.shape)
        return jax.scipy.linalg.solve_triangular(chol, eye, lower=True)

    def _whitened(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(L^{-1}, L_k^{-1}(x - mu_k), log N(x; mu_k, Sigma_k))`` for every component k."""
        inverse = self._inverse_cholesky()
        whitened = jnp.einsum("kij,kj->ki", inverse, x - self.means)
        log_det = -2.0 * jnp.sum(jnp.log(jnp.diagonal(inverse, axis1=-2, axis2=-1)), axis=-1)
        log_probs = -0.5 * (_sum(whitened**2, -1) + log_det + self.dim * jnp.log(2 * jnp.pi))
        return inverse, whitened, log_probs

    def log_prob(self, x: jax.Array) -> jax.Array:
        r""":math:`\log p(x)` for one point ``x`` of shape ``[d]`` (vmap for batches)."""
        return _log_normaliser_and_probs(self.log_weights + self._whitened(x)[2])[0]

    def responsibilities(self, x: jax.Array) -> jax.Array:
        return _log_normaliser_and_probs(self.log_weights + self._whitened(x)[2])[1]

    def score(self, x: jax.Array) -> jax.Array:
        r""":math:`\nabla\log p(x) = -\sum_k r_k(x)\Sigma_k^{-1}(x-\mu_k)`, with
        :math:`\Sigma_k^{-1}(x-\mu_k) = L_k^{-\top}L_k^{-1}(x-\mu_k)`."""
        inverse, whitened, log_probs = self._whitened(x)
        precision_diff = jnp.einsum("kji,kj->ki", inverse, whitened)
        responsibilities = _log_normaliser_and_probs(self.log_weights + log_probs)[1]
        return -_sum(responsibilities[:, None] * precision_diff, 0)

    def eigen(self) -> "EigenMixture":
        """The same mixture in its components' eigenbases (NumPy ``eigh``; concrete arrays only)."""
        eigvals, eigvecs = np.linalg.eigh(np.asarray(self.covariances, np.float64))
        dtype = self.means.dtype
        return EigenMixture(self.log_weights, self.means, jnp.asarray(eigvecs, dtype), jnp.asarray(eigvals, dtype))

    def sample(self, key: jax.Array, num: int) -> jax.Array:
        component_key, noise_key = jax.random.split(key)
        k = jax.random.categorical(component_key, self.log_weights, shape=(num,))
        z = jax.random.normal(noise_key, (num, self.dim), self.means.dtype)
        chol = jnp.linalg.cholesky(self.covariances)
        return self.means[k] + jnp.einsum("nij,nj->ni", chol[k], z)


class EigenMixture(NamedTuple):
    r"""A mixture's components in their eigenbases, :math:`\Sigma_k = U_k\,\mathrm{diag}(\lambda_k)\,U_k^\top`
    (decomposed once, in NumPy: :meth:`GaussianMixture.eigen`), so that every diffused marginal
    :math:`p_t = \sum_k w_k N(\alpha\mu_k, U_k\,\mathrm{diag}(\alpha^2\lambda_k + \sigma^2)\,U_k^\top)`
    is evaluated with matrix products only, at any :math:`(\alpha, \sigma)`.

    Why not ``GaussianMixture.diffuse(alpha, sigma).score``: that factors the diffused
    covariances, so where :math:`(\alpha, \sigma)` differ per sample (an adaptive ODE solve
    vmapped over points) every sample makes a batched LAPACK call; two such custom calls
    running at once inside a vmapped diffrax while loop deadlocked jaxlib 0.10.2's CPU
    thread pool on 2 cores, intermittently.
    """

    log_weights: jax.Array  # [K]
    means: jax.Array  # [K, d]
    eigvecs: jax.Array  # [K, d, d], columns are eigenvectors
    eigvals: jax.Array  # [K, d]

    def _parts(self, x: jax.Array, alpha: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        scales = alpha**2 * self.eigvals + sigma**2  # [K, d]
        coords = jnp.einsum("kji,kj->ki", self.eigvecs, x - alpha * self.means)  # U_k^T (x - m_k)
        log_n = -0.5 * (_sum(coords**2 / scales + jnp.log(scales), -1) + x.shape[-1] * jnp.log(2 * jnp.pi))
        return scales, coords, self.log_weights + log_n

    def log_prob(self, x: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
        r""":math:`\log p_t(x)` of the law of :math:`\alpha x_0 + \sigma\varepsilon`."""
        return _log_normaliser_and_probs(self._parts(x, alpha, sigma)[2])[0]

    def score(self, x: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
        r""":math:`\nabla\log p_t(x)` of the law of :math:`\alpha x_0 + \sigma\varepsilon`."""
        scales, coords, log_joint = self._parts(x, alpha, sigma)
        per_component = -jnp.einsum("kij,kj->ki", self.eigvecs, coords / scales)
        return _sum(_log_normaliser_and_probs(log_joint)[1][:, None] * per_component, 0)


def gaussian_mixture(weights: Any, means: Any, covariances: Any) -> GaussianMixture:
    """Build a :class:`GaussianMixture`, checking shapes, weights and positive definiteness."""
    w = np.asarray(weights, np.float64)
    mu = np.asarray(means, np.float64)
    cov = np.asarray(covariances, np.float64)
    if mu.ndim != 2:
        raise ValueError(f"means must have shape [K, d], got {mu.shape}")
    k, d = mu.shape
    if w.shape != (k,) or np.any(w <= 0):
        raise ValueError(f"weights must be {k} positive numbers, got {w}")
    if cov.shape != (k, d, d):
        raise ValueError(f"covariances must have shape {(k, d, d)}, got {cov.shape}")
    if not np.allclose(cov, np.swapaxes(cov, 1, 2)) or np.any(np.linalg.eigvalsh(cov) <= 0):
        raise ValueError("covariances must be symmetric positive definite")
    return GaussianMixture(_float(np.log(w / w.sum())), _float(mu), _float(cov))


def random_gaussian_mixture(seed: int, num_components: int, dim: int) -> GaussianMixture:
    r"""A reproducible random mixture for test beds: weights Dirichlet(2) + 0.05 (normalised),
    means :math:`2\,N(0, I)`, covariances :math:`\frac12 FF^\top + 0.1 I` with
    :math:`F_{ij} \sim N(0, 1/d)` (anisotropic, rotated, well conditioned)."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(num_components, 2.0)) + 0.05
    means = 2.0 * rng.standard_normal((num_components, dim))
    factors = rng.standard_normal((num_components, dim, dim)) / np.sqrt(dim)
    covariances = 0.5 * factors @ np.swapaxes(factors, 1, 2) + 0.1 * np.eye(dim)
    return gaussian_mixture(weights, means, covariances)

def gaussian_kl(mean_p: jax.Array, cov_p: jax.Array, mean_q: jax.Array, cov_q: jax.Array) -> jax.Array:
    r""":math:`KL(N(m_p, C_p)\,\|\,N(m_q, C_q))` in nats."""
    d = mean_p.shape[-1]
    chol_q = jnp.linalg.cholesky(cov_q)
    solve = lambda b: jax.scipy.linalg.cho_solve((chol_q, True), b)  # noqa: E731
    diff = mean_q - mean_p
    log_det_q = 2.0 * jnp.sum(jnp.log(jnp.diag(chol_q)))
    log_det_p = jnp.linalg.slogdet(cov_p)[1]
    return 0.5 * (jnp.trace(solve(cov_p)) + diff @ solve(diff) - d + log_det_q - log_det_p)


def gaussian_w2(mean_p: jax.Array, cov_p: jax.Array, mean_q: jax.Array, cov_q: jax.Array) -> jax.Array:
    r"""Squared 2-Wasserstein distance between Gaussians,
    :math:`\|m_p-m_q\|^2 + \mathrm{tr}(C_p + C_q - 2(C_q^{1/2}C_pC_q^{1/2})^{1/2})`."""

    def sqrtm(c: jax.Array) -> jax.Array:
        vals, vecs = jnp.linalg.eigh(c)
        return (vecs * jnp.sqrt(jnp.clip(vals, 0.0))) @ vecs.T

    root_q = sqrtm(cov_q)
    cross = sqrtm(root_q @ cov_p @ root_q)
    return jnp.sum((mean_p - mean_q) ** 2) + jnp.trace(cov_p + cov_q - 2.0 * cross)
