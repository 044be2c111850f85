r"""Reverse-time samplers for the linear diffusion processes of :mod:`shufflesgd.sde`.

Every sampler is a pure function of one sample,

    ``sampler(key, model, sde, x_T, grid, *, final=..., noise=None, **options) -> (x, info)``,

running ``lax.scan`` over the consecutive pairs of the decreasing time ``grid`` (an array,
see :func:`shufflesgd.sde.time_grid`).  ``model`` is a :class:`Model`: a function of
``(x, t)`` and the kind of output it predicts (score, eps, x0 or v), converted as needed
with :func:`shufflesgd.sde.convert`.  Batches are ``jax.vmap`` over samples with
:func:`sample_batch`, which gives sample ``i`` the key ``fold_in(key, i)``: a sample does
not depend on its batch-mates or on the batch size.

Noise: step ``i``'s ``j``-th Gaussian draw is ``normal(fold_in(fold_in(key, i), j))``, or
``noise[i, j]`` when an explicit ``noise`` array ``[num_steps, draws, *x.shape]`` is given;
the output is then a deterministic function of ``(x_T, noise)``, which is how
:func:`exact_gaussian_law` obtains a sampler's exact output law on a Gaussian target.

The final step is explicit (``final``): ``"none"`` stops at ``grid[-1]``; ``"denoise"``
returns the model's :math:`x_0` prediction there (Tweedie's formula for a score model,
one more evaluation); ``"euler_to_zero"`` takes one probability-flow Euler step in t from
``grid[-1]`` to 0.  No sampler evaluates the model at :math:`\sigma = 0`.
``info`` reports the exact number of model evaluations (``nfe``) and the first step whose
state is not finite (``nonfinite_step``, ``-1`` if none).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_int, check_positive, is_concrete
from shufflesgd.sde import MODEL_OUTPUTS, SDE, convert

Array = jax.Array
FINALS = ("none", "denoise", "euler_to_zero")


class Model(NamedTuple):
    """A network (or closed form) ``fn(x, t)`` and what it predicts: one of ``MODEL_OUTPUTS``."""

    fn: Callable[[Array, Array], Array]
    output: str

    def predict(self, sde: SDE, x: Array, t: Array, target: str) -> Array:
        return convert(self.fn(x, t), self.output, target, x, t, sde)


class SamplerInfo(NamedTuple):
    """Diagnostics of one sampling run: model evaluations and the first non-finite step."""

    nfe: Array
    nonfinite_step: Array


# ------------------------------------------------------------------ shared machinery


def _draw(key: Array, noise: Array | None, i: Array, j: int, like: Array) -> Array:
    if noise is not None:
        return noise[i, j]
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), j), like.shape, like.dtype)


def _steps(grid: Array) -> tuple[Array, Array, Array]:
    grid = jnp.asarray(grid)
    return jnp.arange(grid.shape[0] - 1), grid[:-1], grid[1:]


def _scan(step: Callable, x: Array, grid: Array, nfe_per_step: int) -> tuple[Array, Array, Array]:
    """Run ``step(x, i, t, t_next) -> x`` over the grid; return x, the nfe and the first bad step."""

    def body(x, inputs):
        x = step(x, *inputs)
        return x, jnp.all(jnp.isfinite(x))

    x, finite = jax.lax.scan(body, x, _steps(grid))
    return x, jnp.asarray(nfe_per_step * (grid.shape[0] - 1)), _first_nonfinite(finite)


def pf_ode_drift(model: Model, sde: SDE, x: Array, t: Array) -> Array:
    r"""The probability-flow drift :math:`f(x, t) - \frac12 g(t)^2 s_\theta(x, t)` (Song et al.
    2021, Eq. 13), from any kind of model output."""
    return sde.reverse_drift(x, t, model.predict(sde, x, t, "score"), probability_flow=True)


def _finish(
    model: Model, sde: SDE, x: Array, grid: Array, final: str, nfe: Array, bad: Array
) -> tuple[Array, SamplerInfo]:
    t_last = jnp.asarray(grid)[-1]
    if final == "denoise":
        x, nfe = model.predict(sde, x, t_last, "x0"), nfe + 1
    elif final == "euler_to_zero":
        x, nfe = x - t_last * pf_ode_drift(model, sde, x, t_last), nfe + 1
    bad = jnp.where((bad < 0) & ~jnp.all(jnp.isfinite(x)), jnp.asarray(grid).shape[0] - 1, bad)
    return x, SamplerInfo(nfe.astype(jnp.int32), bad.astype(jnp.int32))


def check_final(final: str) -> None:
    if final not in FINALS:
        raise ValueError(f"final must be one of {list(FINALS)}, got {final!r}")


def check_grid(grid: Any) -> None:
    """A grid is a 1-D array of at least two strictly decreasing, non-negative times."""
    g = np.asarray(grid, np.float64)
    if g.ndim != 1 or g.shape[0] < 2:
        raise ValueError(f"grid must hold at least two times (NFE >= 1), got shape {g.shape}")
    if not np.all(np.diff(g) < 0):
        raise ValueError("grid must be strictly decreasing (from t_max down to t_min)")
    if g[-1] < 0:
        raise ValueError(f"grid must end at a time >= 0, got {g[-1]}")


def _check(grid: Any, final: str) -> None:
    if is_concrete(grid):
        check_grid(grid)
    check_final(final)


# ------------------------------------------------------------------ SDE samplers


def euler_maruyama(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Euler–Maruyama on the reverse SDE (Song et al. 2021, Sec. 4.1):
    :math:`x \leftarrow x + [f x - g^2 s]\Delta t + g\sqrt{|\Delta t|}\,z`, one evaluation a step.
    Weak order 1."""
    _check(grid, final)

    def step(x, i, t, t_next):
        drift = sde.reverse_drift(x, t, model.predict(sde, x, t, "score"))
        dt = t_next - t
        return x + drift * dt + jnp.sqrt(sde.diffusion_squared(t) * -dt) * _draw(key, noise, i, 0, x)

    x, nfe, bad = _scan(step, x, grid, 1)
    return _finish(model, sde, x, grid, final, nfe, bad)


def _reverse_diffusion_step(model, sde, key, noise, x, i, t, t_next, draw):
    # forward discretisation t_next -> t: x_t = a x_next + G z, a = alpha_t / alpha_next,
    # G^2 = sigma_t^2 - a^2 sigma_next^2; reverse: x_next = x - (a - 1) x + G^2 s + G z.
    a = sde.alpha(t) / sde.alpha(t_next)
    g2 = sde.sigma(t) ** 2 - a**2 * sde.sigma(t_next) ** 2
    score = model.predict(sde, x, t, "score")
    return (2.0 - a) * x + g2 * score + jnp.sqrt(g2) * _draw(key, noise, i, draw, x)


def reverse_diffusion(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Reverse-diffusion predictor (Song et al. 2021, Eq. 45 / App. E): discretise the forward
    process on the grid, :math:`x_t = a x_s + G z` with :math:`a = \alpha_t/\alpha_s`,
    :math:`G^2 = \sigma_t^2 - a^2\sigma_s^2`, and reverse it,
    :math:`x_s = x_t - (a-1)x_t + G^2 s(x_t, t) + G z`.  One evaluation a step."""
    _check(grid, final)

    def step(x, i, t, t_next):
        return _reverse_diffusion_step(model, sde, key, noise, x, i, t, t_next, 0)

    x, nfe, bad = _scan(step, x, grid, 1)
    return _finish(model, sde, x, grid, final, nfe, bad)


def ddim(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, eta: float | Array = 0.0,
    final: str = "denoise", noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""DDIM (Song, Meng, Ermon 2021, Eq. 12) for any linear process.

    From :math:`(x_t, t)` to :math:`s < t` with predictions :math:`\hat x_0, \hat\varepsilon`:
    :math:`x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - c^2}\,\hat\varepsilon + c z`,
    :math:`c = \eta\,\sigma_s\sigma_{t|s}/\sigma_t` with
    :math:`\sigma_{t|s}^2 = \sigma_t^2 - (\alpha_t/\alpha_s)^2\sigma_s^2` (their Eq. 16).
    :math:`\eta = 0` is the deterministic DDIM (a first-order PF-ODE solver in
    :math:`\lambda`), :math:`\eta = 1` the exact Gaussian posterior step (DDPM ancestral).
    ``eta`` may be traced."""
    _check(grid, final)
    if is_concrete(eta) and not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got eta={eta}")

    def step(x, i, t, t_next):
        x0 = model.predict(sde, x, t, "x0")
        eps = (x - sde.alpha(t) * x0) / sde.sigma(t)
        sigma_t, sigma_s = sde.sigma(t), sde.sigma(t_next)
        ratio = sde.alpha(t) / sde.alpha(t_next)
        posterior_var = sigma_s**2 * (sigma_t**2 - ratio**2 * sigma_s**2) / sigma_t**2
        c2 = eta**2 * jnp.clip(posterior_var, 0.0)
        return (sde.alpha(t_next) * x0 + jnp.sqrt(jnp.clip(sigma_s**2 - c2, 0.0)) * eps
                + jnp.sqrt(c2) * _draw(key, noise, i, 0, x))

    x, nfe, bad = _scan(step, x, grid, 1)
    return _finish(model, sde, x, grid, final, nfe, bad)


def ancestral(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Ancestral sampling (Ho et al. 2020, Alg. 2; Song et al. 2021, Eq. 47): sample the
    Gaussian posterior :math:`q(x_s \mid x_t, \hat x_0)` at every step — DDIM with
    :math:`\eta = 1` (one implementation, :func:`ddim`)."""
    return ddim(key, model, sde, x, grid, eta=1.0, final=final, noise=noise)


def predictor_corrector(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, snr: float | Array = 0.16,
    corrector_steps: int = 1, final: str = "denoise", noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Predictor–corrector sampling (Song et al. 2021, Alg. 1-3): at each time, ``M``
    Langevin corrector steps then a reverse-diffusion predictor step.

    Corrector: :math:`x \leftarrow x + \epsilon s + \sqrt{2\epsilon}\,z` with
    :math:`\epsilon = 2a\,(r\,\|z\|/\|s\|)^2`, :math:`r` the signal-to-noise ratio ``snr``
    and :math:`a = (\alpha_{t_{next}}/\alpha_t)^2` (1 for VE; :math:`1-\beta_i` for VP, as
    in Alg. 4-5).  Norms are per sample (the reference code averages them over the batch,
    so its samples depend on their batch-mates).  :math:`N(M+1)` evaluations.

    A per-sample step :math:`\epsilon(x)` depends on the position, and Langevin with a
    position-dependent step and no Itô correction leaves :math:`p/\epsilon \propto
    p\,\|s\|^2` invariant rather than :math:`p`: on a mixture, narrow modes gain weight as
    ``snr`` grows (measured in ``tests/test_solvers.py``: a 0.7 / 0.3 mixture comes out
    0.69 at snr 0.01 and 0.60 at snr 0.16).  Keep ``snr`` small when mode weights matter.
    In low dimension :math:`\|z\|/\|s\|` is unbounded where the score nearly vanishes (a
    mode's centre, a saddle between modes), so :math:`\epsilon(x)` can be huge there: on a 2-D
    mixture at snr 0.16 this sampler stays far from the data at every NFE tried
    (``experiments/score_model.py``), with exact and with learned scores."""
    _check(grid, final)
    check_positive("snr", snr)
    corrector_steps = check_int("corrector_steps", corrector_steps, minimum=0)

    def step(x, i, t, t_next):
        a = (sde.alpha(t_next) / sde.alpha(t)) ** 2
        for j in range(corrector_steps):
            score = model.predict(sde, x, t, "score")
            z = _draw(key, noise, i, j + 1, x)
            eps = 2.0 * a * (snr * jnp.linalg.norm(z) / jnp.linalg.norm(score)) ** 2
            x = x + eps * score + jnp.sqrt(2.0 * eps) * z
        return _reverse_diffusion_step(model, sde, key, noise, x, i, t, t_next, 0)

    x, nfe, bad = _scan(step, x, grid, corrector_steps + 1)
    return _finish(model, sde, x, grid, final, nfe, bad)


# ------------------------------------------------------------------ probability-flow ODE


def pf_ode_euler(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Euler on the probability-flow ODE :math:`dx/dt = f x - \frac12 g^2 s` (Song et al.
    2021, Sec. 4.3), one evaluation a step; global order 1."""
    del key, noise
    _check(grid, final)

    def step(x, i, t, t_next):
        return x + (t_next - t) * pf_ode_drift(model, sde, x, t)

    x, nfe, bad = _scan(step, x, grid, 1)
    return _finish(model, sde, x, grid, final, nfe, bad)


def pf_ode_heun(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Heun's method (explicit trapezoid) on the probability-flow ODE in t (Karras et al.
    2022, Alg. 1 without churn): two evaluations a step; global order 2."""
    del key, noise
    _check(grid, final)

    def step(x, i, t, t_next):
        dt = t_next - t
        d = pf_ode_drift(model, sde, x, t)
        guess = x + dt * d
        return x + 0.5 * dt * (d + pf_ode_drift(model, sde, guess, t_next))

    x, nfe, bad = _scan(step, x, grid, 2)
    return _finish(model, sde, x, grid, final, nfe, bad)


# ------------------------------------------------------------------ shared by the samplers below


def _finish_safe(
    model: Model, sde: SDE, x: Array, grid: Array, final: str, nfe: Array, bad: Array
) -> tuple[Array, SamplerInfo]:
    r""":func:`_finish` for grids that may end at :math:`\sigma = 0` (EDM's :math:`t = 0`, VP's
    :math:`t = 0`): there the state already is the sample, so ``"denoise"`` and
    ``"euler_to_zero"`` are the identity and cost no evaluation.  The model is never called at
    :math:`\sigma = 0` (the skipped branch evaluates at ``grid[-2]`` if a ``vmap`` over grids
    turns the ``cond`` into a select)."""
    grid = jnp.asarray(grid)
    if final == "none":
        return _finish(model, sde, x, grid, "none", nfe, bad)
    positive = sde.sigma(grid[-1]) > 0
    t_eval = jnp.where(positive, grid[-1], grid[-2])

    def apply(x):
        if final == "denoise":
            return model.predict(sde, x, t_eval, "x0")
        return x - t_eval * pf_ode_drift(model, sde, x, t_eval)

    x = jax.lax.cond(positive, apply, lambda x: x, x)
    return _finish(model, sde, x, grid, "none", nfe + positive.astype(nfe.dtype), bad)


def _sigma_at_end(sde: SDE, grid: Any) -> float:
    with jax.ensure_compile_time_eval():
        return float(sde.sigma(jnp.asarray(np.asarray(grid)[-1])))


def _first_nonfinite(finite: Array) -> Array:
    return jnp.where(jnp.all(finite), -1, jnp.argmin(finite))


# ------------------------------------------------------------------ DPM-Solver++ (multistep)


def dynamic_threshold(x0: Array, quantile: float | Array = 0.995, max_value: float | Array = 1.0) -> Array:
    r"""Dynamic thresholding of a data prediction (Saharia et al. 2022, "Photorealistic
    Text-to-Image Diffusion Models with Deep Language Understanding" (Imagen), Sec. 2.3), in the
    form DPM-Solver++ uses (Lu et al. 2022, Sec. 5 / the authors' ``dynamic_thresholding_fn``):

    :math:`s = \max(\mathrm{quantile}_q(|x_0|), s_{max})`, :math:`x_0 \leftarrow
    \mathrm{clip}(x_0, -s, s)/s`,

    the quantile taken over all entries of one sample (``x0`` is one sample; ``vmap`` for a
    batch).  ``quantile`` is a fraction in (0, 1) (``numpy.percentile(|x0|, 100 q)``, linear
    interpolation); the authors' JAX port passes 0.995 to ``jnp.percentile``, i.e. the 0.995th
    *percentile*.  With ``max_value = 1`` this is Imagen's rule for data in [-1, 1]; the output
    always lies in [-1, 1].  Both arguments may be traced."""
    s = jnp.quantile(jnp.abs(x0).reshape(-1), quantile)
    s = jnp.maximum(s, max_value)
    return jnp.clip(x0, -s, s) / s


def _check_threshold(threshold_quantile: Any, threshold_max: Any) -> None:
    if is_concrete(threshold_quantile) and not 0.0 < float(threshold_quantile) < 1.0:
        raise ValueError(f"threshold_quantile must lie in (0, 1), got threshold_quantile={threshold_quantile}")
    check_positive("threshold_max", threshold_max)


def _dpm_solver_pp_multistep(
    solver_order: int, model: Model, sde: SDE, x: Array, grid: Array, *, lower_order_final: bool,
    thresholding: bool, threshold_quantile: float | Array, threshold_max: float | Array, final: str,
    consistent_third_order: bool = False,
) -> tuple[Array, SamplerInfo]:
    _check(grid, final)
    for name, flag in (("lower_order_final", lower_order_final), ("thresholding", thresholding),
                       ("consistent_third_order", consistent_third_order)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {name}={flag!r}")
    _check_threshold(threshold_quantile, threshold_max)
    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    lam = 0.5 * sde.log_snr(grid)  # lambda = log(alpha / sigma): +inf where sigma = 0
    alpha, sigma = sde.alpha(grid), sde.sigma(grid)
    index = jnp.arange(num_steps)
    lam_prev = lam[jnp.maximum(index - 1, 0)]
    lam_prev2 = lam[jnp.maximum(index - 2, 0)]
    # order of step i: warm-up min(order, i + 1); diffusers' lower_order_final (num_steps < 15):
    # min(order, N - i), so the last step is first order and the one before at most second.
    step_order = jnp.minimum(solver_order, index + 1)
    if lower_order_final and num_steps < 15:
        step_order = jnp.minimum(step_order, num_steps - index)
    step_order = jnp.where(sigma[1:] > 0, step_order, 1)  # a step to sigma = 0 is first order

    def predict(x, t):
        x0 = model.predict(sde, x, t, "x0")
        return dynamic_threshold(x0, threshold_quantile, threshold_max) if thresholding else x0

    def body(carry, inputs):
        x, d_m1, d_m2 = carry  # the two previous data predictions (zeros during warm-up)
        t, lam_i, lam_p, lam_p2, lam_n, a_n, s_i, s_n, order = inputs
        d0 = predict(x, t)
        to_zero = ~(s_n > 0)
        h = jnp.where(to_zero, 1.0, lam_n - lam_i)
        phi1 = jnp.where(to_zero, -1.0, jnp.expm1(-h))
        o2, o3 = order >= 2, order >= 3
        r0 = jnp.where(o2, (lam_i - lam_p) / h, 1.0)
        r1 = jnp.where(o3, (lam_p - lam_p2) / h, 1.0)
        # the update is x' = (s_n / s_i) x + c0 d0 + c1 d_m1 + c2 d_m2; per order:
        # first (DDIM): -a phi1 d0
        first = (-a_n * phi1, 0.0, 0.0)
        # 2M: -a phi1 [(1 + 1/(2 r0)) d0 - 1/(2 r0) d_m1]
        second = (-a_n * phi1 * (1.0 + 0.5 / r0), a_n * phi1 * 0.5 / r0, 0.0)
        # 3M: -a phi1 d0 + a phi2 D1 - c a phi3 D2 with D1 = (1 + w) D1_0 - w D1_1,
        # D2 = (D1_0 - D1_1) / (r0 + r1), D1_0 = (d0 - d_m1) / r0, D1_1 = (d_m1 - d_m2) / r1,
        # w = r0 / (r0 + r1); c = 1 in the reference implementations, 2 if consistent_third_order
        phi2 = phi1 / h + 1.0
        phi3 = (2.0 if consistent_third_order else 1.0) * (phi2 / h - 0.5)
        w = r0 / (r0 + r1)
        p = a_n * phi2 * (1.0 + w) - a_n * phi3 / (r0 + r1)
        q = a_n * phi2 * w - a_n * phi3 / (r0 + r1)
        third = (-a_n * phi1 + p / r0, -p / r0 - q / r1, q / r1)
        c0, c1, c2 = (jnp.where(o3, c3_, jnp.where(o2, c2_, c1_)) for c1_, c2_, c3_ in zip(first, second, third))
        x = (s_n / s_i) * x + c0 * d0 + c1 * d_m1 + c2 * d_m2
        return (x, d0, d_m1), jnp.all(jnp.isfinite(x))

    inputs = (grid[:-1], lam[:-1], lam_prev, lam_prev2, lam[1:], alpha[1:], sigma[:-1], sigma[1:], step_order)
    zeros = jnp.zeros_like(x)
    (x, _, _), finite = jax.lax.scan(body, (x, zeros, zeros), inputs)
    return _finish_safe(model, sde, x, grid, final, jnp.asarray(num_steps), _first_nonfinite(finite))


def dpm_solver_pp_2m(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, lower_order_final: bool = True,
    thresholding: bool = False, threshold_quantile: float | Array = 0.995, threshold_max: float | Array = 1.0,
    final: str = "denoise", noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
    Diffusion Probabilistic Models", Alg. 2): a second-order multistep solver of the
    probability-flow ODE written for the data prediction :math:`D = \hat x_0`.

    With :math:`\lambda_t = \log(\alpha_t/\sigma_t)` (half the process's ``log_snr``),
    :math:`h_i = \lambda_{t_i} - \lambda_{t_{i-1}}` and :math:`r_i = h_{i-1}/h_i`,

    .. math:: x_i = \frac{\sigma_i}{\sigma_{i-1}}x_{i-1} - \alpha_i(e^{-h_i}-1)
              \Big[\big(1+\tfrac1{2r_i}\big)D_{i-1} - \tfrac1{2r_i}D_{i-2}\Big],

    the first step first order (DDIM).  Checked against the authors' ``dpm_solver_pytorch.py``
    (``multistep_dpm_solver_second_order_update``, ``solver_type='dpmsolver'``) and diffusers'
    ``DPMSolverMultistepScheduler`` (midpoint).  ``lower_order_final`` (as in diffusers): with
    fewer than 15 steps the last step is first order.  A step to :math:`\sigma = 0` is first
    order (:math:`x = \alpha D`).  Orders are data: each step's coefficients are selected with
    ``jnp.where``, so one program serves every step and ``vmap`` never doubles the work.  One
    evaluation a step (``nfe = N``, plus the final one).  ``thresholding`` applies
    :func:`dynamic_threshold` (``threshold_quantile``, ``threshold_max``; both may be traced) to
    every data prediction.  Deterministic: ``key`` and ``noise`` are unused."""
    del key, noise
    return _dpm_solver_pp_multistep(
        2, model, sde, x, grid, lower_order_final=lower_order_final, thresholding=thresholding,
        threshold_quantile=threshold_quantile, threshold_max=threshold_max, final=final)


def dpm_solver_pp_3m(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, lower_order_final: bool = True,
    consistent_third_order: bool = False, thresholding: bool = False,
    threshold_quantile: float | Array = 0.995, threshold_max: float | Array = 1.0,
    final: str = "denoise", noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""DPM-Solver++(3M) (Lu et al. 2022, "DPM-Solver++", Alg. 2 with third-order multistep
    updates; the third-order formula is that of the authors' ``dpm_solver_pytorch.py``,
    ``multistep_dpm_solver_third_order_update``, identical in diffusers):

    .. math:: x_i = \frac{\sigma_i}{\sigma_{i-1}}x_{i-1} - \alpha_i\varphi_1 D_{i-1}
              + \alpha_i\varphi_2 D^{(1)} - \alpha_i\varphi_3 D^{(2)},

    :math:`\varphi_1 = e^{-h}-1`, :math:`\varphi_2 = \varphi_1/h + 1`,
    :math:`\varphi_3 = \varphi_2/h - \frac12`, :math:`r_0 = h_{i-1}/h_i`,
    :math:`r_1 = h_{i-2}/h_i`, :math:`D_{1,0} = (D_{i-1}-D_{i-2})/r_0`,
    :math:`D_{1,1} = (D_{i-2}-D_{i-3})/r_1`,
    :math:`D^{(1)} = D_{1,0} + \frac{r_0}{r_0+r_1}(D_{1,0}-D_{1,1})`,
    :math:`D^{(2)} = (D_{1,0}-D_{1,1})/(r_0+r_1)`.  Warm-up: first order, then 2M, then 3M;
    ``lower_order_final`` (fewer than 15 steps): the last step first order, the one before at
    most second.  Orders are data (``jnp.where``), one evaluation a step; options as
    :func:`dpm_solver_pp_2m`.

    ``consistent_third_order``: :math:`D^{(2)}` is :math:`h^2` times the second divided
    difference, :math:`\approx h^2 D''/2`, while the exact :math:`u^2` term of the exponential
    integrator is :math:`-\alpha_i h^2\varphi_3 D'' \approx -2\alpha_i\varphi_3 D^{(2)}`.  The
    reference update (default, ``False``; the authors' code, diffusers and k-diffusion agree) is
    therefore off by :math:`O(h^3)` a step, i.e. globally second order, though several times more
    accurate than 2M.  Measured on VP with the uniform-log-SNR grid: the KL of its exact law to
    the exact flow's has local slopes -5.6, -4.8, -4.3, -4.1 from N = 10 to 160 (``True``: -7.5,
    -8.0, -8.1 from 10 to 80); its largest pathwise error on the 2-D test mixture against a
    Dopri5 solve at tolerance 1e-12 has slopes -2.7, -2.5 from N = 40 to 160 (``True``: -3.3,
    -3.4).  ``True`` uses :math:`-2\alpha_i\varphi_3 D^{(2)}`, the factor 2 that the authors'
    single-step ``'taylor'`` third-order update carries in its :math:`D_2`."""
    del key, noise
    return _dpm_solver_pp_multistep(
        3, model, sde, x, grid, lower_order_final=lower_order_final, thresholding=thresholding,
        threshold_quantile=threshold_quantile, threshold_max=threshold_max, final=final,
        consistent_third_order=consistent_third_order)


# ------------------------------------------------------------------ EDM Heun and Restart


def _scaled_sigma(sde: SDE, t: Array) -> Array:
    r""":math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda/2}`: the noise level of :math:`x/\alpha`."""
    return sde.sigma(t) / sde.alpha(t)


def _time_of_scaled_sigma(sde: SDE, s: Array) -> Array:
    return sde.time_of_log_snr(-2.0 * jnp.log(s))


def _heun_sigma_step(model: Model, sde: SDE, x: Array, s: Array, t: Array, s_next: Array, t_next: Array) -> Array:
    r"""One step of Karras et al. (2022), Alg. 2, lines 7-10, on :math:`\tilde x = x/\alpha` in
    :math:`\tilde\sigma`: :math:`d\tilde x/d\tilde\sigma = (\tilde x - D(\tilde x;\tilde\sigma))/\tilde\sigma`,
    Heun, or Euler when :math:`\tilde\sigma_{next} = 0` (no evaluation there: a ``cond`` on the
    grid, which stays a branch under a ``vmap`` over samples)."""

    def denoise(x, t):
        return model.predict(sde, sde.alpha(t) * x, t, "x0")

    d = (x - denoise(x, t)) / s
    x_euler = x + (s_next - s) * d
    positive = s_next > 0
    s_eval, t_eval = jnp.where(positive, s_next, s), jnp.where(positive, t_next, t)

    def correct(x_euler):
        d_next = (x_euler - denoise(x_euler, t_eval)) / s_eval
        return x + (s_next - s) * 0.5 * (d + d_next)

    return jax.lax.cond(positive, correct, lambda x_euler: x_euler, x_euler)


def edm_heun(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, S_churn: float | Array = 0.0,
    S_tmin: float | Array = 0.0, S_tmax: float | Array = float("inf"), S_noise: float | Array = 1.0,
    final: str = "denoise", noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""EDM's stochastic Heun sampler (Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Alg. 2).

    At each grid noise level :math:`\sigma_i`: churn
    :math:`\gamma_i = \min(S_{churn}/N, \sqrt2-1)` if :math:`\sigma_i\in[S_{tmin}, S_{tmax}]`
    else 0, :math:`\hat\sigma_i = (1+\gamma_i)\sigma_i`,
    :math:`\hat x = x + \sqrt{\hat\sigma_i^2-\sigma_i^2}\,\varepsilon`,
    :math:`\varepsilon\sim N(0, S_{noise}^2 I)` (draw ``(i, 0)``), then a Heun step of
    :math:`dx/d\sigma = (x - D(x;\sigma))/\sigma` from :math:`\hat\sigma_i` to
    :math:`\sigma_{i+1}`, Euler when :math:`\sigma_{i+1} = 0` (a grid ending at ``t = 0`` for
    EDM or VP: :math:`D` is never evaluated at :math:`\sigma = 0`).

    Processes with :math:`\alpha\ne1` (VP, sub-VP) are not refused: Karras et al.'s Eq. 4 with
    scaling :math:`s(t) = \alpha(t)` reduces them to Alg. 2's case :math:`s = 1`, since
    :math:`\tilde x = x/\alpha` obeys :math:`d\tilde x/d\tilde\sigma = (\tilde x -
    D(\tilde x;\tilde\sigma))/\tilde\sigma` in :math:`\tilde\sigma = \sigma/\alpha =
    e^{-\lambda/2}` (as k-diffusion wraps VP models).  The sampler runs on :math:`\tilde x` and
    queries the model at :math:`(\alpha\tilde x, t(\tilde\sigma))`; for VE and EDM this is
    Alg. 2 verbatim, and with ``S_churn = 0`` on EDM it is :func:`pf_ode_heun`.
    :math:`S_{tmin}, S_{tmax}` are compared with :math:`\tilde\sigma` (EDM's :math:`t`).
    ``nfe = 2N``, minus one when the grid ends at :math:`\sigma = 0` (the Euler last step).
    All four options may be traced; one draw a step (``draws_per_step = 1``), none when
    ``S_churn`` is a concrete zero (the result is the same: the draw would be scaled by 0)."""
    _check(grid, final)
    for name, value, ok, rule in (("S_churn", S_churn, lambda v: v >= 0, "must be >= 0"),
                                  ("S_noise", S_noise, lambda v: v > 0, "must be positive"),
                                  ("S_tmin", S_tmin, lambda v: v >= 0, "must be >= 0")):
        if is_concrete(value) and not ok(float(value)):
            raise ValueError(f"{name} {rule}, got {name}={value}")
    if is_concrete(S_tmin) and is_concrete(S_tmax) and not float(S_tmin) <= float(S_tmax):
        raise ValueError(f"S_tmin must not exceed S_tmax, got S_tmin={S_tmin}, S_tmax={S_tmax}")
    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    s_grid = _scaled_sigma(sde, grid)
    gamma_max = jnp.minimum(S_churn / num_steps, math.sqrt(2.0) - 1.0)
    churn_free = is_concrete(S_churn) and float(S_churn) == 0.0  # static: skip the draws entirely

    def body(x, inputs):
        i, t, t_next, s, s_next = inputs
        gamma = jnp.where((s >= S_tmin) & (s <= S_tmax), gamma_max, 0.0)
        s_hat = s * (1.0 + gamma)
        t_hat = jnp.where(gamma > 0, _time_of_scaled_sigma(sde, s_hat), t)
        if not churn_free:
            x = x + s * jnp.sqrt(gamma * (2.0 + gamma)) * S_noise * _draw(key, noise, i, 0, x)  # sqrt(s_hat^2 - s^2)
        x = _heun_sigma_step(model, sde, x, s_hat, t_hat, s_next, t_next)
        return x, jnp.all(jnp.isfinite(x))

    inputs = (jnp.arange(num_steps), grid[:-1], grid[1:], s_grid[:-1], s_grid[1:])
    x, finite = jax.lax.scan(body, x / sde.alpha(grid[0]), inputs)
    x = sde.alpha(grid[-1]) * x
    nfe = jnp.sum(1 + (s_grid[1:] > 0))
    return _finish_safe(model, sde, x, grid, final, nfe, _first_nonfinite(finite))


def restart(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, restart_t_min: float | Array = 0.06,
    restart_t_max: float | Array = 0.30, restart_k: int = 2, restart_steps: int = 4, final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes",
    Alg. 1) on the EDM ODE (Heun steps of :func:`edm_heun` without churn).

    The main pass runs Heun down the grid.  On reaching the restart interval's lower end, the
    first grid point :math:`t_m \le` ``restart_t_min`` (:math:`m\ge1`; give a grid point to
    restart exactly there), it repeats ``restart_k`` = K times: jump up to ``restart_t_max`` by
    adding :math:`N(0, (\tilde\sigma_{max}^2-\tilde\sigma_{min}^2)I)` (Alg. 1, line 6; EDM's
    :math:`t_{max}^2 - t_{min}^2`), then ``restart_steps`` = S Heun steps back down to
    :math:`t_m` on Karras's :math:`\rho = 7` spacing in :math:`\tilde\sigma` (the restart
    sub-grid of the authors' code); then it finishes the main pass.  Noise levels are
    :math:`\tilde\sigma = \sigma/\alpha` as in :func:`edm_heun`; times (``restart_t_min``,
    ``restart_t_max``) are the process's, equal to :math:`\sigma` for EDM.

    The whole run is one ``lax.scan`` over a static :math:`N + KS` steps whose times, and the
    restart position, are data: the restart interval may be traced (and vmapped) without
    recompiling or repeating work.  ``nfe`` :math:`= 2(N + KS)`, minus one for each step that
    ends at :math:`\sigma = 0` (Euler).  Noise: the k-th jump is draw ``(m-1, k)`` (it belongs to
    step m-1, the one that reaches :math:`t_m`), so ``exact_gaussian_law`` needs
    ``draws_per_step = restart_k``."""
    _check(grid, final)
    check_int("restart_k", restart_k)
    check_int("restart_steps", restart_steps)
    if is_concrete(restart_t_min) and is_concrete(restart_t_max) and not float(restart_t_min) < float(restart_t_max):
        raise ValueError(f"restart_t_min must be below restart_t_max, got restart_t_min={restart_t_min}, "
                         f"restart_t_max={restart_t_max}")
    if is_concrete(grid) and is_concrete(restart_t_min) and float(restart_t_min) < float(np.asarray(grid)[-1]):
        raise ValueError(f"restart_t_min must not lie below the grid's end {float(np.asarray(grid)[-1])}, "
                         f"got restart_t_min={restart_t_min}")
    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    k_total, sub = restart_k, restart_steps
    s_grid = _scaled_sigma(sde, grid)
    # restart at grid point m: the first point (from index 1) at or below restart_t_min
    m = 1 + jnp.sum(grid[1:-1] > restart_t_min)
    t_lo, s_lo = grid[m], s_grid[m]
    t_hi = jnp.asarray(restart_t_max, grid.dtype)
    s_hi = _scaled_sigma(sde, t_hi)
    u = jnp.linspace(0.0, 1.0, sub + 1, dtype=grid.dtype)
    s_sub = (s_hi ** (1 / 7.0) + u * (s_lo ** (1 / 7.0) - s_hi ** (1 / 7.0))) ** 7.0
    s_sub = s_sub.at[0].set(s_hi).at[-1].set(s_lo)
    t_sub = _time_of_scaled_sigma(sde, jnp.where(s_sub > 0, s_sub, 1.0))
    t_sub = t_sub.at[0].set(t_hi).at[-1].set(t_lo)
    # the static sequence of N + K S Heun steps; which are restart steps is data
    j = jnp.arange(num_steps + k_total * sub)
    in_restart = (j >= m) & (j < m + k_total * sub)
    main = jnp.where(j < m, j, j - k_total * sub).clip(0, num_steps - 1)
    r = (j - m).clip(0, k_total * sub - 1)
    k, pos = r // sub, r % sub
    seq = (
        jnp.where(in_restart, t_sub[pos], grid[main]), jnp.where(in_restart, t_sub[pos + 1], grid[main + 1]),
        jnp.where(in_restart, s_sub[pos], s_grid[main]), jnp.where(in_restart, s_sub[pos + 1], s_grid[main + 1]),
        jnp.where(in_restart & (pos == 0), jnp.clip(s_hi**2 - s_lo**2, 0.0), 0.0), k,
    )

    def body(x, inputs):
        t, t_next, s, s_next, jump_var, k = inputs
        x = x + jnp.sqrt(jump_var) * _draw(key, noise, m - 1, k, x)
        x = _heun_sigma_step(model, sde, x, s, t, s_next, t_next)
        return x, jnp.all(jnp.isfinite(x))

    x, finite = jax.lax.scan(body, x / sde.alpha(grid[0]), seq)
    x = sde.alpha(grid[-1]) * x
    nfe = jnp.sum(1 + (seq[3] > 0))
    bad = _first_nonfinite(finite)  # a position in the sequence: map it back to its grid step
    bad = jnp.where(bad < 0, -1, jnp.where(in_restart[bad.clip(0)], m - 1, main[bad.clip(0)]))
    return _finish_safe(model, sde, x, grid, final, nfe, bad)


# ------------------------------------------------------------------ adaptive probability-flow ODE


def pf_ode_adaptive(
    key: Array, model: Model, sde: SDE, x: Array, grid: Array, *, rtol: float | Array = 1e-5,
    atol: float | Array = 1e-5, max_steps: int = 4096, final: str = "denoise", noise: Array | None = None,
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
    ``sol.stats`` (checked by counting calls in ``tests/test_solvers_higher_order.py``).
    Under ``vmap`` each sample reports its own count, while the batch runs until its slowest
    sample finishes.  A solve that hits ``max_steps`` returns NaN (``nonfinite_step = 0``).
    ``rtol``/``atol`` may be traced; ``max_steps`` (a Python int) bounds the reverse-mode
    checkpointing.  The grid must end at :math:`\sigma > 0` (Dopri5 evaluates the end point)."""
    import diffrax  # imported here: the other samplers do not need it

    del key, noise
    _check(grid, final)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    check_int("max_steps", max_steps)
    if is_concrete(grid) and not _sigma_at_end(sde, grid) > 0:
        raise ValueError("pf_ode_adaptive needs a grid that ends at sigma > 0 (Dopri5 evaluates the end point)")
    grid = jnp.asarray(grid)
    t0, t1 = grid[0], grid[-1]
    term = diffrax.ODETerm(lambda t, y, args: pf_ode_drift(model, sde, y, t))
    solution = diffrax.diffeqsolve(
        term, diffrax.Dopri5(), t0, t1, (t1 - t0) / 64, x,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=False,
        solver_state=(jnp.asarray(False), pf_ode_drift(model, sde, x, t0)),  # FSAL: f(t0, x_T), evaluated once
    )
    ok = solution.result == diffrax.RESULTS.successful
    x = jnp.where(ok, solution.ys[0], jnp.nan)
    nfe = 6 * solution.stats["num_steps"] + 1
    bad = jnp.where(jnp.all(jnp.isfinite(x)), -1, 0)
    return _finish(model, sde, x, grid, final, jnp.asarray(nfe), bad)


# ------------------------------------------------------------------ batches and exact laws


def sample_batch(
    sampler: Callable[..., tuple[Array, SamplerInfo]], key: Array, model: Model, sde: SDE,
    x_T: Array, grid: Array, **options: Any,
) -> tuple[Array, SamplerInfo]:
    """Run ``sampler`` on each row of ``x_T`` with key ``fold_in(key, i)`` for row ``i``."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(x_T.shape[0]))
    return jax.vmap(lambda k, x: sampler(k, model, sde, x, grid, **options))(keys, x_T)


def exact_gaussian_law(
    sampler: Callable[..., tuple[Array, SamplerInfo]], model: Model, sde: SDE, grid: Array,
    dim: int, draws_per_step: int, **options: Any,
) -> tuple[Array, Array]:
    r"""Mean and covariance of a sampler's output when the model output is affine in x.

    For a Gaussian target every model output is affine in :math:`x`, so every sampler here
    is affine in :math:`(x_T, z)` with :math:`x_T \sim N(0, \sigma_T^2 I)` and
    :math:`z \sim N(0, I)` the explicit noise: :math:`x_0 = A x_T + B z + c`, hence
    :math:`x_0 \sim N(c, \sigma_T^2 AA^\top + BB^\top)` exactly (no Monte Carlo).  ``A`` and
    ``B`` are Jacobians taken with ``jax.jacrev``; ``draws_per_step`` must be at least the
    sampler's number of draws per step (1, or ``corrector_steps + 1``).
    """
    num_steps = jnp.asarray(grid).shape[0] - 1
    shape = (num_steps, draws_per_step, dim)

    def run(x_T: Array, z: Array) -> Array:
        return sampler(jax.random.key(0), model, sde, x_T, grid, noise=z.reshape(shape), **options)[0]

    x_T, z = jnp.zeros(dim), jnp.zeros(int(np.prod(shape)))
    mean = run(x_T, z)
    a, b = jax.jacrev(run, argnums=(0, 1))(x_T, z)
    return mean, sde.prior_std**2 * a @ a.T + b @ b.T


SAMPLERS: dict[str, Callable[..., tuple[Array, SamplerInfo]]] = {
    "euler_maruyama": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral": ancestral,
    "ddim": ddim,
    "predictor_corrector": predictor_corrector,
    "pf_ode_euler": pf_ode_euler,
    "pf_ode_heun": pf_ode_heun,
    "dpm_solver_pp_2m": dpm_solver_pp_2m,
    "dpm_solver_pp_3m": dpm_solver_pp_3m,
    "edm_heun": edm_heun,
    "restart": restart,
    "pf_ode_adaptive": pf_ode_adaptive,
}


def make_sampler(name: str) -> Callable[..., tuple[Array, SamplerInfo]]:
    """The sampler called ``name`` (a key of :data:`SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def mixture_model(sde: SDE, law: Any) -> Model:
    r"""The exact score model of the forward marginals of a Gaussian mixture ``law`` (a
    :class:`shufflesgd.problems.EigenMixture`, or anything with ``score(x, alpha, sigma)``):
    :math:`s(x, t) = \nabla\log p_t(x)` with :math:`p_t` the law of :math:`\alpha(t)x_0 +
    \sigma(t)\varepsilon`, the analytic test bed of every sampler."""
    return Model(lambda x, t: law.score(x, sde.alpha(t), sde.sigma(t)), "score")


def check_model_output(output: str) -> None:
    if output not in MODEL_OUTPUTS:
        raise ValueError(f"model output must be one of {list(MODEL_OUTPUTS)}, got {output!r}")
