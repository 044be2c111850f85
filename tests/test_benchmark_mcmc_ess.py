"""Smoke test of benchmarks/mcmc_ess.py in --quick mode: it runs and writes sane JSON.

No wall-clock threshold is asserted (timings live in benchmarks/).  Passes with or without
BlackJAX installed (the peer is optional, in the ``bench`` extra); when it is installed the
two libraries must accept at the same rate, since they run the same kernel.
"""

import importlib.util
import math

import pytest

ROWS = ("gaussian/mala", "gaussian/hmc", "logistic/mala", "logistic/hmc")


def _positive_finite(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("block_peer", [False, True], ids=["as_installed", "blackjax_blocked"])
def test_quick_benchmark_writes_json(quick_benchmark, block_peer):
    results = quick_benchmark("benchmarks.mcmc_ess", "blackjax" if block_peer else None)
    peer = not block_peer and importlib.util.find_spec("blackjax") is not None
    assert results["peer"].startswith("blackjax") if peer else results["peer"] == "not installed"
    assert set(results["rows"]) == set(ROWS)
    for name, row in results["rows"].items():
        sides = ("ours", "blackjax") if peer else ("ours",)
        assert ("blackjax" in row) == peer
        for side in sides:
            stats = row[side]
            assert _positive_finite(stats["seconds"]["median"]) and len(stats["seconds"]["repeats"]) == 2
            assert _positive_finite(stats["min_ess"]) and _positive_finite(stats["min_ess_per_second"])
            assert 0.0 < stats["acceptance"] <= 1.0
        if peer:
            assert row["acceptance_agree"], (name, row["ours"]["acceptance"], row["blackjax"]["acceptance"])
            assert _positive_finite(row["ess_per_second_ratio"])
            # same kernel and key splits as BlackJAX: the chains coincide up to rounding
            assert row["max_abs_draw_difference"] <= 1e-3, (name, row["max_abs_draw_difference"])
