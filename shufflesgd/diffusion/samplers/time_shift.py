r"""The Time-Shift sampler (Li, Qu, Yao, Sun & Moens 2024, "Alleviating Exposure Bias in
Diffusion Models through Sampling with Shifted Time Steps", ICLR 2024, Alg. 1): DDIM and DDPM
steps taken from the time that best matches the state's variance.

Exposure bias: a sampler's state :math:`\hat x_t` is not distributed as the forward marginal
:math:`p_t` the network was trained on, so the scheduled time :math:`t` may not be the time the
network should be told.  The authors couple each new state with a time :math:`t_s` from a
window around the scheduled one, the time whose forward variance is closest to the state's own
per-sample variance, and take the next step from :math:`(\hat x, t_s)`; shifting stops at a
cutoff time :math:`t_c`, below which the variance no longer tells the noise level.  With
:math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` and data of per-entry variance
:math:`\sigma_d^2`, an entry of :math:`x_t` has variance :math:`\alpha_t^2\sigma_d^2 +
\sigma_t^2`, and the rule is

.. math:: t_s = \operatorname*{arg\,min}_{\tau \in W}
          \bigl|\hat v(\hat x) - (\alpha_\tau^2\sigma_d^2 + \sigma_\tau^2)\bigr|, \qquad
          \hat v(x) = \frac{1}{d-1}\sum_{j=1}^d (x_j - \bar x)^2,

over the window :math:`W` of candidate times around the state's scheduled time, with :math:`\hat v`
the unbiased variance over the :math:`d` entries of one sample (``torch.var`` in the authors' code).
:math:`\sigma_d^2 = 0` (the default) is the authors' released rule, which compares :math:`\hat v`
with :math:`1 - \bar\alpha_\tau` on their VP chain; it reads the data's own spread as noise, and so
shifts towards higher noise wherever :math:`\alpha^2\sigma_d^2` is not small against
:math:`\sigma^2`, which the cutoff guards against.  Given an estimate of :math:`\sigma_d^2` from the
data, the rule is unbiased at every noise level.

Continuous-time window.  The paper's window is the steps :math:`[t - w/2, t + w/2]` of the 1000-step
training chain (:math:`2\lfloor w/2\rfloor + 1` of them in the authors' code).  Our grids are
arbitrary, so for the state at grid time :math:`t_{i+1}` (between its neighbours :math:`t_i >
t_{i+1} > t_{i+2}`) the candidates are ``window`` (odd) equally spaced times

.. math:: \tau_j = t_{i+1} + \begin{cases} u_j\,\rho\,(t_i - t_{i+1}) & u_j > 0 \\
          u_j\,\rho\,(t_{i+1} - t_{i+2}) & u_j \le 0 \end{cases}, \qquad
          u_j = \tfrac{j}{m},\ j = -m, \dots, m,\ m = \tfrac{\mathrm{window} - 1}{2},

a window reaching the fraction :math:`\rho` = ``window_width`` :math:`\in [0, 1)` of the way to each
neighbour, so candidates stay strictly between them and the scheduled time is the middle one.  The
paper's :math:`w` on a grid of stride :math:`k` training steps is ``window`` :math:`= 2\lfloor
w/2\rfloor + 1`, ``window_width`` :math:`= \lfloor w/2\rfloor/k`.  Ties go to the earliest candidate
(the lowest time), as in the authors' ``argmin`` over increasing timesteps.  The first state
:math:`x_T` and the last one are not shifted, nor any state whose scheduled time is at or below
``cutoff``.

One evaluation a step, one draw a step (scaled by zero at :math:`\eta = 0`).  The choice of
:math:`t_s` depends on :math:`x`, so the output is not affine in :math:`x_T` even on a Gaussian
target (``affine=False`` in the registry): its law is not Gaussian.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_finite, check_int, is_concrete
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import (
    Model,
    SamplerInfo,
    check_sampler_arguments,
    finish,
    first_nonfinite,
)
from shufflesgd.diffusion.samplers.ode import ddim, ddim_step

Array = jax.Array


def _check_options(
    x: Any, window: Any, window_width: Any, cutoff: Any, data_variance: Any, eta: Any
) -> int:
    window = check_int("window", window)
    if window % 2 == 0:
        raise ValueError(
            f"window must be odd (the scheduled time is the middle candidate), got window={window}"
        )
    for name, value in (
        ("window_width", window_width),
        ("cutoff", cutoff),
        ("data_variance", data_variance),
        ("eta", eta),
    ):
        check_finite(name, value)
        if is_concrete(value) and np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    if is_concrete(window_width) and not 0.0 <= float(window_width) < 1.0:
        raise ValueError(f"window_width must lie in [0, 1), got window_width={window_width}")
    if is_concrete(data_variance) and not float(data_variance) >= 0.0:
        raise ValueError(f"data_variance must be non-negative, got data_variance={data_variance}")
    if is_concrete(eta) and not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got eta={eta}")
    if np.size(x) < 2:
        raise ValueError(
            "x must have at least two entries (Time-Shift matches their variance), "
            f"got shape {np.shape(x)}"
        )
    return window


def _time_shift(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    window: int,
    window_width: float | Array,
    cutoff: float | Array,
    data_variance: float | Array,
    eta: float | Array,
    final: str,
    noise: Array | None,
) -> tuple[Array, SamplerInfo]:
    check_sampler_arguments(grid, final, x=x, key=key, noise=noise)
    window = _check_options(x, window, window_width, cutoff, data_variance, eta)
    if window == 1:  # one candidate, the scheduled time: DDIM itself, the same program
        return ddim(key, model, sde, x, grid, eta=eta, final=final, noise=noise)
    grid = jnp.asarray(grid)
    num_steps = grid.shape[0] - 1
    half = (window - 1) // 2
    offsets = jnp.arange(-half, half + 1).astype(grid.dtype) / max(half, 1)
    size = np.size(x)

    def couple(x, t_up, t_next, t_low):
        """The candidate time whose forward variance is closest to x's sample variance."""
        up, down = window_width * (t_up - t_next), window_width * (t_next - t_low)
        candidates = t_next + jnp.where(offsets > 0, offsets * up, offsets * down)
        variance = sde.alpha(candidates) ** 2 * data_variance + sde.sigma(candidates) ** 2
        centred = x - jnp.mean(x)
        sample_variance = jnp.sum(centred * centred) / (size - 1)
        return candidates[jnp.argmin(jnp.abs(sample_variance - variance))]

    def body(carry, inputs):
        x, t_s = carry  # the state and the time it is coupled with
        i, t, t_next, t_low = inputs
        x = ddim_step(key, model, sde, eta, noise, x, i, t_s, t_next)
        shift = (t_next > cutoff) & (i < num_steps - 1)
        t_s = jnp.where(shift, couple(x, t, t_next, t_low), t_next)
        return (x, t_s), jnp.all(jnp.isfinite(x))

    lower = jnp.concatenate([grid[2:], grid[-1:]])  # t_{i+2}; the last one is never used
    inputs = (jnp.arange(num_steps), grid[:-1], grid[1:], lower)
    (x, _), finite = jax.lax.scan(body, (x, grid[0]), inputs)
    return finish(model, sde, x, grid, final, jnp.asarray(num_steps), first_nonfinite(finite))


def time_shift_ddim(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    window: int = 5,
    window_width: float | Array = 0.5,
    cutoff: float | Array = 0.0,
    data_variance: float | Array = 0.0,
    eta: float | Array = 0.0,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""TS-DDIM: the Time-Shift sampler (Li, Qu, Yao, Sun & Moens 2024, "Alleviating Exposure
    Bias in Diffusion Models through Sampling with Shifted Time Steps", Alg. 1) on DDIM steps
    (Song, Meng & Ermon 2021, Eq. 12).

    With :math:`t_s` the time the state is coupled with (:math:`t_s = t_0` at the start), step
    :math:`i` predicts :math:`\hat x_0 = D(x, t_s)`, :math:`\hat\varepsilon = (x -
    \alpha_{t_s}\hat x_0)/\sigma_{t_s}` and moves to the scheduled :math:`t_{i+1}`,

    .. math:: x \leftarrow \alpha_{t_{i+1}}\hat x_0 + \sqrt{\sigma_{t_{i+1}}^2 - c^2}\,
              \hat\varepsilon + c z, \qquad
              c^2 = \eta^2\sigma_{t_{i+1}}^2\bigl(\sigma_{t_s}^2 - (\alpha_{t_s}/
              \alpha_{t_{i+1}})^2\sigma_{t_{i+1}}^2\bigr)/\sigma_{t_s}^2,

    (:func:`shufflesgd.diffusion.ddim`'s step from :math:`t_s`); then, while :math:`t_{i+1} >`
    ``cutoff``, the new state is coupled with the candidate of the window around
    :math:`t_{i+1}` whose variance :math:`\alpha_\tau^2\sigma_d^2 + \sigma_\tau^2` is closest to
    the state's sample variance (module docstring: the window, the rule, the mapping from the
    paper's :math:`w`).  ``window=1`` runs :func:`shufflesgd.diffusion.ddim` itself;
    ``window_width=0`` or ``cutoff >= grid[0]`` takes the same steps (equal to round-off: XLA
    may order the sums of a different program differently).

    Options: ``window`` (odd Python int, the number of candidates), ``window_width``
    (:math:`\rho \in [0, 1)`), ``cutoff`` (a time), ``data_variance`` (:math:`\sigma_d^2 \ge 0`,
    the per-entry variance of a data sample; the authors' code uses 0) and ``eta``
    (:math:`[0, 1]`); all but ``window`` may be traced.  One evaluation and one draw a step;
    the final step is :func:`shufflesgd.diffusion.ddim`'s.  ``x`` needs at least two
    entries.  Defaults: ``window=5``, ``window_width=0.5``, ``cutoff=0`` (shift down to the last
    interior grid time), ``data_variance=0``, ``eta=0``, ``final="denoise"`` (one more
    evaluation).  They are not tuned: the paper tunes window and cutoff per dataset and number
    of steps."""
    return _time_shift(
        key, model, sde, x, grid, window, window_width, cutoff, data_variance, eta, final, noise
    )


def time_shift_ddpm(
    key: Array,
    model: Model,
    sde: SDE,
    x: Array,
    grid: Array,
    *,
    window: int = 5,
    window_width: float | Array = 0.5,
    cutoff: float | Array = 0.0,
    data_variance: float | Array = 0.0,
    final: str = "denoise",
    noise: Array | None = None,
) -> tuple[Array, SamplerInfo]:
    r"""TS-DDPM: the Time-Shift sampler (Li, Qu, Yao, Sun & Moens 2024, "Alleviating Exposure
    Bias in Diffusion Models through Sampling with Shifted Time Steps", Alg. 1) on DDPM's
    ancestral steps (Ho, Jain & Abbeel 2020, Alg. 2): :func:`time_shift_ddim` with
    :math:`\eta = 1`, i.e. each step samples the Gaussian posterior
    :math:`q(x_{t_{i+1}} \mid x_{t_s} = x, \hat x_0)` from the coupled time :math:`t_s`.
    ``window=1`` runs :func:`shufflesgd.diffusion.ancestral` itself; ``window_width=0`` or
    ``cutoff >= grid[0]`` takes the same steps.  Options and defaults as :func:`time_shift_ddim`;
    one evaluation and one draw a step."""
    return _time_shift(
        key, model, sde, x, grid, window, window_width, cutoff, data_variance, 1.0, final, noise
    )
