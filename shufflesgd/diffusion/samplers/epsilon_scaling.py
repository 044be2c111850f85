r"""Epsilon Scaling (Ning, Li, Su, Salah & Ertugrul 2024, "Elucidating the Exposure Bias in
Diffusion Models", ICLR 2024, Sec. 5): a model transform against exposure bias.

A sampler feeds the network its own, slightly wrong, states; the authors find the predicted noise
then comes out too large in norm, and scale it down at sampling time,

.. math:: \varepsilon'_\theta(x, t) = \varepsilon_\theta(x, t)/\lambda(t), \qquad
          \lambda(t) = k\,t + b,

their linear schedule; :math:`k = 0` is the uniform schedule :math:`\lambda = b` they report
(slightly above 1).  Their EDM variant (the authors' EDM-ES) scales the denoiser's implied noise,
:math:`\varepsilon = (x - D)/\sigma`, and rebuilds :math:`D' = x - \sigma\varepsilon/\lambda`:
the same transform read in the :math:`x_0` output.  :func:`epsilon_scaling` wraps any
:class:`shufflesgd.diffusion.Model` so that every parameterisation agrees with
:math:`\varepsilon/\lambda` (:math:`x = \alpha x_0 + \sigma\varepsilon`, :math:`r = 1/\lambda`):

.. math:: s' = r\,s, \qquad \varepsilon' = r\,\varepsilon, \qquad
          x_0' = r\,x_0 + (1 - r)\,x/\alpha, \qquad
          v' = r\,v - (1 - r)\,\sigma x/\alpha,

each computed from the model's own output, so the wrapped model keeps its output kind and
:math:`\lambda = 1` returns the model's output unchanged, bit for bit (any other output kind,
such as a flow-matching velocity, goes through :math:`\varepsilon` with
:func:`shufflesgd.diffusion.convert`).  The :math:`x_0`, :math:`v` and velocity forms need
:math:`\alpha(t) > 0`: where :math:`\alpha = 0`, :math:`x = \sigma\varepsilon` leaves no
:math:`x_0` to match a rescaled :math:`\varepsilon`.  It costs no evaluation and works with
every sampler.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from shufflesgd._checks import check_finite, is_concrete
from shufflesgd.diffusion.processes import SDE, convert
from shufflesgd.diffusion.samplers.base import Model, check_model_output

Array = jax.Array


def _check_schedule(sde: SDE, k: Any, b: Any) -> None:
    check_finite("k", k)
    check_finite("b", b)
    if is_concrete(k) and is_concrete(b):
        k_, b_ = np.asarray(k, np.float64), np.asarray(b, np.float64)
        if np.ndim(k_) or np.ndim(b_):
            raise ValueError(
                f"k and b must be scalars, got shapes k: {np.shape(k_)}, b: {np.shape(b_)}"
            )
        t_max = float(sde.t_max)
        lowest = min(float(b_), float(k_) * t_max + float(b_))
        if not lowest > 0:
            raise ValueError(
                f"the scale lambda(t) = k t + b must be positive on [0, t_max = {t_max}], "
                f"got k={k}, b={b} (lambda = {lowest} there)"
            )


def epsilon_scaling(model: Model, sde: SDE, k: float | Array, b: float | Array) -> Model:
    r"""``model`` with its noise prediction divided by :math:`\lambda(t) = k\,t + b` (Ning et
    al. 2024, "Elucidating the Exposure Bias in Diffusion Models", Sec. 5, Epsilon Scaling).

    ``t`` is the process's time, as the sampler passes it to the model (the noise level
    :math:`\sigma` for :class:`shufflesgd.diffusion.EDM`); the authors' :math:`k` per step of a
    discrete :math:`T`-step chain is :math:`k/\Delta t` here, with :math:`\Delta t` the time
    between two of its steps.  The returned model has ``model``'s output kind, computed as
    :math:`\varepsilon' = r\varepsilon`, :math:`s' = rs`, :math:`x_0' = r x_0 + (1-r)x/\alpha`
    or :math:`v' = rv - (1-r)\sigma x/\alpha` with :math:`r = 1/\lambda(t)` (any other output
    kind through :math:`\varepsilon`), so every conversion
    (:func:`shufflesgd.diffusion.convert`) of its output is that of :math:`\varepsilon/\lambda`,
    and with ``k = 0, b = 1`` its function returns ``model``'s output bit for bit.  No extra
    evaluation: use it with any sampler.  ``k`` and ``b`` may be traced (one compiled sampler
    serves a sweep).  ``TypeError`` unless ``model`` is a :class:`Model`; ``ValueError`` for an
    unknown output kind, a non-finite or non-scalar ``k``/``b``, or a concrete schedule that is
    not positive on :math:`[0, t_{max}]`."""
    if not isinstance(model, Model):
        raise TypeError(f"model must be a diffusion.Model, got model: {type(model).__name__}")
    check_model_output(model.output)
    _check_schedule(sde, k, b)
    output = model.output

    def fn(x: Array, t: Array) -> Array:
        out = model.fn(x, t)
        r = 1.0 / (k * t + b)
        if output in ("eps", "score"):
            return r * out
        if output == "x0":
            return r * out + (1.0 - r) * (x / sde.alpha(t))
        if output == "v":
            return r * out - (1.0 - r) * (sde.sigma(t) * x / sde.alpha(t))
        # any other output kind: through the noise prediction
        return convert(r * convert(out, output, "eps", x, t, sde), "eps", output, x, t, sde)

    return Model(fn, output)
