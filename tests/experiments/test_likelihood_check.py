"""The likelihood check end to end (quick variant): outputs written, the PF-ODE log-likelihood
equal to the exact log-density up to the exactly computed prior mismatch, the Hutchinson
estimate unbiased within its error bars, and bad configs rejected before anything is written."""

import csv
import json

import jax
import numpy as np
import pytest

from experiments import likelihood_check
from shufflesgd import diffusion


def test_quick_check_agrees_with_the_exact_log_density(tmp_path, x64, capsys, quick_config):
    config = quick_config("likelihood_check", tmp_path)
    metrics = likelihood_check.run(config)
    (run_folder,) = list((tmp_path / "likelihood_check").iterdir())
    for name in ("config.json", "metrics.json", "points.csv", "table.txt", "figure.png"):
        assert (run_folder / name).stat().st_size > 0, name
    saved = json.loads((run_folder / "metrics.json").read_text())
    labels = {"mixture_2d/vp", "mixture_2d/ve", "mixture_high_dim/vp", "mixture_high_dim/ve"}
    assert set(saved["combos"]) == labels and saved["all_checks_passed"]
    assert saved["devices"] == 8  # the 32 probes over the 8 devices
    with (run_folder / "points.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4 * config.num_points
    printed = capsys.readouterr().out
    assert "bits/dim" in printed and "all checks passed: True" in printed

    for label, r in metrics["combos"].items():
        assert r["dim"] == (2 if "2d" in label else config.high_dim)
        assert r["all_solves_succeeded"], label
        # the ODE is off by the prior mismatch only: what is left is the solver's error
        # (measured 6e-6 to 4e-5 nats at rtol = atol = 1e-6)
        assert r["max_abs_solver_error"] <= config.agreement_tol_nats, (label, r)
        assert (
            r["max_abs_ode_minus_exact"] <= r["max_abs_prior_mismatch"] + config.agreement_tol_nats
        ), (label, r)
        assert r["max_abs_prior_mismatch"] > 1e-3, (
            label,
            r,
        )  # the mismatch is real, and accounted for
        # Hutchinson: pooled bias within z_threshold (4) standard errors, SE genuinely nonzero
        assert abs(r["hutchinson_z"]) <= config.z_threshold, (label, r)
        assert r["hutchinson_bias_se"] > 0, (label, r)
        assert 20 < r["nfe_exact_mean"] < 1000 and 20 < r["nfe_hutchinson_mean"] < 1000, (label, r)
        bits = -r["ode_log_prob_mean"] / (r["dim"] * np.log(2.0))
        assert r["bits_per_dim_ode_mean"] == pytest.approx(bits, rel=1e-12)
        assert all(r["checks"].values()), (label, r["checks"])


def test_probes_split_over_8_devices_give_the_1_device_results(tmp_path, x64, quick_config):
    """The Hutchinson solves of 2 points of the 2-D mixture under VP with 8 probes, the probes
    split over 8 devices against all on one device.  Not bitwise: XLA vectorises a batch of 8
    solves and one of 1 differently, so the float64 log-likelihoods (of order 1) differ by
    rounding (4e-15 absolute seen); the tolerance allows 100 times that, far below the
    Hutchinson standard errors (0.1 nats) the check works with.  The step counts agree
    exactly."""
    sde = diffusion.make_sde("vp")
    law = likelihood_check.build_problem("mixture_2d", quick_config("likelihood_check", tmp_path))
    model = diffusion.mixture_model(sde, law.eigen())
    xs = law.sample(jax.random.key(0), 2)
    results = {}
    for devices in (1, 8):
        config = quick_config(
            "likelihood_check", tmp_path, devices=devices, num_points=2, num_probes=8
        )
        likelihood_check.validate(config)
        solves = likelihood_check.hutchinson_solves(jax.random.key(1), model, sde, xs, config)
        results[devices] = jax.device_get(solves)
    one, eight = results[1], results[8]
    assert one.log_prob_nats.shape == (8, 2) and np.all(one.success)
    assert np.std(one.log_prob_nats, axis=0).min() > 0.01  # the probes differ
    np.testing.assert_allclose(eight.log_prob_nats, one.log_prob_nats, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(eight.nfe, one.nfe)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"problems": ["mixture_2d", "bogus"]}, r"config\.problems must be one of"),
        ({"problems": []}, r"config\.problems must name at least one"),
        ({"sdes": ["vp", "edm"]}, r"config\.sdes must be one of"),
        ({"probe": "uniform"}, r"config\.probe must be one of"),
        ({"num_points": 0}, r"config\.num_points must be positive integers"),
        ({"num_probes": 1}, r"config\.num_probes must be at least 2"),
        ({"high_dim": -3}, r"config\.high_dim must be positive integers"),
        ({"rtol": 0.0}, r"config\.rtol must be a positive finite number"),
        ({"atol": -1e-6}, r"config\.atol must be a positive finite number"),
        (
            {"agreement_tol_nats": float("nan")},
            r"config\.agreement_tol_nats must be a positive finite number",
        ),
        ({"z_threshold": 0.0}, r"config\.z_threshold must be a positive finite number"),
        ({"devices": 9}, r"config\.devices=9 exceeds the 8 available devices"),
        ({"devices": 3}, r"config\.devices=3 does not divide config\.num_probes=32"),
        ({"devices": 0}, r"config\.devices must be"),
    ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        likelihood_check.run(quick_config("likelihood_check", tmp_path, **overrides))
    assert not (tmp_path / "likelihood_check").exists()
