"""A tiny resumable training run (an MLP with BatchNorm on 48 random 4x4 images, random
reshuffling, SGD) for the tests of ``experiments.common.train_resumable``: built in-process by
:func:`setup`, or run as a process that a test kills and restarts::

    python -m support.tiny_training OUT_DIR NUM_EPOCHS [PAUSE_SECONDS]

which trains to ``NUM_EPOCHS`` epochs with its checkpoints in ``OUT_DIR/checkpoints`` and one
metrics line per epoch in ``OUT_DIR/metrics.jsonl`` (each epoch's evaluation pauses for
``PAUSE_SECONDS``, so that a test can stop the process between epochs), and writes the final
parameters, batch statistics and records to ``OUT_DIR/final.npz`` / ``OUT_DIR/records.json``.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from shufflesgd import shuffling
from shufflesgd.nn import data, models, training

EXPERIMENT = "tiny"


def setup(num_examples: int = 48):
    rng = np.random.default_rng(0)
    source = data.ArraySource(
        {
            "image": rng.normal(size=(num_examples, 4, 4, 1)).astype(np.float32),
            "label": rng.integers(0, 3, num_examples),
        }
    )
    model = models.MLP(hidden=(8,), num_classes=3, batch_norm=True)
    params, stats = models.init_model(model, jax.random.key(0), jnp.zeros((2, 4, 4, 1)))
    optimizer = optax.sgd(0.1)
    scheme = shuffling.make_scheme("random_reshuffle", num_examples)
    trainer = training.make_trainer(
        training.cross_entropy_loss(model), optimizer, scheme, batch_size=16
    )
    state = training.init_train_state(jax.random.key(1), params, stats, optimizer, scheme)
    return trainer, state, source


def train(out_dir: pathlib.Path, num_epochs: int, pause: float = 0.0):
    """``train_resumable`` to ``num_epochs`` epochs in ``out_dir``; returns its result."""
    trainer, state, source = setup()

    def evaluate(state: training.TrainState) -> dict[str, float]:
        time.sleep(pause)
        return trainer.evaluate(state, source, jax.random.key(2))

    return common.train_resumable(
        trainer,
        state,
        source,
        num_epochs,
        checkpoint_dir=out_dir / "checkpoints",
        experiment=EXPERIMENT,
        metrics_path=out_dir / "metrics.jsonl",
        evaluate=evaluate,
    )


def final_arrays(state: training.TrainState) -> dict[str, np.ndarray]:
    leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
    return {f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}


if __name__ == "__main__":
    folder = pathlib.Path(sys.argv[1])
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    state, records = train(folder, int(sys.argv[2]), pause)
    np.savez(folder / "final.npz", **final_arrays(state))
    (folder / "records.json").write_text(json.dumps(records))
