r"""Guidance transforms: a :class:`~shufflesgd.diffusion.guidance.ConditionalModel`, a label and
a guidance scale :math:`\gamma` in, a plain :class:`~shufflesgd.diffusion.Model` out, so that
every sampler of :mod:`shufflesgd.diffusion.samplers` runs guided without knowing it.

Each call of the guided model evaluates both branches in one batched call
(:meth:`~shufflesgd.diffusion.guidance.ConditionalModel.branches`): a sampler's ``info.nfe``
counts calls, and the network evaluations are twice that.  The scale is written as in Bradley &
Nakkiran (2024): :math:`\gamma = 1` is the conditional model, :math:`\gamma = 0` the
unconditional one, and Ho & Salimans' weight is :math:`w = \gamma - 1`.  It may be traced, so
one compiled sampler serves a sweep over scales.

* :func:`classifier_free_guidance`: :math:`\hat y = \hat y_u + \gamma(\hat y_c - \hat y_u)`
  (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Eq. 6), the score of the noised
  γ-powered law :math:`p_t(x \mid c)^\gamma p_t(x)^{1-\gamma}` (an affine combination with
  weights summing to one, hence the same in every output parameterisation);
* :func:`rescaled_guidance`: the CFG output rescaled to the standard deviation of the
  conditional one (Lin, Liu, Li & Yang 2024, "Common Diffusion Noise Schedules and Sample Steps
  are Flawed", Sec. 3.4, Alg. 2);
* :func:`adaptive_guidance`: guidance switched off where the two branches agree (Castillo,
  Kazemi, ... & Kohler 2023, "Adaptive Guidance: Training-free Acceleration of Conditional
  Diffusion Models", arXiv:2312.12487);
* :func:`projected_guidance`: APG, the guidance update rescaled and split into its components
  parallel and orthogonal to the conditional prediction, the parallel one down-weighted (Sadat,
  Hilliges & Weber 2024, "Eliminating Oversaturation and Artifacts of High Guidance Scales in
  Diffusion Models", Sec. 3-4).

:data:`GUIDANCE` names them for :func:`guided_model`, which validates everything before
anything is traced.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import is_concrete
from shufflesgd.diffusion.guidance.conditional import (
    ConditionalModel,
    check_conditional_model,
    check_label,
)
from shufflesgd.diffusion.processes import MODEL_OUTPUTS, SDE, convert
from shufflesgd.diffusion.samplers.base import Model

Array = jax.Array


def check_scale(scale: Any) -> None:
    """``ValueError`` unless a concrete guidance ``scale`` is finite and non-negative."""
    if is_concrete(scale) and not (np.isfinite(scale) and float(scale) >= 0.0):
        raise ValueError(f"scale must be finite and >= 0 (gamma = 1 is unguided), got {scale!r}")


def _check_guidance(model: Any, label: Any, scale: Any) -> None:
    check_conditional_model(model)
    check_label(label)
    check_scale(scale)


def _check_in(name: str, value: Any, low: float, high: float) -> None:
    if is_concrete(value) and not (np.isfinite(value) and low <= float(value) <= high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {name}={value!r}")


def _combine(cond: Array, uncond: Array, scale: Array) -> Array:
    return uncond + scale * (cond - uncond)


def classifier_free_guidance(model: ConditionalModel, label: Array, scale: Array) -> Model:
    r"""Classifier-free guidance (Ho & Salimans 2022, Eq. 6): :math:`\hat y_u + \gamma(\hat y_c
    - \hat y_u)` in the model's own output.  For a score model this is :math:`\gamma\nabla\log
    p_t(x \mid c) + (1-\gamma)\nabla\log p_t(x)`, the score of :math:`p_t(x \mid c)^\gamma
    p_t(x)^{1-\gamma}` at every :math:`t`: not the noised γ-powered data law, which is why
    samplers driven by it miss :math:`p(x \mid c)^\gamma p(x)^{1-\gamma}` (Bradley & Nakkiran
    2024).  ``scale`` (:math:`\gamma`) may be traced."""
    _check_guidance(model, label, scale)

    def fn(x: Array, t: Array) -> Array:
        return _combine(*model.branches(x, t, label), scale)

    return Model(fn, model.output)


def rescaled_guidance(
    model: ConditionalModel,
    label: Array,
    scale: Array,
    *,
    sde: SDE,
    rescale: Array = 0.7,
    space: str | None = None,
) -> Model:
    r"""Guidance rescale (Lin, Liu, Li & Yang 2024, Sec. 3.4, Eqs. 15-16, Alg. 2): with
    :math:`\hat y_{cfg}` the CFG output, :math:`\hat y_{re} = \hat y_{cfg}\,\mathrm{std}(\hat
    y_c)/\mathrm{std}(\hat y_{cfg})` and the output :math:`\phi\hat y_{re} + (1-\phi)\hat
    y_{cfg}`, standard deviations over every entry of the sample.  ``rescale`` is
    :math:`\phi\in[0, 1]` (``0`` is plain CFG); ``space`` is the parameterisation it acts in
    (one of ``MODEL_OUTPUTS``; default the model's own, which is what diffusers'
    ``rescale_noise_cfg`` does with a network's output; the paper's models predict :math:`v`).
    The rescaling is not affine in the output, so the space matters; ``sde`` converts into
    it.  ``scale`` and ``rescale`` may be traced."""
    _check_guidance(model, label, scale)
    _check_in("rescale", rescale, 0.0, 1.0)
    space = model.output if space is None else space
    if space not in MODEL_OUTPUTS:
        raise ValueError(f"space must be one of {list(MODEL_OUTPUTS)}, got space={space!r}")

    def fn(x: Array, t: Array) -> Array:
        cond, uncond = model.predict_branches(sde, x, t, label, space)
        guided = _combine(cond, uncond, scale)
        rescaled = guided * jnp.std(cond) / jnp.std(guided)
        return rescale * rescaled + (1.0 - rescale) * guided

    return Model(fn, space)


def adaptive_guidance(
    model: ConditionalModel,
    label: Array,
    scale: Array,
    *,
    sde: SDE,
    threshold: Array,
) -> Model:
    r"""Adaptive guidance (Castillo et al. 2023, Sec. 4): guidance is switched off, leaving the
    conditional output alone, where the cosine similarity of the two branches'
    :math:`\varepsilon` predictions reaches ``threshold`` :math:`\bar\gamma`; CFG elsewhere.
    The branches agree late in sampling (small noise), so guidance stops there.  The paper makes
    the switch once per trajectory and then drops the unconditional branch to save its
    evaluations; a model transform has no memory across calls, so here the criterion is
    evaluated at every call (the same decision wherever the similarity grows along the
    trajectory), both branches are evaluated, and the saving is reported, not taken:
    :func:`guidance_is_off` is the criterion.  ``scale`` and ``threshold`` may be traced."""
    _check_guidance(model, label, scale)
    _check_in("threshold", threshold, -1.0, 1.0)

    def fn(x: Array, t: Array) -> Array:
        cond, uncond = model.branches(x, t, label)
        eps = [convert(out, model.output, "eps", x, t, sde) for out in (cond, uncond)]
        off = _cosine(*eps) >= threshold
        return jnp.where(off, cond, _combine(cond, uncond, scale))

    return Model(fn, model.output)


def guidance_is_off(
    model: ConditionalModel, sde: SDE, x: Array, t: Array, label: Array, threshold: Array
) -> Array:
    r"""Adaptive guidance's criterion (Castillo et al. 2023): whether
    :math:`\cos(\hat\varepsilon_c, \hat\varepsilon_u) \ge \bar\gamma` at ``(x, t)``."""
    return _cosine(*model.predict_branches(sde, x, t, label, "eps")) >= threshold


def _cosine(a: Array, b: Array) -> Array:
    return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


def projected_guidance(
    model: ConditionalModel,
    label: Array,
    scale: Array,
    *,
    sde: SDE,
    parallel_weight: Array = 0.0,
    radius: Array = jnp.inf,
) -> Model:
    r"""Adaptive projected guidance, APG (Sadat, Hilliges & Weber 2024, Sec. 3-4, Alg. 1), on
    the denoised predictions :math:`D_c, D_u` (:math:`x_0` outputs): the update
    :math:`\Delta = D_c - D_u` is rescaled to norm at most :math:`r` (``radius``),
    :math:`\Delta \leftarrow \Delta\min(1, r/\|\Delta\|)`, split into
    :math:`\Delta_\parallel = (\langle\Delta, D_c\rangle/\|D_c\|^2) D_c` and
    :math:`\Delta_\perp = \Delta - \Delta_\parallel`, and the output is
    :math:`D_c + (\gamma - 1)(\Delta_\perp + \eta\Delta_\parallel)` with :math:`\eta` the
    ``parallel_weight``.  :math:`\eta = 1, r = \infty` is CFG.  The paper's optional reverse
    momentum on :math:`\Delta` needs a memory across sampler steps that a model transform does
    not have, and is left out.  Norms are over every entry of the sample; ``scale``,
    ``parallel_weight`` and ``radius`` may be traced."""
    _check_guidance(model, label, scale)
    if is_concrete(radius) and not float(radius) > 0.0:
        raise ValueError(f"radius must be positive, got radius={radius!r}")
    if is_concrete(parallel_weight) and not np.isfinite(parallel_weight):
        raise ValueError(f"parallel_weight must be finite, got parallel_weight={parallel_weight!r}")

    def fn(x: Array, t: Array) -> Array:
        cond, uncond = model.predict_branches(sde, x, t, label, "x0")
        delta = cond - uncond
        norm = jnp.linalg.norm(delta)
        delta = delta * jnp.minimum(1.0, radius / jnp.where(norm > 0, norm, 1.0))
        parallel = jnp.vdot(delta, cond) / jnp.vdot(cond, cond) * cond
        return cond + (scale - 1.0) * (delta - parallel + parallel_weight * parallel)

    return Model(fn, "x0")


#: The guidance transforms by name, as :func:`guided_model` takes them.
GUIDANCE: dict[str, Callable[..., Model]] = {
    "cfg": classifier_free_guidance,
    "rescaled": rescaled_guidance,
    "adaptive": adaptive_guidance,
    "apg": projected_guidance,
}


def guided_model(
    method: str,
    model: ConditionalModel,
    label: Array,
    scale: Array,
    *,
    sde: SDE,
    **options: Any,
) -> Model:
    """The guided :class:`Model` of ``method`` (one of :data:`GUIDANCE`) with its ``options``;
    ``ValueError`` for an unknown method, ``TypeError`` for an option it does not take, both
    before anything is traced."""
    if method not in GUIDANCE:
        raise ValueError(f"method must be one of {sorted(GUIDANCE)}, got method={method!r}")
    transform = GUIDANCE[method]
    parameters = inspect.signature(transform).parameters
    taken = {name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(options) - taken)
    if unknown:
        raise TypeError(
            f"{method} guidance has no option {unknown}; its options are {sorted(taken)}"
        )
    if "sde" in taken:
        options["sde"] = sde
    return transform(model, label, scale, **options)
