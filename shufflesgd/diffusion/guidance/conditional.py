r"""Conditional models: one network, a class label as its condition, and the unconditional
branch under a reserved label.

A :class:`ConditionalModel` is ``fn(x, t, label)`` and the kind of output it predicts (one of
:data:`~shufflesgd.diffusion.MODEL_OUTPUTS`).  ``label`` is an integer scalar; the label
:data:`NULL_LABEL` asks for the unconditional branch, which a network learns by label dropout
(Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Alg. 1: the label is replaced by the
null token with probability :math:`p_{uncond}` during training).  :meth:`ConditionalModel.branches`
evaluates the conditional and unconditional branches in one batched call (``vmap`` over the two
labels), which is how every guidance method of :mod:`shufflesgd.diffusion.guidance` spends its
evaluations; :meth:`~ConditionalModel.given` and :meth:`~ConditionalModel.unconditional` are the
plain :class:`~shufflesgd.diffusion.Model` of one branch, for any sampler.

:func:`conditional_mixture_model` is the exact conditional model of a
:class:`~shufflesgd.problems.ConditionalMixture` under any linear process: the analytic test
bed of guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from shufflesgd.diffusion.processes import SDE, convert
from shufflesgd.diffusion.samplers.base import Model, check_model_output, mixture_model
from shufflesgd.problems.mixtures import ConditionalMixture

Array = jax.Array

#: The label that selects a conditional model's unconditional branch.
NULL_LABEL = -1


class ConditionalModel(NamedTuple):
    """A network (or closed form) ``fn(x, t, label)`` and what it predicts, one of
    ``MODEL_OUTPUTS``; ``label`` :data:`NULL_LABEL` is the unconditional branch."""

    fn: Callable[[Array, Array, Array], Array]
    output: str

    def branches(self, x: Array, t: Array, label: Array) -> tuple[Array, Array]:
        """The conditional and unconditional outputs at ``(x, t)``, in one batched call."""
        labels = jnp.stack([jnp.asarray(label, jnp.int32), jnp.asarray(NULL_LABEL, jnp.int32)])
        out = jax.vmap(lambda c: self.fn(x, t, c))(labels)
        return out[0], out[1]

    def predict_branches(
        self, sde: SDE, x: Array, t: Array, label: Array, target: str
    ) -> tuple[Array, Array]:
        """:meth:`branches` converted to the output ``target`` (:func:`convert`)."""
        cond, uncond = self.branches(x, t, label)
        return (
            convert(cond, self.output, target, x, t, sde),
            convert(uncond, self.output, target, x, t, sde),
        )

    def given(self, label: Array) -> Model:
        """The conditional branch for ``label`` as a plain :class:`Model`."""
        return Model(lambda x, t: self.fn(x, t, jnp.asarray(label, jnp.int32)), self.output)

    def unconditional(self) -> Model:
        """The unconditional branch as a plain :class:`Model`."""
        return self.given(NULL_LABEL)


def check_conditional_model(model: Any) -> None:
    """``TypeError`` unless ``model`` is a :class:`ConditionalModel`; ``ValueError`` for an
    unknown output."""
    if not isinstance(model, ConditionalModel):
        raise TypeError(
            "model must be a ConditionalModel (fn(x, t, label), output), "
            f"got {type(model).__name__}"
        )
    check_model_output(model.output)


def check_label(label: Any) -> None:
    """``TypeError`` unless ``label`` is an integer scalar (it may be traced)."""
    dtype = getattr(label, "dtype", None)
    integer = (
        jnp.issubdtype(dtype, jnp.integer)
        if dtype is not None
        else isinstance(label, int) and not isinstance(label, bool)
    )
    if not integer or jnp.ndim(label) != 0:
        raise TypeError(f"label must be an integer scalar (a class, or NULL_LABEL), got {label!r}")


def conditional_mixture_model(
    sde: SDE, mixture: ConditionalMixture, output: str = "score"
) -> ConditionalModel:
    r"""The exact conditional model of a class-conditional mixture: label :math:`c` gives the
    score (or flow-matching velocity, ``output="velocity"``) of the forward marginal of
    :math:`p(x \mid c)`, :data:`NULL_LABEL` that of the unconditional law (see
    :func:`~shufflesgd.diffusion.mixture_model`).  The mixtures are put in their eigenbases
    once, here (concrete arrays only)."""
    with jax.ensure_compile_time_eval():
        components = mixture.mixture.eigen()
        unconditional = mixture_model(sde, mixture.unconditional.eigen(), output)

    def fn(x: Array, t: Array, label: Array) -> Array:
        label = jnp.asarray(label, jnp.int32)
        # The null label would mask every component: evaluate class 0 there and discard it.
        safe = jnp.where(label == NULL_LABEL, 0, label)
        law = components._replace(log_weights=mixture.class_log_weights(safe))
        cond = mixture_model(sde, law, output).fn(x, t)
        return jnp.where(label == NULL_LABEL, unconditional.fn(x, t), cond)

    return ConditionalModel(fn, output)
