"""experiments/momentum_divergence.py on its :quick config: under strong guidance DPM-Solver++(2M)
blows up at low NFE where its heavy-ball version does not; every beta = 1 momentum sampler is
the plain solver it reduces to; a bad config is refused before anything is written."""

import json

import numpy as np
import pytest

from experiments import momentum_divergence


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, quick_config):
    import jax

    previous = jax.config.jax_enable_x64
    results = tmp_path_factory.mktemp("results")
    try:
        metrics = momentum_divergence.run(quick_config("momentum_divergence", results))
    finally:
        jax.config.update("jax_enable_x64", previous)
    return results, metrics


def rows_of(metrics, problem="mixture_2d"):
    return {
        (r["guidance_scale"], r["sampler"], r["budget"]): r
        for r in metrics["problems"][problem]["rows"]
    }


def test_the_quick_study_writes_its_files(quick_run):
    results, metrics = quick_run
    (folder,) = list((results / "momentum_divergence").iterdir())
    for name in ("config.json", "metrics.json", "rows.csv", "table.txt", "figure.png"):
        assert (folder / name).stat().st_size > 0, name
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["problems"]["mixture_2d"]["rows"] == metrics["problems"]["mixture_2d"]["rows"]
    assert "figure_error" not in metrics and saved["devices"] == 4
    assert "blown-up fraction" in (folder / "table.txt").read_text()
    # 5 samplers x 2 budgets x 2 guidance scales, every run within its budget
    rows = metrics["problems"]["mixture_2d"]["rows"]
    assert len(rows) == 20 and all(r["nfe"] == r["budget"] == r["steps"] for r in rows)


def test_strong_guidance_blows_up_the_plain_solver_but_not_its_heavy_ball_version(quick_run):
    """Measured on the quick config (4 seeds x 256 samples, float64): at w = 7.5,
    DPM-Solver++(2M) blows up on 4.6 % of the samples at NFE 6 and 21.7 % at NFE 8, with
    heavy ball 0.8 on none; PLMS4 (ghvb / plms_hb at beta = 1) on 98 %.  At w = 1 nothing
    blows up.  The thresholds below leave a wide margin (47 and 222 of 1024 samples)."""
    _, metrics = quick_run
    rows = rows_of(metrics)
    strongest = max(metrics["guidance_scales"])
    for budget, least in ((6, 0.02), (8, 0.1)):
        plain = rows[(strongest, "dpm_solver_pp_2m", budget)]
        momentum = rows[(strongest, "dpm_solver_pp_hb(beta=0.8)", budget)]
        assert plain["blown_up_fraction"] >= least, plain
        assert momentum["blown_up_fraction"] == 0.0, momentum
        assert momentum["rms_seeds"] == 4 and momentum["rms_mean"] is not None
        assert rows[(strongest, "ghvb(order=4, beta=1.0)", budget)]["blown_up_fraction"] > 0.5
    for r in metrics["problems"]["mixture_2d"]["rows"]:
        if r["guidance_scale"] == 1.0:
            assert r["blown_up_fraction"] == 0.0, r
    stable = metrics["problems"]["mixture_2d"]["stable_from"][str(strongest)]
    assert stable["dpm_solver_pp_2m"] is None
    assert stable["dpm_solver_pp_hb(beta=0.8)"] == 6
    # the reference is far more accurate than any sampler here
    assert max(metrics["problems"]["mixture_2d"]["reference_half_step_rms"]) < 1e-2


def test_every_beta_one_row_is_its_plain_solver(quick_run):
    _, metrics = quick_run
    entry = metrics["problems"]["mixture_2d"]
    pairs = {(c["momentum"], c["plain"]) for c in entry["beta_one_checks"]}
    assert pairs == {
        ("dpm_solver_pp_hb(beta=1.0)", "dpm_solver_pp_2m"),
        ("ghvb(order=4, beta=1.0)", "plms_hb(order=4, beta=1.0)"),
    }
    for check in entry["beta_one_checks"]:  # the samples themselves, every seed and w
        assert check["same_nonfinite"] and check["max_abs_difference"] <= 1e-6, check
    rows = rows_of(metrics)
    for (w, label, budget), r in rows.items():
        for momentum, plain in pairs:
            if label == momentum:
                other = rows[(w, plain, budget)]
                for field in ("blown_up_fraction", "nonfinite_fraction", "first_nonfinite_step"):
                    assert r[field] == other[field], (field, r, other)
                np.testing.assert_allclose(r["rms_mean"], other["rms_mean"], rtol=1e-6)


def test_seeds_on_1_device_give_the_4_device_reference(quick_run, quick_config, tmp_path, x64):
    """The reference solves (both step counts) rerun with every seed on one device, against the
    study's run with its 4 seeds on 4 devices: the reference's largest coordinate and its
    half-step RMS per guidance scale (the RMS depends on every sample).  Not bitwise: XLA
    vectorises a block of 4 seeds and one of 1 differently, so the float64 samples differ by
    rounding (largest coordinate 1.6e-15 relative, RMS 1.3e-16 absolute seen); the tolerances
    allow 100 times that, far below the 1e-3 RMS the reference is accurate to."""
    import jax
    import jax.numpy as jnp

    from shufflesgd import diffusion

    _, metrics = quick_run
    config = quick_config("momentum_divergence", tmp_path, devices=1)
    momentum_divergence.validate(config)
    sde = diffusion.make_sde("vp")
    (problem,) = config.problems
    law = momentum_divergence.build_mixture(problem, config)
    model = momentum_divergence.guided_model(law, config.component, sde)
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    x_T = momentum_divergence.prior_draws(config, sde, key, law.dim)
    assert len(x_T.sharding.device_set) == 1
    runner = momentum_divergence.make_runner(config.reference_sampler, model, sde)
    scales = jnp.asarray(config.guidance_scales, float)
    reference, half = (
        momentum_divergence.solve_reference(config, runner, sde, x_T, scales, steps, problem)
        for steps in (config.reference_steps, config.reference_steps // 2)
    )
    entry = metrics["problems"][problem]
    np.testing.assert_allclose(
        np.max(np.abs(reference), axis=(1, 2, 3)), entry["reference_max_abs"], rtol=1e-13
    )
    half_rms = np.sqrt(np.mean((reference - half) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(half_rms, entry["reference_half_step_rms"], rtol=0, atol=1e-14)


def test_reduces_to_names_the_plain_solver():
    assert momentum_divergence.reduces_to("dpm_solver_pp_hb(beta=1.0)")[0] == "dpm_solver_pp_2m"
    assert (
        momentum_divergence.reduces_to("dpm_solver_pp_hb(order=3, beta=1.0)")[0]
        == "dpm_solver_pp_3m"
    )
    assert momentum_divergence.reduces_to("dpm_solver_pp_hb(beta=0.8)") is None
    assert momentum_divergence.reduces_to("ghvb(order=2, beta=1.0)") == (
        "plms_hb",
        {"order": 2, "beta": 1.0, "final": "denoise", "noise": None},
    )
    assert momentum_divergence.paper_name("ghvb(order=4, beta=0.8)") == "GHVB 3.8"


def test_stable_from_is_the_first_budget_of_the_last_clean_stretch():
    stable_from = momentum_divergence.stable_from
    assert stable_from([6, 8, 10, 12], [0.0, 0.1, 0.0, 0.0]) == 10
    assert stable_from([6, 8, 10], [0.0, 0.0, 0.0]) == 6
    assert stable_from([6, 8, 10], [0.0, 0.0, 0.2]) is None


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"problems": ("mixture_3d",)}, "config.problems"),
        ({"guidance_scales": (1.0, -2.0)}, "config.guidance_scales"),
        ({"guidance_scales": (1.0, 1.0)}, "config.guidance_scales"),
        ({"samplers": ("euler_maruyama",)}, "config.samplers"),
        ({"samplers": ("ghvb(order=9)",)}, "config.samplers"),
        ({"samplers": ("plms_hb(beta=0.0)",)}, "config.samplers"),
        ({"reference_sampler": "unipc(order=7)"}, "config.reference_sampler"),
        ({"samplers": ("ghvb(speed=2)",)}, "config.samplers"),
        ({"samplers": ('ghvb(final="denoise")',)}, "config.samplers"),
        ({"samplers": ("edm_heun(S_churn=1.0)",)}, "config.samplers"),
        ({"nfe_budgets": (8, 6)}, "config.nfe_budgets"),
        ({"nfe_budgets": (0, 6)}, "config.nfe_budgets"),
        ({"samplers": ("pf_ode_heun",), "nfe_budgets": (1, 6)}, "config.nfe_budgets"),
        ({"grid": "uniform"}, "config.grid"),
        ({"reference_sampler": "ancestral"}, "config.reference_sampler"),
        ({"reference_grid": "log"}, "config.reference_grid"),
        ({"reference_steps": 10}, "config.reference_steps"),
        ({"blowup_factor": 0.5}, "config.blowup_factor"),
        ({"blowup_factor": float("nan")}, "config.blowup_factor"),
        ({"component": 3}, "config.component"),
        ({"component": -1}, "config.component"),
        ({"num_components": 1}, "config.num_components"),
        ({"num_seeds": 1}, "config.num_seeds"),
        ({"num_samples": 0}, "config.num_samples"),
        ({"high_dim": 0}, "config.high_dim"),
        ({"seed": -1}, "config.seed"),
        ({"devices": 16}, "config.devices=16 exceeds the 8 available devices"),
        ({"devices": 3}, "config.devices=3 does not divide config.num_seeds=4"),
    ],
)
def test_bad_config_is_rejected_before_anything_runs(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        momentum_divergence.run(quick_config("momentum_divergence", tmp_path, **overrides))
    assert not (tmp_path / "momentum_divergence").exists()
