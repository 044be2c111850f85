"""The studies' command line (experiments.common.main / load_config): every config field,
sequences included, takes an override; a misspelled field, a value that does not parse or
one that validate() rejects ends in one line naming the field and exit status 2; an empty
sequence is refused; a study writes metrics.json and table.txt before drawing, and a
diverging run still draws its figure and exits 0."""

import importlib
import json
import pathlib
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

import configs
from experiments import common, shuffling_rates

ROOT = pathlib.Path(__file__).resolve().parents[2]
STUDIES = sorted(m.name for m in pkgutil.iter_modules(configs.__path__))
# Sequence fields that may legitimately be empty (none so far): name -> reason.
MAY_BE_EMPTY: dict[str, str] = {
    "sampler_nfe.dc_grids": "no grids: the study skips Part D (DC-Solver)",
    "guidance_targets.mixture_corrections": "no corrections: Part B runs CFG, PCG and FK only",
}


def fields(config, prefix=""):
    """(dotted name, value) of every leaf field."""
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from fields(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def placeholder_type(config, dotted):
    """The declared type of a field that holds ``None`` (``config_dict.placeholder``)."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        config = config[part]
    return config.get_ref(leaf).get_type()


def override(value, kind=str):
    """A command-line spelling of a new value of the field's type (``kind`` for ``None``)."""
    if value is None:
        return ("3", 3) if kind is int else ("some/dir", "some/dir")
    if isinstance(value, bool):
        return str(not value), not value
    if isinstance(value, (int, float)):
        return repr(value * 2), value * 2
    if isinstance(value, str):
        return value + "x", value + "x"
    if isinstance(value, tuple):
        new = tuple(reversed(value))[:1]
        return repr(list(new)), new  # a list literal, stored as a tuple
    raise AssertionError(f"unexpected field type {type(value)}")


def test_study_configs_hold_no_lists():
    for name in STUDIES:
        for variant in ("full", "quick"):
            config = importlib.import_module(f"configs.{name}").get_config(variant)
            lists = [f for f, v in fields(config) if isinstance(v, list)]
            assert not lists, f"{name}:{variant} {lists} (use tuples: they take overrides)"


@pytest.mark.parametrize("name", STUDIES)
def test_every_field_takes_a_command_line_override(name):
    base = importlib.import_module(f"configs.{name}").get_config("quick")
    argv = ["prog", f"--config=configs/{name}.py:quick"]
    expected = {}
    for field, value in fields(base):
        kind = placeholder_type(base, field) if value is None else type(value)
        text, expected[field] = override(value, kind)
        argv.append(f"--config.{field}={text}")
    config = common.load_config(argv)
    for field, value in expected.items():
        assert get(config, field) == value, field


def test_sequence_literals_from_the_issue():
    config = common.load_config(
        [
            "prog",
            "--config=configs/ef_divergence.py:quick",
            '--config.methods=["ef21"]',
            "--config.step_size_multiples=(1.0, 2.0)",
            "--config.checkpoints=[5]",
        ]
    )
    assert config.methods == ("ef21",)
    assert config.step_size_multiples == (1.0, 2.0)
    assert config.checkpoints == (5,)
    config = common.load_config(
        ["prog", "--config=configs/likelihood_check.py:quick", "--config.sdes=vp"]
    )
    assert config.sdes == ("vp",)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--config.num_sedes=4"], r"config\.num_sedes; did you mean config\.num_seeds\?"),
        (["--config.num_seeds=abc"], r"--config\.num_seeds=abc: invalid literal"),
        (["--config.stepsize_c=2"], r"did you mean config\.step_size_c"),
        (["stray"], "unexpected arguments"),
    ],
)
def test_bad_command_line_is_one_config_error(argv, match):
    with pytest.raises(common.ConfigError, match=match) as info:
        common.load_config(["prog", "--config=configs/shuffling_rates.py:quick", *argv])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--config=configs/nope.py"], r"configs/nope\.py: \[Errno 2\] No such file"),
        (["--config=configs/shuffling_rates.py:bogus"], "config variant must be 'full' or"),
        ([], "pass --config"),
    ],
)
def test_bad_config_file_is_one_config_error(argv, match):
    with pytest.raises(common.ConfigError, match=match) as info:
        common.load_config(["prog", *argv])
    assert "\n" not in str(info.value)


def tuple_fields():
    for name in STUDIES:
        config = importlib.import_module(f"configs.{name}").get_config("quick")
        for field, value in fields(config):
            if isinstance(value, tuple) and f"{name}.{field}" not in MAY_BE_EMPTY:
                yield name, field


@pytest.mark.parametrize("name, field", list(tuple_fields()))
def test_an_empty_sequence_is_refused_naming_the_field(name, field):
    study = importlib.import_module(f"experiments.{name}")
    config = importlib.import_module(f"configs.{name}").get_config("quick")
    *parents, last = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[last] = ()
    with pytest.raises(ValueError, match=rf"config\.({field}|{last})\b"):
        study.validate(config)


def run_study(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "study, override, match",
    [
        ("shuffling_rates", "--config.num_sedes=4", "did you mean config.num_seeds?"),
        ("shuffling_rates", "--config.num_seeds=-4", "config.num_seeds must be positive"),
        ("shuffling_rates", "--config.schemes=()", "config.schemes must name at least one"),
        ("ef_divergence", '--config.methods=["ef22"]', "config.methods"),
    ],
)
def test_study_command_line_error_is_one_line_and_status_2(study, override, match, tmp_path):
    done = run_study(
        f"experiments.{study}",
        f"--config=configs/{study}.py:quick",
        f"--config.results_dir={tmp_path}",
        override,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{study}: error: "), done.stderr
    assert match in lines[0], lines[0]
    assert not list(tmp_path.iterdir())  # nothing written


def test_diverging_study_writes_its_numbers_and_a_figure(tmp_path):
    done = run_study(
        "experiments.shuffling_rates",
        "--config=configs/shuffling_rates.py:quick",
        f"--config.results_dir={tmp_path}",
        "--config.step_size_c=1e4",  # the issue's override: every run overflows
        "--config.num_seeds=2",
        "--config.epochs=(32, 64)",
        "--config.n_values=(8, 16)",
        "--config.schemes=('random_reshuffle', 'grab_pair_balance')",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = list((tmp_path / "shuffling_rates").iterdir())
    for name in ("metrics.json", "table.txt", "figure.png"):
        assert (folder / name).stat().st_size > 0, name
    metrics = json.loads((folder / "metrics.json").read_text())
    assert "figure_error" not in metrics
    assert metrics["diverged_runs"] == 2 * 2 * (2 + 2)  # schemes × seeds × (K and n points)
    assert "runs diverged" in (folder / "table.txt").read_text()


def test_finish_writes_numbers_before_drawing_and_survives_a_failed_figure(tmp_path, capsys):
    seen = []

    def draw(path):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        raise ValueError("Data cannot be log-scaled")

    result = common.finish(tmp_path, "the table", {"x": 1}, draw)
    assert seen == [["metrics.json", "table.txt"]]
    assert (tmp_path / "figure.png").stat().st_size > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["x"] == 1 and "Data cannot be log-scaled" in saved["figure_error"]
    assert result["figure_error"] == saved["figure_error"]
    assert "figure not drawn" in capsys.readouterr().err


def test_finite_curve_drops_what_log_axes_cannot_show():
    x, y, err, dropped = common.finite_curve(
        [1, 2, 3, 4, 5], [1.0, np.nan, np.inf, 0.0, 2.0], [0.1, 0.1, 0.1, 0.1, np.inf]
    )
    np.testing.assert_array_equal(x, [1.0])
    np.testing.assert_array_equal(y, [1.0])
    np.testing.assert_array_equal(err, [0.1])
    assert dropped == 4


def test_theory_column_is_flagged_off_the_piecewise_quadratic():
    result = dict.fromkeys(
        ["slope_epochs", "corrected_slope_epochs", "slope_n", "corrected_slope_n"], -2.0
    )
    result["diverged_runs"] = 0
    schemes = {"random_reshuffle": result}
    own = shuffling_rates.format_table({"problem": "piecewise_quadratic", "schemes": schemes})
    other = shuffling_rates.format_table({"problem": "least_squares", "schemes": schemes})
    assert "theory*" not in own and "piecewise" not in own
    assert "theory*" in other
    assert "not on least_squares" in other and "Θ(1/(nK)² + 1/(nK³))" in other
    # the numbers are the same: only the labels differ
    assert own.splitlines()[1] == other.splitlines()[1]
