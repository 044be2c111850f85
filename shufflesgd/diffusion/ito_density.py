r"""The Itô density estimator: the log-density of a diffusion's marginals along a sampled path,
with no divergence.

Skreta, Atanackovic, Bose, Tong & Neklyudov (2024), "The Superposition of Diffusion Models
Using the Itô Density Estimator" (ICLR 2025, arXiv:2412.17762), the theorem on the Itô
density estimator.  (The paper's theorem and equation numbers could not be checked offline;
the statement below is derived here in full.)

Let :math:`q_t` be the marginals of a linear process :math:`dx = f(t)x\,dt + g(t)\,dw`
(:mod:`shufflesgd.diffusion.processes`) in dimension :math:`d`, with score
:math:`s = \nabla\log q_t`.  The Fokker–Planck equation :math:`\partial_t q = -\nabla\cdot(f x
q) + \frac12 g^2\Delta q`, divided by :math:`q` with :math:`\Delta q/q = \Delta\log q +
\|\nabla\log q\|^2`, reads

.. math:: \partial_t\log q_t = -d\,f - f\langle x, s\rangle
          + \tfrac12 g^2\left(\Delta\log q_t + \|s\|^2\right).

Let :math:`x_t` be *any* process run backward in time with the same isotropic noise,
:math:`dx = b\,dt + g\,d\bar w` with :math:`dt < 0` and any adapted drift :math:`b` (the
reverse SDE of a model, or of a superposition of models with OR weights,
:mod:`shufflesgd.diffusion.superposition`): its quadratic variation is :math:`g^2|dt|` per
coordinate, and Itô's formula (applied in the reversed time :math:`\tau = -t`) gives

.. math:: d\log q_t(x_t) = \partial_t\log q_t\,dt + \langle s, dx\rangle
          + \tfrac12 g^2\Delta\log q_t\,|dt|.

With :math:`|dt| = -dt` the two Laplacian terms cancel, which leaves

.. math:: d\log q_t(x_t) = \langle s, dx\rangle
          + \left(-d\,f - f\langle x, s\rangle + \tfrac12 g^2\|s\|^2\right)dt,

a function of the score alone: no divergence, no Hutchinson probe, one model evaluation a step
(the probability-flow likelihood of :mod:`shufflesgd.diffusion.likelihood` needs the
divergence :math:`\nabla\cdot s`).  Discretised with the score at the left point of each step
(Itô), :func:`ito_log_density_increment`; :func:`reverse_sde_log_density` integrates the reverse
SDE by Euler–Maruyama and sums the increments from :math:`\log p_{prior}(x_T)`, which estimates
:math:`\log q_{t_{N}}(x_{t_N})` at the end of the grid, up to the prior mismatch
:math:`\log q_T - \log p_{prior}` at :math:`x_T` and the discretisation error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_float_array
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_sampler_arguments,
    draw,
    first_nonfinite,
)
from shufflesgd.diffusion.samplers.sde import euler_maruyama_step

Array = jax.Array


def ito_log_density_increment(
    sde: SDE, score: Array, x: Array, x_next: Array, t: Array, t_next: Array
) -> Array:
    r"""One step of the Itô density estimator (Skreta et al. 2024, the Itô density estimator
    theorem), from ``(x, t)`` to ``(x_next, t_next)`` with ``t_next < t``:

    .. math:: \log q_{t_{next}}(x_{next}) - \log q_t(x) \approx
              \langle s, x_{next} - x\rangle
              + \left(-d\,f(t) - f(t)\langle x, s\rangle + \tfrac12 g(t)^2\|s\|^2\right)
              (t_{next} - t),

    ``score`` :math:`= s = \nabla\log q_t(x)` taken at the left point (Itô).  Valid along any
    backward process whose noise over the step is :math:`g\sqrt{|\Delta t|}\,z` with
    :math:`z \sim N(0, I)`, whatever its drift (module docstring: the Laplacian terms of Itô's
    formula and of the Fokker–Planck equation cancel); a process with less noise in some
    direction leaves a curvature term uncancelled (the AND step of
    :mod:`shufflesgd.diffusion.superposition`)."""
    f, g2 = sde.drift_coefficient(t), sde.diffusion_squared(t)
    rate = -x.size * f - f * jnp.vdot(x, score) + 0.5 * g2 * jnp.vdot(score, score)
    return jnp.vdot(score, x_next - x) + rate * (t_next - t)


def check_noise(noise: Array | None, grid: Array, x: Array, draws: int = 1) -> None:
    """``ValueError`` unless an explicit ``noise`` has shape ``[num_steps, draws, *x.shape]``
    (``TypeError`` unless it is a float array)."""
    if noise is not None:
        shape = (jnp.shape(grid)[0] - 1, draws, *jnp.shape(x))
        check_float_array("noise", noise, shape)


def reverse_sde_log_density(
    key: Array,
    model: Model,
    sde: SDE,
    x_T: Array,
    grid: Array,
    *,
    noise: Array | None = None,
) -> tuple[Array, Array, SamplerInfo]:
    r"""Euler–Maruyama on the reverse SDE (Song et al. 2021, "Score-Based Generative Modeling
    through Stochastic Differential Equations", Eq. 6 and Sec. 4.1), tracking the Itô density
    estimate of the sample's log-density (Skreta et al. 2024, the Itô density estimator
    theorem).

    Each step :math:`x_{n+1} = x_n + [f x_n - g^2 s_n]\Delta t + g\sqrt{|\Delta t|}\,z_n`,
    :math:`\Delta t = t_{n+1} - t_n < 0`, is :func:`shufflesgd.diffusion.euler_maruyama`'s
    (same noise: draw 0 of step :math:`n`, :func:`shufflesgd.diffusion.samplers.base.draw`),
    and the estimate starts at the prior's :math:`\ell_0 = \log p_{prior}(x_T)` and adds
    :func:`ito_log_density_increment` with the same score :math:`s_n = s_\theta(x_n, t_n)`:
    one model evaluation a step.  Returns ``(x, log_density, info)``: ``x`` the state at
    ``grid[-1]`` (no final step beyond it) and ``log_density`` the estimate of
    :math:`\log q_{t_N}(x)`, :math:`t_N` = ``grid[-1]``, whose error shrinks with the steps
    (strong order about :math:`\frac12`: the increments' error is a sum of mean-zero terms
    :math:`\frac12(\Delta x^\top\nabla^2\log q\,\Delta x - g^2|\Delta t|\Delta\log q)`).
    ``info.nonfinite_step`` flags the first step where the state or the estimate is not
    finite."""
    check_sampler_arguments(grid, "none", x=x_T, key=key, noise=noise)
    check_noise(noise, grid, x_T)
    grid = jnp.asarray(grid)

    def body(carry, inputs):
        x, log_density = carry
        i, t, t_next = inputs
        score = model.predict(sde, x, t, "score")
        x_next = euler_maruyama_step(sde, x, t, t_next, score, draw(key, noise, i, 0, x))
        log_density = log_density + ito_log_density_increment(sde, score, x, x_next, t, t_next)
        return (x_next, log_density), jnp.all(jnp.isfinite(x_next)) & jnp.isfinite(log_density)

    num_steps = grid.shape[0] - 1
    start = (x_T, sde.prior_log_prob(x_T.reshape(-1)))
    (x, log_density), finite = jax.lax.scan(
        body, start, (jnp.arange(num_steps), grid[:-1], grid[1:])
    )
    info = SamplerInfo(jnp.asarray(num_steps, jnp.int32), first_nonfinite(finite).astype(jnp.int32))
    return x, log_density, info
