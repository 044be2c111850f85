r"""Samplers of the reverse-time SDE: Euler–Maruyama, reverse diffusion, ancestral sampling and
predictor–corrector.

The reverse-time SDE of a linear process :math:`dx = f(t)x\,dt + g(t)\,dw` (Anderson 1982;
Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
Equations", Eq. 6) is

.. math:: dx = [f(t)x - g(t)^2\nabla\log p_t(x)]\,dt + g(t)\,d\bar w,

integrated from ``grid[0]`` down to ``grid[-1]`` with the learned score in place of
:math:`\nabla\log p_t`.  Every sampler here draws fresh Gaussian noise at each step
(:func:`shufflesgd.diffusion.samplers.base.draw`) and spends one model evaluation per
predictor step:

* :func:`euler_maruyama`: the Euler–Maruyama discretisation (Song et al. 2021, Sec. 4.1);
* :func:`reverse_diffusion`: the reverse of the forward process discretised on the grid
  (Song et al. 2021, App. E, Eq. 45);
* :func:`ancestral`: the exact Gaussian posterior step of DDPM (Ho et al. 2020, Alg. 2),
  i.e. DDIM with :math:`\eta = 1` (:func:`shufflesgd.diffusion.ddim`);
* :func:`predictor_corrector`: Langevin corrector steps followed by a reverse-diffusion
  predictor (Song et al. 2021, Alg. 1–5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int, check_positive
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_sampler_arguments,
    draw,
    finish,
    scan_grid,
)
from shufflesgd.diffusion.samplers.ode import ddim

Array = jax.Array


def euler_maruyama_step(
    sde: SDE, x: Array, t: Array, t_next: Array, score: Array, z: Array
) -> Array:
    r"""One Euler–Maruyama step of the reverse SDE from ``t`` to ``t_next`` with the score
    ``score`` at :math:`(x, t)` and the standard Gaussian draw ``z``:
    :math:`x + [f x - g^2 s]\Delta t + g\sqrt{|\Delta t|}\,z`, :math:`\Delta t = t_{next} - t`
    (the building block that the samplers which weight or track their paths share)."""
    dt = t_next - t
    return x + sde.reverse_drift(x, t, score) * dt + jnp.sqrt(sde.diffusion_squared(t) * -dt) * z


def euler_maruyama(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Euler–Maruyama on the reverse SDE (Song et al. 2021, Sec. 4.1):
    :math:`x \leftarrow x + [f x - g^2 s]\Delta t + g\sqrt{|\Delta t|}\,z`, one evaluation and
    one draw a step.  Weak order 1.  Defaults: ``final="denoise"`` (one more evaluation: the
    model's :math:`x_0` at ``grid[-1]``)."""
    check_sampler_arguments(grid, final, x=x, key=key, noise=noise)

    def step(x, i, t, t_next):
        score = model.predict(sde, x, t, "score")
        return euler_maruyama_step(sde, x, t, t_next, score, draw(key, noise, i, 0, x))

    x, nfe, bad = scan_grid(step, x, grid, 1)
    return finish(model, sde, x, grid, final, nfe, bad)


def _reverse_diffusion_step(model, sde, key, noise, x, i, t, t_next, draw_index):
    # forward discretisation t_next -> t: x_t = a x_next + G z, a = alpha_t / alpha_next,
    # G^2 = sigma_t^2 - a^2 sigma_next^2; reverse: x_next = x - (a - 1) x + G^2 s + G z.
    a = sde.alpha(t) / sde.alpha(t_next)
    g2 = sde.sigma(t) ** 2 - a**2 * sde.sigma(t_next) ** 2
    score = model.predict(sde, x, t, "score")
    return (2.0 - a) * x + g2 * score + jnp.sqrt(g2) * draw(key, noise, i, draw_index, x)


def reverse_diffusion(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Reverse-diffusion predictor (Song et al. 2021, Eq. 45 / App. E): discretise the forward
    process on the grid, :math:`x_t = a x_s + G z` with :math:`a = \alpha_t/\alpha_s`,
    :math:`G^2 = \sigma_t^2 - a^2\sigma_s^2`, and reverse it,
    :math:`x_s = x_t - (a-1)x_t + G^2 s(x_t, t) + G z`.  One evaluation and one draw a step.
    Defaults: ``final="denoise"`` (one more evaluation)."""
    check_sampler_arguments(grid, final, x=x, key=key, noise=noise)

    def step(x, i, t, t_next):
        return _reverse_diffusion_step(model, sde, key, noise, x, i, t, t_next, 0)

    x, nfe, bad = scan_grid(step, x, grid, 1)
    return finish(model, sde, x, grid, final, nfe, bad)


def ancestral(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Ancestral sampling (Ho et al. 2020, Alg. 2; Song et al. 2021, Eq. 47): sample the
    Gaussian posterior :math:`q(x_s \mid x_t, \hat x_0)` at every step — DDIM with
    :math:`\eta = 1` (one implementation, :func:`shufflesgd.diffusion.ddim`).  One evaluation
    and one draw a step; defaults: ``final="denoise"`` (one more evaluation)."""
    return ddim(key, model, sde, x, grid, eta=1.0, final=final, noise=noise)


def predictor_corrector(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    snr: float | Array = 0.16,
    corrector_steps: int = 1,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Predictor–corrector sampling (Song et al. 2021, Alg. 1-3): at each time, ``M``
    Langevin corrector steps then a reverse-diffusion predictor step.

    Corrector: :math:`x \leftarrow x + \epsilon s + \sqrt{2\epsilon}\,z` with
    :math:`\epsilon = 2a\,(r\,\|z\|/\|s\|)^2`, :math:`r` the signal-to-noise ratio ``snr``
    and :math:`a = (\alpha_{t_{next}}/\alpha_t)^2` (1 for VE; :math:`1-\beta_i` for VP, as
    in Alg. 4-5).  Norms are per sample (the reference code averages them over the batch,
    so its samples depend on their batch-mates).  :math:`M + 1` evaluations and
    :math:`M + 1` draws a step (the predictor's is draw 0, corrector ``j``'s draw ``j + 1``).
    Defaults: ``snr=0.16``, ``corrector_steps=1``, ``final="denoise"`` (one more evaluation).

    A per-sample step :math:`\epsilon(x)` depends on the position, and Langevin with a
    position-dependent step and no Itô correction leaves :math:`p/\epsilon \propto
    p\,\|s\|^2` invariant rather than :math:`p`: on a mixture, narrow modes gain weight as
    ``snr`` grows.  Keep ``snr`` small when mode weights matter.  In low dimension
    :math:`\|z\|/\|s\|` is unbounded where the score nearly vanishes (a mode's centre, a saddle
    between modes), so :math:`\epsilon(x)` can be huge there.  The step is not affine in the
    noise, so the output law is not Gaussian even on a Gaussian target."""
    check_sampler_arguments(grid, final, x=x, key=key, noise=noise)
    check_positive("snr", snr)
    corrector_steps = check_int("corrector_steps", corrector_steps, minimum=0)

    def step(x, i, t, t_next):
        a = (sde.alpha(t_next) / sde.alpha(t)) ** 2
        for j in range(corrector_steps):
            score = model.predict(sde, x, t, "score")
            z = draw(key, noise, i, j + 1, x)
            eps = 2.0 * a * (snr * jnp.linalg.norm(z) / jnp.linalg.norm(score)) ** 2
            x = x + eps * score + jnp.sqrt(2.0 * eps) * z
        return _reverse_diffusion_step(model, sde, key, noise, x, i, t, t_next, 0)

    x, nfe, bad = scan_grid(step, x, grid, corrector_steps + 1)
    return finish(model, sde, x, grid, final, nfe, bad)
