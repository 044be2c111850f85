r"""What does one EF21 + Top-k step cost, against uncompressed GD and a PyTorch peer?

One step of ``compression.ef21(compression.top_k(fraction=0.01))`` for ``n = 32``
workers and ``d = 10**6`` coordinates (``k = 10_000``), float32, on CPU.  The worker
gradients are one fixed ``[n, d]`` array drawn once, so only the step is timed, not the
computing of gradients.

1. **JAX.**  ``jax.jit(method.step, donate_argnums=1)`` (``step(key, state, grads,
   step_size)``, the state donated) fed its own output state, one call
   per repeat (the state evolves as in a run; the gradients do not).  Against it, the
   uncompressed averaged GD step :math:`x \leftarrow x - \gamma\frac1n\sum_i g_i` in the
   same harness (jitted, ``x`` donated), written two ways: ``jnp.mean(g, axis=0)`` and a
   dot with a vector of ones.  With jaxlib 0.10 on CPU the first is ~30x slower than the
   second (XLA sends the reduction over the leading axis to a YNNPACK fusion), so the
   ratio reported against GD uses the faster of the two (``gd_reference``) and the other
   is kept for the record.  Also timed: the library's own uncompressed path
   ``compressed_gd(identity())``, EF21 without donating the state, and EF21 with
   ``approx_top_k`` (XLA falls back to exact top-k on CPU: the JSON records whether its
   state matched exact Top-k's bit for bit).
2. **Peer.**  The same EF21 step with PyTorch tensors, a Python loop over the workers:
   ``diff = g_i - h_i``; ``torch.topk(diff.abs(), k, sorted=False)``;
   ``h_i[idx] += diff[idx]``; then ``x -= lr * h.mean(0)``.  ``torch`` is optional
   (``pip install torch==2.13.0``, the ``bench`` extra); without it the JSON says
   ``"peer": "not installed"``.  Its thread count is set to the number of cores this
   process may use, the size of the thread pool XLA's CPU client uses.  After the same
   number of steps the two states must agree up to ties at the k-th magnitude, which
   ``lax.top_k`` and ``torch.topk`` may break differently (see :func:`agreement`).
3. **Rand-k.**  EF21 with ``rand_k(fraction=0.01)`` for context.  The library draws the
   indices as the top ``k`` of ``d`` random keys per worker (it used to take
   ``jax.random.permutation(key, d)[:k]``, a sort of ``d`` keys); this part runs on the
   first ``rand_k_workers`` workers only, against GD and EF21 + Top-k on the same workers.
4. **Where the time goes.**  ``lax.top_k(|g|, k)`` alone on the ``[n, d]`` array, the
   elementwise pass ``|g - h|`` that feeds it, the worker mean both ways, and
   ``torch.topk`` on the same array.
   Also ``compression.threshold_top_k`` (exact: its EF21 state must equal Top-k's bit for
   bit, else the run fails) and ``compression.sampled_threshold_top_k`` alone on the same
   magnitudes, and inside the EF21 step (part 1, against GD and the peer).
5. **Memory floor.**  The bytes an EF21 step must move (read the gradients and memories,
   write the kept entries, read and write the model) over the streaming bandwidth measured
   here (``a * 2`` on the gradient array), and each EF21 + Top-k step as a multiple of it.
6. **DeMo.**  One step of ``optax.chain(compression.demo(n), optax.scale(-lr))`` on the
   ``[n, d]`` worker gradients against one ``optax.adamw`` step on their mean.

The variants of a part are timed round-robin (repeat r of every variant, then repeat r+1)
so that other load on the machine hits all of them alike.  Every timing is the median of
at least 5 repeats after one warm-up call that compiles and runs (JAX results waited for
with ``block_until_ready``); all repeats are kept in the JSON with the machine description.

    python -m benchmarks.ef21_step [--quick] [--out PATH]

``--quick`` shrinks everything (a few seconds) for the smoke test.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import (
    machine_info,
    summarize,
    time_round_robin,
    usable_cores,
    write_results,
)
from shufflesgd import compression

DEFAULT_OUT = pathlib.Path("results/benchmarks/ef21_step.json")
#: The EF21 steps with an exact or sampled Top-k whose times the report compares.
EF21_TOP_K_STEPS = ("ef21_top_k", "ef21_threshold_top_k", "ef21_sampled_threshold_top_k")
#: Issue 15's targets for the EF21 + Top-k step: at most 10x the GD step, at least 2x faster
#: than the PyTorch loop, within 3x of the memory-traffic floor.
TARGETS = dict(over_gd=10.0, over_torch=0.5, over_floor=3.0)

FULL = dict(
    n=32,
    d=1_000_000,
    fraction=0.01,
    step_size=0.1,
    seed=0,
    repeats=7,
    rand_k_workers=4,
    rand_k_repeats=5,
    breakdown_repeats=5,
    demo_chunk=50,  # divides d (DeMo raises on a leaf that is not a whole number of chunks)
    demo_topk=25,
)
QUICK = dict(
    n=4,
    d=10_000,
    fraction=0.01,
    step_size=0.1,
    seed=0,
    repeats=5,
    rand_k_workers=2,
    rand_k_repeats=5,
    breakdown_repeats=5,
    demo_chunk=50,  # divides d (DeMo raises on a leaf that is not a whole number of chunks)
    demo_topk=25,
)


# ----------------------------------------------------------------------------- helpers


class Stepper(NamedTuple):
    """A variant to time: ``call()`` runs one step and returns what to wait for (JAX arrays)."""

    call: Callable[[], Any]


def time_steps(variants: dict[str, Stepper], repeats: int) -> dict[str, Any]:
    """``time_round_robin`` over the variants, each call waited for with ``block_until_ready``.
    Returns ``{name: {step_seconds, first_call_seconds}}``."""
    first, times = time_round_robin(
        {name: (lambda call=v.call: jax.block_until_ready(call())) for name, v in variants.items()},
        repeats,
    )
    return {
        name: dict(step_seconds=summarize(times[name]), first_call_seconds=first[name])
        for name in variants
    }


def median(section: dict[str, Any], name: str) -> float:
    return section[name]["step_seconds"]["median"]


# ----------------------------------------------------------------------------- JAX steps


def ef21_stepper(
    compressor: compression.Compressor,
    grads: jax.Array,
    keys: jax.Array,
    step_size: jax.Array,
    donate: bool = True,
) -> tuple[Stepper, dict]:
    """The library's EF21 step, jitted, fed its own output state; a fresh key per step."""
    method = compression.ef21(compressor)
    n, d = grads.shape
    compression.check_tree(compressor, jnp.zeros((d,), grads.dtype))
    # Fresh buffers: init shares x0 between fields, and a donated buffer must be our own.
    state = jax.tree.map(jnp.copy, method.init(jax.random.key(0), jnp.zeros((d,), grads.dtype), n))
    step = jax.jit(method.step, donate_argnums=(1,) if donate else ())  # step(key, state, ...)
    holder = dict(state=state, count=0)
    step_keys = [keys[i] for i in range(keys.shape[0])]  # sliced here, not in the timed call

    def call():
        holder["state"], info = step(step_keys[holder["count"]], holder["state"], grads, step_size)
        holder["count"] += 1
        return holder["state"].x, info

    return Stepper(call), holder


def gd_steppers(grads: jax.Array, step_size: jax.Array) -> dict[str, Stepper]:
    """Uncompressed averaged GD, ``x - lr * mean_i g_i``, jitted with ``x`` donated; two ways
    of writing the mean, and the library's ``compressed_gd(identity())``."""
    n, d = grads.shape

    def by_mean(x, g, lr):
        return x - lr * jnp.mean(g, axis=0)

    def by_dot(x, g, lr):
        ones = jnp.ones((n,), g.dtype)
        return x - lr * (jnp.tensordot(ones, g, axes=1, precision=jax.lax.Precision.HIGHEST) / n)

    steppers = {}
    for name, fn in (("gd_mean", by_mean), ("gd_dot", by_dot)):
        step = jax.jit(fn, donate_argnums=0)
        holder = dict(x=jnp.zeros((d,), grads.dtype))

        def call(step=step, holder=holder):
            holder["x"] = step(holder["x"], grads, step_size)
            return holder["x"]

        steppers[name] = Stepper(call)

    method = compression.compressed_gd(compression.identity())
    state = jax.tree.map(jnp.copy, method.init(jax.random.key(0), jnp.zeros((d,), grads.dtype), n))
    step = jax.jit(method.step, donate_argnums=1)
    holder = dict(state=state)
    key = jax.random.key(1)  # identity() draws nothing from it

    def call_library():
        holder["state"], info = step(key, holder["state"], grads, step_size)
        return holder["state"].x, info

    steppers["compressed_gd_identity"] = Stepper(call_library)
    return steppers


def same_state(a: Any, b: Any) -> bool:
    """Whether two EF21 states hold bit-identical memories and models."""
    return bool(
        np.array_equal(np.asarray(a.memory), np.asarray(b.memory))
        and np.array_equal(np.asarray(a.x), np.asarray(b.x))
    )


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.linalg.norm(a)) or 1.0
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / scale)


def agreement(
    memory: np.ndarray, x: np.ndarray, peer_memory: np.ndarray, peer_x: np.ndarray
) -> dict:
    """How JAX's and the peer's EF21 states compare after the same steps from the same start.

    With fixed gradients every kept coordinate of ``h_i`` holds exactly ``g_i``'s value, so the
    two memories agree exactly except where a tie at the k-th magnitude was broken differently
    (``lax.top_k`` keeps the lower index, ``torch.topk`` not necessarily): such a tie swaps
    equal magnitudes, so each worker's sorted kept magnitudes must still agree exactly.  The
    tied coordinate is picked up a step later, but ``x`` keeps a small difference from the
    steps where the memories differed (it decays like 1/steps).
    """
    same = all(
        np.array_equal(np.sort(np.abs(a[a != 0])), np.sort(np.abs(b[b != 0])))
        for a, b in zip(memory, peer_memory)
    )
    return dict(
        memory_entries_differing=int(np.sum(memory != peer_memory)),
        memory_entries_kept=int(np.sum(memory != 0)),
        memory_same_magnitudes_per_worker=bool(same),
        relative_difference_x_jax_vs_torch=relative_difference(x, peer_x),
    )


# ----------------------------------------------------------------------------- peer


def torch_ef21(
    grads_np: np.ndarray, k: int, lr: float
) -> tuple[Stepper, Callable[[], np.ndarray]] | str:
    """The EF21 step in PyTorch, a Python loop over workers; ``"not installed"`` without torch."""
    try:
        import torch
    except ImportError as error:
        print(f"peer skipped: {error}", file=sys.stderr)
        return "not installed"

    torch.set_num_threads(usable_cores())
    g = torch.from_numpy(np.array(grads_np, np.float32))  # own, writable copy
    n, d = g.shape
    h = torch.zeros_like(g)
    x = torch.zeros(d, dtype=g.dtype)

    def call():
        with torch.inference_mode():
            for i in range(n):
                diff = g[i] - h[i]
                _, idx = torch.topk(diff.abs(), k, sorted=False)
                h[i].index_add_(0, idx, diff[idx])  # h_i += C(g_i - h_i): k coordinates
            x.sub_(lr * h.mean(dim=0))
        return None

    return Stepper(call), lambda: (h.numpy().copy(), x.numpy().copy())


# ----------------------------------------------------------------------------- parts


def bench_steps(cfg: dict[str, Any], grads: jax.Array, grads_np: np.ndarray, key: jax.Array):
    n, d = grads.shape
    k = math.ceil(round(cfg["fraction"] * d, 9))
    lr = jnp.asarray(cfg["step_size"], grads.dtype)
    keys = jax.random.split(key, cfg["repeats"] + 1)
    ef21_top_k, top_k_holder = ef21_stepper(
        compression.top_k(fraction=cfg["fraction"]), grads, keys, lr
    )
    ef21_approx, approx_holder = ef21_stepper(
        compression.approx_top_k(fraction=cfg["fraction"]), grads, keys, lr
    )
    undonated, _ = ef21_stepper(
        compression.top_k(fraction=cfg["fraction"]), grads, keys, lr, donate=False
    )
    ef21_threshold, threshold_holder = ef21_stepper(
        compression.threshold_top_k(fraction=cfg["fraction"]), grads, keys, lr
    )
    ef21_sampled, _ = ef21_stepper(
        compression.sampled_threshold_top_k(fraction=cfg["fraction"]), grads, keys, lr
    )
    variants = dict(
        ef21_top_k=ef21_top_k,
        ef21_threshold_top_k=ef21_threshold,
        ef21_sampled_threshold_top_k=ef21_sampled,
        ef21_top_k_undonated=undonated,
        ef21_approx_top_k=ef21_approx,
        **gd_steppers(grads, lr),
    )
    peer = torch_ef21(grads_np, k, cfg["step_size"])
    if not isinstance(peer, str):
        variants["torch_ef21"] = peer[0]
    timed = time_steps(variants, cfg["repeats"])

    jax_part = {name: row for name, row in timed.items() if name != "torch_ef21"}
    gd_reference = min(("gd_mean", "gd_dot"), key=lambda name: median(jax_part, name))
    ef21 = median(jax_part, "ef21_top_k")
    ratios = dict(
        gd_reference=gd_reference,
        ef21_top_k_over_gd=ef21 / median(jax_part, gd_reference),
        ef21_top_k_over_gd_mean=ef21 / median(jax_part, "gd_mean"),
        ef21_top_k_over_gd_dot=ef21 / median(jax_part, "gd_dot"),
        ef21_top_k_over_compressed_gd_identity=ef21 / median(jax_part, "compressed_gd_identity"),
        ef21_approx_top_k_over_gd=median(jax_part, "ef21_approx_top_k")
        / median(jax_part, gd_reference),
        ef21_approx_top_k_over_ef21_top_k=median(jax_part, "ef21_approx_top_k") / ef21,
        ef21_top_k_donated_over_undonated=ef21 / median(jax_part, "ef21_top_k_undonated"),
    )
    for name in ("ef21_threshold_top_k", "ef21_sampled_threshold_top_k"):
        ratios[f"{name}_over_gd"] = median(jax_part, name) / median(jax_part, gd_reference)
        ratios[f"{name}_over_ef21_top_k"] = median(jax_part, name) / ef21
    top_k_state, approx_state = top_k_holder["state"], approx_holder["state"]
    checks = dict(
        steps_taken=top_k_holder["count"],
        approx_top_k_state_equals_top_k=same_state(top_k_state, approx_state),
        threshold_top_k_state_equals_top_k=same_state(top_k_state, threshold_holder["state"]),
    )
    if not checks["threshold_top_k_state_equals_top_k"]:
        raise RuntimeError("EF21 with threshold_top_k left a different state than with top_k")
    if isinstance(peer, str):
        peer_part: dict[str, Any] | str = peer
    else:
        import torch

        peer_part = dict(
            torch_ef21=timed["torch_ef21"],
            torch_num_threads=torch.get_num_threads(),
            torch_threads_rule="torch.set_num_threads(usable cores), the size of XLA's CPU pool",
            implementation="Python loop over workers: torch.topk(|g_i - h_i|, k, sorted=False), "
            "h_i.index_add_, x -= lr * h.mean(0)",
        )
        for name in ("ef21_top_k", "ef21_threshold_top_k", "ef21_sampled_threshold_top_k"):
            ratios[f"{name}_over_torch"] = median(jax_part, name) / median(timed, "torch_ef21")
        checks.update(
            agreement(np.asarray(top_k_state.memory), np.asarray(top_k_state.x), *peer[1]())
        )
        if not checks["memory_same_magnitudes_per_worker"]:
            raise RuntimeError(f"JAX and torch EF21 disagree: {checks}")
    return dict(k=k, jax=jax_part, peer=peer_part, ratios=ratios, checks=checks)


def bench_rand_k(cfg: dict[str, Any], grads: jax.Array, key: jax.Array) -> dict[str, Any]:
    workers = cfg["rand_k_workers"]
    grads = grads[:workers]
    lr = jnp.asarray(cfg["step_size"], grads.dtype)
    keys = jax.random.split(key, cfg["rand_k_repeats"] + 1)
    variants = dict(
        ef21_rand_k=ef21_stepper(compression.rand_k(fraction=cfg["fraction"]), grads, keys, lr)[0],
        ef21_top_k=ef21_stepper(compression.top_k(fraction=cfg["fraction"]), grads, keys, lr)[0],
    )
    gd = gd_steppers(grads, lr)
    variants.update(gd_mean=gd["gd_mean"], gd_dot=gd["gd_dot"])
    timed = time_steps(variants, cfg["rand_k_repeats"])
    gd_reference = min(("gd_mean", "gd_dot"), key=lambda name: median(timed, name))
    rand_k = median(timed, "ef21_rand_k")
    return dict(
        workers=workers,
        timings=timed,
        rand_k_seconds_per_worker=rand_k / workers,
        ratios=dict(
            gd_reference=gd_reference,
            ef21_rand_k_over_gd=rand_k / median(timed, gd_reference),
            ef21_rand_k_over_ef21_top_k=rand_k / median(timed, "ef21_top_k"),
        ),
    )


def bench_breakdown(
    cfg: dict[str, Any], grads: jax.Array, grads_np: np.ndarray, k: int
) -> dict[str, Any]:
    n, _ = grads.shape
    magnitudes = jnp.abs(grads)
    memory = grads * 0.5
    top_k = jax.jit(lambda a: jax.lax.top_k(a, k))
    abs_diff = jax.jit(lambda g, h: jnp.abs(g - h))
    mean_reduce = jax.jit(lambda g: jnp.mean(g, axis=0))
    mean_dot = jax.jit(
        lambda g: (
            jnp.tensordot(jnp.ones((n,), g.dtype), g, axes=1, precision=jax.lax.Precision.HIGHEST)
            / n
        )
    )
    exact = compression.threshold_top_k(k)
    sampled = compression.sampled_threshold_top_k(k)
    select_key = jax.random.key(2)
    exact_select = jax.jit(jax.vmap(lambda a: exact.step(select_key, None, a)[1]))
    sampled_select = jax.jit(jax.vmap(lambda a: sampled.step(select_key, None, a)[1]))
    variants = dict(
        lax_top_k=Stepper(lambda: top_k(magnitudes)),
        threshold_top_k=Stepper(lambda: exact_select(magnitudes)),
        sampled_threshold_top_k=Stepper(lambda: sampled_select(magnitudes)),
        abs_diff=Stepper(lambda: abs_diff(grads, memory)),
        worker_mean_reduce=Stepper(lambda: mean_reduce(grads)),
        worker_mean_dot=Stepper(lambda: mean_dot(grads)),
    )
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch_magnitudes = torch.from_numpy(np.abs(grads_np))
        variants["torch_topk"] = Stepper(
            lambda: torch.topk(torch_magnitudes, k, dim=1, sorted=False)
        )
    return time_steps(variants, cfg["breakdown_repeats"])


def bench_memory_floor(
    cfg: dict[str, Any], grads: jax.Array, k: int, steps: dict[str, Any]
) -> dict[str, Any]:
    """The least time an EF21 step can take on this machine: the bytes it must move over the
    copy bandwidth measured here.

    An EF21 step reads the ``[n, d]`` gradients and memories once (``8nd`` bytes), writes the
    ``k`` changed memory entries per worker (``4nk``) and reads and writes the model
    (``8d``).  The bandwidth is that of ``a * 2`` on the ``[n, d]`` gradient array, jitted
    (one read and one write of ``4nd`` bytes each: what a streaming pass costs here).
    """
    n, d = grads.shape
    scale = jax.jit(lambda a: a * 2.0)
    timed = time_steps(dict(copy_scale=Stepper(lambda: scale(grads))), cfg["breakdown_repeats"])
    bandwidth = 8.0 * n * d / median(timed, "copy_scale")
    step_bytes = 8.0 * n * d + 4.0 * n * k + 8.0 * d
    floor = step_bytes / bandwidth
    return dict(
        copy=timed,
        copy_bytes_per_second=bandwidth,
        ef21_step_bytes=step_bytes,
        floor_seconds=floor,
        **{f"{name}_over_floor": median(steps, name) / floor for name in EF21_TOP_K_STEPS},
    )


def bench_demo(cfg: dict[str, Any], grads: jax.Array) -> dict[str, Any]:
    """One DeMo step (``chain(demo(n), scale(-lr))`` on the ``[n, d]`` worker gradients)
    against one AdamW step on their mean (the data-parallel baseline: all-reduce, then
    AdamW), both jitted with parameters and optimiser state donated."""
    n, d = grads.shape
    lr = cfg["step_size"]
    ones = jnp.ones((n,), grads.dtype)

    def worker_mean(g: jax.Array) -> jax.Array:
        return jnp.tensordot(ones, g, axes=1, precision=jax.lax.Precision.HIGHEST) / n

    optimisers = dict(
        demo=(
            optax.chain(
                compression.demo(n, chunk=cfg["demo_chunk"], topk=cfg["demo_topk"]),
                optax.scale(-lr),
            ),
            lambda g: g,
        ),
        adamw=(optax.adamw(lr), worker_mean),
    )
    variants = {}
    for name, (optimiser, reduce) in optimisers.items():

        def update(params, state, g, optimiser=optimiser, reduce=reduce):
            updates, state = optimiser.update(reduce(g), state, params)
            return optax.apply_updates(params, updates), state

        step = jax.jit(update, donate_argnums=(0, 1))
        params = jnp.zeros((d,), grads.dtype)
        holder = dict(params=params, state=optimiser.init(params))

        def call(step=step, holder=holder):
            holder["params"], holder["state"] = step(holder["params"], holder["state"], grads)
            return holder["params"]

        variants[name] = Stepper(call)
    timed = time_steps(variants, cfg["repeats"])
    return dict(
        timings=timed,
        chunk=cfg["demo_chunk"],
        topk=cfg["demo_topk"],
        bits_per_worker=compression.demo_bits(
            jnp.zeros((d,), grads.dtype), cfg["demo_chunk"], cfg["demo_topk"]
        ),
        demo_over_adamw=median(timed, "demo") / median(timed, "adamw"),
    )


# ----------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    steps = results["steps"]
    gd = steps["jax"][steps["ratios"]["gd_reference"]]["step_seconds"]["median"]
    lines = [
        f"n = {results['settings']['n']} workers, d = {results['settings']['d']}, "
        f"k = {steps['k']}: seconds per step (median)",
        "| step | s / step | x GD |",
        "|---|---|---|",
    ]
    rows = [(name, row) for name, row in steps["jax"].items()]
    if isinstance(steps["peer"], dict):
        rows.append(("torch_ef21 (peer)", steps["peer"]["torch_ef21"]))
    for name, row in rows:
        seconds = row["step_seconds"]["median"]
        lines.append(f"| {name} | {seconds:.4g} | {seconds / gd:.2f} |")
    if not isinstance(steps["peer"], dict):
        lines.append(f"| torch_ef21 (peer) | {steps['peer']} | |")
    ratios = steps["ratios"]
    lines.append("")
    targets = results["targets"]
    for name in EF21_TOP_K_STEPS:
        line = (
            f"{name} / GD ({ratios['gd_reference']}): {ratios[f'{name}_over_gd']:.2f} "
            f"(target <= {targets['over_gd']:g})"
        )
        if f"{name}_over_torch" in ratios:
            line += (
                f"; / torch: {ratios[f'{name}_over_torch']:.2f} "
                f"(target <= {targets['over_torch']:g})"
            )
        lines.append(line)
    rand_k = results["rand_k"]
    lines += ["", f"rand_k on {rand_k['workers']} workers:", "| step | s / step |", "|---|---|"]
    for name, row in rand_k["timings"].items():
        lines.append(f"| {name} | {row['step_seconds']['median']:.4g} |")
    floor = results["memory_floor"]
    lines += [
        "",
        f"memory-traffic floor: {floor['ef21_step_bytes'] / 1e6:.1f} MB at "
        f"{floor['copy_bytes_per_second'] / 1e9:.2f} GB/s = {floor['floor_seconds']:.4g} s; "
        f"multiple of it (target <= {results['targets']['over_floor']:g}): "
        + ", ".join(f"{name} {floor[f'{name}_over_floor']:.1f}x" for name in EF21_TOP_K_STEPS),
        "",
        f"DeMo (chunk {results['demo']['chunk']}, top {results['demo']['topk']}) step / AdamW "
        f"step: {results['demo']['demo_over_adamw']:.2f}",
    ]
    lines += ["", "where the time goes (whole [n, d] array):", "| op | s |", "|---|---|"]
    for name, row in results["breakdown"].items():
        lines.append(f"| {name} | {row['step_seconds']['median']:.4g} |")
    return "\n".join(lines)


def timings_positive(tree: Any) -> None:
    """Every timing (a float under a ``*seconds*`` key) is positive and finite."""
    if isinstance(tree, dict):
        for name, value in tree.items():
            if "seconds" in name:
                values = (
                    value["repeats"] + [value["median"], value["min"]]
                    if isinstance(value, dict)
                    else [value]
                )
                for v in values:
                    if not (isinstance(v, float) and math.isfinite(v) and v > 0):
                        raise RuntimeError(f"non-positive or non-finite timing {name}={v}")
            else:
                timings_positive(value)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON path")
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (seconds)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    wall = time.perf_counter()

    key = jax.random.key(cfg["seed"])
    key_grads, key_steps, key_rand_k = jax.random.split(key, 3)
    grads = jax.block_until_ready(jax.random.normal(key_grads, (cfg["n"], cfg["d"]), jnp.float32))
    grads_np = np.asarray(grads)
    results: dict[str, Any] = dict(
        benchmark="ef21_step",
        quick=args.quick,
        targets=TARGETS,
        machine=machine_info("torch"),
        settings=dict(
            **cfg,
            dtype="float32",
            donate_state=True,
            gradients="jax.random.normal(key, (n, d)), fixed for every step",
            method="compression.ef21(compression.top_k(fraction=fraction))",
        ),
    )
    results["steps"] = bench_steps(cfg, grads, grads_np, key_steps)
    results["rand_k"] = bench_rand_k(cfg, grads, key_rand_k)
    results["breakdown"] = bench_breakdown(cfg, grads, grads_np, results["steps"]["k"])
    ef21 = median(results["steps"]["jax"], "ef21_top_k")
    results["breakdown_share_of_ef21_top_k_step"] = {
        name: row["step_seconds"]["median"] / ef21
        for name, row in results["breakdown"].items()
        if not name.startswith("torch")
    }
    results["memory_floor"] = bench_memory_floor(
        cfg, grads, results["steps"]["k"], results["steps"]["jax"]
    )
    results["demo"] = bench_demo(cfg, grads)
    results["total_seconds"] = time.perf_counter() - wall
    parts = ("steps", "rand_k", "breakdown", "memory_floor", "demo")
    timings_positive({k: results[k] for k in parts})

    return write_results(args.out, results, table(results))


if __name__ == "__main__":
    main()
