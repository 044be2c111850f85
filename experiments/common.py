"""What every experiment script shares: the results folder, JSON/CSV output, slope fits, config
checks, and the resumable training loop of the network studies.

:func:`train_resumable` runs a :class:`shufflesgd.nn.training.Trainer` for ``num_epochs``
epochs under an Orbax :class:`shufflesgd.nn.checkpoint.Checkpointer`:

* if the checkpoint directory holds this experiment's checkpoints, training resumes from the
  latest one (the run then ends bit-identical to an uninterrupted run: the state carries the
  scheme state and the key, and step ``s`` draws ``fold_in(key, s)``); a directory holding
  another experiment's checkpoints is refused before anything is written;
* after every epoch the state is checkpointed and one JSON line of metrics (the epoch's
  mean training metrics plus ``evaluate(state)``) is appended to ``metrics.jsonl``, so a
  killed run loses at most the epoch in progress;
* a tqdm bar counts epochs.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import app
from ml_collections import ConfigDict, config_flags
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from shufflesgd.nn import data, training


def results_folder(config: ConfigDict, name: str) -> pathlib.Path:
    """``<config.results_dir>/<name>/<UTC timestamp>/``, created, holding ``config.json``."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S-%f")
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
    """``ValueError`` naming ``config.<field>`` unless ``values`` are distinct names from
    ``allowed``."""
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
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"config.{field} must be a positive finite number, got {value!r}")


def check_fraction(field: str, value: Any) -> None:
    """``ValueError`` naming ``config.<field>`` unless ``value`` lies in (0, 1]."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"config.{field} must lie in (0, 1], got {value!r}")


def check_positive_ints(field: str, values: Any) -> None:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(f"config.{field} must be positive integers, got {values!r}")


def sampler_options(name: str, config: ConfigDict) -> dict[str, Any]:
    """The options of the registered sampler ``name`` that a sampler study's config sets
    (``restart_*`` for Restart, ``pc_snr`` for predictor–corrector); library defaults for the
    rest."""
    if name == "restart":
        return {
            "restart_k": config.restart_k,
            "restart_steps": config.restart_steps,
            "restart_t_min": config.restart_t_min,
            "restart_t_max": config.restart_t_max,
        }
    if name == "predictor_corrector":
        return {"snr": config.pc_snr}
    return {}


def train_resumable(
    trainer: training.Trainer,
    state: training.TrainState,
    source: data.Source,
    num_epochs: int,
    *,
    checkpoint_dir: str | pathlib.Path,
    experiment: str,
    metrics_path: pathlib.Path,
    evaluate: Callable[[training.TrainState], dict[str, float]] | None = None,
    description: str = "epochs",
    max_to_keep: int | None = 2,
) -> tuple[training.TrainState, list[dict[str, Any]]]:
    """Train to ``num_epochs`` completed epochs, resuming from ``checkpoint_dir`` if possible.

    Returns the final state and the metric records of every epoch, including those written
    before a resume (read back from ``metrics_path``).  ``experiment`` is the fingerprint
    (:func:`shufflesgd.nn.checkpoint.experiment_fingerprint`) that guards the directory.  Only the
    newest ``max_to_keep`` epoch checkpoints stay on disk (all of them with ``None``); resuming
    needs just the latest.
    """
    from shufflesgd.nn import checkpoint  # Orbax: loaded only by the network studies

    with checkpoint.Checkpointer(
        checkpoint_dir, experiment, max_to_keep=max_to_keep
    ) as checkpointer:
        if checkpointer.latest_step() is not None:
            state = checkpointer.restore(state)
        done = trainer.completed_epochs(state)
        records = _read_records(metrics_path, done)
        bar = tqdm(total=num_epochs, initial=done, desc=description, leave=False)

        def after_epoch(
            epoch: int, state: training.TrainState, metrics: dict[str, np.ndarray]
        ) -> None:
            record = {
                "epoch": epoch,
                **{f"train_{k}": float(np.mean(v)) for k, v in metrics.items()},
            }
            if evaluate is not None:
                record.update(evaluate(state))
            checkpointer.save(int(state.step), state)
            records.append(record)
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "epoch"})

        state, _ = trainer.train(state, source, num_epochs, callback=after_epoch)
        bar.close()
    return state, records


def _read_records(path: pathlib.Path, epochs: int) -> list[dict[str, Any]]:
    """The first ``epochs`` records of ``path`` (a resumed run keeps those and rewrites the
    rest)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:epochs]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


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
