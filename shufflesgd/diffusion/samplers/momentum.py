r"""Momentum samplers: Polyak's heavy ball (HB) on multistep diffusion solvers, and the
Generalized Heavy Ball (GHVB).

Wizadwongsa, Chinchuthakun, Khungurn, Raj & Suwajanakorn 2024, "Diffusion Sampling with
Momentum for Mitigating Divergence Artifacts" (ICLR 2024).  High-order multistep solvers have
small stability regions: on the test equation :math:`u' = \lambda u` (their Sec. 3.2 and
App. B, :math:`\lambda` an eigenvalue of the Jacobian of the model output, which a large
guidance scale inflates) a step :math:`\delta` with :math:`\delta\lambda` outside the region
makes the numerical solution grow from step to step — the divergence artifacts of few-step,
strongly guided sampling.  Polyak's heavy ball with damping :math:`\beta \in (0, 1]` applied to
a multistep method :math:`x_{n+1} = x_n + \delta\sum_i b_i f(x_{n-i})`,

.. math:: v_{n+1} = (1-\beta)v_n + \beta\sum_i b_i f(x_{n-i}), \qquad
          x_{n+1} = x_n + \delta v_{n+1}

(their Eq. 14 and Alg. 1), enlarges the stability region (their Fig. 4; App. D, Eqs. 40-43)
but is first order for every :math:`\beta < 1` (their Theorem 1, App. F).  GHVB averages the
model output itself and recombines the averages with :math:`\beta`-dependent Adams weights
(their Sec. 4.2, Eqs. 15-19 and Alg. 2): its region is larger too (their Fig. 6; Eqs. 44-47)
and its order stays :math:`r` for every :math:`\beta` (their Theorem 2).  At :math:`\beta = 1`
each is its plain solver.

* :func:`dpm_solver_pp_hb`: HB on DPM-Solver++ multistep (data prediction, in
  :math:`\lambda = \log(\alpha/\sigma)`), the authors' modified ``dpm_solver_pytorch.py``;
* :func:`plms_hb`: HB on PLMS, i.e. Adams–Bashforth on the DDIM ODE (their Alg. 1);
* :func:`ghvb`: GHVB of orders 1-5 (their Alg. 2).

One model evaluation a step for all three.  The damping ``beta`` may be traced (one compiled
program serves a ``vmap`` over :math:`\beta`); the ``order`` is static and checked up front.
"""

from __future__ import annotations

from math import comb
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import is_concrete
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_sampler_arguments,
    finish_at_zero,
    first_nonfinite,
)

Array = jax.Array

#: The coefficients :math:`\gamma_j` of Adams–Bashforth written in backward differences,
#: :math:`x_{n+1} - x_n = \delta\sum_j\gamma_j\nabla^j f_n` (Wizadwongsa et al. 2024, Eq. 15).
ADAMS_BASHFORTH_GAMMA = (1.0, 1.0 / 2.0, 5.0 / 12.0, 3.0 / 8.0, 251.0 / 720.0)

#: The orders :func:`ghvb` and :func:`plms_hb` take.
ADAMS_ORDERS = (1, 2, 3, 4, 5)

#: The orders :func:`dpm_solver_pp_hb` takes.
DPM_SOLVER_ORDERS = (1, 2, 3)


def _check_beta(beta: Any) -> None:
    """``ValueError`` unless every entry of a concrete ``beta`` lies in (0, 1] (NaN fails; a
    tracer passes)."""
    if is_concrete(beta):
        b = np.asarray(beta, np.float64)
        if not np.all((b > 0.0) & (b <= 1.0)):
            raise ValueError(f"beta must lie in (0, 1], got beta={beta!r}")


def _check_order(order: Any, allowed: tuple[int, ...]) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order not in allowed:
        raise ValueError(f"order must be one of {list(allowed)}, got order={order!r}")
    return int(order)


def ghvb_weights(order: int, beta: float | Array, active: int | Array | None = None) -> Array:
    r"""The weights :math:`w_m` of GHVB of ``order`` :math:`r` with damping ``beta``:
    :math:`x_{n+1} = x_n + \delta\sum_{m<r} w_m v_{n+1-m}` (Wizadwongsa et al. 2024, Alg. 2).

    Adams–Bashforth is :math:`\nabla x_{n+1} = \delta\sum_j\gamma_j\nabla^j f_n` (their
    Eq. 15).  The velocity obeys :math:`(\beta + (1-\beta)\nabla)v_{n+1} = \beta f_n`;
    multiplying by that operator gives the series
    :math:`\mu_j = \beta\gamma_j + (1-\beta)\gamma_{j-1}` (their Eq. 16), and keeping its first
    :math:`r` terms and dividing the operator out (their Eqs. 17-19),
    :math:`\nabla x_{n+1} = \frac\delta\beta\sum_{j<r}\mu_j\nabla^j v_{n+1}`, i.e.
    :math:`w_m = \frac1\beta\sum_{j<r}\mu_j(-1)^m\binom jm`.  At :math:`\beta = 1` these are
    the Adams–Bashforth weights (PLMS); order 1 is :math:`w_0 = 1`.  ``active`` (default
    ``order``; may be traced) keeps only the first ``active`` terms: the warm-up steps, which
    have fewer velocities.  ``order`` is static, ``beta`` may be traced."""
    gamma = np.asarray(ADAMS_BASHFORTH_GAMMA[:order])
    previous = np.concatenate([[0.0], gamma[:-1]])
    signed_binomial = np.array(
        [[(-1.0) ** m * comb(j, m) for m in range(order)] for j in range(order)]
    )
    mu = beta * gamma + (1.0 - beta) * previous
    if active is not None:
        mu = jnp.where(np.arange(order) < active, mu, 0.0)
    return (mu @ signed_binomial) / beta


def _adams_momentum(
    kind: str,
    order: int,
    beta: float | Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    final: str,
) -> tuple[Array, SamplerInfo]:
    """PLMS with heavy ball (``kind="hb"``) or GHVB (``kind="ghvb"``) in the DDIM variables."""
    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    alpha, sigma = sde.alpha(grid), sde.sigma(grid)
    noise_level = sigma / alpha  # the DDIM ODE's time: sigma / alpha
    index = jnp.arange(num_steps)
    active = jnp.minimum(order, index + 1)  # warm-up: as many terms as there are outputs

    def body(carry, inputs):
        x, history, v = carry  # history[m]: the average (GHVB) or output (HB) m steps back
        i, t, a, a_next, s, s_next, c = inputs
        eps = model.predict(sde, x, t, "eps")
        if kind == "ghvb":
            v = jnp.where(i == 0, eps, (1.0 - beta) * v + beta * eps)
            history = jnp.concatenate([v[None], history[:-1]])
            slope = jnp.tensordot(ghvb_weights(order, beta, c), history, axes=1)
        else:
            history = jnp.concatenate([eps[None], history[:-1]])
            combined = jnp.tensordot(ghvb_weights(order, 1.0, c), history, axes=1)
            v = jnp.where(i == 0, combined, (1.0 - beta) * v + beta * combined)
            slope = v
        x = (a_next * (x / a + (s_next - s) * slope)).astype(dtype)
        return (x, history.astype(dtype), v.astype(dtype)), jnp.all(jnp.isfinite(x))

    inputs = (
        index,
        grid[:-1],
        alpha[:-1],
        alpha[1:],
        noise_level[:-1],
        noise_level[1:],
        active,
    )
    dtype = jnp.result_type(x)
    history = jnp.zeros((order, *jnp.shape(x)), dtype)
    (x, _, _), finite = jax.lax.scan(body, (x, history, jnp.zeros_like(x)), inputs)
    return finish_at_zero(
        model, sde, x, grid, final, jnp.asarray(num_steps), first_nonfinite(finite)
    )


def ghvb(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    order: int = 4,
    beta: float | Array = 0.8,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Generalized Heavy Ball (Wizadwongsa et al. 2024, "Diffusion Sampling with Momentum for
    Mitigating Divergence Artifacts", Sec. 4.2, Eq. 19, Alg. 2), the authors' "GHVB
    :math:`r - 1 + \beta`".

    On the DDIM ODE :math:`d\bar x/d\bar\sigma = \hat\varepsilon` (their Eq. 2) with
    :math:`\bar x = x/\alpha` and :math:`\bar\sigma = \sigma/\alpha`, step
    :math:`\delta_n = \bar\sigma_{n+1} - \bar\sigma_n`:

    .. math:: v_{n+1} = (1-\beta)v_n + \beta\hat\varepsilon(x_n), \qquad
              \bar x_{n+1} = \bar x_n + \delta_n\sum_{m<r} w_m(\beta)\,v_{n+1-m},

    with :math:`v_1 = \hat\varepsilon(x_0)` and the weights of :func:`ghvb_weights`; order 2
    is :math:`\bar x_{n+1} = \bar x_n + \delta_n\frac{(2+\beta)v_{n+1} - (2-\beta)v_n}{2\beta}`
    (their Eq. 19).  The momentum averages the noise prediction, before the Adams
    recombination (HB, :func:`plms_hb`, averages after it).  Warm-up as the authors' code
    (``plms_b_mixer``): step :math:`n` uses :math:`\min(r, n+1)` terms.  GHVB of order
    :math:`r` has order of accuracy :math:`r` for every :math:`\beta \in (0, 1]` (their
    Theorem 2, App. F) on equal steps in :math:`\bar\sigma`, which its weights (like PLMS's)
    assume: with unequal steps (Karras, log-SNR grids) fixed weights are consistent to second
    order only, and the lower-order warm-up steps add an :math:`O(\delta^2)` error unless the
    grid starts where :math:`\hat\varepsilon` barely changes, so orders above 2 show on long
    grids of equal :math:`\bar\sigma` steps.  Orders
    1-5; :math:`\beta = 1` is PLMS (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
    Models on Manifolds", with Adams–Bashforth warm-up steps) and order 1 at :math:`\beta = 1`
    is DDIM; order 1 is :func:`plms_hb` of order 1 for every :math:`\beta`.  A smaller
    :math:`\beta` trades accuracy for a larger stability region (their Fig. 6).

    ``beta`` may be traced; ``order`` is static.  One evaluation a step (``nfe = N``, plus the
    final one); a step to :math:`\sigma = 0` is an ordinary step (the ODE in
    :math:`\bar\sigma` is regular there) and the model is never evaluated at :math:`\sigma = 0`.
    Deterministic: ``key`` and ``noise`` are unused.  ``ValueError`` for ``order`` outside
    1-5 or a concrete ``beta`` outside (0, 1].  Defaults: ``order=4``, ``beta=0.8`` (GHVB 3.8,
    the authors' DiT setting), ``final="denoise"`` (one more evaluation when the grid ends at
    :math:`\sigma > 0`)."""
    del key, noise
    check_sampler_arguments(grid, final, x=x)
    order = _check_order(order, ADAMS_ORDERS)
    _check_beta(beta)
    return _adams_momentum("ghvb", order, beta, model, sde, x, grid, final)


def plms_hb(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    order: int = 4,
    beta: float | Array = 0.8,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""PLMS with Polyak's heavy-ball momentum (Wizadwongsa et al. 2024, "Diffusion Sampling
    with Momentum for Mitigating Divergence Artifacts", Sec. 4.1, Eq. 14, Alg. 1).

    On the DDIM ODE :math:`d\bar x/d\bar\sigma = \hat\varepsilon` (their Eq. 2;
    :math:`\bar x = x/\alpha`, :math:`\bar\sigma = \sigma/\alpha`,
    :math:`\delta_n = \bar\sigma_{n+1} - \bar\sigma_n`), with the Adams–Bashforth combination
    :math:`\hat e_n = \sum_{m<r} b_m\hat\varepsilon(x_{n-m})` of PLMS
    (:math:`b = 1`; :math:`(3, -1)/2`; :math:`(23, -16, 5)/12`; :math:`(55, -59, 37, -9)/24`;
    ...):

    .. math:: v_{n+1} = (1-\beta)v_n + \beta\hat e_n, \qquad
              \bar x_{n+1} = \bar x_n + \delta_n v_{n+1},

    :math:`v_1 = \hat\varepsilon(x_0)`, step :math:`n` of order :math:`\min(r, n+1)`, as the
    authors' ``PLMSWithHBScheduler``.  The momentum averages the combined slope.
    :math:`\beta = 1` is PLMS (order :math:`r` on equal :math:`\bar\sigma` steps); any
    :math:`\beta < 1` makes it first order (their Theorem 1) while enlarging the stability
    region (their Fig. 4, App. D Eqs. 40-43).  Orders 1-5; order 1 equals :func:`ghvb` of
    order 1.  ``beta`` may be traced; ``order`` is static.  One evaluation a step; steps to
    :math:`\sigma = 0`, ``key``, ``noise``, errors and ``final`` as :func:`ghvb`.  Defaults:
    ``order=4``, ``beta=0.8`` (PLMS4 with HB 0.8 as in the paper's DiT table),
    ``final="denoise"``."""
    del key, noise
    check_sampler_arguments(grid, final, x=x)
    order = _check_order(order, ADAMS_ORDERS)
    _check_beta(beta)
    return _adams_momentum("hb", order, beta, model, sde, x, grid, final)


def dpm_solver_pp_hb(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    order: int = 2,
    beta: float | Array = 0.8,
    lower_order_final: bool = True,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""DPM-Solver++ multistep with Polyak's heavy-ball momentum (Wizadwongsa et al. 2024,
    "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts", Eq. 14 applied to
    Lu et al. 2022, "DPM-Solver++", Alg. 2), as the authors' modified ``dpm_solver_pytorch.py``
    (``multistep_dpm_solver_second_update``) and ``MomentumDPMSolverMultistepScheduler``.

    DPM-Solver++ writes a step from :math:`t_{i-1}` to :math:`t_i`, with
    :math:`\lambda = \log(\alpha/\sigma)`, :math:`h_i = \lambda_i - \lambda_{i-1}` and
    :math:`\varphi_1 = e^{-h_i} - 1`, as
    :math:`x_i = \frac{\sigma_i}{\sigma_{i-1}}x_{i-1} - \alpha_i\varphi_1 P_i` with
    :math:`P_i` a combination of the previous data predictions :math:`D`
    (:func:`shufflesgd.diffusion.dpm_solver_pp_2m`: order 1 :math:`P = D_{i-1}`, DDIM; order
    2 :math:`P = (1 + \frac1{2r_i})D_{i-1} - \frac1{2r_i}D_{i-2}`, :math:`r_i = h_{i-1}/h_i`;
    order 3 the reference third-order update of
    :func:`shufflesgd.diffusion.dpm_solver_pp_3m`, divided by :math:`-\alpha_i\varphi_1`).
    Heavy ball averages that data-space slope:

    .. math:: v_i = (1-\beta)v_{i-1} + \beta P_i, \qquad
              x_i = \frac{\sigma_i}{\sigma_{i-1}}x_{i-1} - \alpha_i\varphi_1 v_i,

    with :math:`v_0 = D_0`, so the first step is DDIM.  A step whose order ``lower_order_final``
    lowers (with fewer than 15 steps, diffusers' rule as in
    :func:`shufflesgd.diffusion.dpm_solver_pp_2m`, where the authors' code says 10: the last
    step, and for order 3 the one before) and a step to :math:`\sigma = 0`
    (:math:`x = \alpha D`) are the plain solver's, without momentum, as the authors' code does
    for order 2 (it has no other order).  :math:`\beta = 1` is DPM-Solver++(``order``M)
    exactly (order 1: DDIM); for :math:`\beta < 1` the method is first order (their Theorem 1)
    with a larger stability region.  ``beta`` may be traced; ``order`` (1, 2 or 3) is static.
    One evaluation a step (``nfe = N``, plus the final one); the model is never evaluated at
    :math:`\sigma = 0`.
    Deterministic: ``key`` and ``noise`` are unused.  ``ValueError`` for a bad ``order``, a
    concrete ``beta`` outside (0, 1] or a non-bool ``lower_order_final``.  Defaults:
    ``order=2``, ``beta=0.8`` (the authors' default, "DPM-Solver++ w/ HB 0.8"),
    ``lower_order_final=True``, ``final="denoise"``."""
    del key, noise
    check_sampler_arguments(grid, final, x=x)
    order = _check_order(order, DPM_SOLVER_ORDERS)
    _check_beta(beta)
    if not isinstance(lower_order_final, bool):
        raise ValueError(
            f"lower_order_final must be a bool, got lower_order_final={lower_order_final!r}"
        )
    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    lam = 0.5 * sde.log_snr(grid)  # +inf where sigma = 0
    alpha, sigma = sde.alpha(grid), sde.sigma(grid)
    index = jnp.arange(num_steps)
    step_order = jnp.minimum(order, index + 1)
    lowered = jnp.zeros(num_steps, bool)
    if lower_order_final and num_steps < 15:
        final_order = jnp.minimum(step_order, num_steps - index)
        lowered = final_order < step_order
        step_order = final_order
    to_zero = ~(sigma[1:] > 0)
    step_order = jnp.where(to_zero, 1, step_order)
    plain = lowered | to_zero  # the solver's own step, no momentum

    def body(carry, inputs):
        x, v, d_m1, d_m2 = carry  # velocity; the two previous data predictions
        i, t, lam_i, lam_p, lam_p2, lam_n, a_n, s_i, s_n, o, plain_step = inputs
        d0 = model.predict(sde, x, t, "x0")
        zero = ~(s_n > 0)
        h = jnp.where(zero, 1.0, lam_n - lam_i)
        phi1 = jnp.where(zero, -1.0, jnp.expm1(-h))
        o2, o3 = o >= 2, o >= 3
        r0 = jnp.where(o2, (lam_i - lam_p) / h, 1.0)
        r1 = jnp.where(o3, (lam_p - lam_p2) / h, 1.0)
        second = (1.0 + 0.5 / r0) * d0 - (0.5 / r0) * d_m1
        # third: -a phi1 d0 + a phi2 D1 - a phi3 D2 = -a phi1 (d0 - phi2/phi1 D1 + phi3/phi1 D2)
        phi2 = phi1 / h + 1.0
        phi3 = phi2 / h - 0.5
        d1_0, d1_1 = (d0 - d_m1) / r0, (d_m1 - d_m2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        third = d0 - (phi2 / phi1) * d1 + (phi3 / phi1) * d2
        slope = jnp.where(o3, third, jnp.where(o2, second, d0))
        v = jnp.where(i == 0, slope, jnp.where(plain_step, v, (1.0 - beta) * v + beta * slope))
        x = ((s_n / s_i) * x - a_n * phi1 * jnp.where(plain_step, slope, v)).astype(x.dtype)
        return (x, v.astype(x.dtype), d0.astype(x.dtype), d_m1), jnp.all(jnp.isfinite(x))

    inputs = (
        index,
        grid[:-1],
        lam[:-1],
        lam[jnp.maximum(index - 1, 0)],
        lam[jnp.maximum(index - 2, 0)],
        lam[1:],
        alpha[1:],
        sigma[:-1],
        sigma[1:],
        step_order,
        plain,
    )
    zeros = jnp.zeros_like(x)
    (x, _, _, _), finite = jax.lax.scan(body, (x, zeros, zeros, zeros), inputs)
    return finish_at_zero(
        model, sde, x, grid, final, jnp.asarray(num_steps), first_nonfinite(finite)
    )
