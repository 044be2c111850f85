r"""Sample-quality metrics against a reference: sliced Wasserstein, MMD, mode weights.

For the analytic test bed of the samplers (DESIGN, "The analytic test bed"): a sampler's
draws are compared with exact draws of the target (sliced :math:`W_2`, :math:`MMD^2`) or
with the target's mixture weights (mode-weight error).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shufflesgd.problems import GaussianMixture


def random_directions(key: jax.Array, num: int, dim: int) -> jax.Array:
    """``[num, dim]`` directions uniform on the unit sphere."""
    v = jax.random.normal(key, (num, dim))
    return v / jnp.linalg.norm(v, axis=1, keepdims=True)


def sliced_w2(x: jax.Array, y: jax.Array, directions: jax.Array) -> jax.Array:
    r"""Sliced 2-Wasserstein distance between two equal-size samples ``[n, d]`` along unit
    ``directions`` ``[L, d]`` (Rabin et al. 2011; Bonneel et al. 2015):
    :math:`(\frac1L\sum_\theta W_2^2(\theta^\top x, \theta^\top y))^{1/2}`, each 1-D
    :math:`W_2` from sorted projections."""
    px, py = jnp.sort(x @ directions.T, axis=0), jnp.sort(y @ directions.T, axis=0)
    return jnp.sqrt(jnp.mean((px - py) ** 2))


def squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
    """``[n, m]`` squared Euclidean distances between the rows of ``x`` and ``y``."""
    return jnp.clip(jnp.sum(x**2, 1)[:, None] + jnp.sum(y**2, 1)[None, :] - 2.0 * x @ y.T, 0.0)


def mmd_squared(x: jax.Array, y: jax.Array, bandwidth_sq: float | jax.Array) -> jax.Array:
    r"""Unbiased :math:`MMD^2` (Gretton et al. 2012, Eq. 3) with the Gaussian kernel
    :math:`k(a, b) = \exp(-\|a-b\|^2/(2h^2))`, ``bandwidth_sq`` :math:`= h^2`."""

    def mean_kernel(a: jax.Array, b: jax.Array, same: bool) -> jax.Array:
        k = jnp.exp(-squared_distances(a, b) / (2.0 * bandwidth_sq))
        if same:
            return (jnp.sum(k) - jnp.trace(k)) / (a.shape[0] * (a.shape[0] - 1))
        return jnp.mean(k)

    return mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2.0 * mean_kernel(x, y, False)


def mode_weight_error(x: jax.Array, target: GaussianMixture) -> jax.Array:
    r"""Total variation :math:`\frac12\sum_k|\hat w_k - w_k|` between the fractions
    :math:`\hat w_k` of samples whose largest responsibility under ``target`` is component k
    and the target's weights."""
    k = target.log_weights.shape[0]
    assigned = jnp.argmax(jax.vmap(target.responsibilities)(x), axis=1)
    fractions = jnp.mean(jax.nn.one_hot(assigned, k, dtype=x.dtype), axis=0)
    return 0.5 * jnp.sum(jnp.abs(fractions - jnp.exp(target.log_weights)))
