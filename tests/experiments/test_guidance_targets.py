"""experiments/guidance_targets.py on its :quick config: CFG misses the γ-powered target by far
at γ = 4 (exact laws), PCG's corrector steps and FK's particles close most of the gap, and both
beat CFG on the two-class mixture."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, guidance_targets
from shufflesgd import diffusion, parallel


def test_pcg_and_fk_approach_the_powered_target_that_cfg_misses(
    tmp_path, x64, capsys, quick_config
):
    metrics = guidance_targets.run(quick_config("guidance_targets", tmp_path))
    (folder,) = list((tmp_path / "guidance_targets").iterdir())
    for name in (
        "config.json",
        "metrics.json",
        "gaussian_kl.csv",
        "mixture_sliced_w2.csv",
        "table.txt",
        "figure.png",
    ):
        assert (folder / name).stat().st_size > 0, name
    assert "figure_error" not in metrics
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["gaussian"] == metrics["gaussian"]
    # gcd(8 systems, 1024 samples, 1024 // 64, 1024 // 1024) = 1: one device
    assert saved["devices"] == 1
    assert "KL(output || p_gamma)" in capsys.readouterr().out
    gaussian = {(r["method"], r["scale"]): r for r in metrics["gaussian"]["rows"]}
    # gamma = 1 is the conditional law itself: only 20 DDIM steps' discretisation error is left
    assert gaussian[("cfg_ddim", 1.0)]["kl"] < 0.1
    cfg, pcg1, pcg4 = (gaussian[(m, 4.0)]["kl"] for m in ("cfg_ddim", "pcg_K1", "pcg_K4"))
    assert cfg > 1.0 and pcg1 < cfg / 10 and pcg4 < pcg1 / 2
    assert gaussian[("pcg_K4", 4.0)]["evaluations"] == 9 * 20 + 2
    fk = {(r["particles"], r["scale"]): r for r in metrics["gaussian"]["fk_rows"]}
    large = fk[(1024, 4.0)]
    assert large["kl"] < cfg / 10
    # FK's weighted fit is within a few standard errors of the fit to as many exact draws
    margin = 4 * (large["kl_se"] + large["exact_draws_kl_se"])
    assert large["kl"] - large["exact_draws_kl"] < margin + 0.05, large
    assert fk[(64, 4.0)]["kl"] > large["kl"]
    assert large["nonfinite_systems"] == 0
    mixture = {(r["method"], r["scale"]): r for r in metrics["mixture"]["rows"]}
    floor = metrics["mixture"]["exact_draws_sliced_w2"]["4.0"]
    assert mixture[("cfg_ddim", 4.0)]["sliced_w2"] > 3 * floor
    for name in ("pcg_K4", "fk_N1024"):
        assert mixture[(name, 4.0)]["sliced_w2"] < mixture[("cfg_ddim", 4.0)]["sliced_w2"], name


def test_fk_systems_split_over_8_devices_give_the_1_device_results(tmp_path, x64, quick_config):
    """8 FK systems of 16 particles on the two-class mixture (float64), split over 8 devices
    against all on one device.  Not bitwise: XLA vectorises a batch of 8 systems and one of 1
    differently, so particles, log-weights and ESS (of order 1 to 16) differ by rounding (3e-14
    absolute seen); the tolerance allows relative 1e-12, far below the Monte Carlo standard
    errors the study works with.  The resampling decisions and evaluation counts, being
    integers or booleans, agree exactly (an rtol of 1e-12 admits no other value)."""
    config = quick_config("guidance_targets", tmp_path, fk_steps=8)
    sde = diffusion.make_sde(config.sde)
    model = diffusion.conditional_mixture_model(sde, guidance_targets.mixture_law(config))
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_time", config.fk_steps))
    results = {}
    for devices in (1, 8):
        mesh = parallel.worker_mesh(devices, axis=common.SEEDS)
        run = jax.jit(
            lambda key, gamma, mesh=mesh: guidance_targets.feynman_kac_systems(
                key, model, gamma, sde, grid, 16, 8, 2, config, mesh
            )
        )
        results[devices] = jax.device_get(run(jax.random.key(0), 2.0))
    one, eight = results[1], results[8]
    assert one[0].shape == (8, 16, 2) and np.all(np.isfinite(one[0]))
    assert np.unique(one[0][:, 0, 0]).size == 8  # the systems differ
    leaves = zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True)
    for index, (a, b) in enumerate(leaves):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12, err_msg=str(index))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"scales": (1.0, -2.0)}, "config.scales"),
        ({"budget_scale": 3.0}, "config.budget_scale"),
        ({"pcg_step_scale": 2.5}, "config.pcg_step_scale"),
        ({"fk_ess_threshold": 1.5}, "config.fk_ess_threshold"),
        ({"fk_resampling": "residual"}, "config.fk_resampling"),
        ({"fk_particles": (100000,)}, "config.fk_particles"),
        ({"mixture_corrections": ("cfg",)}, "config.mixture_corrections"),
        ({"mixture_corrections": ("rescaled(rescale=2.0)",)}, "config.mixture_corrections"),
        ({"mixture_corrections": ("apg(rescale=0.5)",)}, "config.mixture_corrections"),
        ({"gaussian_systems": 1}, "config.gaussian_systems"),
        ({"sde": "vpp"}, "config.sde"),
        ({"devices": 9}, r"config\.devices=9 exceeds the 8 available devices"),
        ({"devices": 2}, r"config\.devices=2 does not divide gcd\(gaussian_systems"),
        ({"devices": 0}, r"config\.devices must be"),
    ],
)
def test_bad_config_is_rejected_before_anything_runs(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        guidance_targets.run(quick_config("guidance_targets", tmp_path, **overrides))
    assert not (tmp_path / "guidance_targets").exists()
