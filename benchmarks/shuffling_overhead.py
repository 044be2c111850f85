r"""How much does GraB's ordering cost per epoch, here and in the PyTorch peer?

Three timings on one L2-regularised logistic regression
(``problems.synthetic_classification`` + ``problems.logistic_regression``; ``n = 10_240 =
160 * 64`` examples, ``d = 1_000`` features, float32, step size ``1 / (2 L)``):

1. **JAX.**  Seconds per epoch of the same jitted loop (:func:`shufflesgd.shuffling.make_sgd_run`)
   under ``random_reshuffle`` (RR), ``grab_pair_balance`` and ``grab_mean_balance``, for
   minibatches of 1 and of 64, and the GraB/RR ratio (target: at most 1.3x).  An epoch
   here is one pass of SGD steps plus the loop's end-of-epoch full loss and gradient
   (two ``n x d`` matrix-vector products), the same for every scheme; those metrics are
   also timed alone, and a steps-only ratio subtracts them from both sides.
2. **Peer.**  The same ratio for the PyTorch ``grab-sampler`` package (``GraBSampler`` with
   its ``mean`` and ``pair`` sorters) against a plain ``torch.utils.data.RandomSampler``
   loop on the same data and model: SGD on one weight vector, the RR loop differentiating
   the minibatch mean loss with autograd, the GraB loops taking per-example gradients with
   ``torch.func.vmap(torch.func.grad(...))`` and handing them to ``sampler.step`` as the
   package requires.  Both loops index the data tensors directly with the sampler's
   order (no ``DataLoader`` collation, which would add the same cost to both sides).
   ``torch`` and ``grab-sampler`` are optional (``make bench`` installs them); without
   them the JSON says ``"peer": "not installed"``.  grab-sampler 0.1.3 needs two shims on
   torch 2.13, both recorded in the JSON: a stand-in ``torch_sparse`` module when the real
   one does not import, and a mixin for the removed ``Sampler.__init__(data_source)``.
3. **Seeds.**  For each scheme, 32 seeds of one run (minibatch 64, 2 epochs) ``jax.vmap``-ed
   in one jitted call against 32 sequential calls of the jitted single-seed run (each call
   waited for before the next); the speed-up is sequential / vmapped.

Every timing is the median of at least 5 repeats after one warm-up call that compiles and
runs (JAX results are waited for with ``block_until_ready``).  The methods compared take
turns within each repeat, so load from other work on a shared machine falls on all of them
alike, and each ratio is given twice: as the ratio of the medians and as the median of the
per-repeat (paired) ratios.  All repeats are kept in the JSON, with the machine, its load
average and the library versions.  The peer runs with ``torch.set_num_threads(1)`` unless
``--torch-threads`` says otherwise.

    python -m benchmarks.shuffling_overhead [--quick] [--out PATH] [--torch-threads N]

``--quick`` shrinks everything (a few seconds) for the smoke test.  On an idle 2-core
machine the full run takes about 3 minutes.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import pathlib
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import machine_info, summarize, time_round_robin, write_results
from shufflesgd import problems, shuffling

DEFAULT_OUT = pathlib.Path("results/benchmarks/shuffling_overhead.json")
TARGET_RATIO = 1.3
GRAB_SCHEMES = ("grab_pair_balance", "grab_mean_balance")
SCHEMES = ("random_reshuffle",) + GRAB_SCHEMES
# grab-sampler's names for the GraB sorters that match ours.
PEER_BALANCE = {"grab_pair_balance": "pair", "grab_mean_balance": "mean"}

FULL = dict(
    n=10_240,
    d=1_000,
    l2=1e-3,
    seed=0,
    batch_sizes=(1, 64),
    jax_epochs=2,
    repeats=7,
    peer_batch_sizes=(64, 1),
    peer_repeats=5,
    num_seeds=32,
    seeds_batch_size=64,
    seeds_epochs=2,
    seeds_repeats=5,
)
QUICK = dict(
    n=256,
    d=16,
    l2=1e-2,
    seed=0,
    batch_sizes=(16,),
    jax_epochs=1,
    repeats=5,
    peer_batch_sizes=(16,),
    peer_repeats=5,
    num_seeds=4,
    seeds_batch_size=16,
    seeds_epochs=1,
    seeds_repeats=5,
)


# ----------------------------------------------------------------------------- helpers


def time_interleaved(
    calls: dict[str, Callable[[int], Any]], repeats: int, per: int = 1
) -> dict[str, dict[str, Any]]:
    """Time ``calls[name](r)`` for ``r = 0..repeats`` with ``time_round_robin``: the names take
    turns in each repeat (RR, GraB, GraB, RR, ...), for paired per-repeat ratios.

    ``r = 0`` is the warm-up (compile and run), reported apart as ``first_call_seconds``; the
    repeats are divided by ``per``.  Each call must wait for its own result
    (``block_until_ready`` for JAX).
    """

    def counted(call: Callable[[int], Any]) -> Callable[[], Any]:  # call(0), call(1), ...
        rounds = itertools.count()
        return lambda: call(next(rounds))

    first, times = time_round_robin({name: counted(call) for name, call in calls.items()}, repeats)
    return {
        name: dict(epoch_seconds=summarize(times[name], per), first_call_seconds=first[name])
        for name in calls
    }


def add_ratios(rows: dict[str, Any]) -> None:
    """GraB / RR time: the ratio of the medians, and the median of the per-repeat ratios."""
    rr = rows["random_reshuffle"]["epoch_seconds"]
    for name in GRAB_SCHEMES:
        grab = rows[name]["epoch_seconds"]
        rows[name]["ratio_to_random_reshuffle"] = grab["median"] / rr["median"]
        rows[name]["ratio_to_random_reshuffle_paired"] = statistics.median(
            g / r for g, r in zip(grab["repeats"], rr["repeats"], strict=True)
        )


def check_converged(result: shuffling.SGDResult) -> shuffling.SGDResult:
    """Raise if a run diverged: a timing of NaN arithmetic would mean nothing."""
    if int(jnp.max(result.diverged_epoch)) != -1:
        raise RuntimeError("an SGD run diverged; lower the step size")
    return result


def call_run(
    run: Callable,
    keys: jax.Array,
    r: int,
    *,
    x0: jax.Array,
    learning_rate: jax.Array,
    check: Callable = lambda result: result,
):
    """``run(keys[r], x0, learning_rate)``, waited for, then passed through ``check``."""
    return check(jax.block_until_ready(run(keys[r], x0, learning_rate)))


def build_problem(cfg: dict[str, Any]) -> tuple[problems.FiniteSum, float, float]:
    """The logistic-regression instance, its build time, and the step size ``1 / (2 L)``."""
    start = time.perf_counter()
    features, labels = problems.synthetic_classification(cfg["seed"], cfg["n"], cfg["d"])
    problem = problems.logistic_regression(features, labels, l2=cfg["l2"])
    build_seconds = time.perf_counter() - start
    return problem, build_seconds, 0.5 / float(problem.smoothness)


# ----------------------------------------------------------------------------- 1. JAX


def jitted_run(
    problem: problems.FiniteSum, name: str, batch_size: int, num_epochs: int, cache: dict
):
    """``jax.jit(make_sgd_run(...))``, built once per (scheme, batch size, epochs) and reused."""
    spec = (name, batch_size, num_epochs)
    if spec not in cache:
        run = shuffling.make_sgd_run(
            problem,
            shuffling.make_scheme(name, problem.num_examples),
            num_epochs=num_epochs,
            batch_size=batch_size,
            drop_remainder=False,
        )
        cache[spec] = (run, jax.jit(run))
    return cache[spec]


def bench_jax(
    problem: problems.FiniteSum, lr: float, cfg: dict[str, Any], key: jax.Array, cache: dict
):
    epochs = cfg["jax_epochs"]
    x0 = jnp.zeros_like(problem.x_star)
    learning_rate = jnp.asarray(lr, x0.dtype)
    # The loop's end-of-epoch metrics (full loss and gradient), timed alone so that the
    # step-only ratio can be given too.
    metrics = jax.jit(
        lambda x: (problem.suboptimality(x), optax.tree.norm(problem.gradient(x), squared=True))
    )
    timed = time_interleaved(
        {"metrics": lambda r: jax.block_until_ready(metrics(x0 + r))}, cfg["repeats"]
    )
    out: dict[str, Any] = {"epoch_metrics_seconds": timed["metrics"]["epoch_seconds"]}
    for batch_size in cfg["batch_sizes"]:
        calls = {}
        for name in SCHEMES:
            _, run = jitted_run(problem, name, batch_size, epochs, cache)
            key, sub = jax.random.split(key)
            keys = jax.random.split(sub, cfg["repeats"] + 1)
            calls[name] = functools.partial(
                call_run, run, keys, x0=x0, learning_rate=learning_rate, check=check_converged
            )
        rows = time_interleaved(calls, cfg["repeats"], per=epochs)
        add_ratios(rows)
        metrics_median = out["epoch_metrics_seconds"]["median"]
        rr_steps = rows["random_reshuffle"]["epoch_seconds"]["median"] - metrics_median
        for name in GRAB_SCHEMES:
            grab_steps = rows[name]["epoch_seconds"]["median"] - metrics_median
            rows[name]["ratio_to_random_reshuffle_steps_only"] = (
                grab_steps / rr_steps if min(grab_steps, rr_steps) > 0 else None  # noise
            )
        out[f"batch_size_{batch_size}"] = rows
    return out


# ----------------------------------------------------------------------------- 2. peer


def import_torch_sparse_or_stub() -> str:
    """Make ``import torch_sparse`` succeed for grab-sampler; say whether it is real or a stub.

    grab-sampler 0.1.3 imports ``torch_sparse.SparseTensor`` unconditionally
    (``grabsampler/utils/random_projection/__init__.py``) but uses it only in its
    very-sparse JL random projection, which this benchmark never selects.  torch-sparse is
    a source-only C++ build (about 15 minutes on 2 cores) and 0.6.18 also needs
    torch-scatter (another source build) that it does not declare.  When it does not
    import, an empty stand-in is registered so grab-sampler's sorters can be timed; any
    use of it would fail loudly.
    """
    try:
        import torch_sparse  # noqa: F401
    except ImportError as error:
        reason = f"{type(error).__name__}: {error}"
        stub = types.ModuleType("torch_sparse")

        class SparseTensor:  # never constructed by the sorters timed here
            def __init__(self, *args, **kwargs):
                raise ImportError(f"torch_sparse is a stand-in here ({reason})")

        stub.SparseTensor = SparseTensor
        sys.modules["torch_sparse"] = stub
        return f"stub ({reason})"
    return "installed"


def bench_peer(problem: problems.FiniteSum, lr: float, cfg: dict[str, Any]) -> dict[str, Any] | str:
    """grab-sampler's GraBSampler vs a RandomSampler loop, in PyTorch; lazily imported."""
    try:
        import torch
        from torch.utils.data import RandomSampler

        torch_sparse = import_torch_sparse_or_stub()
        from grabsampler import GraBSampler as _GraBSampler
    except ImportError as error:  # torch or grab-sampler (or one of its dependencies) missing
        print(f"peer skipped: {error}", file=sys.stderr)
        return "not installed"

    class _AcceptsDataSource:
        """Takes the ``data_source`` that ``Sampler.__init__`` accepted before torch 2.13.

        grab-sampler 0.1.3 calls ``super().__init__(data_source)``; torch 2.13's ``Sampler``
        has no ``__init__`` (the argument was deprecated in 2.2), so the call reaches
        ``object.__init__`` and raises ``TypeError``.  Placed after ``Sampler`` in the MRO
        below, this class swallows the argument; nothing else changes.
        """

        def __init__(self, data_source=None):
            del data_source
            super().__init__()

    class GraBSampler(_GraBSampler, _AcceptsDataSource):
        pass

    if cfg["torch_threads"]:
        torch.set_num_threads(cfg["torch_threads"])
    torch.manual_seed(cfg["seed"])
    features_np, labels_np, _ = (np.array(leaf, np.float32) for leaf in problem.data)
    features, labels = torch.from_numpy(features_np), torch.from_numpy(labels_np)
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

        epoch.sampler = sampler
        return epoch

    out: dict[str, Any] = {}
    for batch_size in cfg["peer_batch_sizes"]:
        if n % batch_size:
            raise ValueError(f"peer batch_size={batch_size} must divide n={n}")
        epochs = {method: make_epoch(method, batch_size) for method in SCHEMES}
        rows = time_interleaved(
            {method: (lambda r, epoch=epoch: epoch()) for method, epoch in epochs.items()},
            cfg["peer_repeats"],
        )
        for method in GRAB_SCHEMES:  # the herded next order is a permutation
            next_order = torch.sort(epochs[method].sampler.sorter.next_orders).values
            if not torch.equal(next_order, torch.arange(n)):
                raise RuntimeError(f"grab-sampler {method}: next order is not a permutation")
        add_ratios(rows)
        out[f"batch_size_{batch_size}"] = rows
    out["torch_num_threads"] = torch.get_num_threads()
    out["torch_sparse"] = torch_sparse
    out["compat"] = (
        "GraBSampler subclassed with a mixin that accepts Sampler.__init__(data_source), "
        "removed in torch 2.13"
    )
    out["sampler"] = {
        "random_reshuffle": "torch.utils.data.RandomSampler",
        **{m: f"grabsampler.GraBSampler(balance_type={b!r})" for m, b in PEER_BALANCE.items()},
    }
    return out


# ----------------------------------------------------------------------------- 3. seeds


def bench_seeds(
    problem: problems.FiniteSum, lr: float, cfg: dict[str, Any], key: jax.Array, cache: dict
):
    num_seeds = cfg["num_seeds"]
    x0 = jnp.zeros_like(problem.x_star)
    learning_rate = jnp.asarray(lr, x0.dtype)
    out: dict[str, Any] = dict(
        num_seeds=num_seeds, batch_size=cfg["seeds_batch_size"], num_epochs=cfg["seeds_epochs"]
    )
    for name in SCHEMES:
        run, single = jitted_run(problem, name, cfg["seeds_batch_size"], cfg["seeds_epochs"], cache)
        batched = jax.jit(jax.vmap(run, in_axes=(0, None, None)))

        def sequential(r, keys, single=single):
            for k in keys[r]:  # each call waited for: truly one after the other
                check_converged(jax.block_until_ready(single(k, x0, learning_rate)))

        key, k_seq, k_vmap = jax.random.split(key, 3)
        repeats = cfg["seeds_repeats"]
        seq_keys = jax.random.split(k_seq, (repeats + 1, num_seeds))
        vmap_keys = jax.random.split(k_vmap, (repeats + 1, num_seeds))
        rows = time_interleaved(
            dict(
                sequential=functools.partial(sequential, keys=seq_keys),
                vmapped=functools.partial(
                    call_run,
                    batched,
                    vmap_keys,
                    x0=x0,
                    learning_rate=learning_rate,
                    check=check_converged,
                ),
            ),
            repeats,
        )
        seq, vm = rows["sequential"]["epoch_seconds"], rows["vmapped"]["epoch_seconds"]
        out[name] = dict(
            sequential_seconds=seq,
            vmapped_seconds=vm,
            sequential_first_call_seconds=rows["sequential"]["first_call_seconds"],
            vmapped_first_call_seconds=rows["vmapped"]["first_call_seconds"],
            speedup_vmapped_over_sequential=seq["median"] / vm["median"],
            speedup_paired=statistics.median(
                s / v for s, v in zip(seq["repeats"], vm["repeats"], strict=True)
            ),
        )
    return out


# ----------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    lines = [
        "| part | batch | scheme | s / epoch (median) | x RR (medians) | x RR (paired) "
        "| x RR (steps only) |",
        "|---|---|---|---|---|---|---|",
    ]
    sections = [("JAX", results["jax"])]
    if isinstance(results["peer"], dict):
        sections.append(("PyTorch peer", results["peer"]))
    for label, section in sections:
        for batch_key, rows in section.items():
            if not batch_key.startswith("batch_size_"):
                continue
            for name, row in rows.items():
                ratios = [
                    row.get(f"ratio_to_random_reshuffle{suffix}", 1.0) for suffix in ("", "_paired")
                ]
                default = 1.0 if label == "JAX" else None  # the peer has no steps-only ratio
                steps = row.get("ratio_to_random_reshuffle_steps_only", default)
                lines.append(
                    f"| {label} | {batch_key.removeprefix('batch_size_')} | {name} | "
                    f"{row['epoch_seconds']['median']:.4g} | {ratios[0]:.2f} | {ratios[1]:.2f} | "
                    f"{'-' if steps is None else f'{steps:.2f}'} |"
                )
    if not isinstance(results["peer"], dict):
        lines.append(f"| PyTorch peer | | {results['peer']} | | | | |")
    seeds = results["seeds"]
    lines += [
        "",
        "JAX epoch metrics (full loss + gradient, in every epoch above): "
        f"{results['jax']['epoch_metrics_seconds']['median']:.4g} s",
        "",
        f"{seeds['num_seeds']} seeds, batch {seeds['batch_size']}, {seeds['num_epochs']} epoch(s):",
        "| scheme | sequential s | vmapped s | speed-up (medians) | speed-up (paired) |",
        "|---|---|---|---|---|",
    ]
    for name in SCHEMES:
        row = seeds[name]
        lines.append(
            f"| {name} | {row['sequential_seconds']['median']:.4g} | "
            f"{row['vmapped_seconds']['median']:.4g} | "
            f"{row['speedup_vmapped_over_sequential']:.2f} | {row['speedup_paired']:.2f} |"
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
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch.set_num_threads for the peer (0: torch's default). 1 by default: its "
        "tensors are small, and on a busy 2-core machine OpenMP's spinning barriers made a "
        "2-thread torch up to 100x slower",
    )
    args = parser.parse_args(argv)
    if args.torch_threads < 0:
        parser.error(f"--torch-threads must be >= 0, got {args.torch_threads}")
    cfg = dict(QUICK if args.quick else FULL, torch_threads=args.torch_threads)
    wall = time.perf_counter()

    problem, build_seconds, lr = build_problem(cfg)
    key = jax.random.key(cfg["seed"])
    key_jax, key_seeds = jax.random.split(key)
    results: dict[str, Any] = dict(
        benchmark="shuffling_overhead",
        quick=args.quick,
        target_ratio=TARGET_RATIO,
        machine=machine_info("optax", "torch", "grab-sampler"),
        settings=dict(
            **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            dtype=str(problem.x_star.dtype),
            learning_rate=lr,
            problem="logistic_regression(synthetic_classification(seed, n, d), l2)",
            problem_build_seconds=build_seconds,
        ),
    )
    print(f"problem n={cfg['n']} d={cfg['d']} built in {build_seconds:.1f}s", file=sys.stderr)
    cache: dict = {}
    results["jax"] = bench_jax(problem, lr, cfg, key_jax, cache)
    results["peer"] = bench_peer(problem, lr, cfg)
    results["seeds"] = bench_seeds(problem, lr, cfg, key_seeds, cache)
    results["total_seconds"] = time.perf_counter() - wall
    check_finite({k: results[k] for k in ("jax", "peer", "seeds")})

    return write_results(args.out, results, table(results))


if __name__ == "__main__":
    main()
