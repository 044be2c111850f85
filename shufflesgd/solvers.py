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

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
    bad = jnp.where(jnp.all(finite), -1, jnp.argmin(finite))
    return x, jnp.asarray(nfe_per_step * (grid.shape[0] - 1)), bad


def _pf_drift(model: Model, sde: SDE, x: Array, t: Array) -> Array:
    return sde.reverse_drift(x, t, model.predict(sde, x, t, "score"), probability_flow=True)


def _finish(
    model: Model, sde: SDE, x: Array, grid: Array, final: str, nfe: Array, bad: Array
) -> tuple[Array, SamplerInfo]:
    t_last = jnp.asarray(grid)[-1]
    if final == "denoise":
        x, nfe = model.predict(sde, x, t_last, "x0"), nfe + 1
    elif final == "euler_to_zero":
        x, nfe = x - t_last * _pf_drift(model, sde, x, t_last), nfe + 1
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
    if not isinstance(grid, jax.core.Tracer):
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
    if not isinstance(eta, jax.core.Tracer) and not 0.0 <= float(eta) <= 1.0:
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
    0.69 at snr 0.01 and 0.60 at snr 0.16).  Keep ``snr`` small when mode weights matter."""
    _check(grid, final)
    if not isinstance(snr, jax.core.Tracer) and not float(snr) > 0:
        raise ValueError(f"snr must be positive, got snr={snr}")
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps must be a non-negative int, got {corrector_steps!r}")

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
        return x + (t_next - t) * _pf_drift(model, sde, x, t)

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
        d = _pf_drift(model, sde, x, t)
        guess = x + dt * d
        return x + 0.5 * dt * (d + _pf_drift(model, sde, guess, t_next))

    x, nfe, bad = _scan(step, x, grid, 2)
    return _finish(model, sde, x, grid, final, nfe, bad)


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
}


def make_sampler(name: str) -> Callable[..., tuple[Array, SamplerInfo]]:
    """The sampler called ``name`` (a key of :data:`SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def check_model_output(output: str) -> None:
    if output not in MODEL_OUTPUTS:
        raise ValueError(f"model output must be one of {list(MODEL_OUTPUTS)}, got {output!r}")
