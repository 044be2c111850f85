"""Smoke test of benchmarks/shuffling_overhead.py in --quick mode: it runs and writes sane JSON.

No wall-clock threshold is asserted: timings live in benchmarks/, not in tests (DESIGN rule 7).
"""

import importlib.util

from support.benchmark_results import positive_finite

SCHEMES = ("random_reshuffle", "grab_pair_balance", "grab_mean_balance")


def _check_epoch_rows(section):
    batch_keys = [k for k in section if k.startswith("batch_size_")]
    assert batch_keys, section
    for batch_key in batch_keys:
        rows = section[batch_key]
        assert set(rows) == set(SCHEMES)
        for name, row in rows.items():
            times = row["epoch_seconds"]
            assert positive_finite(times["median"]) and positive_finite(times["min"])
            assert len(times["repeats"]) >= 5
            assert all(positive_finite(t) for t in times["repeats"])
            if name != "random_reshuffle":
                assert positive_finite(row["ratio_to_random_reshuffle"])
                assert positive_finite(row["ratio_to_random_reshuffle_paired"])


def test_quick_benchmark_writes_expected_json(quick_benchmark):
    results = quick_benchmark("benchmarks.shuffling_overhead")

    assert results["quick"] is True
    machine = results["machine"]
    assert machine["cpu_count"] >= 1 and machine["jax"] and machine["platform"]
    assert {"n", "d", "batch_sizes", "repeats", "learning_rate"} <= set(results["settings"])

    _check_epoch_rows(results["jax"])

    peer_installed = all(
        importlib.util.find_spec(name) is not None for name in ("torch", "grabsampler")
    )
    if peer_installed:
        _check_epoch_rows(results["peer"])
        assert results["machine"]["torch"]
    else:
        assert results["peer"] == "not installed"

    seeds = results["seeds"]
    assert seeds["num_seeds"] >= 2
    for name in SCHEMES:
        row = seeds[name]
        for kind in ("sequential_seconds", "vmapped_seconds"):
            assert positive_finite(row[kind]["median"])
            assert all(positive_finite(t) for t in row[kind]["repeats"])
        assert positive_finite(row["speedup_vmapped_over_sequential"])
        assert positive_finite(row["speedup_paired"])
