"""Checkpoints: bit-identical resume, typed keys, refusing another experiment's directory, and
corruption on disk (flipped bytes, truncated or deleted files, altered records) caught."""

import json
import os
import re

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


# ------------------------------------ integrity: real checkpoints, corrupted on disk, caught


def _state():
    return {
        "key": jax.random.key(3),
        "opt": optax.adam(0.1).init({"w": jnp.ones(3)}),
        "w": jnp.arange(1000.0),
    }


def _data_file(step_dir):
    """The largest Orbax array data file of a step (under an OCDBT ``d/`` folder)."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_bytes(path, count=400):
    raw = bytearray(path.read_bytes())
    start = len(raw) // 4
    for i in range(start, min(len(raw), start + count)):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))  # same size, different content


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_record(step_dir, edit):
    path = step_dir / checkpoint.INTEGRITY_FILE
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def _flip_digest(entry):
    entry["sha256"] = ("0" if entry["sha256"][0] != "0" else "1") + entry["sha256"][1:]


CORRUPTIONS = {
    "data file bytes flipped, size kept": (lambda s: _flip_bytes(_data_file(s)), "SHA-256"),
    "data file truncated": (lambda s: _truncate(_data_file(s)), "bytes, .* written"),
    "_METADATA truncated": (lambda s: _truncate(s / "default" / "_METADATA"), "_METADATA has"),
    "_CHECKPOINT_METADATA truncated": (
        lambda s: _truncate(s / "_CHECKPOINT_METADATA"),
        "_CHECKPOINT_METADATA has",
    ),
    "data file deleted": (lambda s: _data_file(s).unlink(), "is missing"),
    "_METADATA deleted": (lambda s: (s / "default" / "_METADATA").unlink(), "is missing"),
    "commit_success.txt deleted": (lambda s: (s / "commit_success.txt").unlink(), "is missing"),
    "file added": (lambda s: (s / "default" / "stray").write_text("x"), "stray is unexpected"),
    "integrity record deleted": (
        lambda s: (s / checkpoint.INTEGRITY_FILE).unlink(),
        "integrity record integrity.json is missing",
    ),
    "integrity record truncated": (
        lambda s: _truncate(s / checkpoint.INTEGRITY_FILE),
        "integrity record integrity.json is unreadable",
    ),
    "integrity record: a file digest altered": (
        lambda s: _edit_record(s, lambda r: _flip_digest(r["files"]["default/_METADATA"])),
        "_METADATA does not match its SHA-256",
    ),
    "integrity record: an array digest altered": (
        lambda s: _edit_record(s, lambda r: _flip_digest(r["arrays"][-1])),
        r"restored array \['w'\] does not match its SHA-256",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_checkpoint_is_caught_naming_directory_and_step(tmp_path, corruption):
    corrupt, reason = CORRUPTIONS[corruption]
    state = _state()
    with checkpoint.Checkpointer(tmp_path, "intact") as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, jax.tree.map(lambda x: x, state))
    corrupt(tmp_path / "2")
    with checkpoint.Checkpointer(tmp_path, "intact") as ckpt:
        assert ckpt.all_steps() == [1, 2]
        with pytest.raises(checkpoint.CorruptCheckpointError) as caught:
            ckpt.restore(state)
        _assert_bit_identical(ckpt.restore(state, step=1), state)  # the older one is intact
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.directory, error.step) == (str(tmp_path), 2)
    assert f"checkpoint step 2 in {tmp_path} is corrupt" in str(error)
    assert re.search(reason, error.reason), error.reason


def test_corrupt_root_metadata_is_caught_naming_directory(tmp_path):
    with checkpoint.Checkpointer(tmp_path, "intact") as ckpt:
        ckpt.save(1, _state())
    (root,) = (tmp_path / "metadata").iterdir()
    _truncate(root)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=f"root metadata in {tmp_path}"):
        checkpoint.Checkpointer(tmp_path, "intact")


def test_integrity_record_is_sealed_after_the_async_save(tmp_path):
    state = _state()
    with checkpoint.Checkpointer(tmp_path, "sealed", max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 3]
        for step in (2, 3):
            record = ckpt.verify(step)
            assert record["step"] == step and record["experiment"] == "sealed"
            assert [a["path"] for a in record["arrays"]] == [
                jax.tree_util.keystr(p)
                for p, _ in jax.tree_util.tree_flatten_with_path(checkpoint._key_data(state))[0]
            ]
            assert "default/_METADATA" in record["files"]
        assert not list(tmp_path.rglob("*.tmp"))


def test_intact_files_with_a_wrong_template_are_not_called_corrupt(tmp_path):
    with checkpoint.Checkpointer(tmp_path, "template") as ckpt:
        ckpt.save(1, {"w": jnp.ones(3)})
        with pytest.raises(ValueError, match="intact but cannot be restored") as caught:
            ckpt.restore({"v": jnp.ones(3), "u": jnp.ones(2)})
    assert not isinstance(caught.value, checkpoint.CorruptCheckpointError)
