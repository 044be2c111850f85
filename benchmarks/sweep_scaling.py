r"""How much does one vmapped, jitted program gain over a Python loop of seeds, and how does
the seed axis scale when it is sharded over devices?

The problem is research-sized: least squares on ``problems.synthetic_regression(0, n, d)``
(``n = 32`` components, ``d = 5``, known optimum), float32, ``num_epochs = 1000`` epochs of
shuffling SGD with batch 1 (:func:`shufflesgd.shuffling.make_sgd_run`, 32 000 steps per seed)
at the step size :math:`\min(c\log(nK)/(\mu n K), 1/(2L))`, swept over ``num_seeds = 256``
seeds.

1. **vmapped vs loop.**  For each scheme (random reshuffling first), (a) one call of
   ``jax.jit(jax.vmap(run))`` over the 256 keys against (b) a Python loop of 256 calls of the
   jitted single-seed ``jax.jit(run)`` (one compiled function, each result waited for with
   ``block_until_ready`` before the next call).  Ratio = loop / vmapped (target: at least
   10x).  Single shuffling and with replacement are timed too: the same steps, but one
   permutation per run (drawn at ``init``) instead of one per epoch, and one ``randint``
   draw per epoch; they show how much of RR's time is its per-epoch permutation.
   (Incremental gradient is left out: its runs do not depend on the key, so ``vmap``
   computes one run for all seeds.)
2. **Sharded seeds.**  Random reshuffling's vmapped program compiled with ``jax.jit``
   ``in_shardings``/``out_shardings``: the keys and every result sharded over the seed axis
   of a 1-D mesh (:func:`shufflesgd.parallel.worker_mesh` with the axis ``"seeds"``,
   ``NamedSharding(mesh, P("seeds"))``), ``x0`` and the step size replicated, on
   k = 1, 2, 4, 8 devices (those that exist and divide ``num_seeds``).  Scaling efficiency
   :math:`t_1 / (k\, t_k)`.  The run also checks that each k gives the 1-device results: the
   JSON records the largest absolute difference of every result field, whether they are
   bitwise equal, and ``matched``: every field within 4 ulps of its largest magnitude.
   Bitwise equality is not promised: each seed's arithmetic is the same, but XLA vectorises
   a device's block of seeds differently for different block sizes (the dot products over
   ``d`` and the sums over ``n``), which can move a result by an ulp.

On CPU the script forces 8 host devices: when ``XLA_FLAGS`` does not already set
``--xla_force_host_platform_device_count``, it appends ``=8`` before JAX starts (importing the
library initialises JAX's backends, so ``jax_num_cpu_devices`` would come too late).  Those
devices share the machine's cores, so on a 2-core machine part 2 measures the overhead of
partitioning the sweep (and at most a 2x gain from using the second core), not a speed-up
over independent devices; the JSON says how many cores the devices shared
(``devices_share_cores``).

Every timing is the median of the repeats after one warm-up call that compiles and runs; the
variants of a part take turns within each repeat (:func:`benchmarks.common.time_round_robin`)
and every repeat draws fresh keys.  All repeats, the first-call times and the machine go to
the JSON.

    python -m benchmarks.sweep_scaling [--quick] [--out PATH]

``--quick`` shrinks everything (a few seconds) for the smoke test.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

#: Host devices forced on CPU when ``XLA_FLAGS`` does not force a count itself.
CPU_DEVICES = 8
FORCED_CPU_DEVICES = None
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={CPU_DEVICES}"
    ).strip()
    FORCED_CPU_DEVICES = CPU_DEVICES

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    machine_info,
    summarize,
    time_round_robin,
    usable_cores,
    write_results,
)
from shufflesgd import parallel, problems, shuffling  # noqa: E402

DEFAULT_OUT = pathlib.Path("results/benchmarks/sweep_scaling.json")
#: Issue 16's target for the vmapped sweep over the loop of single-seed calls.
TARGET_RATIO = 10.0
SEEDS_AXIS = "seeds"
#: A sharded result "matches" when every field is within this many ulps of its largest value.
MATCH_ULPS = 4

FULL = dict(
    n=32,
    d=5,
    num_epochs=1000,
    num_seeds=256,
    step_size_c=2.0,
    seed=0,
    schemes=("random_reshuffle", "single_shuffle", "with_replacement"),
    repeats=5,
    device_counts=(1, 2, 4, 8),
    sharded_repeats=7,
)
QUICK = dict(
    n=32,
    d=5,
    num_epochs=20,
    num_seeds=16,
    step_size_c=2.0,
    seed=0,
    schemes=("random_reshuffle",),
    repeats=3,
    device_counts=(1, 2, 4, 8),
    sharded_repeats=3,
)


# ----------------------------------------------------------------------------- set-up


def build(cfg: dict[str, Any]) -> tuple[problems.FiniteSum, float]:
    """The least-squares instance and the step size ``min(c log(nK)/(mu n K), 1/(2L))``."""
    features, targets = problems.synthetic_regression(cfg["seed"], cfg["n"], cfg["d"])
    problem = problems.least_squares(features, targets)
    theory = shuffling.theory_step_size(problem, cfg["num_epochs"], c=cfg["step_size_c"])
    return problem, min(theory, 0.5 / float(problem.smoothness))


def make_run(problem: problems.FiniteSum, scheme: str, num_epochs: int) -> Callable:
    """``run(key, x0, learning_rate) -> SGDResult`` of ``scheme``, batch 1."""
    return shuffling.make_sgd_run(
        problem, shuffling.make_scheme(scheme, problem.num_examples), num_epochs=num_epochs
    )


def check_converged(result: shuffling.SGDResult) -> shuffling.SGDResult:
    """Raise if a run diverged: a timing of NaN arithmetic would mean nothing."""
    if int(jnp.max(result.diverged_epoch)) != -1:
        raise RuntimeError("an SGD run diverged; lower the step size")
    return result


def counted(call: Callable[[int], Any]) -> Callable[[], Any]:
    """``call(0)`` (the warm-up), ``call(1)``, ...: repeat ``r`` uses the keys of row ``r``."""
    rounds = itertools.count()
    return lambda: call(next(rounds))


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


# ----------------------------------------------------------------------------- 1. vmap vs loop


def bench_vmap_vs_loop(
    problem: problems.FiniteSum, lr: float, cfg: dict[str, Any], key: jax.Array
) -> dict[str, Any]:
    x0 = jnp.zeros_like(problem.x_star)
    learning_rate = jnp.asarray(lr, x0.dtype)
    num_seeds, repeats = cfg["num_seeds"], cfg["repeats"]
    out: dict[str, Any] = {}
    for scheme, scheme_key in zip(cfg["schemes"], jax.random.split(key, len(cfg["schemes"]))):
        run = make_run(problem, scheme, cfg["num_epochs"])
        single = jax.jit(run)
        vmapped = jax.jit(jax.vmap(run, in_axes=(0, None, None)))
        loop_keys, vmap_keys = jax.random.split(scheme_key, (2, repeats + 1, num_seeds))

        def loop(r: int, single=single, loop_keys=loop_keys) -> None:
            for k in loop_keys[r]:  # each call waited for: truly one after the other
                check_converged(jax.block_until_ready(single(k, x0, learning_rate)))

        def batched(r: int, vmapped=vmapped, vmap_keys=vmap_keys) -> None:
            check_converged(jax.block_until_ready(vmapped(vmap_keys[r], x0, learning_rate)))

        print(f"vmap vs loop: {scheme} ...", file=sys.stderr)
        first, times = time_round_robin(
            {"loop": counted(loop), "vmapped": counted(batched)}, repeats, alternate=True
        )
        loop_s, vmap_s = summarize(times["loop"]), summarize(times["vmapped"])
        out[scheme] = dict(
            loop_seconds=loop_s,
            vmapped_seconds=vmap_s,
            loop_first_call_seconds=first["loop"],
            vmapped_first_call_seconds=first["vmapped"],
            seconds_per_seed_loop=loop_s["median"] / num_seeds,
            seconds_per_seed_vmapped=vmap_s["median"] / num_seeds,
            ratio_loop_over_vmapped=loop_s["median"] / vmap_s["median"],
            ratio_paired=paired_ratio(times["loop"], times["vmapped"]),
        )
    return out


# ----------------------------------------------------------------------------- 2. sharded


def compare(result: Any, reference: Any) -> dict[str, Any]:
    """Largest absolute difference of each result field, bitwise equality, and ``matched``:
    every field within :data:`MATCH_ULPS` ulps of its largest magnitude."""
    fields = {}
    matched = True
    for name, value, ref in zip(reference._fields, result, reference, strict=True):
        value, ref = np.asarray(value), np.asarray(ref)
        diff = float(np.max(np.abs(value.astype(np.float64) - ref.astype(np.float64))))
        if np.issubdtype(ref.dtype, np.floating):
            tolerance = MATCH_ULPS * float(np.finfo(ref.dtype).eps) * float(np.max(np.abs(ref)))
        else:
            tolerance = 0.0
        fields[name] = dict(max_abs_diff=diff, bitwise_equal=bool(np.array_equal(value, ref)))
        matched &= diff <= tolerance
    return dict(fields=fields, matched=bool(matched))


def bench_sharded(
    problem: problems.FiniteSum, lr: float, cfg: dict[str, Any], key: jax.Array
) -> dict[str, Any]:
    scheme = cfg["schemes"][0]
    num_seeds, repeats = cfg["num_seeds"], cfg["sharded_repeats"]
    counts = [k for k in cfg["device_counts"] if k <= jax.device_count() and num_seeds % k == 0]
    vmapped = jax.vmap(make_run(problem, scheme, cfg["num_epochs"]), in_axes=(0, None, None))
    x0 = jnp.zeros_like(problem.x_star)
    learning_rate = jnp.asarray(lr, x0.dtype)
    check_key, timing_key = jax.random.split(key)
    check_keys = jax.random.split(check_key, num_seeds)
    keys = jax.random.split(timing_key, (repeats + 1, num_seeds))

    calls, programs, placed, args, checks = {}, {}, {}, {}, {}
    for k in counts:
        mesh = parallel.worker_mesh(k, axis=SEEDS_AXIS)
        seeds, whole = parallel.worker_sharding(mesh, SEEDS_AXIS), parallel.replicated(mesh)
        programs[k] = jax.jit(vmapped, in_shardings=(seeds, whole, whole), out_shardings=seeds)
        args[k] = jax.device_put((x0, learning_rate), whole)
        placed[k] = [jax.device_put(row, seeds) for row in keys]  # placed before the timing
        checks[k] = jax.device_put(check_keys, seeds)

        def call(r: int, k: int = k) -> None:
            check_converged(jax.block_until_ready(programs[k](placed[k][r], *args[k])))

        calls[f"devices_{k}"] = counted(call)
    print(f"sharded seeds over {counts} devices ...", file=sys.stderr)
    first, times = time_round_robin(calls, repeats, alternate=True)

    reference = jax.device_get(programs[counts[0]](checks[counts[0]], *args[counts[0]]))
    rows: dict[str, Any] = {}
    base = times[f"devices_{counts[0]}"]
    for k in counts:
        seconds = summarize(times[f"devices_{k}"])
        result = programs[k](checks[k], *args[k])
        rows[f"devices_{k}"] = dict(
            devices=k,
            seeds_per_device=num_seeds // k,
            seconds=seconds,
            first_call_seconds=first[f"devices_{k}"],
            speedup_over_1=statistics.median(base) / seconds["median"],
            scaling_efficiency=statistics.median(base) / (k * seconds["median"]),
            scaling_efficiency_paired=paired_ratio(base, times[f"devices_{k}"]) / k,
            result_sharding=str(result.params.sharding.spec),
            against_1_device=compare(jax.device_get(result), reference),
        )
    return dict(
        scheme=scheme,
        device_counts=counts,
        reference_devices=counts[0],
        all_matched=all(row["against_1_device"]["matched"] for row in rows.values()),
        rows=rows,
    )


# ----------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"{s['num_seeds']} seeds x {s['num_epochs']} epochs of batch-1 SGD, n = {s['n']}, "
        f"d = {s['d']} ({results['machine']['jax_backend']}):",
        "| scheme | loop s | vmapped s | loop / vmapped | paired |",
        "|---|---|---|---|---|",
    ]
    for scheme, row in results["vmap_vs_loop"].items():
        lines.append(
            f"| {scheme} | {row['loop_seconds']['median']:.4g} | "
            f"{row['vmapped_seconds']['median']:.4g} | {row['ratio_loop_over_vmapped']:.2f} | "
            f"{row['ratio_paired']:.2f} |"
        )
    sharded = results["sharded"]
    lines += [
        "",
        f"{sharded['scheme']}, seed axis sharded ({results['devices_share_cores']}):",
        "| devices | s (median) | speed-up | efficiency t1/(k tk) | paired | max abs diff "
        "vs 1 device | matched |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sharded["rows"].values():
        diff = max(f["max_abs_diff"] for f in row["against_1_device"]["fields"].values())
        lines.append(
            f"| {row['devices']} | {row['seconds']['median']:.4g} | {row['speedup_over_1']:.2f} | "
            f"{row['scaling_efficiency']:.2f} | {row['scaling_efficiency_paired']:.2f} | "
            f"{diff:.2g} | {row['against_1_device']['matched']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (seconds)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON path")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    wall = time.perf_counter()
    problem, lr = build(cfg)
    cores = usable_cores()
    shared = jax.default_backend() == "cpu"
    results: dict[str, Any] = dict(
        benchmark="sweep_scaling",
        quick=args.quick,
        target_ratio=TARGET_RATIO,
        machine=machine_info("optax"),
        forced_cpu_devices=FORCED_CPU_DEVICES,
        devices_share_cores=(
            f"the {jax.device_count()} CPU devices share {cores} cores: the sharded timings "
            "measure partitioning overhead, not a speed-up over independent devices"
            if shared
            else f"{jax.device_count()} {jax.default_backend()} devices"
        ),
        settings=dict(
            {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            problem="least_squares(synthetic_regression(seed, n, d))",
            dtype=str(problem.x_star.dtype),
            learning_rate=lr,
            batch_size=1,
        ),
    )
    key_loop, key_sharded = jax.random.split(jax.random.key(cfg["seed"]))
    results["vmap_vs_loop"] = bench_vmap_vs_loop(problem, lr, cfg, key_loop)
    results["sharded"] = bench_sharded(problem, lr, cfg, key_sharded)
    results["total_seconds"] = time.perf_counter() - wall
    written = write_results(args.out, results, table(results))
    if not results["sharded"]["all_matched"]:
        raise RuntimeError("a sharded sweep did not reproduce the 1-device results (see JSON)")
    return written


if __name__ == "__main__":
    main()
