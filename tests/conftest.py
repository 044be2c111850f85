"""Test-wide JAX settings: 8 forced CPU devices, fast compilation and key-reuse checking.

XLA_FLAGS must be set before JAX initialises its backends, hence at import time here.
"""

import json
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# Batched linear algebra under vmap inside long loops was seen to deadlock XLA:CPU's Eigen
# thread pool (both workers stuck in a batched LU / Cholesky); single-threaded Eigen avoids it.
if "xla_cpu_multi_thread_eigen" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"
# Most of the suite's time is XLA compiling small programs; at backend optimisation level 0
# that is about a third faster, and every comparison in the suite is between programs
# compiled alike.  The tests that compare one program with another across shardings compile
# both at the default level explicitly (tests/compression/test_sharded.py says why).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_debug_key_reuse", True)


@pytest.fixture
def quick_benchmark(tmp_path):
    """``run(module, blocked=None) -> results``: run ``python -m <module> --quick`` from the
    repository root in a fresh process (with this process's XLA flags), writing its JSON
    under ``tmp_path`` (a folder it must create), and return the parsed JSON.  ``blocked``
    names a peer package made unimportable through ``benchmarks.without``."""

    def run(module: str, blocked: str | None = None) -> dict:
        out = tmp_path / "bench" / f"{module.rsplit('.', 1)[-1]}.json"
        entry = ["benchmarks.without", blocked, module] if blocked else [module]
        subprocess.run(
            [sys.executable, "-m", *entry, "--quick", "--out", str(out)],
            cwd=pathlib.Path(__file__).resolve().parents[1],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return json.loads(out.read_text())

    return run


@pytest.fixture
def x64():
    """Run a test in float64 (rates are measured down to ~1e-12), restoring the setting after."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
