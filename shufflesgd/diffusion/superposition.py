r"""SuperDiff: sampling a superposition of several diffusion models of the same process, with
weights chosen at every step from the models' Itô density estimates.

Skreta, Atanackovic, Bose, Tong & Neklyudov (2024), "The Superposition of Diffusion Models
Using the Itô Density Estimator" (ICLR 2025, arXiv:2412.17762), the SuperDiff algorithm with
its logical OR (mixture) and logical AND (equal density) weights.  (The paper's algorithm,
proposition and equation numbers could not be checked offline; the weights below are derived
here in full, and agree with ``select_kappa`` and ``get_stoch_dll`` of the SuperDiff repository's
public notebook ``notebooks/superposition_edu.ipynb``.)

Given :math:`M \ge 2` score models :math:`s_i \approx \nabla\log q^i_t` of the same linear
process :math:`dx = f x\,dt + g\,dw` (:mod:`shufflesgd.diffusion.processes`), SuperDiff
integrates the reverse SDE of the superposed score by Euler–Maruyama,

.. math:: \Delta x = \Big(f x - g^2\sum_i\kappa_i s_i\Big)\Delta t + g\sqrt{|\Delta t|}\,z,
          \qquad \Delta t < 0,\ \sum_i\kappa_i = 1,

and tracks every model's log-density along the shared path with the Itô density estimator
(:mod:`shufflesgd.diffusion.ito_density`, valid whatever the drift),
:math:`\Delta\log\hat q^i = \langle s_i, \Delta x\rangle + A_i\Delta t` with
:math:`A_i = -d f - f\langle x, s_i\rangle + \frac12 g^2\|s_i\|^2`, starting from
:math:`\log p_{prior}(x_T)` for every model.  The weights :math:`\kappa` of a step are:

* ``"or"`` (mixture): :math:`\kappa = \mathrm{softmax}(\log\hat q^i + \log\omega_i)` with the
  running estimates before the step and mixture weights :math:`\omega` (default uniform).  This
  is the posterior probability of model :math:`i` given :math:`x_t`, and
  :math:`\sum_i\kappa_i\nabla\log q^i_t = \nabla\log\sum_i\omega_i q^i_t`: with exact models and
  estimates the sampler follows the reverse SDE of the mixture :math:`\sum_i\omega_i q^i`.
* ``"and"`` (equal density): the :math:`\kappa` for which every model's estimated
  log-density changes by the same amount over the step, :math:`\Delta\log\hat q^i =
  \Delta\log\hat q^M` for :math:`i < M`, with :math:`\sum\kappa = 1`.  With
  :math:`D_i = s_i - s_M`, :math:`\Delta x = \Delta x_0 - g^2\Delta t\sum_j\kappa_j s_j` and
  :math:`\Delta x_0 = f x\Delta t + g\sqrt{|\Delta t|}\,z`, these :math:`M - 1` linear equations
  :math:`\langle D_i, \Delta x\rangle + (A_i - A_M)\Delta t = 0` in
  :math:`\kappa' = (\kappa_1, \dots, \kappa_{M-1})`, :math:`\kappa_M = 1 - \sum\kappa'`, read

  .. math:: \sum_{j<M}\langle D_i, D_j\rangle\,\kappa'_j
            = \frac{\langle D_i, \Delta x_0\rangle + (A_i - A_M)\Delta t}{g^2\Delta t}
              - \langle D_i, s_M\rangle
            = \tfrac12\|D_i\|^2 - \frac{\langle D_i, z\rangle}{g\sqrt{|\Delta t|}}

  (the :math:`f` terms cancel, and :math:`\frac12(\|s_i\|^2 - \|s_M\|^2) - \langle D_i,
  s_M\rangle = \frac12\|D_i\|^2`).  For two models this is

  .. math:: \kappa_1 = \frac{\langle s_1 - s_2,\ f x\Delta t + g\sqrt{|\Delta t|}z\rangle
            - g^2\Delta t\langle s_1 - s_2, s_2\rangle + (A_1 - A_2)\Delta t}
            {g^2\Delta t\,\|s_1 - s_2\|^2}
            = \frac12 - \frac{\langle s_1 - s_2, z\rangle}{g\sqrt{|\Delta t|}\,\|s_1 - s_2\|^2},

  the authors' ``select_kappa``.  The step it gives is the average-score step with the noise's
  component along :math:`s_1 - s_2` removed: in general the drift uses the circumcentre of the
  scores (the point of their affine hull equidistant from all of them) and the noise is
  projected onto the orthogonal complement of the differences :math:`D_i`.  :math:`\kappa`
  itself is unbounded where the scores nearly agree (high noise), while the step stays bounded.
  The Gram system needs linearly independent differences (:math:`M - 1 \le d`; for two models,
  distinct scores); it is solved by an unrolled Cholesky factorisation.

  What AND equalises is the *estimates*.  The Itô estimator assumes noise of covariance
  :math:`g^2|\Delta t| I`, and the AND step's noise has none along the differences, so the
  Laplacian cancellation of :mod:`shufflesgd.diffusion.ito_density` is incomplete: over a step
  the exact :math:`\log q^i_t(x_t)` moves by the estimated increment plus
  :math:`-\frac12 g^2|\Delta t|\,\hat D^\top\nabla^2\log q^i_t\,\hat D` (two models,
  :math:`\hat D = D_1/\|D_1\|`), in expectation over the step's noise.  The exact gap
  :math:`\log q^1_t - \log q^2_t` therefore stays put only where the two Hessians agree along
  :math:`\hat D` (Gaussians of one covariance, say), and otherwise drifts by the integral of
  :math:`\frac12 g^2\hat D^\top(\nabla^2\log q^2_t - \nabla^2\log q^1_t)\hat D\,|dt|`
  along the path; correcting for it would need the Hessians the estimator avoids.

One step costs :math:`M` model evaluations and one Gaussian draw (draw 0 of the step,
:func:`shufflesgd.diffusion.samplers.base.draw`); the noise convention and ``nonfinite_step``
are those of every sampler (:mod:`shufflesgd.diffusion.samplers.base`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_finite
from shufflesgd.diffusion.ito_density import check_noise, ito_log_density_increment
from shufflesgd.diffusion.processes import SDE, convert
from shufflesgd.diffusion.samplers.base import (
    Model,
    check_model_output,
    check_sampler_arguments,
    draw,
    first_nonfinite,
)

Array = jax.Array


#: The superpositions :func:`superdiff` samples: ``"or"`` (mixture) and ``"and"`` (equal
#: density).
SUPERDIFF_MODES = ("or", "and")


#: The final steps :func:`superdiff` can end with.
SUPERDIFF_FINALS = ("none", "denoise")


class SuperDiffInfo(NamedTuple):
    """Diagnostics of one SuperDiff run: model evaluations (``M`` a step), the first non-finite
    step (-1 if none), the final Itô estimates ``log_densities`` ``[M]`` of every model's
    :math:`\\log q^i` at ``grid[-1]``, and the weights ``kappa`` ``[num_steps, M]`` used at each
    step."""

    nfe: Array
    nonfinite_step: Array
    log_densities: Array
    kappa: Array


def _solve_gram(gram: Array, rhs: Array) -> Array:
    """Solve ``gram @ y = rhs`` for a small symmetric positive definite ``gram`` by an unrolled
    Cholesky factorisation (elementwise operations only, no LAPACK call per point)."""
    n = rhs.shape[0]
    lower = [[None] * n for _ in range(n)]
    for j in range(n):
        diagonal = gram[j, j] - sum(lower[j][k] ** 2 for k in range(j))
        lower[j][j] = jnp.sqrt(diagonal)
        for i in range(j + 1, n):
            off = gram[i, j] - sum(lower[i][k] * lower[j][k] for k in range(j))
            lower[i][j] = off / lower[j][j]
    forward = []
    for i in range(n):
        forward.append((rhs[i] - sum(lower[i][k] * forward[k] for k in range(i))) / lower[i][i])
    solution = [None] * n
    for i in reversed(range(n)):
        rest = sum(lower[k][i] * solution[k] for k in range(i + 1, n))
        solution[i] = (forward[i] - rest) / lower[i][i]
    return jnp.stack(solution)


def and_weights(scores: Array, z: Array, g_sqrt_dt: Array) -> Array:
    r"""The equal-density weights :math:`\kappa` of a SuperDiff AND step (Skreta et al. 2024,
    the linear system of the logical AND; module docstring): the solution of
    :math:`\sum_{j<M}\langle D_i, D_j\rangle\kappa_j = \frac12\|D_i\|^2 - \langle D_i,
    z\rangle/(g\sqrt{|\Delta t|})`, :math:`D_i = s_i - s_M`, completed by
    :math:`\kappa_M = 1 - \sum_{j<M}\kappa_j`.  ``scores`` ``[M, ...]`` are the models' scores
    at the step's point, ``z`` its Gaussian draw and ``g_sqrt_dt`` :math:`= g\sqrt{|\Delta t|}`;
    the same :math:`\kappa` makes every model's Itô increment equal.  With ``z = 0`` these are
    the noise-free weights of the scores' circumcentre (``1/2, 1/2`` for two models)."""
    num_models = scores.shape[0]
    flat = scores.reshape(num_models, -1)
    diffs = flat[:-1] - flat[-1]
    gram = diffs @ diffs.T
    rhs = 0.5 * jnp.diagonal(gram) - (diffs @ z.reshape(-1)) / g_sqrt_dt
    head = _solve_gram(gram, rhs)
    return jnp.concatenate([head, 1.0 - jnp.sum(head, keepdims=True)])


def _superpose(kappa: Array, values: Array) -> Array:
    """:math:`\\sum_i\\kappa_i v_i` written as :math:`v_M + \\sum_{i<M}\\kappa_i(v_i - v_M)`
    (equal when :math:`\\sum\\kappa = 1`), which stays accurate when the AND weights are large
    and of opposite signs."""
    last = values[-1]
    return last + jnp.tensordot(kappa[:-1], values[:-1] - last, axes=1)


def check_superdiff_arguments(
    models: Sequence[Model], mode: str, log_mixture_weights: Any, final: str
) -> int:
    """The checks :func:`superdiff` makes before tracing: at least two :class:`Model` s with
    known outputs, a known ``mode`` and ``final``, and ``log_mixture_weights`` (``"or"`` only)
    of one finite entry per model.  Returns the number of models."""
    if mode not in SUPERDIFF_MODES:
        raise ValueError(f"mode must be one of {list(SUPERDIFF_MODES)}, got {mode!r}")
    if final not in SUPERDIFF_FINALS:
        raise ValueError(f"final must be one of {list(SUPERDIFF_FINALS)}, got {final!r}")
    if isinstance(models, Model) or not isinstance(models, Sequence):
        raise ValueError(
            f"models must be a sequence of Model s to superpose, got {type(models).__name__}"
        )
    if len(models) < 2:
        raise ValueError(f"models must hold at least two Model s, got {len(models)}")
    for model in models:
        if not isinstance(model, Model):
            raise TypeError(f"models must hold Model s, got {type(model).__name__}")
        check_model_output(model.output)
    if log_mixture_weights is not None:
        if mode != "or":
            raise ValueError(
                "log_mixture_weights applies to mode='or' only (the mixture's weights), "
                f"got it with mode={mode!r}"
            )
        shape = tuple(np.shape(log_mixture_weights))
        if shape != (len(models),):
            raise ValueError(
                f"log_mixture_weights must have one entry per model, shape ({len(models)},), "
                f"got shape {shape}"
            )
        check_finite("log_mixture_weights", log_mixture_weights)
    return len(models)


def superdiff(
    key: Array,
    models: Sequence[Model],
    sde: SDE,
    x_T: Array,
    grid: Array,
    *,
    mode: str = "or",
    log_mixture_weights: Array | None = None,
    final: str = "none",
    noise: Array | None = None,
) -> tuple[Array, SuperDiffInfo]:
    r"""Sample a superposition of ``models`` (Skreta et al. 2024, SuperDiff; module docstring):
    Euler–Maruyama on the reverse SDE of :math:`\sum_i\kappa_i s_i` from ``x_T`` down the
    strictly decreasing ``grid``, with the Itô density estimate of each model's
    :math:`\log q^i_t` along the path.

    ``mode="or"``: :math:`\kappa = \mathrm{softmax}(\log\hat q + \log\omega)` with
    ``log_mixture_weights`` :math:`\log\omega` (any finite offsets, normalised by the softmax;
    default uniform, traced), samples of the mixture :math:`\sum_i\omega_i q^i`.
    ``mode="and"``: the :math:`\kappa` of :func:`and_weights`, which keeps all the estimated
    log-densities equal step by step, samples where the models agree.  ``final="none"``
    (default) stops at ``grid[-1]``, where ``info.log_densities`` estimates each
    :math:`\log q^i_{t_N}(x)`; ``"denoise"`` returns Tweedie's :math:`\hat x_0 =
    \sum_i\kappa_i\hat x_0^i` there (:math:`M` more evaluations), with the OR weights at the
    final estimates or, for AND, the noise-free equal-density weights (the scores'
    circumcentre).  One sample per call; ``noise`` ``[num_steps, 1, *x_T.shape]`` replaces the
    draws.  Returns ``(x, SuperDiffInfo)``.

    ``ValueError`` before tracing for an unknown ``mode`` or ``final``, fewer than two
    ``models``, ``log_mixture_weights`` of the wrong length or with ``mode="and"``, a bad grid
    or noise shape; ``TypeError`` for a key that is not a PRNG key (with no ``noise``)."""
    num_models = check_superdiff_arguments(models, mode, log_mixture_weights, final)
    check_sampler_arguments(grid, "none", x=x_T, key=key, noise=noise)
    check_noise(noise, grid, x_T)
    grid = jnp.asarray(grid)
    if log_mixture_weights is None:
        log_w = jnp.zeros(num_models, jnp.result_type(float))
    else:
        log_w = jnp.asarray(log_mixture_weights)

    def scores_at(x, t):
        return jnp.stack([model.predict(sde, x, t, "score") for model in models])

    def body(carry, inputs):
        x, log_q = carry
        i, t, t_next = inputs
        scores = scores_at(x, t)
        dt = t_next - t
        g2 = sde.diffusion_squared(t)
        g_sqrt_dt = jnp.sqrt(g2 * -dt)
        z = draw(key, noise, i, 0, x)
        if mode == "or":
            kappa = jax.nn.softmax(log_q + log_w)
        else:
            kappa = and_weights(scores, z, g_sqrt_dt)
        dx = sde.reverse_drift(x, t, _superpose(kappa, scores)) * dt + g_sqrt_dt * z
        x_next = x + dx
        log_q = log_q + jax.vmap(lambda s: ito_log_density_increment(sde, s, x, x_next, t, t_next))(
            scores
        )
        finite = jnp.all(jnp.isfinite(x_next)) & jnp.all(jnp.isfinite(log_q))
        return (x_next, log_q), (kappa, finite)

    num_steps = grid.shape[0] - 1
    prior = sde.prior_log_prob(x_T.reshape(-1))
    start = (x_T, jnp.full((num_models,), prior))
    (x, log_q), (kappa, finite) = jax.lax.scan(
        body, start, (jnp.arange(num_steps), grid[:-1], grid[1:])
    )
    bad = first_nonfinite(finite)
    nfe = num_models * num_steps
    if final == "denoise":
        t_last = grid[-1]
        outputs = [(model.fn(x, t_last), model.output) for model in models]
        predictions = jnp.stack([convert(o, kind, "x0", x, t_last, sde) for o, kind in outputs])
        if mode == "or":
            weights = jax.nn.softmax(log_q + log_w)
        else:
            scores = jnp.stack([convert(o, kind, "score", x, t_last, sde) for o, kind in outputs])
            weights = and_weights(scores, jnp.zeros_like(x), 1.0)
        x = _superpose(weights, predictions)
        nfe += num_models
        bad = jnp.where((bad < 0) & ~jnp.all(jnp.isfinite(x)), num_steps, bad)
    info = SuperDiffInfo(jnp.asarray(nfe, jnp.int32), bad.astype(jnp.int32), log_q, kappa)
    return x, info
