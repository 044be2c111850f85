"""The flat-basins study on its ``:quick`` config: outputs written, equal gradient evaluations,
metrics in range, ECE against a hand count, the toy's flat-basin fractions against their
quadrature targets within Monte Carlo error, divergence recorded, bad configs refused."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from experiments import flat_basins
from shufflesgd.nn import data

ROWS = ["sgld", "csgld", "sghmc", "entropy_mcmc", "entropy_mcmc:theta", "entropy_mcmc:guide"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, quick_config):
    """The quick study, run once: ``(config, metrics, run folder)``."""
    tmp_path = tmp_path_factory.mktemp("flat_basins")
    config = quick_config("flat_basins", tmp_path / "results", data_dir=str(tmp_path / "tfds"))
    metrics = flat_basins.run(config)
    (folder,) = list((tmp_path / "results" / "flat_basins").iterdir())
    return config, metrics, folder


def test_writes_every_output(study):
    config, _, folder = study
    for name in ("config.json", "metrics.json", "results.csv", "table.txt", "figure.png"):
        assert (folder / name).stat().st_size > 0, name
    saved = json.loads((folder / "metrics.json").read_text())
    assert list(saved["rows"]) == ROWS and "figure_error" not in saved
    for row, result in saved["rows"].items():
        assert result["first_nonfinite_step"] == [None] * config.num_seeds, row
        assert ("vs_sgld" in result) == (row != "sgld")
    assert len((folder / "results.csv").read_text().splitlines()) == 1 + len(ROWS)
    table = (folder / "table.txt").read_text()
    assert all(row in table for row in ROWS) and "quadrature" in table


def test_equal_gradient_evaluations(study):
    config, metrics, _ = study
    steps = config.num_epochs * (data.DIGITS_NUM_TRAIN // config.batch_size)
    for row, result in metrics["rows"].items():
        # one gradient a step for every kernel: the sum of info.num_grad_evals
        assert result["grad_evals_per_seed"] == [steps] * config.num_seeds, row
    kept = len(flat_basins.kept_epochs(config))
    assert metrics["rows"]["sgld"]["num_draws"] == kept
    assert metrics["rows"]["entropy_mcmc"]["num_draws"] == 2 * kept  # theta and theta_a pooled
    assert 0 < metrics["rows"]["csgld"]["num_draws"] < kept  # sampling stages only


def test_metrics_are_in_range(study):
    _, metrics, _ = study
    # chance is 0.1; 4 binomial standard errors above it on the 261 test images
    above_chance = 0.1 + 4 * math.sqrt(0.1 * 0.9 / 261)
    for row, result in metrics["rows"].items():
        assert result["test_accuracy"]["mean"] > above_chance, row
        assert 0.0 <= result["ece"]["mean"] <= 1.0, row
        assert 0.0 < result["test_nll"]["mean"] < math.log(10), row  # better than uniform
        assert math.isfinite(result["flatness"]["mean"]) and result["flatness"]["mean"] > 0, row
    # paired differences: their mean is the difference of the means
    for row in ROWS[1:]:
        for name in flat_basins.METRICS:
            diff = metrics["rows"][row]["vs_sgld"][name]["mean"]
            plain = metrics["rows"][row][name]["mean"] - metrics["rows"]["sgld"][name]["mean"]
            assert diff == pytest.approx(plain, abs=1e-12), (row, name)


def test_expected_calibration_error_by_hand():
    # bins (0.6, 0.667] and (0.933, 1]: confidences 0.65 (1 of 2 right) and 0.95 (2 of 2)
    probs = np.zeros((4, 10))
    probs[:2, 3], probs[:2, 0] = 0.65, 0.35
    probs[2:, 7], probs[2:, 0] = 0.95, 0.05
    labels = np.array([3, 1, 7, 7])
    expected = 0.5 * abs(0.5 - 0.65) + 0.5 * abs(1.0 - 0.95)
    assert flat_basins.expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert flat_basins.expected_calibration_error(probs[2:], labels[2:]) == pytest.approx(0.05)


def test_toy_fractions_match_the_quadrature_targets(study):
    config, metrics, _ = study
    toy = metrics["toy"]
    # the targets by quadrature against the closed form: sum_k w_k P(N(mu_k, s_k^2 + eta) > b)
    b, weights, means = toy["boundary"], np.array(toy["weights"]), np.array(toy["means"])
    variances = np.array(toy["stds"]) ** 2
    for smoothing, key in ((0.0, "basin_mass_pi"), (config.toy_coupling, "basin_mass_smoothed")):
        closed = np.sum(weights * stats.norm.sf(b, means, np.sqrt(variances + smoothing)))
        assert toy[key] == pytest.approx(closed, abs=1e-8), key
    # b is the density's minimum between the modes
    pdf = lambda x: np.sum(weights * stats.norm.pdf(x, means, np.sqrt(variances)))  # noqa: E731
    assert pdf(b) < min(pdf(b - 1e-3), pdf(b + 1e-3))
    for name, sampler in toy["samplers"].items():
        fraction = sampler["flat_fraction"]
        # independent chains: 4 Monte Carlo standard errors
        assert abs(fraction["mean"] - sampler["target_value"]) < 4 * fraction["stderr"], name
    # and the test can tell the two targets apart
    guide = toy["samplers"]["entropy_mcmc:guide"]["flat_fraction"]
    assert toy["basin_mass_smoothed"] - toy["basin_mass_pi"] > 8 * guide["stderr"]


def test_divergence_is_recorded_not_raised(study, tmp_path):
    config, _, _ = study
    train, _ = data.scaled_digits(config.data_dir)
    wild = config.copy_and_resolve_references()
    wild.num_epochs, wild.burn_in_epochs, wild.csgld_cycles = 1, 0, 1
    wild.step_size.sgld = 1e30  # the first step overflows the prior's pull
    chain = flat_basins.run_seeds(wild, "sgld", train)
    steps = flat_basins.first_nonfinite(np.asarray(chain.is_finite))
    assert all(s is not None and 0 <= s < 12 for s in steps), steps
    probs = np.full((2, 1, 3, 10), 0.1)
    probs[1, 0, 0] = np.nan
    fake = flat_basins.DrawStats(probs, np.zeros((2, 1)), np.zeros((2, 1)))
    values = flat_basins.averaged_metrics(fake, np.ones((2, 1), bool), np.array([0, 1, 2]))
    assert math.isfinite(values["test_nll"][0]) and math.isnan(values["test_nll"][1])
    assert flat_basins.summarise(values["test_nll"]) == {"mean": None, "stderr": None}


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"methods": ("csgld", "sghmc")}, "config.methods must include 'sgld'"),
        ({"methods": ("sgld", "bogus")}, "config.methods must be one of"),
        ({"batch_size": 100}, "config.batch_size must divide the 1536"),
        ({"burn_in_epochs": 8}, "config.burn_in_epochs must be less than"),
        ({"num_seeds": 1}, "config.num_seeds must be at least 2"),
        ({"coupling": 1e-5}, "config.step_size.entropy_mcmc must be below config.coupling"),
        ({"csgld_cycles": 3}, "config.csgld_cycles must divide config.num_epochs"),
        ({"csgld_exploration": 1.0}, r"config.csgld_exploration must lie in \[0, 1\)"),
        ({"toy_flat_weight": 1.0}, r"config.toy_flat_weight must lie in \(0, 1\)"),
        ({"toy_stds": (1.0, 0.5)}, "config.toy_stds must be"),
        ({"toy_means": (0.0,)}, "config.toy_means must be two numbers"),
        ({"toy_means": (-0.1, 0.1)}, "give no valley between the two modes"),
        ({"toy_burn_in": 8000}, "config.toy_burn_in must be less than"),
        ({"perturbation_std": -0.1}, "config.perturbation_std must be a positive"),
        ({"hidden": (16, 0)}, "config.hidden must be positive integers"),
        ({"devices": 3}, "config.devices=3 does not divide config.num_seeds"),
    ],
)
def test_bad_config_fails_before_anything_runs(tmp_path, overrides, match, quick_config):
    data_dir = tmp_path / "tfds"
    config = quick_config("flat_basins", tmp_path / "results", data_dir=str(data_dir))
    config.update(overrides)
    with pytest.raises(ValueError, match=match):
        flat_basins.run(config)
    assert not (tmp_path / "results").exists() and not data_dir.exists()


def test_missing_step_size_fails(tmp_path, quick_config):
    config = quick_config("flat_basins", tmp_path / "results")
    config.step_size.sghmc = 0.0
    with pytest.raises(ValueError, match="config.step_size.sghmc must be a positive"):
        flat_basins.validate(config)
