r"""The mean-reverting SDE of IR-SDE: a forward process that ends at a Gaussian around a given mean.

Luo, Gustafsson, Zhao, Sjölund & Schön (2023), "Image Restoration with Mean-Reverting Stochastic
Differential Equations" (ICML 2023), Eqs. 1-3: the forward SDE

.. math:: dx = \theta_t(\mu - x)\,dt + \sigma_t\,dw, \qquad \sigma_t^2/\theta_t = 2\lambda^2,

pulls :math:`x_0` (a clean image) towards the mean :math:`\mu` (the degraded observation) while
adding noise, and with :math:`\bar\theta_t = \int_0^t\theta_s\,ds` its marginals are Gaussian,

.. math:: x_t \mid x_0 \sim N\bigl(\mu + (x_0 - \mu)e^{-\bar\theta_t},\
          \lambda^2(1 - e^{-2\bar\theta_t})\,I\bigr),

so that :math:`x_T \approx N(\mu, \lambda^2 I)`, the prior, once :math:`e^{-\bar\theta_T}` is
small.  :class:`MeanReverting` is this process with :math:`\mu` (an array shaped like a sample,
or a scalar) and every hyper-parameter as pytree fields, so they can be traced and vmapped, and
the schedule's name as a static field.

**Relation to the zero-mean linear processes.**  The centred variable :math:`y = x - \mu` obeys
:math:`dy = -\theta_t y\,dt + \sigma_t\,dw`, the linear form :math:`dy = f y\,dt + g\,dw` of
:mod:`shufflesgd.diffusion.processes` with

.. math:: \alpha_t = e^{-\bar\theta_t}, \quad \sigma(t) = \lambda\sqrt{1-\alpha_t^2}, \quad
          f = -\theta_t, \quad g^2 = 2\lambda^2\theta_t,

(a variance-preserving process scaled by :math:`\lambda`) and :math:`y_t = \alpha_t y_0 +
\sigma(t)\varepsilon`.  The methods ``alpha``, ``sigma``, ``log_snr``, ``time_of_log_snr``,
``drift_coefficient`` and ``diffusion_squared`` are those of :math:`y`; ``reverse_drift``,
``prior_sample``, ``prior_log_prob`` and ``marginal`` act on :math:`x` (they coincide with the
zero-mean ones at :math:`\mu = 0`).  Hence every sampler of :mod:`shufflesgd.diffusion.samplers`
runs on a mean-reverting process through :func:`sample_centred`: on :math:`y_T = x_T - \mu` with
the process at :math:`\mu = 0` and the model seen through :func:`centred_model`, adding
:math:`\mu` back at the end.  :func:`shufflesgd.diffusion.mrs` is MRS, the fast sampler written
for this process.  Model outputs are read in the mean-reverting sense
(:func:`convert_mean_reverting`): :math:`x = \mu + \alpha_t(x_0 - \mu) +
\sigma(t)\varepsilon`, score :math:`= -\varepsilon/\sigma(t)`,
:math:`v = \alpha_t\varepsilon - \sigma(t)(x_0 - \mu)`.

**Schedules** (:data:`THETA_SCHEDULES`), continuous-time forms of the IR-SDE code's discrete
ones (its cumulative sum becomes the integral :math:`\bar\theta`), with :math:`u = t/t_{max}` and
the scale fixed by :math:`e^{-\bar\theta(t_{max})}` = ``terminal_alpha`` (the reference's ``eps``):

* ``"cosine"``: :math:`\theta \propto 1 - \cos^2\phi(u)/\cos^2\phi(0)`,
  :math:`\phi(u) = \frac\pi2\frac{u+s}{1+s}` (one minus Nichol & Dhariwal's cosine
  :math:`\bar\alpha`), :math:`s` = ``cosine_s``; :math:`\theta(0) = 0`;
* ``"linear"``: :math:`\theta \propto r + (1-r)u`, :math:`r` = ``linear_start``
  :math:`= \theta(0)/\theta(t_{max})` (0.005 is the reference's 0.0001/0.02);
* ``"constant"``: :math:`\theta` constant.

:math:`\bar\theta` is in closed form for all three; the cosine one is evaluated without the
cancellation of its naive form near :math:`t = 0`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from shufflesgd._checks import check_finite, check_positive_finite, is_concrete
from shufflesgd.diffusion.processes import MODEL_OUTPUTS
from shufflesgd.diffusion.processes import convert as _convert_linear
from shufflesgd.diffusion.samplers.base import Model, SamplerInfo

Array = jax.Array

#: The :math:`\theta` schedules of :class:`MeanReverting`.
THETA_SCHEDULES = ("cosine", "linear", "constant")


def _float(t: Any) -> Array:
    return jnp.asarray(t, dtype=jnp.result_type(float))


def _w_minus_sin_w(w: Array) -> Array:
    r""":math:`w - \sin w` without cancellation for small w (a Taylor series below 0.1)."""
    small = jnp.abs(w) < 0.1
    ws = jnp.where(small, w, 0.0)
    w2 = ws * ws
    series = ws * w2 / 6.0 * (1.0 - w2 / 20.0 * (1.0 - w2 / 42.0 * (1.0 - w2 / 72.0)))
    return jnp.where(small, series, w - jnp.sin(w))


def _cosine_shape(u: Array, s: Any) -> Array:
    r""":math:`1 - \cos^2\phi(u)/\cos^2\phi(0) = \sin(au)\sin(au+2\phi_0)/\cos^2\phi_0`."""
    a = 0.5 * math.pi / (1.0 + s)
    phi0 = a * s
    return jnp.sin(a * u) * jnp.sin(a * u + 2.0 * phi0) / jnp.cos(phi0) ** 2


def _cosine_integral(u: Array, s: Any) -> Array:
    r""":math:`\int_0^u` of :func:`_cosine_shape`, without cancellation near 0:
    :math:`\int_0^u\sin(av)\sin(av + 2\phi_0)\,dv = [\cos 2\phi_0\,(w - \sin w)/(2a)
    + \sin^2(au)\sin 2\phi_0/a]/2` with :math:`w = 2au`."""
    a = 0.5 * math.pi / (1.0 + s)
    phi0 = a * s
    integral = (
        jnp.cos(2.0 * phi0) * _w_minus_sin_w(2.0 * a * u) / (2.0 * a)
        + jnp.sin(a * u) ** 2 * jnp.sin(2.0 * phi0) / a
    )
    return 0.5 * integral / jnp.cos(phi0) ** 2


@jax.jit
def _bisect_cosine_integral(value: Array, s: Any) -> Array:
    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = _cosine_integral(mid, s) < value
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 64, halve, (jnp.zeros_like(value), jnp.ones_like(value)))
    return 0.5 * (lo + hi)


@jax.custom_jvp
def _cosine_inverse_integral(value: Array, s: Any) -> Array:
    r"""The u in [0, 1] with ``_cosine_integral(u, s) = value``, by bisection to the last bit (the
    integral increases on [0, 1]).  The values are padded to a multiple of 256, so the bisection
    compiles once per dtype for every grid up to that length.  Differentiable: the bisection's
    own derivative is zero, so its JVP is that of the implicit function
    :math:`I(u, s) = v`, :math:`du = (dv - \partial_s I\,ds)/\partial_u I`, with
    :math:`\partial_u I` = :func:`_cosine_shape`."""
    value = jnp.asarray(value)
    flat = value.reshape(-1)
    size = 256 * max(1, -(-flat.shape[0] // 256))
    padded = jnp.pad(flat, (0, size - flat.shape[0]))
    return _bisect_cosine_integral(padded, s)[: flat.shape[0]].reshape(value.shape)


@_cosine_inverse_integral.defjvp
def _cosine_inverse_integral_jvp(
    primals: tuple[Array, Any], tangents: tuple[Array, Any]
) -> tuple[Array, Array]:
    value, s = primals
    d_value, d_s = tangents
    u = _cosine_inverse_integral(value, s)
    _, integral_in_s = jax.jvp(lambda shape: _cosine_integral(u, shape), (s,), (d_s,))
    return u, (d_value - integral_in_s) / _cosine_shape(u, s)


@struct.dataclass
class MeanReverting:
    r"""The mean-reverting SDE of IR-SDE (Luo et al. 2023, ICML, Eqs. 1-3; see the module
    docstring): :math:`dx = \theta_t(\mu - x)\,dt + \sqrt{2\lambda^2\theta_t}\,dw` on
    :math:`[0, t_{max}]`, marginals :math:`N(\mu + \alpha_t(x_0-\mu), \sigma(t)^2 I)` with
    :math:`\alpha_t = e^{-\bar\theta_t}`, :math:`\sigma(t) = \lambda\sqrt{1-\alpha_t^2}`, prior
    :math:`N(\mu, \lambda^2 I)`.

    Fields: ``mu`` (:math:`\mu`: an array shaped like one sample, or a scalar),
    ``stationary_std`` (:math:`\lambda`, the standard deviation of the stationary law),
    ``terminal_alpha`` (:math:`e^{-\bar\theta(t_{max})}`, in (0, 1): how much of
    :math:`x_0 - \mu` is left at :math:`t_{max}`), ``cosine_s`` and ``linear_start`` (the shapes of
    the cosine and linear schedules), ``t_min``, ``t_max`` — all pytree fields, so they may be
    traced — and ``schedule`` (one of :data:`THETA_SCHEDULES`, static).  Build it with
    :func:`mean_reverting`, which checks every field.  At ``t_min = 1e-3``,
    :math:`\sigma/\lambda` is about 6.5e-4 (cosine), 0.011 (linear) and 0.10 (constant) with the
    default ``terminal_alpha``.
    """

    mu: Any
    stationary_std: Any
    terminal_alpha: Any = 0.005
    cosine_s: Any = 0.008
    linear_start: Any = 0.005
    t_min: Any = 1e-3
    t_max: Any = 1.0
    schedule: str = struct.field(pytree_node=False, default="cosine")

    # ----- the schedule: theta, its integral and the inverse of the integral

    def _shape(self, u: Array) -> Array:
        if self.schedule == "constant":
            return jnp.ones_like(u)
        if self.schedule == "linear":
            r = self.linear_start
            return r + (1.0 - r) * u
        return _cosine_shape(u, self.cosine_s)

    def _integral(self, u: Array) -> Array:
        r""":math:`\int_0^u` of the shape."""
        if self.schedule == "constant":
            return u
        if self.schedule == "linear":
            r = self.linear_start
            return r * u + 0.5 * (1.0 - r) * u**2
        return _cosine_integral(u, self.cosine_s)

    def _inverse_integral(self, value: Array) -> Array:
        """The u in [0, 1] with ``_integral(u) = value`` (``value`` within the range)."""
        if self.schedule == "constant":
            return value
        if self.schedule == "linear":
            r = self.linear_start
            root = r + jnp.sqrt(r**2 + 2.0 * (1.0 - r) * value)
            return jnp.where(value > 0, 2.0 * value / jnp.where(root > 0, root, 1.0), 0.0)
        return _cosine_inverse_integral(value, self.cosine_s)

    @property
    def theta_bar_max(self) -> Array:
        r""":math:`\bar\theta(t_{max}) = -\log` ``terminal_alpha``."""
        return -jnp.log(_float(self.terminal_alpha))

    def theta(self, t: Array) -> Array:
        r"""The mean-reversion rate :math:`\theta_t`."""
        u = _float(t) / self.t_max
        return self.theta_bar_max * self._shape(u) / (self.t_max * self._integral(1.0))

    def theta_bar(self, t: Array) -> Array:
        r""":math:`\bar\theta_t = \int_0^t\theta_s\,ds` in closed form."""
        u = _float(t) / self.t_max
        return self.theta_bar_max * self._integral(u) / self._integral(1.0)

    def time_of_theta_bar(self, theta_bar: Array) -> Array:
        r"""The time :math:`t \in [0, t_{max}]` with :math:`\bar\theta_t` = ``theta_bar``."""
        ratio = jnp.clip(_float(theta_bar) / self.theta_bar_max, 0.0, 1.0)
        return self.t_max * self._inverse_integral(ratio * self._integral(1.0))

    # ----- the linear-process interface (of the centred variable y = x - mu)

    def log_alpha(self, t: Array) -> Array:
        return -self.theta_bar(t)

    def alpha(self, t: Array) -> Array:
        r""":math:`\alpha_t = e^{-\bar\theta_t}`, the weight of :math:`x_0 - \mu` in
        :math:`x_t - \mu`."""
        return jnp.exp(-self.theta_bar(t))

    def sigma(self, t: Array) -> Array:
        r""":math:`\sigma(t) = \lambda\sqrt{1 - e^{-2\bar\theta_t}}`, the marginal standard
        deviation."""
        return self.stationary_std * jnp.sqrt(-jnp.expm1(-2.0 * self.theta_bar(t)))

    def log_snr(self, t: Array) -> Array:
        r""":math:`2\log(\alpha_t/\sigma(t))` (:math:`+\infty` at :math:`t = 0`)."""
        theta_bar = self.theta_bar(t)
        return (
            -2.0 * theta_bar
            - 2.0 * jnp.log(self.stationary_std)
            - jnp.log(-jnp.expm1(-2.0 * theta_bar))
        )

    def time_of_log_snr(self, log_snr: Array) -> Array:
        r"""Inverse of :meth:`log_snr`: :math:`e^{-\mathrm{SNR}} = \lambda^2(e^{2\bar\theta}-1)`
        gives :math:`\bar\theta = \frac12\log(1 + e^{-\mathrm{SNR}}/\lambda^2)`, then the time."""
        theta_bar = 0.5 * jnp.log1p(jnp.exp(-_float(log_snr)) / self.stationary_std**2)
        return self.time_of_theta_bar(theta_bar)

    def alpha_dot(self, t: Array) -> Array:
        r""":math:`d\alpha_t/dt = -\theta_t\alpha_t`."""
        return -self.theta(t) * self.alpha(t)

    def sigma_dot(self, t: Array) -> Array:
        r""":math:`d\sigma/dt = \lambda^2\theta_t\alpha_t^2/\sigma(t)` (infinite at
        :math:`t = 0`)."""
        return self.stationary_std**2 * self.theta(t) * self.alpha(t) ** 2 / self.sigma(t)

    def drift_coefficient(self, t: Array) -> Array:
        r""":math:`f = -\theta_t`, the drift coefficient of :math:`y = x - \mu`."""
        return -self.theta(t)

    def diffusion_squared(self, t: Array) -> Array:
        r""":math:`g^2 = \sigma_t^2 = 2\lambda^2\theta_t` (IR-SDE's stationary-variance tie)."""
        return 2.0 * self.stationary_std**2 * self.theta(t)

    @property
    def prior_std(self) -> Any:
        r""":math:`\lambda`: the prior is :math:`N(\mu, \lambda^2 I)`."""
        return self.stationary_std

    # ----- the process in x

    def drift(self, x: Array, t: Array) -> Array:
        r"""The forward drift :math:`\theta_t(\mu - x)`."""
        return self.theta(t) * (self.mu - x)

    def reverse_drift(
        self, x: Array, t: Array, score: Array, probability_flow: bool = False
    ) -> Array:
        r"""Drift of the reverse SDE :math:`\theta_t(\mu - x) - g^2 s` (Anderson 1982,
        as IR-SDE reverses it), or of the probability-flow ODE
        :math:`\theta_t(\mu - x) - \frac12 g^2 s` (Song et al. 2021, Eq. 13)."""
        weight = 0.5 if probability_flow else 1.0
        return self.drift(x, t) - weight * self.diffusion_squared(t) * score

    def marginal(self, x0: Array, t: Array) -> tuple[Array, Array]:
        r"""Mean :math:`\mu + \alpha_t(x_0 - \mu)` and standard deviation :math:`\sigma(t)` of
        :math:`x_t \mid x_0` (Luo et al. 2023, Eqs. 1-3)."""
        return self.mu + self.alpha(t) * (x0 - self.mu), self.sigma(t)

    def prior_sample(self, key: Array, shape: tuple[int, ...]) -> Array:
        r"""A draw from the prior :math:`N(\mu, \lambda^2 I)` of the given shape (``mu``
        broadcasts to it)."""
        return self.mu + self.stationary_std * jax.random.normal(key, shape)

    def prior_log_prob(self, x: Array) -> Array:
        """Log-density of the prior at ``x`` (the last axis is the event dimension)."""
        var = self.stationary_std**2
        d = x.shape[-1]
        return -0.5 * jnp.sum((x - self.mu) ** 2, axis=-1) / var - 0.5 * d * jnp.log(
            2 * jnp.pi * var
        )

    def centred(self) -> MeanReverting:
        r"""The same process with :math:`\mu = 0`: the zero-mean linear process of
        :math:`y = x - \mu`."""
        return self.replace(mu=0.0)


def check_mean_reverting(sde: Any, name: str = "sde") -> None:
    r"""``TypeError`` unless ``sde`` is a :class:`MeanReverting`; ``ValueError`` naming the field
    for a concrete field out of range: ``stationary_std`` positive and finite,
    ``terminal_alpha`` in (0, 1), ``cosine_s`` and ``linear_start`` non-negative and finite,
    :math:`0 \le t_{min} < t_{max}` finite, ``mu`` finite, ``schedule`` in
    :data:`THETA_SCHEDULES`.  Traced fields pass (their values cannot be inspected)."""
    if not isinstance(sde, MeanReverting):
        raise TypeError(f"{name} must be a MeanReverting process, got {type(sde).__name__}")
    if sde.schedule not in THETA_SCHEDULES:
        raise ValueError(f"schedule must be one of {list(THETA_SCHEDULES)}, got {sde.schedule!r}")
    check_positive_finite(stationary_std=sde.stationary_std)
    check_finite("mu", sde.mu)
    alpha = sde.terminal_alpha
    if is_concrete(alpha) and not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"terminal_alpha must lie in (0, 1), got terminal_alpha={alpha!r}")
    for field in ("cosine_s", "linear_start"):
        value = getattr(sde, field)
        check_finite(field, value)
        if is_concrete(value) and not float(value) >= 0.0:
            raise ValueError(f"{field} must be non-negative, got {field}={value!r}")
    check_finite("t_min", sde.t_min)
    check_finite("t_max", sde.t_max)
    t_min, t_max = sde.t_min, sde.t_max
    if is_concrete(t_min) and is_concrete(t_max) and not 0.0 <= float(t_min) < float(t_max):
        raise ValueError(f"t_min must be below t_max, got t_min={t_min}, t_max={t_max}")


def mean_reverting(
    mu: Any,
    stationary_std: Any,
    *,
    schedule: str = "cosine",
    terminal_alpha: Any = 0.005,
    cosine_s: Any = 0.008,
    linear_start: Any = 0.005,
    t_min: Any = 1e-3,
    t_max: Any = 1.0,
) -> MeanReverting:
    r"""The mean-reverting SDE (Luo et al. 2023, ICML, Eqs. 1-3) with mean ``mu`` and stationary
    standard deviation ``stationary_std`` (:math:`\lambda`), checked by
    :func:`check_mean_reverting` (``ValueError`` naming the field).  Defaults: the cosine
    schedule with ``cosine_s = 0.008`` and ``terminal_alpha = 0.005`` (the MRS authors' IR-SDE
    configuration; IR-SDE's own default is 0.01), :math:`t \in [10^{-3}, 1]`."""
    if schedule not in THETA_SCHEDULES:
        raise ValueError(f"schedule must be one of {list(THETA_SCHEDULES)}, got {schedule!r}")
    mu = mu if isinstance(mu, (float, int)) else jnp.asarray(mu)
    sde = MeanReverting(
        mu=mu,
        stationary_std=stationary_std,
        terminal_alpha=terminal_alpha,
        cosine_s=cosine_s,
        linear_start=linear_start,
        t_min=t_min,
        t_max=t_max,
        schedule=schedule,
    )
    check_mean_reverting(sde)
    return sde


def convert_mean_reverting(
    output: Array, source: str, target: str, x: Array, t: Array, sde: MeanReverting
) -> Array:
    r"""Convert a model output at :math:`(x, t)` between parameterisations of the mean-reverting
    process: with :math:`x = \mu + \alpha_t(x_0 - \mu) + \sigma(t)\varepsilon`, score
    :math:`= -\varepsilon/\sigma(t)`, :math:`x_0 = \mu + (x - \mu - \sigma(t)\varepsilon)/\alpha_t`
    and :math:`v = \alpha_t\varepsilon - \sigma(t)(x_0 - \mu)`.  It is
    :func:`shufflesgd.diffusion.convert` on the centred :math:`x - \mu` and :math:`x_0 - \mu`."""
    for name in (source, target):
        if name not in MODEL_OUTPUTS:
            raise ValueError(f"model output must be one of {list(MODEL_OUTPUTS)}, got {name!r}")
    if source == "x0":
        output = output - sde.mu
    out = _convert_linear(output, source, target, x - sde.mu, t, sde)
    return out + sde.mu if target == "x0" else out


def centred_model(model: Model, sde: MeanReverting) -> Model:
    r"""The model of the centred variable :math:`y = x - \mu`: ``fn(y, t) = model.fn(y + mu, t)``,
    minus :math:`\mu` for an :math:`x_0` output (score, :math:`\varepsilon` and :math:`v` are
    unchanged by the shift)."""
    shift = sde.mu if model.output == "x0" else 0.0

    def fn(y: Array, t: Array) -> Array:
        return model.fn(y + sde.mu, t) - shift

    return Model(fn, model.output)


def sample_centred(
    sampler: Callable[..., tuple[Array, SamplerInfo]],
    key: Array,
    model: Model,
    sde: MeanReverting,
    x_T: Array,
    grid: Array,
    **options: Any,
) -> tuple[Array, SamplerInfo]:
    r"""Run any sampler of :mod:`shufflesgd.diffusion.samplers` on a mean-reverting process: on
    :math:`y_T = x_T - \mu` with :meth:`MeanReverting.centred` (the zero-mean linear process of
    :math:`y`) and :func:`centred_model`, returning :math:`\mu + y` and the sampler's ``info``.
    Exact, not an approximation: :math:`y` is a linear process with the same
    :math:`\alpha, \sigma, f, g^2`, and its score at :math:`y` is that of :math:`x` at
    :math:`y + \mu`."""
    check_mean_reverting(sde)
    y, info = sampler(key, centred_model(model, sde), sde.centred(), x_T - sde.mu, grid, **options)
    return y + sde.mu, info
