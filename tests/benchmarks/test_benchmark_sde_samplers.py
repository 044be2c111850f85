"""Smoke test of benchmarks/sde_samplers.py in --quick mode, and the guards that keep its
comparison honest: the PyTorch mixture equals ours, and both sides use the same noise levels.

No wall-clock threshold is asserted: timings live in benchmarks/, not in tests (DESIGN rule 7).
The peer checks skip when torch, diffusers or k-diffusion is absent (CI does not install the
``bench`` extra); our side and the JSON structure are checked regardless.
"""

import importlib.util

import numpy as np
import pytest

from shufflesgd import diffusion
from support.benchmark_results import REPO, positive_finite

PAIRINGS = (
    "diffusers_dpm_solver_multistep",
    "diffusers_unipc_multistep",
    "diffusers_euler_discrete",
    "diffusers_flow_match_euler",
    "k_diffusion_dpmpp_2m",
    "k_diffusion_heun",
)


def _load():
    spec = importlib.util.spec_from_file_location(
        "sde_samplers_bench", REPO / "benchmarks" / "sde_samplers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_timing(row, repeats):
    times = row["run_seconds"]
    assert positive_finite(times["median"]) and positive_finite(times["min"])
    assert len(times["repeats"]) == repeats and all(positive_finite(t) for t in times["repeats"])
    assert positive_finite(row["first_call_seconds"]) and positive_finite(row["samples_per_second"])


def _installed(name):
    return importlib.util.find_spec(name) is not None


def test_quick_benchmark_writes_expected_json(quick_benchmark):
    results = quick_benchmark("benchmarks.sde_samplers")
    assert results["benchmark"] == "sde_samplers" and results["quick"] is True
    assert results["targets"] == {"speedup": 3.0, "compile_seconds": 3.0}
    settings = results["settings"]
    assert machine_ok(results["machine"])
    assert positive_finite(results["sliced_w2_floor"])

    rows = results["pairings"]
    assert [row["pairing"] for row in rows] == [
        p for p in PAIRINGS for _ in settings["nfe_budgets"]
    ]
    for row in rows:
        assert row["ours_nonfinite_step"] == -1
        assert row["nfe_ours"] <= row["nfe_budget"]
        grid = row["grid"]
        assert grid[-1] == 0.0 and all(
            a > b for a, b in zip(grid, grid[1:])
        )  # same final step: to sigma 0
        expected_nfe = (
            2 * row["num_steps"] - 1 if row["pairing"] == "k_diffusion_heun" else row["num_steps"]
        )
        assert row["nfe_ours"] == expected_nfe
        _check_timing(row["jax"], settings["repeats"])
        errors = row["errors"]
        for name in (
            "ours_rms_distance_to_reference_ode",
            "ours_sliced_w2_to_exact",
            "reference_ode_sliced_w2_to_exact",
        ):
            assert positive_finite(errors[name]), (name, errors)
        peer_library = "diffusers" if row["pairing"].startswith("diffusers") else "k_diffusion"
        peer_expected = _installed("torch") and _installed(peer_library)
        if peer_expected:
            assert row["peer_result"] == "ok", row["peer_result"]
            assert row["nfe_peer"] == row["nfe_ours"]  # counted on the peer's model
            _check_timing(row["peer_timing"], settings["repeats"])
            assert positive_finite(row["speedup"]) and positive_finite(row["speedup_paired"])
            # the same ODE steps from the same x_T: the two sides agree to float32 rounding
            assert errors["max_abs_difference_ours_vs_peer"] < 2e-3, errors
            assert errors["ours_over_peer_rms_distance_to_reference"] == pytest.approx(
                1.0, rel=1e-2, abs=1e-3
            )
        else:
            assert row["peer_result"] != "ok"
            assert "speedup" not in row and "peer_rms_distance_to_reference_ode" not in errors

    compile_part = results["compile"]
    assert compile_part["longest_steps"] == 1000 and compile_part["target_seconds"] == 3.0
    assert isinstance(compile_part["target_met"], bool)
    for sampler in compile_part["samplers"].values():
        for steps in settings["compile_steps"]:
            for part in ("lower_seconds", "compile_seconds", "total_seconds"):
                assert positive_finite(sampler[f"steps_{steps}"][part]["median"])
    assert positive_finite(results["total_seconds"])


def machine_ok(machine):
    return (
        machine["cpu_count"] >= 1
        and machine["jax"]
        and "torch" in machine
        and "diffusers" in machine
    )


def test_our_side_runs_without_peers():
    """With no torch, diffusers or k-diffusion, a pairing still runs our side on the peer's
    levels (rebuilt from diffusers' documented defaults) and reports the peer as missing."""
    bench = _load()
    import jax

    cfg = dict(bench.QUICK, batch=8, reference_steps=8)
    pairing = bench.Pairing(
        "diffusers_dpm_solver_multistep", 4, cfg, "not installed", "not installed", "not installed"
    )
    assert pairing.peer_fn() is None
    z = np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32)
    exact = np.asarray(bench.MIXTURE.sample(jax.random.key(3), 8))
    directions = np.eye(2)
    row = bench.bench_pairing(pairing, cfg, z, exact, directions)
    assert row["peer_result"] == "not installed" and row["nfe_ours"] == 4
    assert set(row["errors"]) == {
        "ours_rms_distance_to_reference_ode",
        "ours_sliced_w2_to_exact",
        "reference_ode_sliced_w2_to_exact",
    }


def test_sliced_w2_is_zero_on_equal_samples_and_matches_1d_w2():
    bench = _load()
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 2))
    directions = np.array([[1.0, 0.0]])
    assert bench.sliced_w2(a, a[::-1], directions) == 0.0
    shifted = a + np.array([0.5, 0.0])
    assert bench.sliced_w2(a, shifted, directions) == pytest.approx(0.5)


def test_torch_mixture_equals_ours():
    """The guard of the comparison: the PyTorch closed form is the library's, to float32
    rounding."""
    torch = pytest.importorskip("torch")
    bench = _load()
    agreement = bench.model_agreement(bench.MIXTURE, torch, num=128)
    for name, value in agreement.items():
        assert value < 1e-4, (name, agreement)


def test_diffusers_levels_and_vp_grid_match_ours():
    """Our grids reproduce the schedulers' noise levels: the fallback levels equal diffusers'
    own, and the VP times of the DPM pairing have the scheduler's (alpha, sigma)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    bench = _load()
    diffusers = bench.import_diffusers_schedulers()
    import torch

    for name in (
        "diffusers_dpm_solver_multistep",
        "diffusers_unipc_multistep",
        "diffusers_euler_discrete",
    ):
        for steps in (7, 20):
            pairing = bench.Pairing(name, steps, bench.QUICK, torch, diffusers, "not installed")
            # diffusers accumulates abar in float32 (torch.cumprod): 1e-4 relative at sigma ~ 0.01
            np.testing.assert_allclose(
                pairing.scaled_sigmas, bench.default_diffusers_sigmas(name, steps), rtol=1e-4
            )
            if name in bench.VP_MULTISTEP:
                scaled = pairing.scaled_sigmas[:-1]
                alpha = np.asarray(
                    pairing.sde.alpha(np.asarray(pairing.grid[:-1], np.float32)), np.float64
                )
                np.testing.assert_allclose(alpha, 1.0 / np.sqrt(1.0 + scaled**2), rtol=1e-5)
                assert pairing.grid[-1] == 0.0


def test_flow_match_pairing_runs_our_shifted_grid_from_t_one():
    """The flow pairing's times are SD3's shifted grid from t = 1 (our "shifted" time grid with
    the same shift and ends), then 0: without diffusers, rebuilt from diffusers' construction;
    with it, diffusers' own sigmas (float32)."""
    bench = _load()
    for steps in (6, 20):
        pairing = bench.Pairing(
            "diffusers_flow_match_euler", steps, bench.QUICK, None, "not installed", "not installed"
        )
        sde = diffusion.make_sde("flow", t_max=1.0)
        t_min = bench.shift_flow(bench.shift_flow(1e-3))  # diffusers shifts the low end twice
        ours = diffusion.time_grid(sde, "shifted", steps - 1, t_min=t_min, shift=bench.FLOW_SHIFT)
        np.testing.assert_allclose(pairing.grid[:-1], ours, rtol=1e-12)
        assert pairing.grid[0] == 1.0 and pairing.grid[-1] == 0.0
        if _installed("torch") and _installed("diffusers"):
            import torch

            real = bench.Pairing(
                "diffusers_flow_match_euler",
                steps,
                bench.QUICK,
                torch,
                bench.import_diffusers_schedulers(),
                "not installed",
            )
            np.testing.assert_allclose(real.grid, pairing.grid, rtol=1e-6)


def test_k_diffusion_pairings_use_the_karras_sigmas_then_zero():
    """Our side of the k-diffusion pairings: Karras et al. 2022, Eq. 5 (rho 7, 80 -> 0.002),
    then sigma = 0, with Heun's budget of 2N - 1 evaluations on N levels."""
    bench = _load()
    for name, budget, levels in (("k_diffusion_dpmpp_2m", 10, 10), ("k_diffusion_heun", 19, 10)):
        pairing = bench.Pairing(name, budget, bench.QUICK, None, "not installed", "not installed")
        i = np.arange(levels)
        karras = (80.0 ** (1 / 7) + i / (levels - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
        np.testing.assert_allclose(
            pairing.grid, np.append(karras, 0.0), rtol=1e-6
        )  # float32 round trip


@pytest.mark.skipif(
    not all(_installed(name) for name in ("torch", "torchsde", "torchdiffeq", "k_diffusion")),
    reason="the k-diffusion peer (bench extra) is not installed",
)
def test_k_diffusion_sigmas_match_our_karras_grid():
    bench = _load()
    kdiff = bench.import_k_diffusion_sampling()
    assert not isinstance(kdiff, str), f"k-diffusion is installed but not usable: {kdiff}"
    import torch

    for name, budget in (("k_diffusion_dpmpp_2m", 10), ("k_diffusion_heun", 19)):
        pairing = bench.Pairing(name, budget, bench.QUICK, torch, "not installed", kdiff)
        np.testing.assert_allclose(pairing.peer_sigmas.double().numpy(), pairing.grid, rtol=2e-6)
