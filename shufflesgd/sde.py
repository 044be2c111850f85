r"""Linear forward diffusion processes, model-output conversions and time grids.

Every process here has Gaussian transition kernels from the data,
:math:`x_t = \alpha(t)\,x_0 + \sigma(t)\,\varepsilon`, and is the SDE
:math:`dx = f(t)\,x\,dt + g(t)\,dw` with :math:`f = d\log\alpha/dt` and
:math:`g^2 = d\sigma^2/dt - 2f\sigma^2` (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", Sec. 3.4 and App. B; Kingma et al. 2021 for the
:math:`(\alpha, \sigma)` view).  Its reverse-time SDE and probability-flow ODE are

.. math:: dx = [f x - g^2\nabla\log p_t(x)]\,dt + g\,d\bar w, \qquad
          \frac{dx}{dt} = f x - \tfrac12 g^2\nabla\log p_t(x).

The processes are small pytrees (:class:`VP`, :class:`SubVP`, :class:`VE`, :class:`EDM`)
exposing ``alpha``, ``sigma``, ``log_snr`` :math:`\lambda = 2\log(\alpha/\sigma)` and its
inverse, ``drift_coefficient`` :math:`f`, ``diffusion_squared`` :math:`g^2`, the time range
and the prior.  A model may predict the score, :math:`\varepsilon`, :math:`x_0` (EDM's
denoiser :math:`D(x;\sigma)`) or :math:`v = \alpha\varepsilon - \sigma x_0`;
:func:`convert` maps between them.  Time grids are plain arrays (:func:`time_grid`).
"""

from __future__ import annotations

import math
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from shufflesgd._checks import check_int, check_positive

Array = jax.Array
MODEL_OUTPUTS = ("score", "eps", "x0", "v")


def _beta_integral(t: Array, beta_min: float, beta_max: float) -> Array:
    return 0.5 * t**2 * (beta_max - beta_min) + t * beta_min


def _vp_time_of_half_log_alpha_sq(log_alpha_sq: Array, beta_min: float, beta_max: float) -> Array:
    """Solve ``-(1/2) t^2 (bmax - bmin) - t bmin = log alpha^2`` for t >= 0."""
    delta = beta_max - beta_min
    return (-beta_min + jnp.sqrt(beta_min**2 - 2.0 * delta * log_alpha_sq)) / delta


class _Process:
    """What every linear process derives from ``log_alpha``, ``sigma``, ``f`` and ``g^2``."""

    def alpha(self, t: Array) -> Array:
        return jnp.exp(self.log_alpha(t))

    def log_snr(self, t: Array) -> Array:
        r""":math:`\lambda(t) = 2\log(\alpha(t)/\sigma(t))`."""
        return 2.0 * (self.log_alpha(t) - jnp.log(self.sigma(t)))

    def reverse_drift(self, x: Array, t: Array, score: Array, probability_flow: bool = False) -> Array:
        r"""Drift of the reverse SDE :math:`f x - g^2 s` (or of the PF-ODE, :math:`f x - \frac12 g^2 s`)."""
        weight = 0.5 if probability_flow else 1.0
        return self.drift_coefficient(t) * x - weight * self.diffusion_squared(t) * score

    def prior_sample(self, key: Array, shape: tuple[int, ...]) -> Array:
        r"""A draw from the prior :math:`N(0, \sigma_T^2 I)` (:math:`\sigma_T = 1` for VP, sub-VP)."""
        return self.prior_std * jax.random.normal(key, shape)

    def prior_log_prob(self, x: Array) -> Array:
        """Log-density of the prior at ``x`` (the last axis is the event dimension)."""
        var = self.prior_std**2
        return -0.5 * jnp.sum(x**2, axis=-1) / var - 0.5 * x.shape[-1] * jnp.log(2 * jnp.pi * var)


@struct.dataclass
class VP(_Process):
    r"""Variance-preserving SDE (DDPM's continuous limit; Song et al. 2021, Eq. 11).

    :math:`\beta(t) = \beta_{min} + t(\beta_{max}-\beta_{min})`, :math:`f = -\beta/2`,
    :math:`g^2 = \beta`, :math:`\alpha = e^{-\frac12\int_0^t\beta}`,
    :math:`\sigma = \sqrt{1-\alpha^2}`; prior :math:`N(0, I)` at :math:`T = 1`.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def beta(self, t: Array) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t: Array) -> Array:
        return -0.5 * _beta_integral(t, self.beta_min, self.beta_max)

    def sigma(self, t: Array) -> Array:
        return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(t)))

    def drift_coefficient(self, t: Array) -> Array:
        return -0.5 * self.beta(t)

    def diffusion_squared(self, t: Array) -> Array:
        return self.beta(t)

    def time_of_log_snr(self, log_snr: Array) -> Array:
        # alpha^2 = sigmoid(lambda) for a variance-preserving process
        return _vp_time_of_half_log_alpha_sq(jax.nn.log_sigmoid(log_snr), self.beta_min, self.beta_max)

    @property
    def prior_std(self) -> float:
        return 1.0



@struct.dataclass
class SubVP(VP):
    r"""Sub-VP SDE (Song et al. 2021, Eq. 29): VP's drift with
    :math:`g^2 = \beta(t)(1 - e^{-2\int_0^t\beta})`, so :math:`\sigma = 1 - \alpha^2`
    (a standard deviation below VP's at every t); prior :math:`N(0, I)`.
    """

    def sigma(self, t: Array) -> Array:
        return -jnp.expm1(2.0 * self.log_alpha(t))

    def diffusion_squared(self, t: Array) -> Array:
        return self.beta(t) * -jnp.expm1(4.0 * self.log_alpha(t))

    def time_of_log_snr(self, log_snr: Array) -> Array:
        # alpha / (1 - alpha^2) = r = e^{lambda/2}  =>  r alpha^2 + alpha - r = 0
        r = jnp.exp(0.5 * log_snr)
        alpha = 2.0 * r / (1.0 + jnp.sqrt(1.0 + 4.0 * r**2))
        return _vp_time_of_half_log_alpha_sq(2.0 * jnp.log(alpha), self.beta_min, self.beta_max)


class _UnitAlpha:
    """Processes that only add noise: :math:`\alpha = 1`, :math:`f = 0`."""

    def log_alpha(self, t: Array) -> Array:
        return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(float)))

    def drift_coefficient(self, t: Array) -> Array:
        return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(float)))


@struct.dataclass
class VE(_UnitAlpha, _Process):
    r"""Variance-exploding SDE (SMLD's continuous limit; Song et al. 2021, Eq. 9).

    :math:`\sigma(t) = \sigma_{min}(\sigma_{max}/\sigma_{min})^t`, :math:`\alpha = 1`,
    :math:`f = 0`, :math:`g^2 = d\sigma^2/dt = 2\sigma^2\log(\sigma_{max}/\sigma_{min})`;
    prior :math:`N(0, \sigma_{max}^2 I)`.  The marginals are those of the data convolved
    with :math:`N(0, \sigma(t)^2 I)`.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0

    def sigma(self, t: Array) -> Array:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def diffusion_squared(self, t: Array) -> Array:
        return 2.0 * self.sigma(t) ** 2 * math.log(self.sigma_max / self.sigma_min)

    def time_of_log_snr(self, log_snr: Array) -> Array:
        return (-0.5 * log_snr - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)

    @property
    def prior_std(self) -> float:
        return self.sigma_max


@struct.dataclass
class EDM(_UnitAlpha, _Process):
    r"""The σ-parameterised process of Karras et al. (2022), "Elucidating the Design Space of
    Diffusion-Based Generative Models", Table 1: :math:`x_\sigma = x_0 + \sigma\varepsilon`
    with time equal to noise level, :math:`\alpha = 1`, :math:`\sigma(t) = t`, :math:`f = 0`,
    :math:`g^2 = 2t`; prior :math:`N(0, \sigma_{max}^2 I)`.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def sigma(self, t: Array) -> Array:
        return jnp.asarray(t, dtype=jnp.result_type(float))

    def diffusion_squared(self, t: Array) -> Array:
        return 2.0 * jnp.asarray(t, dtype=jnp.result_type(float))

    def time_of_log_snr(self, log_snr: Array) -> Array:
        return jnp.exp(-0.5 * log_snr)

    @property
    def prior_std(self) -> float:
        return self.sigma_max


SDE = Union[VP, SubVP, VE, EDM]
SDES: dict[str, type] = {"vp": VP, "subvp": SubVP, "ve": VE, "edm": EDM}


def make_sde(name: str, **options: Any) -> SDE:
    """The process called ``name`` (``vp``, ``subvp``, ``ve``, ``edm``) with ``options``."""
    if name not in SDES:
        raise ValueError(f"sde must be one of {sorted(SDES)}, got {name!r}")
    sde = SDES[name](**options)
    if not 0.0 <= sde.t_min < sde.t_max:
        raise ValueError(f"t_min must be below t_max, got t_min={sde.t_min}, t_max={sde.t_max}")
    return sde


# ------------------------------------------------------------------ model outputs


def convert(output: Array, source: str, target: str, x: Array, t: Array, sde: SDE) -> Array:
    r"""Convert a model output at :math:`(x, t)` between parameterisations.

    With :math:`x = \alpha x_0 + \sigma\varepsilon`: score :math:`= -\varepsilon/\sigma`;
    :math:`x_0 = (x - \sigma\varepsilon)/\alpha`; :math:`v = \alpha\varepsilon - \sigma x_0`
    (Salimans & Ho 2022), hence :math:`\varepsilon = (\sigma x + \alpha v)/(\alpha^2+\sigma^2)`.
    EDM's denoiser :math:`D(x;\sigma)` is the ``"x0"`` output.
    """
    for name in (source, target):
        if name not in MODEL_OUTPUTS:
            raise ValueError(f"model output must be one of {list(MODEL_OUTPUTS)}, got {name!r}")
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    if source == target:
        return output
    if source == "score":
        eps = -sigma * output
    elif source == "x0":
        eps = (x - alpha * output) / sigma
    elif source == "v":
        eps = (sigma * x + alpha * output) / (alpha**2 + sigma**2)
    else:
        eps = output
    if target == "eps":
        return eps
    if target == "score":
        return -eps / sigma
    x0 = (x - sigma * eps) / alpha
    if target == "x0":
        return x0
    return alpha * eps - sigma * x0


# ------------------------------------------------------------------ time grids

GRIDS = ("uniform_time", "quadratic_time", "uniform_log_snr", "karras")


def time_grid(sde: SDE, kind: str, num_steps: int, *, t_min: float | None = None,
              t_max: float | None = None, rho: float = 7.0) -> np.ndarray:
    r"""``num_steps + 1`` decreasing times from ``t_max`` to ``t_min`` (a float64 NumPy array).

    * ``uniform_time``: equal steps in t (Song et al. 2021).
    * ``quadratic_time``: :math:`t_i = t_{min} + (t_{max}-t_{min})(1 - i/N)^2`, denser near
      the data (Song, Meng, Ermon 2021, DDIM App. D.3).
    * ``uniform_log_snr``: equal steps in :math:`\lambda` (Lu et al. 2022, DPM-Solver, Sec. 3.4).
    * ``karras``: :math:`\tilde\sigma_i = (\tilde\sigma_{max}^{1/\rho} + \frac iN(\tilde\sigma_{min}^{1/\rho} -
      \tilde\sigma_{max}^{1/\rho}))^\rho` (Karras et al. 2022, Eq. 5) in the noise level
      :math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda/2}` of the scaled process (their
      Table 1: for VP, :math:`\sigma(t) = \sqrt{e^{\frac12\beta_d t^2 + \beta_{min}t} - 1}`),
      mapped to t through the log-SNR; for VE and EDM :math:`\tilde\sigma = \sigma`.

    The grid is data: samplers take it as an array, so any other spacing works too.
    """
    if kind not in GRIDS:
        raise ValueError(f"grid must be one of {list(GRIDS)}, got {kind!r}")
    num_steps = check_int("num_steps", num_steps)
    lo = float(sde.t_min if t_min is None else t_min)
    hi = float(sde.t_max if t_max is None else t_max)
    if not lo < hi:
        raise ValueError(f"t_min must be below t_max, got t_min={lo}, t_max={hi}")
    check_positive("rho", rho)
    u = np.linspace(0.0, 1.0, num_steps + 1)
    if kind == "uniform_time":
        grid = hi + u * (lo - hi)
    elif kind == "quadratic_time":
        grid = lo + (hi - lo) * (1.0 - u) ** 2
    elif kind == "uniform_log_snr":
        lam_hi, lam_lo = (float(sde.log_snr(jnp.asarray(t))) for t in (hi, lo))
        grid = np.array(sde.time_of_log_snr(jnp.asarray(lam_hi + u * (lam_lo - lam_hi))), np.float64)
    else:
        # sigma/alpha = exp(-lambda/2): the EDM noise level of the scaled process
        s_hi, s_lo = (math.exp(-0.5 * float(sde.log_snr(jnp.asarray(t)))) for t in (hi, lo))
        sigmas = (s_hi ** (1 / rho) + u * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
        grid = np.array(sde.time_of_log_snr(jnp.asarray(-2.0 * np.log(sigmas))), np.float64)
    grid[0], grid[-1] = hi, lo  # exact ends despite rounding and the round trips
    return grid


def time_of_sigma(sde: SDE, sigma: Array) -> Array:
    """The time at which the process has noise level ``sigma`` (through the log-SNR)."""
    if isinstance(sde, (VE, EDM)):
        return sde.time_of_log_snr(-2.0 * jnp.log(sigma))
    if isinstance(sde, SubVP):  # sigma = 1 - alpha^2
        return sde.time_of_log_snr(jnp.log1p(-sigma) - 2.0 * jnp.log(sigma))
    # VP: alpha = sqrt(1 - sigma^2)
    return sde.time_of_log_snr(jnp.log1p(-sigma**2) - 2.0 * jnp.log(sigma))


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
        steps = np.round(np.arange(num_train_steps, 0, -num_train_steps / num_steps)).astype(int) - 1
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
