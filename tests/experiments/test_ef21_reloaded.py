"""EF21 with L_QM vs L_AM vs EF21-W end to end on the quick config: outputs written, EF21-W
needs fewer bits than the original EF21 by a factor that grows with the spread of the L_i."""

import contextlib
import io
import json

import jax
import numpy as np
import pytest

from experiments import ef21_reloaded


@pytest.fixture(scope="module")
def study(tmp_path_factory, quick_config):
    """The quick study, run once on the default devices (2 of the 8, which split its 2 seeds):
    ``(metrics, run folder, printed output)``."""
    previous = jax.config.jax_enable_x64
    tmp_path = tmp_path_factory.mktemp("ef21_reloaded")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = ef21_reloaded.run(quick_config("ef21_reloaded", tmp_path))
    (run_folder,) = list((tmp_path / "ef21_reloaded").iterdir())
    yield metrics, run_folder, printed.getvalue()
    jax.config.update("jax_enable_x64", previous)


def test_quick_study_writes_results_and_ef21_w_needs_fewer_bits(study):
    metrics, run_folder, printed = study
    for name in (
        "config.json",
        "metrics.json",
        "bits_to_epsilon.csv",
        "curves.csv",
        "table.txt",
        "figure.png",
    ):
        assert (run_folder / name).stat().st_size > 0, name
    saved = json.loads((run_folder / "metrics.json").read_text())
    assert list(saved["compressors"]["top_k"]["spreads"]) == ["1", "100", "10000"]
    assert saved["devices"] == 2
    assert "L_QM/L_AM" in printed and "EF21-W == EF21 (L_AM)" in printed

    rows = metrics["compressors"]["top_k"]["spreads"]
    ratios = [rows[s]["ratio_ef21_qm_over_ef21_w"] for s in ("1", "100", "10000")]
    # Measured (d = 40, n = 20, Top-4, eps = 1e-6): bits ratios 1.00, 1.59, 2.22 with
    # L_QM / L_AM = 1.00, 1.59, 2.23.  Margins: 0.3 between consecutive spreads, 1.8 at 10^4.
    assert None not in ratios, ratios
    assert ratios[2] > 1.8, ratios
    assert ratios[1] > ratios[0] + 0.3 and ratios[2] > ratios[1] + 0.3, ratios
    for spread, row in rows.items():
        bits = {m: row["methods"][m]["bits_to_epsilon"]["mean"] for m in ef21_reloaded.METHODS}
        # Top-k is homogeneous: EF21-W's iterates are EF21 (L_AM)'s, so the bits agree exactly.
        assert bits["ef21_am"] == bits["ef21_w"], (spread, bits)
        assert row["max_rel_diff_ef21_am_vs_ef21_w"] < 1e-9, spread
        # The bits gap is the step-size gap: gamma_AM / gamma_QM ~ L_QM / L_AM within 5 %.
        assert ratios[list(rows).index(spread)] == pytest.approx(
            row["step_ratio_am_over_qm"], rel=0.05
        )
        assert row["step_ratio_am_over_qm"] <= row["qm_over_am"] + 1e-12
        assert np.isclose(row["qm_over_am"], row["L_QM"] / row["L_AM"])


def test_seeds_on_1_device_give_the_2_device_results(study, x64, quick_config, tmp_path):
    """The first spread rerun with both seeds on one device, against the study's run with its
    seeds on 2 devices: each seed is the same arithmetic, and the whole summary (bits to
    epsilon per seed, curves) comes out bitwise equal."""
    metrics, _, _ = study
    config = quick_config("ef21_reloaded", tmp_path, devices=1)
    ef21_reloaded.validate(config)
    spread = config.spreads[0]
    problem = ef21_reloaded.build_problem(config, spread)
    compressor = ef21_reloaded.make_compressor("top_k", config)
    alpha = ef21_reloaded.contraction(compressor, problem.x_star)
    gammas = ef21_reloaded.step_sizes(problem, alpha)
    results = ef21_reloaded.run_spread(problem, compressor, gammas, config)
    summary = ef21_reloaded.summarise_spread(problem, results, gammas, config)
    expected = metrics["compressors"]["top_k"]["spreads"][ef21_reloaded.spread_key(spread)]
    assert summary == expected


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"spreads": (1.0, 0.5)}, "config.spreads must be numbers >= 1"),
        ({"spreads": ()}, "config.spreads must be numbers >= 1"),
        ({"compressors": ("top_k", "bogus")}, "config.compressors must be one of"),
        ({"top_k_fraction": 0.0}, "config.top_k_fraction must lie in"),
        ({"epsilon": 1.5}, "config.epsilon must lie in"),
        ({"num_steps": 0}, "config.num_steps must be positive integers"),
        ({"num_seeds": -1}, "config.num_seeds must be positive integers"),
        ({"l2": -1.0}, "config.l2 must be non-negative"),
        ({"devices": 16}, "config.devices=16 exceeds the 8 available devices"),
        ({"devices": 4}, "config.devices=4 does not divide config.num_seeds=2"),
    ],
)
def test_bad_config_fails_before_anything_runs(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        ef21_reloaded.run(quick_config("ef21_reloaded", tmp_path, **overrides))
    assert not (tmp_path / "ef21_reloaded").exists()
