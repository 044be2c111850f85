"""The walk–jump tunnelling study end to end (quick variant): equal budgets as counted from the
kernels' infos (the ensemble's per walker), Langevin chains stuck in their starting mode while
walk–jump and the ensemble visit the others, the exact references at their known values (the
funnel's exact draws within the DKW / Jensen bounds of their v-distances), outputs written, bad
configs rejected first.

(Named ``test_walk_jump_study`` so as not to clash with the library's
``tests/test_walk_jump.py``.)"""

import csv
import json
import math

import jax
import numpy as np
import pytest
from scipy import integrate, special, stats

from configs import walk_jump as config_module
from experiments import walk_jump


def test_quick_study_tunnels_with_walk_jump_at_an_equal_budget(tmp_path, x64, capsys, quick_config):
    config = quick_config("walk_jump", tmp_path)
    metrics = walk_jump.run(config)
    (folder,) = list((tmp_path / "walk_jump").iterdir())
    for name in (
        "config.json",
        "metrics.json",
        "samplers.csv",
        "funnel.csv",
        "table.txt",
        "figure.png",
    ):
        assert (folder / name).stat().st_size > 0, name
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["problems"].keys() == {"mixture_2d", "funnel"}
    # 32 chains in 4 ensembles of 8: the chain axis over 4 of the 8 devices, ensembles whole
    assert saved["devices"] == 4
    with (folder / "samplers.csv").open() as handle:
        assert [row["sampler"] for row in csv.DictReader(handle)] == list(config.samplers)
    with (folder / "funnel.csv").open() as handle:
        assert [row["sampler"] for row in csv.DictReader(handle)] == list(config.funnel_samplers)
    out = capsys.readouterr().out
    assert "modes visited" in out and "KS(v)" in out and "ensemble" in out

    # 1. Equal budgets, summed per chain from info.num_grad_evals / num_density_evals (not from
    # the plan): every chain of every budgeted sampler spends exactly `budget`, the chain of
    # chains and HMC up to less than one run / step.  The ensemble's chains are its walkers:
    # ensembles of N spend N values a walk step and N per jump, B per walker.
    n = config.samples_per_chain
    for problem, entry in metrics["problems"].items():
        for name, row in entry["samplers"].items():
            if name in walk_jump.REFERENCES:
                assert row["evals_max"] == 0, (problem, name, row)
                continue
            assert row["evals_min"] == row["evals_max"], (problem, name, row)
            unit = "density" if name in walk_jump.DENSITY_SAMPLERS else "gradient"
            assert row["unit"] == unit, (problem, name, row)
            if name == "chain_of_chains":
                run_cost = config.num_measurements * config.steps_per_measurement + 1
                assert config.budget - run_cost < row["evals_max"] <= config.budget, row
            elif name == "hmc":
                assert row["evals_max"] == 1 + config.funnel_leapfrog * row["steps"], row
                assert config.budget - config.funnel_leapfrog < row["evals_max"] <= config.budget
            else:
                assert row["evals_max"] == config.budget, (problem, name, row)
            if name == "ensemble":
                assert row["members"] == config.ensemble_size, row
                assert row["steps"] == config.budget - n and row["samples_per_chain"] == n, row
            else:
                assert row["members"] == 1, (problem, name, row)

    r = metrics["problems"]["mixture_2d"]["samplers"]
    k = len(config.weights)

    # 2. Tunnelling (measured: ULA and MALA 0.250 +- 0 -- every chain stays in its starting mode,
    # 16 component SDs from the next -- walk-jump 0.95 +- 0.02, the ensemble 1.000 +- 0 over its
    # 4 ensembles).  Margin: 0.3 beyond 4 SEs each.
    for name in ("ula", "mala"):
        assert r[name]["modes_visited"] == pytest.approx(1.0 / k), (name, r[name])
        # all mass in the start mode: TV error 1 - w_start exactly
        assert r[name]["weight_tv"] == pytest.approx(
            1.0 - config.weights[config.start_mode], abs=1e-9
        ), r[name]
        for walker in ("walk_jump", "ensemble"):
            assert (
                r[name]["modes_visited"] + 4 * r[name]["modes_visited_se"] + 0.3
                < r[walker]["modes_visited"] - 4 * r[walker]["modes_visited_se"]
            ), (walker, r)
    # walk-jump's jumps land in the modes with the right frequencies: its TV error is the exact
    # draws' own multinomial error (measured 0.112 +- 0.010 vs 0.121 +- 0.010), within 4 joint SEs.
    joint = math.hypot(r["walk_jump"]["weight_tv_se"], r["exact"]["weight_tv_se"])
    assert abs(r["walk_jump"]["weight_tv"] - r["exact"]["weight_tv"]) < 4 * joint, r

    # 3. The references at their known values.  Exact draws: modes visited as the binomial
    # formula says, spread ratio 1; inside the mode, MALA is exact and ULA sits at its stationary
    # variance s^2 / (1 - h / 2s^2) (measured 0.992 +- 0.015 and 1.067 +- 0.017 vs 1.054).
    exact = r["exact"]
    assert abs(exact["modes_visited"] - exact["iid_modes_visited"]) <= max(
        4 * exact["modes_visited_se"], 0.02
    ), exact
    assert abs(exact["spread_ratio"] - 1.0) < 4 * exact["spread_ratio_se"], exact
    assert abs(r["mala"]["spread_ratio"] - 1.0) < 4 * r["mala"]["spread_ratio_se"], r["mala"]
    ula_ratio = 1.0 / math.sqrt(1.0 - config.ula_step_size / (2 * config.component_std**2))
    assert abs(r["ula"]["spread_ratio"] - ula_ratio) < 4 * r["ula"]["spread_ratio_se"], (
        ula_ratio,
        r["ula"],
    )
    # W2: the exact draws' value is the Monte Carlo floor (measured 2.36 +- 0.31); chains stuck in
    # one mode sit far above it (6.8 +- 0.2).
    for name in ("ula", "mala"):
        assert r[name]["w2"] - 4 * r[name]["w2_se"] > exact["w2"] + 4 * exact["w2_se"], (name, r)
    assert "w2_walk" in r["walk_jump"] and "w2_walk" in r["ensemble"] and "w2_walk" not in r["ula"]

    # 4. The funnel: v ~ N(0, a^2) exactly.  Every metric is finite and in range.
    f = metrics["problems"]["funnel"]["samplers"]
    a = config.funnel_scale
    tail = stats.norm.cdf(-1.0)
    for name, row in f.items():
        for field in ("mean_v", "var_v", "neck", "mouth", "ks_v", "w1_v"):
            assert math.isfinite(row[field]) and math.isfinite(row[field + "_se"]), (name, row)
        assert 0.0 <= row["neck"] <= 1.0 and 0.0 <= row["mouth"] <= 1.0, (name, row)
        assert 0.0 < row["ks_v"] <= 1.0 and row["w1_v"] > 0.0, (name, row)
        assert ("ks_walk" in row) == (name in walk_jump.WALKERS), (name, row)
    # The exact draws' distances are their Monte Carlo floor, within bounds that hold for every
    # sample size: E[KS] <= int_0^inf min(1, 2 exp(-2 m t^2)) dt by the DKW inequality (Massart
    # 1990), and for two independent m-samples E[W1] = E int |F_m - G_m| dx <=
    # int sqrt(2 F (1 - F) / m) dx by Jensen; m points per group (measured 0.051 +- 0.009 against
    # 0.056, and 0.37 +- 0.13 against 0.43).
    e = f["exact"]
    m = config.num_chains // config.num_groups * config.samples_per_chain
    t0 = math.sqrt(math.log(2.0) / (2 * m))
    ks_bound = t0 + math.sqrt(math.pi / (2 * m)) * special.erfc(math.sqrt(2 * m) * t0)
    assert e["ks_v"] < ks_bound + 4 * e["ks_v_se"], (e, ks_bound)
    w1_bound, _ = integrate.quad(
        lambda x: math.sqrt(2 * stats.norm.cdf(x, 0, a) * stats.norm.sf(x, 0, a) / m),
        -np.inf,
        np.inf,
    )
    assert e["w1_v"] < w1_bound + 4 * e["w1_v_se"], (e, w1_bound)
    # and its moments and tail fractions at their exact values, within 4 SEs
    assert abs(e["mean_v"]) < 4 * e["mean_v_se"], e
    assert abs(e["var_v"] - a**2) < 4 * e["var_v_se"], e
    for field in ("neck", "mouth"):
        assert abs(e[field] - tail) < 4 * e[field + "_se"], (field, e)
    # The ensemble walkers miss the neck v < -a (measured fraction 0.005 +- 0.002 against
    # 0.156 +- 0.009 exactly; their importance-sampled score is biased towards larger v there)
    # and their v-marginal sits far from the exact one (KS 0.51 against 0.05).
    g = f["ensemble"]
    assert g["neck"] + 4 * g["neck_se"] < e["neck"] - 4 * e["neck_se"], f
    assert g["ks_v"] - e["ks_v"] > 4 * math.hypot(g["ks_v_se"], e["ks_v_se"]), f


@pytest.mark.parametrize("sampler", ["mala", "ensemble"])
def test_chains_split_over_8_devices_give_the_1_device_results(
    tmp_path, x64, quick_config, sampler
):
    """16 chains (8 ensembles of 2 walkers) on the 2-D mixture with a small budget, split over 8
    devices against all on one device: each unit runs the same program on its own key, so the
    samples, walk points and evaluation counts agree bitwise."""
    small = dict(
        problems=("mixture_2d",),
        samplers=(sampler,),
        funnel_samplers=("exact",),
        num_chains=16,
        num_groups=2,
        ensemble_size=2,
        budget=64,
        samples_per_chain=4,
        w2_points=8,
    )
    results = {}
    for devices in (1, 8):
        config = quick_config("walk_jump", tmp_path, devices=devices, **small)
        walk_jump.validate(config)
        law = walk_jump.build_problem("mixture_2d", config)
        draws = walk_jump.simulate(sampler, "mixture_2d", law, config, jax.random.key(0))
        results[devices] = jax.device_get(draws)
    one, eight = results[1], results[8]
    assert one.samples.shape == (16, 4, 2) and np.all(np.isfinite(one.samples))
    for name, value in one._asdict().items():
        np.testing.assert_array_equal(getattr(eight, name), value, err_msg=name)


def test_unit_means_average_an_ensemble_first():
    """Per-chain values of dependent walkers are averaged per ensemble before the SE: units
    (1, 1) and (3, 3) give mean 2 and SE std(1, 3) / sqrt(2) = 1."""
    assert walk_jump.unit_mean_and_stderr([1.0, 1.0, 3.0, 3.0], 2) == pytest.approx((2.0, 1.0))
    mean, se = walk_jump.unit_mean_and_stderr([1.0, 1.0, 3.0, 3.0], 1)
    assert (mean, se) == pytest.approx((2.0, math.sqrt(4.0 / 3.0) / 2.0))


def test_exact_w2_and_the_iid_visit_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3))
    assert walk_jump.exact_w2(x, x[rng.permutation(50)]) == pytest.approx(0.0, abs=1e-12)
    shift = np.array([3.0, -4.0, 0.0])
    assert walk_jump.exact_w2(x, x + shift) == pytest.approx(
        5.0, rel=1e-12
    )  # a translation moves every point
    config = config_module.get_config("quick")
    law = walk_jump.build_problem("mixture_2d", config)
    means = np.asarray(law.means)
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert np.min(distances[~np.eye(len(means), dtype=bool)]) == pytest.approx(config.separation)
    # n = 1: the expected fraction of modes visited is q / K
    q = walk_jump.chi2.cdf(config.visit_radius**2 * 2, 2)
    assert walk_jump.iid_modes_visited(law, 1, config.visit_radius) == pytest.approx(q / len(means))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"samplers": ("ula", "hmc")}, r"config\.samplers must be one of"),
        ({"samplers": ()}, r"config\.samplers must name at least one"),
        ({"problems": ("mixture_3d",)}, r"config\.problems must be one of"),
        ({"weights": (1.0,)}, r"config\.weights needs at least two"),
        ({"weights": (0.5, -0.5)}, r"config\.weights must be a positive finite number"),
        ({"sigma": 0.0}, r"config\.sigma must be a positive finite number"),
        ({"budget": 0}, r"config\.budget must be positive integers"),
        ({"budget": 4100}, r"config\.budget must be a multiple of config\.mc_samples"),
        ({"budget": 64}, r"config\.budget=64 is too small"),
        ({"start_mode": 4}, r"config\.start_mode must be a mode index"),
        ({"num_groups": 5}, r"config\.num_groups must divide"),
        ({"w2_points": 4096}, r"config\.w2_points=4096 exceeds"),
        ({"problems": ("mixture_high_dim",), "high_dim": 3}, r"config\.high_dim must be at least"),
        ({"funnel_samplers": ("mala", "walk_jump")}, r"config\.funnel_samplers must be one of"),
        ({"funnel_samplers": ()}, r"config\.funnel_samplers must name at least one"),
        ({"funnel_dim": 1}, r"config\.funnel_dim must be at least 2"),
        ({"funnel_dim": 0}, r"config\.funnel_dim must be positive integers"),
        ({"funnel_scale": -3.0}, r"config\.funnel_scale must be a positive finite number"),
        ({"funnel_sigma": 0.0}, r"config\.funnel_sigma must be a positive finite number"),
        ({"funnel_mala_step_size": 0}, r"config\.funnel_mala_step_size must be a positive"),
        ({"funnel_hmc_step_size": math.inf}, r"config\.funnel_hmc_step_size must be a positive"),
        ({"funnel_leapfrog": 0}, r"config\.funnel_leapfrog must be positive integers"),
        ({"funnel_leapfrog": 4096}, r"config\.budget=4096 is too small for hmc"),
        ({"ensemble_size": 3}, r"config\.ensemble_size must be at least 2 and divide"),
        ({"ensemble_size": 1}, r"config\.ensemble_size must be at least 2 and divide"),
        ({"ensemble_size": True}, r"config\.ensemble_size must be positive integers"),
        ({"devices": 9}, r"config\.devices=9 exceeds the 8 available devices"),
        ({"devices": 8}, r"config\.devices=8 does not divide config\.num_chains / config\.ens"),
        ({"devices": 0}, r"config\.devices must be"),
    ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        walk_jump.run(quick_config("walk_jump", tmp_path, **overrides))
    assert not (tmp_path / "walk_jump").exists()
