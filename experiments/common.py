"""What every experiment script shares: the results folder, JSON/CSV output, slope fits, config
checks, the mesh of a sweep's seed axis, and the resumable training loop of the network studies.

:func:`seed_mesh` and :func:`shard_seeds` spread a vmapped sweep over devices: the seed-stacked
keys are placed with their leading axis split over the ``"seeds"`` axis of a 1-D mesh
(:func:`shufflesgd.parallel.worker_mesh`) and ``jax.jit`` partitions the whole sweep along it,
each device running its own block of seeds; ``config.devices`` says how many devices
(:func:`seed_devices`).

:func:`train_resumable` runs a :class:`shufflesgd.nn.training.Trainer` for ``num_epochs``
epochs under an Orbax :class:`shufflesgd.nn.checkpoint.Checkpointer`:

* if the checkpoint directory holds this experiment's checkpoints, training resumes from the
  newest intact one (the run then ends bit-identical to an uninterrupted run: the state carries
  the scheme state and the key, and step ``s`` draws ``fold_in(key, s)``); a directory holding
  another experiment's checkpoints is refused before anything is written;
* a checkpoint that fails its integrity check
  (:class:`shufflesgd.nn.checkpoint.CorruptCheckpointError`) is skipped with a
  :class:`CheckpointFallbackWarning` naming its step and why, and deleted; training resumes
  from the newest intact one, or from scratch (saying so) when none is intact, and the
  metrics file keeps only the epochs up to the step resumed from;
* after every epoch the state is checkpointed and one JSON line of metrics (the epoch's
  mean training metrics plus ``evaluate(state)``) is appended to ``metrics.jsonl``, so a
  killed run loses at most the epoch in progress;
* a tqdm bar counts epochs.
"""

from __future__ import annotations

import ast
import csv
import datetime
import difflib
import json
import math
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import app, flags
from ml_collections import ConfigDict, config_flags
from tqdm.auto import tqdm

from shufflesgd import diffusion, parallel
from shufflesgd._checks import check_int

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


def finish(
    folder: pathlib.Path,
    table: str,
    metrics: dict[str, Any],
    draw: Callable[[pathlib.Path], None] | None = None,
) -> dict[str, Any]:
    """Write a study's ``metrics.json`` and ``table.txt``, print the table and the results
    folder, then call ``draw(folder / "figure.png")``; return the metrics with the folder added.

    The numbers are on disk before anything is drawn.  A figure that cannot be drawn is
    not fatal: ``figure.png`` then shows the error, which is also printed and recorded as
    ``metrics["figure_error"]``.
    """
    write_json(folder / "metrics.json", metrics)
    (folder / "table.txt").write_text(table + "\n")
    print(table)
    if draw is not None:
        path = folder / "figure.png"
        try:
            draw(path)
        except Exception as error:  # drawing must never lose a computed result
            message = f"figure not drawn: {type(error).__name__}: {error}"
            print(message, file=sys.stderr)
            metrics = {**metrics, "figure_error": message}
            write_json(folder / "metrics.json", metrics)
            _error_figure(message, path)
    print(f"results: {folder}")
    return {**metrics, "folder": str(folder)}


def _error_figure(message: str, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    plt.close("all")
    fig = plt.figure(figsize=(6, 1.5))
    fig.text(0.02, 0.5, message[:300], wrap=True, va="center", fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def finite_curve(
    x: Any, y: Any, yerr: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """The points of a curve that a log-log plot can show (finite, ``y > 0``, finite error
    bar), and how many were left out (diverged runs: mark them, e.g. in the legend)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y) & (y > 0)
    if yerr is not None:
        yerr = np.asarray(yerr, float)
        keep &= np.isfinite(yerr)
        yerr = yerr[keep]
    return x[keep], y[keep], yerr, int(np.sum(~keep))


def not_shown(label: str, dropped: int) -> str:
    """``label`` saying how many points of its curve were left out (diverged), when any were."""
    return label + (f" ({dropped} diverged points not shown)" if dropped else "")


def log_level(axis: Any, value: Any, **style: Any) -> None:
    """A horizontal reference line on a log axis, drawn only when ``value`` is finite and
    positive (``None`` counts as missing)."""
    if value is not None and np.isfinite(value) and value > 0:
        axis.axhline(value, **style)


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


def check_optional_path(field: str, value: Any) -> None:
    """``ValueError`` naming ``config.<field>`` unless ``value`` is ``None`` or a non-empty
    string (a path to read or write)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"config.{field} must be None or a non-empty path, got {value!r}")


def check_positive_ints(field: str, values: Any) -> None:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(f"config.{field} must be positive integers, got {values!r}")


#: The mesh axis that a sweep's seeds are split over.
SEEDS = "seeds"


def seed_devices(
    config: ConfigDict, units: int | None = None, units_name: str = "config.num_seeds"
) -> int:
    """How many devices the seed axis of a sweep is split over, from ``config.devices`` and
    the number of independent units on that axis: ``units`` (named ``units_name`` in errors),
    by default ``config.num_seeds``.

    ``config.devices = k`` (an int) takes the first ``k`` of :func:`jax.devices`; ``None`` takes
    them all, or, when the units do not split evenly over them, the largest number of them
    that they do split over (one device at worst).  ``ValueError`` naming ``config.devices``
    when it is not ``None`` or a positive int, exceeds the devices available, or does not
    divide the units.  Call it from a study's ``validate``, before anything compiles.
    """
    available = jax.device_count()
    num_units = config.num_seeds if units is None else units
    if config.devices is None:
        return max(k for k in range(1, available + 1) if num_units % k == 0)
    devices = check_int("config.devices", config.devices)
    if devices > available:
        raise ValueError(
            f"config.devices={devices} exceeds the {available} available devices (on CPU, set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
        )
    if num_units % devices:
        raise ValueError(
            f"config.devices={devices} does not divide {units_name}={num_units}: the units "
            "are split evenly over the devices"
        )
    return devices


def seed_mesh(config: ConfigDict) -> jax.sharding.Mesh:
    """The 1-D mesh with the axis ``"seeds"`` over the first :func:`seed_devices` devices."""
    return parallel.worker_mesh(seed_devices(config), axis=SEEDS)


def shard_seeds(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """``tree`` (every leaf with a leading seed axis: keys, key data) placed with that axis split
    over the ``"seeds"`` axis of ``mesh``, so that a jitted ``vmap`` over it runs each device's
    block of seeds on that device."""
    return parallel.shard_workers(mesh, tree, axis=SEEDS)


def parse_sampler(field: str, label: str) -> tuple[str, dict[str, Any]]:
    """A sampler label of a study's config: a registered name, ``"unipc"``, or a name with
    keyword options, ``"unipc(order=3, corrector=False)"`` (Python literals), so that one study
    compares variants of one sampler.  Returns ``(name, options)``; ``ValueError`` naming
    ``config.<field>`` when the label is not of that form."""
    try:
        tree = ast.parse(label.strip(), mode="eval").body if isinstance(label, str) else None
        if isinstance(tree, ast.Name):
            return tree.id, {}
        if (
            isinstance(tree, ast.Call)
            and isinstance(tree.func, ast.Name)
            and not tree.args
            and all(k.arg is not None for k in tree.keywords)
        ):
            return tree.func.id, {k.arg: ast.literal_eval(k.value) for k in tree.keywords}
    except (SyntaxError, ValueError):
        pass
    raise ValueError(
        f"config.{field} entries must be sampler names or name(option=value, ...), got {label!r}"
    )


def check_samplers(field: str, labels: Any, allowed: Iterable[str]) -> list[str]:
    """:func:`check_names` for sampler labels (:func:`parse_sampler`): each names a sampler of
    ``allowed`` with options it takes (checked through the registry's
    :meth:`~shufflesgd.diffusion.SamplerSpec.options`); labels are distinct."""
    labels = list(labels)
    if not labels:
        raise ValueError(f"config.{field} must name at least one of {sorted(allowed)}")
    for label in labels:
        name, options = parse_sampler(field, label)
        check_choice(field, name, allowed)
        unknown = sorted(set(options) - set(diffusion.SAMPLERS[name].options()))
        if unknown:
            raise ValueError(
                f"config.{field}: {name} has no option {', '.join(unknown)}; "
                f"its options are {sorted(diffusion.SAMPLERS[name].options())}"
            )
    if len(labels) != len(set(labels)):
        raise ValueError(f"config.{field} must not repeat a sampler, got {labels!r}")
    return labels


def sampler_options(label: str, config: ConfigDict) -> tuple[str, dict[str, Any]]:
    """The registered name of a sampler label (:func:`parse_sampler`) and its options: those
    a sampler study's config sets (``restart_*`` for Restart, ``pc_snr`` for
    predictor–corrector), overridden by the label's own; library defaults for the rest."""
    name, options = parse_sampler("samplers", label)
    if name == "restart":
        base = {
            "restart_k": config.restart_k,
            "restart_steps": config.restart_steps,
            "restart_t_min": config.restart_t_min,
            "restart_t_max": config.restart_t_max,
        }
    elif name == "predictor_corrector":
        base = {"snr": config.pc_snr}
    else:
        base = {}
    return name, {**base, **options}


class CheckpointFallbackWarning(UserWarning):
    """:func:`train_resumable` skipped a corrupt checkpoint (or found none intact)."""


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
        state = _restore_newest_intact(checkpointer, state)
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


def _restore_newest_intact(checkpointer: Any, state: training.TrainState) -> training.TrainState:
    """``state`` restored from the newest intact checkpoint of ``checkpointer`` (``state`` itself
    when there is none).

    Each corrupt checkpoint newer than the one restored
    (:class:`shufflesgd.nn.checkpoint.CorruptCheckpointError`) is reported by a warning naming
    its step and the reason, then deleted, since the resumed run saves that step again; when
    none is intact, a warning says the run starts from scratch.
    """
    from shufflesgd.nn import checkpoint

    steps = checkpointer.all_steps()
    for step in reversed(steps):
        try:
            return checkpointer.restore(state, step)
        except checkpoint.CorruptCheckpointError as error:
            warnings.warn(
                f"skipping checkpoint step {step} in {checkpointer.directory}: {error.reason}; "
                "deleting it and falling back to the previous one",
                CheckpointFallbackWarning,
                stacklevel=3,
            )
            checkpointer.delete(step)
    if steps:
        warnings.warn(
            f"no intact checkpoint in {checkpointer.directory} (corrupt steps {steps} skipped): "
            "training starts from scratch",
            CheckpointFallbackWarning,
            stacklevel=3,
        )
    return state


def _read_records(path: pathlib.Path, epochs: int) -> list[dict[str, Any]]:
    """The first ``epochs`` records of ``path`` (a resumed run keeps those and rewrites the
    rest)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:epochs]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


class ConfigError(ValueError):
    """A command line that names no config file, an unknown field or a value that does not
    parse; its message is one line naming the flag or field."""


_PREFIX = "--config."


def _flat_fields(config: ConfigDict, prefix: str = "") -> list[str]:
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if isinstance(value, ConfigDict):
            names.extend(_flat_fields(value, f"{prefix}{key}."))
    return names


def _has_field(config: ConfigDict, path: str) -> bool:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def _one_line(error: BaseException, innermost: bool = True) -> str:
    """An exception's message (its chain's innermost one by default) on one line."""
    while innermost and (error.__cause__ is not None or error.__context__ is not None):
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    if "Traceback (most recent call last)" in text or "Attempted [" in text:
        # the config loader's report: a flag name, a traceback or search list, the error last
        head = text.split(": ", 1)[0] if text.startswith("flag --") else ""
        text = ": ".join(filter(None, [head, text.splitlines()[-1].strip()]))
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's repr
        text = text[1:-1]
    return " ".join(text.replace("\\n", " ").split()) or type(error).__name__


def load_config(argv: Sequence[str]) -> ConfigDict:
    """The config of a command line ``prog --config <file>.py[:variant] [--config.<field>=<v>]``.

    Sequence fields are tuples and take a Python literal (``--config.schemes='["a", "b"]'``
    or ``'("a",)'``; a bare word is a one-element tuple).  Raises :class:`ConfigError` with one
    line naming the flag or field (with the closest field names for a misspelling).
    """
    argv = list(argv)
    path = None
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if not path:
        raise ConfigError("pass --config configs/<experiment>.py[:variant]")
    base = _parse_flags([argv[0], f"--config={path}"])
    known = _flat_fields(base)
    for arg in argv[1:]:
        if not arg.startswith(_PREFIX):
            continue
        field = arg[len(_PREFIX) :].split("=", 1)[0]
        if not _has_field(base, field):
            hint = difflib.get_close_matches(field, known, n=3)
            raise ConfigError(
                f"{path} has no field config.{field}"
                + (f"; did you mean {', '.join('config.' + h for h in hint)}?" if hint else "")
            )
    return _parse_flags(argv)


def _parse_flags(argv: list[str]) -> ConfigDict:
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", None, "path to a configs/*.py file", flag_values=values, sys_argv=argv
    )
    try:
        rest = values(argv)
    except flags.Error as error:  # names the flag: "flag --config.x=v: <reason>"
        raise ConfigError(_one_line(error, innermost=False)) from error
    try:
        config = holder.value
        config.keys()  # a config file that failed to load raises here
    except Exception as error:  # the loader reports the file's own error innermost
        raise ConfigError(f"--config {argv[-1].split('=', 1)[-1]}: {_one_line(error)}") from error
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments: {rest[1:]}")
    return config


def main(
    run: Callable[[ConfigDict], Any],
    validate: Callable[[ConfigDict], None] | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """Command-line entry of an experiment: ``--config configs/<name>.py[:variant]`` plus
    ``--config.<field>=<value>`` overrides (any field; sequences as Python literals), then
    ``run(config)``.

    A command line that does not parse, names an unknown field, or sets a value that
    ``validate`` rejects prints one line (``<prog>: error: ...``) and exits with status 2.
    The flags live in a private ``FlagValues``, so that tests and notebooks can import
    several experiment modules into one process.
    """
    argv = list(sys.argv if argv is None else argv)
    prog = pathlib.Path(argv[0]).stem if argv else "experiment"
    if any(arg in ("-h", "--help", "--helpfull") for arg in argv[1:]):
        module = sys.modules.get(getattr(run, "__module__", ""), None)
        print((module.__doc__ or "") if module else "")
        print(
            "usage: python -m experiments.<name> --config configs/<name>.py[:variant] "
            "[--config.<field>=<value> ...]"
        )
        return
    try:
        config = load_config(argv)
        if validate is not None:
            validate(config)
    except (ValueError, TypeError) as error:
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)

    def entry(_: list[str]) -> None:
        run(config)

    app.run(entry, argv=argv[:1])
