r"""Gaussian mixtures with closed-form scores at every noise level: the analytic test bed of
the samplers.

A :class:`GaussianMixture` is :math:`p = \sum_k w_k N(\mu_k, \Sigma_k)`.  Under any linear
forward process :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` its marginal stays a mixture,

.. math:: p_t = \sum_k w_k\, N(\alpha_t\mu_k,\ \alpha_t^2\Sigma_k + \sigma_t^2 I),

so :math:`\nabla\log p_t` is exact at every :math:`t` (:meth:`GaussianMixture.diffuse`), and
with it every model output a sampler can ask for.  :class:`EigenMixture` holds the same mixture
in its components' eigenbases, so that :math:`p_t` at any :math:`(\alpha_t, \sigma_t)` costs
matrix products only, with no factorisation per point.  Builders: :func:`gaussian_mixture`
(checked), :func:`three_mode_mixture_2d` (a fixed 2-D test bed) and
:func:`random_gaussian_mixture` (reproducible anisotropic mixtures in any dimension).

A :class:`ConditionalMixture` labels each component with a class, so that every class law
:math:`p(x \mid c)` and the unconditional law :math:`p(x)` are mixtures with the same exact
scores (:func:`conditional_mixture`): the test bed of guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from shufflesgd._checks import check_finite
from shufflesgd.problems._casting import default_float

PyTree = Any


SHORT_AXIS = 8


def _fold(op: Callable[[jax.Array, jax.Array], jax.Array], a: jax.Array, axis: int) -> jax.Array:
    """Reduce ``a`` over ``axis`` with the binary ``op``: unrolled into elementwise ``op`` of
    slices when the axis has at most :data:`SHORT_AXIS` entries.

    Why: a mixture's per-point arrays are ``[K]`` or ``[K, d]`` with K and d often 2 to 8, and
    under ``vmap`` their reductions become reductions over a short minor axis of ``[B, K, d]``,
    which XLA:CPU runs as a scalar loop, while the unrolled form is one vectorised elementwise
    fusion over the batch (the SDE-sampler benchmark measures the speed-up).  Long axes keep
    XLA's reduction.
    """
    a = jnp.moveaxis(a, axis, 0)
    if a.shape[0] > SHORT_AXIS:
        reducer = {jnp.add: jnp.sum, jnp.maximum: jnp.max}[op]
        return reducer(a, axis=0)
    total = a[0]
    for i in range(1, a.shape[0]):
        total = op(total, a[i])
    return total


def _sum(a: jax.Array, axis: int) -> jax.Array:
    return _fold(jnp.add, a, axis)


def _log_normaliser_and_probs(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(logsumexp(logits), softmax(logits))`` over the last axis, with the short-axis
    reductions of :func:`_fold` and the maximum held constant under differentiation."""
    shift = jax.lax.stop_gradient(_fold(jnp.maximum, logits, -1))
    exps = jnp.exp(logits - shift[..., None])
    total = _sum(exps, -1)
    return shift + jnp.log(total), exps / total[..., None]


@struct.dataclass
class GaussianMixture:
    r""":math:`p = \sum_k w_k N(\mu_k, \Sigma_k)` with closed-form score and log-density.

    Under any linear forward process :math:`x_t = \alpha_t x_0 + \sigma_t\varepsilon` the
    marginal stays a mixture, :math:`p_t = \sum_k w_k N(\alpha_t\mu_k,
    \alpha_t^2\Sigma_k + \sigma_t^2 I)` (:meth:`diffuse`), so the exact score, and through
    :func:`shufflesgd.diffusion.processes.convert` the exact :math:`\varepsilon`, :math:`x_0`
    and :math:`v`, are available at every t: the analytic test bed for samplers.
    Responsibilities are a softmax in log space, stable far from every component.
    """

    log_weights: jax.Array  # [K], normalised
    means: jax.Array  # [K, d]
    covariances: jax.Array  # [K, d, d]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def diffuse(self, alpha: jax.Array, sigma: jax.Array) -> GaussianMixture:
        """The law of :math:`\\alpha x + \\sigma\\varepsilon` for :math:`x \\sim p`."""
        eye = jnp.eye(self.dim, dtype=self.means.dtype)
        return GaussianMixture(
            self.log_weights, alpha * self.means, alpha**2 * self.covariances + sigma**2 * eye
        )

    def _inverse_cholesky(self) -> jax.Array:
        r""":math:`L_k^{-1}` with :math:`\Sigma_k = L_k L_k^\top`.  Computed from the
        covariances only, so under ``vmap`` over points it is computed once, and the
        per-point work is matrix-vector products (no batched LAPACK calls)."""
        chol = jnp.linalg.cholesky(self.covariances)
        eye = jnp.broadcast_to(jnp.eye(self.dim, dtype=chol.dtype), chol.shape)
        return jax.scipy.linalg.solve_triangular(chol, eye, lower=True)

    def _whitened(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(L^{-1}, L_k^{-1}(x - mu_k), log N(x; mu_k, Sigma_k))`` for every component k."""
        inverse = self._inverse_cholesky()
        whitened = jnp.einsum("kij,kj->ki", inverse, x - self.means)
        log_det = -2.0 * jnp.sum(jnp.log(jnp.diagonal(inverse, axis1=-2, axis2=-1)), axis=-1)
        log_probs = -0.5 * (_sum(whitened**2, -1) + log_det + self.dim * jnp.log(2 * jnp.pi))
        return inverse, whitened, log_probs

    def log_prob(self, x: jax.Array) -> jax.Array:
        r""":math:`\log p(x)` for one point ``x`` of shape ``[d]`` (vmap for batches)."""
        return _log_normaliser_and_probs(self.log_weights + self._whitened(x)[2])[0]

    def responsibilities(self, x: jax.Array) -> jax.Array:
        return _log_normaliser_and_probs(self.log_weights + self._whitened(x)[2])[1]

    def score(self, x: jax.Array) -> jax.Array:
        r""":math:`\nabla\log p(x) = -\sum_k r_k(x)\Sigma_k^{-1}(x-\mu_k)`, with
        :math:`\Sigma_k^{-1}(x-\mu_k) = L_k^{-\top}L_k^{-1}(x-\mu_k)`."""
        inverse, whitened, log_probs = self._whitened(x)
        precision_diff = jnp.einsum("kji,kj->ki", inverse, whitened)
        responsibilities = _log_normaliser_and_probs(self.log_weights + log_probs)[1]
        return -_sum(responsibilities[:, None] * precision_diff, 0)

    def eigen(self) -> EigenMixture:
        """The same mixture in its components' eigenbases (NumPy ``eigh``; concrete arrays only)."""
        eigvals, eigvecs = np.linalg.eigh(np.asarray(self.covariances, np.float64))
        dtype = self.means.dtype
        return EigenMixture(
            self.log_weights, self.means, jnp.asarray(eigvecs, dtype), jnp.asarray(eigvals, dtype)
        )

    def sample(self, key: jax.Array, num: int) -> jax.Array:
        component_key, noise_key = jax.random.split(key)
        k = jax.random.categorical(component_key, self.log_weights, shape=(num,))
        z = jax.random.normal(noise_key, (num, self.dim), self.means.dtype)
        chol = jnp.linalg.cholesky(self.covariances)
        return self.means[k] + jnp.einsum("nij,nj->ni", chol[k], z)


class EigenMixture(NamedTuple):
    r"""A mixture's components in their eigenbases,
    :math:`\Sigma_k = U_k\,\mathrm{diag}(\lambda_k)\,U_k^\top` (decomposed once, in NumPy:
    :meth:`GaussianMixture.eigen`), so that every diffused marginal
    :math:`p_t = \sum_k w_k N(\alpha\mu_k,
    U_k\,\mathrm{diag}(\alpha^2\lambda_k + \sigma^2)\,U_k^\top)` is evaluated with matrix
    products only, at any :math:`(\alpha, \sigma)`.

    Why not ``GaussianMixture.diffuse(alpha, sigma).score``: that factors the diffused
    covariances, so where :math:`(\alpha, \sigma)` differ per sample (an adaptive ODE solve
    vmapped over points) every sample makes a batched LAPACK call; two such custom calls
    running at once inside a vmapped diffrax while loop deadlocked jaxlib 0.10.2's CPU
    thread pool on 2 cores, intermittently.
    """

    log_weights: jax.Array  # [K]
    means: jax.Array  # [K, d]
    eigvecs: jax.Array  # [K, d, d], columns are eigenvectors
    eigvals: jax.Array  # [K, d]

    def _parts(
        self, x: jax.Array, alpha: jax.Array, sigma: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        scales = alpha**2 * self.eigvals + sigma**2  # [K, d]
        coords = jnp.einsum("kji,kj->ki", self.eigvecs, x - alpha * self.means)  # U_k^T (x - m_k)
        log_n = -0.5 * (
            _sum(coords**2 / scales + jnp.log(scales), -1) + x.shape[-1] * jnp.log(2 * jnp.pi)
        )
        return scales, coords, self.log_weights + log_n

    def log_prob(self, x: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
        r""":math:`\log p_t(x)` of the law of :math:`\alpha x_0 + \sigma\varepsilon`."""
        return _log_normaliser_and_probs(self._parts(x, alpha, sigma)[2])[0]

    def score(self, x: jax.Array, alpha: jax.Array, sigma: jax.Array) -> jax.Array:
        r""":math:`\nabla\log p_t(x)` of the law of :math:`\alpha x_0 + \sigma\varepsilon`."""
        scales, coords, log_joint = self._parts(x, alpha, sigma)
        per_component = -jnp.einsum("kij,kj->ki", self.eigvecs, coords / scales)
        return _sum(_log_normaliser_and_probs(log_joint)[1][:, None] * per_component, 0)

    def velocity(
        self,
        x: jax.Array,
        alpha: jax.Array,
        sigma: jax.Array,
        alpha_dot: jax.Array,
        sigma_dot: jax.Array,
    ) -> jax.Array:
        r"""The flow-matching velocity :math:`E[\dot\alpha x_0 + \dot\sigma\varepsilon \mid
        \alpha x_0 + \sigma\varepsilon = x]` (Lipman et al. 2023, "Flow Matching for Generative
        Modeling", Eq. 8's marginal field).  Component :math:`k`, with :math:`C_k = \alpha^2
        \Sigma_k + \sigma^2 I`, contributes :math:`E[x_0 \mid x, k] = \mu_k + \alpha\Sigma_k
        C_k^{-1}(x - \alpha\mu_k)` and :math:`E[\varepsilon \mid x, k] = \sigma C_k^{-1}(x -
        \alpha\mu_k)`, weighted by the posterior component probabilities; every term is finite at
        :math:`\alpha = 0` (pure noise, where a conversion from the score divides by
        :math:`\alpha`) and at :math:`\sigma = 0`."""
        scales, coords, log_joint = self._parts(x, alpha, sigma)
        gains = (alpha * alpha_dot * self.eigvals + sigma * sigma_dot) / scales
        per_component = alpha_dot * self.means + jnp.einsum(
            "kij,kj->ki", self.eigvecs, gains * coords
        )
        return _sum(_log_normaliser_and_probs(log_joint)[1][:, None] * per_component, 0)


def gaussian_mixture(weights: Any, means: Any, covariances: Any) -> GaussianMixture:
    """Build a :class:`GaussianMixture`, checking shapes, weights and positive definiteness."""
    w = np.asarray(weights, np.float64)
    mu = np.asarray(means, np.float64)
    cov = np.asarray(covariances, np.float64)
    if mu.ndim != 2 or mu.size == 0:
        raise ValueError(f"means must have shape [K, d] with K, d >= 1, got {mu.shape}")
    check_finite("means", mu)
    k, d = mu.shape
    if w.shape != (k,) or not np.all(np.isfinite(w) & (w > 0)):
        raise ValueError(f"weights must be {k} positive finite numbers, got weights={w}")
    if cov.shape != (k, d, d):
        raise ValueError(f"covariances must have shape {(k, d, d)}, got {cov.shape}")
    check_finite("covariances", cov)
    if not np.allclose(cov, np.swapaxes(cov, 1, 2)) or np.any(np.linalg.eigvalsh(cov) <= 0):
        raise ValueError("covariances must be symmetric positive definite")
    return GaussianMixture(
        default_float(np.log(w / w.sum())), default_float(mu), default_float(cov)
    )


def three_mode_mixture_2d() -> GaussianMixture:
    r"""Three well separated, anisotropic 2-D modes with unequal weights, a test bed for samplers:
    weights 0.5 / 0.3 / 0.2, means on the circle of radius 3 at 90°, 210° and 330° (pairwise
    distance :math:`3\sqrt3`), standard deviations between 0.35 and 0.65."""
    angles = np.deg2rad([90.0, 210.0, 330.0])
    means = 3.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    covariances = [
        [[0.3, 0.1], [0.1, 0.2]],
        [[0.2, -0.05], [-0.05, 0.4]],
        [[0.15, 0.0], [0.0, 0.15]],
    ]
    return gaussian_mixture([0.5, 0.3, 0.2], means, covariances)


def random_gaussian_mixture(seed: int, num_components: int, dim: int) -> GaussianMixture:
    r"""A reproducible random mixture for test beds: weights Dirichlet(2) + 0.05 (normalised),
    means :math:`2\,N(0, I)`, covariances :math:`\frac12 FF^\top + 0.1 I` with
    :math:`F_{ij} \sim N(0, 1/d)` (anisotropic, rotated, well conditioned)."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(num_components, 2.0)) + 0.05
    means = 2.0 * rng.standard_normal((num_components, dim))
    factors = rng.standard_normal((num_components, dim, dim)) / np.sqrt(dim)
    covariances = 0.5 * factors @ np.swapaxes(factors, 1, 2) + 0.1 * np.eye(dim)
    return gaussian_mixture(weights, means, covariances)


@struct.dataclass
class ConditionalMixture:
    r"""Class-conditional Gaussian mixtures: component :math:`k` of ``mixture`` belongs to class
    ``labels[k]``, so that

    .. math:: p(x \mid c) = \sum_{k:\,\ell_k = c} \frac{w_k}{\sum_{j:\,\ell_j = c} w_j}
              N(x; \mu_k, \Sigma_k),

    and the unconditional branch is the law ``unconditional``: the class marginal
    :math:`\sum_c p(c)\,p(x \mid c)` (``mixture`` itself) by default, or any other mixture
    (a single Gaussian keeps every guided score affine in :math:`x`, so that samplers' output
    laws stay exactly Gaussian).  Every class law and the unconditional law diffuse as
    mixtures (:meth:`GaussianMixture.diffuse`), so guided scores are exact at every noise
    level.
    """

    mixture: GaussianMixture
    labels: jax.Array  # int32[K]
    unconditional: GaussianMixture
    num_classes: int = struct.field(pytree_node=False)

    def class_log_weights(self, label: jax.Array) -> jax.Array:
        r"""The components' log-weights in :math:`p(x \mid c)` for ``label`` (may be traced):
        renormalised within the class, :math:`-\infty` outside it."""
        masked = jnp.where(self.labels == label, self.mixture.log_weights, -jnp.inf)
        return masked - jax.scipy.special.logsumexp(masked)

    def class_log_prior(self) -> jax.Array:
        r""":math:`\log p(c)` for every class: the summed weights of its components."""
        mass = jax.ops.segment_sum(
            jnp.exp(self.mixture.log_weights), self.labels, num_segments=self.num_classes
        )
        return jnp.log(mass)

    def conditional(self, label: jax.Array) -> GaussianMixture:
        r"""The class law :math:`p(x \mid c)` as a mixture over all components (those of other
        classes with weight zero)."""
        return GaussianMixture(
            self.class_log_weights(label), self.mixture.means, self.mixture.covariances
        )


def conditional_mixture(
    weights: Any,
    means: Any,
    covariances: Any,
    labels: Any,
    unconditional: GaussianMixture | None = None,
) -> ConditionalMixture:
    """Build a :class:`ConditionalMixture`: the components as in :func:`gaussian_mixture`, each
    with its class in ``labels`` (ints ``0 .. C - 1``, every class used), and the law of the
    unconditional branch (default: the class marginal, the mixture of all components)."""
    mixture = gaussian_mixture(weights, means, covariances)
    ell = np.asarray(labels)
    k = mixture.means.shape[0]
    if ell.shape != (k,) or not np.issubdtype(ell.dtype, np.integer):
        raise ValueError(f"labels must be {k} ints (one class per component), got labels={ell}")
    num_classes = int(ell.max()) + 1 if ell.size else 0
    if ell.min() < 0 or set(ell.tolist()) != set(range(num_classes)):
        raise ValueError(
            f"labels must use every class 0 .. C - 1 and nothing else, got labels={ell.tolist()}"
        )
    if unconditional is None:
        unconditional = mixture
    elif not isinstance(unconditional, GaussianMixture) or unconditional.dim != mixture.dim:
        raise ValueError(
            f"unconditional must be a GaussianMixture in dimension {mixture.dim} "
            "(build it with gaussian_mixture)"
        )
    return ConditionalMixture(mixture, jnp.asarray(ell, jnp.int32), unconditional, num_classes)
