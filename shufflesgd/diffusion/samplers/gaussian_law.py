r"""Exact output laws of samplers on a Gaussian target (no Monte Carlo).

For data :math:`x_0 \sim N(\mu, \Sigma)` every forward marginal is Gaussian,
:math:`p_t = N(\alpha_t\mu, \alpha_t^2\Sigma + \sigma_t^2 I)`, so the exact score, and every
other model output, is affine in :math:`x`.  A sampler whose update is affine in the model
output and in its noise (every registered sampler with ``affine=True``) is then an affine map
of its prior draw :math:`x_T \sim N(0, \sigma_T^2 I)` and of its standard Gaussian draws
:math:`z`:

.. math:: x = A\,x_T + B\,z + c \quad\Longrightarrow\quad
          x \sim N\bigl(c,\ \sigma_T^2 AA^\top + BB^\top\bigr),

with :math:`A, B` Jacobians (``jax.jacrev``) and :math:`c` the output at
:math:`x_T = 0, z = 0`.  This turns a sampler's error into a closed-form distance — the KL
divergence or :math:`W_2` to the true :math:`p_t` — that can be measured down to round-off at
every NFE, which is how solver orders are measured without a network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd.diffusion.processes import SDE
from shufflesgd.diffusion.samplers.base import Model, SamplerInfo, mixture_model
from shufflesgd.diffusion.samplers.registry import sampler_spec
from shufflesgd.metrics import gaussian_kl
from shufflesgd.problems.mixtures import gaussian_mixture

Array = jax.Array


def exact_gaussian_law(
    sampler: Callable[..., tuple[Array, SamplerInfo]],
    model: Model,
    sde: SDE,
    grid: Array,
    dim: int,
    draws_per_step: int,
    **options: Any,
) -> tuple[Array, Array]:
    r"""Mean and covariance of a sampler's output when the model output is affine in x.

    :math:`x_0 = A x_T + B z + c` with :math:`x_T \sim N(0, \sigma_T^2 I)` and
    :math:`z \sim N(0, I)` the explicit noise, hence
    :math:`x_0 \sim N(c, \sigma_T^2 AA^\top + BB^\top)` exactly.  ``draws_per_step`` must be at
    least the sampler's number of draws per step (``SAMPLERS[name].cost(**options)``).
    ``options`` are passed to the sampler, whose own defaults apply otherwise (``final =
    "denoise"`` among them).  :func:`gaussian_sampler_law` does all of this from a sampler's
    name and the target's mean and covariance.
    """
    num_steps = jnp.asarray(grid).shape[0] - 1
    shape = (num_steps, draws_per_step, dim)

    def run(x_T: Array, z: Array) -> Array:
        return sampler(jax.random.key(0), model, sde, x_T, grid, noise=z.reshape(shape), **options)[
            0
        ]

    x_T, z = jnp.zeros(dim), jnp.zeros(int(np.prod(shape)))
    mean = run(x_T, z)
    a, b = jax.jacrev(run, argnums=(0, 1))(x_T, z)
    return mean, sde.prior_std**2 * a @ a.T + b @ b.T


class GaussianSamplerLaw(NamedTuple):
    """The exact law :math:`N(\\text{mean}, \\text{covariance})` of a sampler's output, the law it
    should have (``target_mean``, ``target_covariance``), the KL divergence between the two in
    nats, and the sampler's ``info.nfe``."""

    mean: Array
    covariance: Array
    target_mean: Array
    target_covariance: Array
    kl: Array
    nfe: Array


def gaussian_sampler_law(
    name: str,
    sde: SDE,
    mean: Any,
    covariance: Any,
    grid: Array,
    **options: Any,
) -> GaussianSamplerLaw:
    r"""The exact output law of the registered sampler ``name`` on the Gaussian data
    :math:`N(\mu, \Sigma)` (``mean``, ``covariance``), with the exact score as its model.

    Runs ``SAMPLERS[name]`` from :math:`x_T \sim N(0, \sigma_T^2 I)` down the time ``grid``
    with ``options``, and the sampler's own defaults for every option not given — as stated in
    its docstring; in particular ``final="denoise"`` (the model's :math:`x_0` at ``grid[-1]``,
    one more evaluation) and, for DPM-Solver++, ``lower_order_final=True``.  The noise draws a
    step come from the registry (:meth:`SamplerSpec.cost`).  The target is the law the output
    should have: :math:`p_{t_N} = N(\alpha\mu, \alpha^2\Sigma + \sigma^2 I)` at
    :math:`t_N` = ``grid[-1]`` for ``final="none"``, the data law :math:`N(\mu, \Sigma)` for a
    final step to :math:`t = 0`; ``kl`` is :math:`KL(\text{output}\,\|\,\text{target})`.

    ``mean`` and ``covariance`` are concrete (the covariance is factored once, in NumPy); the
    grid and any traceable option may be traced, so ``jax.jit(lambda g: gaussian_sampler_law(
    name, sde, mean, covariance, g))`` serves every grid of one length.  ``ValueError`` for a
    sampler whose output law is not Gaussian (``affine=False``: predictor–corrector,
    the adaptive ODE solver) or for a malformed target.
    """
    spec = sampler_spec(name)
    if not spec.affine:
        raise ValueError(
            f"sampler {name!r} is not affine in its inputs, so its output law is "
            "not Gaussian; gaussian_sampler_law takes a sampler with affine=True"
        )
    mu, cov = np.asarray(mean, np.float64), np.asarray(covariance, np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mean must be a vector [d], got shape {mu.shape}")
    if cov.shape != (mu.shape[0], mu.shape[0]):
        d = mu.shape[0]
        raise ValueError(f"covariance must have shape {(d, d)}, got {cov.shape}")
    if not np.allclose(cov, cov.T) or np.any(np.linalg.eigvalsh(cov) <= 0):
        raise ValueError("covariance must be symmetric positive definite")
    draws = spec.cost(**options).noise_draws_per_step
    final = spec.options(**options)["final"]
    with jax.ensure_compile_time_eval():  # concrete under jit too: the eigenbasis is NumPy's
        law = gaussian_mixture([1.0], mu[None], cov[None])
        model = mixture_model(sde, law.eigen())
    out_mean, out_cov = exact_gaussian_law(
        spec.sampler, model, sde, grid, law.dim, draws, **options
    )
    noise = jnp.zeros((jnp.asarray(grid).shape[0] - 1, draws, law.dim))
    nfe = spec.sampler(None, model, sde, jnp.zeros(law.dim), grid, noise=noise, **options)[1].nfe
    if final == "none":
        t = jnp.asarray(grid)[-1]
        law = law.diffuse(sde.alpha(t), sde.sigma(t))
    target_mean, target_cov = law.means[0], law.covariances[0]
    kl = gaussian_kl(out_mean, out_cov, target_mean, target_cov)
    return GaussianSamplerLaw(out_mean, out_cov, target_mean, target_cov, kl, nfe)
