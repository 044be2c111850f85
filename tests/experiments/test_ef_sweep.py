"""The EF21 sweep over compressors x step multipliers x seeds in one vmapped call: every
entry equals the single run with the same key, and the study writes its outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ef_sweep


@pytest.fixture
def small_config(quick_config, tmp_path):
    """The quick config, made smaller still, writing under ``tmp_path``; keyword overrides win."""
    smaller = dict(
        step_multipliers=(1.0, 16.0),  # x16 makes natural compression diverge (a NaN entry)
        num_seeds=2,
        num_steps=300,
    )
    return lambda **overrides: quick_config("ef_sweep", tmp_path, **{**smaller, **overrides})


def test_every_sweep_entry_equals_its_single_run(small_config, tmp_path, x64):
    config = small_config(num_steps=150, num_workers=10, examples_per_worker=20, dim=20)
    problem = ef_sweep.build_problem(config)
    names = list(config.compressors)
    compressors = [ef_sweep.make_compressor(name, config) for name in names]
    results, bases = ef_sweep.run_sweep(problem, compressors, config)
    num_c, num_m, num_s = len(names), len(config.step_multipliers), config.num_seeds
    assert results.grad_norm_sq.shape == (num_c, num_m, num_s, config.num_steps)

    key_data = ef_sweep.seed_key_data(config.seed, num_s)
    x0 = jnp.zeros_like(problem.x_star)
    initial = float(np.sqrt(ef_sweep.initial_grad_norm_sq(problem)))
    for c, run in enumerate(ef_sweep.make_runs(problem, compressors, config.num_steps)):
        single = jax.jit(run)
        for m, multiplier in enumerate(config.step_multipliers):
            for s in range(num_s):
                alone = single(
                    jax.random.wrap_key_data(key_data[s]), x0, jnp.asarray(bases[c] * multiplier)
                )
                where = f"{names[c]} x{multiplier} seed {s}"
                np.testing.assert_array_equal(
                    results.bits_up[c, m, s], alone.bits_up, err_msg=where
                )
                assert int(results.diverged_step[c, m, s]) == int(alone.diverged_step), where
                # Float tolerance: vmap and switch may fuse differently, so the iterates differ
                # by rounding (~1e-16 relative), and ||grad f|| by that times ||grad f(x_0)||.
                # Compare ||grad f|| with rtol 1e-9 and atol 1e-12 ||grad f(x_0)||; a diverging
                # run is compared while it is finite.
                norms = np.sqrt(np.asarray(alone.grad_norm_sq))
                finite = np.isfinite(norms) & (norms < 1e50)
                np.testing.assert_allclose(
                    np.sqrt(results.grad_norm_sq[c, m, s])[finite],
                    norms[finite],
                    rtol=1e-9,
                    atol=1e-12 * initial,
                    err_msg=where,
                )
                if int(alone.diverged_step) < 0:
                    np.testing.assert_allclose(
                        results.params[c, m, s], alone.params, rtol=1e-9, atol=1e-12, err_msg=where
                    )
    # The seeds differ for the randomised compressors and agree for the deterministic ones
    # (up to rounding: XLA may vectorise the lanes of a vmap differently).
    assert not np.allclose(
        results.grad_norm_sq[names.index("rand_k"), 0, 0],
        results.grad_norm_sq[names.index("rand_k"), 0, 1],
    )
    np.testing.assert_allclose(
        results.grad_norm_sq[names.index("top_k"), 0, 0],
        results.grad_norm_sq[names.index("top_k"), 0, 1],
        rtol=1e-12,
    )


def test_sweep_study_writes_results(small_config, tmp_path, x64, capsys):
    metrics = ef_sweep.run(small_config())
    (run_folder,) = list((tmp_path / "ef_sweep").iterdir())
    for name in (
        "config.json",
        "metrics.json",
        "sweep.csv",
        "curves.csv",
        "table.txt",
        "figure.png",
    ):
        assert (run_folder / name).stat().st_size > 0, name
    saved = json.loads((run_folder / "metrics.json").read_text())
    assert list(saved["compressors"]) == list(ef_sweep.COMPRESSORS)
    assert saved["num_entries"] == 5 * 2 * 2
    printed = capsys.readouterr().out
    assert "bits to eps" in printed and "not finite" in printed  # natural x16 diverges
    natural = metrics["compressors"]["natural"]["multipliers"]
    assert natural["16"]["diverged_seeds"] == 2 and natural["1"]["diverged_seeds"] == 0
    # Bits per step are fixed by the compressor (everyone sends every step).
    for name, entry in metrics["compressors"].items():
        for row in entry["multipliers"].values():
            assert row["total_bits"]["mean"] == pytest.approx(300 * entry["bits_per_message"]), name
    # The theory step (x1) makes progress with every compressor (measured final ratios: 0.24
    # for scaled sign, whose worst-case alpha = 1/d makes the step tiny, down to 3e-24 for
    # natural compression, alpha = 7/8, which reaches eps = 1e-6 on both seeds).
    for name, entry in metrics["compressors"].items():
        final = entry["multipliers"]["1"]["final_relative_grad_norm_sq"]["mean"]
        assert final is not None and final < 0.5, name
    assert natural["1"]["bits_to_epsilon"]["reached"] == 2


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"compressors": ("top_k", "sign")}, "config.compressors must be one of"),
        ({"compressors": ("top_k", "top_k")}, "config.compressors must not repeat"),
        ({"qsgd_levels": 2}, "config.qsgd_levels=2 gives omega"),
        ({"step_multipliers": (1.0, -2.0)}, "config.step_multipliers must be positive"),
        ({"step_size_mean": "geometric"}, "config.step_size_mean must be one of"),
        ({"spread": 0.5}, "config.spread must be a number >= 1"),
        ({"num_seeds": 0}, "config.num_seeds must be positive integers"),
        ({"epsilon": 0.0}, "config.epsilon must lie in"),
        ({"devices": 9}, "config.devices=9 exceeds the 8 available devices"),
        ({"devices": 4}, "config.devices=4 does not divide config.num_seeds=2"),
        ({"devices": True}, "config.devices must be a positive int"),
    ],
)
def test_bad_config_fails_before_anything_runs(small_config, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        ef_sweep.run(small_config(**overrides))
    assert not (tmp_path / "ef_sweep").exists()


def test_seeds_sharded_over_8_devices_give_the_1_device_results(small_config, x64):
    """The sweep with its 8 seeds split over 8 devices (each with the whole compressor x
    multiplier grid of one seed) against the same sweep on one device.

    Not bitwise: XLA vectorises a block of 1 seed and one of 8 differently, so the float64
    iterates differ by rounding (1e-12 absolute, 8e-11 relative seen with scaled sign); the
    tolerances are those of the sweep-against-single-run test above."""
    results = {}
    for devices in (1, 8):
        config = small_config(
            devices=devices,
            num_seeds=8,
            num_steps=60,
            num_workers=4,
            examples_per_worker=10,
            compressors=("rand_k", "scaled_sign"),
            step_multipliers=(1.0,),
        )
        ef_sweep.validate(config)
        problem = ef_sweep.build_problem(config)
        compressors = [ef_sweep.make_compressor(name, config) for name in config.compressors]
        results[devices], _ = ef_sweep.run_sweep(problem, compressors, config)
    one, eight = results[1], results[8]
    assert one.grad_norm_sq.shape == (2, 1, 8, 60) and np.all(np.isfinite(one.grad_norm_sq))
    np.testing.assert_array_equal(eight.bits_up, one.bits_up)
    np.testing.assert_array_equal(eight.diverged_step, one.diverged_step)
    initial = float(np.sqrt(ef_sweep.initial_grad_norm_sq(problem)))
    np.testing.assert_allclose(
        np.sqrt(eight.grad_norm_sq), np.sqrt(one.grad_norm_sq), rtol=1e-9, atol=1e-12 * initial
    )
    np.testing.assert_allclose(eight.params, one.params, rtol=1e-9, atol=1e-12)
    # the seeds differ (Rand-k draws its coordinates from the seed's key)
    assert not np.allclose(one.grad_norm_sq[0, 0, 0], one.grad_norm_sq[0, 0, 1])
