"""Several JAX processes through jax.distributed, on the CPU (gloo collectives).

One launch (``shufflesgd.launch``) of tests/support/multiprocess_checks.py as 2 processes x
4 devices runs three checks on meshes over all 8 devices, each process feeding only its own
rows; the same checks run here, in 1 process x 8 forced devices (tests/conftest.py), are
the reference:

* a seed sweep (shuffling SGD vmapped over 16 seeds, the seeds sharded): no cross-device
  arithmetic, so bit-identical;
* a sharded EF21 run (``compression.make_sharded_distributed_run``) and two epochs of
  data-parallel training (``nn.training``, BatchNorm): their all-reduces add the devices'
  terms in another order over gloo than inside one process, a float32 rounding of a few
  eps (~1e-7) per sum that 8 to 12 steps carry on; they agree to rtol 1e-5, atol 1e-6 (the
  tolerance of the single- vs multi-device training test), with integer outputs (bits,
  step counts) and keys identical.

A process that raises makes the launch fail with a message naming it, in bounded time;
bad settings raise ``ValueError`` naming the field before anything starts.
"""

import concurrent.futures
import io
import pathlib
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from shufflesgd import launch, parallel
from support import multiprocess_checks as checks

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "tests" / "support" / "multiprocess_checks.py")
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(two_processes, one_process, setup)``: the checks' results from 2 processes x 4
    devices (written by process 0) and from this process with its 8 devices, computed
    while the launch runs; and the training set-up this process used."""
    assert jax.process_count() == 1 and jax.device_count() == 8
    out = tmp_path_factory.mktemp("multiprocess") / "results.npz"
    log = io.StringIO()
    command = [sys.executable, SCRIPT, str(out)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        launched = pool.submit(
            launch.launch, command, 2, devices_per_process=4, timeout=240, out=log
        )
        setup = checks.Training(parallel.data_mesh(checks.NUM_DEVICES))
        one_process = checks.run_all(setup)
        status = launched.result()
    if "must be called before any JAX calls" in log.getvalue():
        pytest.fail(
            "importing shufflesgd started JAX's backend, so no process could join the run "
            "(a module-level JAX computation, or an import of blackjax, which computes "
            "jnp.log(2.0) at import):\n" + log.getvalue()
        )
    assert status == 0, log.getvalue()
    assert "[1] process 1 of 2: 4 of 8 devices" in log.getvalue()
    with np.load(out) as results:
        return dict(results), one_process, setup


def entries(results, check):
    return {name: value for name, value in results.items() if name.startswith(check + "/")}


def test_seed_sweep_is_bit_identical(runs):
    two_processes, one_process, _ = runs
    want = entries(one_process, "seed_sweep")
    got = entries(two_processes, "seed_sweep")
    assert set(got) == set(want) == {"seed_sweep/params", "seed_sweep/suboptimality"}
    assert want["seed_sweep/params"].shape == (checks.NUM_SEEDS, 4)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert len(np.unique(want["seed_sweep/params"][:, 0])) == checks.NUM_SEEDS  # seeds differ


@pytest.mark.parametrize("check", ["error_feedback", "training"])
def test_reductions_agree_to_float32_rounding(runs, check):
    two_processes, one_process, _ = runs
    want, got = entries(one_process, check), entries(two_processes, check)
    assert set(got) == set(want) and len(want) >= 3
    for name, value in want.items():
        if np.issubdtype(value.dtype, np.floating):
            np.testing.assert_allclose(got[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_process_local_feeding_is_the_trainers_epoch(runs):
    """The checks' training loop (step by step, batches built from process-local rows) is
    what ``Trainer.train`` does with whole batches: bit-identical in one process."""
    _, results, setup = runs
    state, history = setup.trainer.train(setup.state, setup.source, checks.NUM_EPOCHS)
    losses = np.concatenate([epoch["loss"] for epoch in history])
    want = checks.flatten({"training": {**checks.comparable(state), "loss": losses}})
    assert set(want) == set(entries(results, "training"))
    for name, value in want.items():
        np.testing.assert_array_equal(results[name], value, err_msg=name)
    assert int(state.step) == 8


# Process 1 raises after joining; process 0 waits for it in a cross-process sum.
FAILING = """
import jax, numpy as np
from shufflesgd import parallel
parallel.initialize_distributed(shutdown_timeout=2)
if jax.process_index() == 1:
    raise RuntimeError("process 1 fails on purpose")
mesh = parallel.data_mesh()
ones = parallel.shard_process_rows(mesh, np.ones(jax.local_device_count()))
print(jax.jit(jax.numpy.sum, out_shardings=parallel.replicated(mesh))(ones))
"""


def test_a_failing_process_stops_the_run_with_a_clear_message():
    log, start = io.StringIO(), time.monotonic()
    status = launch.launch(
        [sys.executable, "-c", FAILING], 2, devices_per_process=4, timeout=120, out=log
    )
    elapsed, text = time.monotonic() - start, log.getvalue()
    assert status not in (0, launch.TIMED_OUT), text
    assert "[1] RuntimeError: process 1 fails on purpose" in text
    assert "shufflesgd.launch: process 1 printed a Python traceback first" in text
    assert "[0] 8.0" not in text  # process 0 never got the sum
    # The raising process waits shutdown_timeout=2 s at JAX's exit barrier, then every
    # process fails: far inside the launcher's 120 s timeout (and JAX's default 300 s).
    assert elapsed < 60, elapsed


def explicit(address="127.0.0.1:1234", num_processes=2, process_id=0):
    return dict(coordinator_address=address, num_processes=num_processes, process_id=process_id)


@pytest.mark.parametrize(
    "settings,field",
    [
        (explicit(process_id=2), "process_id"),
        (explicit(process_id=-1), "process_id"),
        (explicit(num_processes=0), "num_processes"),
        (explicit(address="127.0.0.1"), "coordinator_address"),
        (explicit(address="host:http"), "coordinator_address"),
        (explicit(address="host:70000"), "coordinator_address"),
        (explicit(address=":1234"), "coordinator_address"),
        (dict(coordinator_address="127.0.0.1:1234"), "missing num_processes, process_id"),
        (dict(num_processes=2, process_id=0), "missing coordinator_address"),
        (dict(heartbeat_timeout=0), "heartbeat_timeout"),
    ],
)
def test_bad_settings_raise_before_anything_starts(monkeypatch, settings, field):
    # JAX's backend is already up in this process: jax.distributed.initialize would raise
    # RuntimeError, so a ValueError shows that the check came first.
    for name in (parallel.COORDINATOR_ENV, parallel.NUM_PROCESSES_ENV, parallel.PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=field):
        parallel.initialize_distributed(**settings)
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize(
    "environment,field",
    [
        ({parallel.COORDINATOR_ENV: "127.0.0.1:1234"}, "SHUFFLESGD_NUM_PROCESSES, SHUFFLESGD_P"),
        (
            {
                parallel.COORDINATOR_ENV: "127.0.0.1:1234",
                parallel.NUM_PROCESSES_ENV: "two",
                parallel.PROCESS_ID_ENV: "0",
            },
            "SHUFFLESGD_NUM_PROCESSES must be an int",
        ),
        (
            {
                parallel.COORDINATOR_ENV: "127.0.0.1:1234",
                parallel.NUM_PROCESSES_ENV: "2",
                parallel.PROCESS_ID_ENV: "2",
            },
            "process_id",
        ),
    ],
)
def test_bad_environment_settings_raise(monkeypatch, environment, field):
    for name in (parallel.COORDINATOR_ENV, parallel.NUM_PROCESSES_ENV, parallel.PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=field):
        parallel.initialize_distributed()


def test_single_process_helpers():
    mesh = parallel.data_mesh(8)
    assert parallel.is_main_process()
    assert parallel.process_rows(mesh, 16) == slice(0, 16)
    with pytest.raises(ValueError, match="num_rows=12"):
        parallel.process_rows(mesh, 12)
    rows = {"x": np.arange(32.0).reshape(16, 2), "y": np.arange(16)}
    placed = parallel.shard_process_rows(mesh, rows)
    for name, value in placed.items():
        assert value.sharding.is_equivalent_to(NamedSharding(mesh, jax.P("data")), value.ndim)
        np.testing.assert_array_equal(value, rows[name])
    with pytest.raises(ValueError, match="mismatched worker counts"):
        parallel.shard_process_rows(mesh, {"x": np.zeros((16, 2)), "y": np.zeros(8)})
    with pytest.raises(ValueError, match="mismatched worker counts"):
        parallel.shard_process_rows(mesh, np.zeros(12))
    key = jax.random.key(3)
    tree = parallel.put_replicated(mesh, {"key": key, "x": np.ones(3)})
    assert tree["key"].sharding.is_fully_replicated and len(tree["key"].sharding.device_set) == 8
    np.testing.assert_array_equal(jax.random.key_data(tree["key"]), jax.random.key_data(key))


def test_an_unreachable_coordinator_is_named_within_the_timeout():
    """Nothing listens at the address: a process other than 0 raises ConnectionError naming
    coordinator_address after initialization_timeout, instead of JAX aborting the process."""
    address = f"127.0.0.1:{launch.free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"coordinator_address='{address}' is unreachable"):
        parallel.initialize_distributed(address, 2, 1, initialization_timeout=1)
    assert time.monotonic() - started < 10
