r"""Rate separation of shuffling schemes on strongly convex finite sums.

For each scheme, run SGD for K epochs with the theory's step size
:math:`\eta = c\log(nK)/(\mu n K)` and measure the final suboptimality :math:`f(x_K)-f_*`,
averaged over seeds (all seeds and all K in one vmapped call, the seeds split over
``config.devices`` devices).  Fit the log-log slope
against K (fixed n) and against n (fixed K) and print them next to the exponents of the
upper bounds:

=================  ======  ======  ==========================================
scheme             K       n       source
=================  ======  ======  ==========================================
with replacement   -1      -1      e.g. Mishchenko, Khaled, Richtárik 2020
random reshuffle   -2      -1      Mishchenko et al. 2020, Thm. 1
single shuffle     -2      -1      Mishchenko et al. 2020, Thm. 3
incremental        -2       0      Mishchenko et al. 2020, Thm. 3
GraB               -2      -2      Lu, Guo, De Sa 2022, Thm. 2
=================  ======  ======  ==========================================

The bounds carry a factor :math:`\log^p(nK)` from the step size (:math:`p = 1` with
replacement, where the error is :math:`\propto\eta`; :math:`p = 2` for the permutation
schemes, where it is :math:`\propto\eta^2`), so the table also gives the slopes of
:math:`(f(x_K)-f_*)/\log^p(nK)`, which are the ones to compare with the exponents.

The default problem is the piecewise quadratic of :func:`shufflesgd.problems.piecewise_quadratic`,
on which random reshuffling attains its :math:`\Theta(1/(nK^2))` worst case; on quadratics
and logistic regression RR is faster (:math:`1/(nK)^2 + 1/(nK^3)`, Safran & Shamir 2020),
so there its K-slope is steeper than -2 and its n-slope can be.

Run: ``python -m experiments.shuffling_rates --config configs/shuffling_rates.py``
(``:quick`` for the demo; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import drivers, problems, shuffling

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "shuffling_rates"

# Exponents of K and n in the upper bounds for eta = c log(nK) / (mu n K); None: no bound stated.
THEORY: dict[str, tuple[float | None, float | None]] = {
    "with_replacement": (-1.0, -1.0),
    "random_reshuffle": (-2.0, -1.0),
    "single_shuffle": (-2.0, -1.0),
    "incremental": (-2.0, 0.0),
    "flipflop": (-2.0, None),
    "grab_mean_balance": (-2.0, -2.0),
    "grab_pair_balance": (-2.0, -2.0),
}

# Power p of the log(nK) factor of each bound (error ~ eta for with replacement, eta^2 otherwise).
LOG_POWER = {scheme: 1 if scheme == "with_replacement" else 2 for scheme in THEORY}

PROBLEMS = ("piecewise_quadratic", "least_squares", "logistic_regression")


def build_problem(config: ConfigDict, n: int) -> problems.FiniteSum:
    """The config's finite sum with ``n`` components (same generator for every n)."""
    if config.problem == "piecewise_quadratic":
        return problems.piecewise_quadratic(
            n, mu=config.mu, smoothness=config.smoothness, noise=config.noise
        )
    if config.problem == "least_squares":
        a, b = problems.synthetic_regression(config.data_seed, n, config.dim, noise=config.noise)
        return problems.least_squares(a, b, l2=config.l2)
    a, y = problems.synthetic_classification(config.data_seed, n, config.dim, margin=config.margin)
    return problems.logistic_regression(a, y, l2=config.l2)


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built or compiled."""
    common.check_choice("problem", config.problem, PROBLEMS)
    common.check_names("schemes", config.schemes, THEORY)
    common.check_positive_ints("epochs", list(config.epochs))
    common.check_positive_ints("n_values", list(config.n_values))
    for field in ("n", "dim", "num_seeds", "n_sweep_epochs", "batch_size"):
        common.check_positive_ints(field, config[field])
    for n in [config.n, *config.n_values]:
        drivers.check_batch_size(n, config.batch_size)
    if len(config.epochs) < 2 or len(config.n_values) < 2:
        raise ValueError(
            "config.epochs and config.n_values need at least two values to fit a slope"
        )
    if not config.step_size_c > 0:
        raise ValueError(f"config.step_size_c must be positive, got {config.step_size_c}")
    if config.problem == "piecewise_quadratic" and any(n % 2 for n in [config.n, *config.n_values]):
        raise ValueError("config.n and config.n_values must be even for the piecewise quadratic")
    common.seed_devices(config)


def final_suboptimality(
    problem: problems.FiniteSum, scheme_name: str, epochs: list[int], config: ConfigDict
) -> np.ndarray:
    """``f(x_K) - f*`` per seed and per K, shape ``[num_seeds, len(epochs)]``.

    One compiled program runs ``max(epochs)`` epochs for every (seed, K) pair with K's
    step size, and reads the suboptimality after epoch K; the seeds are split over the
    devices of :func:`experiments.common.seed_mesh` (``config.devices``).
    """
    scheme = shuffling.make_scheme(scheme_name, problem.num_examples)
    run = shuffling.make_sgd_run(
        problem, scheme, num_epochs=max(epochs), batch_size=config.batch_size
    )
    learning_rates = jnp.array(
        [shuffling.theory_step_size(problem, k, c=config.step_size_c) for k in epochs]
    )
    drivers.check_learning_rate(learning_rates)
    keys = common.shard_seeds(
        jax.random.split(jax.random.key(config.seed), config.num_seeds), common.seed_mesh(config)
    )
    x0 = problem.x_star + config.init_offset
    sweep = jax.jit(jax.vmap(jax.vmap(run, in_axes=(None, None, 0)), in_axes=(0, None, None)))
    curves = np.asarray(sweep(keys, x0, learning_rates).suboptimality)
    return np.stack([curves[:, i, k - 1] for i, k in enumerate(epochs)], axis=1)


def summarise(values: np.ndarray) -> dict[str, list[float]]:
    """Mean and Monte Carlo standard error over seeds (axis 0)."""
    mean, stderr = common.mean_and_stderr(values)
    return {"mean": mean.tolist(), "stderr": stderr.tolist()}


def theory_note(problem: str) -> str | None:
    """Why the theory columns are not this problem's rates (None on the piecewise quadratic)."""
    if problem == "piecewise_quadratic":
        return None
    return (
        f"* theory: exponents of the bounds attained on the piecewise quadratic, not on {problem}; "
        "there RR is Θ(1/(nK)² + 1/(nK³)) (Safran & Shamir 2020), so its slopes may be steeper"
    )


def draw(metrics: dict[str, Any], config: ConfigDict, path) -> None:
    """Log-log curves of the finite, positive means; a scheme with diverged points is drawn
    from the rest and marked in the legend (``metrics.json`` holds the counts)."""
    from matplotlib import ticker

    fig, (by_k, by_n) = plt.subplots(1, 2, figsize=(12, 5.6))
    drawn = {by_k: 0, by_n: 0}  # finite points per axis: no log scale without any
    for scheme, result in metrics["schemes"].items():
        for axis, x, key, slope in (
            (by_k, config.epochs, "by_epochs", result["slope_epochs"]),
            (by_n, config.n_values, "by_n", result["slope_n"]),
        ):
            xs, ys, err, dropped = common.finite_curve(
                x, result[key]["mean"], result[key]["stderr"]
            )
            label = f"{scheme} ({slope:+.2f})" if np.isfinite(slope) else f"{scheme} (no slope)"
            if dropped:
                label += f", diverged: {dropped} of {len(x)} points not shown"
            if len(xs):
                axis.errorbar(xs, ys, yerr=err, marker="o", ms=3, label=label)
                drawn[axis] += len(xs)
            else:
                axis.plot([], [], marker="x", ls="", label=label)
    for axis, x, xlabel, title in (
        (by_k, config.epochs, "epochs K", f"n = {config.n}"),
        (by_n, config.n_values, "components n", f"K = {config.n_sweep_epochs}"),
    ):
        axis.set_xscale("log")
        axis.set_xticks(list(x), [str(v) for v in x])  # one label per measured value
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        if drawn[axis]:
            axis.set_yscale("log")
        axis.set(xlabel=xlabel, ylabel="f(x_K) - f*", title=title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(
            fontsize=7,
            title="scheme (raw fitted slope, no log correction)",
            title_fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.14),
            ncol=2,
        )
    diverged = sum(r["diverged_runs"] for r in metrics["schemes"].values())
    fig.suptitle(
        f"{config.problem}: step size c·log(nK)/(μnK), c = {config.step_size_c}, "
        f"{config.num_seeds} seeds" + (f"; {diverged} runs diverged" if diverged else "")
    )
    common.save_figure(fig, path)


def format_table(metrics: dict[str, Any]) -> str:
    def fmt(value: float | None) -> str:
        return "—" if value is None else f"{value:+.2f}"

    note = theory_note(metrics["problem"])
    theory = "theory*" if note else "theory"
    header = ["scheme", "K slope", "/log^p", theory, "n slope", "/log^p", theory]
    lines = ["{:20s} {:>8s} {:>7s} {:>7s} {:>8s} {:>7s} {:>7s}".format(*header)]
    for scheme, r in metrics["schemes"].items():
        k_theory, n_theory = THEORY[scheme]
        lines.append(
            f"{scheme:20s} {r['slope_epochs']:+8.2f} {r['corrected_slope_epochs']:+7.2f} "
            f"{fmt(k_theory):>7s} "
            f"{r['slope_n']:+8.2f} {r['corrected_slope_n']:+7.2f} {fmt(n_theory):>7s}"
            + (f"   ({r['diverged_runs']} runs diverged)" if r["diverged_runs"] else "")
        )
    if note:
        lines.append(note)
    return "\n".join(lines)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table and the figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    epochs, n_values = list(config.epochs), list(config.n_values)
    base = build_problem(config, config.n)
    by_n_problems = {n: build_problem(config, n) for n in n_values}
    folder = common.results_folder(config, NAME)
    metrics: dict[str, Any] = {
        "problem": config.problem,
        "mu": float(base.mu),
        "smoothness": float(base.smoothness),
        "theory_problem": "piecewise_quadratic",  # the problem the THEORY exponents are for
        "devices": common.seed_devices(config),  # the seed axis was split over these
        "schemes": {},
    }
    with tqdm(total=len(config.schemes) * (1 + len(n_values)), desc=NAME) as bar:
        for scheme in config.schemes:
            by_epochs = final_suboptimality(base, scheme, epochs, config)
            bar.update()
            by_n = []
            for n in n_values:
                by_n.append(
                    final_suboptimality(by_n_problems[n], scheme, [config.n_sweep_epochs], config)[
                        :, 0
                    ]
                )
                bar.update()
            by_n = np.stack(by_n, axis=1)
            log_epochs = np.log(config.n * np.asarray(epochs)) ** LOG_POWER[scheme]
            log_n = np.log(np.asarray(n_values) * config.n_sweep_epochs) ** LOG_POWER[scheme]
            metrics["schemes"][scheme] = {
                "by_epochs": summarise(by_epochs),
                "by_n": summarise(by_n),
                "slope_epochs": common.loglog_slope(epochs, by_epochs.mean(axis=0)),
                "slope_n": common.loglog_slope(n_values, by_n.mean(axis=0)),
                "log_power": LOG_POWER[scheme],
                "corrected_slope_epochs": common.loglog_slope(
                    epochs, by_epochs.mean(axis=0) / log_epochs
                ),
                "corrected_slope_n": common.loglog_slope(n_values, by_n.mean(axis=0) / log_n),
                "diverged_runs": int(np.sum(~np.isfinite(by_epochs)) + np.sum(~np.isfinite(by_n))),
                "theory_epochs": THEORY[scheme][0],
                "theory_n": THEORY[scheme][1],
            }
    metrics["diverged_runs"] = sum(r["diverged_runs"] for r in metrics["schemes"].values())
    table = format_table(metrics)
    common.write_csv(
        folder / "slopes.csv",
        [
            "scheme",
            "slope_epochs",
            "corrected_slope_epochs",
            "theory_epochs",
            "slope_n",
            "corrected_slope_n",
            "theory_n",
        ],
        [
            [
                s,
                r["slope_epochs"],
                r["corrected_slope_epochs"],
                r["theory_epochs"],
                r["slope_n"],
                r["corrected_slope_n"],
                r["theory_n"],
            ]
            for s, r in metrics["schemes"].items()
        ],
    )
    return common.finish(folder, table, metrics, lambda path: draw(metrics, config, path))


if __name__ == "__main__":
    common.main(run, validate)
