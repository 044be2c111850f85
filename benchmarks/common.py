"""What every benchmark shares: repeat summaries, package versions and the machine record."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
from typing import Any

import jax
import numpy as np


def summarize(seconds: list[float], per: int = 1) -> dict[str, Any]:
    """Median (the reported number), min and every repeat, each divided by ``per``."""
    values = [s / per for s in seconds]
    return dict(median=statistics.median(values), min=min(values), repeats=values)


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
