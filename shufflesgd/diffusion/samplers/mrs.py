r"""MRS, the fast sampler of mean-reverting diffusion: exponential integrators of its reverse SDE
and probability-flow ODE.

Li, Fang, Zhao, Lu, Yang & Xu (2025), "MRS: A Fast Sampler for Mean Reverting Diffusion based on
ODE and SDE Solvers" (ICLR 2025, arXiv:2502.07856), for the mean-reverting SDE
:math:`dx = \theta_t(\mu - x)\,dt + \sqrt{2\lambda^2\theta_t}\,dw` of IR-SDE
(:class:`shufflesgd.diffusion.MeanReverting`, with :math:`\alpha_t = e^{-\bar\theta_t}` and
:math:`\sigma_t = \lambda\sqrt{1-\alpha_t^2}`).  In the half log-SNR
:math:`\lambda_t = \log(\alpha_t/\sigma_t)` the linear part of both reverse-time equations is
solved exactly and only an integral of the network's prediction is left; from :math:`s` to
:math:`t < s` with :math:`h = \lambda_t - \lambda_s > 0`, the PF-ODE is

.. math:: x_t = \frac{\alpha_t}{\alpha_s}x_s + \Bigl(1-\frac{\alpha_t}{\alpha_s}\Bigr)\mu
          - \alpha_t\int_{\lambda_s}^{\lambda_t}e^{-\lambda}\hat\varepsilon_\lambda\,d\lambda
          = \frac{\sigma_t}{\sigma_s}x_s + \Bigl(1-\frac{\sigma_t}{\sigma_s}\Bigr)\mu
          + \sigma_t\int_{\lambda_s}^{\lambda_t}e^{\lambda}(\hat x_{0,\lambda}-\mu)\,d\lambda

(noise prediction :math:`\hat\varepsilon`, data prediction :math:`\hat x_0`), and the reverse
SDE, whose Itô integral is a Gaussian of known variance,

.. math:: x_t = \frac{\alpha_t}{\alpha_s}x_s + \Bigl(1-\frac{\alpha_t}{\alpha_s}\Bigr)\mu
          - 2\alpha_t\int_{\lambda_s}^{\lambda_t}e^{-\lambda}\hat\varepsilon_\lambda\,d\lambda
          + \sigma_t\sqrt{e^{2h}-1}\,z
          = \frac{\sigma_t}{\sigma_s}e^{-h}(x_s-\mu) + \mu
          + 2\alpha_t\int_{\lambda_s}^{\lambda_t}e^{-2(\lambda_t-\lambda)}(\hat x_{0,\lambda}-\mu)
          \,d\lambda + \sigma_t\sqrt{1-e^{-2h}}\,z.

The solvers replace the prediction by its Taylor polynomial in :math:`\lambda` through the
previous predictions (multistep: one model evaluation a step whatever the order) and integrate
it exactly.  On the centred :math:`y = x - \mu`, a zero-mean linear process, these are the
exponential integrators of Lu et al. (2022), "DPM-Solver: A Fast ODE Solver for Diffusion
Probabilistic Model Sampling in Around 10 Steps" (noise prediction) and "DPM-Solver++: Fast
Solver for Guided Sampling of Diffusion Probabilistic Models" (data prediction, and the SDE
solvers' form), in their Taylor-expansion variant; the :math:`\mu` terms come from undoing the
centring.  :func:`shufflesgd.diffusion.sample_centred` runs the house's other samplers that way.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd.diffusion.mean_reverting import (
    MeanReverting,
    centred_model,
    check_mean_reverting,
    convert_mean_reverting,
)
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_model_output,
    check_sampler_arguments,
    draw,
    finish_at_zero,
    first_nonfinite,
)

Array = jax.Array

#: The equations MRS solves (its ``solver`` option).
MRS_SOLVERS = ("ode", "sde")
#: What the update is written for (its ``prediction`` option).
MRS_PREDICTIONS = ("data", "noise")


def _check_mrs_options(
    solver: Any,
    prediction: Any,
    order: Any,
    lower_order_final: Any,
    consistent_third_order: Any,
) -> None:
    if solver not in MRS_SOLVERS:
        raise ValueError(f"solver must be one of {list(MRS_SOLVERS)}, got solver={solver!r}")
    if prediction not in MRS_PREDICTIONS:
        raise ValueError(
            f"prediction must be one of {list(MRS_PREDICTIONS)}, got prediction={prediction!r}"
        )
    orders = (1, 2, 3) if solver == "ode" else (1, 2)
    if isinstance(order, bool) or order not in orders:
        raise ValueError(
            f"order must be one of {list(orders)} for solver={solver!r}, got order={order!r}"
        )
    for name, flag in (
        ("lower_order_final", lower_order_final),
        ("consistent_third_order", consistent_third_order),
    ):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {name}={flag!r}")


def _check_shapes(sde: MeanReverting, x: Any, grid: Any, solver: str, noise: Any) -> None:
    mu_shape, x_shape = tuple(np.shape(sde.mu)), tuple(np.shape(x))
    try:
        broadcast = np.broadcast_shapes(mu_shape, x_shape)
    except ValueError:
        broadcast = None
    if broadcast != x_shape:
        raise ValueError(
            f"mu must be a scalar or broadcast to the shape of x {x_shape}, got shape {mu_shape}"
        )
    if solver == "sde" and noise is not None:
        steps = np.shape(grid)[0] - 1
        if np.ndim(noise) < 2 or np.shape(noise)[0] < steps or np.shape(noise)[2:] != x_shape:
            raise ValueError(
                f"noise must have shape [num_steps={steps}, draws >= 1, *x.shape={x_shape}], "
                f"got shape {np.shape(noise)}"
            )


def mrs(
    key: Array,
    model: Model,
    sde: MeanReverting,
    x: Array,
    grid: Array,
    *,
    solver: str = "ode",
    prediction: str = "data",
    order: int = 2,
    lower_order_final: bool = True,
    consistent_third_order: bool = False,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""MR Sampler (Li, Fang, Zhao, Lu, Yang & Xu 2025, "MRS: A Fast Sampler for Mean Reverting
    Diffusion based on ODE and SDE Solvers", ICLR 2025): multistep exponential integrators of the
    reverse-time SDE (``solver="sde"``, orders 1-2) and of the probability-flow ODE
    (``solver="ode"``, orders 1-3) of the mean-reverting process ``sde``
    (:class:`shufflesgd.diffusion.MeanReverting`), written for the data prediction
    :math:`D = \hat x_0` or the noise prediction :math:`D = \hat\varepsilon` (``prediction``),
    from ``x`` at ``grid[0]`` (usually a prior draw, :meth:`MeanReverting.prior_sample`).

    Step :math:`i` from :math:`s = t_i` to :math:`t = t_{i+1}`, with :math:`\lambda =
    \log(\alpha/\sigma)`, :math:`h = \lambda_t - \lambda_s`, the divided differences
    :math:`D^{(1)}, D^{(2)}` of the last three predictions (below; zero below the step's order),
    :math:`z \sim N(0, I)` and :math:`\varphi_1 = e^{-h}-1`, :math:`\varphi_2 = \varphi_1/h+1`,
    :math:`\varphi_3 = \varphi_2/h-\frac12`, :math:`\psi_1 = e^h-1`, :math:`\psi_2 =
    \psi_1/h-1`, :math:`\psi_3 = \psi_2/h-\frac12`:

    * ODE, data: :math:`x_t = \frac{\sigma_t}{\sigma_s}x_s - \alpha_t(\varphi_1 D_0 -
      \varphi_2 D^{(1)} + c\,\varphi_3 D^{(2)}) + (1 - \frac{\sigma_t}{\sigma_s} +
      \alpha_t\varphi_1)\mu`;
    * ODE, noise: :math:`x_t = \frac{\alpha_t}{\alpha_s}x_s - \sigma_t(\psi_1 D_0 + \psi_2
      D^{(1)} + c\,\psi_3 D^{(2)}) + (1 - \frac{\alpha_t}{\alpha_s})\mu`;
    * SDE, data: :math:`x_t = \frac{\sigma_t}{\sigma_s}e^{-h}x_s + \alpha_t\bigl((1-e^{-2h})D_0
      + (1 - \frac{1-e^{-2h}}{2h})D^{(1)}\bigr) + \sigma_t\sqrt{1-e^{-2h}}\,z +
      (1 - \frac{\sigma_t}{\sigma_s}e^{-h} - \alpha_t(1-e^{-2h}))\mu`;
    * SDE, noise: :math:`x_t = \frac{\alpha_t}{\alpha_s}x_s - 2\sigma_t(\psi_1 D_0 + \psi_2
      D^{(1)}) + \sigma_t\sqrt{e^{2h}-1}\,z + (1 - \frac{\alpha_t}{\alpha_s})\mu`.

    With :math:`r_0 = h_{i-1}/h`, :math:`r_1 = h_{i-2}/h`, :math:`D_{1,0} = (D_0 - D_{-1})/r_0`
    and :math:`D_{1,1} = (D_{-1} - D_{-2})/r_1`: order 2 takes :math:`D^{(1)} = D_{1,0}`
    (:math:`\approx hD'`, integrated exactly: the Taylor form, not DPM-Solver++(2M)'s midpoint
    :math:`\frac1{2r_0}`), order 3 :math:`D^{(1)} = D_{1,0} + \frac{r_0}{r_0+r_1}(D_{1,0} -
    D_{1,1})` and :math:`D^{(2)} = (D_{1,0} - D_{1,1})/(r_0+r_1)`.  These are the semi-analytic
    solutions of the module docstring with the prediction's Taylor polynomial integrated exactly;
    every coefficient was checked against the authors' ``MRSampler``
    (``step_ode_1st`` ... ``step_ode_3rd``, ``step_sde_1st``, ``step_sde_2nd``).

    Third order: :math:`D^{(2)} \approx h^2 D''/2` while the exact :math:`D''` term is
    :math:`h^2\varphi_3 D''` (:math:`h^2\psi_3 D''`), i.e. :math:`2\varphi_3 D^{(2)}`; the
    authors' update (``consistent_third_order=False``, :math:`c = 1`; the same as DPM-Solver's
    multistep third order) is therefore off by :math:`O(h^3)` a step, globally second order,
    while ``True`` uses :math:`c = 2`, the Taylor-consistent third order.

    Orders are data: the first steps warm up (order :math:`\min(k, i+1)`); with
    ``lower_order_final`` and fewer than 10 steps (the authors' threshold) step :math:`i` has
    order at most :math:`N - i`, so the last step is first order (the authors' loop lowers the
    steps before the last and then takes the last at full order; here the order falls to the
    end).  A step to :math:`\sigma = 0` (a grid ending at :math:`t = 0`) is the exact limit of
    every first-order step, :math:`x = \alpha_t\hat x_0 + (1-\alpha_t)\mu`.

    ``model`` may predict any of ``MODEL_OUTPUTS`` in the mean-reverting sense
    (:func:`shufflesgd.diffusion.convert_mean_reverting`); one evaluation a step (``nfe = N``,
    plus one for ``final="denoise"`` or ``"euler_to_zero"`` on a grid ending at
    :math:`\sigma > 0`: the model's :math:`\hat x_0`, or an Euler step of the PF-ODE, at
    ``grid[-1]``).  The ODE is deterministic (``key`` and ``noise`` unused); the SDE draws one
    Gaussian a step, ``noise[i, 0]`` when ``noise`` (``[N, draws, *x.shape]``) is given.
    ``mu`` and every field of ``sde`` may be traced.  Defaults: the authors' configuration
    (``solver="ode"``, ``prediction="data"``, ``order=2``), ``lower_order_final=True``,
    ``consistent_third_order=False``, ``final="denoise"``.  ``ValueError`` naming the option
    (``TypeError`` for a non-mean-reverting ``sde``, a non-float ``x`` or, for the SDE without
    ``noise``, a non-key ``key``), before tracing."""
    check_mean_reverting(sde)
    _check_mrs_options(solver, prediction, order, lower_order_final, consistent_third_order)
    check_model_output(model.output)
    if solver == "sde":
        check_sampler_arguments(grid, final, x=x, key=key, noise=noise)
    else:
        check_sampler_arguments(grid, final, x=x)
    _check_shapes(sde, x, grid, solver, noise)
    target = "x0" if prediction == "data" else "eps"
    c3 = 2.0 if consistent_third_order else 1.0

    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    alpha, sigma = sde.alpha(grid), sde.sigma(grid)
    lam = 0.5 * sde.log_snr(grid)  # +inf where sigma = 0
    index = jnp.arange(num_steps)
    lam_prev = lam[jnp.maximum(index - 1, 0)]
    lam_prev2 = lam[jnp.maximum(index - 2, 0)]
    step_order = jnp.minimum(order, index + 1)
    if lower_order_final and num_steps < 10:
        step_order = jnp.minimum(step_order, num_steps - index)
    step_order = jnp.where(sigma[1:] > 0, step_order, 1)
    mu = sde.mu

    def body(carry, inputs):
        x, d_m1, d_m2 = carry  # the two previous predictions (zeros during the warm-up)
        i, t, lam_s, lam_p, lam_p2, lam_t, a_s, a_t, s_s, s_t, step = inputs
        raw = model.fn(x, t)
        d0 = convert_mean_reverting(raw, model.output, target, x, t, sde)
        to_zero = ~(s_t > 0)
        h = jnp.where(to_zero, 1.0, lam_t - lam_s)
        o2, o3 = step >= 2, step >= 3
        r0 = jnp.where(o2, (lam_s - lam_p) / h, 1.0)
        r1 = jnp.where(o3, (lam_p - lam_p2) / h, 1.0)
        d10, d11 = (d0 - d_m1) / r0, (d_m1 - d_m2) / r1
        d1 = jnp.where(o3, d10 + r0 / (r0 + r1) * (d10 - d11), jnp.where(o2, d10, 0.0))
        d2 = jnp.where(o3, (d10 - d11) / (r0 + r1), 0.0)
        if solver == "ode" and prediction == "data":
            phi1 = jnp.expm1(-h)
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            ratio = s_t / s_s
            x_new = (
                ratio * x
                - a_t * (phi1 * d0 - phi2 * d1 + c3 * phi3 * d2)
                + (1.0 - ratio + a_t * phi1) * mu
            )
        elif solver == "ode":
            psi1 = jnp.expm1(h)
            psi2 = psi1 / h - 1.0
            psi3 = psi2 / h - 0.5
            ratio = a_t / a_s
            x_new = ratio * x - s_t * (psi1 * d0 + psi2 * d1 + c3 * psi3 * d2) + (1.0 - ratio) * mu
        elif prediction == "data":
            one_minus = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}
            ratio = s_t / s_s * jnp.exp(-h)
            z = draw(key, noise, i, 0, x)
            x_new = (
                ratio * x
                + a_t * (one_minus * d0 + (1.0 - one_minus / (2.0 * h)) * d1)
                + s_t * jnp.sqrt(one_minus) * z
                + (1.0 - ratio - a_t * one_minus) * mu
            )
        else:
            psi1 = jnp.expm1(h)
            psi2 = psi1 / h - 1.0
            ratio = a_t / a_s
            z = draw(key, noise, i, 0, x)
            x_new = (
                ratio * x
                - 2.0 * s_t * (psi1 * d0 + psi2 * d1)
                + s_t * jnp.sqrt(jnp.expm1(2.0 * h)) * z
                + (1.0 - ratio) * mu
            )
        if target == "x0":
            x0 = d0
        else:
            x0 = convert_mean_reverting(raw, model.output, "x0", x, t, sde)
        x_new = jnp.where(to_zero, a_t * x0 + (1.0 - a_t) * mu, x_new)
        return (x_new, d0, d_m1), jnp.all(jnp.isfinite(x_new))

    inputs = (
        index,
        grid[:-1],
        lam[:-1],
        lam_prev,
        lam_prev2,
        lam[1:],
        alpha[:-1],
        alpha[1:],
        sigma[:-1],
        sigma[1:],
        step_order,
    )
    zeros = jnp.zeros_like(x)
    (x, _, _), finite = jax.lax.scan(body, (x, zeros, zeros), inputs)
    # the final step on the centred variable, where the house's finish applies as is
    y, info = finish_at_zero(
        centred_model(model, sde),
        sde.centred(),
        x - mu,
        grid,
        final,
        jnp.asarray(num_steps),
        first_nonfinite(finite),
    )
    return y + mu, info
