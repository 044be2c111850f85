"""experiments/composition.py on its :quick config: FK correctors reach the product of experts
and an annealed target that the naive composed scores miss, the Itô density error falls with
the steps, SuperDiff's OR samples the mixture and its AND keeps the experts' exact
log-densities far closer than the score average (without sampling the product); the
closed-form product of two Gaussian mixtures against its pointwise identity and quadrature."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from experiments import composition
from shufflesgd import diffusion, problems


def margin(*standard_errors):
    """Four combined standard errors."""
    return 4 * math.hypot(*standard_errors)


def closes_the_gap(row, name):
    """FK below the naive baseline by four combined standard errors, and within a margin of the
    exact-vs-exact floor: its excess over the floor under a quarter of the naive baseline's,
    plus four combined standard errors."""
    fk, naive, exact = (row[f"{role}_{name}"] for role in composition.ROLES)
    fk_se, naive_se, exact_se = (row[f"{role}_{name}_se"] for role in composition.ROLES)
    below = fk + margin(fk_se, naive_se) < naive
    return below and fk - exact < 0.25 * (naive - exact) + margin(fk_se, exact_se)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, quick_config):
    folder = tmp_path_factory.mktemp("composition")
    return folder, composition.run(quick_config("composition", folder))


def test_quick_run_writes_every_output(quick, capsys):
    folder, metrics = quick
    (run_folder,) = list((folder / "composition").iterdir())
    for name in (
        "config.json",
        "metrics.json",
        "product.csv",
        "anneal.csv",
        "ito.csv",
        "superdiff.csv",
        "table.txt",
        "figure.png",
    ):
        assert (run_folder / name).stat().st_size > 0, name
    assert "figure_error" not in metrics
    saved = json.loads((run_folder / "metrics.json").read_text())
    assert saved["product"] == metrics["product"]
    assert saved["devices"] == 8  # gcd(64 systems, 512 paths, 1024 samples) over the 8 devices
    assert "SuperDiff" in (run_folder / "table.txt").read_text()


def test_fk_reaches_the_product_that_the_summed_score_misses(quick):
    _, metrics = quick
    check = metrics["product"]["product_check"]
    assert abs(check["log_normaliser"] - check["log_normaliser_quadrature"]) < 1e-4
    assert check["max_log_density_error"] < 1e-3
    rows = metrics["product"]["rows"]
    largest = max(rows, key=lambda r: r["particles"])
    assert largest["evaluations"] == 2 * 100 and largest["nonfinite_systems"] == 0
    assert 0 < largest["fk_min_ess"] < largest["particles"] and largest["fk_resamplings"] >= 1
    for name in ("pooled_w2", "mass_tv"):
        assert closes_the_gap(largest, name), (name, largest)


def test_fk_anneals_where_the_tempered_score_does_not(quick):
    _, metrics = quick
    rows = metrics["anneal"]["rows"]
    for r in rows:
        assert r["nonfinite_systems"] == 0 and r["evaluations"] == 100
    largest = max(r["particles"] for r in rows)
    tempered = [r for r in rows if r["particles"] == largest and r["beta"] != 1.0]
    assert any(closes_the_gap(r, "pooled_w2") for r in tempered), tempered


def test_ito_error_falls_with_the_steps(quick):
    _, metrics = quick
    rows = metrics["ito"]["rows"]
    for coarse, fine in zip(rows, rows[1:], strict=False):
        assert fine["steps"] > coarse["steps"]
        gap = coarse["abs_error"] - fine["abs_error"]
        assert gap > margin(coarse["abs_error_se"], fine["abs_error_se"]), (coarse, fine)
        assert fine["nonfinite_paths"] == 0
    assert metrics["ito"]["order"] > 0.3


def test_superdiff_or_samples_the_mixture_and_and_equalises_densities(quick):
    _, metrics = quick
    rows = {r["method"]: r for r in metrics["superdiff"]["rows"]}
    for r in rows.values():
        assert r["nonfinite_samples"] == 0
    mixture = rows["or"]
    assert mixture["sliced_w2"] < mixture["exact_sliced_w2"] + margin(
        mixture["sliced_w2_se"], mixture["exact_sliced_w2_se"]
    )
    both, average = rows["and"], rows["average"]
    assert both["estimate_gap"] < 1e-3  # the Itô estimates are kept equal
    se = margin(both["log_density_gap_se"], average["log_density_gap_se"])
    assert both["log_density_gap"] + se < 0.5 * average["log_density_gap"], (both, average)
    # AND is not the product: both it and the score average stay far from exact product draws
    for r in (both, average):
        assert r["sliced_w2"] > 2 * r["exact_sliced_w2"] + margin(
            r["sliced_w2_se"], r["exact_sliced_w2_se"]
        ), r


def test_units_split_over_8_devices_give_the_1_device_results(tmp_path, quick_config):
    """Parts A, C and D on a tiny config (8 FK systems in all, 16 Itô paths, 16 SuperDiff
    samples, 10 steps), the units split over 8 devices (1 or 2 each) against all on one
    device.  Not bitwise: XLA vectorises a batch of 8 or 16 units and one of 1 or 2
    differently, so the float32 particles, paths and samples differ by rounding; the reported
    numbers were seen to differ by at most 7e-5 relative (a standard error), apart from AND's
    estimate gap, itself rounding (7e-7), which moved by 3e-7; the tolerance allows over ten
    times that.  (With more particles and steps, as in the quick config, FK's resampling can
    turn such rounding into other ancestors, and its numbers then differ by Monte Carlo
    error.)  The counts (evaluations, non-finite units) agree exactly."""
    tiny = dict(
        num_steps=10,
        fk_particles=(16,),
        fk_systems=2,
        num_seeds=2,
        ito_steps=(5, 10),
        ito_paths=16,
        superdiff_samples=16,
        num_directions=8,
        quadrature_cells=16,
    )
    sde = diffusion.make_sde("vp")
    results = {}
    for devices in (1, 8):
        config = quick_config("composition", tmp_path, devices=devices, **tiny)
        composition.validate(config)
        grid = jnp.asarray(diffusion.time_grid(sde, config.grid, config.num_steps))
        key = jax.random.key(0)
        results[devices] = (
            composition.run_product(config, sde, grid, key)[0]["rows"],
            composition.run_ito(config, sde, key)["rows"],
            composition.run_superdiff(config, sde, grid, key)[0]["rows"],
        )
    one, eight = results[1], results[8]
    assert one[0][0]["fk_pooled_w2"] > 0 and one[1][0]["abs_error"] > 0
    for part_one, part_eight in zip(one, eight, strict=True):
        for row_one, row_eight in zip(part_one, part_eight, strict=True):
            assert row_eight.keys() == row_one.keys()
            for name, value in row_one.items():
                if isinstance(value, (int, str)):
                    assert row_eight[name] == value, name
                else:
                    np.testing.assert_allclose(
                        row_eight[name], value, rtol=1e-3, atol=1e-5, err_msg=name
                    )


@pytest.mark.parametrize("seeds", [(0, 1), (2, 3)])
def test_product_mixture_is_the_normalised_product(seeds):
    """log(ab/Z) pointwise at random points, and log Z by quadrature, for random mixtures."""
    a, b = (problems.random_gaussian_mixture(seed, 2 + seed % 2, 2) for seed in seeds)
    product, log_z = composition.product_mixture(a, b)
    assert product.log_weights.shape == (a.log_weights.shape[0] * b.log_weights.shape[0],)
    x = jax.random.normal(jax.random.key(seeds[0]), (64, 2)) * 2.0
    direct = jax.vmap(a.log_prob)(x) + jax.vmap(b.log_prob)(x) - log_z
    np.testing.assert_allclose(jax.vmap(product.log_prob)(x), direct, rtol=1e-4, atol=1e-4)
    config = ConfigDict(dict(quadrature_cells=400, quadrature_half_width=10.0))
    points, width = composition.quadrature_points(config)
    xs = jnp.asarray(points, jnp.float32)
    log_ab = np.asarray(
        composition.log_densities(a, xs) + composition.log_densities(b, xs), np.float64
    )
    law = composition.quadrature_law(log_ab, points, width)
    assert abs(law["log_integral"] - log_z) < 1e-3


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"grid": "bogus"}, "config.grid"),
        ({"fk_particles": (64, 64)}, "config.fk_particles"),
        ({"fk_particles": (0,)}, "config.fk_particles"),
        ({"fk_ess_threshold": 0.0}, "config.fk_ess_threshold"),
        ({"fk_resampling": "residual"}, "config.fk_resampling"),
        ({"betas": (1.0, -2.0)}, "config.betas"),
        ({"betas": (2.0, 2.0)}, "config.betas"),
        ({"num_seeds": 1}, "config.num_seeds"),
        ({"ito_steps": (50,)}, "config.ito_steps"),
        ({"likelihood_points": 10**6}, "config.likelihood_points"),
        ({"quadrature_cells": 4}, "config.quadrature_cells"),
        ({"quadrature_half_width": -1.0}, "config.quadrature_half_width"),
        ({"superdiff_samples": 0}, "config.superdiff_samples"),
        ({"seed": -1}, "config.seed"),
        ({"num_directions": 0}, "config.num_directions"),
        ({"devices": 9}, r"config\.devices=9 exceeds the 8 available devices"),
        (
            {"devices": 3},
            r"config\.devices=3 does not divide gcd\(2 \* num_seeds \* fk_systems, ito_paths, "
            r"superdiff_samples\)=64",
        ),
        ({"devices": 0}, r"config\.devices must be"),
    ],
)
def test_bad_config_is_rejected_before_anything_runs(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        composition.run(quick_config("composition", tmp_path, **overrides))
    assert not (tmp_path / "composition").exists()
