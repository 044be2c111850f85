r"""Compressed GD without error feedback diverges where EF14 and EF21 converge.

Beznosikov, Horváth, Richtárik, Safaryan (2020), "On Biased Compression for Distributed
Learning", Example 1: :math:`n = d = 3` workers hold

.. math:: f_i(x) = \langle a_i, x\rangle^2 + \tfrac12\|x\|^2,\qquad
          a_1 = c(-3, 2, 2),\ a_2 = c(2, -3, 2),\ a_3 = c(2, 2, -3),

a strongly convex sum with minimiser :math:`x_* = 0`.  At :math:`x = t(1, 1, 1)`,
:math:`\langle a_i, x\rangle = ct` and worker 1's gradient is
:math:`t(1 - 6c^2,\ 1 + 4c^2,\ 1 + 4c^2)`.  For :math:`c > 1`,
:math:`6c^2 - 1 > 4c^2 + 1`, so Top-1 keeps coordinate ``i`` on worker ``i`` and the
averaged message is :math:`-t(6c^2 - 1)/3\,(1, 1, 1)`: compressed GD (no error feedback)
maps the ray to itself,

.. math:: x \leftarrow \bigl(1 + \gamma(6c^2 - 1)/3\bigr)\,x,

and diverges geometrically from :math:`x_0 = t_0(1,1,1)` for *every* step size
:math:`\gamma > 0`.  At :math:`c = 1` the three entries tie and the outcome depends on
Top-1's tie-breaking (``lax.top_k`` keeps the lowest index, which does not give the
counterexample); :math:`c` slightly above 1 (default 1.1) breaks the tie, so the example
does not rely on it.  EF14 (error accumulation) and EF21 (Richtárik, Sokolov, Fatkhullin
2021) converge on the same instance, here at step sizes from a quarter of EF21's theory
step size :math:`\gamma_{EF21} = 1/(L + L_{QM}\sqrt{\beta/\theta})` (Thm. 1, with
:math:`\alpha = 1/3`) up to 8 times it.  (Beyond the theory they are not safe either: at
larger multiples, still with :math:`\gamma L < 2`, EF14 and EF21 with Top-1 diverge from
some starting points, and whether a given run does depends on rounding; the README says
from where, and the default sweep stops below it.)

The problem is :func:`shufflesgd.problems.distributed_least_squares` with rows
:math:`\sqrt2 a_i`, zero targets and ridge 1 (one example per worker), and every run goes
through :func:`shufflesgd.compression.make_distributed_run`, vmapped over seeds and step sizes:
one compiled program per method, its seeds split over ``config.devices`` devices
(:func:`experiments.common.seed_mesh`).

What is measured.  The driver reports :math:`f(x_t) - f_*` and
:math:`\|\nabla f(x_t)\|^2` after every step, not the iterate itself, so the per-step
curves use the energy norm :math:`\|x_t\|_H = \sqrt{2(f(x_t) - f_*)}` (:math:`H` the
Hessian of :math:`f`; exact because :math:`f` is quadratic with :math:`x_* = 0`), which
satisfies :math:`\sqrt\mu\,\|x\| \le \|x\|_H \le \sqrt L\,\|x\|`.  The table prints
:math:`r_t = \|x_t\|_H / \|x_0\|_H`.  Compressed GD stays on the ray
:math:`(1, 1, 1)`, an eigenvector of :math:`H` (eigenvalue :math:`2c^2/3 + 1`), so there
:math:`r_t = \|x_t\|/\|x_0\|` exactly and the per-step ratios :math:`r_t/r_{t-1}` are its
growth factor, compared with the closed form.  The final iterate is returned, so
:math:`\|x_T\|/\|x_0\|` is also reported in the Euclidean norm.

EF21 levels off at the rounding floor while EF14 keeps going down: EF21's server
estimate :math:`g` is a running sum of the compressed messages and keeps their rounding
error, of order machine epsilon times :math:`\|\nabla f(x_0)\|`.

Divergence.  ``diverged_step`` is the driver's: the first step (0-based; metrics of step
``s`` are those of :math:`x_{s+1}`) whose :math:`\|\nabla f(x_{s+1})\|^2` is not finite,
or ``-1``.  It therefore fires when :math:`\|\nabla f\|^2` overflows (here
:math:`\|x\| \approx 10^{154}` in float64), well before :math:`x` itself does; for
compressed GD it is predicted from the closed form and printed alongside.

Run: ``python -m experiments.ef_divergence --config configs/ef_divergence.py``
(``:quick`` for the short variant; override any field with ``--config.<field>=<value>``).
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
from shufflesgd import compression, drivers, problems

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "ef_divergence"
METHODS = {
    "compressed_gd": compression.compressed_gd,
    "ef14": compression.ef14,
    "ef21": compression.ef21,
}
NUM_WORKERS = 3
TIE_NOTE = (
    "c > 1 breaks Top-1's three-way tie at x = t(1,1,1): |1 - 6c^2| > 1 + 4c^2, so worker i "
    "keeps coordinate i whatever the tie-breaking rule (at c = 1 the example would depend on it)"
)


def example_rows(c: float) -> np.ndarray:
    """``a_i = c (-3, 2, 2)`` and its cyclic shifts, one row per worker."""
    return c * np.array([[-3.0, 2.0, 2.0], [2.0, -3.0, 2.0], [2.0, 2.0, -3.0]])


def build_problem(c: float) -> problems.DistributedSum:
    r""":math:`f_i(x) = \langle a_i, x\rangle^2 + \frac12\|x\|^2
    = \frac12(\sqrt2 a_i^\top x)^2 + \frac12\|x\|^2`: one-row least squares plus ridge 1."""
    return problems.distributed_least_squares(
        np.sqrt(2.0) * example_rows(c), np.zeros(3), NUM_WORKERS, l2=1.0
    )


def closed_form_growth(c: float, step_size: float) -> float:
    """Compressed GD's factor on the ray: ``x <- (1 + gamma (6c^2 - 1) / 3) x``."""
    return 1.0 + step_size * (6.0 * c**2 - 1.0) / 3.0


def ray_curvature(c: float) -> float:
    """The Hessian's eigenvalue along ``(1, 1, 1)``: ``2c^2/3 + 1``."""
    return 2.0 * c**2 / 3.0 + 1.0


def predicted_diverged_step(
    c: float, t0: float, step_size: float, num_steps: int, dtype: Any
) -> int:
    """The step at which compressed GD's ``||grad f(x_{s+1})||^2 = 3 (lambda t0 rho^{s+1})^2``
    first exceeds the largest float of ``dtype`` (``-1`` if not within ``num_steps``)."""
    log_rho = math.log(closed_form_growth(c, step_size))
    budget = (
        math.log(float(np.finfo(dtype).max))
        - math.log(3.0)
        - 2.0 * math.log(ray_curvature(c) * abs(t0))
    )
    step = math.ceil(budget / (2.0 * log_rho)) - 1
    return max(step, 0) if step < num_steps else -1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built or compiled."""
    if not _is_number(config.c) or not math.isfinite(config.c) or not config.c > 1.0:
        raise ValueError(
            "config.c must be a finite number > 1 (c = 1 is a three-way tie for Top-1), "
            f"got {config.c!r}"
        )
    if not _is_number(config.t0) or not math.isfinite(config.t0) or config.t0 == 0:
        raise ValueError(
            f"config.t0 must be finite and nonzero (x0 = t0 (1, 1, 1)), got {config.t0!r}"
        )
    methods = list(config.methods)
    if not methods:
        raise ValueError("config.methods must name at least one method")
    for method in methods:
        common.check_choice("methods", method, METHODS)
    if len(set(methods)) != len(methods):
        raise ValueError(f"config.methods must not repeat a method, got {methods!r}")
    multiples = list(config.step_size_multiples)
    if not multiples or any(not _is_number(m) or not math.isfinite(m) or m <= 0 for m in multiples):
        raise ValueError(
            f"config.step_size_multiples must be finite positive numbers, got {multiples!r}"
        )
    for field in ("num_steps", "num_seeds"):
        common.check_positive_ints(field, config[field])
    checkpoints = list(config.checkpoints)
    common.check_positive_ints("checkpoints", checkpoints)
    if (
        any(b <= a for a, b in zip(checkpoints, checkpoints[1:]))
        or checkpoints[-1] >= config.num_steps
    ):
        raise ValueError(
            f"config.checkpoints must increase strictly and stay below config.num_steps="
            f"{config.num_steps}, got {checkpoints!r}"
        )
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"config.seed must be a non-negative int, got {config.seed!r}")
    if not isinstance(config.x64, bool):
        raise ValueError(f"config.x64 must be True or False, got {config.x64!r}")
    if not isinstance(config.results_dir, str) or not config.results_dir:
        raise ValueError(f"config.results_dir must be a non-empty path, got {config.results_dir!r}")
    common.seed_devices(config)


def energy_ratio(suboptimality: np.ndarray, initial: float) -> np.ndarray:
    r""":math:`\|x_t\|_H/\|x_0\|_H = \sqrt{(f(x_t) - f_*)/(f(x_0) - f_*)}` with ``t = 0`` prepended
    along the last axis (NaN, e.g. ``inf - inf`` after an overflow, reads as ``inf``)."""
    values = np.sqrt(np.clip(suboptimality, 0.0, None) / initial)
    values = np.where(np.isnan(values), np.inf, values)
    ones = np.ones(values.shape[:-1] + (1,))
    return np.concatenate([ones, values], axis=-1)


def measured_growth(ratio: np.ndarray) -> tuple[float, int, np.ndarray]:
    """Per-step factors ``r_t / r_{t-1}`` over the finite prefix: their geometric mean,
    and the factors themselves."""
    finite = np.isfinite(ratio) & (ratio > 0)
    last = len(ratio) if finite.all() else int(np.argmin(finite))
    factors = ratio[1:last] / ratio[: last - 1]
    if not factors.size:
        return float("nan"), 0, factors
    return float(np.exp(np.mean(np.log(factors)))), last - 1, factors


def euclidean_norm(x: np.ndarray) -> np.ndarray:
    """``||x||`` along the last axis without overflowing on huge finite entries."""
    return np.hypot.reduce(np.asarray(x, np.float64), axis=-1)


def sweep_method(
    problem: problems.DistributedSum,
    name: str,
    step_sizes: jax.Array,
    x0: jax.Array,
    config: ConfigDict,
) -> compression.DistributedResult:
    """All seeds and step sizes of one method in one compiled call, the seeds split over the
    devices of :func:`experiments.common.seed_mesh`: arrays ``[seeds, steps, ...]``."""
    method = METHODS[name](compression.top_k(1))
    run = compression.make_distributed_run(problem, method, num_steps=config.num_steps)
    sweep = jax.jit(jax.vmap(jax.vmap(run, in_axes=(None, None, 0)), in_axes=(0, None, None)))
    keys = common.shard_seeds(
        jax.random.split(jax.random.key(config.seed), config.num_seeds), common.seed_mesh(config)
    )
    return jax.tree.map(np.asarray, sweep(keys, x0, step_sizes))


def _worst(values: np.ndarray) -> np.ndarray:
    """Largest over seeds (axis 0), non-finite counting as ``inf``."""
    return np.where(np.isfinite(values), values, np.inf).max(axis=0)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def summarise(
    name: str,
    result: compression.DistributedResult,
    initial_energy: float,
    x0_norm: float,
    step_sizes: np.ndarray,
    config: ConfigDict,
    dtype: Any,
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of one method (lists over step sizes) and its worst-seed ratio curves
    ``[steps, T+1]``."""
    ratios = energy_ratio(result.suboptimality, initial_energy)  # [S, G, T+1]
    worst = _worst(ratios)
    steps = [*config.checkpoints, config.num_steps]
    final_norm = euclidean_norm(result.params) / x0_norm  # [S, G]
    diverged = result.diverged_step  # [S, G]
    summary: dict[str, Any] = {
        "energy_ratio": {str(t): [_finite_or_none(v) for v in worst[:, t]] for t in steps},
        "final_norm_ratio": [_finite_or_none(v) for v in _worst(final_norm)],
        "diverged_step": [int(d[d >= 0].min()) if (d >= 0).any() else -1 for d in diverged.T],
        "diverged_seeds": [int((d >= 0).sum()) for d in diverged.T],
        "seeds_agree": bool(
            np.array_equal(
                result.suboptimality,
                result.suboptimality[:1].repeat(result.suboptimality.shape[0], axis=0),
                equal_nan=True,
            )
        ),
    }
    if name == "compressed_gd":
        closed = [closed_form_growth(config.c, float(g)) for g in step_sizes]
        growth, max_dev, used = [], [], []
        for j in range(len(step_sizes)):
            means, devs, counts = [], [], []
            for s in range(ratios.shape[0]):
                mean, count, factors = measured_growth(ratios[s, j])
                means.append(mean)
                devs.append(float(np.max(np.abs(factors / closed[j] - 1.0), initial=0.0)))
                counts.append(count)
            worst_seed = int(np.argmax(np.abs(np.array(means) / closed[j] - 1.0)))
            growth.append(means[worst_seed])
            max_dev.append(max(devs))
            used.append(int(min(counts)))
        summary.update(
            growth_measured=growth,
            growth_closed_form=closed,
            growth_rel_err=[abs(m / c - 1.0) for m, c in zip(growth, closed)],
            growth_max_step_rel_dev=max_dev,
            growth_steps_used=used,
            predicted_diverged_step=[
                predicted_diverged_step(config.c, config.t0, float(g), config.num_steps, dtype)
                for g in step_sizes
            ],
        )
    return summary, worst


def format_table(metrics: dict[str, Any], config: ConfigDict) -> str:
    steps = [*config.checkpoints, config.num_steps]
    c = config.c
    lines = [
        f"Beznosikov et al. (2020) Example 1: n = d = 3, c = {c:g}, x0 = {config.t0:g} (1, 1, 1), "
        f"{metrics['dtype']}, T = {config.num_steps} steps, {config.num_seeds} seed(s), Top-1",
        f"tie broken: |1 - 6c^2| = {6 * c**2 - 1:.4g} > 1 + 4c^2 = {4 * c**2 + 1:.4g}, "
        "so worker i's Top-1 "
        "keeps coordinate i whatever the tie-breaking rule (c = 1 would be a three-way tie)",
        f"gamma_EF21 = {metrics['ef21_step_size']:.4e} (L = {metrics['smoothness']:.4g}, "
        f"L_QM = {metrics['l_qm']:.4g}, alpha = 1/3); "
        f"GD on f is stable below 2/L = {2 / metrics['smoothness']:.4e}",
        "r_t = ||x_t||_H / ||x_0||_H (energy norm, x* = 0; "
        "equals ||x_t||/||x_0|| on compressed GD's ray); "
        "||x_T||/||x_0|| Euclidean; diverged_step: first step with ||grad f||^2 non-finite "
        "(pred.: closed form)",
        "",
    ]
    header = (
        f"{'method':14s} {'g/gEF21':>7s} {'gamma':>10s} "
        + " ".join(f"{'r_' + str(t):>10s}" for t in steps)
        + f" {'|xT|/|x0|':>10s} {'diverged_step':>14s} {'growth meas.':>15s}"
        + f" {'closed form':>15s} {'rel.err':>8s}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for name, result in metrics["methods"].items():
        for j, (multiple, gamma) in enumerate(
            zip(metrics["step_size_multiples"], metrics["step_sizes"])
        ):

            def num(v: float | None) -> str:
                return f"{'inf':>10s}" if v is None else f"{v:10.3e}"

            ratios = " ".join(num(result["energy_ratio"][str(t)][j]) for t in steps)
            step = result["diverged_step"][j]
            diverged = "-" if step < 0 else str(step)
            if config.num_seeds > 1 and step >= 0:
                diverged += f" ({result['diverged_seeds'][j]}/{config.num_seeds})"
            if name == "compressed_gd":
                predicted = result["predicted_diverged_step"][j]
                diverged += f" (pred. {'-' if predicted < 0 else predicted})"
                growth = (
                    f" {result['growth_measured'][j]:15.12f}"
                    f" {result['growth_closed_form'][j]:15.12f}"
                    f" {result['growth_rel_err'][j]:8.1e}"
                )
            else:
                growth = f" {'—':>15s} {'—':>15s} {'—':>8s}"
            lines.append(
                f"{name:14s} {multiple:7g} {gamma:10.4e} {ratios} "
                f"{num(result['final_norm_ratio'][j])} {diverged:>14s}{growth}"
            )
    return "\n".join(lines)


def draw(metrics: dict[str, Any], curves: dict[str, np.ndarray], config: ConfigDict, path) -> None:
    """log10 of the ratio against t, one panel per step size (a log axis cannot span 1e±300)."""
    multiples, step_sizes = metrics["step_size_multiples"], metrics["step_sizes"]
    fig, axes = plt.subplots(
        1, len(multiples), figsize=(4.2 * len(multiples), 4.0), sharey=True, squeeze=False
    )
    t = np.arange(config.num_steps + 1)
    largest = math.log10(float(np.finfo(np.dtype(metrics["dtype"])).max))
    styles = {"compressed_gd": "C3", "ef14": "C0", "ef21": "C2"}
    for j, axis in enumerate(axes[0]):
        for name, worst in curves.items():
            usable = np.isfinite(worst[j]) & (worst[j] > 0)
            values = np.log10(np.where(usable, worst[j], 1.0))
            values[~usable] = np.nan
            axis.plot(t, values, color=styles[name], lw=1.4, label=name)
            step = metrics["methods"][name]["diverged_step"][j]
            finite_until = np.flatnonzero(np.isfinite(values[: step + 1]))
            if step >= 0 and finite_until.size:
                axis.plot(
                    [finite_until[-1]],
                    [values[finite_until[-1]]],
                    "x",
                    color=styles[name],
                    ms=9,
                    label=f"{name} diverged_step = {step}",
                )
        if "compressed_gd" in curves:
            rho = closed_form_growth(config.c, step_sizes[j])
            closed = t * math.log10(rho)
            axis.plot(
                t,
                np.where(closed <= largest, closed, np.nan),
                "k--",
                lw=0.8,
                label=f"closed form (1+γ(6c²-1)/3)^t, {rho:.4f}^t",
            )
        axis.set(xlabel="step t", title=f"γ = {multiples[j]:g} γ_EF21 = {step_sizes[j]:.3g}")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("log10 ‖x_t‖_H / ‖x_0‖_H")
    fig.suptitle(
        f"Beznosikov et al. (2020) Ex. 1, Top-1, c = {config.c:g}: compressed GD diverges, "
        f"EF14 / EF21 converge\n(x: last finite step before diverged_step; dashed: closed form)",
        fontsize=10,
    )
    common.save_figure(fig, path)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the tables and the figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    dtype = np.float64 if config.x64 else np.float32
    problem = build_problem(config.c)
    alpha = compression.tree_contraction(compression.top_k(1), jnp.zeros(3))
    gamma = compression.ef21_step_size(float(problem.smoothness), problem.worker_smoothness, alpha)
    step_sizes = np.array([m * gamma for m in config.step_size_multiples])
    drivers.check_learning_rate(step_sizes)
    x0 = jnp.full((3,), config.t0, dtype=jnp.result_type(float))
    initial_energy = float(problem.suboptimality(x0))
    x0_norm = float(euclidean_norm(np.asarray(x0)))
    folder = common.results_folder(config, NAME)
    metrics: dict[str, Any] = {
        "example": "Beznosikov, Horvath, Richtarik, Safaryan (2020), Example 1",
        "tie_breaking": TIE_NOTE,
        "c": config.c,
        "t0": config.t0,
        "dtype": np.dtype(dtype).name,
        "smoothness": float(problem.smoothness),
        "mu": float(problem.mu),
        "worker_smoothness": np.asarray(problem.worker_smoothness).tolist(),
        "l_qm": float(np.sqrt(np.mean(np.asarray(problem.worker_smoothness, np.float64) ** 2))),
        "alpha": alpha,
        "ef21_step_size": gamma,
        "step_size_multiples": list(config.step_size_multiples),
        "step_sizes": step_sizes.tolist(),
        "x0_norm": x0_norm,
        "x0_energy_norm": math.sqrt(2.0 * initial_energy),
        "devices": common.seed_devices(config),  # the seed axis was split over these
        "methods": {},
    }
    curves: dict[str, np.ndarray] = {}
    for name in tqdm(list(config.methods), desc=NAME):
        result = sweep_method(problem, name, jnp.asarray(step_sizes), x0, config)
        metrics["methods"][name], curves[name] = summarise(
            name, result, initial_energy, x0_norm, step_sizes, config, dtype
        )
    table = format_table(metrics, config)
    steps = [*config.checkpoints, config.num_steps]
    common.write_csv(
        folder / "norms.csv",
        [
            "method",
            "step_size_multiple",
            "step_size",
            *[f"r_{t}" for t in steps],
            "final_norm_ratio",
            "diverged_step",
            "growth_measured",
            "growth_closed_form",
            "predicted_diverged_step",
        ],
        [
            [
                name,
                m,
                g,
                *[r["energy_ratio"][str(t)][j] for t in steps],
                r["final_norm_ratio"][j],
                r["diverged_step"][j],
                r.get("growth_measured", [None] * len(step_sizes))[j],
                r.get("growth_closed_form", [None] * len(step_sizes))[j],
                r.get("predicted_diverged_step", [None] * len(step_sizes))[j],
            ]
            for name, r in metrics["methods"].items()
            for j, (m, g) in enumerate(zip(metrics["step_size_multiples"], metrics["step_sizes"]))
        ],
    )
    stride = max(1, config.num_steps // 1000)
    common.write_csv(
        folder / "curves.csv",
        ["method", "step_size_multiple", "t", "energy_ratio"],
        [
            [name, m, t, float(worst[j, t])]
            for name, worst in curves.items()
            for j, m in enumerate(metrics["step_size_multiples"])
            for t in range(0, config.num_steps + 1, stride)
        ],
    )
    return common.finish(folder, table, metrics, lambda path: draw(metrics, curves, config, path))


if __name__ == "__main__":
    common.main(run, validate)
