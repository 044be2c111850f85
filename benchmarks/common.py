"""What every benchmark shares: repeat summaries, package versions and the machine record."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np


def summarize(seconds: list[float], per: int = 1) -> dict[str, Any]:
    """Median (the reported number), min and every repeat, each divided by ``per``."""
    values = [s / per for s in seconds]
    return dict(median=statistics.median(values), min=min(values), repeats=values)


def time_round_robin(
    calls: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    alternate: bool = False,
    self_timed: bool = False,
    after_first: Callable[[str, Any], None] | None = None,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """One warm-up call of each of ``calls`` in turn (timed: compile + run), then ``repeats``
    rounds that time one call of every variant in turn.

    Taking turns exposes every variant to the same load when other work on a shared machine
    comes and goes, and gives paired per-repeat ratios.  Nothing is synchronised here: each
    call must wait for its own result (``jax.block_until_ready`` for JAX).

    alternate: reverse the order in odd rounds, so that who goes first alternates.
    self_timed: each call returns its own seconds (to leave per-call set-up out of the timing),
        used instead of the time measured around it.
    after_first: ``after_first(name, result)``, untimed, after each warm-up call: to keep its
        result or check it before the repeats.

    Returns ``(first_call_seconds, seconds)``: ``{name: seconds of the warm-up call}`` and
    ``{name: [seconds of each round]}``.
    """

    def timed(call: Callable[[], Any]) -> tuple[float, Any]:
        start = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - start
        return (result if self_timed else elapsed), result

    first: dict[str, float] = {}
    for name, call in calls.items():
        first[name], result = timed(call)
        if after_first is not None:
            after_first(name, result)
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls.items())
    for repeat in range(repeats):
        for name, call in order[::-1] if alternate and repeat % 2 else order:
            times[name].append(timed(call)[0])
    return first, times


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def usable_cores() -> int:
    """Cores this process may run on (what XLA's CPU thread pool is sized by)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_info(*packages: str) -> dict[str, Any]:
    """Platform, load, JAX set-up and the versions of ``packages`` (the peers)."""
    return dict(
        platform=platform.platform(),
        processor=platform.machine(),
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        usable_cores=usable_cores(),
        affinity=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        load_average_1_5_15_min=list(os.getloadavg()),  # other work on the machine skews timings
        jax=jax.__version__,
        jaxlib=version("jaxlib"),
        jax_backend=jax.default_backend(),
        jax_device_count=jax.device_count(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        numpy=np.__version__,
        **{package.replace("-", "_"): version(package) for package in packages},
    )


def write_results(path: pathlib.Path, results: dict[str, Any], table: str) -> dict[str, Any]:
    """Write ``results`` as JSON to ``path``, print the table and where it went; return them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(table)
    print(f"\nwrote {path} in {results['total_seconds']:.0f}s")
    return results
