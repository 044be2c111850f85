"""Smoke test of benchmarks/ef21_step.py in --quick mode: it runs and writes sane JSON.

No wall-clock threshold is asserted: timings live in benchmarks/, not in tests (DESIGN rule 7).
Passes with or without torch installed (the peer is optional).
"""

import importlib.util
import math
import sys

import pytest

from support.benchmark_results import REPO, positive_finite

JAX_STEPS = (
    "ef21_top_k",
    "ef21_threshold_top_k",
    "ef21_sampled_threshold_top_k",
    "ef21_top_k_undonated",
    "ef21_approx_top_k",
    "gd_mean",
    "gd_dot",
    "compressed_gd_identity",
)


def _check_timing(row, min_repeats=5):
    times = row["step_seconds"]
    assert positive_finite(times["median"]) and positive_finite(times["min"])
    assert len(times["repeats"]) >= min_repeats
    assert all(positive_finite(t) for t in times["repeats"])
    assert positive_finite(row["first_call_seconds"])


@pytest.mark.parametrize("block_torch", [False, True], ids=["as_installed", "torch_blocked"])
def test_quick_benchmark_writes_expected_json(quick_benchmark, block_torch):
    results = quick_benchmark("benchmarks.ef21_step", "torch" if block_torch else None)
    peer_expected = not block_torch and importlib.util.find_spec("torch") is not None

    assert results["benchmark"] == "ef21_step" and results["quick"] is True
    assert results["targets"] == dict(over_gd=10.0, over_torch=0.5, over_floor=3.0)
    machine = results["machine"]
    assert machine["cpu_count"] >= 1 and machine["jax"] and machine["platform"]
    assert "torch" in machine
    settings = results["settings"]
    assert {"n", "d", "fraction", "repeats", "step_size", "rand_k_workers"} <= set(settings)

    steps = results["steps"]
    assert steps["k"] == math.ceil(settings["fraction"] * settings["d"])
    assert set(steps["jax"]) == set(JAX_STEPS)
    for row in steps["jax"].values():
        _check_timing(row)
    ratios = steps["ratios"]
    assert ratios["gd_reference"] in ("gd_mean", "gd_dot")
    for name in (
        "ef21_top_k_over_gd",
        "ef21_top_k_over_gd_mean",
        "ef21_top_k_over_gd_dot",
        "ef21_approx_top_k_over_gd",
        "ef21_approx_top_k_over_ef21_top_k",
        "ef21_threshold_top_k_over_gd",
        "ef21_sampled_threshold_top_k_over_ef21_top_k",
    ):
        assert positive_finite(ratios[name])
    # On CPU approx_max_k falls back to exact top-k: both runs hold the same state.
    assert steps["checks"]["approx_top_k_state_equals_top_k"] is True
    assert steps["checks"]["threshold_top_k_state_equals_top_k"] is True

    if peer_expected:
        assert machine["torch"]
        _check_timing(steps["peer"]["torch_ef21"])
        assert steps["peer"]["torch_num_threads"] >= 1
        for name in ("ef21_top_k", "ef21_threshold_top_k", "ef21_sampled_threshold_top_k"):
            assert positive_finite(ratios[f"{name}_over_torch"])
        assert steps["checks"]["memory_same_magnitudes_per_worker"] is True
    else:
        assert steps["peer"] == "not installed"
        assert "ef21_top_k_over_torch" not in ratios

    rand_k = results["rand_k"]
    assert set(rand_k["timings"]) == {"ef21_rand_k", "ef21_top_k", "gd_mean", "gd_dot"}
    for row in rand_k["timings"].values():
        _check_timing(row)
    assert positive_finite(rand_k["ratios"]["ef21_rand_k_over_gd"])

    breakdown = results["breakdown"]
    assert {
        "lax_top_k",
        "threshold_top_k",
        "sampled_threshold_top_k",
        "abs_diff",
        "worker_mean_reduce",
        "worker_mean_dot",
    } <= set(breakdown)
    for row in breakdown.values():
        _check_timing(row)
    assert all(positive_finite(v) for v in results["breakdown_share_of_ef21_top_k_step"].values())
    floor = results["memory_floor"]
    _check_timing(floor["copy"]["copy_scale"])
    n, d, k = settings["n"], settings["d"], steps["k"]
    assert floor["ef21_step_bytes"] == 8 * n * d + 4 * n * k + 8 * d
    assert floor["floor_seconds"] == pytest.approx(
        floor["ef21_step_bytes"] / floor["copy_bytes_per_second"]
    )
    for name in ("ef21_top_k", "ef21_threshold_top_k", "ef21_sampled_threshold_top_k"):
        assert floor[f"{name}_over_floor"] == pytest.approx(
            steps["jax"][name]["step_seconds"]["median"] / floor["floor_seconds"]
        )
    demo = results["demo"]
    for row in demo["timings"].values():
        _check_timing(row)
    assert set(demo["timings"]) == {"demo", "adamw"}
    assert demo["demo_over_adamw"] == pytest.approx(
        demo["timings"]["demo"]["step_seconds"]["median"]
        / demo["timings"]["adamw"]["step_seconds"]["median"]
    )
    # chunk 64 (6 index bits); a shorter last chunk of r entries sends min(topk, r) of them
    chunks, rest = divmod(settings["d"], demo["chunk"])
    last = min(demo["topk"], rest) * (32 + math.ceil(math.log2(rest))) if rest > 1 else 32 * rest
    assert demo["bits_per_worker"] == chunks * demo["topk"] * (32 + 6) + last
    assert positive_finite(results["total_seconds"])


def test_peer_reports_not_installed_without_torch(monkeypatch):
    """The torch import is lazy: with torch unimportable the peer is skipped, not an error."""
    import numpy as np

    spec = importlib.util.spec_from_file_location("ef21_step", REPO / "benchmarks" / "ef21_step.py")
    ef21_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ef21_step)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    assert ef21_step.torch_ef21(np.zeros((2, 8), np.float32), k=1, lr=0.1) == "not installed"
