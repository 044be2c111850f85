"""What every experiment script shares: the results folder, JSON/CSV output, slope fits."""

from __future__ import annotations

import csv
import datetime
import json
import math
import pathlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from absl import app
from ml_collections import ConfigDict, config_flags


def results_folder(config: ConfigDict, name: str) -> pathlib.Path:
    """``<config.results_dir>/<name>/<UTC timestamp>/``, created, holding ``config.json``."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    folder = pathlib.Path(config.results_dir) / name / stamp
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "config.json").write_text(config.to_json(indent=2) + "\n")
    return folder


def write_json(path: pathlib.Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, default=_to_builtin) + "\n")


def write_csv(path: pathlib.Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _to_builtin(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def save_figure(fig: Any, path: pathlib.Path, dpi: int = 120) -> None:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def finish(folder: pathlib.Path, table: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write a study's ``metrics.json`` and ``table.txt``, print the table and the results
    folder; return the metrics with the folder added."""
    write_json(folder / "metrics.json", metrics)
    (folder / "table.txt").write_text(table + "\n")
    print(table)
    print(f"results: {folder}")
    return {**metrics, "folder": str(folder)}


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (NaN if any ``y`` is not positive)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.any(~np.isfinite(y)) or np.any(y <= 0):
        return float("nan")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def mean_and_stderr(values: Any, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean over ``axis`` (seeds, chains, probes) and its Monte Carlo standard error,
    ``std(ddof=1) / sqrt(n)``, in float64."""
    values = np.asarray(values, np.float64)
    return values.mean(axis=axis), values.std(axis=axis, ddof=1) / math.sqrt(values.shape[axis])


def check_choice(field: str, value: str, allowed: Iterable[str]) -> None:
    """``ValueError`` naming the config field when ``value`` is not one of ``allowed``."""
    allowed = sorted(allowed)
    if value not in allowed:
        raise ValueError(f"config.{field} must be one of {allowed}, got {value!r}")


def check_names(field: str, values: Any, allowed: Iterable[str]) -> list[str]:
    """``ValueError`` naming ``config.<field>`` unless ``values`` are distinct names from ``allowed``."""
    names = list(values)
    if not names:
        raise ValueError(f"config.{field} must name at least one of {sorted(allowed)}")
    for name in names:
        check_choice(field, name, allowed)
    if len(names) != len(set(names)):
        raise ValueError(f"config.{field} must not repeat a name, got {names!r}")
    return names


def check_positive_number(field: str, value: Any) -> None:
    """``ValueError`` naming ``config.<field>`` unless ``value`` is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"config.{field} must be a positive finite number, got {value!r}")


def check_fraction(field: str, value: Any) -> None:
    """``ValueError`` naming ``config.<field>`` unless ``value`` lies in (0, 1]."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"config.{field} must lie in (0, 1], got {value!r}")


def check_positive_ints(field: str, values: Any) -> None:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(f"config.{field} must be positive integers, got {values!r}")


def main(run: Callable[[ConfigDict], Any]) -> None:
    """Command-line entry of an experiment: ``--config configs/<name>.py[:variant]`` plus
    ``--config.<field>=<value>`` overrides, then ``run(config)``.

    The flag is defined here, when the script runs, not at import, so that tests and
    notebooks can import several experiment modules into one process.
    """
    config = config_flags.DEFINE_config_file("config", None, "path to a configs/*.py file")

    def entry(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if config.value is None:
            raise app.UsageError("pass --config configs/<experiment>.py")
        run(config.value)

    app.run(entry)
