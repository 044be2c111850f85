"""The minibatch SGLD/SGHMC bias sweep end to end (quick variant), checked against exact
linear algebra: the coupled exact-gradient chains reproduce the discrete Lyapunov solution,
the with-replacement SGHMC-Euler chains reproduce the with-replacement fixed point (both
within Monte Carlo error), the with-replacement bias grows with the step size, and bad
configs are rejected before anything is written."""

import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sghmc_minibatch as config_module
from experiments import sghmc_minibatch


def test_quick_sweep_matches_the_exact_stationary_laws(tmp_path, x64, capsys, quick_config):
    config = quick_config("sghmc_minibatch", tmp_path)
    metrics = sghmc_minibatch.run(config)
    (run_folder,) = list((tmp_path / "sghmc_minibatch").iterdir())
    for name in ("config.json", "metrics.json", "bias.csv", "table.txt", "figure.png"):
        assert (run_folder / name).stat().st_size > 0, name
    labels = {f"{k}/{s}" for k in config.kernels for s in config.schemes}
    saved = json.loads((run_folder / "metrics.json").read_text())
    assert set(saved["runs"]) == labels and saved["devices"] == 8
    with (run_folder / "bias.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(labels) * len(config.step_fractions)
    printed = capsys.readouterr().out
    assert "fitted orders" in printed and f"bias >= {config.fit_min_snr:g} SE" in printed

    for label, run in metrics["runs"].items():
        for p in run["points"]:
            assert p["second_moment_error_se"] > 0 and p["minibatch_error_se"] > 0, (
                label,
                p["fraction"],
            )
            # the exact-gradient twins against the discrete Lyapunov solution: largest of the
            # 100 entrywise z-scores (55 distinct; under the null the max is ~2.5, measured 1.6-3.3)
            assert p["exact_gradient_twin_max_abs_z"] < 5.0, (label, p["fraction"])
            # the coupling works: the control variate cuts the standard error
            assert p["second_moment_error_se"] < p["naive_second_moment_error_se"], (
                label,
                p["fraction"],
            )

    # with replacement, SGHMC-Euler: simulation vs the exact NumPy fixed point, entrywise and in
    # norm
    exact_run = metrics["runs"]["sghmc_euler/with_replacement"]
    for p in exact_run["points"]:
        assert p["moment_operator_radius"] < 1.0
        assert p["max_abs_z_vs_exact"] < 5.0, p["fraction"]  # 55 entries; measured 1.9-2.5
        assert abs(p["z_vs_exact"]) < 4.0, p["fraction"]
    exact = np.array([p["exact_with_replacement"] for p in exact_run["points"]])
    steps = np.array([p["step_size"] for p in exact_run["points"]])
    assert np.all(np.diff(exact) / np.diff(steps) > 0)  # bias grows with the step size
    assert (
        0.9 < exact_run["orders"]["exact_with_replacement"] < 1.4
    )  # measured 1.09 over c in [0.05, 0.2]

    for kernel in config.kernels:
        wr = metrics["runs"][f"{kernel}/with_replacement"]["points"]
        rr = metrics["runs"][f"{kernel}/random_reshuffle"]["points"]
        # simulated with-replacement bias grows with the step size, each step beyond 4 SE
        for small, large in zip(wr[1:], wr[:-1]):
            gap = large["second_moment_error"] - small["second_moment_error"]
            assert gap > 4 * math.hypot(
                large["second_moment_error_se"], small["second_moment_error_se"]
            ), kernel
        # random reshuffling's bias is below with-replacement's at the smallest step (measured 10x)
        gap = wr[-1]["minibatch_error"] - rr[-1]["minibatch_error"]
        assert gap > 4 * math.hypot(wr[-1]["minibatch_error_se"], rr[-1]["minibatch_error_se"]), (
            kernel
        )


def test_chains_split_over_8_devices_give_the_1_device_results(quick_config, tmp_path, x64):
    """SGHMC-Euler with random reshuffling, 8 chains x 2 step sizes for 3 epochs, run 8 chains
    at a time, each batch split over 8 devices, against all on one device.  Not bitwise: XLA
    vectorises a batch of 8 chains and one of 1 differently, so the float64 chain statistics
    (of order 1) differ by rounding (1e-14 absolute seen); the tolerances allow 100 times that,
    far below the Monte Carlo standard errors (1e-3 and up) the study works with."""
    small = dict(
        num_chains=8, chain_batch=8, burn_in_epochs=1, sample_epochs=2, step_fractions=(0.2, 0.1)
    )
    results = {}
    for devices in (1, 8):
        config = quick_config("sghmc_minibatch", tmp_path, devices=devices, **small)
        sghmc_minibatch.validate(config)
        problem = sghmc_minibatch.build_problem(config)
        gamma = sghmc_minibatch.friction(config, problem.lipschitz)
        steps = sghmc_minibatch.step_sizes("sghmc_euler", config.step_fractions, problem.lipschitz)
        simulate = sghmc_minibatch.make_simulator(
            "sghmc_euler", "random_reshuffle", problem, config
        )
        results[devices] = jax.device_get(
            simulate(jax.random.key(config.seed), jnp.asarray(steps), gamma)
        )
    one, eight = results[1], results[8]
    assert one.moment.shape == (2, 8, problem.dim, problem.dim)
    assert np.all(np.isfinite(one.moment))
    for name, value in one._asdict().items():
        np.testing.assert_allclose(getattr(eight, name), value, rtol=0, atol=1e-12, err_msg=name)


def test_exact_linear_algebra_matches_closed_forms(x64):
    config = config_module.get_config("quick")
    problem = sghmc_minibatch.build_problem(config)
    d, lipschitz = problem.dim, problem.lipschitz
    gamma = sghmc_minibatch.friction(config, lipschitz)
    # whitened design: the posterior precision is L * I
    precision = np.linalg.inv(problem.covariance)
    np.testing.assert_allclose(precision, lipschitz * np.eye(d), rtol=1e-10, atol=1e-10 * lipschitz)
    for c in (0.3, 0.05):
        # ULA on N(m, I/L) with eta = 2c/L: stationary variance 1/(L(1 - eta L/2)), whitened
        # 1/(1 - c)
        (eta,) = sghmc_minibatch.step_sizes("sgld", (c,), lipschitz)
        full = sghmc_minibatch.exact_full_gradient_moment(problem, "sgld", eta, gamma)
        np.testing.assert_allclose(full, np.eye(d) / (1.0 - c), rtol=1e-9, atol=1e-12)
        # BAOAB samples a Gaussian's positions exactly (Leimkuhler & Matthews 2013)
        (h,) = sghmc_minibatch.step_sizes("sghmc_baoab", (c,), lipschitz)
        full = sghmc_minibatch.exact_full_gradient_moment(problem, "sghmc_baoab", h, gamma)
        np.testing.assert_allclose(full, np.eye(d), rtol=1e-9, atol=1e-12)
        # minibatches with replacement only add variance: the fixed point exceeds the full-gradient
        # one
        for kernel in sghmc_minibatch.EXACT_KERNELS:
            (h,) = sghmc_minibatch.step_sizes(kernel, (c,), lipschitz)
            moment, radius = sghmc_minibatch.exact_with_replacement_moment(
                problem, kernel, h, gamma, 34
            )
            full = sghmc_minibatch.exact_full_gradient_moment(problem, kernel, h, gamma)
            assert radius < 1.0
            assert np.linalg.eigvalsh(moment - full).min() > 0, (kernel, c)
            # a full batch drawn with replacement still has noise, but less than a batch of 34
            big, _ = sghmc_minibatch.exact_with_replacement_moment(problem, kernel, h, gamma, 442)
            assert np.linalg.eigvalsh(moment - big).min() > 0, (kernel, c)
    with pytest.raises(ValueError, match="kernel must be one of"):
        sghmc_minibatch.exact_with_replacement_moment(problem, "sghmc_baoab", 1e-3, gamma, 34)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"kernels": ("sgld", "langevin")}, r"config\.kernels must be one of"),
        ({"kernels": ()}, r"config\.kernels must name at least one"),
        ({"schemes": ("with_replacement", "with_replacement")}, r"config\.schemes must not repeat"),
        ({"schemes": ("grab_pair_balance",)}, r"config\.schemes must be one of"),
        ({"step_fractions": (0.1,)}, r"config\.step_fractions needs at least two"),
        ({"step_fractions": (0.1, 1.5)}, r"config\.step_fractions must lie in \(0, 1\)"),
        (
            {"step_fractions": (0.1, -0.05)},
            r"config\.step_fractions must be a positive finite number",
        ),
        ({"batch_size": 32}, r"config\.batch_size must divide the 442 examples"),
        ({"batch_size": 0}, r"config\.batch_size must be positive integers"),
        ({"num_chains": 1}, r"config\.num_chains must be at least 2"),
        ({"fit_points_small": 1}, r"config\.fit_points_small must be at least 2"),
        ({"burn_in_epochs": -1}, r"config\.burn_in_epochs must be a non-negative integer"),
        ({"relative_friction": 0.0}, r"config\.relative_friction must be a positive finite number"),
        (
            {"prior_variance": float("inf")},
            r"config\.prior_variance must be a positive finite number",
        ),
        ({"fit_min_snr": -2.0}, r"config\.fit_min_snr must be a positive finite number"),
        ({"step_fractions": (0.1, 0.1)}, r"config\.step_fractions must be distinct"),
        ({"devices": 9}, r"config\.devices=9 exceeds the 8 available devices"),
        ({"devices": 3}, r"config\.devices=3 does not divide config\.chain_batch=64"),
    ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        sghmc_minibatch.run(quick_config("sghmc_minibatch", tmp_path, **overrides))
    assert not (tmp_path / "sghmc_minibatch").exists()
