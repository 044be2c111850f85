r"""Restart sampling contracts errors made at high noise; ODE sampling carries them to the data.

Xu et al. (2023), "Restart Sampling for Improving Generative Processes", Thm. 2-3: the
probability-flow ODE has small discretisation error but passes on every error accumulated
earlier (it is a deterministic map), SDE sampling contracts accumulated errors but pays a
larger discretisation error, and Restart — ODE steps plus K jumps of fresh noise from
:math:`t_{min}` up to :math:`t_{max}` — contracts the accumulated total variation by a factor
per restart while keeping ODE-sized discretisation error.  With exact scores every sampler
here reaches the Monte Carlo floor at a moderate NFE (the ``sampler_nfe`` study; numbers in the
README), so the contraction cannot show; this study adds the error the theorem is about.

Test bed: three isotropic Gaussian modes on a circle (weights ``config.weights``) under VP.
The score model is exact for :math:`t \le` ``error_above`` and, above it, the exact score of
the *equal-weight* mixture (:class:`shufflesgd.problems.EigenMixture`): a score error
confined to high noise, where the mode weights are decided.  Measured: the total variation
between the sampled mode frequencies (each sample assigned to its most responsible
component) and the true weights, mean ± SE over ``num_seeds`` seeds of ``num_samples``
samples (the seeds split over ``config.devices`` devices, :func:`experiments.common.seed_mesh`),
for PF-ODE Heun, Euler-Maruyama and Restart (K restarts of ``restart_steps`` Heun
steps between ``restart_t_min`` and ``restart_t_max``, the main pass shortened so that the
NFE matches), each at the NFE budgets, with the steps that fit a budget read from the sampler
registry (:data:`shufflesgd.diffusion.SAMPLERS`).  Expected (Xu et al.): Heun stays at the error the
wrong high-noise score made; Euler-Maruyama improves slowly; Restart falls below both.

Run: ``python -m experiments.restart_contraction --config configs/restart_contraction.py``.
"""

from __future__ import annotations

import math
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

NAME = "restart_contraction"


def validate(config: ConfigDict) -> None:
    weights = np.asarray(config.weights, float)
    if (
        weights.ndim != 1
        or weights.size < 2
        or np.any(weights <= 0)
        or not math.isclose(weights.sum(), 1.0)
    ):
        raise ValueError(
            "config.weights must be at least two positive numbers summing to 1, "
            f"got {config.weights!r}"
        )
    for field in ("radius", "mode_variance"):
        if not config[field] > 0:
            raise ValueError(f"config.{field} must be positive, got {config[field]!r}")
    for field in ("error_above", "restart_t_min", "restart_t_max"):
        if not 0.0 < config[field] < 1.0:
            raise ValueError(f"config.{field} must lie in (0, 1) (VP time), got {config[field]!r}")
    if not config.restart_t_min < config.restart_t_max <= config.error_above:
        raise ValueError(
            "config.restart_t_min < config.restart_t_max <= config.error_above must hold, got "
            f"{config.restart_t_min}, {config.restart_t_max}, {config.error_above}"
        )
    common.check_positive_ints("nfe_budgets", config.nfe_budgets)
    common.check_positive_ints("restart_ks", config.restart_ks)
    for field in ("restart_steps", "num_samples", "num_seeds"):
        common.check_positive_ints(field, config[field])
    if config.num_seeds < 2:
        raise ValueError(
            f"config.num_seeds must be at least 2 (for standard errors), got {config.num_seeds}"
        )
    smallest = 2 * (max(config.restart_ks) * config.restart_steps + 2)
    if min(config.nfe_budgets) < smallest:
        raise ValueError(
            f"config.nfe_budgets must be at least {smallest} "
            "(two main Heun steps plus the restarts), "
            f"got {config.nfe_budgets!r}"
        )
    common.seed_devices(config)


def build(config: ConfigDict) -> tuple[problems.GaussianMixture, diffusion.Model, diffusion.SDE]:
    """The true mixture, the score model that is wrong above ``error_above``, and VP."""
    k = len(config.weights)
    angles = 2.0 * np.pi * np.arange(k) / k
    means = config.radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    covariances = np.repeat(config.mode_variance * np.eye(2)[None], k, axis=0)
    true = problems.gaussian_mixture(config.weights, means, covariances)
    wrong = problems.gaussian_mixture(np.full(k, 1.0 / k), means, covariances)
    sde = diffusion.make_sde("vp")
    exact, equal = true.eigen(), wrong.eigen()

    def score(x: jax.Array, t: jax.Array) -> jax.Array:
        alpha, sigma = sde.alpha(t), sde.sigma(t)
        return jnp.where(
            t > config.error_above, equal.score(x, alpha, sigma), exact.score(x, alpha, sigma)
        )

    return true, diffusion.Model(score, "score"), sde


def runs(
    config: ConfigDict, sde: diffusion.SDE, budget: int
) -> dict[str, tuple[Any, jax.Array, dict[str, Any]]]:
    """Sampler name -> (sampler, grid, options): the most steps whose evaluations fit ``budget``,
    as the sampler registry counts them (each run adds one for the final denoising step, the same
    for every sampler)."""
    samplers = {"pf_ode_heun": ("pf_ode_heun", {}), "euler_maruyama": ("euler_maruyama", {})}
    for k in config.restart_ks:
        samplers[f"restart_K{k}"] = (
            "restart",
            dict(
                restart_t_min=config.restart_t_min,
                restart_t_max=config.restart_t_max,
                restart_k=k,
                restart_steps=config.restart_steps,
            ),
        )
    out = {}
    for label, (name, options) in samplers.items():
        spec = diffusion.SAMPLERS[name]
        steps = spec.steps_within(budget, final="none", **options)
        out[label] = (
            spec.sampler,
            jnp.asarray(diffusion.time_grid(sde, "uniform_log_snr", steps)),
            options,
        )
    return out


def mode_errors(
    config: ConfigDict,
    true: problems.GaussianMixture,
    model: diffusion.Model,
    sde: diffusion.SDE,
    sampler: Any,
    grid: jax.Array,
    options: dict[str, Any],
) -> tuple[jax.Array, jax.Array]:
    """Mode-weight TV and NFE per seed (``[num_seeds]`` each) of one sampler: every seed in one
    jitted, vmapped call, the seeds split over the devices of :func:`experiments.common.seed_mesh`
    (seed ``s`` draws from ``fold_in(key(config.seed), s)``)."""
    key = jax.random.key(config.seed)

    def one_seed(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
        prior_key, sample_key = jax.random.split(jax.random.fold_in(key, seed))
        x_T = sde.prior_sample(prior_key, (config.num_samples, 2))
        x, info = diffusion.sample_batch(sampler, sample_key, model, sde, x_T, grid, **options)
        return metrics.mode_weight_error(x, true), info.nfe[0]

    seeds = common.shard_seeds(jnp.arange(config.num_seeds), common.seed_mesh(config))
    return jax.jit(jax.vmap(one_seed))(seeds)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the CSV, the table and the figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    true, model, sde = build(config)
    folder = common.results_folder(config, NAME)
    rows: list[dict[str, Any]] = []
    work = [
        (budget, name, spec)
        for budget in config.nfe_budgets
        for name, spec in runs(config, sde, budget).items()
    ]
    for budget, name, (sampler, grid, options) in tqdm(work, desc=NAME):
        tvs, nfes = mode_errors(config, true, model, sde, sampler, grid, options)
        tv_mean, tv_se = common.mean_and_stderr(tvs)
        rows.append(
            dict(
                sampler=name,
                budget=budget,
                nfe=int(nfes[0]),
                tv_mean=float(tv_mean),
                tv_se=float(tv_se),
                tv_per_seed=np.asarray(tvs).tolist(),
            )
        )
    floor = float(
        np.sqrt(2.0 / (np.pi * config.num_samples))
        * np.sum(np.sqrt(np.asarray(config.weights) * (1 - np.asarray(config.weights))))
        / 2
    )
    results = dict(
        rows=rows,
        multinomial_tv_floor=floor,
        devices=common.seed_devices(config),  # the seed axis was split over these
    )
    table = format_table(config, rows, floor)
    common.write_csv(
        folder / "tv.csv",
        ["sampler", "budget", "nfe", "tv_mean", "tv_se"],
        [[r["sampler"], r["budget"], r["nfe"], r["tv_mean"], r["tv_se"]] for r in rows],
    )
    return common.finish(folder, table, results, lambda path: draw(config, rows, floor, path))


def format_table(config: ConfigDict, rows: list[dict[str, Any]], floor: float) -> str:
    lines = [
        f"mode-weight TV to weights {tuple(config.weights)}; score = equal-weight mixture's for "
        f"t > {config.error_above} (VP); mean ± SE over {config.num_seeds} seeds of "
        f"{config.num_samples} "
        f"samples; multinomial floor of exact draws ≈ {floor:.4f}",
        f"{'sampler':16s} {'budget':>6s} {'NFE':>5s} {'mode-weight TV':>20s}",
    ]
    for r in rows:
        lines.append(
            f"{r['sampler']:16s} {r['budget']:6d} {r['nfe']:5d} {r['tv_mean']:10.4f} "
            f"± {r['tv_se']:.4f}"
        )
    return "\n".join(lines)


def draw(config: ConfigDict, rows: list[dict[str, Any]], floor: float, path: Any) -> None:
    """TV against NFE on log-log axes: only finite, positive points are drawn; a sampler with
    dropped (diverged) points is marked in the legend (``metrics.json`` keeps every number)."""
    fig, axis = plt.subplots(figsize=(5.5, 4))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == name]
        nfe, tv, se, dropped = common.finite_curve(
            [r["nfe"] for r in mine],
            [np.nan if r["tv_mean"] is None else r["tv_mean"] for r in mine],
            [np.nan if r["tv_se"] is None else r["tv_se"] for r in mine],
        )
        label = common.not_shown(name, dropped)
        if len(nfe):
            axis.errorbar(nfe, tv, se, marker="o", capsize=3, label=label)
        else:
            axis.plot([], [], marker="x", ls="", label=label)
    if np.isfinite(floor) and floor > 0:
        axis.axhline(floor, color="0.5", ls=":", label="exact draws (floor)")
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="NFE",
        ylabel="mode-weight TV",
        title=f"score wrong above t = {config.error_above}",
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    common.save_figure(fig, path)


if __name__ == "__main__":
    common.main(run, validate)
