"""Beznosikov et al. (2020) Example 1 end to end: compressed GD grows at the closed-form
rate and overflows at the predicted step; EF14 and EF21 converge; bad configs fail early."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ef_divergence


def test_quick_study_diverges_at_the_closed_form_rate_where_ef_converges(
    tmp_path, x64, capsys, quick_config
):
    config = quick_config("ef_divergence", tmp_path)
    metrics = ef_divergence.run(config)
    (run_folder,) = list((tmp_path / "ef_divergence").iterdir())
    for name in (
        "config.json",
        "metrics.json",
        "norms.csv",
        "curves.csv",
        "table.txt",
        "figure.png",
    ):
        assert (run_folder / name).stat().st_size > 0, name
    saved = json.loads((run_folder / "metrics.json").read_text())
    assert set(saved["methods"]) == {"compressed_gd", "ef14", "ef21"}
    assert saved["devices"] == 1  # one seed
    printed = capsys.readouterr().out
    assert "diverged_step" in printed and "closed form" in printed

    gd = metrics["methods"]["compressed_gd"]
    steps = config.num_steps
    for j, gamma in enumerate(metrics["step_sizes"]):
        rho = 1 + gamma * (6 * config.c**2 - 1) / 3
        assert gd["growth_closed_form"][j] == pytest.approx(rho, rel=1e-15)
        # measured per step (geometric mean and every single step) against the closed form
        assert gd["growth_rel_err"][j] < 1e-6, gd
        assert gd["growth_max_step_rel_dev"][j] < 1e-6, gd
        assert gd["growth_steps_used"][j] > 1000
    # gamma_EF21: no overflow in T steps, and the exact final iterate is rho^T x0
    assert gd["diverged_step"][0] == -1 == gd["predicted_diverged_step"][0]
    assert gd["final_norm_ratio"][0] == pytest.approx(
        gd["growth_closed_form"][0] ** steps, rel=1e-8
    )
    # 8 gamma_EF21: ||grad f||^2 overflows within T steps, at the step the closed form predicts
    step = gd["diverged_step"][1]
    assert 0 <= step < steps and abs(step - gd["predicted_diverged_step"][1]) <= 1, gd
    assert gd["energy_ratio"][str(steps)][1] is None  # not finite

    for name in ("ef14", "ef21"):
        result = metrics["methods"][name]
        assert result["diverged_step"] == [-1, -1], (name, result)
        assert all(r < 1e-6 for r in result["final_norm_ratio"]), (name, result)


def test_seeds_split_over_8_devices_give_the_1_device_results(tmp_path, x64, quick_config):
    """EF14 for 8 seeds (300 steps) at a step size where it converges and one where it
    overflows, the seeds split over 8 devices against all on one device: every seed's run is
    the same arithmetic, and the results come out bitwise equal.  (The quick study itself has
    one seed: Top-1 is deterministic.)"""
    results = {}
    small = dict(num_seeds=8, num_steps=300, checkpoints=(10,))
    for devices in (1, 8):
        config = quick_config("ef_divergence", tmp_path, devices=devices, **small)
        ef_divergence.validate(config)
        problem = ef_divergence.build_problem(config.c)
        step_sizes = jnp.asarray([0.01, 0.4])
        x0 = jnp.full((3,), config.t0)
        results[devices] = ef_divergence.sweep_method(problem, "ef14", step_sizes, x0, config)
    one, eight = results[1], results[8]
    assert one.suboptimality.shape == (8, 2, 300)
    assert np.all(one.diverged_step == [-1, 251])  # measured: 0.4 overflows at step 251
    for name in ("suboptimality", "grad_norm_sq", "params", "diverged_step"):
        np.testing.assert_array_equal(getattr(eight, name), getattr(one, name), err_msg=name)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"c": 1.0}, r"config\.c must be a finite number > 1"),
        ({"t0": 0.0}, r"config\.t0 must be finite and nonzero"),
        ({"methods": ["ef21", "bogus"]}, r"config\.methods must be one of"),
        ({"methods": ["ef21", "ef21"]}, r"config\.methods must not repeat"),
        (
            {"step_size_multiples": [1.0, -2.0]},
            r"config\.step_size_multiples must be finite positive",
        ),
        (
            {"step_size_multiples": [1.0, math.inf]},
            r"config\.step_size_multiples must be finite positive",
        ),
        ({"num_steps": 0}, r"config\.num_steps must be positive integers"),
        ({"num_seeds": 0}, r"config\.num_seeds must be positive integers"),
        ({"checkpoints": [100, 10]}, r"config\.checkpoints must increase strictly"),
        ({"checkpoints": [10, 5000]}, r"config\.checkpoints must increase strictly and stay below"),
        ({"seed": -1}, r"config\.seed must be a non-negative int"),
        ({"devices": 9}, r"config\.devices=9 exceeds the 8 available devices"),
        ({"devices": 2}, r"config\.devices=2 does not divide config\.num_seeds=1"),
    ],
)
def test_bad_config_fails_before_anything_runs(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        ef_divergence.run(quick_config("ef_divergence", tmp_path, **overrides))
    assert not (tmp_path / "ef_divergence").exists()


def test_predicted_overflow_step_matches_float_limits():
    """The closed-form prediction: the first s with 3 (lambda t0 rho^(s+1))^2 > max float."""
    c, t0, gamma = 1.1, 1.0, 0.03
    step = ef_divergence.predicted_diverged_step(c, t0, gamma, 10**6, np.float64)
    lam, rho = 2 * c**2 / 3 + 1, ef_divergence.closed_form_growth(c, gamma)

    def log_sq_norm(s):
        return math.log(3) + 2 * math.log(lam * t0) + 2 * (s + 1) * math.log(rho)

    limit = math.log(np.finfo(np.float64).max)
    assert log_sq_norm(step) > limit > log_sq_norm(step - 1)
    assert ef_divergence.predicted_diverged_step(c, t0, gamma, step, np.float64) == -1
