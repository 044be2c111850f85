r"""Composing diffusion models: products and annealed targets by Feynman–Kac correctors, and
SuperDiff's Itô density estimate and its OR / AND superpositions, each against exact answers.

Two experts share the VP process: 2-D Gaussian mixtures :math:`p_1, p_2` with different modes,
weights and covariances (:data:`EXPERT_1`, :data:`EXPERT_2`), whose scores are exact at every
noise level (:func:`shufflesgd.diffusion.mixture_model`).  Every sampler stops at the grid's
last time :math:`t_{min}`, and every target is taken there (the diffused laws
:math:`p_{i,t_{min}}`, written :math:`p_i` below), where it is known in closed form.

* **Part A, product of experts** (Hinton 2002, "Training products of experts by minimizing
  contrastive divergence", Neural Computation 14(8)).  The normalised product
  :math:`p_1p_2/Z` of two Gaussian mixtures is a Gaussian mixture (:func:`product_mixture`):
  :math:`N(\mu_k, \Sigma_k)N(\nu_l, \Lambda_l) = Z_{kl}N(m_{kl}, C_{kl})` with
  :math:`Z_{kl} = N(\mu_k; \nu_l, \Sigma_k + \Lambda_l)`, :math:`C_{kl} = (\Sigma_k^{-1} +
  \Lambda_l^{-1})^{-1}`, :math:`m_{kl} = C_{kl}(\Sigma_k^{-1}\mu_k + \Lambda_l^{-1}\nu_l)`,
  weights :math:`\propto w_kv_lZ_{kl}`; its normaliser is checked against quadrature of
  :math:`p_1p_2` on a grid, and exact draws are available.  The Feynman–Kac corrector
  (Skreta et al. 2025, "Feynman-Kac Correctors in Diffusion: Annealing, Guidance, and Product
  of Experts", arXiv:2503.02819; :func:`shufflesgd.diffusion.feynman_kac.feynman_kac_corrector`
  with :math:`\beta = (1, 1)`) runs ``fk_systems`` independent systems of :math:`N` particles
  (each ``fk_particles``), resampled to equal weights at the end and pooled; the naive baseline
  is the same program without weights (``ess_threshold`` 0, weights ignored): the reverse SDE of
  the summed score, which is not the score of a diffused law.  Measured: sliced :math:`W_2` of
  the pooled particles to as many exact draws of the product, beside the distance between two
  exact sample sets of that size (the Monte Carlo floor); the component-mass total variation
  between the pooled particles and the exact draws (each point assigned to its most responsible
  component of the product, :func:`mass_tv`), beside the floor; the mean sliced :math:`W_2` of
  one system to :math:`N` exact draws, beside its floor; the ESS (each system's smallest, before
  resampling), the resampling count and the network evaluations per particle.  Mean ± SE over
  ``num_seeds`` repetitions.
* **Part B, annealing**: the tempered expert :math:`p_1^\beta/Z` for each of ``betas``, by FK
  (one model, exponent :math:`\beta`) and naively (the score times :math:`\beta`, no weights);
  exact draws by quadrature on a grid (a cell by its mass, then a uniform point in it: exact up
  to the cell size), distances as in Part A (component masses by :math:`p_1`'s components).
* **Part C, the Itô density estimator** (Skreta et al. 2024, "The Superposition of Diffusion
  Models Using the Itô Density Estimator", arXiv:2412.17762;
  :func:`shufflesgd.diffusion.reverse_sde_log_density`): along Euler–Maruyama paths of
  :math:`p_1`, the error :math:`|\log\hat q - \log p_1(x)|` against the exact log-density at
  each of ``ito_steps``, mean ± SE over ``ito_paths`` paths, and its fitted order (minus the
  log-log slope); beside it, if ``likelihood_points`` > 0, the probability-flow ODE likelihood's
  error at as many of the endpoints (:func:`shufflesgd.diffusion.log_likelihood`, Dopri5 at its
  default tolerances, exact divergence).
* **Part D, SuperDiff** (Skreta et al. 2024; :func:`shufflesgd.diffusion.superdiff`).  OR: the
  sliced :math:`W_2` of its samples to exact draws of the mixture :math:`\frac12(p_1 + p_2)`,
  beside the floor.  AND samples points of *equal estimated density*, not the product: its
  weights keep the Itô estimates :math:`\log\hat q_1 = \log\hat q_2` along the path.  Measured:
  the exact :math:`|\log p_1(x) - \log p_2(x)|` at its samples against the plain average of
  the scores (:math:`\kappa = \frac12`, Euler–Maruyama on the same noise), and the sliced
  :math:`W_2` of both to exact draws of the normalised product (a natural "both" reference
  that neither targets).  The exact gap does not stay at zero: the AND step's noise has no
  component along :math:`s_1 - s_2`, so where the experts' curvatures differ the exact
  log-densities drift apart while the estimates stay equal
  (:mod:`shufflesgd.diffusion.superposition`).

Expected: FK's distances approach the floor as :math:`N \to \infty`, while the naive baseline
keeps the bias of the uncorrected score (for :math:`\beta = 1` the two are the same program:
every increment is zero).  How fast depends on the direction of the correction.  For
:math:`\beta < 1` the naive drift does not even contract at high noise (where the score is
close to the prior's :math:`-x`, the drift of VP's reverse SDE with half of it vanishes): its
particles are wider than the target, the weights are benign, and FK nears the floor.  For the
product and for :math:`\beta > 1` the naive drift over-contracts: its particles are narrower
than the target and the weights must favour the few in its tails (importance sampling from a
narrower proposal, with heavy-tailed weights), so FK's estimates converge slowly in :math:`N`;
one system's component masses vary widely from system to system, and the systems resample
most at large :math:`\beta`.  A mass error :math:`\epsilon` between modes a distance
:math:`D` apart costs about :math:`D\sqrt\epsilon` in :math:`W_2`, so the distances fall more
slowly still, one system's far above the pooled ones.  The Itô error decreases with the
steps (strong order about :math:`\frac12`, Part C).  OR reaches the floor.  AND's exact gap is
far below the average's, and neither matches the product.

The independent units of every vmapped call (Parts A and B: the systems; C: the paths; D:
the samples) are split over ``config.devices`` devices (:func:`unit_devices`), their keys
built outside the compiled programs.

Run: ``python -m experiments.composition --config configs/composition.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import diffusion, metrics, parallel, problems
from shufflesgd.diffusion import smc

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "composition"
#: The first expert :math:`p_1` (also Part B's and Part C's law): two narrow anisotropic modes
#: of unequal weight.
EXPERT_1 = dict(
    weights=(0.6, 0.4),
    means=((-2.0, 0.0), (2.0, 0.5)),
    covariances=(((0.4, 0.1), (0.1, 0.3)), ((0.3, 0.0), (0.0, 0.5))),
)
#: The second expert :math:`p_2`: two wide modes, one near each of :math:`p_1`'s but offset.
EXPERT_2 = dict(
    weights=(0.6, 0.4),
    means=((1.0, -0.5), (-1.5, 2.0)),
    covariances=(((1.2, 0.3), (0.3, 1.0)), ((1.0, 0.0), (0.0, 1.0))),
)


@jax.jit
def log_densities(law: Any, xs: jax.Array) -> jax.Array:
    """``law.log_prob`` at each row of ``xs`` (a mixture at :math:`t_{min}`), compiled."""
    return jax.vmap(law.log_prob)(xs)


def validate(config: ConfigDict) -> None:
    common.check_choice("grid", config.grid, diffusion.GRIDS)
    for field in ("num_steps", "fk_systems", "superdiff_samples", "num_directions"):
        common.check_positive_ints(field, config[field])
    common.check_positive_ints("fk_particles", config.fk_particles)
    if len(set(config.fk_particles)) != len(config.fk_particles):
        raise ValueError(f"config.fk_particles must not repeat, got {config.fk_particles!r}")
    threshold = config.fk_ess_threshold
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not (0.0 < threshold <= 1.0)
    ):
        raise ValueError(
            f"config.fk_ess_threshold must lie in (0, 1] (0 is the naive baseline), "
            f"got {config.fk_ess_threshold!r}"
        )
    common.check_choice("fk_resampling", config.fk_resampling, smc.RESAMPLING)
    betas = list(config.betas)
    if not betas or any(
        isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0
        for b in betas
    ):
        raise ValueError(f"config.betas must be positive finite numbers, got {config.betas!r}")
    if len(set(betas)) != len(betas):
        raise ValueError(f"config.betas must not repeat, got {config.betas!r}")
    common.check_positive_ints("num_seeds", config.num_seeds)
    if config.num_seeds < 2:
        raise ValueError(
            f"config.num_seeds must be at least 2 (standard errors), got {config.num_seeds}"
        )
    common.check_positive_ints("ito_steps", config.ito_steps)
    if len(set(config.ito_steps)) < 2 or len(set(config.ito_steps)) != len(config.ito_steps):
        raise ValueError(
            "config.ito_steps must hold at least two distinct step counts (a fitted order), "
            f"got {config.ito_steps!r}"
        )
    common.check_positive_ints("ito_paths", config.ito_paths)
    if config.ito_paths < 2:
        raise ValueError(f"config.ito_paths must be at least 2, got {config.ito_paths}")
    if (
        isinstance(config.likelihood_points, bool)
        or not isinstance(config.likelihood_points, int)
        or not 0 <= config.likelihood_points <= config.ito_paths
    ):
        raise ValueError(
            f"config.likelihood_points must be an int in [0, config.ito_paths], "
            f"got {config.likelihood_points!r}"
        )
    common.check_positive_ints("quadrature_cells", config.quadrature_cells)
    if config.quadrature_cells < 8:
        raise ValueError(
            f"config.quadrature_cells must be at least 8, got {config.quadrature_cells}"
        )
    common.check_positive_number("quadrature_half_width", config.quadrature_half_width)
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"config.seed must be a non-negative int, got {config.seed!r}")
    if not isinstance(config.x64, bool):
        raise ValueError(f"config.x64 must be True or False, got {config.x64!r}")
    if not isinstance(config.results_dir, str) or not config.results_dir:
        raise ValueError(f"config.results_dir must be a non-empty path, got {config.results_dir!r}")
    unit_devices(config)


def unit_devices(config: ConfigDict) -> int:
    """How many devices the independent units are split over: :func:`experiments.common.
    seed_devices` with, as the seeds, the greatest common divisor of the lengths of the vmapped
    axes, ``2 * num_seeds * fk_systems`` (Parts A and B: the FK and the naive systems of every
    seed), ``ito_paths`` and ``superdiff_samples`` (``ValueError`` naming ``config.devices`` when
    it is not ``None`` or a positive int, exceeds the devices available, or does not divide that
    divisor)."""
    sizes = (2 * config.num_seeds * config.fk_systems, config.ito_paths, config.superdiff_samples)
    label = "gcd(2 * num_seeds * fk_systems, ito_paths, superdiff_samples)"
    return common.seed_devices(config, math.gcd(*sizes), label)


def unit_mesh(config: ConfigDict) -> jax.sharding.Mesh:
    """The 1-D ``"seeds"`` mesh over the first :func:`unit_devices` devices."""
    return parallel.worker_mesh(unit_devices(config), axis=common.SEEDS)


def indexed_keys(key: jax.Array, count: int, mesh: jax.sharding.Mesh) -> jax.Array:
    """``fold_in(key, i)`` for ``i < count``, built here (outside the compiled programs) and
    split over the ``"seeds"`` axis of ``mesh``."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count))
    return common.shard_seeds(keys, mesh)


def experts() -> tuple[problems.GaussianMixture, problems.GaussianMixture]:
    """The experts :math:`p_1, p_2` at :math:`t = 0`."""
    return tuple(
        problems.gaussian_mixture(e["weights"], e["means"], e["covariances"])
        for e in (EXPERT_1, EXPERT_2)
    )


def at_time(law: problems.GaussianMixture, sde: diffusion.SDE, t: float) -> Any:
    """The law of :math:`x_t` under ``sde`` when :math:`x_0 \\sim` ``law``."""
    return law.diffuse(sde.alpha(jnp.asarray(t)), sde.sigma(jnp.asarray(t)))


def product_mixture(
    a: problems.GaussianMixture, b: problems.GaussianMixture
) -> tuple[problems.GaussianMixture, float]:
    r"""The normalised product :math:`ab/Z` of two Gaussian mixtures, itself a mixture of
    :math:`K_aK_b` components, and :math:`\log Z = \log\int ab`:
    :math:`N(x; \mu, \Sigma)N(x; \nu, \Lambda) = N(\mu; \nu, \Sigma + \Lambda)\,N(x; m, C)` with
    :math:`C = (\Sigma^{-1} + \Lambda^{-1})^{-1}` and :math:`m = C(\Sigma^{-1}\mu +
    \Lambda^{-1}\nu)` (completing the square), so component :math:`(k, l)` has weight
    :math:`\propto w_kv_lN(\mu_k; \nu_l, \Sigma_k + \Lambda_l)`.  In float64 NumPy."""
    log_wa, mu_a, cov_a = (
        np.asarray(v, np.float64) for v in (a.log_weights, a.means, a.covariances)
    )
    log_wb, mu_b, cov_b = (
        np.asarray(v, np.float64) for v in (b.log_weights, b.means, b.covariances)
    )
    dim = mu_a.shape[1]
    log_w, means, covariances = [], [], []
    for k in range(mu_a.shape[0]):
        for l in range(mu_b.shape[0]):  # noqa: E741
            joint = cov_a[k] + cov_b[l]
            gap = mu_a[k] - mu_b[l]
            log_overlap = -0.5 * (
                gap @ np.linalg.solve(joint, gap)
                + np.linalg.slogdet(joint)[1]
                + dim * np.log(2.0 * np.pi)
            )
            precision_a, precision_b = np.linalg.inv(cov_a[k]), np.linalg.inv(cov_b[l])
            cov = np.linalg.inv(precision_a + precision_b)
            log_w.append(log_wa[k] + log_wb[l] + log_overlap)
            means.append(cov @ (precision_a @ mu_a[k] + precision_b @ mu_b[l]))
            covariances.append(0.5 * (cov + cov.T))
    log_w = np.asarray(log_w)
    log_z = float(np.logaddexp.reduce(log_w))
    dtype = jnp.result_type(float)
    mixture = problems.GaussianMixture(
        jnp.asarray(log_w - log_z, dtype),
        jnp.asarray(np.stack(means), dtype),
        jnp.asarray(np.stack(covariances), dtype),
    )
    return mixture, log_z


def equal_mixture(a: problems.GaussianMixture, b: problems.GaussianMixture) -> Any:
    r""":math:`\frac12(a + b)` as one mixture of all their components."""
    return problems.GaussianMixture(
        jnp.concatenate([a.log_weights, b.log_weights]) - jnp.log(2.0),
        jnp.concatenate([a.means, b.means]),
        jnp.concatenate([a.covariances, b.covariances]),
    )


def quadrature_points(config: ConfigDict) -> tuple[np.ndarray, float]:
    """The cell centres ``[cells², 2]`` of the quadrature grid and the cell width."""
    cells, half = config.quadrature_cells, config.quadrature_half_width
    width = 2.0 * half / cells
    centres = -half + width * (np.arange(cells) + 0.5)
    points = np.stack(np.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)
    return points, width


def quadrature_law(log_density: np.ndarray, points: np.ndarray, width: float) -> dict[str, Any]:
    """The cell masses of an unnormalised ``log_density`` on the grid (float64): the cumulative
    masses for :func:`quadrature_draws` and :math:`\\log\\int` of the density."""
    log_density = np.asarray(log_density, np.float64)
    shift = log_density.max()
    mass = np.exp(log_density - shift)
    dtype = jnp.result_type(float)
    return dict(
        cdf=jnp.asarray(np.cumsum(mass) / mass.sum(), dtype),
        points=jnp.asarray(points, dtype),
        width=width,
        log_integral=float(shift + np.log(mass.sum() * width**2)),
    )


def quadrature_draws(key: jax.Array, law: dict[str, Any], num: int) -> jax.Array:
    """``num`` draws of a quadrature law: a cell by inverting the cumulative masses at a uniform,
    then a uniform point in the cell (exact up to the cell size)."""
    cell_key, jitter_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    cdf = law["cdf"]
    u = jax.random.uniform(cell_key, (num,), cdf.dtype)
    index = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), cdf.shape[0] - 1)
    jitter = jax.random.uniform(jitter_key, (num, 2), cdf.dtype) - 0.5
    return law["points"][index] + law["width"] * jitter


def product_check(
    p1: Any, p2: Any, product: problems.GaussianMixture, log_z: float, config: ConfigDict
) -> dict[str, float]:
    r"""The closed-form product against quadrature of :math:`p_1p_2` on the grid:
    :math:`\log Z` both ways, and the largest difference of the normalised log-densities over
    the cells holding all but :math:`10^{-6}` of the mass."""
    points, width = quadrature_points(config)
    xs = jnp.asarray(points, jnp.result_type(float))
    log_product = np.asarray(log_densities(p1, xs) + log_densities(p2, xs), np.float64)
    law = quadrature_law(log_product, points, width)
    closed = np.asarray(log_densities(product, xs), np.float64)
    quadrature = log_product - law["log_integral"]
    order = np.argsort(quadrature)[::-1]
    mass = np.cumsum(np.exp(quadrature[order]) * width**2)
    kept = order[: int(np.searchsorted(mass, 1.0 - 1e-6)) + 1]
    return dict(
        log_normaliser=log_z,
        log_normaliser_quadrature=law["log_integral"],
        max_log_density_error=float(np.max(np.abs(closed[kept] - quadrature[kept]))),
    )


def fk_program(
    models: tuple[diffusion.Model, ...],
    sde: diffusion.SDE,
    grid: jax.Array,
    num_particles: int,
    config: ConfigDict,
    reference: Callable[[jax.Array, Any, int], jax.Array],
    directions: jax.Array,
    partition: Callable[[Any], problems.GaussianMixture],
    mesh: jax.sharding.Mesh,
) -> Callable[..., dict[str, jax.Array]]:
    """One compiled program for a part and a particle count ``num_particles``:
    ``(key, exponents, target) -> metrics`` ``[seeds, 3]`` of FK (``fk_ess_threshold``), of
    the naive baseline (threshold 0, weights ignored: the same systems on the same noise) and of
    exact draws (the floor), with ``reference(key, target, num)`` giving exact draws and
    ``partition(target)`` the mixture whose components define the masses compared
    (:func:`mass_tv`); for the figure, each seed's first FK system (``example_fk``) and as many
    exact draws (``example_exact``).  Seed :math:`s`, system :math:`j` runs from
    ``fold_in(fold_in(fold_in(key, s), 0), j)``; the systems of every seed and both thresholds
    are one flat ``vmap``, their keys built outside the compiled program and split over the
    ``"seeds"`` axis of ``mesh`` (the per-seed metrics are partitioned as XLA sees fit)."""
    n, systems, seeds = num_particles, config.fk_systems, config.num_seeds

    def system(key: jax.Array, threshold: jax.Array, exponents: jax.Array) -> tuple[Any, ...]:
        x_T = sde.prior_sample(jax.random.fold_in(key, 0), (n, 2))
        x, log_weights, info = diffusion.feynman_kac_corrector(
            jax.random.fold_in(key, 1),
            models,
            exponents,
            sde,
            x_T,
            grid,
            scheme=config.fk_resampling,
            ess_threshold=threshold,
        )
        weighted = diffusion.resample_final(
            jax.random.fold_in(key, 2), x, log_weights, config.fk_resampling
        )
        return (
            jnp.where(threshold > 0, weighted, x),
            jnp.min(info.ess),
            info.num_resampling,
            info.nonfinite_step,
            info.nfe,
        )

    def seed_metrics(seed_key: jax.Array, x: jax.Array, target: Any) -> dict[str, jax.Array]:
        """``x`` ``[2, systems, n, 2]``: FK's and the naive particles of one seed."""
        exact, other = (
            reference(jax.random.fold_in(seed_key, j), target, systems * n) for j in (1, 2)
        )
        pooled = jnp.concatenate([x.reshape(2, -1, 2), other[None]])
        per_system = jnp.concatenate([x, other.reshape(1, systems, n, 2)])
        exact_systems = exact.reshape(systems, n, 2)

        def system_w2(ys: jax.Array) -> jax.Array:
            return jnp.mean(
                jax.vmap(lambda y, e: metrics.sliced_w2(y, e, directions))(ys, exact_systems)
            )

        out = dict(
            pooled_w2=jax.vmap(lambda y: metrics.sliced_w2(y, exact, directions))(pooled),
            system_w2=jax.vmap(system_w2)(per_system),
            example_exact=exact[:n],
            example_fk=x[0, 0],
        )
        law = partition(target)
        out["mass_tv"] = jax.vmap(lambda y: mass_tv(y, exact, law))(pooled)
        return out

    replicated = NamedSharding(mesh, P())

    @jax.jit
    def compiled(
        keys: jax.Array, seed_keys: jax.Array, exponents: jax.Array, target: Any
    ) -> dict[str, jax.Array]:
        role = jnp.arange(2 * seeds * systems) // (seeds * systems)
        thresholds = jnp.where(role == 0, config.fk_ess_threshold, 0.0)
        x, min_ess, resamplings, bad, nfe = jax.vmap(
            lambda k, threshold: system(k, threshold, exponents)
        )(keys, thresholds)
        x = jnp.swapaxes(x.reshape(2, seeds, systems, n, 2), 0, 1)
        out = jax.vmap(seed_metrics, in_axes=(0, 0, None))(seed_keys, x, target)
        shape = (2, seeds, systems)
        out.update(
            min_ess=jnp.mean(min_ess.reshape(shape), axis=2).T,
            resamplings=jnp.mean(resamplings.reshape(shape).astype(min_ess.dtype), axis=2).T,
            nonfinite_systems=jnp.sum(bad.reshape(shape) >= 0, axis=2).T,
            nfe=jnp.max(nfe),
        )
        return out

    def program(key: jax.Array, exponents: jax.Array, target: Any) -> dict[str, jax.Array]:
        seed_keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(seeds))
        index = jnp.arange(2 * seeds * systems)
        keys = jax.vmap(
            lambda s, j: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, s), 0), j)
        )((index // systems) % seeds, index % systems)
        keys = common.shard_seeds(keys, mesh)
        return compiled(keys, jax.device_put(seed_keys, replicated), exponents, target)

    return program


def mass_tv(x: jax.Array, y: jax.Array, law: problems.GaussianMixture) -> jax.Array:
    r"""Total variation :math:`\frac12\sum_k|\hat a_k - \hat b_k|` between the fractions of
    the samples ``x`` and ``y`` whose most responsible component of ``law`` is :math:`k`."""
    k = law.log_weights.shape[0]

    def fractions(z: jax.Array) -> jax.Array:
        assigned = jnp.argmax(jax.vmap(law.responsibilities)(z), axis=1)
        return jnp.mean(jax.nn.one_hot(assigned, k, dtype=z.dtype), axis=0)

    return 0.5 * jnp.sum(jnp.abs(fractions(x) - fractions(y)))


#: The rows of a Part A / B program's metrics ``[seeds, 3]``: FK, naive, exact (the floor).
ROLES = ("fk", "naive", "exact")


def fk_rows(out: dict[str, jax.Array], **labels: Any) -> dict[str, Any]:
    """One row of Part A or B: mean ± SE over seeds of every distance for the three roles."""
    row: dict[str, Any] = dict(labels)
    for name in ("pooled_w2", "system_w2", "mass_tv"):
        values = np.asarray(out[name], np.float64)
        for j, role in enumerate(ROLES):
            mean, se = common.mean_and_stderr(values[:, j])
            row[f"{role}_{name}"], row[f"{role}_{name}_se"] = float(mean), float(se)
    row["fk_min_ess"] = float(np.mean(np.asarray(out["min_ess"])[:, 0]))
    row["fk_resamplings"] = float(np.mean(np.asarray(out["resamplings"])[:, 0]))
    row["nonfinite_systems"] = int(np.sum(np.asarray(out["nonfinite_systems"])))
    row["evaluations"] = int(np.max(np.asarray(out["nfe"])))
    return row


def run_product(
    config: ConfigDict, sde: diffusion.SDE, grid: jax.Array, key: jax.Array
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Part A: FK and the naive summed score against exact draws of the product."""
    p1, p2 = experts()
    t_min = float(grid[-1])
    p1_t, p2_t = at_time(p1, sde, t_min), at_time(p2, sde, t_min)
    product, log_z = product_mixture(p1_t, p2_t)
    check = product_check(p1_t, p2_t, product, log_z, config)
    models = tuple(diffusion.mixture_model(sde, p.eigen()) for p in (p1, p2))
    directions = metrics.random_directions(jax.random.fold_in(key, 0), config.num_directions, 2)
    rows, pictures = [], {}
    for n in tqdm(config.fk_particles, desc=f"{NAME} A (product)"):
        program = fk_program(
            models,
            sde,
            grid,
            n,
            config,
            lambda k, law, num: law.sample(k, num),
            directions,
            lambda law: law,
            unit_mesh(config),
        )
        out = program(jax.random.fold_in(jax.random.fold_in(key, 1), n), jnp.ones(2), product)
        rows.append(fk_rows(out, particles=n))
        if n == max(config.fk_particles):
            pictures["product_fk"] = np.asarray(out["example_fk"][0][:1024])
            pictures["product_exact"] = np.asarray(out["example_exact"][0][:1024])
    return dict(rows=rows, product_check=check), pictures


def run_anneal(
    config: ConfigDict, sde: diffusion.SDE, grid: jax.Array, key: jax.Array
) -> dict[str, Any]:
    """Part B: FK and the naive tempered score against quadrature draws of :math:`p_1^\\beta`."""
    p1 = experts()[0]
    p1_t = at_time(p1, sde, float(grid[-1]))
    points, width = quadrature_points(config)
    log_p = np.asarray(log_densities(p1_t, jnp.asarray(points, jnp.result_type(float))))
    models = (diffusion.mixture_model(sde, p1.eigen()),)
    directions = metrics.random_directions(jax.random.fold_in(key, 0), config.num_directions, 2)
    mesh = unit_mesh(config)
    programs = {
        n: fk_program(
            models, sde, grid, n, config, quadrature_draws, directions, lambda _: p1_t, mesh
        )
        for n in config.fk_particles
    }
    rows = []
    work = [(beta, n) for beta in config.betas for n in config.fk_particles]
    for beta, n in tqdm(work, desc=f"{NAME} B (anneal)"):
        law = quadrature_law(beta * log_p, points, width)
        target = {k: law[k] for k in ("cdf", "points")}
        beta_key = jax.random.fold_in(jax.random.fold_in(key, 1), int(round(1000 * beta)))
        out = programs[n](
            jax.random.fold_in(beta_key, n),
            jnp.asarray([beta], jnp.result_type(float)),
            {**target, "width": jnp.asarray(width, law["cdf"].dtype)},
        )
        rows.append(fk_rows(out, beta=beta, particles=n))
    return dict(rows=rows, cell_width=width)


def run_ito(config: ConfigDict, sde: diffusion.SDE, key: jax.Array) -> dict[str, Any]:
    """Part C: the Itô density estimate against the exact :math:`\\log p_{1,t_{min}}`, and the
    PF-ODE likelihood's error beside it."""
    law = experts()[0].eigen()
    model = diffusion.mixture_model(sde, law)
    mesh = unit_mesh(config)

    @functools.partial(jax.jit, static_argnums=0)
    def errors(steps: int, keys: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Path ``i`` from ``keys[i]`` (split over the devices of ``mesh``)."""
        grid = jnp.asarray(diffusion.time_grid(sde, config.grid, steps))

        def path(path_key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            x_T = sde.prior_sample(jax.random.fold_in(path_key, 0), (2,))
            x, log_q, info = diffusion.reverse_sde_log_density(
                jax.random.fold_in(path_key, 1), model, sde, x_T, grid
            )
            exact = law.log_prob(x, sde.alpha(grid[-1]), sde.sigma(grid[-1]))
            return x, log_q - exact, info.nonfinite_step

        return jax.vmap(path)(keys)

    path_keys = indexed_keys(jax.random.fold_in(key, 0), config.ito_paths, mesh)
    rows, last = [], None
    for steps in tqdm(sorted(config.ito_steps), desc=f"{NAME} C (Itô density)"):
        x, error, bad = errors(steps, path_keys)
        error = np.asarray(error, np.float64)
        mean, se = common.mean_and_stderr(np.abs(error))
        rows.append(
            dict(
                steps=steps,
                abs_error=float(mean),
                abs_error_se=float(se),
                bias=float(np.mean(error)),
                evaluations=steps,
                nonfinite_paths=int(np.sum(np.asarray(bad) >= 0)),
            )
        )
        last = np.asarray(x)
    order = -common.loglog_slope([r["steps"] for r in rows], [r["abs_error"] for r in rows])
    result: dict[str, Any] = dict(rows=rows, order=order)
    if config.likelihood_points:
        xs = jnp.asarray(last[: config.likelihood_points])
        likelihood = jax.jit(
            lambda k, xs: diffusion.log_likelihood_batch(k, model, sde, xs)  # to sde.t_min
        )(jax.random.fold_in(key, 1), xs)
        t_min = jnp.asarray(sde.t_min)  # the end of every grid
        exact = jax.vmap(lambda y: law.log_prob(y, sde.alpha(t_min), sde.sigma(t_min)))(xs)
        gap = np.abs(np.asarray(likelihood.log_prob_nats - exact, np.float64))
        mean, se = common.mean_and_stderr(gap)
        result["pf_ode"] = dict(
            abs_error=float(mean),
            abs_error_se=float(se),
            evaluations=float(np.mean(np.asarray(likelihood.nfe))),
            points=config.likelihood_points,
            failures=int(np.sum(~np.asarray(likelihood.success))),
        )
    return result


def run_superdiff(
    config: ConfigDict, sde: diffusion.SDE, grid: jax.Array, key: jax.Array
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Part D: OR against the equal mixture; AND and the score average against equal density
    and the product.  The three methods share each seed's prior draws and noise (common random
    numbers), and AND and the average the exact draws they are compared with."""
    p1, p2 = experts()
    t_min = float(grid[-1])
    p1_t, p2_t = at_time(p1, sde, t_min), at_time(p2, sde, t_min)
    mixture, product = equal_mixture(p1_t, p2_t), product_mixture(p1_t, p2_t)[0]
    laws = (p1.eigen(), p2.eigen())
    models = [diffusion.mixture_model(sde, law) for law in laws]
    average = diffusion.Model(lambda x, t: 0.5 * (models[0].fn(x, t) + models[1].fn(x, t)), "score")
    directions = metrics.random_directions(jax.random.fold_in(key, 0), config.num_directions, 2)
    num = config.superdiff_samples
    mesh = unit_mesh(config)

    @functools.partial(jax.jit, static_argnums=0)
    def samples(method: str, keys: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Sample ``i`` from ``keys[i]`` (split over the devices of ``mesh``)."""

        def one(sample_key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            x_T = sde.prior_sample(jax.random.fold_in(sample_key, 0), (2,))
            run_key = jax.random.fold_in(sample_key, 1)
            if method == "average":
                x, info = diffusion.euler_maruyama(run_key, average, sde, x_T, grid, final="none")
                estimates = jnp.zeros(2, x.dtype)
            else:
                x, info = diffusion.superdiff(run_key, models, sde, x_T, grid, mode=method)
                estimates = info.log_densities
            return x, estimates, info.nonfinite_step

        return jax.vmap(one)(keys)

    @jax.jit
    def distances(key: jax.Array, x: jax.Array, law: Any) -> jax.Array:
        exact, other = (law.sample(jax.random.fold_in(key, j), num) for j in (0, 1))
        return jnp.stack(
            [metrics.sliced_w2(x, exact, directions), metrics.sliced_w2(other, exact, directions)]
        )

    def log_gap(x: jax.Array) -> np.ndarray:
        return np.abs(np.asarray(log_densities(p1_t, x) - log_densities(p2_t, x)))

    methods = ("or", "and", "average")
    collected: dict[str, dict[str, list[Any]]] = {m: {} for m in methods}
    work = [(m, s) for m in methods for s in range(config.num_seeds)]
    pictures = {}
    for method, seed in tqdm(work, desc=f"{NAME} D (SuperDiff)"):
        seed_key = jax.random.fold_in(jax.random.fold_in(key, 1), seed)
        keys = indexed_keys(jax.random.fold_in(seed_key, 0), num, mesh)
        # gathered: the distances below run on one device, as they did before the split
        x, estimates, bad = jax.device_get(samples(method, keys))
        store = collected[method]
        target = mixture if method == "or" else product
        w2, floor = np.asarray(distances(jax.random.fold_in(seed_key, 1), x, target))
        store.setdefault("w2", []).append(float(w2))
        store.setdefault("floor", []).append(float(floor))
        store.setdefault("gap", []).append(log_gap(x))
        store.setdefault("estimate_gap", []).append(
            np.abs(np.asarray(estimates[:, 0] - estimates[:, 1]))
        )
        store.setdefault("nonfinite", []).append(int(np.sum(np.asarray(bad) >= 0)))
        if seed == 0:
            pictures[f"superdiff_{method}"] = np.asarray(x[:1024])
    pictures["mixture_exact"] = np.asarray(
        mixture.sample(jax.random.fold_in(key, 2), min(num, 1024))
    )
    rows = []
    for method, store in collected.items():
        w2, w2_se = common.mean_and_stderr(store["w2"])
        floor, floor_se = common.mean_and_stderr(store["floor"])
        gap, gap_se = common.mean_and_stderr(np.concatenate(store["gap"]))
        row = dict(
            method=method,
            target="mixture" if method == "or" else "product",
            sliced_w2=float(w2),
            sliced_w2_se=float(w2_se),
            exact_sliced_w2=float(floor),
            exact_sliced_w2_se=float(floor_se),
            log_density_gap=float(gap),
            log_density_gap_se=float(gap_se),
            evaluations=(1 if method == "average" else 2) * (grid.shape[0] - 1),
            nonfinite_samples=int(sum(store["nonfinite"])),
        )
        if method != "average":
            row["estimate_gap"] = float(np.mean(np.concatenate(store["estimate_gap"])))
        rows.append(row)
    return dict(rows=rows), pictures


def contours(sde: diffusion.SDE, t_min: float) -> dict[str, np.ndarray]:
    """Log-densities of the experts at :math:`t_{min}` on a coarse grid, for the figure."""
    p1, p2 = (at_time(p, sde, t_min) for p in experts())
    axis = np.linspace(-4.0, 4.0, 81)
    mesh = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    xs = jnp.asarray(mesh, jnp.result_type(float))
    shape = (axis.size, axis.size)
    return {
        "contour_axis": axis,
        "contour_log_p1": np.asarray(log_densities(p1, xs)).reshape(shape),
        "contour_log_p2": np.asarray(log_densities(p2, xs)).reshape(shape),
    }


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the four parts; write metrics, CSVs, table and figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    sde = diffusion.make_sde("vp")
    grid = jnp.asarray(diffusion.time_grid(sde, config.grid, config.num_steps))
    folder = common.results_folder(config, NAME)
    key = jax.random.key(config.seed)
    product, pictures = run_product(config, sde, grid, jax.random.fold_in(key, 0))
    anneal = run_anneal(config, sde, grid, jax.random.fold_in(key, 1))
    ito = run_ito(config, sde, jax.random.fold_in(key, 2))
    superdiff, more = run_superdiff(config, sde, grid, jax.random.fold_in(key, 3))
    pictures.update(more)
    pictures.update(contours(sde, float(grid[-1])))
    results = dict(product=product, anneal=anneal, ito=ito, superdiff=superdiff)
    _write_csvs(folder, results)
    table = format_table(config, results)
    results["devices"] = unit_devices(config)  # the units were split over these
    return common.finish(folder, table, results, lambda path: draw(results, pictures, path))


def _write_csvs(folder: Any, results: dict[str, Any]) -> None:
    for part in ("product", "anneal"):
        rows = results[part]["rows"]
        header = list(rows[0])
        common.write_csv(folder / f"{part}.csv", header, [[r[h] for h in header] for r in rows])
    ito = results["ito"]["rows"]
    header = list(ito[0])
    common.write_csv(folder / "ito.csv", header, [[r[h] for h in header] for r in ito])
    rows = results["superdiff"]["rows"]
    header = [h for h in rows[0] if h != "estimate_gap"] + ["estimate_gap"]
    common.write_csv(
        folder / "superdiff.csv", header, [[r.get(h, "") for h in header] for r in rows]
    )


def _pm(row: dict[str, Any], name: str, width: int = 8) -> str:
    return f"{row[name]:{width}.4f} ± {row[name + '_se']:.4f}"


def format_table(config: ConfigDict, results: dict[str, Any]) -> str:
    check = results["product"]["product_check"]
    lines = [
        f"A: product p1 p2 by FK (beta = (1, 1)) on VP, {config.num_steps} {config.grid} steps, "
        f"{config.fk_systems} systems of N pooled; mean ± SE over {config.num_seeds} seeds. "
        f"Closed-form product: log Z = {check['log_normaliser']:.6f} (quadrature "
        f"{check['log_normaliser_quadrature']:.6f}), max |log-density error| "
        f"{check['max_log_density_error']:.2e}",
    ]
    lines += _fk_lines(results["product"]["rows"], with_beta=False)
    lines += [
        "",
        f"B: annealed p1^beta by FK and by the tempered score (naive); exact draws by quadrature "
        f"(cell width {results['anneal']['cell_width']:.4f})",
    ]
    lines += _fk_lines(results["anneal"]["rows"], with_beta=True)
    ito = results["ito"]
    lines += [
        "",
        f"C: Itô density estimate |log q̂ - log p1(x)| at t_min over {config.ito_paths} paths; "
        f"fitted order {ito['order']:.3f}",
        f"{'steps':>6s} {'|error| (nats)':>20s} {'bias':>9s}",
    ]
    for r in ito["rows"]:
        lines.append(f"{r['steps']:6d} {_pm(r, 'abs_error', 10)} {r['bias']:9.4f}")
    if "pf_ode" in ito:
        r = ito["pf_ode"]
        lines.append(
            f"PF-ODE likelihood (Dopri5, exact divergence, {r['points']} points): "
            f"{_pm(r, 'abs_error', 0)} nats at {r['evaluations']:.0f} evaluations"
        )
    lines += [
        "",
        "D: SuperDiff. OR against (p1 + p2)/2; AND (equal estimated density, NOT the product) and "
        "the score average kappa = 1/2 against the product, with the exact |log p1 - log p2| at "
        "the samples",
        f"{'method':8s} {'target':8s} {'evals':>5s} {'sliced W2':>18s} {'exact vs exact':>18s} "
        f"{'|log p1 - log p2|':>18s} {'|estimates gap|':>15s}",
    ]
    for r in results["superdiff"]["rows"]:
        estimate = f"{r['estimate_gap']:15.2e}" if "estimate_gap" in r else f"{'':15s}"
        lines.append(
            f"{r['method']:8s} {r['target']:8s} {r['evaluations']:5d} {_pm(r, 'sliced_w2')} "
            f"{_pm(r, 'exact_sliced_w2')} {_pm(r, 'log_density_gap')} {estimate}"
        )
    return "\n".join(lines)


#: The columns of the Part A / B table: (metrics field, heading).
FK_COLUMNS = (
    ("fk_pooled_w2", "FK pooled W2"),
    ("naive_pooled_w2", "naive"),
    ("exact_pooled_w2", "exact"),
    ("fk_mass_tv", "FK mass TV"),
    ("naive_mass_tv", "naive"),
    ("exact_mass_tv", "exact"),
    ("fk_system_w2", "FK one system W2"),
    ("exact_system_w2", "exact"),
)


def _fk_lines(rows: list[dict[str, Any]], with_beta: bool) -> list[str]:
    lines = [
        (f"{'beta':>5s} " if with_beta else "")
        + f"{'N':>5s} {'evals':>5s} "
        + " ".join(f"{heading:>18s}" for _, heading in FK_COLUMNS)
        + f" {'min ESS':>8s} {'resampl.':>8s}"
    ]
    for r in rows:
        lines.append(
            (f"{r['beta']:5g} " if with_beta else "")
            + f"{r['particles']:5d} {r['evaluations']:5d} "
            + " ".join(_pm(r, field) for field, _ in FK_COLUMNS)
            + f" {r['fk_min_ess']:8.1f} {r['fk_resamplings']:8.1f}"
        )
    return lines


def _distance_panel(axis: Any, rows: list[dict[str, Any]], color: str, label: str) -> None:
    """FK (error bars), naive (dashed) and exact-vs-exact (dotted) pooled sliced W2 against N."""
    n = [r["particles"] for r in rows]
    for role, style, text in (
        ("fk", dict(marker="o", capsize=3), f"FK {label}"),
        ("naive", dict(marker="x", ls="--", capsize=0), f"naive {label}"),
        ("exact", dict(marker=".", ls=":", capsize=0), f"exact vs exact {label}"),
    ):
        x, y, se, dropped = common.finite_curve(
            n,
            [
                np.nan if r.get(f"{role}_pooled_w2") is None else r[f"{role}_pooled_w2"]
                for r in rows
            ],
            [
                np.nan if r.get(f"{role}_pooled_w2_se") is None else r[f"{role}_pooled_w2_se"]
                for r in rows
            ],
        )
        name = common.not_shown(text.strip(), dropped)
        if len(x):
            axis.errorbar(x, y, se, color=color, label=name, **style)
        else:
            axis.plot([], [], color=color, marker="x", ls="", label=name)


def draw(results: dict[str, Any], pictures: dict[str, np.ndarray], path: Any) -> None:
    """Six panels: Part A's and Part B's pooled sliced W2 against the particles (FK, naive,
    floor), Part C's Itô error against the steps (log-log), and scatter plots of FK's product
    samples and of SuperDiff's OR and AND samples over exact samples and the experts' contours."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 10))
    axis = axes[0, 0]
    _distance_panel(axis, results["product"]["rows"], "C0", "")
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="particles per system N",
        ylabel="sliced W2 to exact draws",
        title="A: product p1 p2 (FK β = (1, 1))",
    )
    axis = axes[0, 1]
    rows = results["anneal"]["rows"]
    for i, beta in enumerate(dict.fromkeys(r["beta"] for r in rows)):
        _distance_panel(axis, [r for r in rows if r["beta"] == beta], f"C{i}", f"β = {beta:g}")
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="particles per system N",
        ylabel="sliced W2 to quadrature draws",
        title="B: annealed p1^β",
    )
    axis = axes[0, 2]
    ito = results["ito"]
    x, y, se, dropped = common.finite_curve(
        [r["steps"] for r in ito["rows"]],
        [np.nan if r["abs_error"] is None else r["abs_error"] for r in ito["rows"]],
        [np.nan if r["abs_error_se"] is None else r["abs_error_se"] for r in ito["rows"]],
    )
    order = ito.get("order")
    label = "Itô estimate" + (
        f" (order {order:.2f})" if order is not None and np.isfinite(order) else ""
    )
    axis.errorbar(x, y, se, marker="o", capsize=3, label=common.not_shown(label, dropped))
    if "pf_ode" in ito:
        common.log_level(axis, ito["pf_ode"]["abs_error"], color="C3", ls="--")
        axis.plot(
            [],
            [],
            color="C3",
            ls="--",
            label=f"PF-ODE likelihood ({ito['pf_ode']['evaluations']:.0f} evals)",
        )
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="Euler–Maruyama steps (evaluations)",
        ylabel="mean |log q̂ − log p1(x)| [nats]",
        title="C: Itô density estimator",
    )
    if len(x):  # the step counts themselves on the log axis
        axis.set_xticks(x, [f"{v:g}" for v in x])
        axis.xaxis.set_minor_formatter(plt.NullFormatter())
    scatter = (
        (axes[1, 0], "A: product samples", ("product_exact", "product_fk")),
        (axes[1, 1], "D: SuperDiff OR", ("mixture_exact", "superdiff_or")),
        (
            axes[1, 2],
            "D: SuperDiff AND vs κ = 1/2",
            ("product_exact", "superdiff_and", "superdiff_average"),
        ),
    )
    names = {
        "product_exact": "exact p1 p2",
        "product_fk": "FK",
        "mixture_exact": "exact (p1 + p2)/2",
        "superdiff_or": "SuperDiff OR",
        "superdiff_and": "SuperDiff AND",
        "superdiff_average": "κ = 1/2",
    }
    for axis, title, keys in scatter:
        if "contour_axis" in pictures:
            grid = pictures["contour_axis"]
            for field, color in (("contour_log_p1", "C2"), ("contour_log_p2", "C4")):
                log_p = pictures[field]
                levels = np.max(log_p) - np.asarray([4.5, 2.0, 0.5])  # Gaussian 3, 2, 1 sigma
                style = dict(colors=color, linewidths=0.6, linestyles="solid")
                axis.contour(grid, grid, log_p, levels=levels, **style)
            axis.plot([], [], color="C2", lw=0.6, label="p1 contours")
            axis.plot([], [], color="C4", lw=0.6, label="p2 contours")
        for i, name in enumerate(keys):
            if name in pictures:
                points = pictures[name]
                color = "0.6" if i == 0 else f"C{i}"
                axis.scatter(points[:, 0], points[:, 1], s=2, color=color, label=names[name])
        axis.set(xlabel="x₁", ylabel="x₂", title=title, aspect="equal")
    for axis in axes[0]:
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    for axis in axes[1]:
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, markerscale=3)
    common.save_figure(fig, path)


if __name__ == "__main__":
    common.main(run, validate)
