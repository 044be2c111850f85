r"""Empirical model statistics (EMS): the coefficients :math:`l_\lambda, s_\lambda, b_\lambda`
with which DPM-Solver-v3 re-parameterises the probability-flow ODE
(:func:`shufflesgd.diffusion.samplers.dpm_solver_v3.dpm_solver_v3`).

Zheng, Lu, Chen & Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics" (NeurIPS 2023), Sec. 3.1 (its equation numbers could not be checked offline).  In
the half log-SNR :math:`\lambda = \log(\alpha/\sigma)`
the probability-flow ODE of a noise-prediction model :math:`\varepsilon_\theta` is
:math:`dx_\lambda/d\lambda = \frac{\dot\alpha_\lambda}{\alpha_\lambda}x_\lambda
- \sigma_\lambda\varepsilon_\theta(x_\lambda, \lambda)` (dots are :math:`d/d\lambda`).  Adding
and subtracting :math:`l_\lambda\odot x_\lambda` moves a per-dimension linear part out of the
network term, :math:`N_\theta = \sigma_\lambda\varepsilon_\theta - l_\lambda\odot x`,

.. math:: \frac{dx_\lambda}{d\lambda}
          = \Big(\frac{\dot\alpha_\lambda}{\alpha_\lambda} - l_\lambda\Big)\odot x_\lambda
          - \alpha_\lambda f_\theta(x_\lambda, \lambda), \qquad
          f_\theta = \frac{\sigma_\lambda\varepsilon_\theta - l_\lambda\odot x}{\alpha_\lambda},

and :math:`l` is chosen to make :math:`N_\theta` as flat in :math:`x` as possible (the paper's
first-order discretisation-error argument):

.. math:: l^*_\lambda = \arg\min_l \mathbb E_{p_\lambda}
          \big\|\sigma_\lambda\nabla_x\varepsilon_\theta(x_\lambda, \lambda)
          - \mathrm{diag}(l)\big\|_F^2
          = \mathbb E_{p_\lambda}\,\mathrm{diag}\big(\sigma_\lambda\nabla_x\varepsilon_\theta\big).

Then :math:`s, b` are the per-dimension least-squares fit of the total derivative of
:math:`f_\theta` along the ODE, :math:`f^{(1)}_\theta = \frac{d}{d\lambda}f_\theta(x_\lambda,
\lambda)`, by an affine function of :math:`f_\theta`:

.. math:: (s^*_\lambda, b^*_\lambda) = \arg\min_{s, b}\mathbb E_{p_\lambda}
          \big\|f^{(1)}_\theta - s\odot f_\theta - b\big\|^2, \qquad
          s^* = \frac{\mathrm{Cov}(f^{(1)}_\theta, f_\theta)}{\mathrm{Var}(f_\theta)}, \quad
          b^* = \mathbb E f^{(1)}_\theta - s^*\odot\mathbb E f_\theta

(element-wise), so that the pseudo data prediction
:math:`g_\theta = e^{-\int s}f_\theta - \int e^{-\int s}b` that the solver extrapolates has a
derivative :math:`e^{-\int s}(f^{(1)}_\theta - s f_\theta - b)` as small as possible.  The
derivative :math:`f^{(1)}_\theta` includes :math:`\dot l_\lambda` (the solver evaluates
:math:`f_\theta` with the :math:`l` of each point).  When :math:`\mathrm{Var}(f_\theta)` is zero
to rounding (``f`` does not depend on ``x``, e.g. an axis-aligned Gaussian with exact
:math:`l`) the minimum-norm solution :math:`s = 0` is taken, a pseudo-inverse cut-off.

:math:`l = 1, s = 0, b = 0` gives :math:`f_\theta = -\hat x_0`, the data prediction, and
DPM-Solver-v3 becomes DPM-Solver++ (the paper's App. A.2, the authors' ``degenerated=True``):
:func:`dpm_solver_pp_ems`.  :func:`gaussian_ems` computes the statistics exactly for Gaussian
data with its exact model (affine in :math:`x`, so every expectation is a closed form);
:func:`estimate_ems` estimates them for any model by Monte Carlo over data samples and noise
with Jacobian-vector products.  The authors compute theirs as their App. C.1.1 describes; their
repository ships no statistics code (its README's section on computing them by yourself is
empty), and the appendix could not be read offline, so the estimator's details (Hutchinson's
probe for the diagonal, the pathwise :math:`\dot l`, the forward marginal as the
expectation's law, the cut-off) are this library's and are checked against
:func:`gaussian_ems`, not against theirs.
:func:`ems_lambdas` is the authors' statistics grid, uniform in :math:`\lambda` over the
process's time range.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_float_array, check_int, check_key, is_concrete
from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import Model

Array = jax.Array


class EMS(NamedTuple):
    r"""Empirical model statistics on a grid of half log-SNRs (a pytree).

    ``lambdas``: ``[K]`` strictly increasing :math:`\lambda = \log(\alpha/\sigma)`;
    ``l``, ``s``, ``b``: ``[K, *shape]`` with ``shape`` broadcastable to a sample's shape (one
    value per dimension, per channel, or ``[K]`` one per :math:`\lambda`).  Between grid points
    the solver interpolates them linearly in :math:`\lambda`, and holds them constant beyond
    the ends.
    """

    lambdas: Array
    l: Array  # noqa: E741  (the paper's name)
    s: Array
    b: Array


def check_ems(name: str, statistics: Any, x_shape: tuple[int, ...]) -> None:
    """``TypeError`` unless ``statistics`` is an :class:`EMS` of float arrays; ``ValueError``
    naming ``name`` unless ``lambdas`` is a strictly increasing finite vector of length K >= 1,
    ``l``, ``s``, ``b`` have K rows whose trailing shape broadcasts to ``x_shape``, and (when
    concrete) every entry is finite."""
    if not isinstance(statistics, EMS):
        raise TypeError(
            f"{name} must be an EMS (lambdas, l, s, b) or None, got {type(statistics).__name__}"
        )
    check_float_array(name, statistics)
    lambdas = statistics.lambdas
    if np.ndim(lambdas) != 1 or np.shape(lambdas)[0] < 1:
        raise ValueError(f"{name}.lambdas must be a vector [K], K >= 1, got {np.shape(lambdas)}")
    k = np.shape(lambdas)[0]
    for field in ("l", "s", "b"):
        shape = tuple(np.shape(getattr(statistics, field)))
        ok = len(shape) >= 1 and shape[0] == k
        if ok:
            try:
                ok = np.broadcast_shapes(shape[1:], tuple(x_shape)) == tuple(x_shape)
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(
                f"{name}.{field} must have shape [K, *shape] with K = {k} and shape broadcastable "
                f"to the sample shape {tuple(x_shape)}, got {shape}"
            )
    for field in EMS._fields:
        value = getattr(statistics, field)
        if is_concrete(value) and not np.all(np.isfinite(np.asarray(value, np.float64))):
            raise ValueError(f"{name}.{field} must be finite, got a non-finite entry")
    if is_concrete(lambdas) and k > 1 and not np.all(np.diff(np.asarray(lambdas, np.float64)) > 0):
        raise ValueError(f"{name}.lambdas must be strictly increasing")


def _check_lambdas(lambdas: Any) -> None:
    """``ValueError`` naming ``lambdas`` unless it is a vector and, when concrete, finite and
    strictly increasing."""
    if np.ndim(lambdas) != 1 or np.shape(lambdas)[0] < 1:
        raise ValueError(f"lambdas must be a vector [K], K >= 1, got shape {np.shape(lambdas)}")
    if is_concrete(lambdas):
        values = np.asarray(lambdas, np.float64)
        if not np.all(np.isfinite(values)) or not np.all(np.diff(values) > 0):
            raise ValueError("lambdas must be finite and strictly increasing")


def dpm_solver_pp_ems() -> EMS:
    r""":math:`l = 1, s = 0, b = 0` at every :math:`\lambda` (one grid point, broadcast to any
    sample shape): the statistics under which DPM-Solver-v3 is DPM-Solver++ (Zheng et al. 2023,
    App. A.2; the authors' ``degenerated=True``).  NumPy arrays, so that they stay concrete
    inside ``jit``."""
    return EMS(np.zeros(1), np.ones(1), np.zeros(1), np.zeros(1))


def ems_lambdas(sde: SDE, num_lambdas: int) -> np.ndarray:
    r"""``num_lambdas`` half log-SNRs uniform from :math:`\lambda(t_{max})` to
    :math:`\lambda(t_{min})` (increasing, float64): the grid on which the authors compute the
    statistics (their ``get_time_steps("logSNR", ...)``; they use 1201 or 121 points)."""
    num_lambdas = check_int("num_lambdas", num_lambdas, minimum=2)
    with jax.ensure_compile_time_eval():
        lo, hi = (0.5 * float(sde.log_snr(jnp.asarray(t))) for t in (sde.t_max, sde.t_min))
    return np.linspace(lo, hi, num_lambdas)


def _schedule(sde: SDE, lam: Array) -> tuple[Array, Array, Array]:
    r""":math:`(\alpha, \sigma, t)` at half log-SNR ``lam``; differentiable in ``lam``."""
    t = sde.time_of_log_snr(2.0 * lam)
    return sde.alpha(t), sde.sigma(t), t


def _dlog_alpha(sde: SDE, lam: Array) -> Array:
    r""":math:`d\log\alpha/d\lambda` at ``lam`` (forward-mode through ``time_of_log_snr``)."""
    return jax.jvp(lambda u: jnp.log(_schedule(sde, u)[0]), (lam,), (jnp.ones_like(lam),))[1]


def _fit(
    scale: Array, mean_f: Array, mean_f1: Array, var: Array, cov: Array
) -> tuple[Array, Array]:
    """``(s, b)`` from the moments, with ``s = 0`` where ``Var(f)`` is rounding noise relative
    to ``scale`` (the mean square of the two terms whose difference is ``f``)."""
    tiny = (16.0 * jnp.finfo(var.dtype).eps) ** 2 * scale
    degenerate = var <= tiny
    s = jnp.where(degenerate, 0.0, cov / jnp.where(degenerate, 1.0, var))
    return s, mean_f1 - s * mean_f


@jax.jit
def _gaussian_ems(sde: SDE, mu: Array, cov: Array, lambdas: Array) -> tuple[Array, Array, Array]:
    eye = jnp.eye(mu.shape[0], dtype=mu.dtype)

    def parts(lam):
        alpha, sigma, _ = _schedule(sde, lam)
        c_inv = jnp.linalg.inv(alpha**2 * cov + sigma**2 * eye)
        k = sigma**2 * 0.5 * (c_inv + c_inv.T)
        l = jnp.diagonal(k)  # noqa: E741
        return l, (k - jnp.diag(l)) / alpha, -k @ mu

    def at(lam):
        alpha, sigma, _ = _schedule(sde, lam)
        (l, a, c), (_, a_dot, c_dot) = jax.jvp(parts, (lam,), (jnp.ones_like(lam),))  # noqa: E741
        marginal = alpha**2 * cov + sigma**2 * eye
        k = sigma**2 * jnp.linalg.inv(marginal)
        p = a_dot + a @ (_dlog_alpha(sde, lam) * eye - k)
        q = c_dot + a @ (alpha * k @ mu)
        mean_x = alpha * mu
        mean_f, mean_f1 = a @ mean_x + c, p @ mean_x + q
        var = jnp.diagonal(a @ marginal @ a.T)
        cross = jnp.diagonal(p @ marginal @ a.T)
        # the mean squares of the two terms of f, sigma eps / alpha and l x / alpha
        scale = jnp.diagonal(k @ marginal @ k) + l**2 * (jnp.diagonal(marginal) + mean_x**2)
        return l, *_fit(scale / alpha**2, mean_f, mean_f1, var, cross)

    return jax.vmap(at)(lambdas)


def gaussian_ems(sde: SDE, mean: Any, covariance: Any, lambdas: Any) -> EMS:
    r"""The exact statistics of Gaussian data :math:`N(\mu, \Sigma)` with its exact model.

    With :math:`C_\lambda = \alpha^2\Sigma + \sigma^2 I` the marginal covariance,
    :math:`\varepsilon(x) = \sigma C^{-1}(x - \alpha\mu)` is affine, so
    :math:`l = \sigma^2\,\mathrm{diag}(C^{-1})`, :math:`f = Ax + c` with
    :math:`A = (\sigma^2C^{-1} - \mathrm{diag}(l))/\alpha`, :math:`c = -\sigma^2C^{-1}\mu`, and
    along the ODE :math:`\dot x = Mx + m` (:math:`M = \frac{\dot\alpha}{\alpha}I - \sigma^2C^{-1}`,
    :math:`m = \alpha\sigma^2C^{-1}\mu`), :math:`f^{(1)} = Px + q` with
    :math:`P = \dot A + AM`, :math:`q = \dot c + Am` (the :math:`\lambda`-derivatives by
    forward-mode differentiation).  Under :math:`x \sim N(\alpha\mu, C)`:
    :math:`\mathrm{Cov}(f^{(1)}_i, f_i) = (PCA^\top)_{ii}`,
    :math:`\mathrm{Var}(f_i) = (ACA^\top)_{ii}`, and :math:`s, b` follow (module docstring).
    ``mean`` ``[d]``, ``covariance`` ``[d, d]`` (symmetric positive definite), ``lambdas``
    ``[K]`` increasing; returns an :class:`EMS` with ``[K, d]`` statistics (one compiled program
    per shape).
    """
    mu = jnp.asarray(mean, jnp.result_type(float))
    cov = jnp.asarray(covariance, mu.dtype)
    if mu.ndim != 1 or cov.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mean must be [d] and covariance [d, d], got {mu.shape} and {cov.shape}")
    _check_lambdas(lambdas)
    lambdas = jnp.asarray(lambdas, mu.dtype)
    return EMS(lambdas, *_gaussian_ems(sde, mu, cov, lambdas))


def _eps_model(model: Model, sde: SDE, x: Array, lam: Array) -> Array:
    return model.predict(sde, x, _schedule(sde, lam)[2], "eps")


def _draws(key: Array, k: Array, like: Array) -> tuple[Array, Array]:
    """The noise and the Rademacher probe at the k-th lambda of one batch."""
    noise_key, probe_key = jax.random.split(jax.random.fold_in(key, k))
    return (
        jax.random.normal(noise_key, like.shape, like.dtype),
        jax.random.rademacher(probe_key, like.shape, like.dtype),
    )


@functools.partial(jax.jit, static_argnames="model")
def _diagonal_means(
    key: Array, model: Model, sde: SDE, data: Array, lambdas: Array
) -> tuple[Array, Array]:
    r"""Batch means of :math:`\sigma v\odot(\nabla_x\varepsilon_\theta v)` and of its
    :math:`\lambda`-derivative along :math:`x_\lambda = \alpha x_0 + \sigma\varepsilon`."""

    def at(inputs):
        k, lam = inputs
        noise, probe = _draws(key, k, data)

        def diagonal(u, x0, e, v):
            alpha, sigma, _ = _schedule(sde, u)
            x = alpha * x0 + sigma * e
            return sigma * v * jax.jvp(lambda y: _eps_model(model, sde, y, u), (x,), (v,))[1]

        h, h_dot = jax.vmap(
            lambda x0, e, v: jax.jvp(lambda u: diagonal(u, x0, e, v), (lam,), (jnp.ones_like(lam),))
        )(data, noise, probe)
        return jnp.mean(h, axis=0), jnp.mean(h_dot, axis=0)

    return jax.lax.map(at, (jnp.arange(lambdas.shape[0]), lambdas))


@functools.partial(jax.jit, static_argnames="model")
def _fit_moments(
    key: Array,
    model: Model,
    sde: SDE,
    data: Array,
    lambdas: Array,
    l_mean: Array,
    l_dot: Array,
) -> tuple[Array, ...]:
    r"""Batch means of :math:`f`, :math:`f^{(1)}` and of the scale, and the centred sums
    :math:`\sum(f - \bar f)^2`, :math:`\sum(f^{(1)} - \bar f^{(1)})(f - \bar f)`."""

    def at(inputs):
        k, lam, l_k, l_dot_k = inputs
        noise, _ = _draws(key, k, data)
        alpha, sigma, _ = _schedule(sde, lam)
        dlog_alpha = _dlog_alpha(sde, lam)

        def scaled_eps(y, u):
            a, s_, _ = _schedule(sde, u)
            return s_ * _eps_model(model, sde, y, u) / a

        def f_and_derivative(x0, e):
            x = alpha * x0 + sigma * e
            x_dot = dlog_alpha * x - sigma * _eps_model(model, sde, x, lam)
            big, big_dot = jax.jvp(scaled_eps, (x, lam), (x_dot, jnp.ones_like(lam)))
            f = big - l_k * x / alpha
            f1 = big_dot - (l_dot_k * x + l_k * x_dot) / alpha + l_k * x * dlog_alpha / alpha
            return f, f1, big**2 + (l_k * x / alpha) ** 2

        f, f1, sizes = jax.vmap(f_and_derivative)(data, noise)
        mean_f, mean_f1 = jnp.mean(f, axis=0), jnp.mean(f1, axis=0)
        m2 = jnp.sum((f - mean_f) ** 2, axis=0)
        cross = jnp.sum((f1 - mean_f1) * (f - mean_f), axis=0)
        return mean_f, mean_f1, jnp.mean(sizes, axis=0), m2, cross

    return jax.lax.map(at, (jnp.arange(lambdas.shape[0]), lambdas, l_mean, l_dot))


def estimate_ems(
    key: Array,
    model: Model,
    sde: SDE,
    data: Array,
    lambdas: Any,
    *,
    batch_size: int | None = None,
) -> EMS:
    r"""Monte Carlo estimate of the statistics of any ``model`` from a batch of data samples.

    For each :math:`\lambda_k` in ``lambdas`` and each data sample :math:`x_0^{(n)}` (the rows
    of ``data``, ``[n, *shape]``): :math:`x = \alpha x_0 + \sigma\varepsilon` with
    :math:`\varepsilon \sim N(0, I)` and a Rademacher probe :math:`v`; then

    * :math:`l = \mathrm{mean}_n\,\sigma\,v\odot(\nabla_x\varepsilon_\theta\,v)` (Hutchinson's
      estimator of the Jacobian's diagonal, one JVP), and :math:`\dot l` by forward-mode
      differentiation of the same per-sample quantity in :math:`\lambda` through
      :math:`x_\lambda = \alpha_\lambda x_0 + \sigma_\lambda\varepsilon` (the pathwise
      derivative of the expectation);
    * :math:`f = (\sigma\varepsilon_\theta - l\odot x)/\alpha` and its total derivative along
      the ODE, :math:`f^{(1)} = \partial_\lambda f + \nabla_x f\,\dot x` with
      :math:`\dot x = \frac{\dot\alpha}{\alpha}x - \sigma\varepsilon_\theta`, one JVP of the
      model in :math:`(x, t(\lambda))`;
    * :math:`s, b` the per-dimension least-squares fit of :math:`f^{(1)}` on :math:`f` over all
      samples (module docstring).

    Expectations are over the forward marginal :math:`x_\lambda = \alpha x_0 + \sigma
    \varepsilon` (the model's own marginal when the model is exact).  ``batch_size`` (default:
    all of ``data``, which it must divide) samples are evaluated at once, in one ``vmap``, the
    :math:`\lambda`\ s one after another (``lax.map``); batches are merged exactly (means, and
    centred second moments by the pairwise update of Chan, Golub & LeVeque 1979), so the
    statistics are those of all ``n`` samples whatever the batch size (only the draws change
    with it: batch ``j``'s draws at :math:`\lambda_k` come from ``fold_in(fold_in(key, j),
    k)``).  Two compiled programs per batch shape, reused across calls with the same ``model``
    object.  ``ValueError`` naming ``data``, ``batch_size`` or ``lambdas`` for a malformed one,
    ``TypeError`` for a key that is not a PRNG key.  The estimate converges to
    :func:`gaussian_ems` on Gaussian data with the exact model (tested).
    """
    check_key("key", key)
    check_float_array("data", data)
    if np.ndim(data) < 2 or np.shape(data)[0] < 2:
        raise ValueError(f"data must be a batch [n, *shape] with n >= 2, got {np.shape(data)}")
    n = np.shape(data)[0]
    batch = n if batch_size is None else check_int("batch_size", batch_size)
    if n % batch:
        raise ValueError(f"batch_size must divide the number of samples {n}, got {batch}")
    _check_lambdas(lambdas)
    data = jnp.asarray(data)
    lambdas = jnp.asarray(lambdas, data.dtype)
    batches = [
        (jax.random.fold_in(key, j), data[j * batch : (j + 1) * batch]) for j in range(n // batch)
    ]
    means = [_diagonal_means(k, model, sde, x0, lambdas) for k, x0 in batches]
    l, l_dot = (sum(m[i] for m in means) / len(means) for i in (0, 1))  # noqa: E741
    count = 0
    for k, x0 in batches:
        mean_f_j, mean_f1_j, scale_j, m2_j, cross_j = _fit_moments(
            k, model, sde, x0, lambdas, l, l_dot
        )
        if count == 0:
            mean_f, mean_f1, scale, m2, cross = mean_f_j, mean_f1_j, scale_j, m2_j, cross_j
        else:  # Chan, Golub & LeVeque's pairwise update of the centred moments
            total = count + batch
            d_f, d_f1 = mean_f_j - mean_f, mean_f1_j - mean_f1
            m2 = m2 + m2_j + d_f**2 * count * batch / total
            cross = cross + cross_j + d_f1 * d_f * count * batch / total
            mean_f = mean_f + d_f * batch / total
            mean_f1 = mean_f1 + d_f1 * batch / total
            scale = scale + (scale_j - scale) * batch / total
        count += batch
    s, b = _fit(scale, mean_f, mean_f1, m2 / n, cross / n)
    return EMS(lambdas, l, s, b)
