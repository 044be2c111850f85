r"""Small Flax networks for the real-data studies: classifiers and score networks.

The networks are Flax **Linen** modules, used only through two pure functions:

* :func:`init_model` ``(model, key, *inputs) -> (params, batch_stats)``;
* :func:`apply_model` ``(model, params, batch_stats, *inputs, train) -> (output,
  new_batch_stats)``.

Linen (rather than NNX, Flax's recommended API for new stateful code) is used because a
training step here must be a pure, jitted function of plain pytrees ``(params, opt_state,
batch_stats, batch, key)`` whose state is checkpointed leaf by leaf; Linen's ``apply``
is exactly that, with no split/merge of module objects.  Models without BatchNorm have
``batch_stats == {}``.  Every model takes a keyword ``train``: BatchNorm normalises with
the statistics of the current batch and updates its running averages when ``train`` is
true, and uses the running averages when it is false (Ioffe & Szegedy 2015); models
without BatchNorm accept and ignore it, so every model is driven the same way.

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

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int, check_key
from shufflesgd.diffusion.processes import SDE

PyTree = Any


BN_MOMENTUM = 0.9


def init_model(model: nn.Module, key: jax.Array, *inputs: jax.Array) -> tuple[PyTree, PyTree]:
    """``(params, batch_stats)`` of ``model`` initialised from ``key`` on example ``inputs``
    (``batch_stats`` is ``{}`` for models without BatchNorm).  Initialisation runs as one
    jitted program (op-by-op it costs a dispatch per layer).  ``TypeError`` naming ``key``
    unless it is a PRNG key."""
    check_key("key", key)
    variables = jax.jit(functools.partial(model.init, train=False))(key, *inputs)
    return variables["params"], variables.get("batch_stats", {})


def apply_model(
    model: nn.Module, params: PyTree, batch_stats: PyTree, *inputs: jax.Array, train: bool
) -> tuple[jax.Array, PyTree]:
    """``model(*inputs)`` as a pure function: ``(output, new_batch_stats)``.

    With ``train=True`` BatchNorm uses batch statistics and the returned running averages
    are updated (:math:`m \\leftarrow 0.9 m + 0.1\\,\\mathrm{mean}_{batch}`); with
    ``train=False`` they are used and returned unchanged.
    """
    if not batch_stats:
        return model.apply({"params": params}, *inputs, train=train), batch_stats
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        return model.apply(variables, *inputs, train=False), batch_stats
    output, updates = model.apply(variables, *inputs, train=True, mutable=["batch_stats"])
    return output, updates["batch_stats"]


def count_params(params: PyTree) -> int:
    """The number of scalar parameters in ``params``."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))


def _batch_norm(train: bool) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)


class MLP(nn.Module):
    r"""Fully connected classifier: flatten, then ``Dense -> [BatchNorm] -> ReLU`` for each
    width in ``hidden``, then ``Dense(num_classes)`` logits.  With BatchNorm the hidden
    ``Dense`` layers drop their bias (BatchNorm's shift :math:`\beta` replaces it)."""

    hidden: Sequence[int] = (64, 64)
    num_classes: int = 10
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.Dense(width, use_bias=not self.batch_norm)(x)
            if self.batch_norm:
                x = _batch_norm(train)(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """Small convolutional classifier: per entry of ``channels`` a 3×3 convolution,
    [BatchNorm], ReLU and 2×2 average pooling; then a global average pool and
    ``Dense(num_classes)``.  Two levels take 8×8 digits to 2×2 and 28×28 MNIST to 7×7."""

    channels: Sequence[int] = (16, 32)
    num_classes: int = 10
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for width in self.channels:
            x = nn.Conv(width, (3, 3), use_bias=not self.batch_norm)(x)
            if self.batch_norm:
                x = _batch_norm(train)(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class LinearBatchNorm(nn.Module):
    r"""A linear network on batch-normalised inputs, with no nonlinearity.

    :math:`f(x) = W_L \cdots W_1 \,(\Gamma\,\mathrm{BN}(x) + \beta)`, where
    :math:`\mathrm{BN}` standardises each input feature with the mean and variance of the
    minibatch (running averages at evaluation) and :math:`\Gamma = \mathrm{diag}(\gamma)`,
    :math:`\beta` are learned; the widths of :math:`W_1, \dots, W_{L-1}` are ``hidden`` and
    :math:`W_L` has ``num_outputs`` rows; the layers have no bias.  This is the model of
    Wu, Yun & Sra (ICML 2023, arXiv:2302.12444), Sec. 2, in which the minibatch statistics
    make the loss of an example depend on the batch it is drawn in, so single shuffle and
    random reshuffling minimise different "distorted" risks.  With ``every_layer=True``
    each hidden layer's output is batch-normalised as well.
    """

    hidden: Sequence[int] = (16,)
    num_outputs: int = 10
    every_layer: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = _batch_norm(train)(x.reshape(x.shape[0], -1))
        for width in self.hidden:
            x = nn.Dense(width, use_bias=False)(x)
            if self.every_layer:
                x = _batch_norm(train)(x)
        return nn.Dense(self.num_outputs, use_bias=False)(x)


def sinusoidal_embedding(
    t: jax.Array, dim: int, *, scale: float = 1000.0, max_period: float = 10_000.0
) -> jax.Array:
    r"""Sinusoidal features of time, ``[B, dim]`` for ``t`` of shape ``[B]`` (or a scalar).

    :math:`e(t) = [\sin(s t \omega_k), \cos(s t \omega_k)]_{k<dim/2}` with
    :math:`\omega_k = P^{-k/(dim/2)}`, the transformer position encoding (Vaswani et al.
    2017) used as the DDPM time embedding (Ho et al. 2020, App. B); the scale :math:`s =
    1000` maps :math:`t \in [0, 1]` to DDPM's step range.  ``dim`` must be a positive even
    int (``ValueError`` naming it).
    """
    dim = check_int("dim", dim)
    if dim % 2:
        raise ValueError(f"dim must be even, got dim={dim}")
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half) / half)
    angles = scale * jnp.atleast_1d(t)[:, None] * frequencies
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class TimeEmbedding(nn.Module):
    """:func:`sinusoidal_embedding` followed by ``Dense -> SiLU -> Dense`` (Ho et al. 2020)."""

    dim: int
    scale: float = 1000.0

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        e = sinusoidal_embedding(t, self.dim, scale=self.scale)
        return nn.Dense(self.dim)(nn.silu(nn.Dense(self.dim)(e)))


class ScoreMLP(nn.Module):
    r"""Time-conditioned MLP for low-dimensional data: ``(x [B, d], t [B]) -> [B, d]``.

    :math:`h_0 = W_{in} x`, :math:`h_{l+1} = \mathrm{SiLU}(W_l h_l + U_l\,e(t))` for
    ``num_layers`` layers of width ``hidden``, output :math:`W_{out} h_L`, with
    :math:`e(t)` the :class:`TimeEmbedding`.  It predicts :math:`\varepsilon` or the score
    of :math:`x_t`, as the loss chooses (Song et al. 2021 use such nets for toy 2-D data).
    """

    hidden: int = 128
    num_layers: int = 3
    embed_dim: int = 32
    time_scale: float = 1000.0

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no batch statistics; accepted for the uniform interface
        emb = TimeEmbedding(self.embed_dim, self.time_scale)(jnp.broadcast_to(t, x.shape[:1]))
        h = nn.Dense(self.hidden)(x)
        for _ in range(self.num_layers):
            h = nn.silu(nn.Dense(self.hidden)(h) + nn.Dense(self.hidden)(emb))
        return nn.Dense(x.shape[-1])(h)


class ConditionalScoreMLP(nn.Module):
    r"""Class-conditional :class:`ScoreMLP`: ``(x [B, d], t [B], label [B]) -> [B, d]``.

    The layers of :class:`ScoreMLP`, with the time embedding :math:`e(t)` replaced by
    :math:`e(t) + E_c`, :math:`E` a learned embedding (``nn.Embed``) of ``num_classes + 1``
    tokens of width ``embed_dim``: rows ``0 .. num_classes - 1`` are the classes and row
    ``num_classes`` is the null token of the unconditional branch, which any negative label
    selects (:data:`shufflesgd.diffusion.guidance.NULL_LABEL` is ``-1``).  One network then
    gives both branches of classifier-free guidance; the null token is learned by label
    dropout, the label replaced by it with probability :math:`p_{uncond}` at each training
    example (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Alg. 1).  ``label``
    may be a scalar (one label for the batch).
    """

    num_classes: int = 10
    hidden: int = 128
    num_layers: int = 3
    embed_dim: int = 32
    time_scale: float = 1000.0

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, label: jax.Array, *, train: bool = False
    ) -> jax.Array:
        del train  # no batch statistics; accepted for the uniform interface
        emb = TimeEmbedding(self.embed_dim, self.time_scale)(jnp.broadcast_to(t, x.shape[:1]))
        label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), x.shape[:1])
        token = jnp.where(label < 0, self.num_classes, label)
        emb = emb + nn.Embed(self.num_classes + 1, self.embed_dim, name="label_embedding")(token)
        h = nn.Dense(self.hidden)(x)
        for _ in range(self.num_layers):
            h = nn.silu(nn.Dense(self.hidden)(h) + nn.Dense(self.hidden)(emb))
        return nn.Dense(x.shape[-1])(h)


class ResBlock(nn.Module):
    r"""Residual block of a DDPM U-Net (Ho et al. 2020):
    :math:`y = S x + \mathrm{Conv}(\mathrm{SiLU}(\mathrm{GN}(\mathrm{Conv}(\mathrm{SiLU}(
    \mathrm{GN}(x))) + D e)))`, with :math:`S` a 1×1 convolution when the width changes."""

    channels: int
    groups: int = 8

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        groups = math.gcd(self.groups, self.channels)
        h = nn.Conv(self.channels, (3, 3))(
            nn.silu(nn.GroupNorm(math.gcd(self.groups, x.shape[-1]))(x))
        )
        h = h + nn.Dense(self.channels)(emb)[:, None, None, :]
        h = nn.Conv(self.channels, (3, 3))(nn.silu(nn.GroupNorm(groups)(h)))
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1))(x)
        return x + h


class UNet(nn.Module):
    r"""A small time-conditioned U-Net: ``(x [B, H, W, C], t [B]) -> [B, H, W, C]``.

    One :class:`ResBlock` per resolution on the way down (2×2 average pooling between
    levels), one in the middle, and one per resolution on the way up after concatenating
    the skip connection (nearest-neighbour 2× upsampling between levels); GroupNorm (no
    batch statistics), the :class:`TimeEmbedding` added in every block (Ronneberger et al.
    2015; Ho et al. 2020).  ``channels`` gives the width per level; ``H`` and ``W`` must be
    divisible by ``2 ** (len(channels) - 1)`` (8×8 and 28×28 both work with two levels).
    """

    channels: Sequence[int] = (32, 64)
    embed_dim: int = 64
    groups: int = 8
    time_scale: float = 1000.0

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # GroupNorm only; accepted for the uniform interface
        factor = 2 ** (len(self.channels) - 1)
        if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"x must be [B, H, W, C] with H and W divisible by {factor} for "
                f"channels={tuple(self.channels)}, got shape {x.shape}"
            )
        emb = TimeEmbedding(self.embed_dim, self.time_scale)(jnp.broadcast_to(t, x.shape[:1]))
        h = nn.Conv(self.channels[0], (3, 3))(x)
        skips = []
        for level, width in enumerate(self.channels):
            if level:
                h = nn.avg_pool(h, (2, 2), strides=(2, 2))
            h = ResBlock(width, self.groups)(h, emb)
            skips.append(h)
        h = ResBlock(self.channels[-1], self.groups)(h, emb)
        for level in reversed(range(len(self.channels))):
            h = ResBlock(self.channels[level], self.groups)(
                jnp.concatenate([h, skips[level]], -1), emb
            )
            if level:
                b, height, width, c = h.shape
                h = jax.image.resize(h, (b, 2 * height, 2 * width, c), "nearest")
        h = nn.silu(nn.GroupNorm(math.gcd(self.groups, self.channels[0]))(h))
        return nn.Conv(x.shape[-1], (3, 3))(h)


#: The outputs :class:`EDMPreconditioned` can be preconditioned for.
PRECONDITIONED_OUTPUTS = ("eps", "velocity")


class EDMPreconditioned(nn.Module):
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
    \sigma_d F` for rectified flow).  ``network`` is any ``(x, t, train=...)`` score network
    (:class:`ScoreMLP`, :class:`UNet`), conditioned on :math:`t` itself (EDM's
    :math:`c_{noise}` is a choice of time embedding; these networks embed :math:`t`).
    ``sigma_data`` :math:`= 0.5` is EDM's value for images in :math:`[-1, 1]`.  Further
    positional inputs after ``t`` (``conditions``, e.g. the class label of
    :class:`ConditionalScoreMLP`) are passed to ``network`` unchanged.  ``ValueError``
    naming ``output`` unless it is one of :data:`PRECONDITIONED_OUTPUTS`.
    """

    network: nn.Module
    sde: SDE
    sigma_data: float = 0.5
    output: str = "eps"

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, *conditions: jax.Array, train: bool = False
    ) -> jax.Array:
        if self.output not in PRECONDITIONED_OUTPUTS:
            raise ValueError(
                f"output must be one of {list(PRECONDITIONED_OUTPUTS)}, got {self.output!r}"
            )
        t = jnp.broadcast_to(t, x.shape[:1])
        t_b = t.reshape((-1,) + (1,) * (x.ndim - 1))
        alpha, sigma = self.sde.alpha(t_b), self.sde.sigma(t_b)
        var = sigma**2 + (alpha * self.sigma_data) ** 2
        scale = jax.lax.rsqrt(var)
        residual = self.network(x * scale, t, *conditions, train=train)
        if self.output == "eps":
            return sigma / var * x - alpha * self.sigma_data * scale * residual
        alpha_dot, sigma_dot = self.sde.alpha_dot(t_b), self.sde.sigma_dot(t_b)
        c_skip = (alpha_dot * alpha * self.sigma_data**2 + sigma_dot * sigma) / var
        c_out = self.sigma_data * jnp.abs(alpha * sigma_dot - alpha_dot * sigma) * scale
        return c_skip * x + c_out * residual
