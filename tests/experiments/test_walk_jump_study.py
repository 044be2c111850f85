"""The walk–jump tunnelling study end to end (quick variant): equal budgets as counted from the
kernels' infos, Langevin chains stuck in their starting mode while walk–jump visits the others,
the exact references at their known values, outputs written, bad configs rejected first.

(Named ``test_walk_jump_study`` so as not to clash with the library's
``tests/test_walk_jump.py``.)"""

import csv
import json
import math

import numpy as np
import pytest

from configs import walk_jump as config_module
from experiments import walk_jump


def test_quick_study_tunnels_with_walk_jump_at_an_equal_budget(tmp_path, x64, capsys, quick_config):
    config = quick_config("walk_jump", tmp_path)
    metrics = walk_jump.run(config)
    (folder,) = list((tmp_path / "walk_jump").iterdir())
    for name in ("config.json", "metrics.json", "samplers.csv", "table.txt", "figure.png"):
        assert (folder / name).stat().st_size > 0, name
    assert json.loads((folder / "metrics.json").read_text())["problems"].keys() == {"mixture_2d"}
    with (folder / "samplers.csv").open() as handle:
        assert [row["sampler"] for row in csv.DictReader(handle)] == list(config.samplers)
    assert "modes visited" in capsys.readouterr().out

    r = metrics["problems"]["mixture_2d"]["samplers"]
    k = len(config.weights)
    # 1. Equal budgets, summed per chain from info.num_grad_evals (not from the plan): every chain
    # of every budgeted sampler spends exactly `budget`, the chain of chains up to less than one
    # run.
    for name, row in r.items():
        if name in walk_jump.REFERENCES:
            assert row["evals_max"] == 0, (name, row)
            continue
        assert row["evals_min"] == row["evals_max"], (name, row)
        assert row["unit"] == ("density" if name in walk_jump.DENSITY_SAMPLERS else "gradient"), (
            name,
            row,
        )
        if name == "chain_of_chains":
            run_cost = config.num_measurements * config.steps_per_measurement + 1
            assert config.budget - run_cost < row["evals_max"] <= config.budget, row
        else:
            assert row["evals_max"] == config.budget, (name, row)

    # 2. Tunnelling (measured: ULA and MALA 0.250 +- 0 -- every chain stays in its starting mode,
    # 16 component SDs from the next -- walk-jump 0.95 +- 0.02).  Margin: 0.3 beyond 4 SEs each.
    for name in ("ula", "mala"):
        assert r[name]["modes_visited"] == pytest.approx(1.0 / k), (name, r[name])
        # all mass in the start mode: TV error 1 - w_start exactly
        assert r[name]["weight_tv"] == pytest.approx(
            1.0 - config.weights[config.start_mode], abs=1e-9
        ), r[name]
        assert (
            r[name]["modes_visited"] + 4 * r[name]["modes_visited_se"] + 0.3
            < r["walk_jump"]["modes_visited"] - 4 * r["walk_jump"]["modes_visited_se"]
        ), r
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
    assert "w2_walk" in r["walk_jump"] and "w2_walk" not in r["ula"]


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
    ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        walk_jump.run(quick_config("walk_jump", tmp_path, **overrides))
    assert not (tmp_path / "walk_jump").exists()
