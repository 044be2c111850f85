"""The checks of tests/test_multiprocess.py: one program for one process with 8 devices and
for several processes sharing 8 devices.

``python tests/support/multiprocess_checks.py OUT.npz`` is what ``shufflesgd.launch``
starts in each process: it joins the run through ``parallel.initialize_distributed()``
(the launcher's environment), runs :func:`run_all` on meshes over the 8 devices of all
processes, and process 0 writes the results, gathered to the host, to ``OUT.npz``.  The
test process (8 forced devices, one process) calls :func:`run_all` itself for the
reference.

Each check builds its sharded inputs from the rows this process's devices hold
(``parallel.process_rows`` and ``parallel.shard_process_rows``), never from another
process's data, and returns replicated outputs.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from shufflesgd import compression, drivers, parallel, problems, shuffling
from shufflesgd.nn import data, models, training

NUM_DEVICES = 8
NUM_SEEDS = 2 * NUM_DEVICES
BATCH_SIZE, NUM_EPOCHS = 16, 2


def to_host(tree):
    """Replicated global arrays (or a single process's arrays) as NumPy arrays."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def seed_sweep(mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Random-reshuffling SGD on a least-squares sum, vmapped over 16 seeds sharded over
    ``mesh``; each process passes only its own seeds."""
    features, targets = problems.synthetic_regression(0, 32, 4)
    problem = problems.least_squares(features, targets)
    run = shuffling.make_sgd_run(
        problem, shuffling.random_reshuffle(32), num_epochs=4, batch_size=4
    )
    rep = parallel.replicated(mesh)
    sweep = jax.jit(
        jax.vmap(lambda seed, x0, lr: run(jax.random.key(seed), x0, lr), in_axes=(0, None, None)),
        in_shardings=(parallel.worker_sharding(mesh, parallel.DATA_AXIS), rep, rep),
        out_shardings=rep,
    )
    seeds = np.arange(NUM_SEEDS, dtype=np.uint32)[parallel.process_rows(mesh, NUM_SEEDS)]
    result = sweep(
        parallel.shard_process_rows(mesh, seeds),
        np.zeros(4, np.float32),
        np.float32(0.5 / float(problem.smoothness)),
    )
    return {"params": result.params, "suboptimality": result.suboptimality}


def error_feedback(mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """EF21 with Top-2 and local shuffled minibatches, 16 workers sharded over ``mesh``
    (:func:`shufflesgd.compression.make_sharded_distributed_run`)."""
    a, b = problems.heterogeneous_regression(0, 16, 4, 6, spread=4.0)
    problem = problems.distributed_least_squares(a, b, 16)
    run = compression.make_sharded_distributed_run(
        problem, compression.ef21(compression.top_k(2)), mesh, num_steps=12, batch_size=2
    )
    result = run(jax.random.key(7), np.zeros(6, np.float32), 0.2 / float(problem.smoothness))
    return {
        "params": result.params,
        "suboptimality": result.suboptimality,
        "bits_up": result.bits_up,
    }


class Training:
    """A BatchNorm MLP classifying 64 random 8x8 images (labels 0..9 drawn at random) with
    Adam, random reshuffling and batches of 16 split over a data mesh: the trainer, its
    initial (unplaced) state, its scheme and its source."""

    def __init__(self, mesh: jax.sharding.Mesh):
        rng = np.random.default_rng(0)
        self.source = data.ArraySource(
            {
                "image": rng.standard_normal((64, 8, 8, 1)).astype(np.float32),
                "label": rng.integers(0, 10, 64).astype(np.int32),
            }
        )
        model = models.MLP((16,), 10, batch_norm=True)
        images = self.source[np.arange(2)]["image"]
        params, stats = models.init_model(model, jax.random.key(0), images)
        optimizer, self.scheme = optax.adam(1e-2), shuffling.random_reshuffle(64)
        self.trainer = training.make_trainer(
            training.cross_entropy_loss(model),
            optimizer,
            self.scheme,
            batch_size=BATCH_SIZE,
            mesh=mesh,
        )
        self.state = training.init_train_state(
            jax.random.key(8), params, stats, optimizer, self.scheme
        )
        self.mesh = mesh

    def run(self) -> tuple[training.TrainState, jax.Array]:
        """Two epochs of the trainer's ``step`` in the epoch orders of its ``run_epoch``,
        each process reading from the source only the examples of its own devices.
        Returns the final state and the per-step losses."""
        state = parallel.put_replicated(self.mesh, self.state)  # as trainer.place, any process
        mine = parallel.process_rows(self.mesh, BATCH_SIZE)
        losses = []
        for epoch in range(NUM_EPOCHS):
            scheme_state, order = drivers.epoch_order(
                self.scheme, state.scheme_key, state.scheme_state, epoch
            )
            state = state._replace(scheme_state=scheme_state)
            for indices in to_host(order).reshape(-1, BATCH_SIZE):
                local = indices[mine].astype(np.int32)
                batch = parallel.shard_process_rows(
                    self.mesh, {**self.source[local], "indices": local}
                )
                state, metrics = self.trainer.step(state, batch, batch.pop("indices"))
                losses.append(metrics["loss"])
        return state, jnp.stack(losses)


def comparable(state: training.TrainState) -> dict:
    """The numbers of a training state (its keys as raw key data)."""
    return {
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "step": state.step,
        "key": jax.random.key_data(state.key),
    }


def flatten(tree) -> dict[str, np.ndarray]:
    """``{"a/b/c": array}`` on the host for a nested tree of (replicated) arrays."""
    flat, _ = jax.tree_util.tree_flatten_with_path(to_host(tree))
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def run_all(setup: Training | None = None) -> dict[str, np.ndarray]:
    """Every check on meshes over all (8) devices of all processes, flattened to
    ``{"check/path": array}`` on the host; ``setup`` is the training's (a new one when
    ``None``)."""
    data_mesh = parallel.data_mesh(NUM_DEVICES)
    state, losses = (setup or Training(data_mesh)).run()
    return flatten(
        {
            "seed_sweep": seed_sweep(data_mesh),
            "error_feedback": error_feedback(parallel.worker_mesh(NUM_DEVICES)),
            "training": {**comparable(state), "loss": losses},
        }
    )


def main(out: str) -> None:
    parallel.initialize_distributed()
    jax.config.update("jax_debug_key_reuse", True)  # as in tests/conftest.py
    print(
        f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} of {jax.device_count()} devices",
        flush=True,
    )
    results = run_all()
    if parallel.is_main_process():
        np.savez(out, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
