"""The sampler-vs-NFE study end to end (quick variant): outputs written, the prior-mismatch floor
equal to an independent closed form, exact KLs decreasing in NFE with the first and second orders
of Euler and Heun, one table entry recomputed from the library, the log-SNR grid ahead of uniform
time at low NFE, equal NFE on the mixtures, the metric helpers against direct computations, and
bad configs rejected before anything is written."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sampler_nfe as config_module
from experiments import sampler_nfe
from shufflesgd import diffusion, metrics


def independent_floor(config):
    """KL(N(0, I) || N(alpha_T mu, alpha_T^2 Sigma + sigma_T^2 I)) for VP in NumPy, through the
    eigenvalues of the target covariance (no library KL)."""
    law = sampler_nfe.build_gaussian(config)
    mu, cov = np.asarray(law.means[0]), np.asarray(law.covariances[0])
    log_alpha = -0.5 * (0.5 * (20.0 - 0.1) + 0.1)  # VP, beta in [0.1, 20], t = 1
    a2 = np.exp(2.0 * log_alpha)
    c = np.linalg.eigvalsh(a2 * cov + (1.0 - a2) * np.eye(len(mu)))
    quad = a2 * mu @ np.linalg.solve(a2 * cov + (1.0 - a2) * np.eye(len(mu)), mu)
    return 0.5 * (np.sum(1.0 / c) + quad - len(mu) + np.sum(np.log(c)))


def test_quick_study_measures_orders_floor_and_equal_nfe(tmp_path, x64, capsys, quick_config):
    config = quick_config("sampler_nfe", tmp_path)
    result = sampler_nfe.run(config)
    (run_folder,) = list((tmp_path / "sampler_nfe").iterdir())
    for name in (
        "config.json",
        "metrics.json",
        "gaussian_kl.csv",
        "mixtures.csv",
        "table.txt",
        "figure.png",
    ):
        assert (run_folder / name).stat().st_size > 0, name
    saved = json.loads((run_folder / "metrics.json").read_text())
    assert set(saved["gaussian"]["samplers"]) == set(config.gaussian_samplers)
    assert set(saved["mixtures"]) == set(config.mixtures)
    with (run_folder / "gaussian_kl.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(config.gaussian_samplers) * len(
            config.grids
        ) * len(config.nfe_budgets)
    with (run_folder / "mixtures.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(config.mixtures) * (
            1 + len(config.mixture_samplers) * len(config.mixture_nfe_budgets)
        )

    # the floor KL(prior || p_T), against a closed form written out here, and printed
    g = result["gaussian"]
    floor = independent_floor(config)
    assert g["floor_kl"] == pytest.approx(floor, rel=1e-9)
    printed = capsys.readouterr().out
    assert f"KL(prior || p_T) = {floor:.4e} nats" in printed and "order" in printed

    budgets = config.nfe_budgets
    for name, r in g["samplers"].items():
        for grid, v in r["grids"].items():
            # the most steps that fit: nfe <= budget < nfe + one more step's evaluations
            assert all(0 < n <= b < n + r["nfe_per_step"] for n, b in zip(v["nfe"], budgets)), (
                name,
                grid,
                v,
            )
            assert np.all(np.diff(v["kl"]) < 0), (name, grid, v["kl"])  # more NFE, smaller KL
    assert (
        g["samplers"]["pf_ode_heun"]["nfe_per_step"] == 2
        and g["samplers"]["pf_ode_euler"]["nfe_per_step"] == 1
    )

    # Orders from the exact laws (deterministic; measured: Euler 1.01 / 1.14, Euler-Maruyama 1.12 on
    # the log-SNR grid, Heun 2.19 on it over NFE 10-40, before the floor)
    orders = {
        (name, grid): v["order"]
        for name, r in g["samplers"].items()
        for grid, v in r["grids"].items()
    }
    assert abs(orders["pf_ode_euler", "uniform_time"] - 1.0) < 0.25, orders
    assert abs(orders["pf_ode_euler", "uniform_log_snr"] - 1.0) < 0.25, orders
    assert abs(orders["euler_maruyama", "uniform_log_snr"] - 1.0) < 0.25, orders
    assert abs(orders["pf_ode_heun", "uniform_log_snr"] - 2.0) < 0.35, orders
    heun = g["samplers"]["pf_ode_heun"]["grids"]["uniform_log_snr"]
    assert heun["fit_nfe"] == [10, 20, 40] and heun["kl"][-1] >= config.floor_factor * floor

    # one entry recomputed from the library: Heun, 10 steps (NFE 20), log-SNR grid
    sde = diffusion.make_sde("vp")
    law = sampler_nfe.build_gaussian(config)
    target = law.diffuse(sde.alpha(sde.t_min), sde.sigma(sde.t_min))
    model = diffusion.Model(lambda x, t: law.diffuse(sde.alpha(t), sde.sigma(t)).score(x), "score")
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_log_snr", 10))
    mean, cov = jax.jit(
        lambda g: diffusion.exact_gaussian_law(
            diffusion.pf_ode_heun, model, sde, g, law.dim, 1, final="none"
        )
    )(grid)
    kl = float(metrics.gaussian_kl(mean, cov, target.means[0], target.covariances[0]))
    assert heun["steps"][1] == 10 and heun["nfe"][1] == 20
    assert heun["kl"][1] == pytest.approx(kl, rel=1e-8)

    # VP at low NFE: the log-SNR grid far ahead of uniform time (measured ratios 2.0 to 70 at
    # NFE 10)
    ratios = result["grid_ratio_uniform_time_over_log_snr"]
    assert all(ratios[name][0] > 1.5 for name in config.gaussian_samplers), ratios

    # the best sampler at each budget <= 10 is the lowest KL of its column (quick: Heun at NFE 10
    # takes 5 steps, Euler 10: measured best pf_ode_heun on both grids)
    for grid in config.grids:
        column = {name: r["grids"][grid]["kl"][0] for name, r in g["samplers"].items()}
        best = result["best_at_low_nfe"][grid]
        assert list(best) == ["10"] and best["10"]["sampler"] == min(column, key=column.get)
        assert best["10"]["kl"] == column[best["10"]["sampler"]]
    assert "best sampler (lowest exact KL) at each NFE budget <= 10" in printed

    # Part B: every sampler at exactly the budget (Restart: 2 (12 + 2 * 4) = 40), finite result,
    # mode weights near the truth (the exact draws' multinomial error is about 0.03 to 0.05)
    for problem, entry in result["mixtures"].items():
        assert entry["dim"] == (2 if problem == "mixture_2d" else config.high_dim)
        for name, per_budget in entry["samplers"].items():
            r = per_budget["40"]
            assert r["nfe"] == 40 and r["nonfinite_samples"] == 0, (problem, name, r)
            assert r["steps"] == {"euler_maruyama": 40, "pf_ode_heun": 20, "restart": 12}[name]
            for m in ("sliced_w2", "mmd2", "mode_weight_error"):
                assert np.isfinite(r[m]["mean"]) and r[m]["se"] > 0, (problem, name, m, r)
            assert r["mode_weight_error"]["mean"] < 0.15, (problem, name, r)
        assert entry["exact"]["mode_weight_error"]["mean"] < 0.15, (problem, entry["exact"])


def test_order_fit_leaves_out_the_floor_and_keeps_the_largest_budgets():
    """KL = floor + N^-4 (second order): the points within floor_factor of the floor are left out,
    of the rest the fit_points largest budgets are kept, and the order is -slope / 2."""
    config = config_module.get_config("quick")
    config.floor_factor, config.fit_points = 10.0, 3
    nfe = [5, 10, 20, 40, 80, 160]
    floor = 1e-6
    kl = [floor + 100.0 * n**-4.0 for n in nfe]  # 0.16, 1e-2, 6e-4, 4e-5, 3.5e-6, 1.2e-6
    fit = sampler_nfe.fit_order(nfe, kl, floor, config)
    assert fit["fit_nfe"] == [10, 20, 40]
    assert fit["order"] == pytest.approx(2.0, abs=0.02) and fit["slope"] == pytest.approx(
        -2 * fit["order"]
    )
    assert np.isnan(
        sampler_nfe.fit_order(nfe[:2], [kl[0], floor], floor, config)["order"]
    )  # one point left
    np.testing.assert_allclose(
        sampler_nfe.local_orders([10, 20, -1], [1.0, 0.25, np.nan]), [1.0, np.nan]
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"sde": "bogus"}, r"config\.sde must be one of"),
        ({"grids": ("uniform_time", "cosine")}, r"config\.grids must be one of"),
        ({"grids": ()}, r"config\.grids must name at least one"),
        (
            {"gaussian_samplers": ("pf_ode_heun", "predictor_corrector")},
            r"config\.gaussian_samplers must be one of",
        ),
        (
            {"gaussian_samplers": ("pf_ode_heun", "pf_ode_heun")},
            r"config\.gaussian_samplers must not repeat",
        ),
        ({"mixture_samplers": ("pf_ode_adaptive",)}, r"config\.mixture_samplers must be one of"),
        ({"mixtures": ("mixture_3d",)}, r"config\.mixtures must be one of"),
        ({"mixture_grid": "linear"}, r"config\.mixture_grid must be one of"),
        ({"nfe_budgets": (10,)}, r"config\.nfe_budgets must be at least 2 strictly increasing"),
        ({"nfe_budgets": (20, 10)}, r"config\.nfe_budgets must be at least 2 strictly increasing"),
        (
            {"mixture_nfe_budgets": (0, 40)},
            r"config\.mixture_nfe_budgets must be positive integers",
        ),
        ({"num_seeds": 1}, r"config\.num_seeds must be at least 2"),
        ({"fit_points": 1}, r"config\.fit_points must be at least 2"),
        ({"num_samples": 0}, r"config\.num_samples must be positive integers"),
        ({"floor_factor": 1.0}, r"config\.floor_factor must exceed 1"),
        ({"gaussian_var_min": 0.0}, r"config\.gaussian_var_min must be a positive finite number"),
        (
            {"gaussian_var_max": 0.001},
            r"config\.gaussian_var_max must be >= config\.gaussian_var_min",
        ),
        ({"restart_t_min": 0.5}, r"config\.restart_t_min and config\.restart_t_max must satisfy"),
        ({"pc_snr": float("nan")}, r"config\.pc_snr must be a positive finite number"),
        ({"seed": -1}, r"config\.seed must be a non-negative integer"),
    ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        sampler_nfe.run(quick_config("sampler_nfe", tmp_path, **overrides))
    assert not (tmp_path / "sampler_nfe").exists()


@pytest.mark.parametrize("variant", ["full", "flow"])
def test_full_and_flow_configs_are_valid(variant):
    """The full study's sampler labels (UniP / UniPC variants among them) name registered
    samplers with options they take, on VP and on the rectified flow."""
    config = config_module.get_config(variant)
    sampler_nfe.validate(config)
    assert config.sde == ("flow" if variant == "flow" else "vp")
    assert {"unipc", "unipc(order=3)", "unipc(corrector=False)"} <= set(config.gaussian_samplers)


def test_dpm_solver_v3_runs_with_the_gaussians_exact_statistics(x64, quick_config, tmp_path):
    """Part A hands DPM-Solver-v3 the exact model statistics of its Gaussian: at NFE 10 far
    below DPM-Solver++(3M) (measured 1.1e-3 against 3.0e-2), at NFE 20 at the prior-mismatch
    floor (2.3e-4; 3M 4.6e-4)."""

    class Bar:
        def update(self):
            pass

    config = quick_config(
        "sampler_nfe",
        tmp_path,
        gaussian_samplers=("dpm_solver_pp_3m", "dpm_solver_v3"),
        grids=("uniform_log_snr",),
        nfe_budgets=(10, 20),
    )
    sampler_nfe.validate(config)
    result = sampler_nfe.run_gaussian(config, diffusion.make_sde("vp"), Bar())
    kl = {name: r["grids"]["uniform_log_snr"]["kl"] for name, r in result["samplers"].items()}
    assert kl["dpm_solver_v3"][0] < 0.1 * kl["dpm_solver_pp_3m"][0], kl
    assert kl["dpm_solver_v3"][1] < 1.5 * result["floor_kl"] < kl["dpm_solver_pp_3m"][1], kl
