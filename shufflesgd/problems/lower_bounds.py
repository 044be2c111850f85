r"""The instances on which shuffling schemes attain their worst-case rates.

* :func:`safran_shamir_quadratic` -- the 2-D quadratics of Safran & Shamir (COLT 2020), Eq. (1)
  (single shuffle, :math:`\Omega(1/(nk^2))`) and Eq. (2) (random reshuffling,
  :math:`\Omega(1/(nk)^2 + 1/(nk^3))`);
* :func:`piecewise_quadratic` -- the 1-D piecewise quadratic, curvature :math:`L` left of the
  optimum and :math:`\mu` right of it, on which random reshuffling is stuck at
  :math:`\Theta(1/(nK^2))` (Rajput et al. 2020; Cha, Lee, Yun 2023).

Both use balanced signs :math:`\sigma_i = \pm 1` with :math:`\sum_i\sigma_i = 0` and are
:class:`~shufflesgd.problems.finite_sums.FiniteSum`\ s with their exact optimum.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_int, check_positive_finite
from shufflesgd.problems._casting import default_float
from shufflesgd.problems.finite_sums import FiniteSum

PyTree = Any


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
            f"construction must be one of {list(_SAFRAN_SHAMIR_CONSTRUCTIONS)}, got "
            f"{construction!r}"
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
        data=(default_float(curvature), default_float(linear)),
        x_star=default_float(x_star),
        f_star=default_float(f_star),
        mu=default_float(float(mean_curvature.min())),
        smoothness=default_float(float(curvature.max())),
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
    r"""The 1-D piecewise quadratic on which random reshuffling is stuck at
    :math:`\Theta(1/(nK^2))`.

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
        data=(default_float(curvature_neg), default_float(curvature_pos), default_float(linear)),
        x_star=default_float(np.array([x_star])),
        f_star=default_float(f_star),
        mu=default_float(float(mu)),
        smoothness=default_float(float(smoothness)),
        component_loss=_piecewise_quadratic_loss,
    )
