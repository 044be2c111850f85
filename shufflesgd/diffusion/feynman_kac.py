r"""Feynman–Kac correctors: weighted reverse-SDE particles for annealed, product and
classifier-free-guidance targets built from several models' scores.

Skreta, Akhound-Sadegh, Ohanesian, Bondesan, Aspuru-Guzik, Doucet, Brekelmans, Tong &
Neklyudov (2025), "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of
Experts", ICML 2025, arXiv:2503.02819.  The paper's propositions for annealing, products and
CFG are the special cases below; its equation and proposition numbers could not be checked
offline, so none are quoted.

Target.  :math:`M \ge 1` models share one linear process :math:`dx = f(t)x\,dt + g(t)\,dW`
(the ``sde``); model :math:`i` gives the score :math:`s_i = \nabla\log p^{(i)}_t` of its
marginals.  With exponents :math:`\beta_i` (``exponents``) the target path is the geometric
combination

.. math:: q_t(x) \propto \prod_i p^{(i)}_t(x)^{\beta_i},

which at :math:`t \to 0` is the annealed law :math:`p^\beta` (:math:`M = 1`), the product of
experts :math:`p_1 p_2` (:math:`\beta = (1, 1)`) or the exact classifier-free-guidance target
:math:`p(x \mid c)^\gamma p(x)^{1-\gamma}` (conditional and unconditional branches,
:math:`\beta = (\gamma, 1-\gamma)`).  Simulating the reverse SDE with the combined score
:math:`S = \sum_i\beta_i s_i` does not follow :math:`q_t` (the combined score is not the score
of a diffused law); the weights below correct it exactly in continuous time.

Derivation (the Feynman–Kac PDE argument of the paper).  The Fokker–Planck equation of the
forward process gives, for each model,

.. math:: \partial_t\log p_i = -d f - f x\cdot s_i + \tfrac12 g^2(\nabla\cdot s_i + \|s_i\|^2),

so :math:`\log\tilde q_t = \sum_i\beta_i\log p_i` evolves by
:math:`\partial_t\log\tilde q = -(\textstyle\sum\beta)d f - f x\cdot S + \frac12 g^2
(\nabla\cdot S + \sum_i\beta_i\|s_i\|^2)`.  In reverse time :math:`\tau = T - t` the simulated
SDE :math:`dx = [-f x + g^2 S]\,d\tau + g\,d\bar W` has Fokker–Planck operator
:math:`\mathcal L^*\tilde q/\tilde q = d f + f x\cdot S - \frac12 g^2\nabla\cdot S -
\frac12 g^2\|S\|^2` on :math:`\tilde q`, and the Feynman–Kac formula weights each path by
:math:`\exp\int(\partial_\tau\log\tilde q - \mathcal L^*\tilde q/\tilde q)\,d\tau`.  The
divergences (Laplacians) cancel, leaving

.. math:: d\log w = \tfrac12 g(t)^2\Big(\big\|\textstyle\sum_i\beta_i s_i\big\|^2
          - \textstyle\sum_i\beta_i\|s_i\|^2\Big)\,ds, \qquad ds = t - t_{next} > 0,

plus :math:`(\sum\beta - 1)d f\,ds`, common to every particle and dropped under
self-normalisation.  Special cases: annealing,
:math:`\frac12 g^2\beta(\beta - 1)\|s\|^2`; product of experts,
:math:`g^2\langle s_1, s_2\rangle`; CFG, :math:`\frac12 g^2\gamma(\gamma - 1)
\|s_c - s_u\|^2`.

Discretisation.  Each step is Euler–Maruyama on the reverse SDE with the combined score,
:math:`x \leftarrow x + [f x - g^2 S](t_{next} - t) + g\sqrt{t - t_{next}}\,z`, and the weight
increment above evaluated at the state before the move (the left point: the same score
evaluations as the drift, no extra NFE), followed by one adaptive SMC step
(:func:`shufflesgd.diffusion.smc.step`: reweight, update the evidence, resample when the
ESS falls below ``ess_threshold`` :math:`\cdot N`).  The particles start from the process
prior :math:`N(0, \sigma_T^2 I)`, while :math:`q_T \propto \text{prior}^{\sum\beta}` (each
:math:`p^{(i)}_T` is taken to be the prior), so the initial log-weight
:math:`(\sum_i\beta_i - 1)\log\text{prior}(x_T)` is added to the first step's increment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_finite, check_float_array
from shufflesgd.diffusion import smc
from shufflesgd.diffusion.processes import SDE, convert
from shufflesgd.diffusion.samplers.base import (
    Model,
    check_model_output,
    check_sampler_arguments,
    draw,
    first_nonfinite,
)
from shufflesgd.diffusion.samplers.sde import euler_maruyama_step

Array = jax.Array


#: The final steps :func:`feynman_kac_corrector` offers (its ``final`` argument).
FK_FINALS = ("none", "denoise")


class FKInfo(NamedTuple):
    """Diagnostics of one :func:`feynman_kac_corrector` run.

    Attributes:
      nfe: model evaluations per particle: :math:`M` a step, plus :math:`M` for
        ``final="denoise"``.
      ess: ``[num_steps]``, each step's effective sample size after reweighting, before
        resampling.
      resampled: ``bool[num_steps]``, whether each step resampled.
      num_resampling: how many steps resampled.
      nonfinite_step: the first step whose particles or weights are not finite (a particle
        with a non-finite entry, a NaN or :math:`+\\infty` log-weight, or a non-finite
        log-evidence), ``num_steps`` if only the final denoising is, -1 if none.
      log_normalizer: the SMC log-evidence estimate (up to the dropped constants).
    """

    nfe: Array
    ess: Array
    resampled: Array
    num_resampling: Array
    nonfinite_step: Array
    log_normalizer: Array


def _check_models(models: Any) -> tuple[Model, ...]:
    if isinstance(models, Model) or not isinstance(models, Sequence):
        raise TypeError(f"models must be a sequence of Model, got models: {type(models).__name__}")
    if len(models) == 0:
        raise ValueError("models must hold at least one Model, got an empty sequence")
    for i, model in enumerate(models):
        if not isinstance(model, Model):
            raise TypeError(f"models[{i}] must be a Model, got {type(model).__name__}")
        check_model_output(model.output)
    return tuple(models)


def _check_arguments(
    key: Any,
    models: Any,
    exponents: Any,
    x_T: Any,
    grid: Any,
    scheme: str,
    ess_threshold: Any,
    final: str,
) -> tuple[Model, ...]:
    models = _check_models(models)
    if np.shape(exponents) != (len(models),):
        raise ValueError(
            f"exponents must have shape ({len(models)},), one per model, got shape "
            f"{np.shape(exponents)}"
        )
    check_finite("exponents", exponents)
    if final not in FK_FINALS:
        raise ValueError(f"final must be one of {list(FK_FINALS)}, got final={final!r}")
    check_sampler_arguments(grid, final, key=key)
    check_float_array("x_T", x_T)
    if np.ndim(x_T) < 1 or np.shape(x_T)[0] < 1:
        raise ValueError(
            f"x_T must have a leading particle axis of length N >= 1, got shape {np.shape(x_T)}"
        )
    smc.check_scheme(scheme)
    smc.check_ess_threshold(ess_threshold)
    return models


def _squared_norms(v: Array) -> Array:
    """Per-particle squared norms of ``v`` of shape ``[N, *shape]``."""
    return jnp.sum(jnp.reshape(v, (v.shape[0], -1)) ** 2, axis=-1)


def feynman_kac_corrector(
    key: Array,
    models: Sequence[Model],
    exponents: Array,
    sde: SDE,
    x_T: Array,
    grid: Array,
    *,
    scheme: str = "systematic",
    ess_threshold: float | Array = 0.5,
    final: str = "none",
) -> tuple[Array, Array, FKInfo]:
    r"""Feynman–Kac corrector for :math:`q_t \propto \prod_i p^{(i)}_t(x)^{\beta_i}` (Skreta et
    al. 2025, "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product of
    Experts", arXiv:2503.02819; the derivation and the weights are in the module docstring):
    ``(particles, log_weights, info)``.

    ``models`` are the :math:`M` models (:class:`~shufflesgd.diffusion.Model`: each a
    per-sample function of ``(x, t)``, converted to a score), ``exponents`` the
    :math:`\beta_i` (an array of shape ``[M]``, traced allowed), ``x_T`` the ``[N, *shape]``
    particles at ``grid[0]`` (from ``sde.prior_sample``), ``grid`` a strictly decreasing time
    grid.  Each step of one
    ``lax.scan`` evaluates the :math:`M` scores at the current particles, moves them by
    Euler–Maruyama with :math:`S = \sum_i\beta_i s_i`,

    .. math:: x \leftarrow x + [f x - g^2 S](t_{next} - t) + g\sqrt{t - t_{next}}\,z,

    and runs :func:`shufflesgd.diffusion.smc.step` with the increments
    :math:`\frac12 g(t)^2(\|S\|^2 - \sum_i\beta_i\|s_i\|^2)(t - t_{next})` (plus
    :math:`(\sum_i\beta_i - 1)\log\text{prior}(x_T)` at the first step), resampling with
    ``scheme`` when the ESS falls below ``ess_threshold`` :math:`\cdot N` (traced allowed).
    ``final="denoise"`` maps the particles to the :math:`x_0` prediction of the combined score
    at ``grid[-1]`` (Tweedie's formula through :func:`~shufflesgd.diffusion.convert`; :math:`M`
    more evaluations); ``"none"`` stops at ``grid[-1]``.  The returned log-weights are
    self-normalised: weighted averages over the particles estimate expectations under
    :math:`q_{t_{min}}` (its :math:`x_0` image for ``"denoise"``).

    Noise.  Particle slot :math:`n` at step :math:`i` draws
    ``normal(fold_in(fold_in(fold_in(fold_in(key, 0), n), i), 0))``: exactly what
    :func:`~shufflesgd.diffusion.euler_maruyama` draws with key ``fold_in(fold_in(key, 0), n)``
    (base.py's convention, as :func:`~shufflesgd.diffusion.sample_batch` gives row :math:`n`),
    independent of :math:`N`; without resampling (``ess_threshold=0``) the particles are those
    Euler–Maruyama samples of the combined score.  Step :math:`i` resamples with
    ``fold_in(fold_in(key, 1), i)``.

    ``info`` (:class:`FKInfo`) reports the NFE, each step's ESS and resampling, and the first
    non-finite step.  Checks before anything is traced: ``TypeError`` for a bad ``key``, a
    non-float ``x_T`` or ``models`` that are not a sequence of ``Model``; ``ValueError`` for
    empty ``models``, ``exponents`` not of shape ``[M]`` or not finite, fewer than one particle,
    a bad ``grid``, ``final``, ``scheme`` or ``ess_threshold``.
    """
    models = _check_arguments(key, models, exponents, x_T, grid, scheme, ess_threshold, final)
    grid = jnp.asarray(grid)
    x_T = jnp.asarray(x_T)
    exponents = jnp.asarray(exponents, x_T.dtype)
    n = x_T.shape[0]
    move_key, resample_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    particle_keys = jax.vmap(lambda i: jax.random.fold_in(move_key, i))(jnp.arange(n))
    initial = (jnp.sum(exponents) - 1.0) * sde.prior_log_prob(jnp.reshape(x_T, (n, -1)))

    def scores(x: Array, t: Array) -> tuple[list[Array], Array]:
        each = [jax.vmap(lambda xi, m=m: m.predict(sde, xi, t, "score"))(x) for m in models]
        return each, sum(exponents[i] * s for i, s in enumerate(each))

    def body(state: smc.SMCState, inputs: tuple[Array, Array, Array]):
        i, t, t_next = inputs
        x = state.particles
        each, combined = scores(x, t)
        dt = t_next - t
        g2 = sde.diffusion_squared(t)
        spread = _squared_norms(combined) - sum(
            exponents[j] * _squared_norms(s) for j, s in enumerate(each)
        )
        increments = 0.5 * g2 * -dt * spread + jnp.where(i == 0, initial, 0.0)
        z = jax.vmap(lambda k, xi: draw(k, None, i, 0, xi))(particle_keys, x)
        x = euler_maruyama_step(sde, x, t, t_next, combined, z)
        state, info = smc.step(
            jax.random.fold_in(resample_key, i),
            state._replace(particles=x),
            increments,
            scheme=scheme,
            ess_threshold=ess_threshold,
        )
        finite = (
            jnp.all(jnp.isfinite(state.particles))
            & ~jnp.any(jnp.isnan(state.log_weights) | (state.log_weights == jnp.inf))
            & jnp.isfinite(state.log_normalizer)
        )
        return state, (info.ess, info.resampled, finite)

    num_steps = grid.shape[0] - 1
    steps = (jnp.arange(num_steps), grid[:-1], grid[1:])
    state, (ess, resampled, finite) = jax.lax.scan(body, smc.init(x_T), steps)
    x, bad, nfe = state.particles, first_nonfinite(finite), len(models) * num_steps
    if final == "denoise":
        combined = scores(x, grid[-1])[1]
        x = convert(combined, "score", "x0", x, grid[-1], sde)
        nfe += len(models)
        bad = jnp.where((bad < 0) & ~jnp.all(jnp.isfinite(x)), num_steps, bad)
    info = FKInfo(
        jnp.asarray(nfe, jnp.int32),
        ess,
        resampled,
        jnp.sum(resampled).astype(jnp.int32),
        bad.astype(jnp.int32),
        state.log_normalizer,
    )
    return x, state.log_weights, info


def resample_final(
    key: Array, particles: Array, log_weights: Array, scheme: str = "systematic"
) -> Array:
    r"""Equally weighted particles from a weighted system: ``particles[ancestors]`` with the
    ancestors of :func:`shufflesgd.diffusion.smc.resample` (Douc, Cappé & Moulines 2005,
    "Comparison of resampling schemes for particle filtering"), so that the output of
    :func:`feynman_kac_corrector` can be fed to sample-based metrics (sliced Wasserstein,
    MMD).  Particle :math:`n` appears :math:`N\bar w_n` times in expectation.  ``TypeError``
    for a bad ``key``; ``ValueError`` for an unknown ``scheme``, ``log_weights`` not of shape
    ``[N]`` or ``particles`` without a leading axis of that length."""
    if np.shape(particles)[:1] != np.shape(log_weights) or np.ndim(log_weights) != 1:
        raise ValueError(
            f"particles must have a leading axis of the length of log_weights, got shapes "
            f"particles {np.shape(particles)} and log_weights {np.shape(log_weights)}"
        )
    return jnp.asarray(particles)[smc.resample(key, log_weights, scheme)]
