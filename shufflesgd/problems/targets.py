r"""Sampling targets with known answers: Neal's funnel and Bayesian regression posteriors.

* :func:`funnel_logdensity` / :func:`funnel_sample`: Neal's funnel, exact draws and marginals.
* :class:`BayesianFiniteSum`: a posterior :math:`\pi(w) \propto N(w; 0, \tau^2 I)
  \prod_{i=1}^n p(y_i \mid w)` stored as a finite sum, with per-example gradients and the
  unbiased minibatch estimator (Welling & Teh 2011) that the stochastic-gradient kernels
  :func:`shufflesgd.mcmc.sgld` and :func:`shufflesgd.mcmc.sghmc` consume, with minibatches
  in the order of any scheme of :mod:`shufflesgd.shuffling`.
* :func:`bayesian_linear_regression` (exact Gaussian posterior in closed form) and
  :func:`bayesian_logistic_regression` (MAP by Newton's method), built from arrays such as
  :func:`shufflesgd.nn.data.sklearn_dataset` (the standardised ``load_diabetes`` and
  ``load_breast_cancer`` data that ship with scikit-learn).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from shufflesgd._checks import check_positive_finite
from shufflesgd.problems._casting import default_float
from shufflesgd.problems.finite_sums import least_squares, logistic_regression

PyTree = Any


def funnel_logdensity(position: jax.Array, scale: float = 3.0) -> jax.Array:
    r"""Normalised log-density of Neal's funnel (Neal 2003, "Slice sampling", Ann. Statist.
    31(3), Sec. 8): :math:`v \sim N(0, \text{scale}^2)` and, given :math:`v`, the other
    coordinates :math:`x_i \sim N(0, e^{v})` independently, for ``position = [v, x_1, ...,
    x_{d-1}]``:

    .. math:: \log\pi(v, x) = \log N(v; 0, s^2) - \tfrac{d-1}{2}(v + \log 2\pi)
              - \tfrac12 e^{-v}\textstyle\sum_i x_i^2.

    Neal's example is ``scale = 3`` with :math:`d = 10`.  Its geometry (scale :math:`e^{v/2}`
    spanning orders of magnitude) defeats a single global step size.
    """
    v, x = position[0], position[1:]
    log_v = -0.5 * (v / scale) ** 2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi)
    log_x = -0.5 * x.shape[0] * (v + jnp.log(2 * jnp.pi)) - 0.5 * jnp.exp(-v) * jnp.sum(x**2)
    return log_v + log_x


def funnel_sample(key: jax.Array, num: int, dim: int, scale: float = 3.0) -> jax.Array:
    r"""``num`` exact draws ``[num, dim]`` of the funnel: :math:`v = s z_0`,
    :math:`x_i = e^{v/2} z_i`.  The exact marginals are :math:`v \sim N(0, s^2)` and
    :math:`\log|x_i| = v/2 + \log|z|`, with mean :math:`-(\gamma + \log 2)/2` and variance
    :math:`s^2/4 + \pi^2/8` (:math:`\gamma` Euler's constant)."""
    if dim < 2:
        raise ValueError(f"dim must be at least 2 (v and one x), got dim={dim}")
    z = jax.random.normal(key, (num, dim))
    v = scale * z[:, :1]
    return jnp.concatenate([v, jnp.exp(0.5 * v) * z[:, 1:]], axis=1)


@struct.dataclass
class BayesianFiniteSum:
    r"""A posterior :math:`\log\pi(w) = \log N(w; 0, \tau^2 I) + \sum_{i=1}^n \ell(w, z_i)`
    (up to a constant), with :math:`\ell` the per-example log-likelihood.

    Attributes:
      data: pytree of arrays with leading axis ``n`` (example ``i`` is ``data[i]``).
      prior_variance: :math:`\tau^2`.
      mode: the posterior mode (the MAP), computed in float64 when the target is built.
      log_likelihood: ``(w, example) -> scalar``, static.
    """

    data: PyTree
    prior_variance: jax.Array
    mode: jax.Array
    log_likelihood: Callable[[jax.Array, PyTree], jax.Array] = struct.field(pytree_node=False)

    @property
    def num_examples(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]

    @property
    def dim(self) -> int:
        return self.mode.shape[0]

    def examples(self, indices: jax.Array) -> PyTree:
        return jax.tree.map(lambda leaf: leaf[indices], self.data)

    def log_prior(self, w: jax.Array) -> jax.Array:
        return -0.5 * jnp.sum(w**2) / self.prior_variance

    def log_likelihoods(self, w: jax.Array, indices: jax.Array | None = None) -> jax.Array:
        """:math:`\\ell(w, z_i)` for ``i`` in ``indices`` (every example when ``None``)."""
        batch = self.data if indices is None else self.examples(indices)
        return jax.vmap(self.log_likelihood, in_axes=(None, 0))(w, batch)

    def logdensity(self, w: jax.Array) -> jax.Array:
        """The unnormalised log-posterior, for full-gradient kernels (ULA, MALA, HMC)."""
        return self.log_prior(w) + jnp.sum(self.log_likelihoods(w))

    def per_example_grads(self, w: jax.Array, indices: jax.Array | None = None) -> jax.Array:
        """``[b, d]``: :math:`\\nabla_w \\ell(w, z_i)` for ``i`` in ``indices`` (all when
        ``None``)."""
        batch = self.data if indices is None else self.examples(indices)
        return jax.vmap(jax.grad(self.log_likelihood), in_axes=(None, 0))(w, batch)

    def grad_estimator(self, w: jax.Array, batch: jax.Array) -> jax.Array:
        r"""Unbiased minibatch estimate of :math:`\nabla\log\pi(w)` (Welling & Teh 2011, Eq. 4):
        :math:`-w/\tau^2 + \frac{n}{b}\sum_{i\in B}\nabla\ell(w, z_i)` for a batch ``B`` of
        ``b`` indices drawn uniformly (or any order of :mod:`shufflesgd.shuffling`).  The
        signature is :data:`shufflesgd.mcmc.stochastic_gradient.GradientEstimator`."""
        scale = self.num_examples / batch.shape[0]
        return -w / self.prior_variance + scale * jnp.sum(self.per_example_grads(w, batch), axis=0)


class GaussianPosterior(NamedTuple):
    """The exact posterior :math:`N(\\text{mean}, \\text{covariance})`."""

    mean: jax.Array
    covariance: jax.Array


def _check_regression(features: np.ndarray, targets: np.ndarray, **variances: float) -> None:
    if features.ndim != 2 or targets.shape != (features.shape[0],):
        raise ValueError(
            f"features must be [n, d] and targets [n], got {features.shape} and {targets.shape}"
        )
    check_positive_finite(**variances)


def _gaussian_log_likelihood(
    w: jax.Array, example: tuple[jax.Array, jax.Array, jax.Array]
) -> jax.Array:
    a, y, noise_variance = example
    return -0.5 * (y - a @ w) ** 2 / noise_variance


def bayesian_linear_regression(
    features: Any,
    targets: Any,
    noise_variance: float,
    prior_variance: float,
) -> tuple[BayesianFiniteSum, GaussianPosterior]:
    r"""Linear regression :math:`y_i = a_i^\top w + \varepsilon_i`,
    :math:`\varepsilon_i \sim N(0, s^2)` with known ``noise_variance`` :math:`s^2` and prior
    :math:`w \sim N(0, \tau^2 I)`: the conjugate Gaussian posterior (Bishop 2006, PRML,
    Eq. 3.53-3.54)

    .. math:: \Sigma = (A^\top A/s^2 + I/\tau^2)^{-1}, \qquad m = \Sigma A^\top y/s^2,

    computed in float64.  The mean is the ridge solution with :math:`\lambda = s^2/(n\tau^2)`
    (taken from :func:`shufflesgd.problems.least_squares`)."""
    a = np.asarray(features, np.float64)
    y = np.asarray(targets, np.float64)
    _check_regression(a, y, noise_variance=noise_variance, prior_variance=prior_variance)
    n, d = a.shape
    precision = a.T @ a / noise_variance + np.eye(d) / prior_variance
    covariance = np.linalg.inv(precision)
    covariance = 0.5 * (covariance + covariance.T)
    mean = least_squares(a, y, l2=noise_variance / (n * prior_variance)).x_star
    model = BayesianFiniteSum(
        data=(default_float(a), default_float(y), default_float(np.full(n, noise_variance))),
        prior_variance=default_float(prior_variance),
        mode=mean,
        log_likelihood=_gaussian_log_likelihood,
    )
    return model, GaussianPosterior(mean, default_float(covariance))


def _logistic_log_likelihood(w: jax.Array, example: tuple[jax.Array, jax.Array]) -> jax.Array:
    a, y = example
    return -jnp.logaddexp(0.0, -y * (a @ w))


def bayesian_logistic_regression(
    features: Any, labels: Any, prior_variance: float
) -> BayesianFiniteSum:
    r"""Logistic regression :math:`p(y_i \mid w) = \sigma(y_i a_i^\top w)` with labels in
    :math:`\{-1, +1\}` and prior :math:`w \sim N(0, \tau^2 I)`.  No closed-form posterior;
    the mode (MAP) is the minimiser of :math:`\frac1n\sum_i\log(1+e^{-y_i a_i^\top w}) +
    \frac{\lambda}{2}\|w\|^2` with :math:`\lambda = 1/(n\tau^2)`, found by damped Newton in
    float64 (:func:`shufflesgd.problems.logistic_regression`)."""
    a = np.asarray(features, np.float64)
    y = np.asarray(labels, np.float64)
    _check_regression(a, y, prior_variance=prior_variance)
    if not np.all(np.isin(y, (-1.0, 1.0))):
        raise ValueError("labels must be -1 or +1")
    n = a.shape[0]
    mode = logistic_regression(a, y, l2=1.0 / (n * prior_variance)).x_star
    return BayesianFiniteSum(
        data=(default_float(a), default_float(y)),
        prior_variance=default_float(prior_variance),
        mode=mode,
        log_likelihood=_logistic_log_likelihood,
    )
