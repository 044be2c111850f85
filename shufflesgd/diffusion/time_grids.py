r"""Time grids for samplers, and the discrete timestep spacings of trained models.

A sampler runs down a strictly decreasing grid of times :math:`t_0 = t_{max} > \dots > t_N =
t_{min}`, a plain array, so any spacing works; :func:`time_grid` builds the usual ones:
uniform in :math:`t` (Song et al. 2021), quadratic in :math:`t` (Song, Meng & Ermon 2021, DDIM
App. D.3), uniform in the log-SNR :math:`\lambda` (Lu et al. 2022, DPM-Solver, Sec. 3.4) and
Karras et al.'s :math:`\rho`-spacing of the noise level (2022, Eq. 5) in
:math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda/2}`, which is what that spacing means for a
process with :math:`\alpha \ne 1`; and the time-shifted grid of flow models (Esser et al. 2024,
SD3, Eq. 23), which multiplies :math:`\sigma/\alpha` by a ``shift``.  :func:`time_of_sigma`
inverts :math:`\sigma(t)`.

For models trained on a discrete schedule of :math:`T` timesteps, :func:`discrete_timesteps`
gives the ``linspace`` / ``leading`` / ``trailing`` spacings and
:func:`rescale_zero_terminal_snr` the zero-terminal-SNR rescaling of Lin et al. (2024),
"Common Diffusion Noise Schedules and Sample Steps are Flawed" (Table 2, Alg. 1).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_finite, check_int, check_positive, check_positive_finite
from shufflesgd.diffusion.processes import EDM, SDE, VE, Interpolant, RectifiedFlow, SubVP

Array = jax.Array


#: The spacings :func:`time_grid` builds.
GRIDS = ("uniform_time", "quadratic_time", "uniform_log_snr", "karras", "shifted")


def shift_time(sde: SDE, t: Any, shift: float) -> Any:
    r"""The time at which the process's :math:`\sigma/\alpha = e^{-\lambda/2}` is ``shift``
    times its value at ``t`` (:math:`s` = ``shift``): :math:`\lambda(t') = \lambda(t) - 2\log s`,
    solved with the process's ``time_of_log_snr``.  Esser et al. 2024 (SD3) derive
    the shift from the signal-to-noise ratio; Hoogeboom et al. 2023 ("simple diffusion") shift
    the log-SNR of a noise schedule the same way.

    On :class:`~shufflesgd.diffusion.processes.RectifiedFlow` this is SD3's Eq. 23,
    :math:`t' = s t/(1 + (s - 1)t)` (computed so, in float64 for NumPy input), diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=s)``.  It fixes :math:`t = 0` and :math:`t = 1` of
    an interpolant, is increasing in ``t``, and ``shift_time(sde, ., 1 / s)`` inverts it; for
    processes with :math:`\alpha = 1` (VE, EDM) it scales :math:`\sigma` by ``s``."""
    if isinstance(sde, RectifiedFlow):
        return shift * t / (1.0 + (shift - 1.0) * t)
    return sde.time_of_log_snr(sde.log_snr(jnp.asarray(t)) - 2.0 * math.log(shift))


def time_grid(
    sde: SDE,
    kind: str,
    num_steps: int,
    *,
    t_min: float | None = None,
    t_max: float | None = None,
    rho: float = 7.0,
    shift: float = 3.0,
) -> np.ndarray:
    r"""``num_steps + 1`` decreasing times from ``t_max`` to ``t_min`` (a float64 NumPy array).

    * ``uniform_time``: equal steps in t (Song et al. 2021).
    * ``quadratic_time``: :math:`t_i = t_{min} + (t_{max}-t_{min})(1 - i/N)^2`, denser near
      the data (Song, Meng, Ermon 2021, DDIM App. D.3).
    * ``uniform_log_snr``: equal steps in :math:`\lambda` (Lu et al. 2022, DPM-Solver, Sec. 3.4).
    * ``karras``: :math:`\tilde\sigma_i = (\tilde\sigma_{max}^{1/\rho}
      + \frac iN(\tilde\sigma_{min}^{1/\rho} - \tilde\sigma_{max}^{1/\rho}))^\rho`
      (Karras et al. 2022, Eq. 5) in the noise level
      :math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda/2}` of the scaled process (their
      Table 1: for VP, :math:`\sigma(t) = \sqrt{e^{\frac12\beta_d t^2 + \beta_{min}t} - 1}`),
      mapped to t through the log-SNR; for VE and EDM :math:`\tilde\sigma = \sigma`.
    * ``shifted``: the time-shifted grid of flow models (Esser et al. 2024, "Scaling Rectified
      Flow Transformers for High-Resolution Image Synthesis" (SD3), Eq. 23), uniform in
      :math:`\tau` and mapped by :func:`shift_time`, which on
      :class:`~shufflesgd.diffusion.processes.RectifiedFlow` is
      :math:`t = s\tau/(1 + (s-1)\tau)` with :math:`s` = ``shift``: :math:`\sigma/\alpha`
      multiplied by :math:`s`, so :math:`s > 1` spends more steps at high noise (SD3's released
      scheduler configuration uses :math:`s = 3`, the default here; diffusers'
      ``FlowMatchEulerDiscreteScheduler(shift=s)`` applies the same map to its sigmas).  The
      uniform :math:`\tau` runs between the pre-images of ``t_max`` and ``t_min``, so the ends
      are exact; on ``[0, 1]`` the grid is
      :math:`t_i = \mathrm{shift}(1 - i/N)`, and ``shift=1`` is ``uniform_time``.

    The grid is data: samplers take it as an array, so any other spacing works too.
    ``ValueError`` naming the argument unless :math:`0 \le t_{min} < t_{max}` are finite and
    ``shift`` is positive and finite; ``uniform_log_snr`` and ``karras`` also need a finite
    log-SNR at both ends (not :math:`t = 1` of an interpolant, nor :math:`\sigma = 0`).
    """
    if kind not in GRIDS:
        raise ValueError(f"grid must be one of {list(GRIDS)}, got {kind!r}")
    num_steps = check_int("num_steps", num_steps)
    lo = float(sde.t_min if t_min is None else t_min)
    hi = float(sde.t_max if t_max is None else t_max)
    check_finite("t_min", lo)
    check_finite("t_max", hi)
    if lo < 0.0:
        raise ValueError(f"t_min must be non-negative, got t_min={lo}")
    if not lo < hi:
        raise ValueError(f"t_min must be below t_max, got t_min={lo}, t_max={hi}")
    check_positive("rho", rho)
    check_positive_finite(shift=shift)
    u = np.linspace(0.0, 1.0, num_steps + 1)
    if kind in ("uniform_log_snr", "karras"):
        lam_hi, lam_lo = (float(sde.log_snr(jnp.asarray(t))) for t in (hi, lo))
        if not (math.isfinite(lam_hi) and math.isfinite(lam_lo)):
            raise ValueError(
                f"grid {kind!r} needs a finite log-SNR at t_min and t_max, got "
                f"log_snr(t_max={hi})={lam_hi} and log_snr(t_min={lo})={lam_lo}; "
                "use 'uniform_time' or 'shifted' to reach alpha = 0 or sigma = 0"
            )
    if kind == "uniform_time":
        grid = hi + u * (lo - hi)
    elif kind == "quadratic_time":
        grid = lo + (hi - lo) * (1.0 - u) ** 2
    elif kind == "shifted":
        tau_hi, tau_lo = (float(shift_time(sde, t, 1.0 / shift)) for t in (hi, lo))
        grid = np.array(shift_time(sde, tau_hi + u * (tau_lo - tau_hi), shift), np.float64)
    elif kind == "uniform_log_snr":
        grid = np.array(
            sde.time_of_log_snr(jnp.asarray(lam_hi + u * (lam_lo - lam_hi))), np.float64
        )
    else:
        # sigma/alpha = exp(-lambda/2): the EDM noise level of the scaled process
        s_hi, s_lo = math.exp(-0.5 * lam_hi), math.exp(-0.5 * lam_lo)
        sigmas = (s_hi ** (1 / rho) + u * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
        grid = np.array(sde.time_of_log_snr(jnp.asarray(-2.0 * np.log(sigmas))), np.float64)
    grid[0], grid[-1] = hi, lo  # exact ends despite rounding and the round trips
    return grid


def time_of_sigma(sde: SDE, sigma: Array) -> Array:
    r"""The time at which the process has noise level ``sigma`` (through the log-SNR; an
    :class:`~shufflesgd.diffusion.processes.Interpolant` inverts :math:`\sigma` directly)."""
    if isinstance(sde, Interpolant):
        return sde.time_of_sigma(sigma)
    if isinstance(sde, (VE, EDM)):
        return sde.time_of_log_snr(-2.0 * jnp.log(sigma))
    if isinstance(sde, SubVP):  # sigma = 1 - alpha^2
        return sde.time_of_log_snr(jnp.log1p(-sigma) - 2.0 * jnp.log(sigma))
    # VP: alpha = sqrt(1 - sigma^2)
    return sde.time_of_log_snr(jnp.log1p(-(sigma**2)) - 2.0 * jnp.log(sigma))


def discrete_timesteps(num_train_steps: int, num_steps: int, spacing: str) -> np.ndarray:
    """Integer training timesteps for a sampler of ``num_steps`` steps, in decreasing order.

    The spacings of Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Table 2: ``linspace`` (round of an even grid from 0 to ``T-1``),
    ``leading`` (multiples of ``T // N`` from 0; never reaches ``T-1``) and ``trailing``
    (from ``T-1`` down by ``T / N``; starts at the last step, as they recommend).
    """
    if spacing not in ("linspace", "leading", "trailing"):
        raise ValueError(f"spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must lie in [1, {num_train_steps}], got num_steps={num_steps}")
    if spacing == "linspace":
        steps = np.round(np.linspace(0, num_train_steps - 1, num_steps)).astype(int)
    elif spacing == "leading":
        steps = np.arange(num_steps) * (num_train_steps // num_steps)
    else:
        steps = (
            np.round(np.arange(num_train_steps, 0, -num_train_steps / num_steps)).astype(int) - 1
        )
    return np.sort(steps)[::-1].copy()


def rescale_zero_terminal_snr(alphas_cumprod: Any) -> np.ndarray:
    r"""Rescale a discrete schedule so the last step has zero SNR (Lin et al. 2024, Alg. 1).

    :math:`\sqrt{\bar\alpha}` is shifted so its last value is 0 and scaled so its first is
    unchanged; returns the new :math:`\bar\alpha_t`.
    """
    root = np.sqrt(np.asarray(alphas_cumprod, np.float64))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    return root**2
