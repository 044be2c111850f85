r"""EF21 over compressors x step-size multipliers x seeds, in one jitted, vmapped call.

EF21 (Richtárik, Sokolov, Fatkhullin, NeurIPS 2021, Alg. 1) on one heterogeneous
least-squares problem (``problems.heterogeneous_regression``: the workers' :math:`L_i`
log-spaced over ``[1, spread]``), with several compressors:

===============  ==========================================  ==============================
name             compressor                                  :math:`\alpha` for the step
===============  ==========================================  ==============================
``top_k``        Top-k, ``k = ceil(top_k_fraction d)``       :math:`k/d`
``rand_k``       Rand-k, unscaled (contractive)              :math:`k/d`
``scaled_sign``  :math:`\|x\|_1/d\,\mathrm{sign}(x)`          :math:`1/d` (worst case)
``natural``      natural compression (Horváth et al. 2019)   :math:`1 - \omega = 7/8`
``qsgd``         QSGD with ``qsgd_levels`` levels            :math:`1 - \omega`, :math:`\omega < 1`
===============  ==========================================  ==============================

An unbiased compressor with variance :math:`\omega < 1` is contractive with
:math:`\alpha = 1 - \omega`, since :math:`E\|C(x) - x\|^2 = E\|C(x)\|^2 - \|x\|^2 \le
\omega\|x\|^2`.  Each compressor's step size is ``multiplier x`` its own EF21 theory step
:math:`1/(L + \tilde L\sqrt{\beta/\theta})` (``compression.ef21_step_size``,
``config.step_size_mean`` choosing :math:`L_{QM}` or :math:`L_{AM}`).

**One compiled call.**  Compressors differ in code, so each gets its own run function
(``compression.make_distributed_run`` with ``compression.ef21(compressor)``) and the sweep
dispatches on a traced index: ``jax.vmap(lambda i, key, lr: lax.switch(i, runs, key, lr))``
over the flattened grid (seed, compressor, multiplier).  Under ``vmap`` a ``switch`` whose
index is batched evaluates *every* branch for every entry and selects the results, so the
sweep costs about ``len(compressors)`` times the work of the entries themselves; that is
the price of a single program (one Python loop over compressors, one vmapped call each,
would not pay it).  The keys enter the switch as raw ``uint32`` key data and are wrapped
inside each branch: the batching rule of ``switch`` selects every operand per branch
(``select_n(p, key, key)``), which the key-reuse checker (``jax_debug_key_reuse``)
reports as a reuse of a typed key although no randomness is shared.  Entry ``(c, m, s)``
uses the same key as the single run ``runs[c](keys[s], x0, multiplier[m] * base[c])``,
and the test checks that they agree to float tolerance.

**Sharded seeds.**  The grid is flattened seed slowest, and its leading axis is placed on the
``"seeds"`` axis of :func:`experiments.common.seed_mesh` (``config.devices`` devices), so
``jax.jit`` gives each device the whole (compressor, multiplier) grid of its own block of
seeds.

Run: ``python -m experiments.ef_sweep --config configs/ef_sweep.py``
(``:quick`` for the demo; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import compression, drivers, problems

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "ef_sweep"
COMPRESSORS = ("top_k", "rand_k", "scaled_sign", "natural", "qsgd")
MEANS = ("quadratic", "arithmetic")

Run = Callable[[jax.Array, jax.Array, jax.Array], compression.DistributedResult]


# ------------------------------------------------------------------ building blocks


def make_compressor(name: str, config: ConfigDict) -> compression.Compressor:
    """The config's compressor ``name`` (one of :data:`COMPRESSORS`)."""
    if name == "top_k":
        return compression.top_k(fraction=config.top_k_fraction)
    if name == "rand_k":
        return compression.rand_k(fraction=config.rand_k_fraction, scaled=False)
    if name == "scaled_sign":
        return compression.scaled_sign()
    if name == "natural":
        return compression.natural_compression()
    return compression.qsgd(config.qsgd_levels)


def contraction(compressor: compression.Compressor, x: Any) -> float | None:
    r"""EF21's :math:`\alpha`: the contraction, or :math:`1 - \omega` for an unbiased
    compressor with :math:`\omega < 1`; ``None`` when neither applies."""
    alpha = compression.tree_contraction(compressor, x)
    if alpha is not None:
        return float(alpha)
    omega = compression.tree_variance(compressor, x)
    if omega is None or omega >= 1.0:
        return None
    return 1.0 - float(omega)


def build_problem(config: ConfigDict) -> problems.DistributedSum:
    """Least squares over ``config.num_workers`` workers whose L_i span ``config.spread``."""
    a, b = problems.heterogeneous_regression(
        config.data_seed,
        config.num_workers,
        config.examples_per_worker,
        config.dim,
        spread=float(config.spread),
        noise=config.noise,
    )
    return problems.distributed_least_squares(a, b, config.num_workers, l2=config.l2)


def base_step_sizes(
    problem: problems.DistributedSum, compressors: list[compression.Compressor], mean: str
) -> np.ndarray:
    """Each compressor's EF21 theory step size, shape ``[len(compressors)]``."""
    smoothness, worker = float(problem.smoothness), np.asarray(problem.worker_smoothness)
    return np.array(
        [
            compression.ef21_step_size(
                smoothness, worker, contraction(c, problem.x_star), mean=mean
            )
            for c in compressors
        ]
    )


def make_runs(
    problem: problems.DistributedSum, compressors: list[compression.Compressor], num_steps: int
) -> list[Run]:
    """One ``run(key, x0, step_size)`` per compressor: EF21 with that compressor."""
    return [
        compression.make_distributed_run(problem, compression.ef21(c), num_steps=num_steps)
        for c in compressors
    ]


def seed_key_data(seed: int, num_seeds: int) -> jax.Array:
    """Raw ``uint32`` data of ``split(key(seed), num_seeds)``: seed ``s``'s key is
    ``jax.random.wrap_key_data(data[s])``."""
    return jax.random.key_data(jax.random.split(jax.random.key(seed), num_seeds))


def make_sweep(runs: list[Run], x0: jax.Array):
    """``sweep(indices, key_data, step_sizes)``: entry ``j`` is
    ``runs[indices[j]](wrap_key_data(key_data[j]), x0, step_sizes[j])``, one jitted call.

    ``lax.switch`` on the traced compressor index; under ``vmap`` every branch runs for
    every entry and the results are selected (see the module docstring).
    """
    branches = [
        (lambda data, step_size, run=run: run(jax.random.wrap_key_data(data), x0, step_size))
        for run in runs
    ]

    def entry(
        index: jax.Array, data: jax.Array, step_size: jax.Array
    ) -> compression.DistributedResult:
        return jax.lax.switch(index, branches, data, step_size)

    return jax.jit(jax.vmap(entry))


def grid(
    num_compressors: int,
    multipliers: np.ndarray,
    num_seeds: int,
    bases: np.ndarray,
    key_data: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The flattened (seed, compressor, multiplier) grid, seed slowest (so that a block of the
    leading axis is a block of seeds): ``(indices, key_data, step_sizes)`` each with leading axis
    ``S * C * M``."""
    s, c, m = np.meshgrid(
        np.arange(num_seeds), np.arange(num_compressors), np.arange(len(multipliers)), indexing="ij"
    )
    s, c, m = s.ravel(), c.ravel(), m.ravel()
    return jnp.asarray(c, jnp.int32), key_data[s], jnp.asarray(bases[c] * multipliers[m])


def run_sweep(
    problem: problems.DistributedSum, compressors: list[compression.Compressor], config: ConfigDict
) -> tuple[compression.DistributedResult, np.ndarray]:
    """The whole sweep as one call, its seeds split over the devices of
    :func:`experiments.common.seed_mesh`: results with leading axes ``[C, M, S]`` (NumPy) and
    the base step sizes ``[C]``."""
    bases = base_step_sizes(problem, compressors, config.step_size_mean)
    multipliers = np.asarray(config.step_multipliers, np.float64)
    indices, data, step_sizes = grid(
        len(compressors),
        multipliers,
        config.num_seeds,
        bases,
        seed_key_data(config.seed, config.num_seeds),
    )
    drivers.check_learning_rate(step_sizes)
    sweep = make_sweep(
        make_runs(problem, compressors, config.num_steps), jnp.zeros_like(problem.x_star)
    )
    placed = common.shard_seeds((indices, data, step_sizes), common.seed_mesh(config))
    flat = jax.device_get(sweep(*placed))
    shape = (config.num_seeds, len(compressors), len(multipliers))

    def unflatten(leaf: np.ndarray) -> np.ndarray:  # [S*C*M, ...] -> [C, M, S, ...]
        return np.moveaxis(np.asarray(leaf).reshape(shape + leaf.shape[1:]), 0, 2)

    return jax.tree.map(unflatten, flat), bases


@jax.jit
def initial_grad_norm_sq(problem: problems.DistributedSum) -> jax.Array:
    """``||grad f(x_0)||^2`` at ``x_0 = 0``."""
    return optax.tree.norm(problem.gradient(jnp.zeros_like(problem.x_star)), squared=True)


# ------------------------------------------------------------------ validation


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built or compiled."""
    for field in (
        "num_workers",
        "examples_per_worker",
        "dim",
        "num_steps",
        "num_seeds",
        "curve_points",
    ):
        common.check_positive_ints(field, config[field])
    for field in ("data_seed", "seed"):
        if (
            isinstance(config[field], bool)
            or not isinstance(config[field], int)
            or config[field] < 0
        ):
            raise ValueError(
                f"config.{field} must be a non-negative integer, got {config[field]!r}"
            )
    if (
        isinstance(config.spread, bool)
        or not isinstance(config.spread, (int, float))
        or not config.spread >= 1
    ):
        raise ValueError(f"config.spread must be a number >= 1, got {config.spread!r}")
    names = common.check_names("compressors", config.compressors, COMPRESSORS)
    for field in ("top_k_fraction", "rand_k_fraction"):
        common.check_fraction(field, config[field])
    common.check_positive_ints("qsgd_levels", config.qsgd_levels)
    if "qsgd" in names:
        d, s = config.dim, config.qsgd_levels
        omega = min(d / s**2, math.sqrt(d) / s)
        if omega >= 1.0:
            raise ValueError(
                f"config.qsgd_levels={s} gives omega = {omega:.3g} >= 1 at d={d}; "
                "EF21 needs a contractive "
                f"compressor, so take config.qsgd_levels > sqrt(config.dim) = {math.sqrt(d):.3g}"
            )
    multipliers = list(config.step_multipliers)
    if not multipliers or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v)
        for v in multipliers
    ):
        raise ValueError(f"config.step_multipliers must be positive numbers, got {multipliers!r}")
    common.check_choice("step_size_mean", config.step_size_mean, MEANS)
    if not (isinstance(config.epsilon, float) and 0.0 < config.epsilon < 1.0):
        raise ValueError(
            "config.epsilon must lie in (0, 1) (relative to ||grad f(x0)||^2), "
            f"got {config.epsilon!r}"
        )
    for field in ("l2", "noise"):
        if not (isinstance(config[field], (int, float)) and config[field] >= 0):
            raise ValueError(f"config.{field} must be non-negative, got {config[field]!r}")
    common.seed_devices(config)
    if config.l2 == 0 and config.examples_per_worker * config.num_workers < config.dim:
        raise ValueError(
            "config.num_workers * config.examples_per_worker must be at least config.dim "
            "when config.l2 = 0 (otherwise the least-squares optimum is not unique)"
        )


# ------------------------------------------------------------------ summaries


def mean_and_stderr(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and Monte Carlo standard error over a 1-D array (``None`` if any is not finite)."""
    values = np.asarray(values, np.float64)
    if not np.all(np.isfinite(values)):
        return None, None
    if values.size < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def bits_to_epsilon(relative: np.ndarray, bits: np.ndarray, epsilon: float) -> np.ndarray:
    """Bits per worker when ``relative <= epsilon`` first holds (``nan`` where never), per row."""
    below = relative <= epsilon
    index = np.where(below.any(axis=-1), np.argmax(below, axis=-1), -1)
    reached = np.take_along_axis(bits, np.maximum(index, 0)[..., None], axis=-1)[..., 0]
    return np.where(index >= 0, reached, np.nan)


def summarise(
    results: compression.DistributedResult,
    bases: np.ndarray,
    names: list[str],
    compressors: list[compression.Compressor],
    initial: float,
    x: Any,
    config: ConfigDict,
) -> dict[str, Any]:
    relative = np.asarray(results.grad_norm_sq, np.float64) / initial  # [C, M, S, T]
    bits = np.asarray(results.bits_up, np.float64)
    keep = np.unique(
        np.linspace(0, config.num_steps - 1, min(config.curve_points, config.num_steps))
        .round()
        .astype(int)
    )
    out: dict[str, Any] = {}
    for c, (name, compressor) in enumerate(zip(names, compressors)):
        entry = {
            "alpha": contraction(compressor, x),
            "bits_per_message": compression.tree_bits(compressor, x),
            "base_step_size": float(bases[c]),
            "multipliers": {},
        }
        for m, multiplier in enumerate(config.step_multipliers):
            final = relative[c, m, :, -1]
            to_eps = bits_to_epsilon(relative[c, m], bits[c, m], config.epsilon)
            final_mean, final_se = mean_and_stderr(final)
            reached = int(np.sum(np.isfinite(to_eps)))
            eps_mean, eps_se = mean_and_stderr(to_eps) if reached == to_eps.size else (None, None)
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                curve = np.exp(np.mean(np.log(relative[c, m]), axis=0))  # geometric mean over seeds
            entry["multipliers"][f"{float(multiplier):g}"] = {
                "step_size": float(bases[c] * multiplier),
                "final_relative_grad_norm_sq": {
                    "mean": final_mean,
                    "stderr": final_se,
                    "per_seed": [float(v) if np.isfinite(v) else None for v in final],
                },
                "bits_to_epsilon": {
                    "mean": eps_mean,
                    "stderr": eps_se,
                    "reached": reached,
                    "per_seed": [float(v) if np.isfinite(v) else None for v in to_eps],
                },
                "total_bits": {
                    "mean": mean_and_stderr(bits[c, m, :, -1])[0],
                    "stderr": mean_and_stderr(bits[c, m, :, -1])[1],
                },
                "diverged_seeds": int(np.sum(np.asarray(results.diverged_step[c, m]) >= 0)),
                "curve": {
                    "step": (keep + 1).tolist(),
                    "bits": bits[c, m, 0, keep].tolist(),
                    "relative_grad_norm_sq": [
                        float(v) if np.isfinite(v) else None for v in curve[keep]
                    ],
                },
            }
        out[name] = entry
    return out


def format_value(mean: float | None, stderr: float | None, fmt: str = ".2e") -> str:
    if mean is None:
        return "—"
    return f"{mean:{fmt}} ± {stderr:.1e}" if stderr else f"{mean:{fmt}}"


def format_table(metrics: dict[str, Any], config: ConfigDict) -> str:
    lines = [
        f"EF21, spread {config.spread:g} (L_QM/L_AM = {metrics['qm_over_am']:.3f}), "
        f"n = {config.num_workers}, "
        f"d = {config.dim}, {config.num_steps} steps, {config.num_seeds} seeds, "
        "base step = EF21 theory "
        f"({config.step_size_mean} mean) per compressor; mean ± standard error over seeds",
        f"{'compressor':12s} {'alpha':>7s} {'mult':>5s} {'step':>9s} "
        f"{'final ||∇f||²/||∇f0||²':>24s} "
        f"{'bits to eps=' + format(config.epsilon, 'g'):>24s} {'total bits':>10s} {'diverged':>8s}",
    ]
    for name, entry in metrics["compressors"].items():
        for multiplier, row in entry["multipliers"].items():
            final = row["final_relative_grad_norm_sq"]
            to_eps = row["bits_to_epsilon"]
            eps_cell = (
                format_value(to_eps["mean"], to_eps["stderr"])
                if to_eps["mean"] is not None
                else f"not reached ({to_eps['reached']}/{config.num_seeds})"
            )
            final_cell = format_value(final["mean"], final["stderr"])
            if final["mean"] is None:
                final_cell = "not finite"
            lines.append(
                f"{name:12s} {entry['alpha']:7.4f} {multiplier:>5s} {row['step_size']:9.3e} "
                f"{final_cell:>24s} "
                f"{eps_cell:>24s} {row['total_bits']['mean']:10.3e} "
                f"{str(row['diverged_seeds']) + '/' + str(config.num_seeds):>8s}"
            )
    return "\n".join(lines)


def draw(metrics: dict[str, Any], config: ConfigDict, path) -> None:
    """Curves and the bits-to-ε summary on log axes: only finite, positive points are drawn; a
    curve with dropped (diverged or not reached) points says how many in its legend label."""
    names = list(metrics["compressors"])
    columns = min(3, len(names) + 1)
    rows = -(-(len(names) + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.8 * columns, 3.2 * rows), squeeze=False)
    axes = axes.ravel()
    for axis in axes[len(names) + 1 :]:
        axis.set_visible(False)
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(config.step_multipliers)))
    marked = set()  # panels besides the first that need a legend to mark dropped points
    for axis, name in zip(axes, names):
        for color, (multiplier, row) in zip(
            colors, metrics["compressors"][name]["multipliers"].items()
        ):
            curve = row["curve"]
            values = np.array([np.nan if v is None else v for v in curve["relative_grad_norm_sq"]])
            values[values > 1e6] = np.nan  # diverging: growth beyond the initial norm is not drawn
            bits, values, _, dropped = common.finite_curve(curve["bits"], values)
            label = common.not_shown(f"×{multiplier}", dropped)
            axis.plot(bits, values, color=color, label=label)
            if dropped and axis is not axes[0]:
                marked.add(axis)
        axis.axhline(config.epsilon, color="gray", lw=0.8, ls=":")
        axis.set(yscale="log", xlabel="bits sent per worker", title=name)
        axis.grid(True, which="both", alpha=0.3)
    for axis in marked:
        axis.legend(fontsize=7, title="step ×", title_fontsize=7)
    for axis in axes[: len(names) : columns]:
        axis.set_ylabel("||∇f(x_t)||² / ||∇f(x_0)||²  (geo. mean)")
    axes[0].legend(fontsize=7, title="step ×", title_fontsize=7)
    summary = axes[len(names)]
    multipliers = np.asarray(config.step_multipliers, float)
    for name in names:
        rows = metrics["compressors"][name]["multipliers"].values()
        means = np.array(
            [
                np.nan if r["bits_to_epsilon"]["mean"] is None else r["bits_to_epsilon"]["mean"]
                for r in rows
            ]
        )
        errors = np.array(
            [
                0.0 if r["bits_to_epsilon"]["stderr"] is None else r["bits_to_epsilon"]["stderr"]
                for r in rows
            ]
        )
        xs, ys, err, dropped = common.finite_curve(multipliers, means, errors)
        label = name + (f" ({dropped} points not shown)" if dropped else "")
        if len(xs):
            summary.errorbar(xs, ys, yerr=err, marker="o", ms=3, label=label)
        else:
            summary.plot([], [], marker="x", ls="", label=label)
    summary.set(
        xscale="log",
        yscale="log",
        xlabel="step-size multiplier",
        ylabel=f"bits to ε = {config.epsilon:g}",
        title="bits to ε (missing: not reached)",
    )
    summary.grid(True, which="both", alpha=0.3)
    summary.legend(fontsize=7)
    fig.suptitle(
        f"EF21 sweep in one vmapped call: spread {config.spread:g}, {config.num_seeds} seeds",
        fontsize=10,
    )
    common.save_figure(fig, path)


def write_csvs(metrics: dict[str, Any], folder) -> None:
    rows, curve_rows = [], []
    for name, entry in metrics["compressors"].items():
        for multiplier, row in entry["multipliers"].items():
            final, to_eps = row["final_relative_grad_norm_sq"], row["bits_to_epsilon"]
            rows.append(
                [
                    name,
                    entry["alpha"],
                    multiplier,
                    row["step_size"],
                    final["mean"],
                    final["stderr"],
                    to_eps["mean"],
                    to_eps["stderr"],
                    to_eps["reached"],
                    row["total_bits"]["mean"],
                    row["diverged_seeds"],
                ]
            )
            curve = row["curve"]
            curve_rows.extend(
                [name, multiplier, s, b, g]
                for s, b, g in zip(curve["step"], curve["bits"], curve["relative_grad_norm_sq"])
            )
    common.write_csv(
        folder / "sweep.csv",
        [
            "compressor",
            "alpha",
            "multiplier",
            "step_size",
            "final_relative_grad_norm_sq_mean",
            "final_relative_grad_norm_sq_stderr",
            "bits_to_epsilon_mean",
            "bits_to_epsilon_stderr",
            "seeds_reached",
            "total_bits",
            "diverged_seeds",
        ],
        rows,
    )
    common.write_csv(
        folder / "curves.csv",
        ["compressor", "multiplier", "step", "bits_per_worker", "relative_grad_norm_sq_geomean"],
        curve_rows,
    )


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table and the figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    problem = build_problem(config)
    names = list(config.compressors)
    compressors = [make_compressor(name, config) for name in names]
    for compressor in compressors:
        compression.check_tree(compressor, problem.x_star)
        if (
            contraction(compressor, problem.x_star) is None
        ):  # guarded by validate; kept as a safety net
            raise ValueError(f"config.compressors: {compressor.name} is not contractive")
    folder = common.results_folder(config, NAME)
    worker = np.asarray(problem.worker_smoothness, np.float64)
    with tqdm(total=2, desc=NAME) as bar:
        results, bases = run_sweep(problem, compressors, config)
        bar.update()
        metrics: dict[str, Any] = {
            "spread": float(config.spread),
            "L": float(problem.smoothness),
            "L_QM": float(np.sqrt(np.mean(worker**2))),
            "L_AM": float(np.mean(worker)),
            "qm_over_am": float(np.sqrt(np.mean(worker**2)) / np.mean(worker)),
            "epsilon": config.epsilon,
            "num_entries": len(names) * len(config.step_multipliers) * config.num_seeds,
            "devices": common.seed_devices(config),  # the seed axis was split over these
            "compressors": summarise(
                results,
                bases,
                names,
                compressors,
                float(initial_grad_norm_sq(problem)),
                problem.x_star,
                config,
            ),
        }
        bar.update()
    table = format_table(metrics, config)
    write_csvs(metrics, folder)
    return common.finish(folder, table, metrics, lambda path: draw(metrics, config, path))


if __name__ == "__main__":
    common.main(run, validate)
