r"""Error Feedback Reloaded: EF21's step size with :math:`L_{AM}` instead of :math:`L_{QM}`.

Richtárik, Gasanov, Burlachenko (ICLR 2024), "Error Feedback Reloaded: From Quadratic to
Arithmetic Mean of Smoothness Constants".  EF21 (Richtárik, Sokolov, Fatkhullin 2021,
Thm. 1) takes :math:`\gamma = 1/(L + L_{QM}\sqrt{\beta/\theta})` with the quadratic mean
:math:`L_{QM} = \sqrt{\frac1n\sum_i L_i^2}`; EF21-W (Alg. 2 there, weights
:math:`w_i = L_i/\sum_j L_j`) is proved to converge with the arithmetic mean
:math:`L_{AM} = \frac1n\sum_i L_i \le L_{QM}` in its place (Thm. 1 there).  When the
workers' :math:`L_i` span orders of magnitude, :math:`L_{QM}/L_{AM}` grows and so does the
number of bits EF21 needs.

For each spread :math:`L_{\max}/L_{\min}` (``problems.heterogeneous_regression``, whose
:math:`L_i` are log-spaced, so :math:`L_{QM}/L_{AM}` grows only like
:math:`\sqrt{\ln(\text{spread})}`; the README gives the values) and each compressor,
three runs from :math:`x_0 = 0` record :math:`\|\nabla f(x_t)\|^2` against the cumulative
bits each worker sent:

* ``ef21_qm``: EF21, :math:`\gamma = 1/(L + L_{QM}\sqrt{\beta/\theta})` (the original);
* ``ef21_am``: EF21 with the improved :math:`\gamma = 1/(L + L_{AM}\sqrt{\beta/\theta})`;
* ``ef21_w``: EF21-W with the same improved step size.

and the table gives the bits each needs to reach
:math:`\|\nabla f(x_t)\|^2 \le \varepsilon\|\nabla f(x_0)\|^2` and the ratio
EF21(:math:`L_{QM}`) / EF21-W.

**EF21(L_AM) and EF21-W coincide for Top-k and Rand-k.**  A positively homogeneous
compressor whose randomness does not depend on the values (:math:`C(\lambda x) =
\lambda C(x)` for :math:`\lambda > 0`, same key) makes EF21-W's :math:`g_i` equal to
EF21's :math:`g_i/(n w_i)` at every step, so the weighted average is EF21's and the
iterates are the same (a test of the library checks it).  The paper's contribution
for these compressors is the *proof* that EF21 converges with the larger step size.  Natural
compression (Horváth et al. 2019) rounds to powers of two and is not homogeneous, so there
EF21-W and EF21(:math:`L_{AM}`) differ; the table prints the measured largest relative
difference between their curves.  Natural compression is unbiased with
:math:`\omega = 1/8`, hence contractive with :math:`\alpha = 1 - \omega = 7/8`
(:math:`E\|C(x)-x\|^2 = E\|C(x)\|^2 - \|x\|^2 \le \omega\|x\|^2`).

Each (compressor, spread) is two calls: EF21 vmapped over seeds and its two step sizes,
and EF21-W vmapped over seeds.  Each is one compiled program per compressor, shared by all
spreads, since the problem, the step size and EF21-W's weights are traced arguments
(the weights are checked on the host first, ``compression.check_weights``); the seeds are
split over ``config.devices`` devices (:func:`experiments.common.seed_mesh`).  Top-k is
deterministic, so its seeds agree exactly; the seeds matter for Rand-k and natural
compression.

Run: ``python -m experiments.ef21_reloaded --config configs/ef21_reloaded.py``
(``:quick`` for the demo; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import math
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

NAME = "ef21_reloaded"
COMPRESSORS = ("top_k", "rand_k", "natural")
# Positively homogeneous with value-independent randomness: EF21-W == EF21 at the same step.
HOMOGENEOUS = frozenset({"top_k", "rand_k"})
METHODS = ("ef21_qm", "ef21_am", "ef21_w")
LABELS = {"ef21_qm": "EF21 (L_QM)", "ef21_am": "EF21 (L_AM)", "ef21_w": "EF21-W (L_AM)"}


# ------------------------------------------------------------------ building blocks


def make_compressor(name: str, config: ConfigDict) -> compression.Compressor:
    """The config's compressor ``name`` (one of :data:`COMPRESSORS`)."""
    if name == "top_k":
        return compression.top_k(fraction=config.top_k_fraction)
    if name == "rand_k":
        return compression.rand_k(fraction=config.rand_k_fraction, scaled=False)
    return compression.natural_compression()


def contraction(compressor: compression.Compressor, x: Any) -> float:
    r"""EF21's :math:`\alpha`: the contraction, or :math:`1 - \omega` for an unbiased
    compressor with :math:`\omega < 1` (``ValueError`` otherwise)."""
    alpha = compression.tree_contraction(compressor, x)
    if alpha is not None:
        return float(alpha)
    omega = compression.tree_variance(compressor, x)
    if omega is None or omega >= 1.0:
        raise ValueError(f"{compressor.name} is neither contractive nor unbiased with omega < 1")
    return 1.0 - float(omega)


def build_problem(config: ConfigDict, spread: float) -> problems.DistributedSum:
    """Least squares split over ``config.num_workers`` workers whose L_i span ``spread``."""
    a, b = problems.heterogeneous_regression(
        config.data_seed,
        config.num_workers,
        config.examples_per_worker,
        config.dim,
        spread=float(spread),
        noise=config.noise,
        profile=config.profile,
    )
    return problems.distributed_least_squares(a, b, config.num_workers, l2=config.l2)


def smoothness_means(problem: problems.DistributedSum) -> tuple[float, float]:
    """``(L_QM, L_AM)`` of the workers' smoothness constants."""
    worker = np.asarray(problem.worker_smoothness, np.float64)
    return float(np.sqrt(np.mean(worker**2))), float(np.mean(worker))


def step_sizes(problem: problems.DistributedSum, alpha: float) -> dict[str, float]:
    """The theory step size of each method (EF21-W uses the arithmetic mean, like ef21_am)."""
    smoothness, worker = float(problem.smoothness), np.asarray(problem.worker_smoothness)
    quadratic = compression.ef21_step_size(smoothness, worker, alpha, mean="quadratic")
    arithmetic = compression.ef21_step_size(smoothness, worker, alpha, mean="arithmetic")
    return {"ef21_qm": quadratic, "ef21_am": arithmetic, "ef21_w": arithmetic}


def first_crossing(values: np.ndarray, threshold: float) -> np.ndarray:
    """Index of the first entry ``<= threshold`` along the last axis, or ``-1``."""
    below = values <= threshold
    return np.where(below.any(axis=-1), np.argmax(below, axis=-1), -1)


def bits_to_epsilon(relative: np.ndarray, bits: np.ndarray, epsilon: float) -> np.ndarray:
    """Bits per worker when ``relative <= epsilon`` first holds (``nan`` where never), per row."""
    index = first_crossing(relative, epsilon)
    reached = np.take_along_axis(bits, np.maximum(index, 0)[..., None], axis=-1)[..., 0]
    return np.where(index >= 0, reached, np.nan)


def finite_or_none(values: np.ndarray) -> list[float | None]:
    """``values`` as a list for JSON, with ``None`` for the non-finite entries."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, np.float64)]


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean and Monte Carlo standard error over a 1-D array (0 error for one value)."""
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


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
    spreads = list(config.spreads)
    if not spreads or any(
        isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 1 for s in spreads
    ):
        raise ValueError(f"config.spreads must be numbers >= 1, got {spreads!r}")
    if len(spreads) != len(set(spreads)):
        raise ValueError(f"config.spreads must not repeat a value, got {spreads!r}")
    common.check_names("compressors", config.compressors, COMPRESSORS)
    for field in ("top_k_fraction", "rand_k_fraction"):
        common.check_fraction(field, config[field])
    if not (isinstance(config.epsilon, float) and 0.0 < config.epsilon < 1.0):
        raise ValueError(
            "config.epsilon must lie in (0, 1) (relative to ||grad f(x0)||^2), "
            f"got {config.epsilon!r}"
        )
    if not (isinstance(config.l2, (int, float)) and config.l2 >= 0):
        raise ValueError(f"config.l2 must be non-negative, got {config.l2!r}")
    common.check_choice("profile", config.profile, ("geometric", "outlier"))
    if not (isinstance(config.noise, (int, float)) and config.noise >= 0):
        raise ValueError(f"config.noise must be non-negative, got {config.noise!r}")
    if config.l2 == 0 and config.examples_per_worker * config.num_workers < config.dim:
        raise ValueError(
            "config.num_workers * config.examples_per_worker must be at least config.dim "
            "when config.l2 = 0 (otherwise the least-squares optimum is not unique)"
        )
    common.seed_devices(config)


# ------------------------------------------------------------------ the runs


def make_ef21_sweep(compressor: compression.Compressor, num_steps: int):
    """``sweep(problem, keys, step_sizes)``: EF21 vmapped over seeds and step sizes, with
    the problem a traced argument, so one compiled program serves every spread."""

    def one(problem: problems.DistributedSum, key: jax.Array, step_size: jax.Array):
        run = compression.make_distributed_run(
            problem, compression.ef21(compressor), num_steps=num_steps
        )
        return run(key, jnp.zeros_like(problem.x_star), step_size)

    return jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, None, 0)), in_axes=(None, 0, None)))


def make_ef21_w_sweep(compressor: compression.Compressor, num_steps: int):
    """``sweep(problem, keys, step_size, weights)``: EF21-W vmapped over seeds, with the
    problem and the weights traced arguments, so one compiled program serves every spread."""

    def one(
        problem: problems.DistributedSum, key: jax.Array, step_size: jax.Array, weights: jax.Array
    ):
        run = compression.make_distributed_run(
            problem, compression.ef21_w(compressor), num_steps=num_steps
        )
        return run(key, jnp.zeros_like(problem.x_star), step_size, weights)

    return jax.jit(jax.vmap(one, in_axes=(None, 0, None, None)))


def run_spread(
    problem: problems.DistributedSum,
    compressor: compression.Compressor,
    gammas: dict[str, float],
    config: ConfigDict,
    ef21_sweep=None,
    ef21_w_sweep=None,
) -> dict[str, compression.DistributedResult]:
    """Each method's result with leading axis ``num_seeds``; two calls.

    EF21 is vmapped over seeds and over its two step sizes (L_QM, L_AM) in one call, EF21-W
    over seeds in a second (pass ``ef21_sweep`` from :func:`make_ef21_sweep` and
    ``ef21_w_sweep`` from :func:`make_ef21_w_sweep` to reuse their compiled programs across
    spreads).  Every call draws the same keys (common random numbers across methods), split
    over the devices of :func:`experiments.common.seed_mesh`.
    """

    def keys() -> jax.Array:
        return common.shard_seeds(
            jax.random.split(jax.random.key(config.seed), config.num_seeds),
            common.seed_mesh(config),
        )

    if ef21_sweep is None:
        ef21_sweep = make_ef21_sweep(compressor, config.num_steps)
    if ef21_w_sweep is None:
        ef21_w_sweep = make_ef21_w_sweep(compressor, config.num_steps)
    learning_rates = jnp.asarray([gammas["ef21_qm"], gammas["ef21_am"]])
    drivers.check_learning_rate(learning_rates)
    both = jax.device_get(ef21_sweep(problem, keys(), learning_rates))
    results = {
        "ef21_qm": jax.tree.map(lambda leaf: leaf[:, 0], both),
        "ef21_am": jax.tree.map(lambda leaf: leaf[:, 1], both),
    }
    weights = compression.smoothness_weights(problem.worker_smoothness)
    compression.check_weights(weights, problem.num_workers)
    results["ef21_w"] = jax.device_get(
        ef21_w_sweep(problem, keys(), jnp.asarray(gammas["ef21_w"]), jnp.asarray(weights))
    )
    return results


@jax.jit
def initial_grad_norm_sq(problem: problems.DistributedSum) -> jax.Array:
    """``||grad f(x_0)||^2`` at ``x_0 = 0`` (compiled once for all spreads)."""
    return optax.tree.norm(problem.gradient(jnp.zeros_like(problem.x_star)), squared=True)


def curve_indices(num_steps: int, points: int) -> np.ndarray:
    """About ``points`` step indices, evenly spaced, always including the last."""
    return np.unique(np.linspace(0, num_steps - 1, min(points, num_steps)).round().astype(int))


def summarise_spread(
    problem: problems.DistributedSum,
    results: dict[str, compression.DistributedResult],
    gammas: dict[str, float],
    config: ConfigDict,
) -> dict[str, Any]:
    """Bits to epsilon per method (mean, standard error, per seed), step sizes and curves."""
    initial = float(initial_grad_norm_sq(problem))
    l_qm, l_am = smoothness_means(problem)
    keep = curve_indices(config.num_steps, config.curve_points)
    summary: dict[str, Any] = {
        "L": float(problem.smoothness),
        "mu": float(problem.mu),
        "L_QM": l_qm,
        "L_AM": l_am,
        "L_max_over_L_min": float(
            np.max(problem.worker_smoothness) / np.min(problem.worker_smoothness)
        ),
        "qm_over_am": l_qm / l_am,
        "step_sizes": gammas,
        "step_ratio_am_over_qm": gammas["ef21_am"] / gammas["ef21_qm"],
        "initial_grad_norm_sq": initial,
        "methods": {},
    }
    relative = {}
    for method in METHODS:
        result = results[method]
        relative[method] = np.asarray(result.grad_norm_sq, np.float64) / initial
        bits = np.asarray(result.bits_up, np.float64)
        per_seed = bits_to_epsilon(relative[method], bits, config.epsilon)
        reached = int(np.sum(np.isfinite(per_seed)))
        mean, stderr = mean_and_stderr(per_seed) if reached == per_seed.size else (None, None)
        with np.errstate(invalid="ignore", divide="ignore"):
            curve = np.exp(np.mean(np.log(relative[method]), axis=0))  # geometric mean over seeds
            final = np.exp(np.mean(np.log(relative[method][:, -1])))
        summary["methods"][method] = {
            "bits_to_epsilon": {
                "mean": mean,
                "stderr": stderr,
                "reached": reached,
                "per_seed": finite_or_none(per_seed),
            },
            "final_relative_grad_norm_sq": finite_or_none(np.array([final]))[0],
            "diverged_seeds": int(np.sum(np.asarray(result.diverged_step) >= 0)),
            "bits_per_step": float(bits[0, 0]),
            "curve": {
                "step": (keep + 1).tolist(),
                "bits": bits[0, keep].tolist(),
                "relative_grad_norm_sq": finite_or_none(curve[keep]),
            },
        }
    qm = summary["methods"]["ef21_qm"]["bits_to_epsilon"]["mean"]
    weighted = summary["methods"]["ef21_w"]["bits_to_epsilon"]["mean"]
    summary["ratio_ef21_qm_over_ef21_w"] = None if qm is None or weighted is None else qm / weighted
    # Compare EF21 (L_AM) with EF21-W where the table looks (||grad f||^2 >= epsilon relative):
    # below that both sit at the rounding floor, where relative differences mean nothing.
    above = relative["ef21_am"] >= config.epsilon
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.abs(relative["ef21_am"] - relative["ef21_w"]) / relative["ef21_am"]
    summary["max_rel_diff_ef21_am_vs_ef21_w"] = float(np.nanmax(np.where(above, gap, 0.0)))
    return summary


# ------------------------------------------------------------------ output


def spread_key(spread: float) -> str:
    return f"{float(spread):g}"


def format_bits(entry: dict[str, Any], num_seeds: int) -> str:
    if entry["mean"] is None:
        return f"not reached ({entry['reached']}/{num_seeds})"
    if entry["stderr"]:
        return f"{entry['mean']:.3e} ± {entry['stderr']:.1e}"
    return f"{entry['mean']:.3e}"


def format_table(metrics: dict[str, Any], config: ConfigDict) -> str:
    lines = [
        f"bits per worker until ||grad f(x_t)||^2 <= {config.epsilon:g} ||grad f(x_0)||^2 "
        f"(n = {config.num_workers} workers, d = {config.dim}, {config.num_steps} steps, "
        f"{config.num_seeds} seeds; mean ± standard error where the seeds differ)",
    ]
    for name, entry in metrics["compressors"].items():
        lines.append("")
        lines.append(
            f"{name}: alpha = {entry['alpha']:.4g}, {entry['bits_per_message']} bits per message"
            + (
                "; homogeneous with value-independent randomness, so EF21-W == EF21 (L_AM)"
                if entry["homogeneous"]
                else "; not homogeneous, so EF21-W != EF21 (L_AM)"
            )
        )
        header = (
            f"{'spread':>7s} {'L_QM/L_AM':>9s} {'g_AM/g_QM':>9s} {LABELS['ef21_qm']:>24s} "
            f"{LABELS['ef21_am']:>24s} {LABELS['ef21_w']:>24s} {'QM / W':>7s} {'max|AM-W|':>9s}"
        )
        lines.append(header)
        for spread, row in entry["spreads"].items():
            ratio = row["ratio_ef21_qm_over_ef21_w"]
            cells = [
                format_bits(row["methods"][m]["bits_to_epsilon"], config.num_seeds) for m in METHODS
            ]
            lines.append(
                f"{spread:>7s} {row['qm_over_am']:9.3f} {row['step_ratio_am_over_qm']:9.3f} "
                f"{cells[0]:>24s} {cells[1]:>24s} {cells[2]:>24s} "
                f"{'   —' if ratio is None else f'{ratio:7.2f}':>7s} "
                f"{row['max_rel_diff_ef21_am_vs_ef21_w']:9.1e}"
            )
    lines.append("")
    lines.append(
        "QM / W: bits of EF21 (L_QM) over bits of EF21-W; max|AM-W|: largest relative difference "
        "of the ||grad f||^2 curves of EF21 (L_AM) and EF21-W while above epsilon."
    )
    return "\n".join(lines)


def draw(metrics: dict[str, Any], config: ConfigDict, path) -> None:
    """Curves on log axes: only finite, positive points are drawn; a curve with dropped
    (diverged) points says how many in its legend label."""
    names = list(metrics["compressors"])
    spreads = [spread_key(s) for s in config.spreads]
    fig, axes = plt.subplots(
        len(names), len(spreads), figsize=(3.3 * len(spreads), 3.0 * len(names)), squeeze=False
    )
    styles = {
        "ef21_qm": dict(color="C3", ls="-"),
        "ef21_am": dict(color="C0", ls="-", lw=2.5, alpha=0.6),
        "ef21_w": dict(color="C2", ls="--"),
    }
    marked = set()  # panels with dropped points: they get a legend too
    for row, name in enumerate(names):
        for col, spread in enumerate(spreads):
            axis = axes[row, col]
            entry = metrics["compressors"][name]["spreads"][spread]
            for method in METHODS:
                curve = entry["methods"][method]["curve"]
                values = np.array(
                    [np.nan if v is None else v for v in curve["relative_grad_norm_sq"]]
                )
                bits, values, _, dropped = common.finite_curve(curve["bits"], values)
                label = common.not_shown(LABELS[method], dropped)
                if dropped:
                    marked.add(axis)
                axis.plot(bits, values, label=label, **styles[method])
            axis.axhline(config.epsilon, color="gray", lw=0.8, ls=":")
            axis.set(
                yscale="log",
                title=f"{name}, spread {spread} (QM/AM {entry['qm_over_am']:.2f})",
                ylim=(config.epsilon * 1e-4, 10.0),
            )
            reached = [entry["methods"][m]["bits_to_epsilon"]["mean"] for m in METHODS]
            # zoom on the part that decides the table
            if None not in reached and np.all(np.isfinite(reached)):
                axis.set_xlim(0.0, 1.5 * max(reached))
            axis.title.set_fontsize(9)
            axis.grid(True, which="both", alpha=0.3)
            if row == len(names) - 1:
                axis.set_xlabel("bits sent per worker")
            if col == 0:
                axis.set_ylabel("||∇f(x_t)||² / ||∇f(x_0)||²")
    for axis in {axes[0, 0], *marked}:
        axis.legend(fontsize=7)
    fig.suptitle(
        "EF21 step size with L_QM vs L_AM (Richtárik, Gasanov, Burlachenko 2024); dotted: ε",
        fontsize=10,
    )
    common.save_figure(fig, path)


def write_csvs(metrics: dict[str, Any], folder) -> None:
    rows, curve_rows = [], []
    for name, entry in metrics["compressors"].items():
        for spread, row in entry["spreads"].items():
            for method in METHODS:
                result = row["methods"][method]
                bits = result["bits_to_epsilon"]
                rows.append(
                    [
                        name,
                        spread,
                        method,
                        row["L_QM"],
                        row["L_AM"],
                        row["qm_over_am"],
                        row["step_sizes"][method],
                        bits["mean"],
                        bits["stderr"],
                        bits["reached"],
                        result["final_relative_grad_norm_sq"],
                        row["ratio_ef21_qm_over_ef21_w"],
                    ]
                )
                curve = result["curve"]
                curve_rows.extend(
                    [name, spread, method, s, b, g]
                    for s, b, g in zip(curve["step"], curve["bits"], curve["relative_grad_norm_sq"])
                )
    common.write_csv(
        folder / "bits_to_epsilon.csv",
        [
            "compressor",
            "spread",
            "method",
            "L_QM",
            "L_AM",
            "qm_over_am",
            "step_size",
            "bits_to_epsilon_mean",
            "bits_to_epsilon_stderr",
            "seeds_reached",
            "final_relative_grad_norm_sq",
            "ratio_ef21_qm_over_ef21_w",
        ],
        rows,
    )
    common.write_csv(
        folder / "curves.csv",
        [
            "compressor",
            "spread",
            "method",
            "step",
            "bits_per_worker",
            "relative_grad_norm_sq_geomean",
        ],
        curve_rows,
    )


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table and the figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    built = {spread_key(s): build_problem(config, s) for s in config.spreads}
    x_template = next(iter(built.values())).x_star
    compressors = {name: make_compressor(name, config) for name in config.compressors}
    for compressor in compressors.values():
        compression.check_tree(compressor, x_template)
    folder = common.results_folder(config, NAME)
    metrics: dict[str, Any] = {
        "epsilon": config.epsilon,
        "num_workers": config.num_workers,
        "dim": config.dim,
        "num_steps": config.num_steps,
        "devices": common.seed_devices(config),  # the seed axis was split over these
        "compressors": {},
    }
    with tqdm(total=len(compressors) * len(built), desc=NAME) as bar:
        for name, compressor in compressors.items():
            alpha = contraction(compressor, x_template)
            entry = {
                "alpha": alpha,
                "bits_per_message": compression.tree_bits(compressor, x_template),
                "homogeneous": name in HOMOGENEOUS,
                "spreads": {},
            }
            ef21_sweep = make_ef21_sweep(compressor, config.num_steps)
            ef21_w_sweep = make_ef21_w_sweep(compressor, config.num_steps)
            for spread, problem in built.items():
                gammas = step_sizes(problem, alpha)
                results = run_spread(problem, compressor, gammas, config, ef21_sweep, ef21_w_sweep)
                entry["spreads"][spread] = summarise_spread(problem, results, gammas, config)
                bar.update()
            metrics["compressors"][name] = entry
    table = format_table(metrics, config)
    write_csvs(metrics, folder)
    return common.finish(folder, table, metrics, lambda path: draw(metrics, config, path))


if __name__ == "__main__":
    common.main(run, validate)
