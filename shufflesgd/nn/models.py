r"""Small networks for the real-data studies, as descriptions driven through pure functions.

The networks themselves are Flax NNX modules (:mod:`shufflesgd.nn.networks`).  What the
studies and :mod:`shufflesgd.nn.training` hold is a *model*: a frozen, hashable description
of a network (its architecture's hyper-parameters, without input sizes or parameters) with a
method ``build(*inputs, rngs)`` that constructs the NNX module for inputs shaped like
``inputs``.  A model is used only through two pure functions:

* :func:`init_model` ``(model, key, *inputs) -> (params, batch_stats)``;
* :func:`apply_model` ``(model, params, batch_stats, *inputs, train) -> (output,
  new_batch_stats)``.

``params`` and ``batch_stats`` are plain nested dicts of arrays (string keys): the
``nnx.Param`` and ``nnx.BatchStat`` states of the NNX module (``nnx.split``), so a training
step stays a pure, jitted function of pytrees ``(params, opt_state, batch_stats, batch,
key)`` whose state is checkpointed leaf by leaf, and the algorithms depend on neither NNX
nor Linen.  :func:`apply_model` rebuilds the module with ``nnx.merge`` from the model's
graph definition (obtained once per model and input shapes by ``nnx.eval_shape``, which
creates no arrays).  Models without BatchNorm have ``batch_stats == {}``.  Every model takes
a keyword ``train``: BatchNorm normalises with the statistics of the current batch and
updates its running averages when ``train`` is true, and uses the running averages when it
is false (Ioffe & Szegedy 2015); models without BatchNorm accept and ignore it, so every
model is driven the same way.

Classifiers map images ``[B, H, W, C]`` (or vectors ``[B, d]``) to logits ``[B, K]``:
:class:`MLP`, :class:`CNN` (each with or without BatchNorm) and :class:`LinearBatchNorm`,
the linear network with batch-normalised inputs of Wu, Yun & Sra (ICML 2023), "On the
Training Instability of Shuffling SGD with Batch Normalization".  Score networks map
``(x_t, t)`` to an output shaped like ``x_t`` (an :math:`\varepsilon` or score
prediction, see :mod:`shufflesgd.diffusion.processes`): :class:`ScoreMLP` for 2-D data and
:class:`UNet` for small images, both conditioned on :func:`sinusoidal_embedding` of
:math:`t`, and :class:`ConditionalScoreMLP`, a :class:`ScoreMLP` conditioned on a class label
too; :class:`EDMPreconditioned` wraps either in the input and output scalings of
Karras et al. (2022) for a process :math:`x_t = \alpha(t) x_0 + \sigma(t)\varepsilon`, around
an :math:`\varepsilon` or a flow-matching velocity output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from shufflesgd._checks import check_key
from shufflesgd.diffusion.processes import SDE
from shufflesgd.nn import networks
from shufflesgd.nn.networks import (
    BN_EPSILON,
    BN_MOMENTUM,
    PRECONDITIONED_OUTPUTS,
    check_unet_input,
    sinusoidal_embedding,
)

PyTree = Any

__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "CNN",
    "MLP",
    "PRECONDITIONED_OUTPUTS",
    "ConditionalScoreMLP",
    "EDMPreconditioned",
    "LinearBatchNorm",
    "Model",
    "ScoreMLP",
    "UNet",
    "apply_model",
    "count_params",
    "init_model",
    "sinusoidal_embedding",
]


class Model(Protocol):
    """A hashable description of a network: ``build(*inputs, rngs)`` returns the
    :class:`flax.nnx.Module` for inputs shaped like ``inputs`` (arrays or
    ``jax.ShapeDtypeStruct``), called as ``module(*inputs, train=...)``."""

    def build(self, *inputs: Any, rngs: nnx.Rngs) -> nnx.Module: ...


def _pure(state: nnx.State) -> PyTree:
    """A state as a nested dict of arrays with string keys (list indices become ``"0"``...)."""

    def convert(node: Any) -> Any:
        if isinstance(node, dict):
            return {str(name): convert(value) for name, value in node.items()}
        return node

    return convert(nnx.to_pure_dict(state))


def _signature(inputs: Sequence[Any]) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in inputs)


@functools.lru_cache(maxsize=128)
def _graphdef(model: Model, signature: tuple[jax.ShapeDtypeStruct, ...]) -> nnx.GraphDef:
    """The NNX graph definition of ``model`` built for inputs of ``signature`` (shapes only:
    ``nnx.eval_shape`` allocates and draws nothing)."""
    abstract = nnx.eval_shape(lambda: model.build(*signature, rngs=nnx.Rngs(0)))
    return nnx.graphdef(abstract)


def init_model(model: Model, key: jax.Array, *inputs: jax.Array) -> tuple[PyTree, PyTree]:
    """``(params, batch_stats)`` of ``model`` initialised from ``key`` for inputs shaped like
    the example ``inputs``: the ``nnx.Param`` and ``nnx.BatchStat`` states of
    ``model.build(*inputs, rngs=nnx.Rngs(key))`` as plain nested dicts (``batch_stats`` is
    ``{}`` for models without BatchNorm).  Initialisation runs as one jitted program
    (op-by-op it costs a dispatch per layer); it may be vmapped over keys.  ``TypeError``
    naming ``key`` unless it is a PRNG key."""
    check_key("key", key)
    signature = _signature(inputs)
    _graphdef(model, signature)  # shape and argument errors here, before compiling

    def init(key: jax.Array) -> tuple[PyTree, PyTree]:
        module = model.build(*signature, rngs=nnx.Rngs(key))
        _, params, batch_stats = nnx.split(module, nnx.Param, nnx.BatchStat)
        return _pure(params), _pure(batch_stats)

    return jax.jit(init)(key)


def apply_model(
    model: Model, params: PyTree, batch_stats: PyTree, *inputs: jax.Array, train: bool
) -> tuple[jax.Array, PyTree]:
    """``model(*inputs)`` as a pure function: ``(output, new_batch_stats)``.

    The module is ``nnx.merge(graphdef, params, batch_stats)``.  With ``train=True``
    BatchNorm uses batch statistics and the returned running averages are updated
    (:math:`m \\leftarrow 0.9 m + 0.1\\,\\mathrm{mean}_{batch}`); with ``train=False`` they
    are used and returned unchanged.
    """
    module = nnx.merge(_graphdef(model, _signature(inputs)), params, batch_stats)
    output = module(*inputs, train=train)
    if not train or not batch_stats:
        return output, batch_stats
    return output, _pure(nnx.state(module, nnx.BatchStat))


def count_params(params: PyTree) -> int:
    """The number of scalar parameters in ``params``."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))


def _size(x: Any) -> int:
    return math.prod(jnp.shape(x)[1:])


@dataclasses.dataclass(frozen=True)
class MLP:
    r"""Fully connected classifier (:class:`shufflesgd.nn.networks.MLP`): flatten, then
    ``Linear -> [BatchNorm] -> ReLU`` for each width in ``hidden``, then
    ``Linear(num_classes)`` logits.  With BatchNorm the hidden layers drop their bias
    (BatchNorm's shift :math:`\beta` replaces it)."""

    hidden: Sequence[int] = (64, 64)
    num_classes: int = 10
    batch_norm: bool = False

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(self.hidden))

    def build(self, x: Any, *, rngs: nnx.Rngs) -> networks.MLP:
        return networks.MLP(_size(x), self.hidden, self.num_classes, self.batch_norm, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class CNN:
    """Small convolutional classifier (:class:`shufflesgd.nn.networks.CNN`): per entry of
    ``channels`` a 3×3 convolution, [BatchNorm], ReLU and 2×2 average pooling; then a global
    average pool and ``Linear(num_classes)``.  Two levels take 8×8 digits to 2×2 and 28×28
    MNIST to 7×7."""

    channels: Sequence[int] = (16, 32)
    num_classes: int = 10
    batch_norm: bool = False

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))

    def build(self, x: Any, *, rngs: nnx.Rngs) -> networks.CNN:
        return networks.CNN(
            jnp.shape(x)[-1], self.channels, self.num_classes, self.batch_norm, rngs=rngs
        )


@dataclasses.dataclass(frozen=True)
class LinearBatchNorm:
    r"""A linear network on batch-normalised inputs, with no nonlinearity
    (:class:`shufflesgd.nn.networks.LinearBatchNorm`).

    :math:`f(x) = W_L \cdots W_1 \,(\Gamma\,\mathrm{BN}(x) + \beta)`, where
    :math:`\mathrm{BN}` standardises each input feature with the mean and variance of the
    minibatch (running averages at evaluation) and :math:`\Gamma = \mathrm{diag}(\gamma)`,
    :math:`\beta` are learned; the widths of :math:`W_1, \dots, W_{L-1}` are ``hidden`` and
    :math:`W_L` has ``num_outputs`` rows; the layers have no bias.  This is the model of
    Wu, Yun & Sra (ICML 2023, arXiv:2302.12444), Sec. 2, in which the minibatch statistics
    make the loss of an example depend on the batch it is drawn in, so single shuffle and
    random reshuffling minimise different "distorted" risks.  With ``every_layer=True``
    each hidden layer's output is batch-normalised as well.  In ``params``,
    :math:`\gamma, \beta` are ``input_norm``'s ``scale`` and ``bias``, :math:`W_l^\top` is
    ``layers[str(l - 1)]["kernel"]`` and :math:`W_L^\top` is ``output["kernel"]``.
    """

    hidden: Sequence[int] = (16,)
    num_outputs: int = 10
    every_layer: bool = False

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(self.hidden))

    def build(self, x: Any, *, rngs: nnx.Rngs) -> networks.LinearBatchNorm:
        return networks.LinearBatchNorm(
            _size(x), self.hidden, self.num_outputs, self.every_layer, rngs=rngs
        )


@dataclasses.dataclass(frozen=True)
class ScoreMLP:
    r"""Time-conditioned MLP for low-dimensional data (:class:`shufflesgd.nn.networks.ScoreMLP`):
    ``(x [B, d], t [B]) -> [B, d]``.

    :math:`h_0 = W_{in} x`, :math:`h_{l+1} = \mathrm{SiLU}(W_l h_l + U_l\,e(t))` for
    ``num_layers`` layers of width ``hidden``, output :math:`W_{out} h_L`, with
    :math:`e(t)` the time embedding (:func:`sinusoidal_embedding`, then ``Linear -> SiLU ->
    Linear``).  It predicts :math:`\varepsilon` or the score of :math:`x_t`, as the loss
    chooses (Song et al. 2021 use such nets for toy 2-D data).
    """

    hidden: int = 128
    num_layers: int = 3
    embed_dim: int = 32
    time_scale: float = 1000.0

    def build(self, x: Any, t: Any, *, rngs: nnx.Rngs) -> networks.ScoreMLP:
        del t
        return networks.ScoreMLP(
            jnp.shape(x)[-1],
            self.hidden,
            self.num_layers,
            self.embed_dim,
            self.time_scale,
            rngs=rngs,
        )


@dataclasses.dataclass(frozen=True)
class ConditionalScoreMLP:
    r"""Class-conditional :class:`ScoreMLP` (:class:`shufflesgd.nn.networks.ConditionalScoreMLP`):
    ``(x [B, d], t [B], label [B]) -> [B, d]``.

    The layers of :class:`ScoreMLP`, with the time embedding :math:`e(t)` replaced by
    :math:`e(t) + E_c`, :math:`E` a learned embedding (``params["label_embedding"]``) of
    ``num_classes + 1`` tokens of width ``embed_dim``: rows ``0 .. num_classes - 1`` are the
    classes and row ``num_classes`` is the null token of the unconditional branch, which any
    negative label selects (:data:`shufflesgd.diffusion.guidance.NULL_LABEL` is ``-1``).  One
    network then gives both branches of classifier-free guidance; the null token is learned by
    label dropout, the label replaced by it with probability :math:`p_{uncond}` at each training
    example (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Alg. 1).  ``label``
    may be a scalar (one label for the batch).
    """

    num_classes: int = 10
    hidden: int = 128
    num_layers: int = 3
    embed_dim: int = 32
    time_scale: float = 1000.0

    def build(self, x: Any, t: Any, label: Any, *, rngs: nnx.Rngs) -> networks.ConditionalScoreMLP:
        del t, label
        return networks.ConditionalScoreMLP(
            jnp.shape(x)[-1],
            self.num_classes,
            self.hidden,
            self.num_layers,
            self.embed_dim,
            self.time_scale,
            rngs=rngs,
        )


@dataclasses.dataclass(frozen=True)
class UNet:
    r"""A small time-conditioned U-Net (:class:`shufflesgd.nn.networks.UNet`):
    ``(x [B, H, W, C], t [B]) -> [B, H, W, C]``.

    One residual block (Ho et al. 2020) per resolution on the way down (2×2 average pooling
    between levels), one in the middle, and one per resolution on the way up after
    concatenating the skip connection (nearest-neighbour 2× upsampling between levels);
    GroupNorm (no batch statistics), the time embedding added in every block (Ronneberger et
    al. 2015; Ho et al. 2020).  ``channels`` gives the width per level; ``H`` and ``W`` must
    be divisible by ``2 ** (len(channels) - 1)`` (8×8 and 28×28 both work with two levels;
    ``ValueError`` otherwise).
    """

    channels: Sequence[int] = (32, 64)
    embed_dim: int = 64
    groups: int = 8
    time_scale: float = 1000.0

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))

    def build(self, x: Any, t: Any, *, rngs: nnx.Rngs) -> networks.UNet:
        del t
        check_unet_input(self.channels, jnp.shape(x))
        return networks.UNet(
            jnp.shape(x)[-1],
            self.channels,
            self.embed_dim,
            self.groups,
            self.time_scale,
            rngs=rngs,
        )


@dataclasses.dataclass(frozen=True)
class EDMPreconditioned:
    r"""A network wrapped in the preconditioning of Karras, Aittala, Aila & Laine (NeurIPS 2022),
    "Elucidating the Design Space of Diffusion-Based Generative Models", Table 1 and Eq. 7,
    written for a linear process :math:`x_t = \alpha x_0 + \sigma\varepsilon` of
    :mod:`shufflesgd.diffusion.processes`; ``(x_t [B, ...], t [B]) -> [B, ...]``, an
    :math:`\hat\varepsilon` (``output="eps"``, the default) or a flow-matching velocity
    :math:`\hat u` (``output="velocity"``).

    With :math:`\tilde x = x_t/\alpha = x_0 + s\varepsilon`, :math:`s = \sigma/\alpha`, EDM's
    denoiser is :math:`D = c_{skip}\tilde x + c_{out} F(c_{in}\tilde x)` with
    :math:`c_{skip} = \sigma_d^2/(s^2+\sigma_d^2)`,
    :math:`c_{out} = s\sigma_d/\sqrt{s^2+\sigma_d^2}`,
    :math:`c_{in} = 1/\sqrt{s^2+\sigma_d^2}`, and :math:`\hat\varepsilon = (\tilde x - D)/s`.  In
    terms of :math:`x_t`, with :math:`v = \sigma^2 + \alpha^2\sigma_d^2`,

    .. math:: \hat\varepsilon(x_t, t) = \frac{\sigma}{v}\,x_t
              - \frac{\alpha\sigma_d}{\sqrt v}\,F\Bigl(\frac{x_t}{\sqrt v}, t\Bigr):

    the first term is the exact :math:`\varepsilon` of data :math:`N(0, \sigma_d^2 I)`, the
    network's input has unit variance for data of per-entry variance :math:`\sigma_d^2` at every
    :math:`t`, and its output is scaled so that its regression target has unit variance too (EDM's
    argument for :math:`c_{in}`, :math:`c_{out}`).

    The same argument for the velocity :math:`u = \dot\alpha x_0 + \dot\sigma\varepsilon` of
    flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu, Gong & Liu
    2023, rectified flow, whose :math:`u = \varepsilon - x_0`): for data :math:`N(0, \sigma_d^2
    I)`, :math:`(x_t, u)` are jointly Gaussian per entry with :math:`\mathrm{Var}\,x_t = v`,
    :math:`\mathrm{Cov}(u, x_t) = \dot\alpha\alpha\sigma_d^2 + \dot\sigma\sigma` and
    :math:`\mathrm{Var}\,u = \dot\alpha^2\sigma_d^2 + \dot\sigma^2`, so
    :math:`E[u \mid x_t] = c_{skip}x_t` with :math:`c_{skip} = (\dot\alpha\alpha\sigma_d^2 +
    \dot\sigma\sigma)/v`, and the residual has variance :math:`\mathrm{Var}\,u -
    \mathrm{Cov}^2/v = \sigma_d^2(\alpha\dot\sigma - \dot\alpha\sigma)^2/v` (expand
    :math:`(\dot\alpha^2\sigma_d^2 + \dot\sigma^2)(\alpha^2\sigma_d^2 + \sigma^2) -
    (\dot\alpha\alpha\sigma_d^2 + \dot\sigma\sigma)^2`).  Hence

    .. math:: \hat u(x_t, t) = \frac{\dot\alpha\alpha\sigma_d^2 + \dot\sigma\sigma}{v}\,x_t
              + \frac{\sigma_d\,|\alpha\dot\sigma - \dot\alpha\sigma|}{\sqrt v}\,
              F\Bigl(\frac{x_t}{\sqrt v}, t\Bigr):

    the first term is the exact velocity of data :math:`N(0, \sigma_d^2 I)`, the input has unit
    variance as before and :math:`F`'s regression target unit variance; both coefficients are
    finite at :math:`\alpha = 0` (the interpolants' :math:`t = 1`, where :math:`\hat u = x_t +
    \sigma_d F` for rectified flow).  ``network`` is the :class:`Model` of any ``(x, t, train=...)``
    score network (:class:`ScoreMLP`, :class:`UNet`), conditioned on :math:`t` itself (EDM's
    :math:`c_{noise}` is a choice of time embedding; these networks embed :math:`t`).
    ``sigma_data`` :math:`= 0.5` is EDM's value for images in :math:`[-1, 1]`.  Further
    positional inputs after ``t`` (``conditions``, e.g. the class label of
    :class:`ConditionalScoreMLP`) are passed to ``network`` unchanged.  ``ValueError``
    naming ``output`` unless it is one of :data:`~shufflesgd.nn.networks.PRECONDITIONED_OUTPUTS`.
    """

    network: Model
    sde: SDE
    sigma_data: float = 0.5
    output: str = "eps"

    def build(self, x: Any, t: Any, *conditions: Any, rngs: nnx.Rngs) -> networks.EDMPreconditioned:
        return networks.EDMPreconditioned(
            self.network.build(x, t, *conditions, rngs=rngs), self.sde, self.sigma_data, self.output
        )
