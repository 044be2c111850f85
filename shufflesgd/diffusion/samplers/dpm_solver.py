r"""DPM-Solver++ (multistep, orders 2 and 3) and the dynamic thresholding it is used with.

DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models") solves the probability-flow ODE as an exponential integrator in the
half log-SNR :math:`\lambda_t = \log(\alpha_t/\sigma_t)`, written for the data prediction
:math:`D = \hat x_0`: the exact solution from :math:`t_{i-1}` to :math:`t_i` is

.. math:: x_i = \frac{\sigma_i}{\sigma_{i-1}}x_{i-1}
          + \sigma_i\int_{\lambda_{i-1}}^{\lambda_i} e^{\lambda}\,D(x_\lambda, \lambda)\,d\lambda

(their Sec. 4), and the multistep variants replace :math:`D` by its Taylor polynomial through
the previous data predictions (their Alg. 2): one model evaluation a step whatever the order.
:func:`dpm_solver_pp_2m` is second order, :func:`dpm_solver_pp_3m` the authors' third-order
update.  :func:`dynamic_threshold` is Imagen's clipping of each data prediction (Saharia et al.
2022, Sec. 2.3), which DPM-Solver++ proposes for guided sampling.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_positive, is_concrete
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_sampler_arguments,
    finish_at_zero,
    first_nonfinite,
)

Array = jax.Array


def dynamic_threshold(
    x0: Array, quantile: float | Array = 0.995, max_value: float | Array = 1.0
) -> Array:
    r"""Dynamic thresholding of a data prediction (Saharia et al. 2022, "Photorealistic
    Text-to-Image Diffusion Models with Deep Language Understanding" (Imagen), Sec. 2.3), in the
    form DPM-Solver++ uses (Lu et al. 2022, Sec. 5 / the authors' ``dynamic_thresholding_fn``):

    :math:`s = \max(\mathrm{quantile}_q(|x_0|), s_{max})`, :math:`x_0 \leftarrow
    \mathrm{clip}(x_0, -s, s)/s`,

    the quantile taken over all entries of one sample (``x0`` is one sample; ``vmap`` for a
    batch).  ``quantile`` is a fraction in (0, 1) (``numpy.percentile(|x0|, 100 q)``, linear
    interpolation); the authors' JAX port passes 0.995 to ``jnp.percentile``, i.e. the 0.995th
    *percentile*.  With ``max_value = 1`` this is Imagen's rule for data in [-1, 1]; the output
    always lies in [-1, 1].  Both arguments may be traced."""
    s = jnp.quantile(jnp.abs(x0).reshape(-1), quantile)
    s = jnp.maximum(s, max_value)
    return jnp.clip(x0, -s, s) / s


def _check_threshold(threshold_quantile: Any, threshold_max: Any) -> None:
    if is_concrete(threshold_quantile) and not 0.0 < float(threshold_quantile) < 1.0:
        raise ValueError(
            f"threshold_quantile must lie in (0, 1), got threshold_quantile={threshold_quantile}"
        )
    check_positive("threshold_max", threshold_max)


def _dpm_solver_pp_multistep(
    solver_order: int,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    lower_order_final: bool,
    thresholding: bool,
    threshold_quantile: float | Array,
    threshold_max: float | Array,
    final: str,
    consistent_third_order: bool = False,
) -> tuple[Array, SamplerInfo]:
    check_sampler_arguments(grid, final, x=x)
    for name, flag in (
        ("lower_order_final", lower_order_final),
        ("thresholding", thresholding),
        ("consistent_third_order", consistent_third_order),
    ):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {name}={flag!r}")
    _check_threshold(threshold_quantile, threshold_max)
    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    lam = 0.5 * sde.log_snr(grid)  # lambda = log(alpha / sigma): +inf where sigma = 0
    alpha, sigma = sde.alpha(grid), sde.sigma(grid)
    index = jnp.arange(num_steps)
    lam_prev = lam[jnp.maximum(index - 1, 0)]
    lam_prev2 = lam[jnp.maximum(index - 2, 0)]
    # order of step i: warm-up min(order, i + 1); diffusers' lower_order_final (num_steps < 15):
    # min(order, N - i), so the last step is first order and the one before at most second.
    step_order = jnp.minimum(solver_order, index + 1)
    if lower_order_final and num_steps < 15:
        step_order = jnp.minimum(step_order, num_steps - index)
    step_order = jnp.where(sigma[1:] > 0, step_order, 1)  # a step to sigma = 0 is first order

    def predict(x, t):
        x0 = model.predict(sde, x, t, "x0")
        return dynamic_threshold(x0, threshold_quantile, threshold_max) if thresholding else x0

    def body(carry, inputs):
        x, d_m1, d_m2 = carry  # the two previous data predictions (zeros during warm-up)
        t, lam_i, lam_p, lam_p2, lam_n, a_n, s_i, s_n, order = inputs
        d0 = predict(x, t)
        to_zero = ~(s_n > 0)
        h = jnp.where(to_zero, 1.0, lam_n - lam_i)
        phi1 = jnp.where(to_zero, -1.0, jnp.expm1(-h))
        o2, o3 = order >= 2, order >= 3
        r0 = jnp.where(o2, (lam_i - lam_p) / h, 1.0)
        r1 = jnp.where(o3, (lam_p - lam_p2) / h, 1.0)
        # the update is x' = (s_n / s_i) x + c0 d0 + c1 d_m1 + c2 d_m2; per order:
        # first (DDIM): -a phi1 d0
        first = (-a_n * phi1, 0.0, 0.0)
        # 2M: -a phi1 [(1 + 1/(2 r0)) d0 - 1/(2 r0) d_m1]
        second = (-a_n * phi1 * (1.0 + 0.5 / r0), a_n * phi1 * 0.5 / r0, 0.0)
        # 3M: -a phi1 d0 + a phi2 D1 - c a phi3 D2 with D1 = (1 + w) D1_0 - w D1_1,
        # D2 = (D1_0 - D1_1) / (r0 + r1), D1_0 = (d0 - d_m1) / r0, D1_1 = (d_m1 - d_m2) / r1,
        # w = r0 / (r0 + r1); c = 1 in the reference implementations, 2 if consistent_third_order
        phi2 = phi1 / h + 1.0
        phi3 = (2.0 if consistent_third_order else 1.0) * (phi2 / h - 0.5)
        w = r0 / (r0 + r1)
        p = a_n * phi2 * (1.0 + w) - a_n * phi3 / (r0 + r1)
        q = a_n * phi2 * w - a_n * phi3 / (r0 + r1)
        third = (-a_n * phi1 + p / r0, -p / r0 - q / r1, q / r1)
        c0, c1, c2 = (
            jnp.where(o3, c3_, jnp.where(o2, c2_, c1_))
            for c1_, c2_, c3_ in zip(first, second, third)
        )
        x = (s_n / s_i) * x + c0 * d0 + c1 * d_m1 + c2 * d_m2
        return (x, d0, d_m1), jnp.all(jnp.isfinite(x))

    inputs = (
        grid[:-1],
        lam[:-1],
        lam_prev,
        lam_prev2,
        lam[1:],
        alpha[1:],
        sigma[:-1],
        sigma[1:],
        step_order,
    )
    zeros = jnp.zeros_like(x)
    (x, _, _), finite = jax.lax.scan(body, (x, zeros, zeros), inputs)
    return finish_at_zero(
        model, sde, x, grid, final, jnp.asarray(num_steps), first_nonfinite(finite)
    )


def dpm_solver_pp_2m(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    lower_order_final: bool = True,
    thresholding: bool = False,
    threshold_quantile: float | Array = 0.995,
    threshold_max: float | Array = 1.0,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", Alg. 2): a second-order multistep solver of the
    probability-flow ODE written for the data prediction :math:`D = \hat x_0`.

    With :math:`\lambda_t = \log(\alpha_t/\sigma_t)` (half the process's ``log_snr``),
    :math:`h_i = \lambda_{t_i} - \lambda_{t_{i-1}}` and :math:`r_i = h_{i-1}/h_i`,

    .. math:: x_i = \frac{\sigma_i}{\sigma_{i-1}}x_{i-1} - \alpha_i(e^{-h_i}-1)
              \Big[\big(1+\tfrac1{2r_i}\big)D_{i-1} - \tfrac1{2r_i}D_{i-2}\Big],

    the first step first order (DDIM).  Checked against the authors' ``dpm_solver_pytorch.py``
    (``multistep_dpm_solver_second_order_update``, ``solver_type='dpmsolver'``) and diffusers'
    ``DPMSolverMultistepScheduler`` (midpoint).  ``lower_order_final`` (as in diffusers): with
    fewer than 15 steps the last step is first order.  A step to :math:`\sigma = 0` is first
    order (:math:`x = \alpha D`).  Orders are data: each step's coefficients are selected with
    ``jnp.where``, so one program serves every step and ``vmap`` never doubles the work.  One
    evaluation a step (``nfe = N``, plus the final one).  ``thresholding`` applies
    :func:`dynamic_threshold` (``threshold_quantile``, ``threshold_max``; both may be traced) to
    every data prediction.  Deterministic: ``key`` and ``noise`` are unused.  Defaults:
    ``lower_order_final=True`` (set ``False`` to match k-diffusion's ``sample_dpmpp_2m``, which
    lowers the order only on a step to :math:`\sigma = 0`), no thresholding,
    ``final="denoise"`` (one more evaluation when the grid ends at :math:`\sigma > 0`, none at
    :math:`\sigma = 0`)."""
    del key, noise
    return _dpm_solver_pp_multistep(
        2,
        model,
        sde,
        x,
        grid,
        lower_order_final=lower_order_final,
        thresholding=thresholding,
        threshold_quantile=threshold_quantile,
        threshold_max=threshold_max,
        final=final,
    )


def dpm_solver_pp_3m(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    lower_order_final: bool = True,
    consistent_third_order: bool = False,
    thresholding: bool = False,
    threshold_quantile: float | Array = 0.995,
    threshold_max: float | Array = 1.0,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""DPM-Solver++(3M) (Lu et al. 2022, "DPM-Solver++", Alg. 2 with third-order multistep
    updates; the third-order formula is that of the authors' ``dpm_solver_pytorch.py``,
    ``multistep_dpm_solver_third_order_update``, identical in diffusers):

    .. math:: x_i = \frac{\sigma_i}{\sigma_{i-1}}x_{i-1} - \alpha_i\varphi_1 D_{i-1}
              + \alpha_i\varphi_2 D^{(1)} - \alpha_i\varphi_3 D^{(2)},

    :math:`\varphi_1 = e^{-h}-1`, :math:`\varphi_2 = \varphi_1/h + 1`,
    :math:`\varphi_3 = \varphi_2/h - \frac12`, :math:`r_0 = h_{i-1}/h_i`,
    :math:`r_1 = h_{i-2}/h_i`, :math:`D_{1,0} = (D_{i-1}-D_{i-2})/r_0`,
    :math:`D_{1,1} = (D_{i-2}-D_{i-3})/r_1`,
    :math:`D^{(1)} = D_{1,0} + \frac{r_0}{r_0+r_1}(D_{1,0}-D_{1,1})`,
    :math:`D^{(2)} = (D_{1,0}-D_{1,1})/(r_0+r_1)`.  Warm-up: first order, then 2M, then 3M;
    ``lower_order_final`` (fewer than 15 steps): the last step first order, the one before at
    most second.  Orders are data (``jnp.where``), one evaluation a step; options as
    :func:`dpm_solver_pp_2m`.

    ``consistent_third_order``: :math:`D^{(2)}` is :math:`h^2` times the second divided
    difference, :math:`\approx h^2 D''/2`, while the exact :math:`u^2` term of the exponential
    integrator is :math:`-\alpha_i h^2\varphi_3 D'' \approx -2\alpha_i\varphi_3 D^{(2)}`.  The
    reference update (default, ``False``; the authors' code, diffusers and k-diffusion agree) is
    therefore off by :math:`O(h^3)` a step, i.e. globally second order, though several times more
    accurate than 2M.  ``True`` uses :math:`-2\alpha_i\varphi_3 D^{(2)}`, the factor 2 that the
    authors' single-step ``'taylor'`` third-order update carries in its :math:`D_2`.  Defaults:
    ``lower_order_final=True``, ``consistent_third_order=False``, no thresholding,
    ``final="denoise"`` (as :func:`dpm_solver_pp_2m`)."""
    del key, noise
    return _dpm_solver_pp_multistep(
        3,
        model,
        sde,
        x,
        grid,
        lower_order_final=lower_order_final,
        thresholding=thresholding,
        threshold_quantile=threshold_quantile,
        threshold_max=threshold_max,
        final=final,
        consistent_third_order=consistent_third_order,
    )
