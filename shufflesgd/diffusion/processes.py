r"""Linear forward diffusion processes and conversions between model outputs.

Every process here has Gaussian transition kernels from the data,
:math:`x_t = \alpha(t)\,x_0 + \sigma(t)\,\varepsilon`, and is the SDE
:math:`dx = f(t)\,x\,dt + g(t)\,dw` with :math:`f = d\log\alpha/dt` and
:math:`g^2 = d\sigma^2/dt - 2f\sigma^2` (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", Sec. 3.4 and App. B; Kingma et al. 2021,
"Variational Diffusion Models", for the :math:`(\alpha, \sigma)` view).  Its reverse-time SDE
(Anderson 1982) and probability-flow ODE (Song et al. 2021, Eq. 13) are

.. math:: dx = [f x - g^2\nabla\log p_t(x)]\,dt + g\,d\bar w, \qquad
          \frac{dx}{dt} = f x - \tfrac12 g^2\nabla\log p_t(x).

The processes are small pytrees: :class:`VP` (Song et al. 2021, Eq. 11), :class:`SubVP`
(Eq. 29), :class:`VE` (Eq. 9) and :class:`EDM` (Karras et al. 2022, Table 1), each exposing
``alpha``, ``sigma``, the log-SNR :math:`\lambda = 2\log(\alpha/\sigma)` and its inverse,
``drift_coefficient`` :math:`f`, ``diffusion_squared`` :math:`g^2`, the time range and the
prior.  A model may predict the score, :math:`\varepsilon`, :math:`x_0` (EDM's denoiser
:math:`D(x;\sigma)`) or :math:`v = \alpha\varepsilon - \sigma x_0` (Salimans & Ho 2022);
:func:`convert` maps between them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from shufflesgd._checks import check_finite, check_positive_finite, is_concrete

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

    def reverse_drift(
        self, x: Array, t: Array, score: Array, probability_flow: bool = False
    ) -> Array:
        r"""Drift of the reverse SDE :math:`f x - g^2 s` (or of the PF-ODE,
        :math:`f x - \frac12 g^2 s`)."""
        weight = 0.5 if probability_flow else 1.0
        return self.drift_coefficient(t) * x - weight * self.diffusion_squared(t) * score

    def prior_sample(self, key: Array, shape: tuple[int, ...]) -> Array:
        r"""A draw from the prior :math:`N(0, \sigma_T^2 I)` (:math:`\sigma_T = 1` for VP and
        sub-VP)."""
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
        return _vp_time_of_half_log_alpha_sq(
            jax.nn.log_sigmoid(log_snr), self.beta_min, self.beta_max
        )

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
        log_ratio = math.log(self.sigma_max / self.sigma_min)
        return (-0.5 * log_snr - math.log(self.sigma_min)) / log_ratio

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


SDE = VP | SubVP | VE | EDM


SDES: dict[str, type] = {"vp": VP, "subvp": SubVP, "ve": VE, "edm": EDM}


def make_sde(name: str, **options: Any) -> SDE:
    """The process called ``name`` (``vp``, ``subvp``, ``ve``, ``edm``) with ``options``.

    ``ValueError`` naming the option unless :math:`\\beta_{min} < \\beta_{max}` and
    :math:`\\sigma_{min} < \\sigma_{max}` are positive and finite and
    :math:`0 \\le t_{min} < t_{max}` are finite.
    """
    if name not in SDES:
        raise ValueError(f"sde must be one of {sorted(SDES)}, got {name!r}")
    sde = SDES[name](**options)
    for low, high in (("beta_min", "beta_max"), ("sigma_min", "sigma_max")):
        if hasattr(sde, low):
            check_positive_finite(**{low: getattr(sde, low), high: getattr(sde, high)})
            if is_concrete(getattr(sde, low)) and not getattr(sde, low) < getattr(sde, high):
                raise ValueError(
                    f"{low} must be below {high}, got {low}={getattr(sde, low)}, "
                    f"{high}={getattr(sde, high)}"
                )
    check_finite("t_min", sde.t_min)
    check_finite("t_max", sde.t_max)
    if not 0.0 <= sde.t_min < sde.t_max:
        raise ValueError(f"t_min must be below t_max, got t_min={sde.t_min}, t_max={sde.t_max}")
    return sde


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
