r"""The networks of :mod:`shufflesgd.nn.models` as Flax NNX modules.

Each class is a :class:`flax.nnx.Module` built eagerly from its input sizes and an
:class:`flax.nnx.Rngs`, as NNX layers are (``nnx.Linear(in_features, out_features,
rngs=...)``); kernels are LeCun-normal and biases zero (the NNX and Linen defaults), and
BatchNorm has momentum :data:`BN_MOMENTUM` and :math:`\epsilon = 10^{-5}`.  Every network
takes a keyword ``train``: BatchNorm normalises with the statistics of the current batch and
updates its running averages when ``train`` is true, and uses the running averages when it
is false (Ioffe & Szegedy 2015); networks without BatchNorm accept and ignore it.  The
training code never holds these objects: :mod:`shufflesgd.nn.models` splits them into plain
``params`` and ``batch_stats`` pytrees (``nnx.split``) and merges them back for each call
(``nnx.merge``), so the algorithms stay functions of pytrees.

Classifiers map images ``[B, H, W, C]`` (or vectors ``[B, d]``) to logits ``[B, K]``:
:class:`MLP`, :class:`CNN` and :class:`LinearBatchNorm` (Wu, Yun & Sra, ICML 2023).  Score
networks map ``(x_t, t)`` to an output shaped like ``x_t``: :class:`ScoreMLP`,
:class:`ConditionalScoreMLP` and :class:`UNet`, conditioned on :func:`sinusoidal_embedding`
of :math:`t`; :class:`EDMPreconditioned` wraps one in the scalings of Karras et al. (2022).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from shufflesgd._checks import check_int
from shufflesgd.diffusion.processes import SDE

#: The momentum of BatchNorm's running averages,
#: :math:`m \leftarrow 0.9 m + 0.1\,\mathrm{mean}_{batch}`.
BN_MOMENTUM = 0.9

#: BatchNorm's :math:`\epsilon` (Linen's and NNX's default).
BN_EPSILON = 1e-5

#: The outputs :class:`EDMPreconditioned` can be preconditioned for.
PRECONDITIONED_OUTPUTS = ("eps", "velocity")


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


class MLP(nnx.Module):
    r"""Fully connected classifier: flatten (``in_features`` inputs), then ``Linear ->
    [BatchNorm] -> ReLU`` for each width in ``hidden``, then ``Linear(num_classes)`` logits.
    With BatchNorm the hidden layers drop their bias (BatchNorm's shift :math:`\beta`
    replaces it)."""

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (64, 64),
        num_classes: int = 10,
        batch_norm: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        widths = [in_features, *hidden]
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, use_bias=not batch_norm, rngs=rngs)
                for a, b in zip(widths[:-1], widths[1:])
            ]
        )
        self.norms = nnx.List([_batch_norm(w, rngs) for w in hidden] if batch_norm else [])
        self.output = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for number, layer in enumerate(self.layers):
            x = layer(x)
            if self.norms:
                x = self.norms[number](x, use_running_average=not train)
            x = nnx.relu(x)
        return self.output(x)


class CNN(nnx.Module):
    """Small convolutional classifier on ``in_channels`` channels: per entry of ``channels``
    a 3×3 convolution, [BatchNorm], ReLU and 2×2 average pooling; then a global average pool
    and ``Linear(num_classes)``.  Two levels take 8×8 digits to 2×2 and 28×28 MNIST to 7×7."""

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (16, 32),
        num_classes: int = 10,
        batch_norm: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        widths = [in_channels, *channels]
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (3, 3), use_bias=not batch_norm, rngs=rngs)
                for a, b in zip(widths[:-1], widths[1:])
            ]
        )
        self.norms = nnx.List([_batch_norm(w, rngs) for w in channels] if batch_norm else [])
        self.output = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for number, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms:
                x = self.norms[number](x, use_running_average=not train)
            x = nnx.avg_pool(nnx.relu(x), (2, 2), strides=(2, 2))
        return self.output(x.mean(axis=(1, 2)))


class LinearBatchNorm(nnx.Module):
    r"""A linear network on batch-normalised inputs, with no nonlinearity.

    :math:`f(x) = W_L \cdots W_1 \,(\Gamma\,\mathrm{BN}(x) + \beta)`, where
    :math:`\mathrm{BN}` standardises each of the ``in_features`` input features with the mean
    and variance of the minibatch (running averages at evaluation) and :math:`\Gamma =
    \mathrm{diag}(\gamma)`, :math:`\beta` are learned (``input_norm``'s ``scale`` and
    ``bias``); the widths of :math:`W_1, \dots, W_{L-1}` (``layers``) are ``hidden`` and
    :math:`W_L` (``output``) has ``num_outputs`` rows; the layers have no bias.  This is the
    model of Wu, Yun & Sra (ICML 2023, arXiv:2302.12444), "On the Training Instability of
    Shuffling SGD with Batch Normalization", Sec. 2, in which the minibatch statistics make the
    loss of an example depend on the batch it is drawn in.  With ``every_layer=True`` each
    hidden layer's output is batch-normalised as well (``norms``).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (16,),
        num_outputs: int = 10,
        every_layer: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        widths = [in_features, *hidden]
        self.input_norm = _batch_norm(in_features, rngs)
        self.layers = nnx.List(
            [nnx.Linear(a, b, use_bias=False, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.norms = nnx.List([_batch_norm(w, rngs) for w in hidden] if every_layer else [])
        self.output = nnx.Linear(widths[-1], num_outputs, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = self.input_norm(x.reshape(x.shape[0], -1), use_running_average=not train)
        for number, layer in enumerate(self.layers):
            x = layer(x)
            if self.norms:
                x = self.norms[number](x, use_running_average=not train)
        return self.output(x)


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


class TimeEmbedding(nnx.Module):
    """:func:`sinusoidal_embedding` followed by ``Linear -> SiLU -> Linear`` (Ho et al. 2020)."""

    def __init__(self, dim: int, scale: float = 1000.0, *, rngs: nnx.Rngs):
        self.dim, self.scale = dim, scale
        self.first = nnx.Linear(dim, dim, rngs=rngs)
        self.second = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        e = sinusoidal_embedding(t, self.dim, scale=self.scale)
        return self.second(nnx.silu(self.first(e)))


class ScoreMLP(nnx.Module):
    r"""Time-conditioned MLP for ``data_dim``-dimensional data: ``(x [B, d], t [B]) -> [B, d]``.

    :math:`h_0 = W_{in} x`, :math:`h_{l+1} = \mathrm{SiLU}(W_l h_l + U_l\,e(t))` for
    ``num_layers`` layers of width ``hidden``, output :math:`W_{out} h_L`, with
    :math:`e(t)` the :class:`TimeEmbedding`.  It predicts :math:`\varepsilon` or the score
    of :math:`x_t`, as the loss chooses (Song et al. 2021 use such nets for toy 2-D data).
    """

    def __init__(
        self,
        data_dim: int,
        hidden: int = 128,
        num_layers: int = 3,
        embed_dim: int = 32,
        time_scale: float = 1000.0,
        *,
        rngs: nnx.Rngs,
    ):
        self.time = TimeEmbedding(embed_dim, time_scale, rngs=rngs)
        self.input = nnx.Linear(data_dim, hidden, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(hidden, hidden, rngs=rngs) for _ in range(num_layers)])
        self.time_layers = nnx.List(
            [nnx.Linear(embed_dim, hidden, rngs=rngs) for _ in range(num_layers)]
        )
        self.output = nnx.Linear(hidden, data_dim, rngs=rngs)

    def _trunk(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = self.input(x)
        for layer, time_layer in zip(self.layers, self.time_layers):
            h = nnx.silu(layer(h) + time_layer(emb))
        return self.output(h)

    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no batch statistics; accepted for the uniform interface
        return self._trunk(x, self.time(jnp.broadcast_to(t, x.shape[:1])))


class ConditionalScoreMLP(ScoreMLP):
    r"""Class-conditional :class:`ScoreMLP`: ``(x [B, d], t [B], label [B]) -> [B, d]``.

    The layers of :class:`ScoreMLP`, with the time embedding :math:`e(t)` replaced by
    :math:`e(t) + E_c`, :math:`E` a learned embedding (``label_embedding``, ``nnx.Embed``) of
    ``num_classes + 1`` tokens of width ``embed_dim``: rows ``0 .. num_classes - 1`` are the
    classes and row ``num_classes`` is the null token of the unconditional branch, which any
    negative label selects (:data:`shufflesgd.diffusion.guidance.NULL_LABEL` is ``-1``).  One
    network then gives both branches of classifier-free guidance; the null token is learned by
    label dropout (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Alg. 1).
    ``label`` may be a scalar (one label for the batch).
    """

    def __init__(
        self,
        data_dim: int,
        num_classes: int = 10,
        hidden: int = 128,
        num_layers: int = 3,
        embed_dim: int = 32,
        time_scale: float = 1000.0,
        *,
        rngs: nnx.Rngs,
    ):
        super().__init__(data_dim, hidden, num_layers, embed_dim, time_scale, rngs=rngs)
        self.num_classes = num_classes
        self.label_embedding = nnx.Embed(num_classes + 1, embed_dim, rngs=rngs)

    def __call__(
        self, x: jax.Array, t: jax.Array, label: jax.Array, *, train: bool = False
    ) -> jax.Array:
        del train  # no batch statistics; accepted for the uniform interface
        emb = self.time(jnp.broadcast_to(t, x.shape[:1]))
        label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), x.shape[:1])
        token = jnp.where(label < 0, self.num_classes, label)
        return self._trunk(x, emb + self.label_embedding(token))


class ResBlock(nnx.Module):
    r"""Residual block of a DDPM U-Net (Ho et al. 2020), ``in_channels -> channels``:
    :math:`y = S x + \mathrm{Conv}(\mathrm{SiLU}(\mathrm{GN}(\mathrm{Conv}(\mathrm{SiLU}(
    \mathrm{GN}(x))) + D e)))`, with :math:`S` a 1×1 convolution when the width changes and
    ``gcd(groups, width)`` GroupNorm groups."""

    def __init__(
        self, in_channels: int, channels: int, embed_dim: int, groups: int = 8, *, rngs: nnx.Rngs
    ):
        self.norm_in = nnx.GroupNorm(in_channels, math.gcd(groups, in_channels), rngs=rngs)
        self.conv_in = nnx.Conv(in_channels, channels, (3, 3), rngs=rngs)
        self.time = nnx.Linear(embed_dim, channels, rngs=rngs)
        self.norm_out = nnx.GroupNorm(channels, math.gcd(groups, channels), rngs=rngs)
        self.conv_out = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
        self.skip = (
            nnx.Conv(in_channels, channels, (1, 1), rngs=rngs) if in_channels != channels else None
        )

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = self.conv_in(nnx.silu(self.norm_in(x)))
        h = h + self.time(emb)[:, None, None, :]
        h = self.conv_out(nnx.silu(self.norm_out(h)))
        return (x if self.skip is None else self.skip(x)) + h


def check_unet_input(channels: Sequence[int], shape: tuple[int, ...]) -> None:
    """``ValueError`` unless ``shape`` is ``[B, H, W, C]`` with ``H`` and ``W`` divisible by
    ``2 ** (len(channels) - 1)``, the input a :class:`UNet` with ``channels`` accepts."""
    factor = 2 ** (len(channels) - 1)
    if len(shape) != 4 or shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"x must be [B, H, W, C] with H and W divisible by {factor} for "
            f"channels={tuple(channels)}, got shape {tuple(shape)}"
        )


class UNet(nnx.Module):
    r"""A small time-conditioned U-Net on ``in_channels`` channels: ``(x [B, H, W, C], t [B])
    -> [B, H, W, C]``.

    One :class:`ResBlock` per resolution on the way down (2×2 average pooling between
    levels), one in the middle, and one per resolution on the way up after concatenating
    the skip connection (nearest-neighbour 2× upsampling between levels); GroupNorm (no
    batch statistics), the :class:`TimeEmbedding` added in every block (Ronneberger et al.
    2015; Ho et al. 2020).  ``channels`` gives the width per level; ``H`` and ``W`` must be
    divisible by ``2 ** (len(channels) - 1)`` (:func:`check_unet_input`).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (32, 64),
        embed_dim: int = 64,
        groups: int = 8,
        time_scale: float = 1000.0,
        *,
        rngs: nnx.Rngs,
    ):
        self.channels = tuple(channels)
        self.time = TimeEmbedding(embed_dim, time_scale, rngs=rngs)
        self.stem = nnx.Conv(in_channels, channels[0], (3, 3), rngs=rngs)
        widths = [channels[0], *channels]
        self.down = nnx.List(
            [ResBlock(a, b, embed_dim, groups, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.middle = ResBlock(channels[-1], channels[-1], embed_dim, groups, rngs=rngs)
        up, width = [], channels[-1]
        for level in reversed(range(len(channels))):
            up.append(
                ResBlock(width + channels[level], channels[level], embed_dim, groups, rngs=rngs)
            )
            width = channels[level]
        self.up = nnx.List(up)
        self.norm = nnx.GroupNorm(channels[0], math.gcd(groups, channels[0]), rngs=rngs)
        self.head = nnx.Conv(channels[0], in_channels, (3, 3), rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # GroupNorm only; accepted for the uniform interface
        check_unet_input(self.channels, x.shape)
        emb = self.time(jnp.broadcast_to(t, x.shape[:1]))
        h = self.stem(x)
        skips = []
        for level, block in enumerate(self.down):
            if level:
                h = nnx.avg_pool(h, (2, 2), strides=(2, 2))
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block, level in zip(self.up, reversed(range(len(self.channels)))):
            h = block(jnp.concatenate([h, skips[level]], -1), emb)
            if level:
                b, height, width, c = h.shape
                h = jax.image.resize(h, (b, 2 * height, 2 * width, c), "nearest")
        return self.head(nnx.silu(self.norm(h)))


class EDMPreconditioned(nnx.Module):
    r"""A network wrapped in the preconditioning of Karras, Aittala, Aila & Laine (NeurIPS 2022),
    "Elucidating the Design Space of Diffusion-Based Generative Models", Table 1 and Eq. 7,
    written for a linear process :math:`x_t = \alpha x_0 + \sigma\varepsilon` of
    :mod:`shufflesgd.diffusion.processes`; ``(x_t [B, ...], t [B], *conditions) -> [B, ...]``,
    an :math:`\hat\varepsilon` (``output="eps"``) or a flow-matching velocity :math:`\hat u`
    (``output="velocity"``).  With :math:`v = \sigma^2 + \alpha^2\sigma_d^2`,

    .. math:: \hat\varepsilon(x_t, t) = \frac{\sigma}{v}\,x_t
              - \frac{\alpha\sigma_d}{\sqrt v}\,F\Bigl(\frac{x_t}{\sqrt v}, t\Bigr),
              \qquad
              \hat u(x_t, t) = \frac{\dot\alpha\alpha\sigma_d^2 + \dot\sigma\sigma}{v}\,x_t
              + \frac{\sigma_d\,|\alpha\dot\sigma - \dot\alpha\sigma|}{\sqrt v}\,
              F\Bigl(\frac{x_t}{\sqrt v}, t\Bigr),

    where ``network`` is :math:`F`; the derivation is that of
    :class:`shufflesgd.nn.models.EDMPreconditioned`.  ``ValueError`` naming ``output`` unless
    it is one of :data:`PRECONDITIONED_OUTPUTS`.
    """

    def __init__(self, network: nnx.Module, sde: SDE, sigma_data: float = 0.5, output: str = "eps"):
        if output not in PRECONDITIONED_OUTPUTS:
            raise ValueError(
                f"output must be one of {list(PRECONDITIONED_OUTPUTS)}, got {output!r}"
            )
        self.network = network
        self.sde, self.sigma_data, self.output = sde, sigma_data, output

    def __call__(
        self, x: jax.Array, t: jax.Array, *conditions: jax.Array, train: bool = False
    ) -> jax.Array:
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
