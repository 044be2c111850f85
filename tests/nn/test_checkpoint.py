"""Checkpoints: bit-identical resume, typed keys, and refusing another experiment's directory."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shufflesgd import shuffling
from shufflesgd.nn import checkpoint, data, models, training

N, BATCH, EPOCHS, INTERRUPT = 32, 8, 3, 1


def _leaves(tree):
    """Every leaf as a NumPy array, typed keys as their key data."""
    return [
        np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for x in jax.tree.leaves(tree)
    ]


def _assert_bit_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(_leaves(a), _leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def setup():
    arrays = data.digits_arrays("train")
    source = data.ArraySource(
        data.scale_images({k: v[:N] for k, v in arrays.items()}, data.DIGITS_MAX_VALUE)
    )
    model = models.MLP((8,), 10, batch_norm=True)
    params, stats = models.init_model(model, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    optimizer = optax.adam(1e-2)
    return source, model, params, stats, optimizer


@pytest.mark.parametrize("scheme_name", ["random_reshuffle", "grab_pair_balance"])
def test_interrupted_run_resumes_bit_identical(tmp_path, setup, scheme_name):
    source, model, params, stats, optimizer = setup
    scheme = shuffling.make_scheme(scheme_name, N)
    trainer = training.make_trainer(
        training.cross_entropy_loss(model), optimizer, scheme, batch_size=BATCH
    )
    fresh = lambda: training.init_train_state(jax.random.key(1), params, stats, optimizer, scheme)
    uninterrupted, _ = trainer.train(fresh(), source, EPOCHS)

    fingerprint = checkpoint.experiment_fingerprint(
        "resume", {"scheme": scheme_name, "epochs": EPOCHS}
    )
    with checkpoint.Checkpointer(tmp_path / "ckpt", fingerprint) as ckpt:
        save = lambda epoch, state, metrics: ckpt.save(epoch, state)
        trainer.train(fresh(), source, INTERRUPT, save)  # ... and the process dies here

    with checkpoint.Checkpointer(tmp_path / "ckpt", fingerprint) as ckpt:
        assert ckpt.latest_step() == INTERRUPT
        template = training.init_train_state(jax.random.key(2), params, stats, optimizer, scheme)
        restored = ckpt.restore(template)
        assert trainer.completed_epochs(restored) == INTERRUPT
        assert jnp.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
        resumed, history = trainer.train(restored, source, EPOCHS, lambda e, s, m: ckpt.save(e, s))
        assert len(history) == EPOCHS - INTERRUPT
        assert ckpt.all_steps() == list(range(INTERRUPT, EPOCHS + 1))
    _assert_bit_identical(resumed, uninterrupted)


def test_restore_round_trips_typed_keys_and_named_tuples(tmp_path):
    state = {
        "key": jax.random.key(3),
        "opt": optax.adam(0.1).init({"w": jnp.ones(3)}),
        "step": jnp.int32(7),
        "raw": jax.random.PRNGKey(4),
    }
    with checkpoint.Checkpointer(tmp_path, "round-trip") as ckpt:
        ckpt.save(5, state)
        restored = ckpt.restore(state)
        with pytest.raises(ValueError, match="step=6 is not a checkpoint"):
            ckpt.restore(state, step=6)
    _assert_bit_identical(restored, state)
    assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(state["key"])
    chex.assert_trees_all_equal_structs(restored["opt"], state["opt"])


def _snapshot(directory):
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = (f.read(), os.stat(path).st_mtime_ns)
    return files


def test_another_experiments_directory_is_refused_untouched(tmp_path):
    a = checkpoint.experiment_fingerprint("study", {"lr": 0.1})
    b = checkpoint.experiment_fingerprint("study", {"lr": 0.2})
    assert a != b and a == checkpoint.experiment_fingerprint("study", {"lr": 0.1})
    with checkpoint.Checkpointer(tmp_path, a) as ckpt:
        ckpt.save(1, {"w": jnp.arange(3.0)})
    before = _snapshot(tmp_path)
    with pytest.raises(
        ValueError, match=r"experiment='study-.*' does not match .*written by experiment 'study-"
    ):
        checkpoint.Checkpointer(tmp_path, b)
    assert _snapshot(tmp_path) == before
    with checkpoint.Checkpointer(tmp_path, a) as ckpt:  # the owner may still resume
        np.testing.assert_array_equal(ckpt.restore({"w": jnp.zeros(3)})["w"], [0.0, 1.0, 2.0])


def test_unnamed_checkpoints_are_refused(tmp_path):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(tmp_path)
    manager.save(0, args=ocp.args.StandardSave({"w": jnp.ones(2)}))
    manager.wait_until_finished()
    manager.close()
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="written by experiment None"):
        checkpoint.Checkpointer(tmp_path, "mine")
    assert _snapshot(tmp_path) == before
    with pytest.raises(ValueError, match="experiment must be a non-empty str"):
        checkpoint.Checkpointer(tmp_path / "other", "")
