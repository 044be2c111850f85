r"""Effective samples per second of our MALA and HMC against BlackJAX's, on the same targets.

For each target and kernel both libraries run the same algorithm with the same step size,
number of chains, number of steps and initial positions: ``num_chains`` chains ``vmap``-ped,
``lax.scan`` over ``num_steps`` steps with keys ``fold_in(key, t)``, jitted as one program
that returns every position.  Timed: the median over ``repeats`` calls of that program
(after one warm-up call, which compiles and is reported separately), the two libraries
taking turns, who goes first alternating, so that other load hits both alike.  Measured on
the draws after ``burn_in``: the multi-chain ESS (:func:`shufflesgd.mcmc.effective_sample_size`,
BlackJAX's estimator, the same for both) of every coordinate and of every squared
coordinate; reported: the minimum over them, divided by the median run time.  The ratio
``ours / blackjax`` of ESS/s is the headline (target >= 1.0).  The mean acceptance rates of
the two must agree within Monte Carlo error (they run the same kernel), which the JSON
records, with the largest difference between the two libraries' draws (the kernels split
their keys alike, so the chains coincide up to floating-point rounding unless rounding flips
an accept decision).

Targets:

* ``gaussian``: :math:`N(0, \mathrm{diag}(s^2))` in ``dim`` dimensions, :math:`s`
  log-spaced over :math:`[0.5, 2]`.
* ``logistic``: Bayesian logistic regression on scikit-learn's breast-cancer data
  (569 x 30, standardised, intercept), prior :math:`N(0, I)`
  (:func:`shufflesgd.problems.bayesian_logistic_regression`).

Chains start at the mode plus :math:`N(0, 0.1^2 I)` noise.  BlackJAX is a core dependency
of the library (its diagnostics), so the peer always runs.

    python -m benchmarks.mcmc_ess [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import blackjax
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine_info, summarize, time_round_robin, write_results
from shufflesgd import mcmc, problems
from shufflesgd.nn import data

DEFAULT_OUT = pathlib.Path("results/benchmarks/mcmc_ess.json")
TARGET_RATIO = 1.0

FULL = dict(num_chains=32, num_steps=3000, burn_in=1000, repeats=6, dim=50, num_leapfrog=10, seed=0)
QUICK = dict(num_chains=4, num_steps=200, burn_in=50, repeats=2, dim=5, num_leapfrog=3, seed=0)
# Step sizes: MALA at acceptance ~0.55-0.8, HMC ~0.9 (probed once), fixed so that both
# libraries run exactly the same chain law.
STEP_SIZES = {"gaussian": dict(mala=0.2, hmc=0.25), "logistic": dict(mala=0.012, hmc=0.1)}


def build_target(
    name: str, cfg: dict[str, Any]
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """The log-density and the point the chains start around (the mode)."""
    if name == "gaussian":
        scales = jnp.asarray(np.geomspace(0.5, 2.0, cfg["dim"]), jnp.float32)
        return (lambda x: -0.5 * jnp.sum((x / scales) ** 2)), jnp.zeros((cfg["dim"],), jnp.float32)
    features, labels = data.sklearn_dataset("breast_cancer")
    target = problems.bayesian_logistic_regression(features, labels, prior_variance=1.0)
    return target.logdensity, jnp.asarray(target.mode, jnp.float32)


def ours(
    kernel_name: str, logdensity: Callable, step_size: float, num_leapfrog: int, num_steps: int
):
    kernel = mcmc.mala(logdensity) if kernel_name == "mala" else mcmc.hmc(logdensity, num_leapfrog)

    def chain(key, x0):
        _, positions, infos = mcmc.run_chain(kernel, key, kernel.init(x0), num_steps, step_size)
        return positions, infos.acceptance_rate

    return jax.jit(jax.vmap(chain))


def blackjax_run(
    kernel_name: str,
    logdensity: Callable,
    step_size: float,
    num_leapfrog: int,
    num_steps: int,
    dim: int,
):
    if kernel_name == "mala":
        kernel = blackjax.mala(logdensity, step_size)
    else:
        kernel = blackjax.hmc(logdensity, step_size, jnp.ones((dim,), jnp.float32), num_leapfrog)

    def chain(key, x0):
        def body(state, t):
            state, info = kernel.step(jax.random.fold_in(key, t), state)
            return state, (state.position, info.acceptance_rate)

        _, (positions, acceptance) = jax.lax.scan(body, kernel.init(x0), jnp.arange(num_steps))
        return positions, acceptance

    return jax.jit(jax.vmap(chain))


def measure(
    draws: np.ndarray, acceptance: np.ndarray, seconds: list[float], burn_in: int
) -> dict[str, Any]:
    kept = draws[:, burn_in:]
    ess = np.concatenate([mcmc.effective_sample_size(kept), mcmc.effective_sample_size(kept**2)])
    median = summarize(seconds)["median"]
    acc = acceptance[:, burn_in:].mean(axis=1)
    return dict(
        seconds=summarize(seconds),
        min_ess=float(ess.min()),
        median_ess=float(np.median(ess)),
        min_ess_per_second=float(ess.min() / median),
        acceptance=float(acc.mean()),
        acceptance_se=float(acc.std(ddof=1) / np.sqrt(len(acc))),
        max_split_rhat=float(np.max(mcmc.split_rhat(kept))),
    )


def bench_pair(target: str, kernel_name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    logdensity, center = build_target(target, cfg)
    dim = center.shape[0]
    step_size = STEP_SIZES[target][kernel_name]
    key = jax.random.key(cfg["seed"])
    chain_keys = jax.random.split(jax.random.fold_in(key, 1), cfg["num_chains"])
    x0 = center + 0.1 * jax.random.normal(
        jax.random.fold_in(key, 2), (cfg["num_chains"], dim), jnp.float32
    )
    runs = {
        "ours": ours(kernel_name, logdensity, step_size, cfg["num_leapfrog"], cfg["num_steps"]),
        "blackjax": blackjax_run(
            kernel_name, logdensity, step_size, cfg["num_leapfrog"], cfg["num_steps"], dim
        ),
    }
    outputs: dict[str, Any] = {}
    first, times = time_round_robin(
        {
            name: (lambda run=run: jax.block_until_ready(run(chain_keys, x0)))
            for name, run in runs.items()
        },
        cfg["repeats"],
        alternate=True,
        after_first=outputs.__setitem__,  # alternate who goes first
    )
    row: dict[str, Any] = dict(step_size=step_size, dim=dim)
    for name in runs:
        positions, acceptance = (np.asarray(a) for a in outputs[name])
        row[name] = dict(
            measure(positions, acceptance, times[name], cfg["burn_in"]),
            first_call_seconds=first[name],
        )
    a, b = row["ours"], row["blackjax"]
    row["ess_per_second_ratio"] = a["min_ess_per_second"] / b["min_ess_per_second"]
    row["time_ratio"] = b["seconds"]["median"] / a["seconds"]["median"]
    # Same kernel, same key splits: the draws themselves can coincide, which is the best fairness
    # check.
    row["max_abs_draw_difference"] = float(
        np.max(np.abs(np.asarray(outputs["ours"][0]) - np.asarray(outputs["blackjax"][0])))
    )
    spread = 5.0 * np.hypot(a["acceptance_se"], b["acceptance_se"])
    row["acceptance_agree"] = bool(abs(a["acceptance"] - b["acceptance"]) <= spread)
    return row


def table(results: dict[str, Any]) -> str:
    lines = [
        f"{'target':10s} {'kernel':6s} {'ours ESS/s':>11s} {'bjx ESS/s':>10s} {'ratio':>6s} "
        f"{'ours s':>7s} {'bjx s':>7s} {'acc ours':>8s} {'acc bjx':>8s}"
    ]
    for key, row in results["rows"].items():
        target, kernel = key.split("/")
        o, b = row["ours"], row["blackjax"]
        lines.append(
            f"{target:10s} {kernel:6s} {o['min_ess_per_second']:11.1f} "
            f"{b['min_ess_per_second']:10.1f} "
            f"{row['ess_per_second_ratio']:6.2f} {o['seconds']['median']:7.3f} "
            f"{b['seconds']['median']:7.3f} "
            f"{o['acceptance']:8.3f} {b['acceptance']:8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (seconds)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    wall = time.perf_counter()
    results: dict[str, Any] = dict(
        config=cfg,
        target_ratio=TARGET_RATIO,
        machine=machine_info("blackjax"),
        peer=f"blackjax {blackjax.__version__}",
        rows={},
    )
    for target in ("gaussian", "logistic"):
        for kernel_name in ("mala", "hmc"):
            print(f"{target}/{kernel_name} ...", file=sys.stderr)
            results["rows"][f"{target}/{kernel_name}"] = bench_pair(target, kernel_name, cfg)
    results["total_seconds"] = time.perf_counter() - wall
    return write_results(args.out, results, table(results))


if __name__ == "__main__":
    main()
