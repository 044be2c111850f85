"""experiments/restart_contraction.py on its :quick config: with a score that is wrong only at
high noise, Restart's mode-weight error is below both the ODE's and the SDE's at equal NFE."""

import json
import math

import pytest

from experiments import restart_contraction


def test_restart_contracts_the_high_noise_error_at_equal_nfe(tmp_path, x64, capsys, quick_config):
    metrics = restart_contraction.run(quick_config("restart_contraction", tmp_path))
    (folder,) = list((tmp_path / "restart_contraction").iterdir())
    for name in ("config.json", "metrics.json", "tv.csv", "table.txt", "figure.png"):
        assert (folder / name).stat().st_size > 0, name
    assert json.loads((folder / "metrics.json").read_text())["rows"] == metrics["rows"]
    assert "mode-weight TV" in capsys.readouterr().out
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
    ],
)
def test_bad_config_is_rejected_before_anything_runs(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        restart_contraction.run(quick_config("restart_contraction", tmp_path, **overrides))
    assert not (tmp_path / "restart_contraction").exists()
