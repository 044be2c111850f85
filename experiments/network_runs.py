"""The training loop every network study shares: resumable, with progress and per-epoch metrics.

:func:`train_resumable` runs a :class:`shufflesgd.network_training.Trainer` for
``num_epochs`` epochs under an Orbax :class:`shufflesgd.checkpoint.Checkpointer`:

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

import json
import pathlib
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from shufflesgd import checkpoint, data, network_training


def train_resumable(
    trainer: network_training.Trainer,
    state: network_training.TrainState,
    source: data.Source,
    num_epochs: int,
    *,
    checkpoint_dir: str | pathlib.Path,
    experiment: str,
    metrics_path: pathlib.Path,
    evaluate: Callable[[network_training.TrainState], dict[str, float]] | None = None,
    description: str = "epochs",
    max_to_keep: int | None = 2,
) -> tuple[network_training.TrainState, list[dict[str, Any]]]:
    """Train to ``num_epochs`` completed epochs, resuming from ``checkpoint_dir`` if possible.

    Returns the final state and the metric records of every epoch, including those written
    before a resume (read back from ``metrics_path``).  ``experiment`` is the fingerprint
    (:func:`shufflesgd.checkpoint.experiment_fingerprint`) that guards the directory.  Only the
    newest ``max_to_keep`` epoch checkpoints stay on disk (all of them with ``None``); resuming
    needs just the latest.
    """
    with checkpoint.Checkpointer(checkpoint_dir, experiment, max_to_keep=max_to_keep) as checkpointer:
        if checkpointer.latest_step() is not None:
            state = checkpointer.restore(state)
        done = trainer.completed_epochs(state)
        records = _read_records(metrics_path, done)
        bar = tqdm(total=num_epochs, initial=done, desc=description, leave=False)

        def after_epoch(epoch: int, state: network_training.TrainState, metrics: dict[str, np.ndarray]) -> None:
            record = {"epoch": epoch, **{f"train_{k}": float(np.mean(v)) for k, v in metrics.items()}}
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
    """The first ``epochs`` records of ``path`` (a resumed run keeps those and rewrites the rest)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:epochs]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records
