r"""How much does GraB's ordering cost per epoch, here and in the PyTorch peer?

Three timings on one L2-regularised logistic regression (``problems.synthetic_classification``
+ ``problems.logistic_regression``; ``n = 10_000`` examples, ``d = 1_000`` features, float32):

1. **JAX.**  Seconds per epoch of the same jitted loop (:func:`shufflesgd.training.make_sgd_run`)
   under ``random_reshuffle`` (RR), ``grab_pair_balance`` and ``grab_mean_balance``, for
   minibatches of 1 and of 64, and the GraB/RR ratio (target: at most 1.3x).  An epoch
   here is one pass of SGD steps plus the loop's end-of-epoch full loss and gradient
   (two ``n x d`` matrix-vector products), the same for every scheme.
2. **Peer.**  The same ratio for the PyTorch ``grab-sampler`` package (``GraBSampler`` with
   its ``mean`` and ``pair`` sorters) against a plain ``torch.utils.data.RandomSampler``
   loop on the same data and model: SGD on one weight vector, the RR loop differentiating
   the minibatch mean loss with autograd, the GraB loops taking per-example gradients with
   ``torch.func.vmap(torch.func.grad(...))`` and handing them to ``sampler.step`` as the
   package requires.  Both loops index the data tensors directly with the sampler's
   order (no ``DataLoader`` collation, which would add the same cost to both sides).
   ``torch`` and ``grab-sampler`` are optional (``pip install -e '.[bench]'``); without
   them the JSON says ``"peer": "not installed"``.
3. **Seeds.**  32 seeds of one run ``jax.vmap``-ed in one jitted call against 32 sequential
   calls of the jitted single-seed run (each call waited for before the next).

Every timing is the median of at least 5 repeats after one warm-up call that compiles and
runs (JAX results are waited for with ``block_until_ready``); all repeats are kept in the
JSON with the machine description.

    python -m benchmarks.shuffling_overhead [--quick] [--out PATH]

``--quick`` shrinks everything (a few seconds) for the smoke test.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd import problems, shuffling, training

DEFAULT_OUT = pathlib.Path("results/benchmarks/shuffling_overhead.json")
TARGET_RATIO = 1.3
GRAB_SCHEMES = ("grab_pair_balance", "grab_mean_balance")
SCHEMES = ("random_reshuffle",) + GRAB_SCHEMES
# grab-sampler's names for the GraB sorters that match ours.
PEER_BALANCE = {"grab_pair_balance": "pair", "grab_mean_balance": "mean"}

FULL = dict(
    n=10_000, d=1_000, l2=1e-3, seed=0, batch_sizes=(1, 64), jax_epochs=2, repeats=7,
    peer_batch_sizes=(64, 1), peer_repeats=5, num_seeds=32, seeds_batch_size=64,
    seeds_epochs=1, seeds_repeats=5,
)
QUICK = dict(
    n=256, d=16, l2=1e-2, seed=0, batch_sizes=(16,), jax_epochs=1, repeats=5,
    peer_batch_sizes=(16,), peer_repeats=5, num_seeds=4, seeds_batch_size=16,
    seeds_epochs=1, seeds_repeats=5,
)


# ----------------------------------------------------------------------------- helpers


def summarize(seconds: list[float], per: int = 1) -> dict[str, Any]:
    """Median (the reported number), min and every repeat, each divided by ``per``."""
    values = [s / per for s in seconds]
    return dict(median=statistics.median(values), min=min(values), repeats=values)


def time_jax_calls(call: Callable[[jax.Array], Any], keys: jax.Array) -> tuple[float, list[float]]:
    """Time ``call(keys[0])`` (warm-up: compile + run), then ``call(k)`` for each later key."""
    start = time.perf_counter()
    jax.block_until_ready(call(keys[0]))
    first = time.perf_counter() - start
    times = []
    for key in keys[1:]:
        start = time.perf_counter()
        jax.block_until_ready(call(key))
        times.append(time.perf_counter() - start)
    return first, times


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    return dict(
        platform=platform.platform(),
        processor=platform.machine(),
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        jaxlib=version("jaxlib"),
        jax_backend=jax.default_backend(),
        jax_devices=[str(device) for device in jax.devices()],
        numpy=np.__version__,
        optax=version("optax"),
        torch=version("torch"),
        grab_sampler=version("grab-sampler"),
    )


def build_problem(cfg: dict[str, Any]) -> tuple[problems.FiniteSum, float, float]:
    """The logistic-regression instance, its build time, and the step size ``1 / (2 L)``."""
    start = time.perf_counter()
    features, labels = problems.synthetic_classification(cfg["seed"], cfg["n"], cfg["d"])
    problem = problems.logistic_regression(features, labels, l2=cfg["l2"])
    build_seconds = time.perf_counter() - start
    return problem, build_seconds, 0.5 / float(problem.smoothness)


# ----------------------------------------------------------------------------- 1. JAX


def bench_jax(problem: problems.FiniteSum, lr: float, cfg: dict[str, Any], key: jax.Array):
    n, epochs = problem.num_examples, cfg["jax_epochs"]
    x0 = jnp.zeros_like(problem.x_star)
    learning_rate = jnp.asarray(lr, x0.dtype)
    out: dict[str, Any] = {}
    for batch_size in cfg["batch_sizes"]:
        rows: dict[str, Any] = {}
        for name in SCHEMES:
            run = jax.jit(
                training.make_sgd_run(
                    problem, shuffling.make_scheme(name, n), num_epochs=epochs,
                    batch_size=batch_size, drop_remainder=True,
                )
            )
            key, sub = jax.random.split(key)
            first, times = time_jax_calls(
                lambda k: run(k, x0, learning_rate), jax.random.split(sub, cfg["repeats"] + 1)
            )
            rows[name] = dict(
                epoch_seconds=summarize(times, per=epochs), first_call_seconds=first
            )
        rr = rows["random_reshuffle"]["epoch_seconds"]["median"]
        for name in GRAB_SCHEMES:
            rows[name]["ratio_to_random_reshuffle"] = rows[name]["epoch_seconds"]["median"] / rr
        out[f"batch_size_{batch_size}"] = rows
    return out


# ----------------------------------------------------------------------------- 2. peer


def bench_peer(problem: problems.FiniteSum, lr: float, cfg: dict[str, Any]) -> dict[str, Any] | str:
    """grab-sampler's GraBSampler vs a RandomSampler loop, in PyTorch; lazily imported."""
    try:
        import torch
        from torch.utils.data import RandomSampler

        from grabsampler import GraBSampler
    except ImportError as error:  # torch or grab-sampler (or one of its dependencies) missing
        print(f"peer skipped: {error}", file=sys.stderr)
        return "not installed"

    torch.manual_seed(cfg["seed"])
    features_np, labels_np, _ = (np.asarray(leaf) for leaf in problem.data)
    features = torch.from_numpy(np.ascontiguousarray(features_np, np.float32))
    labels = torch.from_numpy(np.ascontiguousarray(labels_np, np.float32))
    n, d = features.shape
    l2 = cfg["l2"]

    def mean_loss(w, a, y):
        return torch.nn.functional.softplus(-y * (a @ w)).mean() + 0.5 * l2 * (w @ w)

    def example_loss(w, a, y):
        return torch.nn.functional.softplus(-y * (a @ w)) + 0.5 * l2 * (w @ w)

    per_example_grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))

    def make_epoch(method: str, batch_size: int):
        w = torch.zeros(d, requires_grad=True)
        optimizer = torch.optim.SGD([w], lr=lr)
        num_batches = n // batch_size
        if method == "random_reshuffle":
            sampler = RandomSampler(range(n), generator=torch.Generator().manual_seed(cfg["seed"]))

            def epoch():
                order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
                for b in range(num_batches):
                    idx = order[b * batch_size : (b + 1) * batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    mean_loss(w, features[idx], labels[idx]).backward()
                    optimizer.step()
        else:
            sampler = GraBSampler(
                range(n), {"w": w}, balance_type=PEER_BALANCE[method], device="cpu"
            )

            def epoch():
                order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
                for b in range(num_batches):
                    idx = order[b * batch_size : (b + 1) * batch_size]
                    grads = per_example_grads(w.detach(), features[idx], labels[idx])
                    sampler.step({"w": grads})
                    w.grad = grads.mean(dim=0)
                    optimizer.step()

        return epoch

    out: dict[str, Any] = {}
    for batch_size in cfg["peer_batch_sizes"]:
        if n % batch_size:
            raise ValueError(f"peer batch_size={batch_size} must divide n={n}")
        rows: dict[str, Any] = {}
        for method in SCHEMES:
            epoch = make_epoch(method, batch_size)
            start = time.perf_counter()
            epoch()  # warm-up
            first = time.perf_counter() - start
            times = []
            for _ in range(cfg["peer_repeats"]):
                start = time.perf_counter()
                epoch()
                times.append(time.perf_counter() - start)
            rows[method] = dict(epoch_seconds=summarize(times), first_call_seconds=first)
        rr = rows["random_reshuffle"]["epoch_seconds"]["median"]
        for method in GRAB_SCHEMES:
            rows[method]["ratio_to_random_reshuffle"] = rows[method]["epoch_seconds"]["median"] / rr
        out[f"batch_size_{batch_size}"] = rows
    out["torch_num_threads"] = torch.get_num_threads()
    out["sampler"] = {
        "random_reshuffle": "torch.utils.data.RandomSampler",
        **{m: f"grabsampler.GraBSampler(balance_type={b!r})" for m, b in PEER_BALANCE.items()},
    }
    return out


# ----------------------------------------------------------------------------- 3. seeds


def bench_seeds(problem: problems.FiniteSum, lr: float, cfg: dict[str, Any], key: jax.Array):
    n, num_seeds = problem.num_examples, cfg["num_seeds"]
    x0 = jnp.zeros_like(problem.x_star)
    learning_rate = jnp.asarray(lr, x0.dtype)
    out: dict[str, Any] = dict(
        num_seeds=num_seeds, batch_size=cfg["seeds_batch_size"], num_epochs=cfg["seeds_epochs"]
    )
    for name in ("random_reshuffle", "grab_pair_balance"):
        run = training.make_sgd_run(
            problem, shuffling.make_scheme(name, n), num_epochs=cfg["seeds_epochs"],
            batch_size=cfg["seeds_batch_size"], drop_remainder=True,
        )
        single = jax.jit(run)
        batched = jax.jit(jax.vmap(run, in_axes=(0, None, None)))

        def sequential(keys):
            results = []
            for k in keys:  # each call waited for: truly one after the other
                results.append(jax.block_until_ready(single(k, x0, learning_rate)))
            return results

        key, k_seq, k_vmap = jax.random.split(key, 3)
        repeats = cfg["seeds_repeats"] + 1
        seq_keys = jax.random.split(k_seq, (repeats, num_seeds))
        vmap_keys = jax.random.split(k_vmap, (repeats, num_seeds))
        seq_first, seq_times = time_jax_calls(sequential, seq_keys)
        vmap_first, vmap_times = time_jax_calls(lambda k: batched(k, x0, learning_rate), vmap_keys)
        seq, vm = summarize(seq_times), summarize(vmap_times)
        out[name] = dict(
            sequential_seconds=seq,
            vmapped_seconds=vm,
            sequential_first_call_seconds=seq_first,
            vmapped_first_call_seconds=vmap_first,
            speedup_vmapped_over_sequential=seq["median"] / vm["median"],
        )
    return out


# ----------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    lines = ["| part | batch | scheme | s / epoch (median) | x RR |", "|---|---|---|---|---|"]
    sections = [("JAX", results["jax"])]
    if isinstance(results["peer"], dict):
        sections.append(("grab-sampler (PyTorch)", results["peer"]))
    for label, section in sections:
        for batch_key, rows in section.items():
            if not batch_key.startswith("batch_size_"):
                continue
            for name, row in rows.items():
                ratio = row.get("ratio_to_random_reshuffle")
                lines.append(
                    f"| {label} | {batch_key.removeprefix('batch_size_')} | {name} | "
                    f"{row['epoch_seconds']['median']:.4g} | "
                    f"{'1' if ratio is None else f'{ratio:.2f}'} |"
                )
    if not isinstance(results["peer"], dict):
        lines.append(f"| grab-sampler (PyTorch) | | {results['peer']} | | |")
    seeds = results["seeds"]
    lines += [
        "",
        f"{seeds['num_seeds']} seeds, batch {seeds['batch_size']}, {seeds['num_epochs']} epoch(s):",
        "| scheme | sequential s | vmapped s | speed-up |",
        "|---|---|---|---|",
    ]
    for name in ("random_reshuffle", "grab_pair_balance"):
        row = seeds[name]
        lines.append(
            f"| {name} | {row['sequential_seconds']['median']:.4g} | "
            f"{row['vmapped_seconds']['median']:.4g} | {row['speedup_vmapped_over_sequential']:.2f} |"
        )
    return "\n".join(lines)


def check_finite(tree: Any) -> None:
    """Every float in the results is finite and every timing positive (else a bug here)."""
    if isinstance(tree, dict):
        for value in tree.values():
            check_finite(value)
    elif isinstance(tree, list):
        for value in tree:
            check_finite(value)
    elif isinstance(tree, float) and not (math.isfinite(tree) and tree > 0):
        raise RuntimeError(f"non-positive or non-finite timing {tree}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON path")
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (seconds)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    wall = time.perf_counter()

    problem, build_seconds, lr = build_problem(cfg)
    key = jax.random.key(cfg["seed"])
    key_jax, key_seeds = jax.random.split(key)
    results: dict[str, Any] = dict(
        benchmark="shuffling_overhead",
        quick=args.quick,
        target_ratio=TARGET_RATIO,
        machine=machine_info(),
        settings=dict(
            **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            dtype=str(problem.x_star.dtype),
            learning_rate=lr,
            problem="logistic_regression(synthetic_classification(seed, n, d), l2)",
            problem_build_seconds=build_seconds,
        ),
    )
    print(f"problem n={cfg['n']} d={cfg['d']} built in {build_seconds:.1f}s", file=sys.stderr)
    results["jax"] = bench_jax(problem, lr, cfg, key_jax)
    results["peer"] = bench_peer(problem, lr, cfg)
    results["seeds"] = bench_seeds(problem, lr, cfg, key_seeds)
    results["total_seconds"] = time.perf_counter() - wall
    check_finite({k: results[k] for k in ("jax", "peer", "seeds")})

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {args.out} in {results['total_seconds']:.0f}s")
    return results


if __name__ == "__main__":
    main()
