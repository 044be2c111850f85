r"""Sampler error against the number of function evaluations (NFE), with the exact score.

**Part A: exact KL on one Gaussian.**  For a Gaussian target
:math:`N(\mu, \Sigma)` the score of every marginal :math:`p_t = N(\alpha_t\mu,
\alpha_t^2\Sigma + \sigma_t^2 I)` is affine in :math:`x`, so every fixed-grid sampler is
affine in its prior draw and its noise, and :func:`shufflesgd.diffusion.exact_gaussian_law`
returns its output law exactly (Jacobians, no Monte Carlo).  For each sampler, each time grid
of :data:`shufflesgd.diffusion.GRIDS` and each NFE budget, the sampler takes the most steps whose
evaluation count (``final="none"``) fits the budget, as the sampler registry
(:data:`shufflesgd.diffusion.SAMPLERS`) states it (the run's ``info.nfe`` is checked against the
budget), and we report
:math:`KL(q_{sampler}\,\|\,p_{t_{min}})` and :math:`W_2`.

*The floor.*  The probability-flow ODE is a bijection carrying :math:`p_T` onto
:math:`p_{t_{min}}` (Song et al. 2021, Sec. 4.3), and KL is invariant under bijections, so a
perfect ODE solver started from the prior :math:`\pi = N(0, \sigma_T^2 I)` ends at
:math:`KL(\pi\,\|\,p_T)` from the target: the prior-mismatch floor, printed with the table.
Stochastic samplers contract the mismatch and may go below it (Xu et al. 2023, Thm. 2).

*Orders.*  A solver of order :math:`p` has an :math:`O(N^{-p})` error in the law's mean and
covariance, hence :math:`KL \propto N^{-2p}` (KL is quadratic in small perturbations): the
fitted order is :math:`-\tfrac12` the log-log slope.  Points near the floor measure the floor,
not the solver, so the fit keeps the points with :math:`KL \ge` ``floor_factor`` times the
floor, and of those the ``fit_points`` largest budgets (the asymptotic regime).  Expected:
Euler–Maruyama, DDIM and PF-ODE Euler first order (Song et al. 2021; Song, Meng, Ermon 2021);
Heun (Karras et al. 2022, Alg. 1) and DPM-Solver++(2M) (Lu et al. 2022) second order;
log-SNR grids (Lu et al. 2022, Sec. 3.4) far better than uniform time at low NFE on VP.

DPM-Solver-v3 (Zheng et al. 2023) runs in Part A with its empirical model statistics computed
exactly for the Gaussian (:func:`shufflesgd.diffusion.gaussian_ems` on ``ems_num_lambdas``
half log-SNRs), unless the label gives its own ``statistics``; in Part B, with the library's
default statistics (:math:`l = 1, s = b = 0`: DPM-Solver++ in Taylor form).

Samplers excluded from Part A: those the registry marks not affine, ``predictor_corrector``
(its Langevin step size :math:`\epsilon \propto \|z\|^2/\|s\|^2` is not affine, so the law
is not Gaussian) and ``pf_ode_adaptive`` (the NFE is chosen by its step-size controller, not by
a budget; excluded from Part B too).

**Part B: Monte Carlo on mixtures.**  A 2-D mixture of three well separated modes with
weights 0.5 / 0.3 / 0.2, and a ``high_dim``-D mixture of ``num_components`` random anisotropic
components; every sampler at equal NFE on ``mixture_grid``, ``num_seeds`` seeds of
``num_samples`` samples in one vmapped call.  Metrics, each against ``num_samples`` exact draws
from :math:`p_{t_{min}}` (the same draws for every sampler of a seed), mean ± standard error
over seeds:

* sliced :math:`W_2`:
  :math:`\bigl(\frac1L\sum_l W_2^2(\theta_l^\top X, \theta_l^\top Y)\bigr)^{1/2}`
  over ``num_projections`` random unit directions (sorted projections);
* :math:`MMD^2`, the unbiased U-statistic with the Gaussian kernel
  :math:`k(x, y) = \exp(-\|x-y\|^2/(2h^2))`, :math:`h^2` fixed per mixture by the median
  heuristic (the median squared distance between exact samples);
* mode-weight error :math:`\frac12\sum_k|\hat w_k - w_k|` (total variation), each sample
  assigned to the component of largest responsibility under :math:`p_{t_{min}}`.

The row ``exact`` scores a second set of exact draws the same way: the Monte Carlo floor of
each metric.  Expected: Restart (Xu et al. 2023) better than a pure ODE and a pure SDE sampler
at equal NFE.

Run: ``python -m experiments.sampler_nfe --config configs/sampler_nfe.py``
(``:quick`` for the short variant; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import diffusion, metrics, problems

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "sampler_nfe"
GAUSSIAN_SAMPLERS = tuple(name for name, spec in diffusion.SAMPLERS.items() if spec.affine)
MIXTURE_SAMPLERS = tuple(
    name for name, spec in diffusion.SAMPLERS.items() if spec.nfe_per_step is not None
)
MIXTURES = ("mixture_2d", "mixture_high_dim")
#: The table names the best sampler of Part A at each budget up to this NFE.
LOW_NFE = 10


# ------------------------------------------------------------------ configuration


def _check_budgets(field: str, budgets: Any, minimum_count: int) -> None:
    common.check_positive_ints(field, list(budgets))
    if len(budgets) < minimum_count or list(budgets) != sorted(set(budgets)):
        raise ValueError(
            f"config.{field} must be at least {minimum_count} strictly increasing budgets, "
            f"got {list(budgets)}"
        )


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built or compiled."""
    common.check_choice("sde", config.sde, diffusion.SDES)
    common.check_names("grids", config.grids, diffusion.GRIDS)
    common.check_samplers("gaussian_samplers", config.gaussian_samplers, GAUSSIAN_SAMPLERS)
    common.check_names("mixtures", config.mixtures, MIXTURES)
    common.check_samplers("mixture_samplers", config.mixture_samplers, MIXTURE_SAMPLERS)
    common.check_choice("mixture_grid", config.mixture_grid, diffusion.GRIDS)
    _check_budgets("nfe_budgets", config.nfe_budgets, 2)
    _check_budgets("mixture_nfe_budgets", config.mixture_nfe_budgets, 1)
    for field in (
        "gaussian_dim",
        "high_dim",
        "num_components",
        "num_samples",
        "num_projections",
        "restart_k",
        "restart_steps",
    ):
        common.check_positive_ints(field, config[field])
    for field, minimum in (("fit_points", 2), ("num_seeds", 2), ("ems_num_lambdas", 2)):
        common.check_positive_ints(field, config[field])
        if config[field] < minimum:
            raise ValueError(f"config.{field} must be at least {minimum}, got {config[field]}")
    for field in ("data_seed", "seed"):
        if (
            isinstance(config[field], bool)
            or not isinstance(config[field], int)
            or config[field] < 0
        ):
            raise ValueError(
                f"config.{field} must be a non-negative integer, got {config[field]!r}"
            )
    for field in (
        "gaussian_var_min",
        "gaussian_var_max",
        "gaussian_mean_norm",
        "floor_factor",
        "pc_snr",
        "restart_t_min",
        "restart_t_max",
    ):
        common.check_positive_number(field, config[field])
    if config.gaussian_var_max < config.gaussian_var_min:
        raise ValueError(
            f"config.gaussian_var_max must be >= config.gaussian_var_min, got "
            f"{config.gaussian_var_max} < {config.gaussian_var_min}"
        )
    if config.floor_factor <= 1.0:
        raise ValueError(f"config.floor_factor must exceed 1, got {config.floor_factor}")
    sde = diffusion.make_sde(config.sde)
    if not sde.t_min <= config.restart_t_min < config.restart_t_max <= sde.t_max:
        raise ValueError(
            "config.restart_t_min and config.restart_t_max must satisfy "
            f"{sde.t_min} <= restart_t_min "
            f"< restart_t_max <= {sde.t_max} ({config.sde}), got {config.restart_t_min}, "
            f"{config.restart_t_max}"
        )


# ------------------------------------------------------------------ targets


def build_gaussian(config: ConfigDict) -> problems.GaussianMixture:
    r""":math:`N(\mu, U\,\mathrm{diag}(v)\,U^\top)`: variances log-spaced from ``gaussian_var_min``
    to ``gaussian_var_max``, a random rotation :math:`U`, :math:`|\mu|` = ``gaussian_mean_norm``."""
    rng = np.random.default_rng(config.data_seed)
    d = config.gaussian_dim
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    variances = np.geomspace(config.gaussian_var_min, config.gaussian_var_max, d)
    covariance = rotation @ np.diag(variances) @ rotation.T
    direction = rng.standard_normal(d)
    mean = config.gaussian_mean_norm * direction / np.linalg.norm(direction)
    return problems.gaussian_mixture([1.0], [mean], [0.5 * (covariance + covariance.T)])


def build_mixture(name: str, config: ConfigDict) -> problems.GaussianMixture:
    """Three well separated 2-D modes (:func:`shufflesgd.problems.three_mode_mixture_2d`), or
    ``num_components`` random anisotropic components in ``high_dim`` dimensions."""
    if name == "mixture_2d":
        return problems.three_mode_mixture_2d()
    return problems.random_gaussian_mixture(
        config.data_seed + 1, config.num_components, config.high_dim
    )


def marginal(
    law: problems.GaussianMixture, sde: diffusion.SDE, t: float
) -> problems.GaussianMixture:
    r""":math:`p_t` of the process started at ``law``."""
    t = jnp.asarray(t)
    return law.diffuse(sde.alpha(t), sde.sigma(t))


def prior_mismatch_floor(law: problems.GaussianMixture, sde: diffusion.SDE) -> float:
    r""":math:`KL(\pi\,\|\,p_T)`, :math:`\pi = N(0, \sigma_T^2 I)`: an exact ODE flow's KL to
    :math:`p_{t_{min}}`."""
    p_T = marginal(law, sde, sde.t_max)
    d = law.dim
    return float(
        metrics.gaussian_kl(
            jnp.zeros(d), sde.prior_std**2 * jnp.eye(d), p_T.means[0], p_T.covariances[0]
        )
    )


# ------------------------------------------------------------------ Part A: exact Gaussian laws


def gaussian_laws(
    sampler: Callable,
    options: dict[str, Any],
    draws: int,
    model: diffusion.Model,
    sde: diffusion.SDE,
    target: problems.GaussianMixture,
) -> Callable:
    """A jitted ``grids [G, N+1] -> (KL, W2, nfe)``, one value per grid: the exact law of each run
    against the target :math:`p_{t_{min}}`, grids vmapped (one compilation per N)."""
    dim = target.dim
    mean_q, cov_q = target.means[0], target.covariances[0]

    def one(grid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        mean, cov = diffusion.exact_gaussian_law(
            sampler, model, sde, grid, dim, draws, final="none", **options
        )
        noise = jnp.zeros((grid.shape[0] - 1, draws, dim))
        nfe = sampler(None, model, sde, jnp.zeros(dim), grid, final="none", noise=noise, **options)[
            1
        ].nfe
        w2 = jnp.sqrt(jnp.clip(metrics.gaussian_w2(mean, cov, mean_q, cov_q), 0.0))
        return metrics.gaussian_kl(mean, cov, mean_q, cov_q), w2, nfe

    return jax.jit(jax.vmap(one))


def local_orders(nfe: list[int], kl: list[float]) -> list[float]:
    r"""Orders between consecutive budgets, :math:`-\frac12\,\Delta\log KL/\Delta\log NFE` (NaN
    where a budget did not run): the whole curve, pre-asymptotic stretch and floor included."""
    return [
        -0.5 * math.log(k2 / k1) / math.log(n2 / n1)
        if n1 > 0 and n2 > n1 and k1 > 0 and k2 > 0
        else float("nan")
        for n1, n2, k1, k2 in zip(nfe[:-1], nfe[1:], kl[:-1], kl[1:])
    ]


def fit_order(
    nfe: list[float], kl: list[float], floor: float, config: ConfigDict
) -> dict[str, Any]:
    """Slope of log KL against log NFE over the pre-floor points (KL >= floor_factor * floor), the
    ``fit_points`` largest budgets among them; order = -slope / 2.  NaN with fewer than two
    points."""
    points = [
        (n, k) for n, k in zip(nfe, kl) if np.isfinite(k) and k >= config.floor_factor * floor
    ]
    points = points[-config.fit_points :]
    if len(points) < 2:
        return {"slope": float("nan"), "order": float("nan"), "fit_nfe": [n for n, _ in points]}
    slope = common.loglog_slope([n for n, _ in points], [k for _, k in points])
    return {"slope": slope, "order": -0.5 * slope, "fit_nfe": [n for n, _ in points]}


def run_gaussian(config: ConfigDict, sde: diffusion.SDE, bar: tqdm) -> dict[str, Any]:
    """Part A: exact KL and W2 for every (sampler, grid, budget); fitted orders."""
    law = build_gaussian(config)
    target = marginal(law, sde, sde.t_min)
    model = diffusion.mixture_model(sde, law.eigen())
    floor = prior_mismatch_floor(law, sde)
    budgets, grids = list(config.nfe_budgets), list(config.grids)
    # DPM-Solver-v3's empirical model statistics, exact for this Gaussian
    lambdas = diffusion.ems_lambdas(sde, config.ems_num_lambdas)
    statistics = diffusion.gaussian_ems(sde, law.means[0], law.covariances[0], lambdas)
    result: dict[str, Any] = {
        "sde": config.sde,
        "dim": law.dim,
        "floor_kl": floor,
        "budgets": budgets,
        "samplers": {},
    }
    for name in config.gaussian_samplers:
        sampler_name, options = common.sampler_options(name, config)
        spec = diffusion.SAMPLERS[sampler_name]
        if sampler_name == "dpm_solver_v3" and "statistics" not in options:
            options["statistics"] = statistics
        cost = spec.cost(**options)
        laws = gaussian_laws(spec.sampler, options, cost.noise_draws_per_step, model, sde, target)
        per_grid = {g: {"steps": [], "nfe": [], "kl": [], "w2": []} for g in grids}
        for budget in budgets:
            steps = spec.steps_within(budget, final="none", **options)
            if steps is None:
                kl = w2 = np.full(len(grids), np.nan)
                nfe = np.full(len(grids), -1)
            else:
                stacked = jnp.asarray(np.stack([diffusion.time_grid(sde, g, steps) for g in grids]))
                kl, w2, nfe = (np.asarray(a) for a in laws(stacked))
                if np.any(nfe > budget):
                    raise RuntimeError(
                        f"{name} used {nfe.max()} evaluations for a budget of {budget}"
                    )
            for i, g in enumerate(grids):
                per_grid[g]["steps"].append(steps)
                per_grid[g]["nfe"].append(int(nfe[i]))
                per_grid[g]["kl"].append(float(kl[i]))
                per_grid[g]["w2"].append(float(w2[i]))
            bar.update()
        for g in grids:
            r = per_grid[g]
            ran = [i for i, s in enumerate(r["steps"]) if s is not None]
            r.update(
                fit_order([r["nfe"][i] for i in ran], [r["kl"][i] for i in ran], floor, config)
            )
            r["local_orders"] = local_orders(r["nfe"], r["kl"])
        result["samplers"][name] = {
            "nfe_per_step": cost.nfe_per_step,
            "nfe_fixed": cost.nfe_fixed,
            "grids": per_grid,
        }
    return result


# ------------------------------------------------------------------ Part B: mixtures


def mixture_scorer(
    target: problems.GaussianMixture, bandwidth_sq: float, config: ConfigDict
) -> Callable:
    """A jitted ``(samples [S, n, d], key) -> metrics [S, 3]`` (sliced W2, MMD², mode-weight error)
    against ``n`` exact draws per seed s (key ``fold_in(fold_in(key, s), 0)``); seeds in ``lax.map``
    so that only one seed's kernel matrices are live at a time."""
    n, d = config.num_samples, target.dim

    def one(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, seed_key = args
        reference = target.sample(jax.random.fold_in(seed_key, 0), n)
        directions = metrics.random_directions(
            jax.random.fold_in(seed_key, 1), config.num_projections, d
        )
        return jnp.stack(
            [
                metrics.sliced_w2(x, reference, directions),
                metrics.mmd_squared(x, reference, bandwidth_sq),
                metrics.mode_weight_error(x, target),
            ]
        )

    def score(samples: jax.Array, key: jax.Array) -> jax.Array:
        keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(samples.shape[0]))
        return jax.lax.map(one, (samples, keys))

    return jax.jit(score)


def mixture_sampler(
    sampler: Callable,
    options: dict[str, Any],
    model: diffusion.Model,
    sde: diffusion.SDE,
    dim: int,
    config: ConfigDict,
) -> Callable:
    """A jitted ``(grid, key) -> (samples [S, n, d], nfe [S, n], nonfinite [S, n])``: all seeds in
    one vmapped call; seed s draws its prior from ``fold_in(key_s, 0)`` and its noise from
    ``fold_in(key_s, 1)``, ``key_s = fold_in(key, s)``."""

    def one(seed_key: jax.Array, grid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x_T = sde.prior_sample(jax.random.fold_in(seed_key, 0), (config.num_samples, dim))
        x, info = diffusion.sample_batch(
            sampler, jax.random.fold_in(seed_key, 1), model, sde, x_T, grid, final="none", **options
        )
        return x, info.nfe, info.nonfinite_step

    def run(grid: jax.Array, key: jax.Array):
        keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(config.num_seeds))
        return jax.vmap(one, in_axes=(0, None))(keys, grid)

    return jax.jit(run)


def summarise(values: np.ndarray) -> dict[str, float]:
    """Mean and standard error over seeds (axis 0) of one metric."""
    mean, stderr = common.mean_and_stderr(np.ravel(values))
    return {"mean": float(mean), "se": float(stderr)}


def run_mixtures(
    config: ConfigDict, sde: diffusion.SDE, key: jax.Array, bar: tqdm
) -> dict[str, Any]:
    """Part B: sliced W2, MMD² and mode-weight error of every sampler at every budget, and of exact
    draws."""
    result: dict[str, Any] = {}
    metric_names = ("sliced_w2", "mmd2", "mode_weight_error")
    for p, problem in enumerate(config.mixtures):
        law = build_mixture(problem, config)
        target = marginal(law, sde, sde.t_min)
        model = diffusion.mixture_model(sde, law.eigen())
        problem_key = jax.random.fold_in(key, p)
        reference_key, sample_key, exact_key, bandwidth_key = (
            jax.random.fold_in(problem_key, i) for i in range(4)
        )
        pool = target.sample(bandwidth_key, min(config.num_samples, 2048))
        bandwidth_sq = float(
            jnp.median(metrics.squared_distances(pool, pool)[jnp.triu_indices(pool.shape[0], 1)])
        )
        score = mixture_scorer(target, bandwidth_sq, config)
        entry: dict[str, Any] = {
            "dim": law.dim,
            "weights": np.exp(np.asarray(law.log_weights)).tolist(),
            "bandwidth_sq": bandwidth_sq,
            "grid": config.mixture_grid,
            "samplers": {},
        }
        # the Monte Carlo floor: exact draws (independent of the references) scored the same way
        exact_keys = jax.vmap(lambda s, key=exact_key: jax.random.fold_in(key, s))(
            jnp.arange(config.num_seeds)
        )
        exact = jax.vmap(target.sample, in_axes=(0, None))(exact_keys, config.num_samples)
        values = np.asarray(score(exact, reference_key))
        entry["exact"] = {m: summarise(values[:, i]) for i, m in enumerate(metric_names)}
        bar.update()
        for s, name in enumerate(config.mixture_samplers):
            sampler_name, options = common.sampler_options(name, config)
            spec = diffusion.SAMPLERS[sampler_name]
            run = mixture_sampler(spec.sampler, options, model, sde, law.dim, config)
            per_budget: dict[str, Any] = {}
            for budget in config.mixture_nfe_budgets:
                steps = spec.steps_within(budget, final="none", **options)
                if steps is None:
                    per_budget[str(budget)] = {"steps": None, "nfe": None}
                    bar.update()
                    continue
                grid = jnp.asarray(diffusion.time_grid(sde, config.mixture_grid, steps))
                samples, nfe, bad = run(grid, jax.random.fold_in(sample_key, s))
                nfe, bad = np.asarray(nfe), np.asarray(bad)
                if np.any(nfe > budget):
                    raise RuntimeError(
                        f"{name} used {nfe.max()} evaluations for a budget of {budget}"
                    )
                values = np.asarray(score(samples, reference_key))
                per_budget[str(budget)] = {
                    "steps": steps,
                    "nfe": int(nfe.max()),
                    "nonfinite_samples": int(np.sum(bad >= 0)),
                    **{m: summarise(values[:, i]) for i, m in enumerate(metric_names)},
                }
                bar.update()
            entry["samplers"][name] = per_budget
        result[problem] = entry
    return result


# ------------------------------------------------------------------ output


def best_at_low_nfe(gaussian: dict[str, Any], largest: int) -> dict[str, dict[str, Any]]:
    """Per grid and budget up to ``largest``: the sampler of lowest exact KL (ties to the first
    listed) and its KL; ``None`` where no sampler ran or every KL is non-finite."""
    best: dict[str, dict[str, Any]] = {}
    for grid in next(iter(gaussian["samplers"].values()))["grids"]:
        best[grid] = {}
        for i, budget in enumerate(gaussian["budgets"]):
            if budget > largest:
                continue
            scored = [
                (r["grids"][grid]["kl"][i], name)
                for name, r in gaussian["samplers"].items()
                if r["grids"][grid]["kl"][i] is not None and np.isfinite(r["grids"][grid]["kl"][i])
            ]
            kl, name = min(scored, key=lambda pair: pair[0]) if scored else (None, None)
            best[grid][str(budget)] = None if name is None else {"sampler": name, "kl": kl}
    return best


def grid_ratios(gaussian: dict[str, Any]) -> dict[str, list[float]]:
    """KL(uniform_time) / KL(uniform_log_snr) per sampler and budget (when both grids ran)."""
    ratios = {}
    for name, r in gaussian["samplers"].items():
        grids = r["grids"]
        if "uniform_time" in grids and "uniform_log_snr" in grids:
            ratios[name] = [
                a / b if np.isfinite(a) and np.isfinite(b) and b > 0 else float("nan")
                for a, b in zip(grids["uniform_time"]["kl"], grids["uniform_log_snr"]["kl"])
            ]
    return ratios


def mixture_rows(mixtures: dict[str, Any]) -> list[list[Any]]:
    """CSV rows of Part B: the exact draws (no budget, no NFE), then every sampler and budget."""
    metric_names = ("sliced_w2", "mmd2", "mode_weight_error")

    def values(r: dict[str, Any]) -> list[Any]:
        return [r[m][k] if m in r else None for m in metric_names for k in ("mean", "se")]

    rows = []
    for problem, entry in mixtures.items():
        rows.append([problem, "exact", None, None, None, *values(entry["exact"])])
        for name, per_budget in entry["samplers"].items():
            rows.extend(
                [problem, name, budget, r["steps"], r["nfe"], *values(r)]
                for budget, r in per_budget.items()
            )
    return rows


def _fmt(value: float, spec: str = ".2e") -> str:
    return "—" if value is None or not np.isfinite(value) else format(value, spec)


def format_table(metrics: dict[str, Any]) -> str:
    g = metrics["gaussian"]
    budgets = g["budgets"]
    lines = [
        (
            f"Part A: exact KL(sampler law || p_tmin), {g['dim']}-D anisotropic Gaussian, "
            f"{g['sde']}, "
            "final='none'; NFE budget per column (each sampler takes the most steps that fit)"
        ),
        (
            f"prior-mismatch floor KL(prior || p_T) = {g['floor_kl']:.4e} nats "
            "(a perfect ODE solver's KL; "
            f"fits use KL >= {metrics['floor_factor']:g} x floor, "
            f"the {metrics['fit_points']} largest such NFE)"
        ),
        "{:18s} {:16s} ".format("sampler", "grid")
        + " ".join(f"{b:>8d}" for b in budgets)
        + "   order  (fit NFE)",
    ]
    for name, r in g["samplers"].items():
        for grid, v in r["grids"].items():
            fit = ",".join(str(n) for n in v["fit_nfe"])
            lines.append(
                f"{name:18s} {grid:16s} "
                + " ".join(f"{_fmt(k):>8s}" for k in v["kl"])
                + f"   {_fmt(v['order'], '+.2f'):>5s}  ({fit})"
            )
    lines.append(
        "local orders -1/2 dlog KL / dlog NFE between consecutive budgets "
        "(the floor flattens the last ones)"
    )
    lines.append(
        "{:18s} {:16s} ".format("sampler", "grid")
        + " ".join(f"{f'{a}-{b}':>8s}" for a, b in zip(budgets[:-1], budgets[1:]))
    )
    for name, r in g["samplers"].items():
        for grid, v in r["grids"].items():
            lines.append(
                f"{name:18s} {grid:16s} "
                + " ".join(f"{_fmt(o, '+.2f'):>8s}" for o in v["local_orders"])
            )
    ratios = metrics["grid_ratio_uniform_time_over_log_snr"]
    if ratios:
        lines.append(
            f"low NFE on {g['sde']}: KL(uniform_time) / KL(uniform_log_snr) at NFE budgets "
            + ", ".join(str(b) for b in budgets[:3])
        )
        for name, values in ratios.items():
            lines.append(f"  {name:18s} " + " ".join(f"{_fmt(v, '.3g'):>9s}" for v in values[:3]))
    lines.append(f"best sampler (lowest exact KL) at each NFE budget <= {LOW_NFE}:")
    for grid, per_budget in metrics["best_at_low_nfe"].items():
        best = [
            f"{budget}: —" if r is None else f"{budget}: {r['sampler']} ({_fmt(r['kl'])})"
            for budget, r in per_budget.items()
        ]
        lines.append(f"  {grid:16s} " + "  ".join(best))
    for problem, entry in metrics["mixtures"].items():
        lines.append(
            f"Part B: {problem} ({entry['dim']}-D, weights "
            + "/".join(f"{w:.2f}" for w in entry["weights"])
            + f"), {entry['grid']} grid, mean ± SE over {metrics['num_seeds']} seeds of "
            f"{metrics['num_samples']} samples; "
            f"MMD² Gaussian kernel h² = {entry['bandwidth_sq']:.3g} "
            "(median heuristic)"
        )
        lines.append(
            "{:20s} {:>6s} {:>4s} {:>21s} {:>23s} {:>21s}".format(
                "sampler", "budget", "NFE", "sliced W2", "MMD²", "mode-weight TV"
            )
        )

        def row(label: str, budget: str, nfe: str, r: dict[str, Any]) -> str:
            return f"{label:20s} {budget:>6s} {nfe:>4s} " + " ".join(
                f"{_fmt(r[m]['mean']):>9s} ± {_fmt(r[m]['se'], '.1e'):>7s}   "
                for m in ("sliced_w2", "mmd2", "mode_weight_error")
            )

        lines.append(row("exact (MC floor)", "—", "—", entry["exact"]))
        for name, per_budget in entry["samplers"].items():
            for budget, r in per_budget.items():
                if r["nfe"] is None:
                    lines.append(
                        f"{name:20s} {budget:>6s}    — (its smallest run exceeds the budget)"
                    )
                else:
                    lines.append(
                        row(name, budget, str(r["nfe"]), r)
                        + (
                            f" ({r['nonfinite_samples']} non-finite)"
                            if r["nonfinite_samples"]
                            else ""
                        )
                    )
    return "\n".join(lines)


def draw(metrics: dict[str, Any], path) -> None:
    """Error against NFE: only finite points (and, on a log axis, positive ones) are drawn; a
    sampler with dropped (diverged) points says how many in its legend label."""
    g = metrics["gaussian"]
    grids = list(next(iter(g["samplers"].values()))["grids"])
    problems_ = list(metrics["mixtures"])
    cols = max(len(grids), 3)
    fig, axes = plt.subplots(
        1 + len(problems_), cols, figsize=(4.2 * cols, 3.8 * (1 + len(problems_))), squeeze=False
    )
    for j, grid in enumerate(grids):
        axis = axes[0, j]
        for name, r in g["samplers"].items():
            v = r["grids"][grid]
            run = [(n, np.nan if k is None else k) for n, k in zip(v["nfe"], v["kl"]) if n > 0]
            nfe, kl, _, dropped = common.finite_curve(*zip(*run)) if run else ([], [], None, 0)
            label = common.not_shown(f"{name} ({_fmt(v['order'], '.2f')})", dropped)
            if len(nfe):
                axis.plot(nfe, kl, marker="o", ms=3, label=label)
            elif dropped:
                axis.plot([], [], marker="x", ls="", label=label)
        common.log_level(axis, g["floor_kl"], color="k", ls="--", lw=0.8, label="KL(prior || p_T)")
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="NFE",
            ylabel="exact KL to p_tmin",
            title=f"{g['sde']}, {grid}",
        )
    for j in range(len(grids), cols):
        axes[0, j].axis("off")
    labels = {
        "sliced_w2": "sliced W2",
        "mmd2": "MMD² (unbiased)",
        "mode_weight_error": "mode-weight TV",
    }
    for i, problem in enumerate(problems_, start=1):
        entry = metrics["mixtures"][problem]
        for j, metric in enumerate(labels):
            axis = axes[i, j]
            for name, per_budget in entry["samplers"].items():
                pts = [
                    (r["nfe"], r[metric]["mean"], r[metric]["se"])
                    for r in per_budget.values()
                    if r["nfe"]
                ]
                if not pts:
                    continue
                nfe, mean, se = (np.asarray(c, float) for c in zip(*pts))  # None -> NaN
                if metric == "sliced_w2":  # log axis
                    nfe, mean, se, dropped = common.finite_curve(nfe, mean, se)
                else:  # linear axis: MMD² (unbiased) may be negative
                    keep = np.isfinite(nfe) & np.isfinite(mean) & np.isfinite(se)
                    nfe, mean, se, dropped = nfe[keep], mean[keep], se[keep], int(np.sum(~keep))
                label = common.not_shown(name, dropped)
                if len(nfe):
                    axis.errorbar(nfe, mean, yerr=se, marker="o", ms=3, capsize=2, label=label)
                else:
                    axis.plot([], [], marker="x", ls="", label=label)
            exact = entry["exact"][metric]["mean"]
            if exact is not None and np.isfinite(exact) and (metric != "sliced_w2" or exact > 0):
                axis.axhline(exact, color="k", ls="--", lw=0.8, label="exact (MC floor)")
            axis.set(
                xscale="log",
                xlabel="NFE",
                ylabel=labels[metric],
                title=f"{problem} ({entry['dim']}-D)",
            )
            if metric == "sliced_w2":
                axis.set_yscale("log")
        for j in range(len(labels), cols):
            axes[i, j].axis("off")
    for axis in axes.flat:
        if axis.has_data():
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=6)
    common.save_figure(fig, path)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table, the CSVs and the figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    sde = diffusion.make_sde(config.sde)
    folder = common.results_folder(config, NAME)
    total = len(config.gaussian_samplers) * len(config.nfe_budgets) + len(config.mixtures) * (
        1 + len(config.mixture_samplers) * len(config.mixture_nfe_budgets)
    )
    with tqdm(total=total, desc=NAME) as bar:
        gaussian = run_gaussian(config, sde, bar)
        mixtures = run_mixtures(config, sde, jax.random.key(config.seed), bar)
    metrics: dict[str, Any] = {
        "floor_factor": config.floor_factor,
        "fit_points": config.fit_points,
        "num_seeds": config.num_seeds,
        "num_samples": config.num_samples,
        "gaussian": gaussian,
        "grid_ratio_uniform_time_over_log_snr": grid_ratios(gaussian),
        "best_at_low_nfe": best_at_low_nfe(gaussian, LOW_NFE),
        "mixtures": mixtures,
    }
    table = format_table(metrics)
    common.write_csv(
        folder / "gaussian_kl.csv",
        ["sampler", "grid", "budget", "steps", "nfe", "kl", "w2", "floor_kl"],
        [
            [
                name,
                grid,
                b,
                v["steps"][i],
                v["nfe"][i],
                v["kl"][i],
                v["w2"][i],
                gaussian["floor_kl"],
            ]
            for name, r in gaussian["samplers"].items()
            for grid, v in r["grids"].items()
            for i, b in enumerate(gaussian["budgets"])
        ],
    )
    common.write_csv(
        folder / "mixtures.csv",
        [
            "problem",
            "sampler",
            "budget",
            "steps",
            "nfe",
            "sliced_w2",
            "sliced_w2_se",
            "mmd2",
            "mmd2_se",
            "mode_weight_error",
            "mode_weight_error_se",
        ],
        mixture_rows(mixtures),
    )
    return common.finish(folder, table, metrics, lambda path: draw(metrics, path))


if __name__ == "__main__":
    common.main(run, validate)
