"""experiments.common helpers with closed-form answers, and train_resumable: a run killed after an
epoch and resumed ends bit-identical to an uninterrupted one; another experiment's directory is
refused."""

import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from experiments import common
from shufflesgd import diffusion
from shufflesgd.nn import checkpoint
from support.tiny_training import final_arrays, setup

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_mean_and_stderr_closed_form_on_each_axis():
    values = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [4.0, 10.0]])
    mean, stderr = common.mean_and_stderr(values)
    np.testing.assert_allclose(mean, [2.5, 10.0])
    np.testing.assert_allclose(stderr, [math.sqrt(5.0 / 3.0) / 2.0, 0.0])  # sample var 5/3, n = 4
    mean, stderr = common.mean_and_stderr(values, axis=1)
    np.testing.assert_allclose(mean, [5.5, 6.0, 6.5, 7.0])
    np.testing.assert_allclose(stderr, np.abs(values[:, 0] - 10.0) / 2.0)  # n = 2: |a - b| / 2
    assert mean.dtype == np.float64


# ------------------------------------------- train_resumable: killed after an epoch, resumed


def run(tmp_path, name, num_epochs, experiment="demo", **options):
    trainer, state, source = setup()
    return common.train_resumable(
        trainer,
        state,
        source,
        num_epochs,
        checkpoint_dir=tmp_path / f"{name}_ckpt",
        experiment=experiment,
        metrics_path=tmp_path / f"{name}.jsonl",
        evaluate=lambda s: trainer.evaluate(s, source, jax.random.key(2)),
        **options,
    )


def saved_steps(tmp_path, name, experiment="demo"):
    with checkpoint.Checkpointer(tmp_path / f"{name}_ckpt", experiment) as checkpointer:
        return checkpointer.all_steps()


def test_resume_after_an_epoch_equals_uninterrupted_run(tmp_path):
    whole, whole_records = run(tmp_path, "whole", 3)
    run(tmp_path, "split", 1)  # "killed" after one epoch
    resumed, records = run(tmp_path, "split", 3)
    for a, b in zip(
        jax.tree.leaves(jax.random.key_data(whole.key)),
        jax.tree.leaves(jax.random.key_data(resumed.key)),
    ):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves((whole.params, whole.batch_stats, whole.opt_state)),
        jax.tree.leaves((resumed.params, resumed.batch_stats, resumed.opt_state)),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records == whole_records
    lines = (tmp_path / "split.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert {"train_loss", "loss"} <= set(records[0])
    assert (
        saved_steps(tmp_path, "whole") == saved_steps(tmp_path, "split") == [6, 9]
    )  # 3 steps an epoch, newest 2


def _start(folder, num_epochs, pause):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["tests", "."])}
    command = [
        sys.executable,
        "-m",
        "support.tiny_training",
        str(folder),
        str(num_epochs),
        str(pause),
    ]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _epochs_written(folder):
    path = folder / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _stop_after(process, folder, epochs, how):
    """Send ``how`` to the process once ``epochs`` metrics lines are on disk."""
    deadline = time.monotonic() + 120
    while _epochs_written(folder) < epochs:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the training process wrote no metrics"
        time.sleep(0.05)
    process.send_signal(how)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -how, process.returncode


def test_a_killed_training_process_resumes_and_ends_bit_identical(tmp_path):
    """A real process killed by SIGTERM, restarted, killed by SIGKILL mid-run, and restarted
    once more ends with the parameters and metric records of an uninterrupted run, bit for
    bit; each restart loses at most the epoch in progress."""
    num_epochs = 8
    whole, whole_records = run(tmp_path, "whole", num_epochs)
    folder = tmp_path / "killed"
    folder.mkdir()
    _stop_after(_start(folder, num_epochs, 0.3), folder, 2, signal.SIGTERM)
    _stop_after(_start(folder, num_epochs, 0.3), folder, 5, signal.SIGKILL)
    killed_at = _epochs_written(folder)
    assert killed_at < num_epochs
    last = _start(folder, num_epochs, 0.0)
    assert last.wait(timeout=120) == 0, last.stderr.read().decode()[-2000:]
    last.stderr.close()
    final = np.load(folder / "final.npz")
    expected = final_arrays(whole)
    assert sorted(final.files) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(final[name], value, err_msg=name)
    assert json.loads((folder / "records.json").read_text()) == whole_records
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, num_epochs + 1))


def test_max_to_keep_none_keeps_every_epoch(tmp_path):
    run(tmp_path, "all", 3, max_to_keep=None)
    assert saved_steps(tmp_path, "all") == [3, 6, 9]


def test_another_experiments_directory_is_refused(tmp_path):
    run(tmp_path, "a", 1, experiment="first")
    with pytest.raises(ValueError, match="experiment"):
        run(tmp_path, "a", 2, experiment="second")


# -------------------- train_resumable: a corrupt newest checkpoint falls back to an intact one


def assert_same_state(a, b):
    for x, y in zip(
        jax.tree.leaves((jax.random.key_data(a.key), a.params, a.batch_stats, a.opt_state)),
        jax.tree.leaves((jax.random.key_data(b.key), b.params, b.batch_stats, b.opt_state)),
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(a.step), np.asarray(b.step))


def flip_a_data_file(step_dir):
    path = max(
        (p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupt_newest_checkpoint_falls_back_and_ends_bit_identical(tmp_path):
    whole, whole_records = run(tmp_path, "whole", 3)
    run(tmp_path, "split", 2)  # checkpoints at steps 3 and 6 (epochs 1 and 2), then "killed"
    flip_a_data_file(tmp_path / "split_ckpt" / "6")
    with pytest.warns(
        common.CheckpointFallbackWarning,
        match=rf"skipping checkpoint step 6 in {tmp_path}/split_ckpt: .*SHA-256",
    ) as caught:
        resumed, records = run(tmp_path, "split", 3)
    fallbacks = [w for w in caught if issubclass(w.category, common.CheckpointFallbackWarning)]
    assert len(fallbacks) == 1  # step 3 is intact: no "from scratch"
    assert_same_state(resumed, whole)
    assert records == whole_records
    lines = (tmp_path / "split.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert saved_steps(tmp_path, "split") == [6, 9]
    with checkpoint.Checkpointer(tmp_path / "split_ckpt", "demo") as checkpointer:
        checkpointer.verify(6)  # the corrupt step was deleted and written again, intact


def test_no_intact_checkpoint_starts_from_scratch_saying_so(tmp_path):
    fresh, fresh_records = run(tmp_path, "fresh", 1)
    run(tmp_path, "lost", 1)
    (tmp_path / "lost_ckpt" / "3" / checkpoint.INTEGRITY_FILE).unlink()
    with pytest.warns(common.CheckpointFallbackWarning) as caught:
        again, records = run(tmp_path, "lost", 1)
    messages = [
        str(w.message) for w in caught if issubclass(w.category, common.CheckpointFallbackWarning)
    ]
    assert len(messages) == 2
    assert re.search(
        r"skipping checkpoint step 3 in .*lost_ckpt: .*integrity.json is missing", messages[0]
    )
    assert "no intact checkpoint" in messages[1] and "starts from scratch" in messages[1]
    assert_same_state(again, fresh)
    assert records == fresh_records
    assert len((tmp_path / "lost.jsonl").read_text().splitlines()) == 1


def test_sampler_labels_carry_options():
    """A config label is a registered name or name(option=literal, ...); the study's own
    Restart / predictor-corrector options sit under the label's."""
    config = ConfigDict(
        dict(restart_k=2, restart_steps=4, restart_t_min=0.1, restart_t_max=0.3, pc_snr=0.16)
    )
    assert common.parse_sampler("samplers", "ddim") == ("ddim", {})
    assert common.parse_sampler("samplers", " ddim(eta=0.5, final='none') ") == (
        "ddim",
        {"eta": 0.5, "final": "none"},
    )
    name, options = common.sampler_options("restart(restart_k=5)", config)
    assert name == "restart" and options["restart_k"] == 5 and options["restart_steps"] == 4
    assert common.sampler_options("predictor_corrector", config) == (
        "predictor_corrector",
        {"snr": 0.16},
    )
    labels = ("ddim", "ddim(eta=1.0)", "edm_heun(S_churn=5.0)")
    assert common.check_samplers("samplers", labels, diffusion.SAMPLERS) == list(labels)


@pytest.mark.parametrize(
    "labels, match",
    [
        (("ddim(0.5)",), "must be sampler names or name"),
        (("ddim(eta=x)",), "must be sampler names or name"),
        (("ddim(**o)",), "must be sampler names or name"),
        (("ddim[eta=1]",), "must be sampler names or name"),
        ((3,), "must be sampler names or name"),
        (("dddim",), "must be one of"),
        (("ddim(etta=0.5)",), r"config.samplers: ddim has no option etta"),
        (("ddim", "ddim"), "must not repeat"),
        ((), "must name at least one"),
    ],
)
def test_bad_sampler_labels_name_the_field(labels, match):
    with pytest.raises(ValueError, match=match):
        common.check_samplers("samplers", labels, diffusion.SAMPLERS)
