r"""DPM-Solver-v3: the multistep predictor-corrector on the ODE re-parameterised by empirical model
statistics (EMS, :mod:`shufflesgd.diffusion.samplers.model_statistics`).

Zheng, Lu, Chen & Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics" (NeurIPS 2023), Sec. 3 (the paper's equation numbers could not be checked offline;
every formula below was checked against the authors' ``dpm_solver_v3.py``, commit ba16871, and
is tested against a transcription of it).  With the statistics :math:`l, s, b` (per dimension,
functions of the half log-SNR :math:`\lambda = \log(\alpha/\sigma)`), their integrals from the
start of the statistics grid :math:`L = \int l`, :math:`S = \int s`, :math:`B = \int e^{-S}b`,
the model term :math:`f_\theta = (\sigma\varepsilon_\theta - l\odot x)/\alpha` and, relative to
a step's start :math:`\lambda_s`, the pseudo data prediction

.. math:: g_\theta(x_\lambda, \lambda) = e^{-(S_\lambda - S_s)}f_\theta(x_\lambda, \lambda)
          - e^{S_s}(B_\lambda - B_s),

the exact solution of the probability-flow ODE from :math:`\lambda_s` to :math:`\lambda_t` is
(element-wise; the paper's Sec. 3.1, in the form of the authors' ``dpm_solver_v3.py``)

.. math:: x_t = \frac{\alpha_t}{\alpha_s}e^{-(L_t-L_s)}x_s
          - \alpha_t e^{-(L_t-L_s)}\int_{\lambda_s}^{\lambda_t}e^{a_\lambda - a_s}
            \big(g_\theta(x_\lambda, \lambda) + e^{S_s}(B_\lambda - B_s)\big)\,d\lambda,
          \qquad a = L + S.

The solver replaces :math:`g_\theta` by its Taylor polynomial at :math:`\lambda_s` (Sec. 3.2),

.. math:: x_t \approx \frac{\alpha_t}{\alpha_s}e^{-(L_t-L_s)}x_s
          - \alpha_t e^{-(L_t-L_s)}\Big[J_0\,g_s + J_b
          + \sum_{k=1}^{n}K_k\,\hat g^{(k)}_s\Big],\quad
          J_0 = \int e^{a - a_s},\ J_b = \int e^{a-a_s}e^{S_s}(B - B_s),\
          K_k = \int e^{a-a_s}\frac{(\lambda-\lambda_s)^k}{k!},

with the derivatives :math:`\hat g^{(k)}_s` estimated from the :math:`n` previous points
(multistep).  A step of order :math:`n + 1` interpolates :math:`g` through :math:`n + 1`
points (the authors' Vandermonde solve, here Newton's divided differences:
:math:`\hat g' = F_1 - d_1F_2 + d_1d_2F_3`, :math:`\hat g'' = 2(F_2 - (d_1+d_2)F_3)`,
:math:`\hat g''' = 6F_3`, :math:`F_k` the divided differences, :math:`d_m = \lambda_m -
\lambda_s`); the *pseudo-order* variant (Sec. 3.3) keeps only :math:`\hat g^{(k)} = k!F_k`.
The *corrector* (Sec. 3.3, after UniPC), once the model has been evaluated at the new point
:math:`t`, redoes the step :math:`s \to t` with :math:`g_t` among the interpolation points, at
the previous predictor's order (``corrector_pseudo=False``) or one more with pseudo-order
derivatives (``True``), and then keeps the model's non-linear part :math:`N = \sigma\varepsilon
- l\odot x` at :math:`t` while moving :math:`x_t`: :math:`\varepsilon_t \leftarrow (N_t +
l_t\odot x^c_t)/\sigma_t` (no extra evaluation).  Warm-up: step :math:`i` (from 0) has order
:math:`\min(\text{order}, i + 1)`; ``lower_order_final``: also at most :math:`N - i` (the
authors apply it at every N).

The integrals are quadratures over the statistics grid merged with the sampler's
:math:`\lambda`\ s (statistics interpolated linearly in :math:`\lambda` at the sampler's
points, held constant beyond the grid's ends); :math:`L` and :math:`S` are exact for the
interpolated statistics.  ``quadrature="trapezoid"`` is the authors' rule
(``weighted_cumsumexp_trapezoid``); with every sampler :math:`\lambda` on the statistics grid it
is their computation to rounding (tested against a NumPy transcription of their loop).  The
authors instead move the sampler's times to the nearest statistics grid point; here the grid is
kept and the statistics interpolated.  ``quadrature="exponential"`` (default) integrates
:math:`e^{a}w` exactly for :math:`a` linear and :math:`w` polynomial between nodes
(:math:`\int_0^\Delta e^{a_q + zu/\Delta}u^m/m!\,du = e^{a_q}\Delta^{m+1}\psi_m(z)`,
:math:`\psi_m(z) = \int_0^1 e^{z\theta}\theta^m/m!\,d\theta`), so with :math:`l` and :math:`s`
constant (in particular :math:`l = 1, s = b = 0`) every coefficient is exact, while the
trapezoid rule is off by :math:`O(\Delta\lambda^2)`; both are second order in the node spacing
otherwise.  When the grid and the statistics are concrete (a grid closed over by ``jit``
included) all of this is computed once in NumPy (float64) and enters the compiled program as
constants; a traced grid or traced statistics take the same computation in ``jax.numpy``.

With :math:`l = 1, s = 0, b = 0`
(:func:`~shufflesgd.diffusion.samplers.model_statistics.dpm_solver_pp_ems`, the default)
:math:`g = -\hat x_0`, :math:`J_0 = e^h - 1`,
:math:`K_k = \int_0^h e^u u^k/k!\,du`, and the predictor is DPM-Solver++ multistep in its
Taylor form (Lu et al. 2022): order 1 is DDIM, order 3 without corrector is
:func:`~shufflesgd.diffusion.samplers.dpm_solver.dpm_solver_pp_3m` with
``consistent_third_order=True`` on every third-order step, but the second-order steps use
:math:`\alpha_t h\varphi_2 D'` (diffusers' ``solver_type="heun"``) where DPM-Solver++(2M) uses
the midpoint form :math:`-\frac12\alpha_t(e^{-h}-1)D'`, so neither 2M nor 3M is matched
bit-for-bit beyond their first step (the difference per step is exactly
:math:`\alpha_t(h\varphi_2 + \frac12(e^{-h}-1))D'`, tested).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_finite, is_concrete
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_sampler_arguments,
    finish_at_zero,
    first_nonfinite,
)
from shufflesgd.diffusion.samplers.model_statistics import EMS, check_ems, dpm_solver_pp_ems

Array = jax.Array

#: The quadratures of the solver's coefficient integrals (the option ``quadrature``).
QUADRATURES = ("exponential", "trapezoid")

_SERIES_TERMS = 18  # psi_3 for |z| < 1: the last term is below 1 / (17! 3! 21) ~ 2e-17


def _psi(xp: Any, z: Array) -> list[Array]:
    r""":math:`\psi_m(z) = \int_0^1 e^{z\theta}\theta^m/m!\,d\theta` for m = 0..3 (``xp``:
    NumPy or ``jax.numpy``).

    For :math:`|z| < 1`: :math:`\psi_3` by its power series
    :math:`\sum_r z^r/(r!\,3!\,(r+4))` and the downward recurrence
    :math:`\psi_{m-1} = e^z/m! - z\psi_m` (errors shrink by :math:`|z|` a level); else the
    upward one, :math:`\psi_0 = (e^z-1)/z`, :math:`\psi_m = (e^z/m! - \psi_{m-1})/z` (errors
    grow by at most :math:`(m+1)/|z| \le 4` a level)."""
    small = xp.abs(z) < 1.0
    zs = xp.where(small, z, 0.0)
    zl = xp.where(small, 1.0, z)
    ez = xp.exp(z)
    series = xp.zeros_like(z) + 1.0 / (math.factorial(_SERIES_TERMS - 1) * 6 * (_SERIES_TERMS + 3))
    for r in reversed(range(_SERIES_TERMS - 1)):
        series = series * zs + 1.0 / (math.factorial(r) * 6 * (r + 4))
    down = [series]
    for m in (3, 2, 1):
        down.insert(0, ez / math.factorial(m) - zs * down[0])
    up = [(ez - 1.0) / zl]
    for m in (1, 2, 3):
        up.append((ez / math.factorial(m) - up[-1]) / zl)
    return [xp.where(small, d, u) for d, u in zip(down, up)]


@jax.jit
def _schedule_at(sde: SDE, t: Array) -> tuple[Array, Array, Array]:
    r""":math:`(\alpha, \sigma, \lambda)` at ``t``, :math:`\lambda = \log(\alpha/\sigma)`
    (:math:`+\infty` where :math:`\sigma = 0`)."""
    return sde.alpha(t), sde.sigma(t), 0.5 * sde.log_snr(t)


def _along(v: Array, like: Array) -> Array:
    """``v`` (``[M]``) shaped to broadcast against ``like`` (``[M, *shape]``)."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _cumulative(xp: Any, a: Array, w: Array, delta: Array, psi: list[Array] | None) -> Array:
    r""":math:`\int_{\mu_0}^{\mu_j} w\,e^{a}\,d\lambda` at every node :math:`\mu_j` (``a``,
    ``w`` ``[M, *shape]``, ``delta`` the node spacings): the trapezoid rule (``psi=None``), or
    exact for ``a`` and ``w`` linear between nodes (``psi`` of the increments of ``a``).  The
    maximum of ``a`` is factored out, as the authors do."""
    a_max = xp.max(a, axis=0)
    e = xp.exp(a - a_max)
    if psi is None:
        pieces = 0.5 * delta * (w[1:] * e[1:] + w[:-1] * e[:-1])
    else:
        pieces = delta * e[:-1] * (w[:-1] * psi[0] + (w[1:] - w[:-1]) * psi[1])
    total = xp.cumsum(pieces, axis=0) * xp.exp(a_max)
    return xp.concatenate([xp.zeros_like(total[:1]), total])


def _full(xp: Any, values: Any, shape: tuple[int, ...], dtype: Any) -> Array:
    """Statistics ``[K, *tail]`` (``tail`` broadcastable to ``shape``) as ``[K, *shape]``."""
    values = xp.asarray(values, dtype)
    tail = values.shape[1:]
    values = values.reshape(values.shape[:1] + (1,) * (len(shape) - len(tail)) + tail)
    return xp.broadcast_to(values, values.shape[:1] + tuple(shape))


def _argsort(xp: Any, a: Array) -> Array:
    return np.argsort(a, kind="stable") if xp is np else jnp.argsort(a, stable=True)


def _segment_sum(xp: Any, data: Array, segments: Array, num_segments: int) -> Array:
    if xp is not np:
        return jax.ops.segment_sum(data, segments, num_segments=num_segments)
    out = np.zeros((num_segments, *data.shape[1:]), data.dtype)
    np.add.at(out, segments, data)
    return out


def _prepare(
    xp: Any, lam: Array, alpha: Array, mu: Array, fields: Array, quadrature: str
) -> tuple[Array, ...]:
    r"""Everything the steps need from the grid and the statistics, with ``xp`` NumPy (a concrete
    grid and statistics: computed once in float64, no XLA program) or ``jax.numpy`` (traced).

    ``lam``, ``alpha`` ``[N+1]`` at the grid (``lam`` finite), ``mu`` ``[K]`` and ``fields``
    ``[K, 3, *shape]`` (:math:`l, s, b`).  The two grids are merged and sorted, the statistics
    interpolated linearly at every node (constant beyond the ends), :math:`L, S` (exact for the
    interpolated :math:`l, s`) and :math:`B` integrated; every merged interval lies in one
    sampler step (or none), so each step's integrals, relative to its start, are segment sums.
    Returns the factors of each step (of :math:`x_s`, :math:`g_s`, the :math:`b` term and the
    three derivatives) and :math:`l, S, B` at the grid points."""
    num_steps, k = lam.shape[0] - 1, mu.shape[0]
    merged = xp.concatenate([mu, lam])
    permutation = _argsort(xp, merged)
    nodes = merged[permutation]
    at = _argsort(xp, permutation)[k:]  # the inverse permutation: each grid point's node
    from_stats = permutation < k
    step = xp.cumsum(~from_stats)[:-1] - 1  # -1 before the first grid point, N after the last
    if k == 1:
        values = xp.broadcast_to(fields[0], nodes.shape + fields.shape[1:])
    else:
        index = xp.clip(xp.cumsum(from_stats) - 1, 0, k - 2)  # the statistics node at or below
        low, high = mu[index], mu[index + 1]
        weight = _along(xp.clip((nodes - low) / (high - low), 0.0, 1.0), fields[index])
        values = fields[index] * (1.0 - weight) + fields[index + 1] * weight
    l_m, s_m, b_m = (values[:, m] for m in range(3))
    delta = _along(xp.diff(nodes), l_m)
    integrals = _cumulative(  # exact for the piecewise-linear l and s
        xp, xp.zeros_like(values[:, :2]), values[:, :2], delta[:, None], None
    )
    big_l, big_s = integrals[:, 0], integrals[:, 1]
    a = big_l + big_s
    if quadrature == "trapezoid":
        psi = psi_b = None
    else:  # one evaluation for the increments of both exponents
        both = _psi(xp, xp.stack([a[1:] - a[:-1], big_s[:-1] - big_s[1:]]))
        psi, psi_b = [v[0] for v in both], [v[1] for v in both]
    big_b = _cumulative(xp, -big_s, b_m, delta, psi_b)

    valid = (step >= 0) & (step < num_steps)
    start = at[xp.clip(step, 0, num_steps - 1)]
    a_s, s_s, b_s = a[start], big_s[start], big_b[start]
    inside = _along(valid, a_s)
    e0 = xp.exp(xp.where(inside, a[:-1] - a_s, 0.0))
    e1 = xp.exp(xp.where(inside, a[1:] - a_s, 0.0))
    dist = _along(nodes[:-1] - nodes[start], a_s)
    w_b = xp.exp(s_s) * (big_b[:-1] - b_s), xp.exp(s_s) * (big_b[1:] - b_s)
    if quadrature == "trapezoid":
        dist_next = dist + delta
        weights = [
            (xp.ones_like(a_s), xp.ones_like(a_s)),
            w_b,
            *((dist**m / math.factorial(m), dist_next**m / math.factorial(m)) for m in (1, 2, 3)),
        ]
        pieces = [0.5 * delta * (w0 * e0 + w1 * e1) for w0, w1 in weights]
    else:
        polys = [dist**m / math.factorial(m) for m in range(4)]
        pieces = [
            delta * e0 * psi[0],
            delta * e0 * (w_b[0] * psi[0] + (w_b[1] - w_b[0]) * psi[1]),
            *(
                e0 * sum(polys[kk - m] * delta ** (m + 1) * psi[m] for m in range(kk + 1))
                for kk in (1, 2, 3)
            ),
        ]
    pieces = xp.where(inside[:, None], xp.stack(pieces, axis=1), 0.0)
    sums = _segment_sum(xp, pieces, xp.where(valid, step, num_steps), num_steps + 1)[:num_steps]
    decay = xp.exp(big_l[at[:-1]] - big_l[at[1:]])
    scale = _along(alpha[1:], decay) * decay
    c_x = _along(alpha[1:] / alpha[:-1], decay) * decay
    c_g, c_b, c_k = scale * sums[:, 0], scale * sums[:, 1], scale[:, None] * sums[:, 2:]
    return c_x, c_g, c_b, c_k, l_m[at], big_s[at], big_b[at]


def _check_options(
    order: Any, flags: dict[str, Any], corrector_t_min: Any, quadrature: Any
) -> None:
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got order={order!r}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {name}={flag!r}")
    check_finite("corrector_t_min", corrector_t_min)
    if quadrature not in QUADRATURES:
        raise ValueError(f"quadrature must be one of {list(QUADRATURES)}, got {quadrature!r}")


def _derivatives(lam: Array, g: Array, n: Array, pseudo: bool) -> Array:
    r"""The first three derivatives at ``lam[0]`` of the polynomial through the first
    :math:`n + 1` of the four points ``(lam, g)`` (``n`` traced, 0..3), or with ``pseudo`` the
    scaled divided differences :math:`k!F_k`; zero beyond ``n``.  Denominators of unused points
    (repeated during warm-up) are replaced by one, so nothing non-finite is formed."""
    table = [g]
    for level in (1, 2, 3):
        den = lam[: 4 - level] - lam[level:]
        den = _along(jnp.where(den == 0, 1.0, den), g)
        table.append((table[-1][:-1] - table[-1][1:]) / den)
    f1, f2, f3 = (jnp.where(n >= k, table[k][0], 0.0) for k in (1, 2, 3))
    if pseudo:
        return jnp.stack([f1, 2.0 * f2, 6.0 * f3])
    d1, d2 = lam[1] - lam[0], lam[2] - lam[0]
    return jnp.stack([f1 - d1 * f2 + d1 * d2 * f3, 2.0 * (f2 - (d1 + d2) * f3), 6.0 * f3])


def dpm_solver_v3(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    statistics: EMS | None = None,
    order: int = 3,
    predictor_pseudo: bool = False,
    use_corrector: bool = True,
    corrector_pseudo: bool = True,
    corrector_t_min: float | Array = 0.0,
    lower_order_final: bool = True,
    quadrature: str = "exponential",
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver
    with Empirical Model Statistics", NeurIPS 2023, Sec. 3): the multistep predictor-corrector
    on the probability-flow ODE re-parameterised by the empirical model statistics
    ``statistics`` (an :class:`~shufflesgd.diffusion.samplers.model_statistics.EMS`; the math
    is in this module's docstring).  One model evaluation a step (``nfe = N``, plus the final
    one): the corrector reuses the evaluation of the point it corrects.

    Options (defaults as in the authors' README example): ``statistics`` (``None``:
    :math:`l = 1, s = b = 0`, the DPM-Solver++ parameterisation); ``order`` 1, 2 or 3 of the
    predictor; ``predictor_pseudo`` (pseudo-order derivatives in the predictor, the authors' 5-step
    CIFAR-10 setting); ``use_corrector``; ``corrector_pseudo`` (a pseudo-order corrector of the
    predictor's order + 1, else of its order); ``corrector_t_min``: the corrector runs only at
    points with :math:`t > ` ``corrector_t_min`` (may be traced; the authors' ``half=True`` is
    0.5 in their VP time, and their code runs the corrector where :math:`t > 0.5` although their
    README says :math:`t \le 0.5`: we follow the code); ``lower_order_final``;
    ``quadrature`` (``"exponential"`` or the authors' ``"trapezoid"``, module docstring);
    ``final="denoise"``.  The grid needs :math:`\alpha > 0` throughout (``ValueError`` for a
    concrete grid).  A step to :math:`\sigma = 0` (a grid ending at zero) returns
    :math:`\alpha_t\hat x_0` from the previous point, as DPM-Solver++ does; the model is never
    evaluated at :math:`\sigma = 0`.  Orders and the corrector's switch are data (``jnp.where``),
    so one program serves every step; the coefficients depend on the grid and the statistics
    only and are computed once before the scan.  Deterministic: ``key`` and ``noise`` are
    unused.

    ``ValueError`` naming the option for an order outside 1..3, a non-bool switch, a non-finite
    ``corrector_t_min``, an unknown quadrature, or statistics of the wrong shape (leading
    dimension K shared by ``lambdas``, ``l``, ``s``, ``b``; trailing shape broadcastable to
    ``x``), non-finite or with non-increasing ``lambdas`` (``TypeError`` if not an ``EMS`` of
    floats), all before tracing.
    """
    del key, noise
    check_sampler_arguments(grid, final, x=x)
    _check_options(
        order,
        dict(
            predictor_pseudo=predictor_pseudo,
            use_corrector=use_corrector,
            corrector_pseudo=corrector_pseudo,
            lower_order_final=lower_order_final,
        ),
        corrector_t_min,
        quadrature,
    )
    if statistics is None:
        statistics = dpm_solver_pp_ems()
    check_ems("statistics", statistics, tuple(np.shape(x)))

    x = jnp.asarray(x)
    dtype = x.dtype
    concrete_grid = np.asarray(grid) if is_concrete(grid) else None
    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    # the schedule, the statistics and everything computed from them alone: in NumPy (float64,
    # no XLA program) when the grid and the statistics are concrete, a grid closed over by jit
    # included (the schedule point by point, one compiled program for every grid); traced
    # otherwise
    if concrete_grid is not None:
        with jax.ensure_compile_time_eval():
            points = [_schedule_at(sde, t) for t in concrete_grid]
        alpha, sigma, lam = (np.array(v, np.float64) for v in zip(*points))
        if not np.all((alpha > 0) & (lam > -np.inf)):
            raise ValueError("grid must have alpha(t) > 0 at every time for dpm_solver_v3")
        lam[lam == np.inf] = np.max(lam[np.isfinite(lam)])
    else:
        alpha, sigma, lam = _schedule_at(sde, grid)
        finite = jnp.isfinite(lam)
        lam = jnp.where(lam == jnp.inf, jnp.max(jnp.where(finite, lam, -jnp.inf)), lam)
    if all(is_concrete(v) for v in (alpha, lam, *statistics)):
        lam_np, alpha_np, mu, *rest = (np.asarray(v, np.float64) for v in (lam, alpha, *statistics))
        fields = np.stack([_full(np, v, x.shape, np.float64) for v in rest], axis=1)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            prepared = _prepare(np, lam_np, alpha_np, mu, fields, quadrature)
    else:
        alpha, lam = jnp.asarray(alpha, dtype), jnp.asarray(lam, dtype)
        mu = jnp.asarray(statistics.lambdas, dtype)
        fields = jnp.stack([_full(jnp, v, x.shape, dtype) for v in statistics[1:]], axis=1)
        prepared = _prepare(jnp, lam, alpha, mu, fields, quadrature)
    alpha, sigma, lam = (jnp.asarray(v, dtype) for v in (alpha, sigma, lam))
    prepared = tuple(jnp.asarray(v, dtype) for v in prepared)
    c_x, c_g, c_b, c_k, l_n, s_n, b_n = prepared
    index = jnp.arange(num_steps)
    step_order = jnp.minimum(order, index + 1)
    if lower_order_final:
        step_order = jnp.minimum(step_order, num_steps - index)
    previous_order = jnp.concatenate([jnp.zeros(1, step_order.dtype), step_order[:-1]])
    # per step i, its points i, i-1, i-2, i-3 (clipped at 0: unused during warm-up), and the
    # corrector's, which redoes the step i-1 -> i: i-1, i, i-2, i-3
    points = jnp.maximum(index[:, None] - jnp.arange(4), 0)
    back = jnp.maximum(index - 1, 0)
    per_point = (lam, sigma, alpha, l_n, s_n, b_n)
    inputs = (
        grid[:-1],
        alpha[1:],
        sigma[1:],
        tuple(v[points] for v in per_point),
        tuple(v[points[:, (1, 0, 2, 3)]] for v in per_point),
        (c_x, c_g, c_b, c_k),
        tuple(v[back] for v in (c_x, c_g, c_b, c_k)),
        step_order - 1,
        previous_order + int(corrector_pseudo) - 1,
    )

    def update(xs, epss, at_points, coefficients, n, pseudo):
        """The step from the first of the four points ``xs`` through the first ``n + 1``."""
        lam_p, sigma_p, alpha_p, l_p, s_p, b_p = at_points
        f = (_along(sigma_p, xs) * epss - l_p * xs) / _along(alpha_p, xs)
        g = jnp.exp(s_p[0] - s_p) * f - jnp.exp(s_p[0]) * (b_p - b_p[0])
        cx, cg, cb, ck = coefficients
        derivatives = _derivatives(lam_p, g, n, pseudo)
        return cx * xs[0] - cg * g[0] - cb - jnp.sum(ck * derivatives, axis=0)

    def body(carry, step):
        x, past_x, past_eps = carry  # past_*: the points i-1, i-2, i-3 (zeros before the start)
        t, alpha_next, sigma_next, at_points, at_back, predictor, corrector, n_p, n_c = step
        _, sigma_p, alpha_p, l_p, _, _ = at_points
        eps = model.predict(sde, x, t, "eps").astype(dtype)
        if use_corrector:
            corrected = update(
                jnp.concatenate([past_x[:1], x[None], past_x[1:]]),
                jnp.concatenate([past_eps[:1], eps[None], past_eps[1:]]),
                at_back,
                corrector,
                n_c,
                corrector_pseudo,
            )
            apply = (n_c >= 1) & (t > corrector_t_min)
            nonlinear = sigma_p[0] * eps - l_p[0] * x
            eps = jnp.where(apply, (nonlinear + l_p[0] * corrected) / sigma_p[0], eps)
            x = jnp.where(apply, corrected, x)
        xs = jnp.concatenate([x[None], past_x])
        epss = jnp.concatenate([eps[None], past_eps])
        x_next = update(xs, epss, at_points, predictor, n_p, predictor_pseudo)
        x0 = (x - sigma_p[0] * eps) / alpha_p[0]
        x_next = jnp.where(sigma_next > 0, x_next, alpha_next * x0).astype(dtype)
        return (x_next, xs[:3], epss[:3]), jnp.all(jnp.isfinite(x_next))

    history = jnp.zeros((3, *x.shape), dtype)
    (x, _, _), finite_steps = jax.lax.scan(body, (x, history, history), inputs)
    return finish_at_zero(
        model, sde, x, grid, final, jnp.asarray(num_steps), first_nonfinite(finite_steps)
    )
