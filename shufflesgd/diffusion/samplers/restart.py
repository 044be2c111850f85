r"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes",
Alg. 1).

An ODE sampler carries an error in the high-noise marginals to the data unchanged, while an SDE
sampler contracts it but pays a larger discretisation error.  Restart runs the probability-flow
ODE and, on reaching the low end :math:`t_{min}` of a restart interval
:math:`[t_{min}, t_{max}]`, repeats :math:`K` times: jump forward to :math:`t_{max}` by adding
the forward process's noise, :math:`\tilde x \leftarrow \tilde x + \sqrt{\tilde\sigma_{max}^2 -
\tilde\sigma_{min}^2}\,z` (Alg. 1, line 6), and solve the ODE back down to :math:`t_{min}`.
Each round contracts the total-variation error accumulated above :math:`t_{min}` (their
Thm. 2-3) at an ODE's discretisation cost.  The ODE steps are EDM's Heun steps in
:math:`\tilde\sigma = \sigma/\alpha` (:func:`shufflesgd.diffusion.edm_heun` without churn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_int, is_concrete
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_sampler_arguments,
    draw,
    finish_at_zero,
    first_nonfinite,
)
from shufflesgd.diffusion.samplers.edm import (
    heun_sigma_step,
    scaled_sigma,
    time_of_scaled_sigma,
)

Array = jax.Array


def restart(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    restart_t_min: float | Array = 0.06,
    restart_t_max: float | Array = 0.30,
    restart_k: int = 2,
    restart_steps: int = 4,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes",
    Alg. 1) on the EDM ODE (Heun steps of :func:`shufflesgd.diffusion.edm_heun` without churn).

    The main pass runs Heun down the grid.  On reaching the restart interval's lower end, the
    first grid point :math:`t_m \le` ``restart_t_min`` (:math:`m\ge1`; give a grid point to
    restart exactly there), it repeats ``restart_k`` = K times: jump up to ``restart_t_max`` by
    adding :math:`N(0, (\tilde\sigma_{max}^2-\tilde\sigma_{min}^2)I)` (Alg. 1, line 6; EDM's
    :math:`t_{max}^2 - t_{min}^2`), then ``restart_steps`` = S Heun steps back down to
    :math:`t_m` on Karras's :math:`\rho = 7` spacing in :math:`\tilde\sigma` (the restart
    sub-grid of the authors' code); then it finishes the main pass.  Noise levels are
    :math:`\tilde\sigma = \sigma/\alpha` as in :func:`shufflesgd.diffusion.edm_heun`; times
    (``restart_t_min``, ``restart_t_max``) are the process's, equal to :math:`\sigma` for EDM.

    The whole run is one ``lax.scan`` over a static :math:`N + KS` steps whose times, and the
    restart position, are data: the restart interval may be traced (and vmapped) without
    recompiling or repeating work.  ``nfe`` :math:`= 2(N + KS)`, minus one for each step that
    ends at :math:`\sigma = 0` (Euler).  Noise: the k-th jump is draw ``(m-1, k)`` (it belongs to
    step m-1, the one that reaches :math:`t_m`), so the noise array holds ``restart_k`` draws a
    step.  Defaults: ``restart_t_min=0.06``, ``restart_t_max=0.30`` (process times),
    ``restart_k=2``, ``restart_steps=4``, ``final="denoise"`` (one more evaluation when the grid
    ends at :math:`\sigma > 0`)."""
    check_sampler_arguments(grid, final, x=x, key=key, noise=noise)
    check_int("restart_k", restart_k)
    check_int("restart_steps", restart_steps)
    interval_known = is_concrete(restart_t_min) and is_concrete(restart_t_max)
    if interval_known and not float(restart_t_min) < float(restart_t_max):
        raise ValueError(
            "restart_t_min must be below restart_t_max, got "
            f"restart_t_min={restart_t_min}, restart_t_max={restart_t_max}"
        )
    if is_concrete(grid) and is_concrete(restart_t_min):
        end = float(np.asarray(grid)[-1])
        if float(restart_t_min) < end:
            raise ValueError(
                f"restart_t_min must not lie below the grid's end {end}, "
                f"got restart_t_min={restart_t_min}"
            )
    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    k_total, sub = restart_k, restart_steps
    s_grid = scaled_sigma(sde, grid)
    # restart at grid point m: the first point (from index 1) at or below restart_t_min
    m = 1 + jnp.sum(grid[1:-1] > restart_t_min)
    t_lo, s_lo = grid[m], s_grid[m]
    t_hi = jnp.asarray(restart_t_max, grid.dtype)
    s_hi = scaled_sigma(sde, t_hi)
    u = jnp.linspace(0.0, 1.0, sub + 1, dtype=grid.dtype)
    s_sub = (s_hi ** (1 / 7.0) + u * (s_lo ** (1 / 7.0) - s_hi ** (1 / 7.0))) ** 7.0
    s_sub = s_sub.at[0].set(s_hi).at[-1].set(s_lo)
    t_sub = time_of_scaled_sigma(sde, jnp.where(s_sub > 0, s_sub, 1.0))
    t_sub = t_sub.at[0].set(t_hi).at[-1].set(t_lo)
    # the static sequence of N + K S Heun steps; which are restart steps is data
    j = jnp.arange(num_steps + k_total * sub)
    in_restart = (j >= m) & (j < m + k_total * sub)
    main = jnp.where(j < m, j, j - k_total * sub).clip(0, num_steps - 1)
    r = (j - m).clip(0, k_total * sub - 1)
    k, pos = r // sub, r % sub
    seq = (
        jnp.where(in_restart, t_sub[pos], grid[main]),
        jnp.where(in_restart, t_sub[pos + 1], grid[main + 1]),
        jnp.where(in_restart, s_sub[pos], s_grid[main]),
        jnp.where(in_restart, s_sub[pos + 1], s_grid[main + 1]),
        jnp.where(in_restart & (pos == 0), jnp.clip(s_hi**2 - s_lo**2, 0.0), 0.0),
        k,
    )

    def body(x, inputs):
        t, t_next, s, s_next, jump_var, k = inputs
        x = x + jnp.sqrt(jump_var) * draw(key, noise, m - 1, k, x)
        x = heun_sigma_step(model, sde, x, s, t, s_next, t_next)
        return x, jnp.all(jnp.isfinite(x))

    x, finite = jax.lax.scan(body, x / sde.alpha(grid[0]), seq)
    x = sde.alpha(grid[-1]) * x
    nfe = jnp.sum(1 + (seq[3] > 0))
    bad = first_nonfinite(finite)  # a position in the sequence: map it back to its grid step
    bad = jnp.where(bad < 0, -1, jnp.where(in_restart[bad.clip(0)], m - 1, main[bad.clip(0)]))
    return finish_at_zero(model, sde, x, grid, final, nfe, bad)
