"""Smoke test of benchmarks/sweep_scaling.py in --quick mode: it runs, writes sane JSON, and
the sweep sharded over 2, 4 and 8 devices reproduces the 1-device results.

No wall-clock threshold is asserted: timings live in benchmarks/, not in tests (DESIGN rule 7).
"""

from support.benchmark_results import positive_finite


def test_quick_benchmark_writes_json_and_sharded_sweeps_match(quick_benchmark):
    results = quick_benchmark("benchmarks.sweep_scaling")

    assert results["quick"] is True and results["target_ratio"] == 10.0
    machine = results["machine"]
    assert machine["jax_device_count"] == 8  # tests/conftest.py forces 8 host devices
    assert "share" in results["devices_share_cores"]
    settings = results["settings"]
    assert {"n", "d", "num_epochs", "num_seeds", "learning_rate", "schemes"} <= set(settings)
    assert positive_finite(settings["learning_rate"])

    for row in results["vmap_vs_loop"].values():
        for kind in ("loop_seconds", "vmapped_seconds"):
            assert positive_finite(row[kind]["median"])
            assert len(row[kind]["repeats"]) == 3
        assert positive_finite(row["ratio_loop_over_vmapped"])
        assert positive_finite(row["ratio_paired"])
    assert list(results["vmap_vs_loop"]) == settings["schemes"]

    sharded = results["sharded"]
    assert sharded["device_counts"] == [1, 2, 4, 8]
    assert sharded["all_matched"] is True
    for k in (1, 2, 4, 8):
        row = sharded["rows"][f"devices_{k}"]
        assert row["seeds_per_device"] * k == settings["num_seeds"]
        assert row["result_sharding"] == "P('seeds',)"
        assert positive_finite(row["seconds"]["median"])
        assert positive_finite(row["scaling_efficiency"])
        check = row["against_1_device"]
        assert check["matched"] is True
        assert set(check["fields"]) == {"params", "suboptimality", "grad_norm_sq", "diverged_epoch"}
        assert check["fields"]["diverged_epoch"]["bitwise_equal"]
    assert sharded["rows"]["devices_1"]["scaling_efficiency"] == 1.0
