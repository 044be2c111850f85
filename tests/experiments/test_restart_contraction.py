"""experiments/restart_contraction.py on its :quick config: with a score that is wrong only at
high noise, Restart's mode-weight error is below both the ODE's and the SDE's at equal NFE."""

import contextlib
import io
import json
import math

import jax
import numpy as np
import pytest

from experiments import restart_contraction


@pytest.fixture(scope="module")
def study(tmp_path_factory, quick_config):
    """The quick study, run once on the default devices (6 of the 8, which split its 6 seeds):
    ``(metrics, run folder, printed output)``."""
    previous = jax.config.jax_enable_x64
    tmp_path = tmp_path_factory.mktemp("restart_contraction")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = restart_contraction.run(quick_config("restart_contraction", tmp_path))
    (folder,) = list((tmp_path / "restart_contraction").iterdir())
    yield metrics, folder, printed.getvalue()
    jax.config.update("jax_enable_x64", previous)


def test_restart_contracts_the_high_noise_error_at_equal_nfe(study):
    metrics, folder, printed = study
    for name in ("config.json", "metrics.json", "tv.csv", "table.txt", "figure.png"):
        assert (folder / name).stat().st_size > 0, name
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["rows"] == metrics["rows"] and saved["devices"] == 6
    assert "mode-weight TV" in printed
    rows = {(r["sampler"], r["budget"]): r for r in metrics["rows"]}
    for budget in (30, 60):
        heun, em, restart = (
            rows[(name, budget)] for name in ("pf_ode_heun", "euler_maruyama", "restart_K4")
        )
        assert heun["nfe"] == em["nfe"] == restart["nfe"] == budget + 1  # + the final denoise
        for other in (heun, em):
            gap = other["tv_mean"] - restart["tv_mean"]
            assert gap > 4 * math.hypot(other["tv_se"], restart["tv_se"]), (budget, other, restart)
        # the ODE keeps the error of the wrong high-noise score: far above the sampling floor
        assert heun["tv_mean"] > 4 * metrics["multinomial_tv_floor"]


def test_seeds_split_over_6_devices_give_the_1_device_results(study, x64, quick_config, tmp_path):
    """PF-ODE Heun at the smallest budget rerun with every seed on one device, against the
    study's run with its 6 seeds on 6 devices: each seed is the same arithmetic, and the
    per-seed TVs come out bitwise equal."""
    metrics, _, _ = study
    config = quick_config("restart_contraction", tmp_path, devices=1)
    restart_contraction.validate(config)
    true, model, sde = restart_contraction.build(config)
    budget = min(config.nfe_budgets)
    sampler, grid, options = restart_contraction.runs(config, sde, budget)["pf_ode_heun"]
    tvs, nfes = restart_contraction.mode_errors(config, true, model, sde, sampler, grid, options)
    assert len(tvs.sharding.device_set) == 1
    (row,) = [r for r in metrics["rows"] if (r["sampler"], r["budget"]) == ("pf_ode_heun", budget)]
    np.testing.assert_array_equal(np.asarray(tvs), np.asarray(row["tv_per_seed"]))
    assert int(nfes[0]) == row["nfe"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"weights": (0.5, 0.6)}, "config.weights"),
        (
            {"restart_t_max": 0.7},
            "config.restart_t_min < config.restart_t_max <= config.error_above",
        ),
        ({"error_above": 1.5}, "config.error_above"),
        ({"nfe_budgets": (10,)}, "config.nfe_budgets must be at least"),
        ({"num_seeds": 1}, "config.num_seeds"),
        ({"restart_ks": (0,)}, "config.restart_ks"),
        ({"devices": 9}, "config.devices=9 exceeds the 8 available devices"),
        ({"devices": 4}, "config.devices=4 does not divide config.num_seeds=6"),
    ],
)
def test_bad_config_is_rejected_before_anything_runs(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        restart_contraction.run(quick_config("restart_contraction", tmp_path, **overrides))
    assert not (tmp_path / "restart_contraction").exists()
