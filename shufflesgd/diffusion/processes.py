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
(Eq. 29), :class:`VE` (Eq. 9), :class:`EDM` (Karras et al. 2022, Table 1) and the interpolants
of flow matching, :class:`RectifiedFlow` (:math:`\alpha = 1 - t`, :math:`\sigma = t`) and
:class:`TrigFlow` (:math:`\alpha = \cos\frac{\pi t}2`, :math:`\sigma = \sin\frac{\pi t}2`),
both :class:`Interpolant` processes.  Each exposes ``alpha``, ``sigma``, their time derivatives
``alpha_dot`` and ``sigma_dot``, the log-SNR :math:`\lambda = 2\log(\alpha/\sigma)` and its
inverse, ``drift_coefficient`` :math:`f`, ``diffusion_squared`` :math:`g^2`, the time range and
the prior.  A model may predict the score, :math:`\varepsilon`, :math:`x_0` (EDM's denoiser
:math:`D(x;\sigma)`), :math:`v = \alpha\varepsilon - \sigma x_0` (Salimans & Ho 2022) or the
flow-matching velocity :math:`u = \dot\alpha x_0 + \dot\sigma\varepsilon` (the conditional
expectation of :math:`dx_t/dt`; Lipman et al. 2023, Liu et al. 2023); :func:`convert` maps
between them.  The velocity *is* the probability-flow drift: with :math:`s = -\varepsilon/\sigma`,
:math:`f x - \frac12 g^2 s = f(x - \sigma\varepsilon) + \dot\sigma\varepsilon =
\dot\alpha x_0 + \dot\sigma\varepsilon`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from shufflesgd._checks import check_finite, check_positive_finite, is_concrete

Array = jax.Array


#: The model outputs that :func:`convert` maps between, in order the score
#: :math:`\nabla\log p_t`, :math:`\varepsilon`, :math:`x_0`, Salimans & Ho's
#: :math:`v = \alpha\varepsilon - \sigma x_0` and the flow-matching velocity
#: :math:`u = \dot\alpha x_0 + \dot\sigma\varepsilon`.
MODEL_OUTPUTS = ("score", "eps", "x0", "v", "velocity")


def _beta_integral(t: Array, beta_min: float, beta_max: float) -> Array:
    return 0.5 * t**2 * (beta_max - beta_min) + t * beta_min


def _vp_time_of_half_log_alpha_sq(log_alpha_sq: Array, beta_min: float, beta_max: float) -> Array:
    """Solve ``-(1/2) t^2 (bmax - bmin) - t bmin = log alpha^2`` for t >= 0."""
    delta = beta_max - beta_min
    return (-beta_min + jnp.sqrt(beta_min**2 - 2.0 * delta * log_alpha_sq)) / delta


def _as_time(t: Array) -> Array:
    return jnp.asarray(t, dtype=jnp.result_type(float))


class _Process:
    """What every linear process derives from ``log_alpha``, ``sigma``, ``f`` and ``g^2``."""

    #: Whether the probability-flow drift is evaluated as the model's velocity
    #: :math:`\dot\alpha\hat x_0 + \dot\sigma\hat\varepsilon` (finite where
    #: :math:`\alpha = 0`) rather than as :math:`f x - \frac12 g^2 s`
    #: (:func:`shufflesgd.diffusion.samplers.base.pf_ode_drift`); true for the interpolants.
    velocity_drift = False

    def alpha(self, t: Array) -> Array:
        return jnp.exp(self.log_alpha(t))

    def alpha_dot(self, t: Array) -> Array:
        r""":math:`d\alpha/dt`, here by forward-mode differentiation of ``alpha``."""
        t = _as_time(t)
        return jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))[1]

    def sigma_dot(self, t: Array) -> Array:
        r""":math:`d\sigma/dt`, here by forward-mode differentiation of ``sigma`` (infinite
        where :math:`\sigma` grows like :math:`\sqrt t`, as VP's at :math:`t = 0`)."""
        t = _as_time(t)
        return jax.jvp(self.sigma, (t,), (jnp.ones_like(t),))[1]

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


class Interpolant(_Process):
    r"""A stochastic interpolant :math:`x_t = \alpha(t)x_0 + \sigma(t)\varepsilon` on
    :math:`t \in [0, 1]` from the data (:math:`\alpha = 1, \sigma = 0`) to pure noise
    (:math:`\alpha(1) = 0, \sigma(1) = 1`): the processes of flow matching (Lipman et al. 2023,
    "Flow Matching for Generative Modeling"), rectified flow (Liu, Gong & Liu 2023, "Flow
    Straight and Fast") and stochastic interpolants (Albergo & Vanden-Eijnden 2023, "Building
    Normalizing Flows with Stochastic Interpolants"; Ma et al. 2024, SiT).

    A model is trained to regress the velocity :math:`\dot\alpha x_0 + \dot\sigma\varepsilon`
    of the interpolant; its minimiser :math:`u(x, t) = E[\dot\alpha x_0 + \dot\sigma\varepsilon
    \mid x_t = x]` is the probability-flow drift, so the ODE :math:`dx/dt = u` carries
    :math:`N(0, I)` at :math:`t = 1` onto the data at :math:`t = 0`.  As a linear SDE
    (:math:`f = \dot\alpha/\alpha`, :math:`g^2 = 2\sigma(\dot\sigma\alpha -
    \dot\alpha\sigma)/\alpha`) the interpolant is singular at :math:`t = 1`: :math:`\alpha = 0`,
    :math:`\lambda = -\infty` and :math:`f, g^2` infinite.  Hence ``velocity_drift``: the PF-ODE
    drift is taken as the model's velocity, finite at :math:`t = 1` for a velocity, :math:`x_0`
    or :math:`v` model (a score or :math:`\varepsilon` model carries no information about the
    data at :math:`t = 1`, where :math:`p_1 = N(0, I)` whatever the data).

    Time range.  The subclasses default to :math:`t \in [10^{-3}, 1 - 10^{-3}]`, SiT's
    ``sample_eps`` for models that are not velocity models (Ma et al. 2024,
    ``create_transport``): there :math:`f, g^2` are finite, so every sampler of
    :data:`shufflesgd.diffusion.SAMPLERS` (the reverse SDE's included) runs unchanged, at a prior
    mismatch comparable to VP's (:math:`\alpha(t_{max}) \approx 10^{-3}` against VP's
    :math:`e^{-5} \approx 7\cdot10^{-3}`).  With a velocity model, give ``t_max=1``
    (``make_sde("flow", t_max=1.0)``; SiT's ``sample_eps = 0``): the prior is then exact and
    the probability-flow samplers (:func:`~shufflesgd.diffusion.samplers.ode.pf_ode_euler`,
    :func:`~shufflesgd.diffusion.samplers.ode.pf_ode_heun`, the adaptive solve and DDIM, which
    use only :math:`\hat x_0` and :math:`\hat\varepsilon`) start at :math:`t = 1` exactly;
    samplers that use :math:`f`, :math:`g^2` or :math:`\sigma/\alpha` there (Euler–Maruyama,
    EDM, Restart) do not.

    A new interpolant subclasses this with ``alpha``, ``sigma``, their derivatives
    ``alpha_dot``, ``sigma_dot``, the inverse ``time_of_log_snr`` and ``time_of_sigma``, and the
    fields ``t_min``, ``t_max`` (as a ``flax.struct.dataclass``); everything else follows.
    """

    velocity_drift = True

    def log_alpha(self, t: Array) -> Array:
        return jnp.log(self.alpha(t))

    def log_snr(self, t: Array) -> Array:
        r""":math:`\lambda(t) = 2\log(\alpha/\sigma)`: :math:`+\infty` at 0, :math:`-\infty`
        at 1."""
        return 2.0 * (self.log_alpha(t) - jnp.log(self.sigma(t)))

    def drift_coefficient(self, t: Array) -> Array:
        r""":math:`f = \dot\alpha/\alpha` (:math:`-\infty` at :math:`t = 1`)."""
        return self.alpha_dot(t) / self.alpha(t)

    def diffusion_squared(self, t: Array) -> Array:
        r""":math:`g^2 = d\sigma^2/dt - 2f\sigma^2 = 2\sigma(\dot\sigma\alpha -
        \dot\alpha\sigma)/\alpha` (:math:`+\infty` at :math:`t = 1`)."""
        alpha, sigma = self.alpha(t), self.sigma(t)
        return 2.0 * sigma * (self.sigma_dot(t) * alpha - self.alpha_dot(t) * sigma) / alpha

    @property
    def prior_std(self) -> float:
        return 1.0


@struct.dataclass
class RectifiedFlow(Interpolant):
    r"""The linear interpolant of rectified flow and flow matching: :math:`x_t = (1-t)x_0 +
    t\varepsilon` (Liu, Gong & Liu 2023, "Flow Straight and Fast: Learning to Generate and
    Transfer Data with Rectified Flow", Eq. 1; Lipman et al. 2023, the optimal-transport path
    with :math:`\sigma_{min} = 0`; Esser et al. 2024, SD3, whose :math:`t` is this one), the
    process of Stable Diffusion 3 and diffusers' ``FlowMatchEulerDiscreteScheduler`` (whose
    "sigma" is :math:`t`).

    :math:`\alpha = 1 - t`, :math:`\sigma = t`, velocity target :math:`\varepsilon - x_0`,
    :math:`\lambda = 2\log\frac{1-t}{t}`, :math:`t(\lambda) = \mathrm{sigmoid}(-\lambda/2)`,
    :math:`f = -1/(1-t)`, :math:`g^2 = 2t/(1-t)`; prior :math:`N(0, I)`.  Defaults
    ``t_min=1e-3``, ``t_max=1 - 1e-3`` (every sampler runs; :class:`Interpolant`); ``t_max=1``
    for the velocity path.
    """

    t_min: float = 1e-3
    t_max: float = 1.0 - 1e-3

    def alpha(self, t: Array) -> Array:
        return 1.0 - _as_time(t)

    def log_alpha(self, t: Array) -> Array:
        return jnp.log1p(-_as_time(t))

    def sigma(self, t: Array) -> Array:
        return _as_time(t)

    def alpha_dot(self, t: Array) -> Array:
        return jnp.full_like(_as_time(t), -1.0)

    def sigma_dot(self, t: Array) -> Array:
        return jnp.ones_like(_as_time(t))

    def drift_coefficient(self, t: Array) -> Array:
        return -1.0 / (1.0 - _as_time(t))

    def diffusion_squared(self, t: Array) -> Array:
        t = _as_time(t)
        return 2.0 * t / (1.0 - t)

    def time_of_log_snr(self, log_snr: Array) -> Array:
        # (1 - t) / t = e^{lambda / 2}
        return jax.nn.sigmoid(-0.5 * jnp.asarray(log_snr))

    def time_of_sigma(self, sigma: Array) -> Array:
        return _as_time(sigma)


@struct.dataclass
class TrigFlow(Interpolant):
    r"""The trigonometric interpolant :math:`x_t = \cos(\frac{\pi t}2)x_0 +
    \sin(\frac{\pi t}2)\varepsilon`: Albergo & Vanden-Eijnden (2023)'s trigonometric
    interpolant, SiT's "GVP" path (Ma et al. 2024), Lu & Song (2024)'s TrigFlow with
    :math:`\sigma_d = 1` in the time :math:`2t/\pi`; the cosine schedule of Nichol & Dhariwal
    (2021) without its offset.  Variance preserving (:math:`\alpha^2 + \sigma^2 = 1`).

    :math:`\dot\alpha = -\frac\pi2\sigma`, :math:`\dot\sigma = \frac\pi2\alpha`, so the
    velocity is :math:`\frac\pi2(\alpha\varepsilon - \sigma x_0) = \frac\pi2 v` (Salimans &
    Ho's :math:`v`, rescaled); :math:`\lambda = 2\log\cot\frac{\pi t}2`,
    :math:`t(\lambda) = \frac2\pi\arctan e^{-\lambda/2}`,
    :math:`f = -\frac\pi2\tan\frac{\pi t}2`, :math:`g^2 = \pi\tan\frac{\pi t}2`; prior
    :math:`N(0, I)`.  :math:`\alpha` is computed as :math:`\sin(\frac\pi2(1 - t))`, exactly 0
    at :math:`t = 1`.  Defaults as :class:`RectifiedFlow`.
    """

    t_min: float = 1e-3
    t_max: float = 1.0 - 1e-3

    def alpha(self, t: Array) -> Array:
        return jnp.sin(0.5 * math.pi * (1.0 - _as_time(t)))

    def sigma(self, t: Array) -> Array:
        return jnp.sin(0.5 * math.pi * _as_time(t))

    def alpha_dot(self, t: Array) -> Array:
        return -0.5 * math.pi * self.sigma(t)

    def sigma_dot(self, t: Array) -> Array:
        return 0.5 * math.pi * self.alpha(t)

    def time_of_log_snr(self, log_snr: Array) -> Array:
        # cot(pi t / 2) = e^{lambda / 2}
        return jnp.arctan(jnp.exp(-0.5 * jnp.asarray(log_snr))) * (2.0 / math.pi)

    def time_of_sigma(self, sigma: Array) -> Array:
        return jnp.arcsin(sigma) * (2.0 / math.pi)


SDE = VP | SubVP | VE | EDM | RectifiedFlow | TrigFlow


#: Every process by name, as :func:`make_sde` builds it.
SDES: dict[str, type] = {
    "vp": VP,
    "subvp": SubVP,
    "ve": VE,
    "edm": EDM,
    "flow": RectifiedFlow,
    "trig": TrigFlow,
}


def make_sde(name: str, **options: Any) -> SDE:
    """The process called ``name`` (``vp``, ``subvp``, ``ve``, ``edm``, ``flow``: the
    :class:`RectifiedFlow`, ``trig``: the :class:`TrigFlow`) with ``options``.

    ``ValueError`` naming the option unless :math:`\\beta_{min} < \\beta_{max}` and
    :math:`\\sigma_{min} < \\sigma_{max}` are positive and finite and
    :math:`0 \\le t_{min} < t_{max}` are finite, with :math:`t_{max} \\le 1` for an
    :class:`Interpolant` (:math:`\\alpha(1) = 0`).
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
    if isinstance(sde, Interpolant) and not sde.t_max <= 1.0:
        raise ValueError(
            f"t_max must be at most 1 for the {name!r} interpolant (alpha(1) = 0), "
            f"got t_max={sde.t_max}"
        )
    return sde


def convert(output: Array, source: str, target: str, x: Array, t: Array, sde: SDE) -> Array:
    r"""Convert a model output at :math:`(x, t)` between parameterisations.

    With :math:`x = \alpha x_0 + \sigma\varepsilon`: score :math:`= -\varepsilon/\sigma`;
    :math:`x_0 = (x - \sigma\varepsilon)/\alpha`; :math:`v = \alpha\varepsilon - \sigma x_0`
    (Salimans & Ho 2022), hence :math:`\varepsilon = (\sigma x + \alpha v)/(\alpha^2+\sigma^2)`.
    EDM's denoiser :math:`D(x;\sigma)` is the ``"x0"`` output.

    The flow-matching ``"velocity"`` :math:`u = \dot\alpha x_0 + \dot\sigma\varepsilon` (not
    Salimans & Ho's :math:`v`) and :math:`x` determine both predictions, with
    :math:`\Delta = \dot\sigma\alpha - \dot\alpha\sigma` (:math:`= 1` for
    :class:`RectifiedFlow`, :math:`\frac\pi2` for :class:`TrigFlow`):

    .. math:: x_0 = (\dot\sigma x - \sigma u)/\Delta, \qquad
              \varepsilon = (\alpha u - \dot\alpha x)/\Delta,

    both finite at :math:`\alpha = 0` (the interpolants' :math:`t = 1`).  To or from the
    velocity, both :math:`x_0` and :math:`\varepsilon` are formed from the source directly
    (from :math:`v`: :math:`x_0 = (\alpha x - \sigma v)/(\alpha^2+\sigma^2)`), so that an
    :math:`x_0`, :math:`v` or velocity model gives a finite velocity at :math:`\alpha = 0`; a
    score or :math:`\varepsilon` model cannot (at :math:`\alpha = 0`, :math:`x_t` carries no
    information about :math:`x_0`).  The conversions between the other four outputs are
    unchanged.
    """
    for name in (source, target):
        if name not in MODEL_OUTPUTS:
            raise ValueError(f"model output must be one of {list(MODEL_OUTPUTS)}, got {name!r}")
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    if source == target:
        return output
    if "velocity" in (source, target):
        return _convert_velocity(output, source, target, x, t, sde, alpha, sigma)
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


def _convert_velocity(
    output: Array,
    source: str,
    target: str,
    x: Array,
    t: Array,
    sde: SDE,
    alpha: Array,
    sigma: Array,
) -> Array:
    """:func:`convert` to or from the velocity: both predictions from the source, then the
    target from them."""
    alpha_dot, sigma_dot = sde.alpha_dot(t), sde.sigma_dot(t)
    if source == "velocity":
        det = sigma_dot * alpha - alpha_dot * sigma
        x0 = (sigma_dot * x - sigma * output) / det
        eps = (alpha * output - alpha_dot * x) / det
    elif source == "x0":
        x0, eps = output, (x - alpha * output) / sigma
    elif source == "v":
        norm = alpha**2 + sigma**2
        x0, eps = (alpha * x - sigma * output) / norm, (sigma * x + alpha * output) / norm
    else:
        eps = -sigma * output if source == "score" else output
        x0 = (x - sigma * eps) / alpha
    if target == "velocity":
        return alpha_dot * x0 + sigma_dot * eps
    if target == "x0":
        return x0
    if target == "eps":
        return eps
    if target == "score":
        return -eps / sigma
    return alpha * eps - sigma * x0
