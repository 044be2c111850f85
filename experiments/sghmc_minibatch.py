r"""Stationary bias of minibatch SGLD / SGHMC against the step size, by minibatch scheme.

Target: Bayesian linear regression on scikit-learn's diabetes data (442 x 10, standardised),
:math:`y_i = a_i^\top w + \varepsilon_i`, :math:`\varepsilon_i \sim N(0, s^2)` with :math:`s^2`
the residual variance of least squares, prior :math:`w \sim N(0, \tau^2 I)`; the posterior
:math:`N(m, \Sigma)` is exact (:func:`shufflesgd.targets.bayesian_linear_regression`).  With
``whiten_features`` the features are first decorrelated, :math:`A \leftarrow A V\Lambda^{-1/2}
\sqrt n` for :math:`A^\top A = V\Lambda V^\top`, so that :math:`A^\top A = nI`: the raw design
has condition number about 470, and a chain at the smallest step sizes would need
:math:`10^5` steps to mix in its softest direction; whitening is a fixed linear
reparametrisation (a constant preconditioner) that leaves the per-example structure of the
minibatch noise intact.

Kernels (:mod:`shufflesgd.mcmc`), with :math:`L = \lambda_{max}(A^\top A)/s^2 + 1/\tau^2` the
Lipschitz constant of :math:`\nabla\log\pi` and ``step_fractions`` :math:`c \in (0, 1)`:

* ``sgld``: Welling & Teh (2011), :math:`x' = x + \eta\hat g(x) + \sqrt{2\eta}\,\xi`,
  :math:`\eta = 2c/L` (full-gradient stability needs :math:`\eta L < 2`);
* ``sghmc_euler``: Chen, Fox & Guestrin (2014), Eq. 9, :math:`h = 2c/\sqrt L`, friction
  :math:`\gamma = ` ``relative_friction`` :math:`\cdot\sqrt L`;
* ``sghmc_baoab``: the symmetric BAOAB splitting of Leimkuhler & Matthews (2013), both half
  kicks with the same minibatch, same :math:`h` and :math:`\gamma`.

Schemes (:func:`shufflesgd.shuffling.make_scheme`): ``with_replacement`` (i.i.d. indices),
``random_reshuffle``, ``single_shuffle`` and ``flipflop`` (a permutation, then its reverse: the
palindromic order of the symmetric minibatch splitting of Paulin, Whalley, Chada & Leimkuhler,
AISTATS 2025, arXiv:2410.19780, "SMS-UBU").

**Bias metrics**, in the whitened coordinates :math:`u = \Sigma^{-1/2}(x - m)` (every direction
counts equally; the stiff directions, where discretisation bias lives, are invisible to an
unwhitened Frobenius norm), from positions at epoch ends after ``burn_in_epochs``:

* ``second_moment_error`` :math:`= \|E[uu^\top] - I\|_F/\sqrt d`, the relative error of the
  second moment about the exact mean (covariance error plus the mean bias's outer product);
* ``minibatch_error`` :math:`= \|E[uu^\top] - E_{full}[uu^\top]\|_F/\sqrt d`, the part due to
  minibatching alone, against the same kernel with exact gradients;
* ``mean_error`` :math:`= \|E[u]\|`, the Mahalanobis error of the mean.

*Variance reduction.*  Every chain is run coupled (same injected noise, same start, drawn from
the posterior) with the same kernel driven by the exact gradient :math:`-\Sigma^{-1}(x-m)`,
whose stationary law solves a discrete Lyapunov equation exactly (``full`` below).  The
estimate is :math:`E_{full}[uu^\top]` (exact) plus the chain average of :math:`uu^\top -
u_f u_f^\top`, whose variance is the minibatch part's alone.  Standard errors are over
independent chains (delta method for the norms).  At small step sizes the bias can sink below
the Monte Carlo noise, so orders are fitted (log-log least squares against the step size) only
over the step sizes whose bias is at least ``fit_min_snr`` standard errors, and again over the
``fit_points_small`` smallest of those (the bias is O(1) at the largest steps, where a power law
need not hold yet).  The chains of one (kernel, scheme), every step size, run in one jitted
call, ``chain_batch`` at a time, each batch split over ``config.devices`` devices
(:func:`chain_devices`).

*Exact with-replacement solution.*  On this quadratic target the minibatch gradient is affine,
:math:`\hat g(x) = -H_B(x - m) + \varepsilon_B` with :math:`H_B, \varepsilon_B` the batch means of
:math:`h_i = I/\tau^2 + n a_i a_i^\top/s^2` and :math:`\varepsilon_i = n a_i(y_i - a_i^\top m)/s^2
- m/\tau^2`, so SGLD and SGHMC-Euler are :math:`z' = M(H_B) z + R\varepsilon_B + G\xi` with
:math:`M` affine.  With replacement the batch is independent of the state, so the stationary
mean is exact and the second moment solves

.. math:: S = \bar M S \bar M^\top + \tfrac1b\,\overline{\Delta_i S\Delta_i^\top}
          + \tfrac1b\,R\,\overline{\varepsilon_i\varepsilon_i^\top}R^\top + GG^\top,
          \quad \Delta_i = M(h_i) - M(\bar h),

a :math:`D^2 \times D^2` linear system (Kronecker form, :math:`D = 10` or 20) solved in NumPy,
independently of the JAX kernels; its operator's spectral radius is the with-replacement
mean-square stability test.  (BAOAB is quadratic in :math:`H_B`, so its fixed point needs
fourth batch moments; it is checked by Monte Carlo only.)  For RR / SS / FlipFlop the batches
of an epoch are dependent and only Monte Carlo is used.

Literature (Franzese, Milios, Filippone & Michiardi, "Revisiting the Effects of Stochasticity
for Hamiltonian Samplers", arXiv:2106.16200; Paulin et al. 2025, SMS-UBU, an :math:`O(h^2)`
bias with one minibatch per step): an :math:`O(h)` bias with replacement, a higher order with
reshuffled / symmetric minibatches for a symmetric integrator.  With exact gradients SGLD
keeps an :math:`O(\eta)` bias (whitened second moment :math:`I/(1-c)`), so its total error
returns to first order at small steps whatever the scheme; SGHMC-Euler's exact-gradient bias in
the positions is :math:`O(h^2)` on this target (from the Lyapunov solution); BAOAB's positions
are exact on Gaussians, so its total is the minibatch part alone.

Run: ``python -m experiments.sghmc_minibatch --config configs/sghmc_minibatch.py``
(``:quick`` for the short variant; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import mcmc, parallel, problems, shuffling
from shufflesgd.nn import data

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "sghmc_minibatch"
KERNELS = ("sgld", "sghmc_euler", "sghmc_baoab")
SCHEMES = ("with_replacement", "random_reshuffle", "single_shuffle", "flipflop")
EXACT_KERNELS = ("sgld", "sghmc_euler")  # with-replacement stationary law solved exactly


# ------------------------------------------------------------------ configuration


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built or compiled."""
    common.check_names("kernels", config.kernels, KERNELS)
    common.check_names("schemes", config.schemes, SCHEMES)
    fractions = tuple(config.step_fractions)
    if len(fractions) < 2:
        raise ValueError(
            "config.step_fractions needs at least two step sizes to fit an order, got "
            f"{fractions!r}"
        )
    for value in fractions:
        common.check_positive_number("step_fractions", value)
        if value >= 1.0:
            raise ValueError(
                "config.step_fractions must lie in (0, 1) (fractions of the stability limit), got "
                f"{value!r}"
            )
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"config.step_fractions must be distinct, got {fractions!r}")
    for field in ("batch_size", "sample_epochs", "chain_batch"):
        common.check_positive_ints(field, config[field])
    common.check_positive_ints("num_chains", config.num_chains)
    common.check_positive_ints("fit_points_small", config.fit_points_small)
    if config.fit_points_small < 2:
        raise ValueError(
            "config.fit_points_small must be at least 2 (a slope needs two points), got "
            f"{config.fit_points_small}"
        )
    if config.num_chains < 2:
        raise ValueError(
            "config.num_chains must be at least 2 (a standard error needs two), got "
            f"{config.num_chains}"
        )
    burn = config.burn_in_epochs
    if isinstance(burn, bool) or not isinstance(burn, int) or burn < 0:
        raise ValueError(f"config.burn_in_epochs must be a non-negative integer, got {burn!r}")
    for field in ("relative_friction", "prior_variance", "fit_min_snr"):
        common.check_positive_number(field, config[field])
    for field in ("whiten_features", "x64"):
        if not isinstance(config[field], bool):
            raise ValueError(f"config.{field} must be True or False, got {config[field]!r}")
    num_examples = data.sklearn_dataset("diabetes")[0].shape[0]
    if num_examples % config.batch_size:
        raise ValueError(
            f"config.batch_size must divide the {num_examples} examples, got {config.batch_size}"
        )
    chain_devices(config)


def chain_devices(config: ConfigDict) -> int:
    """How many devices each batch of ``config.chain_batch`` chains is split over:
    :func:`experiments.common.seed_devices` with the batch as the seeds (``ValueError`` naming
    ``config.devices`` when it is not ``None`` or a positive int, exceeds the devices available,
    or does not divide ``config.chain_batch``)."""
    return common.seed_devices(config, config.chain_batch, "config.chain_batch")


# ------------------------------------------------------------------ the target


class Problem(NamedTuple):
    """The posterior and the per-example pieces of the exact solution (NumPy, float64)."""

    model: problems.BayesianFiniteSum
    features: np.ndarray  # [n, d]
    responses: np.ndarray  # [n]
    noise_variance: float  # s^2
    prior_variance: float  # tau^2
    mean: np.ndarray  # m
    covariance: np.ndarray  # Sigma
    whitener: np.ndarray  # Sigma^{-1/2}
    lipschitz: float  # L = lambda_max(A^T A)/s^2 + 1/tau^2

    @property
    def num_examples(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def example_hessians(self) -> np.ndarray:
        """``[n, d, d]``: :math:`h_i = I/\\tau^2 + n a_i a_i^\\top / s^2` (mean: the precision)."""
        n, d = self.features.shape
        outer = np.einsum("ni,nj->nij", self.features, self.features)
        return np.eye(d) / self.prior_variance + n * outer / self.noise_variance

    def example_noises(self) -> np.ndarray:
        """``[n, d]``: :math:`\\varepsilon_i = \\hat g_{\\{i\\}}(m)`, the one-example gradient at
        the mean (mean 0)."""
        n = self.num_examples
        residual = self.responses - self.features @ self.mean
        return (
            n * self.features * residual[:, None] / self.noise_variance
            - self.mean / self.prior_variance
        )


def build_problem(config: ConfigDict) -> Problem:
    """Diabetes regression (optionally whitened) with :math:`s^2` the least-squares residual
    variance."""
    features, responses = data.sklearn_dataset("diabetes")
    n, d = features.shape
    if config.whiten_features:
        eigvals, eigvecs = np.linalg.eigh(features.T @ features)
        features = features @ eigvecs * np.sqrt(n / eigvals)
    coef = np.linalg.lstsq(features, responses, rcond=None)[0]
    residual = responses - features @ coef
    noise_variance = float(residual @ residual / (n - d))
    model, posterior = problems.bayesian_linear_regression(
        features, responses, noise_variance, config.prior_variance
    )
    covariance = np.asarray(posterior.covariance, np.float64)
    eigvals, eigvecs = np.linalg.eigh(covariance)
    whitener = eigvecs @ np.diag(eigvals**-0.5) @ eigvecs.T
    lipschitz = float(
        np.linalg.eigvalsh(features.T @ features)[-1] / noise_variance + 1.0 / config.prior_variance
    )
    return Problem(
        model,
        features,
        responses,
        noise_variance,
        float(config.prior_variance),
        np.asarray(posterior.mean, np.float64),
        covariance,
        whitener,
        lipschitz,
    )


def step_sizes(kernel: str, fractions: Any, lipschitz: float) -> np.ndarray:
    """:math:`\\eta = 2c/L` for SGLD, :math:`h = 2c/\\sqrt L` for SGHMC (``c`` the fraction of the
    full-gradient stability limit)."""
    scale = 2.0 / lipschitz if kernel == "sgld" else 2.0 / math.sqrt(lipschitz)
    return scale * np.asarray(fractions, np.float64)


def friction(config: ConfigDict, lipschitz: float) -> float:
    """:math:`\\gamma = ` ``relative_friction`` :math:`\\cdot\\sqrt L`."""
    return float(config.relative_friction * math.sqrt(lipschitz))


# ------------------------------------------------------------------ exact linear algebra (NumPy)


class LinearKernel(NamedTuple):
    r"""One step in error coordinates :math:`z = (x - m[, v])`:
    :math:`z' = M z + R\varepsilon + G\xi`."""

    transition: np.ndarray  # M, [D, D]
    force: np.ndarray  # R, [D, d]
    noise: np.ndarray  # G, [D, d]


def linear_kernel(kernel: str, hessian: np.ndarray, step: float, gamma: float) -> LinearKernel:
    """The kernel's step for the gradient :math:`-H(x - m) + \\varepsilon` (one fixed ``H``),
    written out from the papers' update rules, independently of :mod:`shufflesgd.mcmc`."""
    d = hessian.shape[0]
    eye, zero = np.eye(d), np.zeros((d, d))
    if kernel == "sgld":
        return LinearKernel(eye - step * hessian, step * eye, math.sqrt(2.0 * step) * eye)
    drift = lambda t: np.block([[eye, t * eye], [zero, eye]])  # noqa: E731  x += t v
    if kernel == "sghmc_euler":
        kick = np.block([[eye, zero], [-step * hessian, (1.0 - step * gamma) * eye]])
        inject = np.vstack([zero, eye])
        return LinearKernel(
            drift(step) @ kick,
            drift(step) @ inject * step,
            drift(step) @ inject * math.sqrt(2.0 * gamma * step),
        )
    half = 0.5 * step
    kick = np.block([[eye, zero], [-half * hessian, eye]])  # v += (h/2) g(x)
    decay = math.exp(-gamma * step)
    ou = np.block([[eye, zero], [zero, decay * eye]])
    inject = np.vstack([zero, math.sqrt(1.0 - decay**2) * eye])
    after_o = kick @ drift(half)
    force_once = np.vstack([zero, half * eye])
    return LinearKernel(
        after_o @ ou @ drift(half) @ kick,
        after_o @ ou @ drift(half) @ force_once + force_once,
        after_o @ inject,
    )


def _solve_stationary_moment(operator: np.ndarray, forcing: np.ndarray) -> tuple[np.ndarray, float]:
    """Solve :math:`\\mathrm{vec} S = T\\,\\mathrm{vec} S + \\mathrm{vec} Q`; return ``S`` and
    the spectral radius of ``T`` (mean-square stability iff it is below 1)."""
    dim = forcing.shape[0]
    radius = float(np.max(np.abs(np.linalg.eigvals(operator))))
    if radius >= 1.0:
        return np.full((dim, dim), np.nan), radius
    moment = np.linalg.solve(np.eye(dim * dim) - operator, forcing.reshape(-1)).reshape(dim, dim)
    return 0.5 * (moment + moment.T), radius


def exact_full_gradient_moment(
    problem: Problem, kernel: str, step: float, gamma: float
) -> np.ndarray:
    """Whitened stationary second moment of the positions with exact gradients (discrete
    Lyapunov)."""
    precision = np.linalg.inv(problem.covariance)
    lin = linear_kernel(kernel, precision, step, gamma)
    moment, _ = _solve_stationary_moment(
        np.kron(lin.transition, lin.transition), lin.noise @ lin.noise.T
    )
    d = problem.dim
    return problem.whitener @ moment[:d, :d] @ problem.whitener.T


def exact_with_replacement_moment(
    problem: Problem, kernel: str, step: float, gamma: float, batch_size: int
) -> tuple[np.ndarray, float]:
    """Whitened stationary second moment with i.i.d. minibatches of ``batch_size`` (see the
    module docstring) and the spectral radius of the moment operator; NaNs if unstable."""
    if kernel not in EXACT_KERNELS:
        raise ValueError(
            f"kernel must be one of {list(EXACT_KERNELS)} (affine in the batch Hessian), got "
            f"{kernel!r}"
        )
    hessians = problem.example_hessians()
    noises = problem.example_noises()
    mean_lin = linear_kernel(kernel, hessians.mean(axis=0), step, gamma)
    deltas = (
        np.stack([linear_kernel(kernel, h, step, gamma).transition for h in hessians])
        - mean_lin.transition
    )
    dim = deltas.shape[-1]
    spread = np.einsum("nab,ncd->acbd", deltas, deltas).reshape(dim * dim, dim * dim) / len(
        hessians
    )
    operator = np.kron(mean_lin.transition, mean_lin.transition) + spread / batch_size
    force_cov = mean_lin.force @ (noises.T @ noises / len(noises)) @ mean_lin.force.T
    forcing = force_cov / batch_size + mean_lin.noise @ mean_lin.noise.T
    moment, radius = _solve_stationary_moment(operator, forcing)
    d = problem.dim
    return problem.whitener @ moment[:d, :d] @ problem.whitener.T, radius


# ------------------------------------------------------------------ simulation (JAX)


def make_kernel(kernel: str, grad_estimator: mcmc.GradientEstimator) -> mcmc.SamplingAlgorithm:
    if kernel == "sgld":
        return mcmc.sgld(grad_estimator)
    return mcmc.sghmc(grad_estimator, "euler" if kernel == "sghmc_euler" else "baoab")


def coupled(
    minibatch: mcmc.SamplingAlgorithm, exact: mcmc.SamplingAlgorithm
) -> mcmc.SamplingAlgorithm:
    """Run a minibatch kernel and an exact-gradient kernel side by side with the same injected
    noise (the key is cloned on purpose: a synchronous coupling).  The state is an
    :class:`mcmc.SGState` whose position and momentum are (minibatch, exact) pairs."""

    def init(position: jax.Array) -> mcmc.SGState:
        a, b = minibatch.init(position), exact.init(position)
        return mcmc.SGState((a.position, b.position), (a.momentum, b.momentum))

    def step(key: jax.Array, state: mcmc.SGState, batch: jax.Array, *hyper: Any):
        twin = jax.random.clone(key)
        a, info = minibatch.step(
            key, mcmc.SGState(state.position[0], state.momentum[0]), batch, *hyper
        )
        b, _ = exact.step(twin, mcmc.SGState(state.position[1], state.momentum[1]), batch, *hyper)
        return mcmc.SGState((a.position, b.position), (a.momentum, b.momentum)), info

    return mcmc.SamplingAlgorithm(init, step)


class ChainStats(NamedTuple):
    """Per-chain time averages over the post-burn-in epoch ends, in whitened coordinates."""

    mean: jax.Array  # E[u], minibatch chain
    mean_exact: jax.Array  # E[u_f], its exact-gradient twin
    moment: jax.Array  # E[u u^T]
    moment_exact: jax.Array  # E[u_f u_f^T]


def make_simulator(
    kernel: str, scheme_name: str, problem: Problem, config: ConfigDict
) -> Callable[..., ChainStats]:
    """A jitted ``(key, step_sizes[E], gamma) -> ChainStats`` with leading axes
    ``[E, num_chains]``: all step sizes and chains of one (kernel, scheme) in one call,
    ``config.chain_batch`` chains at a time, each batch split over the devices of
    :func:`chain_devices`."""
    model = problem.model
    dtype = jnp.result_type(float)
    mean = jnp.asarray(problem.mean, dtype)
    precision = jnp.asarray(np.linalg.inv(problem.covariance), dtype)
    whitener = jnp.asarray(problem.whitener, dtype)
    chol = jnp.asarray(np.linalg.cholesky(problem.covariance), dtype)
    pair = coupled(
        make_kernel(kernel, model.grad_estimator),
        make_kernel(kernel, lambda w, batch: precision @ (mean - w)),
    )
    scheme = shuffling.make_scheme(scheme_name, model.num_examples)
    num_epochs = config.burn_in_epochs + config.sample_epochs

    def one_chain(inputs: tuple[jax.Array, jax.Array, jax.Array]) -> ChainStats:
        key, step, gamma = inputs
        start_key, chain_key = jax.random.split(key)
        start = mean + chol @ jax.random.normal(start_key, mean.shape, dtype)
        hyper = (step,) if kernel == "sgld" else (step, gamma)
        _, (positions, positions_exact), _ = mcmc.run_minibatch_chain(
            pair,
            chain_key,
            pair.init(start),
            scheme,
            num_epochs,
            config.batch_size,
            *hyper,
            record="epoch",
        )
        u = (positions[config.burn_in_epochs :] - mean) @ whitener.T
        uf = (positions_exact[config.burn_in_epochs :] - mean) @ whitener.T
        second = lambda w: w.T @ w / w.shape[0]  # noqa: E731
        return ChainStats(u.mean(axis=0), uf.mean(axis=0), second(u), second(uf))

    mesh = parallel.worker_mesh(chain_devices(config), axis=common.SEEDS)
    split = parallel.worker_sharding(mesh, axis=common.SEEDS)

    def block(inputs: tuple[jax.Array, jax.Array, jax.Array]) -> ChainStats:
        """Chains run together, split over the devices when they divide evenly."""
        if inputs[0].shape[0] % mesh.shape[common.SEEDS] == 0:
            inputs = jax.lax.with_sharding_constraint(inputs, split)
        return jax.vmap(one_chain)(inputs)

    @jax.jit
    def simulate(key: jax.Array, steps: jax.Array, gamma: jax.Array) -> ChainStats:
        num_steps, chains = steps.shape[0], config.num_chains
        keys = jax.random.split(key, num_steps * chains)
        flat_steps = jnp.repeat(steps.astype(dtype), chains)
        gammas = jnp.full((num_steps * chains,), gamma, dtype)
        # jax.lax.map(one_chain, inputs, batch_size=config.chain_batch), written out so that
        # each batch is split over the devices: lax.map over the full batches, then the rest.
        batches, rest = divmod(num_steps * chains, config.chain_batch)
        head = batches * config.chain_batch
        stats = []
        if batches:
            scanned = jax.lax.map(
                block,
                jax.tree.map(
                    lambda a: a[:head].reshape((batches, config.chain_batch) + a.shape[1:]),
                    (keys, flat_steps, gammas),
                ),
            )
            stats.append(jax.tree.map(lambda a: a.reshape((head,) + a.shape[2:]), scanned))
        if rest:
            stats.append(block(jax.tree.map(lambda a: a[head:], (keys, flat_steps, gammas))))
        stats = jax.tree.map(lambda *parts: jax.lax.concatenate(parts, 0), *stats)
        return jax.tree.map(lambda a: a.reshape((num_steps, chains) + a.shape[1:]), stats)

    return simulate


# ------------------------------------------------------------------ estimates and orders


def _norm_with_se(centre: np.ndarray, per_chain: np.ndarray, scale: float) -> tuple[float, float]:
    """``||centre + mean_c Y_c|| * scale`` and its delta-method standard error over chains
    ``Y_c``."""
    estimate = centre + per_chain.mean(axis=0)
    value = float(np.linalg.norm(estimate))
    if value == 0.0:
        return 0.0, float("nan")
    direction = (estimate / value).reshape(-1)
    projections = per_chain.reshape(per_chain.shape[0], -1) @ direction
    se = float(projections.std(ddof=1) / math.sqrt(per_chain.shape[0]))
    return value * scale, se * scale


def summarise(stats: ChainStats, full_moments: np.ndarray) -> list[dict[str, Any]]:
    """Per step size: the three bias metrics with standard errors, the naive (uncoupled)
    second-moment error, and the whitened second-moment estimate with entrywise SEs."""
    moment = np.asarray(stats.moment, np.float64)
    moment_exact = np.asarray(stats.moment_exact, np.float64)
    diff = moment - moment_exact  # [E, C, d, d]
    mean_diff = np.asarray(stats.mean, np.float64) - np.asarray(stats.mean_exact, np.float64)
    num_chains, d = diff.shape[1], diff.shape[-1]
    eye, scale = np.eye(d), 1.0 / math.sqrt(d)
    out = []
    for e, full in enumerate(full_moments):
        total, total_se = _norm_with_se(full - eye, diff[e], scale)
        part, part_se = _norm_with_se(np.zeros((d, d)), diff[e], scale)
        mean_err, mean_se = _norm_with_se(np.zeros(d), mean_diff[e], 1.0)
        naive, naive_se = _norm_with_se(-eye, moment[e], scale)
        full_sim = moment_exact[e].mean(axis=0)
        full_sim_se = moment_exact[e].std(axis=0, ddof=1) / math.sqrt(num_chains)
        out.append(
            {
                "second_moment_error": total,
                "second_moment_error_se": total_se,
                "minibatch_error": part,
                "minibatch_error_se": part_se,
                "mean_error": mean_err,
                "mean_error_se": mean_se,
                "naive_second_moment_error": naive,
                "naive_second_moment_error_se": naive_se,
                "exact_gradient_second_moment_error": float(np.linalg.norm(full - eye) * scale),
                "exact_gradient_twin_max_abs_z": float(
                    np.max(np.abs(full_sim - full) / full_sim_se)
                ),
                "moment": full + diff[e].mean(axis=0),
                "moment_se": diff[e].std(axis=0, ddof=1) / math.sqrt(num_chains),
            }
        )
    return out


def fit_order(
    steps: np.ndarray,
    values: np.ndarray,
    ses: np.ndarray,
    min_snr: float,
    smallest: int | None = None,
) -> tuple[float, int]:
    """Log-log slope over the step sizes with ``value >= min_snr * se`` (NaN if fewer than two);
    with ``smallest``, over only the ``smallest`` smallest of those (the asymptotic end)."""
    keep = np.isfinite(values) & (values >= min_snr * np.nan_to_num(ses, nan=np.inf))
    if smallest is not None:
        resolved = np.flatnonzero(keep)
        keep = np.zeros_like(keep)
        keep[resolved[np.argsort(steps[resolved])[:smallest]]] = True
    if keep.sum() < 2:
        return float("nan"), int(keep.sum())
    return common.loglog_slope(steps[keep], values[keep]), int(keep.sum())


# ------------------------------------------------------------------ output


def format_table(metrics: dict[str, Any]) -> str:
    lines = [
        (
            "stationary bias, whitened: 2nd-moment err = ||E[uu^T] - I||_F/sqrt(d), minibatch part "
            "= the same against the exact-gradient kernel, mean err = Mahalanobis; ± 1 SE over "
            "chains; c = fraction of the stability limit; exact WR = the with-replacement fixed "
            "point (NumPy), max|z| = its largest entrywise z-score"
        ),
        (
            f"{'kernel':12s} {'scheme':17s} {'c':>7s} {'step':>9s} {'2nd-moment err ± SE':>21s} "
            f"{'minibatch part ± SE':>21s} {'mean err ± SE':>21s} {'exact WR':>9s} {'max|z|':>7s}"
        ),
    ]
    for label, r in metrics["runs"].items():
        kernel, scheme = label.split("/")
        for p in r["points"]:
            exact = (
                f"{p['exact_with_replacement']:9.3e}"
                if "exact_with_replacement" in p
                else f"{'':9s}"
            )
            z = f"{p['max_abs_z_vs_exact']:7.2f}" if "max_abs_z_vs_exact" in p else f"{'':7s}"
            lines.append(
                f"{kernel:12s} {scheme:17s} {p['fraction']:7.4f} {p['step_size']:9.3e} "
                f"{p['second_moment_error']:9.3e} ± {p['second_moment_error_se']:8.1e} "
                f"{p['minibatch_error']:9.3e} ± {p['minibatch_error_se']:8.1e} "
                f"{p['mean_error']:9.3e} ± {p['mean_error_se']:8.1e} {exact} {z}"
            )
    snr = metrics["fit_min_snr"]
    lines += [
        "",
        (
            f"fitted orders (log-log slope vs step size, only over points with bias >= {snr:g} SE; "
            "[points used]); "
            f"'small': over the {metrics['fit_points_small']} smallest such step sizes"
        ),
        (
            f"{'kernel':12s} {'scheme':17s} {'2nd-moment':>11s} {'small':>11s} {'minibatch':>11s} "
            f"{'small':>11s} "
            f"{'mean':>11s} {'exact WR':>9s} {'small':>6s}"
        ),
    ]
    fmt = lambda o, k: f"{o:+6.2f} [{k}]" if math.isfinite(o) else f"{'n/a':>6s} [{k}]"  # noqa: E731
    for label, r in metrics["runs"].items():
        kernel, scheme = label.split("/")
        o = r["orders"]
        exact = (
            f"{o['exact_with_replacement']:+9.2f} {o['exact_with_replacement_small']:+6.2f}"
            if "exact_with_replacement" in o
            else ""
        )
        cells = [
            fmt(o[f], o[f + "_points"])
            for f in (
                "second_moment_error",
                "second_moment_error_small",
                "minibatch_error",
                "minibatch_error_small",
                "mean_error",
            )
        ]
        lines.append(
            f"{kernel:12s} {scheme:17s} " + " ".join(f"{cell:>11s}" for cell in cells) + f" {exact}"
        )
    return "\n".join(lines)


def _floats(points: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if p[key] is None else p[key] for p in points], float)


def draw(metrics: dict[str, Any], config: ConfigDict, path) -> None:
    """Errors against the step size on log-log axes: only finite, positive points are drawn; a
    curve with points left out (a diverged chain) says how many in its legend label."""
    kernels = tuple(config.kernels)
    fig, axes = plt.subplots(2, len(kernels), figsize=(5.2 * len(kernels), 8.4), squeeze=False)
    for col, kernel in enumerate(kernels):
        for row, field in enumerate(("second_moment_error", "minibatch_error")):
            axis = axes[row, col]
            drawn = []  # finite, positive (step, value) points, to place the slope guides
            for scheme in config.schemes:
                r = metrics["runs"][f"{kernel}/{scheme}"]
                steps, values, ses, dropped = common.finite_curve(
                    _floats(r["points"], "step_size"),
                    _floats(r["points"], field),
                    _floats(r["points"], field + "_se"),
                )
                drawn.extend(zip(steps, values))
                order = r["orders"][field]
                label = f"{scheme} (order {np.nan if order is None else order:.2f})"
                label = common.not_shown(label, dropped)
                axis.errorbar(steps, values, yerr=ses, marker="o", ms=4, capsize=2, label=label)
                if field == "second_moment_error" and "exact_with_replacement" in r["orders"]:
                    exact_steps, exact, _, _ = common.finite_curve(
                        _floats(r["points"], "step_size"),
                        _floats(r["points"], "exact_with_replacement"),
                    )
                    axis.plot(exact_steps, exact, "k--", lw=0.8, label="with replacement, exact")
            if drawn:
                steps = np.unique([s for s, _ in drawn])
                top = max(v for _, v in drawn)
                for power, style in ((1, ":"), (2, "-.")):
                    axis.plot(
                        steps,
                        top * (steps / steps.max()) ** power,
                        "0.5",
                        ls=style,
                        lw=0.8,
                        label=f"slope {power}",
                    )
            axis.set(
                xscale="log",
                yscale="log",
                xlabel="step size",
                ylabel="||E[uu^T] - I||/sqrt(d)" if row == 0 else "minibatch part",
                title=f"{kernel}",
            )
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
    fig.suptitle(
        f"diabetes posterior, batch {config.batch_size}, {config.num_chains} chains x "
        f"{config.sample_epochs} epochs"
    )
    common.save_figure(fig, path)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the sweep; return the metrics and write them, the table, the CSV and the figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    problem = build_problem(config)
    gamma = friction(config, problem.lipschitz)
    folder = common.results_folder(config, NAME)
    metrics: dict[str, Any] = {
        "devices": chain_devices(config),  # the chain axis was split over these
        "num_examples": problem.num_examples,
        "dim": problem.dim,
        "noise_variance": problem.noise_variance,
        "lipschitz": problem.lipschitz,
        "friction": gamma,
        "condition_number": float(np.linalg.cond(problem.covariance)),
        "fit_min_snr": config.fit_min_snr,
        "fit_points_small": config.fit_points_small,
        "runs": {},
    }
    rows = []
    base = jax.random.key(config.seed)
    combos = [(k, s) for k in config.kernels for s in config.schemes]
    start = time.perf_counter()
    for index, (kernel, scheme) in enumerate(tqdm(combos, desc=NAME)):
        steps = step_sizes(kernel, config.step_fractions, problem.lipschitz)
        simulate = make_simulator(kernel, scheme, problem, config)
        stats = jax.block_until_ready(
            simulate(jax.random.fold_in(base, index), jnp.asarray(steps), gamma)
        )
        full = np.stack([exact_full_gradient_moment(problem, kernel, h, gamma) for h in steps])
        points = summarise(stats, full)
        exact = kernel in EXACT_KERNELS and scheme == "with_replacement"
        for c, h, p in zip(config.step_fractions, steps, points):
            p.update(fraction=float(c), step_size=float(h))
            if exact:
                moment, radius = exact_with_replacement_moment(
                    problem, kernel, h, gamma, config.batch_size
                )
                iu = np.triu_indices(problem.dim)
                error = np.linalg.norm(moment - np.eye(problem.dim)) / math.sqrt(problem.dim)
                p.update(
                    exact_with_replacement=float(error),
                    moment_operator_radius=radius,
                    max_abs_z_vs_exact=float(
                        np.max(np.abs(p["moment"] - moment)[iu] / p["moment_se"][iu])
                    ),
                )
                p["z_vs_exact"] = (p["second_moment_error"] - p["exact_with_replacement"]) / p[
                    "second_moment_error_se"
                ]
        orders: dict[str, Any] = {}
        for field in ("second_moment_error", "minibatch_error", "mean_error"):
            values = np.array([p[field] for p in points])
            ses = np.array([p[field + "_se"] for p in points])
            orders[field], orders[field + "_points"] = fit_order(
                steps, values, ses, config.fit_min_snr
            )
            orders[field + "_small"], orders[field + "_small_points"] = fit_order(
                steps, values, ses, config.fit_min_snr, config.fit_points_small
            )
        if exact:
            values = np.array([p["exact_with_replacement"] for p in points])
            small = np.argsort(steps)[: config.fit_points_small]
            orders["exact_with_replacement"] = common.loglog_slope(steps, values)
            orders["exact_with_replacement_small"] = common.loglog_slope(
                steps[small], values[small]
            )
        metrics["runs"][f"{kernel}/{scheme}"] = {"points": points, "orders": orders}
        for p in points:
            rows.append(
                [
                    kernel,
                    scheme,
                    p["fraction"],
                    p["step_size"],
                    p["second_moment_error"],
                    p["second_moment_error_se"],
                    p["minibatch_error"],
                    p["minibatch_error_se"],
                    p["mean_error"],
                    p["mean_error_se"],
                    p.get("exact_with_replacement", ""),
                ]
            )
    metrics["seconds"] = time.perf_counter() - start
    table = format_table(metrics)
    common.write_csv(
        folder / "bias.csv",
        [
            "kernel",
            "scheme",
            "fraction",
            "step_size",
            "second_moment_error",
            "second_moment_error_se",
            "minibatch_error",
            "minibatch_error_se",
            "mean_error",
            "mean_error_se",
            "exact_with_replacement",
        ],
        rows,
    )
    print(
        f"n = {problem.num_examples}, d = {problem.dim}, s^2 = {problem.noise_variance:.4f}, "
        f"L = {problem.lipschitz:.1f}, friction = {gamma:.2f}, batch = {config.batch_size}, "
        f"sweep {metrics['seconds']:.1f} s"
    )
    return common.finish(folder, table, metrics, lambda path: draw(metrics, config, path))


if __name__ == "__main__":
    common.main(run, validate)
