r"""Solvers of the probability-flow ODE: Euler, Heun, adaptive Dormand–Prince, and DDIM.

Every linear process :math:`dx = f(t)x\,dt + g(t)\,dw` has a deterministic twin with the same
marginals :math:`p_t`, the probability-flow ODE (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", Sec. 4.3, Eq. 13):

.. math:: \frac{dx}{dt} = f(t)x - \tfrac12 g(t)^2\nabla\log p_t(x),

a bijection carrying :math:`p_{t_{max}}` onto :math:`p_{t_{min}}`.  Solved here with the
learned score in place of :math:`\nabla\log p_t`:

* :func:`pf_ode_euler`: explicit Euler in :math:`t`, global order 1;
* :func:`pf_ode_heun`: Heun's explicit trapezoid in :math:`t` (Karras et al. 2022, Alg. 1),
  global order 2;
* :func:`pf_ode_adaptive`: diffrax's Dopri5 (Dormand & Prince 1980) under a PID step-size
  controller, the grid giving only the end points;
* :func:`ddim`: DDIM (Song, Meng & Ermon 2021, Eq. 12), an exponential-integrator step in
  the log-SNR that is the first-order ODE solver at :math:`\eta = 0` and, with
  :math:`\eta > 0`, adds posterior noise (:math:`\eta = 1` is DDPM's ancestral step).

All but DDIM with :math:`\eta > 0` are deterministic: ``key`` and ``noise`` are unused.

Flow models.  The probability-flow drift equals the flow-matching velocity
:math:`u = E[\dot\alpha x_0 + \dot\sigma\varepsilon \mid x_t]`, which is how the drift is
evaluated for a velocity model and on the interpolants
(:class:`~shufflesgd.diffusion.processes.RectifiedFlow`,
:class:`~shufflesgd.diffusion.processes.TrigFlow`; see
:func:`~shufflesgd.diffusion.samplers.base.pf_ode_drift`).  There the Euler, Heun and adaptive
solvers, and DDIM (which uses only :math:`\hat x_0` and :math:`\hat\varepsilon`), start at
:math:`t = 1` exactly with a velocity, :math:`x_0` or :math:`v` model
(``make_sde("flow", t_max=1.0)``).  :func:`pf_ode_euler` with a velocity model on the rectified
flow is the sampler of rectified flow and SD3, diffusers' ``FlowMatchEulerDiscreteScheduler``,
:math:`x \leftarrow x + (t_{next} - t)\,u(x, t)` (with its ``shift``: the ``"shifted"`` grid of
:func:`shufflesgd.diffusion.time_grid`); on the rectified flow, DDIM's step is that same Euler
step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int, check_positive, is_concrete
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_sampler_arguments,
    draw,
    finish,
    pf_ode_drift,
    scan_grid,
    sigma_at_end,
)

Array = jax.Array


def ddim_step(
    key: Array,
    model: Model,
    sde: SDE,
    eta: float | Array,
    noise: Array | None,
    x: Array,
    i: Array,
    t: Array,
    t_next: Array,
) -> Array:
    r"""One step of :func:`ddim` from :math:`(x, t)` to ``t_next`` (step ``i``'s draw): the
    building block that samplers which move the time a state is coupled with (the Time-Shift
    sampler) share with DDIM."""
    x0 = model.predict(sde, x, t, "x0")
    eps = (x - sde.alpha(t) * x0) / sde.sigma(t)
    sigma_t, sigma_s = sde.sigma(t), sde.sigma(t_next)
    ratio = sde.alpha(t) / sde.alpha(t_next)
    posterior_var = sigma_s**2 * (sigma_t**2 - ratio**2 * sigma_s**2) / sigma_t**2
    c2 = eta**2 * jnp.clip(posterior_var, 0.0)
    return (
        sde.alpha(t_next) * x0
        + jnp.sqrt(jnp.clip(sigma_s**2 - c2, 0.0)) * eps
        + jnp.sqrt(c2) * draw(key, noise, i, 0, x)
    )


def ddim(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    eta: float | Array = 0.0,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""DDIM (Song, Meng, Ermon 2021, Eq. 12) for any linear process.

    From :math:`(x_t, t)` to :math:`s < t` with predictions :math:`\hat x_0, \hat\varepsilon`:
    :math:`x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - c^2}\,\hat\varepsilon + c z`,
    :math:`c = \eta\,\sigma_s\sigma_{t|s}/\sigma_t` with
    :math:`\sigma_{t|s}^2 = \sigma_t^2 - (\alpha_t/\alpha_s)^2\sigma_s^2` (their Eq. 16).
    :math:`\eta = 0` is the deterministic DDIM (a first-order PF-ODE solver in
    :math:`\lambda`), :math:`\eta = 1` the exact Gaussian posterior step (DDPM ancestral).
    ``eta`` may be traced.  One evaluation and one draw a step (the draw is scaled by 0 at
    :math:`\eta = 0`).  Defaults: ``eta=0``, ``final="denoise"`` (one more evaluation)."""
    check_sampler_arguments(grid, final, x=x, key=key, noise=noise)
    if is_concrete(eta) and not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got eta={eta}")

    def step(x, i, t, t_next):
        return ddim_step(key, model, sde, eta, noise, x, i, t, t_next)

    x, nfe, bad = scan_grid(step, x, grid, 1)
    return finish(model, sde, x, grid, final, nfe, bad)


def pf_ode_euler(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Euler on the probability-flow ODE :math:`dx/dt = f x - \frac12 g^2 s` (Song et al.
    2021, Sec. 4.3), one evaluation a step; global order 1.  With a velocity model the step is
    :math:`x + (t_{next} - t)\,u(x, t)`, the model output itself: on the rectified flow from
    :math:`t = 1`, diffusers' ``FlowMatchEulerDiscreteScheduler`` (Liu, Gong & Liu 2023; Esser
    et al. 2024), e.g. ``pf_ode_euler(key, Model(net, "velocity"), make_sde("flow", t_min=0.0,
    t_max=1.0), x_T, time_grid(sde, "shifted", N, shift=3.0), final="none")``.  Defaults:
    ``final="denoise"`` (one more evaluation)."""
    del key, noise
    check_sampler_arguments(grid, final, x=x)

    def step(x, i, t, t_next):
        return x + (t_next - t) * pf_ode_drift(model, sde, x, t)

    x, nfe, bad = scan_grid(step, x, grid, 1)
    return finish(model, sde, x, grid, final, nfe, bad)


def pf_ode_heun(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Heun's method (explicit trapezoid) on the probability-flow ODE in t (Karras et al.
    2022, Alg. 1 without churn): two evaluations a step; global order 2.  Defaults:
    ``final="denoise"`` (one more evaluation)."""
    del key, noise
    check_sampler_arguments(grid, final, x=x)

    def step(x, i, t, t_next):
        dt = t_next - t
        d = pf_ode_drift(model, sde, x, t)
        guess = x + dt * d
        return x + 0.5 * dt * (d + pf_ode_drift(model, sde, guess, t_next))

    x, nfe, bad = scan_grid(step, x, grid, 2)
    return finish(model, sde, x, grid, final, nfe, bad)


def pf_ode_adaptive(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    rtol: float | Array = 1e-5,
    atol: float | Array = 1e-5,
    max_steps: int = 4096,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""The probability-flow ODE :math:`dx/dt = f x - \frac12 g^2 s` (Song et al. 2021, Sec.
    4.3, where it is solved with RK45) integrated by diffrax's ``Dopri5`` (Dormand & Prince
    1980, "A family of embedded Runge-Kutta formulae") under a ``PIDController(rtol, atol)``
    from ``grid[0]`` to ``grid[-1]``; the grid gives only the end points.

    Model evaluations: the first trial step is 1/64 of the interval (given, so no evaluations
    go to choosing it); we evaluate :math:`f(t_0, x_T)` once and hand it to Dopri5 as its
    first-same-as-last stage, so every attempted step, accepted or rejected (diffrax would
    otherwise re-evaluate the first stage after a rejected first step), costs exactly 6
    evaluations: ``nfe = 6 * num_steps + 1`` with ``num_steps`` the attempted steps of
    ``sol.stats``.  The count is set by the controller, not by the grid.
    Under ``vmap`` each sample reports its own count, while the batch runs until its slowest
    sample finishes.  A solve that hits ``max_steps`` returns NaN (``nonfinite_step = 0``).
    ``rtol``/``atol`` may be traced; ``max_steps`` (a Python int) bounds the reverse-mode
    checkpointing.  The grid must end at :math:`\sigma > 0` (Dopri5 evaluates the end point).
    Defaults: ``rtol=atol=1e-5``, ``max_steps=4096``, ``final="denoise"`` (one more
    evaluation)."""
    import diffrax  # imported here: the other samplers do not need it

    del key, noise
    check_sampler_arguments(grid, final, x=x)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    check_int("max_steps", max_steps)
    if is_concrete(grid) and not sigma_at_end(sde, grid) > 0:
        raise ValueError(
            "pf_ode_adaptive needs a grid that ends at sigma > 0 (Dopri5 evaluates the end point)"
        )
    grid = jnp.asarray(grid)
    t0, t1 = grid[0], grid[-1]
    term = diffrax.ODETerm(lambda t, y, args: pf_ode_drift(model, sde, y, t))
    solution = diffrax.diffeqsolve(
        term,
        diffrax.Dopri5(),
        t0,
        t1,
        (t1 - t0) / 64,
        x,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
        throw=False,
        # first-same-as-last: f(t0, x_T), evaluated once
        solver_state=(jnp.asarray(False), pf_ode_drift(model, sde, x, t0)),
    )
    ok = solution.result == diffrax.RESULTS.successful
    x = jnp.where(ok, solution.ys[0], jnp.nan)
    nfe = 6 * solution.stats["num_steps"] + 1
    bad = jnp.where(jnp.all(jnp.isfinite(x)), -1, 0)
    return finish(model, sde, x, grid, final, jnp.asarray(nfe), bad)
