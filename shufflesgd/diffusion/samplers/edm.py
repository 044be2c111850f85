r"""EDM's stochastic Heun sampler (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Alg. 2), for any linear process.

Karras et al. write every linear process as :math:`x = s(t)\,(x_0 + \tilde\sigma(t)\,\varepsilon)`
(their Eq. 4) and solve the probability-flow ODE of the scaled state
:math:`\tilde x = x/s` in the noise level :math:`\tilde\sigma`,

.. math:: \frac{d\tilde x}{d\tilde\sigma}
          = \frac{\tilde x - D(\tilde x;\tilde\sigma)}{\tilde\sigma},

with :math:`D` the denoiser (the model's :math:`x_0` prediction).  Here :math:`s = \alpha` and
:math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda/2}`, so VE and EDM (:math:`\alpha = 1`) run
Alg. 2 verbatim and VP / sub-VP run it on :math:`x/\alpha`, as k-diffusion wraps VP models.
Each step optionally "churns" (adds noise to raise :math:`\tilde\sigma` by a factor
:math:`1 + \gamma`), then takes a Heun step, or an Euler step when it lands on
:math:`\tilde\sigma = 0`.  :func:`shufflesgd.diffusion.restart` reuses the Heun step
(:func:`heun_sigma_step`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from shufflesgd._checks import is_concrete
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_sampler_arguments,
    draw,
    finish_at_zero,
    first_nonfinite,
)

Array = jax.Array


def scaled_sigma(sde: SDE, t: Array) -> Array:
    r""":math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda/2}`: the noise level of
    :math:`x/\alpha`."""
    return sde.sigma(t) / sde.alpha(t)


def time_of_scaled_sigma(sde: SDE, s: Array) -> Array:
    r"""The time at which :math:`\tilde\sigma = \sigma/\alpha` equals ``s`` (through the log-SNR
    :math:`\lambda = -2\log\tilde\sigma`)."""
    return sde.time_of_log_snr(-2.0 * jnp.log(s))


def heun_sigma_step(
    model: Model, sde: SDE, x: Array, s: Array, t: Array, s_next: Array, t_next: Array
) -> Array:
    r"""One step of Karras et al. (2022), Alg. 2, lines 7-10, on :math:`\tilde x = x/\alpha` in
    :math:`\tilde\sigma`:
    :math:`d\tilde x/d\tilde\sigma = (\tilde x - D(\tilde x;\tilde\sigma))/\tilde\sigma`, Heun, or
    Euler when :math:`\tilde\sigma_{next} = 0` (no evaluation there: a ``cond`` on the grid, which
    stays a branch under a ``vmap`` over samples)."""

    def denoise(x, t):
        return model.predict(sde, sde.alpha(t) * x, t, "x0")

    d = (x - denoise(x, t)) / s
    x_euler = x + (s_next - s) * d
    positive = s_next > 0
    s_eval, t_eval = jnp.where(positive, s_next, s), jnp.where(positive, t_next, t)

    def correct(x_euler):
        d_next = (x_euler - denoise(x_euler, t_eval)) / s_eval
        return x + (s_next - s) * 0.5 * (d + d_next)

    return jax.lax.cond(positive, correct, lambda x_euler: x_euler, x_euler)


def edm_heun(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    S_churn: float | Array = 0.0,
    S_tmin: float | Array = 0.0,
    S_tmax: float | Array = float("inf"),
    S_noise: float | Array = 1.0,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""EDM's stochastic Heun sampler (Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Alg. 2).

    At each grid noise level :math:`\sigma_i`: churn
    :math:`\gamma_i = \min(S_{churn}/N, \sqrt2-1)` if :math:`\sigma_i\in[S_{tmin}, S_{tmax}]`
    else 0, :math:`\hat\sigma_i = (1+\gamma_i)\sigma_i`,
    :math:`\hat x = x + \sqrt{\hat\sigma_i^2-\sigma_i^2}\,\varepsilon`,
    :math:`\varepsilon\sim N(0, S_{noise}^2 I)` (draw ``(i, 0)``), then a Heun step of
    :math:`dx/d\sigma = (x - D(x;\sigma))/\sigma` from :math:`\hat\sigma_i` to
    :math:`\sigma_{i+1}`, Euler when :math:`\sigma_{i+1} = 0` (a grid ending at ``t = 0`` for
    EDM or VP: :math:`D` is never evaluated at :math:`\sigma = 0`).

    Processes with :math:`\alpha\ne1` (VP, sub-VP) are not refused: Karras et al.'s Eq. 4 with
    scaling :math:`s(t) = \alpha(t)` reduces them to Alg. 2's case :math:`s = 1`, since
    :math:`\tilde x = x/\alpha` obeys :math:`d\tilde x/d\tilde\sigma = (\tilde x -
    D(\tilde x;\tilde\sigma))/\tilde\sigma` in :math:`\tilde\sigma = \sigma/\alpha =
    e^{-\lambda/2}` (as k-diffusion wraps VP models).  The sampler runs on :math:`\tilde x` and
    queries the model at :math:`(\alpha\tilde x, t(\tilde\sigma))`; for VE and EDM this is
    Alg. 2 verbatim, and with ``S_churn = 0`` on EDM it is :func:`shufflesgd.diffusion.pf_ode_heun`.
    :math:`S_{tmin}, S_{tmax}` are compared with :math:`\tilde\sigma` (EDM's :math:`t`).
    ``nfe = 2N``, minus one when the grid ends at :math:`\sigma = 0` (the Euler last step).
    All four options may be traced; one draw a step, none when ``S_churn`` is a concrete zero
    (the result is the same: the draw would be scaled by 0).  Defaults: ``S_churn=0`` (no churn:
    the deterministic Heun sampler of Alg. 1), ``S_tmin=0``, ``S_tmax=inf``, ``S_noise=1``,
    ``final="denoise"`` (one more evaluation when the grid ends at :math:`\sigma > 0`, none at
    :math:`\sigma = 0`)."""
    check_sampler_arguments(grid, final, x=x, key=key, noise=noise)
    for name, value, ok, rule in (
        ("S_churn", S_churn, lambda v: v >= 0, "must be >= 0"),
        ("S_noise", S_noise, lambda v: v > 0, "must be positive"),
        ("S_tmin", S_tmin, lambda v: v >= 0, "must be >= 0"),
    ):
        if is_concrete(value) and not ok(float(value)):
            raise ValueError(f"{name} {rule}, got {name}={value}")
    if is_concrete(S_tmin) and is_concrete(S_tmax) and not float(S_tmin) <= float(S_tmax):
        raise ValueError(f"S_tmin must not exceed S_tmax, got S_tmin={S_tmin}, S_tmax={S_tmax}")
    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    s_grid = scaled_sigma(sde, grid)
    gamma_max = jnp.minimum(S_churn / num_steps, math.sqrt(2.0) - 1.0)
    churn_free = is_concrete(S_churn) and float(S_churn) == 0.0  # static: skip the draws entirely

    def body(x, inputs):
        i, t, t_next, s, s_next = inputs
        gamma = jnp.where((s >= S_tmin) & (s <= S_tmax), gamma_max, 0.0)
        s_hat = s * (1.0 + gamma)
        t_hat = jnp.where(gamma > 0, time_of_scaled_sigma(sde, s_hat), t)
        if not churn_free:
            # sqrt(s_hat^2 - s^2) = s sqrt(gamma (2 + gamma))
            x = x + s * jnp.sqrt(gamma * (2.0 + gamma)) * S_noise * draw(key, noise, i, 0, x)
        x = heun_sigma_step(model, sde, x, s_hat, t_hat, s_next, t_next)
        return x, jnp.all(jnp.isfinite(x))

    inputs = (jnp.arange(num_steps), grid[:-1], grid[1:], s_grid[:-1], s_grid[1:])
    x, finite = jax.lax.scan(body, x / sde.alpha(grid[0]), inputs)
    x = sde.alpha(grid[-1]) * x
    nfe = jnp.sum(1 + (s_grid[1:] > 0))
    return finish_at_zero(model, sde, x, grid, final, nfe, first_nonfinite(finite))
