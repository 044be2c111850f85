r"""Distances between distributions, to judge samplers against a known answer.

Closed forms between Gaussians, for exact output laws: :func:`gaussian_kl`,
:math:`KL(N(m_p, C_p)\,\|\,N(m_q, C_q)) = \frac12[\mathrm{tr}(C_q^{-1}C_p) +
(m_q-m_p)^\top C_q^{-1}(m_q-m_p) - d + \log\det C_q - \log\det C_p]`, and :func:`gaussian_w2`,
the squared 2-Wasserstein distance :math:`\|m_p-m_q\|^2 + \mathrm{tr}(C_p + C_q -
2(C_q^{1/2}C_pC_q^{1/2})^{1/2})` (Dowson & Landau 1982; Givens & Shortt 1984).

Sample-based, for laws known only through draws: the sliced 2-Wasserstein distance
:func:`sliced_w2` over random directions (Rabin et al. 2011; Bonneel et al. 2015), the
unbiased :math:`MMD^2` with a Gaussian kernel :func:`mmd_squared` (Gretton et al. 2012,
Eq. 3), and :func:`mode_weight_error`, the total variation between a mixture's weights and the
fractions of samples each component is most responsible for.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from shufflesgd.problems.mixtures import GaussianMixture

PyTree = Any


def gaussian_kl(
    mean_p: jax.Array, cov_p: jax.Array, mean_q: jax.Array, cov_q: jax.Array
) -> jax.Array:
    r""":math:`KL(N(m_p, C_p)\,\|\,N(m_q, C_q))` in nats."""
    d = mean_p.shape[-1]
    chol_q = jnp.linalg.cholesky(cov_q)
    solve = lambda b: jax.scipy.linalg.cho_solve((chol_q, True), b)  # noqa: E731
    diff = mean_q - mean_p
    log_det_q = 2.0 * jnp.sum(jnp.log(jnp.diag(chol_q)))
    log_det_p = jnp.linalg.slogdet(cov_p)[1]
    return 0.5 * (jnp.trace(solve(cov_p)) + diff @ solve(diff) - d + log_det_q - log_det_p)


def gaussian_w2(
    mean_p: jax.Array, cov_p: jax.Array, mean_q: jax.Array, cov_q: jax.Array
) -> jax.Array:
    r"""Squared 2-Wasserstein distance between Gaussians,
    :math:`\|m_p-m_q\|^2 + \mathrm{tr}(C_p + C_q - 2(C_q^{1/2}C_pC_q^{1/2})^{1/2})`."""

    def sqrtm(c: jax.Array) -> jax.Array:
        vals, vecs = jnp.linalg.eigh(c)
        return (vecs * jnp.sqrt(jnp.clip(vals, 0.0))) @ vecs.T

    root_q = sqrtm(cov_q)
    cross = sqrtm(root_q @ cov_p @ root_q)
    return jnp.sum((mean_p - mean_q) ** 2) + jnp.trace(cov_p + cov_q - 2.0 * cross)


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
