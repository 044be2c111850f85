r"""Exact log-likelihoods through the probability-flow ODE.

The probability-flow ODE of a linear process (:mod:`shufflesgd.diffusion.processes`),
:math:`dx/dt = v(x, t) = f(t)\,x - \frac12 g^2(t)\,\nabla\log p_t(x)`, transports the
marginal :math:`p_t` of the forward SDE onto :math:`p_s` for every pair of times (Song et
al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations",
Sec. 4.3 and App. D.2).  Along one of its trajectories the instantaneous change of
variables (Chen et al. 2018, "Neural Ordinary Differential Equations", Thm. 1) gives
:math:`d\log p_t(x_t)/dt = -\nabla\cdot v(x_t, t)`, so integrating the augmented ODE

.. math:: \frac{d}{dt}\begin{bmatrix} x \\ \ell \end{bmatrix}
          = \begin{bmatrix} v(x, t) \\ \nabla\cdot v(x, t) \end{bmatrix},
          \qquad x(t_{min}) = x,\ \ell(t_{min}) = 0,

from :math:`t_{min}` up to :math:`t_{max}` yields

.. math:: \log p_{t_{min}}(x) = \log p_{t_{max}}(x_{t_{max}}) + \ell(t_{max}),

with :math:`p_{t_{max}}` replaced by the prior
(:meth:`~shufflesgd.diffusion.processes.VP.prior_log_prob` of the process) — exact up to
that prior mismatch and the ODE solver's tolerance when the score is exact.

On the flow-matching interpolants (:class:`~shufflesgd.diffusion.processes.RectifiedFlow`,
:class:`~shufflesgd.diffusion.processes.TrigFlow`) the drift :math:`v` is the model's velocity
(:func:`~shufflesgd.diffusion.samplers.base.pf_ode_drift`), finite at :math:`t = 1` for a
velocity, :math:`x_0` or :math:`v` model.  With ``t_max=1`` (``make_sde("flow", t_max=1.0)``
or the ``t_max`` argument) the prior :math:`N(0, I)` *is* :math:`p_1`, so there is no prior
mismatch, and with ``t_min=0`` the result is the log-density of the data itself, the
likelihood that Lipman et al. (2023), "Flow Matching for Generative Modeling", report for
flow-matching models.
The integral is solved with diffrax's adaptive Dormand–Prince 5(4) (``Dopri5`` with a
``PIDController(rtol, atol)``, error control on the augmented state).

The divergence is either exact (the trace of ``jax.jacfwd``: ``d`` Jacobian–vector
products an evaluation, for small ``d``) or the Skilling–Hutchinson estimate
:math:`\varepsilon^\top (\partial v/\partial x)\,\varepsilon` with one Rademacher or
Gaussian probe :math:`\varepsilon` drawn once per sample from its key and held FIXED
over the whole solve (Grathwohl et al. 2019, "FFJORD", Sec. 3.1; Song et al. 2021,
App. D.2): the ODE is then an ordinary deterministic ODE, and its solution is an
unbiased estimate of :math:`\int\nabla\cdot v\,dt` (up to the solver's tolerance), one
Jacobian–vector product an evaluation.

What is computed is :math:`\log p_{t_{min}}(x)`, the density of the data diffused to
:math:`t_{min} > 0`, in nats; ``bits_per_dim`` is :math:`-\log p/(d\log 2)`.  For
discrete data such as 8-bit images the usual bits/dim needs a dequantisation that is the
caller's business: add uniform noise :math:`u\in[0, 1/256)^d` to pixels scaled to
:math:`[0, 1]`, map to the model's range and add the log-Jacobian of that map.  For
pixels in :math:`[-1, 1]` that amounts to adding 7 to ``bits_per_dim`` (8 for
:math:`[0, 1]`), as in Song et al.'s reference code (``offset = 7 - inverse_scaler(-1)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int, check_positive, is_concrete
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import Model, pf_ode_drift

Array = jax.Array


DIVERGENCES = ("exact", "hutchinson")


PROBES = ("rademacher", "gaussian")


# Dopri5 is first-same-as-last: one evaluation to start, then six new ones a step (accepted or
# rejected).  The first step is an explicit fraction of the interval (the controller adapts it
# from there), so no initial-step heuristic spends evaluations; the likelihood tests count the
# evaluations to check this formula.
_DOPRI5_EVALS_PER_STEP = 6


_DOPRI5_EVALS_AT_START = 1


_FIRST_STEP_FRACTION = 0.01


class LikelihoodResult(NamedTuple):
    r"""The log-likelihood of one sample and its parts.

    ``log_prob_nats`` = ``prior_log_prob`` + ``delta_log_prob``
    (:math:`\log p_{t_{min}}(x)`; NaN when the solve failed), ``bits_per_dim`` =
    :math:`-\log p/(d\log 2)`, ``nfe`` the evaluations of the augmented vector field
    (each one drift evaluation plus its divergence), ``prior_log_prob`` the prior's
    log-density at ``latent`` :math:`= x_{t_{max}}`, ``delta_log_prob`` :math:`= \int
    \nabla\cdot v\,dt`, ``success`` whether diffrax reached ``t_max`` within ``max_steps``.
    """

    log_prob_nats: Array
    bits_per_dim: Array
    nfe: Array
    prior_log_prob: Array
    delta_log_prob: Array
    latent: Array
    success: Array


def exact_divergence(fn: Callable[[Array], Array], x: Array) -> tuple[Array, Array]:
    r"""``(fn(x), tr(d fn / dx))`` with the full Jacobian from ``jax.jacfwd`` (``d`` JVPs)."""
    flat = x.reshape(-1)

    def both(y: Array) -> tuple[Array, Array]:
        out = fn(y.reshape(x.shape)).reshape(-1)
        return out, out

    jac, value = jax.jacfwd(both, has_aux=True)(flat)
    return value.reshape(x.shape), jnp.trace(jac)


def hutchinson_divergence(
    fn: Callable[[Array], Array], x: Array, probe: Array
) -> tuple[Array, Array]:
    r"""``(fn(x), probe^T (d fn/dx) probe)``: one Jacobian–vector product (Hutchinson 1989)."""
    value, jvp = jax.jvp(fn, (x,), (probe,))
    return value, jnp.vdot(probe, jvp)


def draw_probe(key: Array, shape: tuple[int, ...], dtype: Any, kind: str = "rademacher") -> Array:
    """A Hutchinson probe with identity covariance: Rademacher signs or a standard normal."""
    check_probe(kind)
    if kind == "rademacher":
        return jax.random.rademacher(key, shape, dtype)
    return jax.random.normal(key, shape, dtype)


def check_divergence(divergence: str) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {divergence!r}")


def check_probe(probe: str) -> None:
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {list(PROBES)}, got {probe!r}")


def check_arguments(
    divergence: str, probe: str, rtol: Any, atol: Any, t_min: Any, t_max: Any, max_steps: Any
) -> None:
    """The checks :func:`log_likelihood` makes before tracing anything (traced values pass)."""
    check_divergence(divergence)
    check_probe(probe)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    if is_concrete(t_min) and not float(t_min) >= 0:
        raise ValueError(f"t_min must be >= 0, got t_min={t_min}")
    if is_concrete(t_min) and is_concrete(t_max) and not float(t_min) < float(t_max):
        raise ValueError(f"t_min must be below t_max, got t_min={t_min}, t_max={t_max}")
    check_int("max_steps", max_steps)


def log_likelihood(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    *,
    divergence: str = "exact",
    probe: str = "rademacher",
    rtol: float | Array = 1e-5,
    atol: float | Array = 1e-5,
    t_min: float | Array | None = None,
    t_max: float | Array | None = None,
    prior_log_prob: Callable[[Array], Array] | None = None,
    max_steps: int = 4096,
) -> LikelihoodResult:
    r""":math:`\log p_{t_{min}}(x)` of one sample ``x`` (any shape; every entry a dimension)
    by the probability-flow ODE (Song et al. 2021, Sec. 4.3, App. D.2).

    ``divergence="exact"`` takes the trace of the Jacobian (``key`` unused);
    ``"hutchinson"`` draws one ``probe`` (``"rademacher"`` or ``"gaussian"``) from ``key``
    and keeps it for the whole solve (FFJORD).  ``rtol``/``atol`` are the Dopri5 step-size
    controller's tolerances on the augmented state, ``t_min``/``t_max`` default to the
    process's; ``prior_log_prob`` (a function of :math:`x_{t_{max}}`) replaces
    ``sde.prior_log_prob``, e.g. by the exact marginal :math:`p_{t_{max}}` when it is known.
    ``rtol``, ``atol``, ``t_min`` and ``t_max`` may be traced; the string options and
    ``max_steps`` are static.  Batches: :func:`log_likelihood_batch`.
    """
    t_min = sde.t_min if t_min is None else t_min
    t_max = sde.t_max if t_max is None else t_max
    check_arguments(divergence, probe, rtol, atol, t_min, t_max, max_steps)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    dtype = x.dtype
    dim = x.size

    if divergence == "hutchinson":
        eps = draw_probe(key, x.shape, dtype, probe)
    else:
        eps = None

    def vector_field(t, state, args):
        y, _ = state
        drift = lambda z: pf_ode_drift(model, sde, z, t)
        if eps is None:
            value, div = exact_divergence(drift, y)
        else:
            value, div = hutchinson_divergence(drift, y, eps)
        return value, div.astype(dtype)

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        diffrax.Dopri5(),
        t0=jnp.asarray(t_min, dtype),
        t1=jnp.asarray(t_max, dtype),
        dt0=(jnp.asarray(t_max, dtype) - jnp.asarray(t_min, dtype)) * _FIRST_STEP_FRACTION,
        y0=(x, jnp.zeros((), dtype)),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
        throw=False,
    )
    latent, delta = solution.ys[0][-1], solution.ys[1][-1]
    success = solution.result == diffrax.RESULTS.successful
    if prior_log_prob is None:
        prior = sde.prior_log_prob(latent.reshape(-1))
    else:
        prior = prior_log_prob(latent)
    log_prob = jnp.where(success, prior + delta, jnp.nan)
    nfe = _DOPRI5_EVALS_AT_START + _DOPRI5_EVALS_PER_STEP * solution.stats["num_steps"]
    return LikelihoodResult(
        log_prob_nats=log_prob,
        bits_per_dim=bits_per_dim(log_prob, dim),
        nfe=jnp.asarray(nfe, jnp.int32),
        prior_log_prob=prior,
        delta_log_prob=delta,
        latent=latent,
        success=success,
    )


def log_likelihood_batch(
    key: Array, model: Model, sde: SDE, xs: Array, **options: Any
) -> LikelihoodResult:
    """:func:`log_likelihood` on each row of ``xs`` with key ``fold_in(key, i)`` for row ``i``
    (as :func:`shufflesgd.diffusion.samplers.base.sample_batch`): a row's result does not depend
    on its batch-mates."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(xs.shape[0]))
    return jax.vmap(lambda k, x: log_likelihood(k, model, sde, x, **options))(keys, xs)


def bits_per_dim(log_prob_nats: Array, dim: int) -> Array:
    r""":math:`-\log p / (d\log 2)`: nats per sample to bits per dimension (no dequantisation)."""
    return -jnp.asarray(log_prob_nats) / (dim * math.log(2.0))
