"""Smoke test of benchmarks/mcmc_ess.py in --quick mode: it runs and writes sane JSON.

No wall-clock threshold is asserted (timings live in benchmarks/).  BlackJAX is a core
dependency, so the peer always runs, and the two libraries must accept at the same rate,
since they run the same kernel; SGLD coincides with blackjax.sgld on the same minibatches.
"""

from support.benchmark_results import positive_finite

ROWS = ("gaussian/mala", "gaussian/hmc", "logistic/mala", "logistic/hmc")


def test_quick_benchmark_writes_json(quick_benchmark):
    results = quick_benchmark("benchmarks.mcmc_ess")
    assert results["peer"].startswith("blackjax")
    assert set(results["rows"]) == set(ROWS)
    for name, row in results["rows"].items():
        for side in ("ours", "blackjax"):
            stats = row[side]
            assert positive_finite(stats["seconds"]["median"])
            assert len(stats["seconds"]["repeats"]) == 2
            assert positive_finite(stats["min_ess"])
            assert positive_finite(stats["min_ess_per_second"])
            assert 0.0 < stats["acceptance"] <= 1.0
        acceptance = (row["ours"]["acceptance"], row["blackjax"]["acceptance"])
        assert row["acceptance_agree"], (name, acceptance)
        assert positive_finite(row["ess_per_second_ratio"])
        # same kernel and key splits as BlackJAX: the chains coincide up to rounding
        assert row["max_abs_draw_difference"] <= 1e-3, (name, row["max_abs_draw_difference"])
    # Stochastic gradients on the same minibatches, and HMC against NUTS.
    assert set(results["sg_rows"]) == {"logistic/sgld", "logistic/sghmc"}
    assert set(results["nuts_rows"]) == {"funnel/hmc_vs_nuts", "logistic/hmc_vs_nuts"}
    for section in ("sg_rows", "nuts_rows"):
        for name, row in results[section].items():
            for side in ("ours", "blackjax"):
                stats = row[side]
                assert stats["finite"], (name, side)
                assert positive_finite(stats["min_ess_per_second"])
                assert positive_finite(stats["min_ess_per_grad_eval"])
                assert positive_finite(stats["grad_evals"])
                assert stats["mixed"] == (stats["max_split_rhat"] < 1.1)
            assert positive_finite(row["ess_per_second_ratio"])
    # SGLD: the same update and key splits as blackjax.sgld, so the same chains
    assert results["sg_rows"]["logistic/sgld"]["max_abs_draw_difference"] <= 1e-3
    # equal gradient evaluations for SGHMC: one outer BlackJAX step per inner-loop of ours
    sghmc = results["sg_rows"]["logistic/sghmc"]
    assert sghmc["ours"]["grad_evals"] == sghmc["blackjax"]["grad_evals"]
