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

Stochastic gradients (``sg_rows``), on the logistic target with minibatches of
``batch_size`` indices drawn with replacement, the same batch sequence on both sides
(batch :math:`t` from ``fold_in(batch_key, t)``), the gradient estimate
:math:`\nabla\log p(w) + \frac Nb\sum_{i\in B}\nabla\ell(w, z_i)` shared:

* ``sgld``: :func:`shufflesgd.mcmc.sgld` against ``blackjax.sgld``, the same update
  :math:`w' = w + h\hat g + \sqrt{2h}z` and the same key splits, so the chains coincide
  up to rounding and the ESS/s ratio is the speed ratio.
* ``sghmc``: :func:`shufflesgd.mcmc.sghmc` (Chen et al. 2014, Eq. 9, friction :math:`\gamma`,
  the momentum carried across steps) against ``blackjax.sghmc`` (the same Euler scheme with
  :math:`\alpha = \gamma`, but the momentum redrawn at every outer step, followed by
  ``num_integration`` inner steps on one minibatch).  Equal gradient evaluations: BlackJAX
  takes one outer step per minibatch, ours ``num_integration`` steps on that same
  minibatch, and both keep the position once per minibatch.  Different chains, so the ratio
  mixes speed and mixing.

NUTS (``nuts_rows``): our HMC (fixed :math:`\varepsilon`, :math:`L` leapfrog steps) against
BlackJAX's NUTS with the same step size and an identity mass matrix, on the logistic target
and on Neal's funnel (:func:`shufflesgd.problems.funnel_logdensity`, ``funnel_dim``
dimensions, chains started from exact draws); reported: the minimum ESS per gradient
evaluation, summed over chains and steps after burn-in.  A side whose split :math:`\hat R`
exceeds ``MIXED_RHAT`` is marked "not mixed" (``mixed: false`` in the JSON): its ESS, and so
the ratio, measures nothing.  Here the algorithms differ on
purpose: this is the comparison a reader makes when choosing a kernel, not a check that the
two libraries agree.

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

FULL = dict(
    num_chains=32,
    num_steps=3000,
    burn_in=1000,
    repeats=6,
    dim=50,
    num_leapfrog=10,
    seed=0,
    batch_size=32,
    num_integration=5,
    funnel_dim=10,
)
QUICK = dict(
    num_chains=4,
    num_steps=200,
    burn_in=50,
    repeats=2,
    dim=5,
    num_leapfrog=3,
    seed=0,
    batch_size=16,
    num_integration=2,
    funnel_dim=3,
)
# Step sizes: MALA at acceptance ~0.55-0.8, HMC ~0.9 (probed once), fixed so that both
# libraries run exactly the same chain law.
STEP_SIZES = {
    "gaussian": dict(mala=0.2, hmc=0.25),
    "logistic": dict(mala=0.012, hmc=0.1, sgld=0.006, sghmc=0.02, nuts=0.1),
    "funnel": dict(hmc=0.2, nuts=0.2),
}
#: Split R-hat below which a side's chains count as mixed (Vehtari et al. 2021 advise 1.01;
#: the funnel's fixed-step chains are far above either).
MIXED_RHAT = 1.1
#: SGHMC's friction, ours ``friction`` and BlackJAX's ``alpha``.
SGHMC_FRICTION = 5.0


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


def logistic_target() -> problems.BayesianFiniteSum:
    features, labels = data.sklearn_dataset("breast_cancer")
    return problems.bayesian_logistic_regression(features, labels, prior_variance=1.0)


def minibatch(batch_key: jax.Array, t: jax.Array, num_examples: int, size: int) -> jax.Array:
    """Batch ``t``: ``size`` indices drawn with replacement, the same on both sides."""
    return jax.random.randint(jax.random.fold_in(batch_key, t), (size,), 0, num_examples)


def sg_runs(kernel_name: str, cfg: dict[str, Any]) -> tuple[dict[str, Callable], Any]:
    """The two jitted programs ``(chain_keys, batch_key, x0) -> (positions, grad_evals)``
    for SGLD or SGHMC, one kept position per minibatch."""
    target = logistic_target()
    estimator, n = target.grad_estimator, target.num_examples
    h, b, steps = STEP_SIZES["logistic"][kernel_name], cfg["batch_size"], cfg["num_steps"]
    inner = cfg["num_integration"] if kernel_name == "sghmc" else 1
    ours_kernel = mcmc.sgld(estimator) if kernel_name == "sgld" else mcmc.sghmc(estimator)
    hyper = (h,) if kernel_name == "sgld" else (h, SGHMC_FRICTION)

    def ours_chain(key, batch_key, x0):
        def body(state, t):
            batch = minibatch(batch_key, t, n, b)

            def inner_step(state, j):
                step_key = jax.random.fold_in(key, t * inner + j)
                return ours_kernel.step(step_key, state, batch, *hyper)[0], None

            state = jax.lax.scan(inner_step, state, jnp.arange(inner), unroll=True)[0]
            return state, state.position

        positions = jax.lax.scan(body, ours_kernel.init(x0), jnp.arange(steps))[1]
        return positions, jnp.float32(steps * inner)

    if kernel_name == "sgld":
        peer = blackjax.sgld(estimator)
    else:
        peer = blackjax.sghmc(estimator, num_integration_steps=inner, alpha=SGHMC_FRICTION)

    def peer_chain(key, batch_key, x0):
        def body(position, t):
            position = peer.step(
                jax.random.fold_in(key, t), position, minibatch(batch_key, t, n, b), h
            )
            return position, position

        positions = jax.lax.scan(body, peer.init(x0), jnp.arange(steps))[1]
        return positions, jnp.float32(steps * inner)

    runs = {
        "ours": jax.jit(jax.vmap(ours_chain, (0, None, 0))),
        "blackjax": jax.jit(jax.vmap(peer_chain, (0, None, 0))),
    }
    return runs, jnp.asarray(target.mode, jnp.float32)


def nuts_runs(target_name: str, cfg: dict[str, Any]) -> tuple[dict[str, Callable], Any]:
    """Our HMC and BlackJAX's NUTS, ``(chain_keys, x0) -> (positions, grad_evals)``."""
    if target_name == "funnel":
        logdensity = problems.funnel_logdensity
    else:
        logdensity = logistic_target().logdensity
    step_size = STEP_SIZES[target_name]["hmc"]
    kernel = mcmc.hmc(logdensity, cfg["num_leapfrog"])

    def ours_chain(key, x0):
        _, positions, infos = mcmc.run_chain(
            kernel, key, kernel.init(x0), cfg["num_steps"], step_size
        )
        return positions, jnp.sum(infos.num_grad_evals[cfg["burn_in"] :])

    def nuts_chain(key, x0):
        dim = x0.shape[0]
        nuts = blackjax.nuts(
            logdensity, STEP_SIZES[target_name]["nuts"], jnp.ones((dim,), x0.dtype)
        )

        def body(state, t):
            state, info = nuts.step(jax.random.fold_in(key, t), state)
            return state, (state.position, info.num_integration_steps)

        _, (positions, leapfrogs) = jax.lax.scan(body, nuts.init(x0), jnp.arange(cfg["num_steps"]))
        return positions, jnp.sum(leapfrogs[cfg["burn_in"] :]).astype(jnp.float32)

    return {"ours": jax.jit(jax.vmap(ours_chain)), "blackjax": jax.jit(jax.vmap(nuts_chain))}


def start_points(target_name: str, cfg: dict[str, Any], key: jax.Array) -> jax.Array:
    if target_name == "funnel":
        return problems.funnel_sample(key, cfg["num_chains"], cfg["funnel_dim"]).astype(jnp.float32)
    mode = jnp.asarray(logistic_target().mode, jnp.float32)
    return mode + 0.1 * jax.random.normal(key, (cfg["num_chains"], mode.shape[0]), jnp.float32)


def ess_row(
    runs: dict[str, Callable], args: tuple, cfg: dict[str, Any], burn_in: int
) -> dict[str, Any]:
    """Time the two programs alternately and measure each side's ESS, per second and per
    gradient evaluation (``burn_in`` kept positions dropped)."""
    outputs: dict[str, Any] = {}
    first, times = time_round_robin(
        {name: (lambda run=run: jax.block_until_ready(run(*args))) for name, run in runs.items()},
        cfg["repeats"],
        alternate=True,
        after_first=outputs.__setitem__,
    )
    row: dict[str, Any] = {}
    for name in runs:
        positions, grads = (np.asarray(a) for a in outputs[name])
        kept = positions[:, burn_in:]
        if not np.all(np.isfinite(kept)):
            row[name] = dict(finite=False, first_call_seconds=first[name])
            continue
        ess = np.concatenate(
            [mcmc.effective_sample_size(kept), mcmc.effective_sample_size(kept**2)]
        )
        median = summarize(times[name])["median"]
        row[name] = dict(
            finite=True,
            seconds=summarize(times[name]),
            first_call_seconds=first[name],
            min_ess=float(ess.min()),
            min_ess_per_second=float(ess.min() / median),
            grad_evals=float(grads.sum()),
            min_ess_per_grad_eval=float(ess.min() / grads.sum()),
            max_split_rhat=float(np.max(mcmc.split_rhat(kept))),
        )
        # an ESS of chains that have not mixed (split R-hat above 1.1) measures nothing
        row[name]["mixed"] = row[name]["max_split_rhat"] < MIXED_RHAT
    finite = row["ours"]["finite"] and row["blackjax"]["finite"]
    if finite:
        a, b = row["ours"], row["blackjax"]
        row["ess_per_second_ratio"] = a["min_ess_per_second"] / b["min_ess_per_second"]
        row["ess_per_grad_eval_ratio"] = a["min_ess_per_grad_eval"] / b["min_ess_per_grad_eval"]
    row["max_abs_draw_difference"] = (
        float(np.max(np.abs(np.asarray(outputs["ours"][0]) - np.asarray(outputs["blackjax"][0]))))
        if finite
        else None
    )
    return row


def bench_sg(kernel_name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    runs, mode = sg_runs(kernel_name, cfg)
    key = jax.random.key(cfg["seed"])
    chain_keys = jax.random.split(jax.random.fold_in(key, 1), cfg["num_chains"])
    x0 = start_points("logistic", cfg, jax.random.fold_in(key, 2))
    row = ess_row(runs, (chain_keys, jax.random.fold_in(key, 3), x0), cfg, cfg["burn_in"])
    row.update(
        step_size=STEP_SIZES["logistic"][kernel_name],
        batch_size=cfg["batch_size"],
        num_integration=cfg["num_integration"] if kernel_name == "sghmc" else 1,
        friction=SGHMC_FRICTION if kernel_name == "sghmc" else None,
    )
    return row


def bench_nuts(target_name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    runs = nuts_runs(target_name, cfg)
    key = jax.random.key(cfg["seed"])
    chain_keys = jax.random.split(jax.random.fold_in(key, 1), cfg["num_chains"])
    x0 = start_points(target_name, cfg, jax.random.fold_in(key, 2))
    row = ess_row(runs, (chain_keys, x0), cfg, cfg["burn_in"])
    row.update(step_size=STEP_SIZES[target_name]["hmc"], num_leapfrog=cfg["num_leapfrog"])
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
    lines.append("")
    lines.append(
        f"{'stochastic gradient / NUTS':28s} {'ours ESS/s':>11s} {'bjx ESS/s':>10s} {'ratio':>6s} "
        f"{'ours ESS/grad':>13s} {'bjx ESS/grad':>12s} {'ratio':>6s}"
    )
    for section in ("sg_rows", "nuts_rows"):
        for key, row in results[section].items():
            o, b = row["ours"], row["blackjax"]
            if not (o["finite"] and b["finite"]):
                lines.append(
                    f"{key:28s} non-finite draws (ours {o['finite']}, blackjax {b['finite']})"
                )
                continue
            unmixed = [side for side, v in (("ours", o), ("blackjax", b)) if not v["mixed"]]
            lines.append(
                f"{key:28s} {o['min_ess_per_second']:11.1f} {b['min_ess_per_second']:10.1f} "
                f"{row['ess_per_second_ratio']:6.2f} {o['min_ess_per_grad_eval']:13.3g} "
                f"{b['min_ess_per_grad_eval']:12.3g} {row['ess_per_grad_eval_ratio']:6.2f}"
                + (
                    f"  not mixed (split R-hat > {MIXED_RHAT}): {', '.join(unmixed)}"
                    if unmixed
                    else ""
                )
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
    results["sg_rows"], results["nuts_rows"] = {}, {}
    for kernel_name in ("sgld", "sghmc"):
        print(f"logistic/{kernel_name} ...", file=sys.stderr)
        results["sg_rows"][f"logistic/{kernel_name}"] = bench_sg(kernel_name, cfg)
    for target in ("funnel", "logistic"):
        print(f"{target}/hmc vs nuts ...", file=sys.stderr)
        results["nuts_rows"][f"{target}/hmc_vs_nuts"] = bench_nuts(target, cfg)
    results["total_seconds"] = time.perf_counter() - wall
    return write_results(args.out, results, table(results))


if __name__ == "__main__":
    main()
