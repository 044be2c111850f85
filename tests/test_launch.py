"""The local launcher (``python -m shufflesgd.launch``) without JAX: each process's
environment, a failing process stopping the others, a signal and a timeout reported, the
command line, and bad arguments named before anything starts.  The launched JAX runs are in
tests/test_multiprocess.py."""

import io
import os
import sys
import time

import pytest

from shufflesgd import launch


def python(code):
    return [sys.executable, "-c", code]


def test_launcher_stops_the_others_when_one_fails():
    code = "import os, sys, time\nif os.environ['SHUFFLESGD_PROCESS_ID'] == '1': sys.exit(3)\n"
    code += "time.sleep(60)"
    log, start = io.StringIO(), time.monotonic()
    assert launch.launch(python(code), 3, out=log) == 3
    assert time.monotonic() - start < 30  # the others were stopped, not awaited
    text = log.getvalue()
    assert "process 1 of 3 exited with status 3; stopping the other processes" in text
    assert "0 was killed by signal SIGTERM" in text and "2 was killed by signal SIGTERM" in text


def test_launcher_reports_a_signal_and_a_timeout():
    log = io.StringIO()
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert launch.launch(python(kill), 2, out=log) == 1
    assert "was killed by signal SIGKILL" in log.getvalue()
    log = io.StringIO()
    assert launch.launch(python("import time; time.sleep(60)"), 2, timeout=1, out=log) == 124
    assert "timed out after 1 s; stopping processes [0, 1]" in log.getvalue()


def test_launcher_sets_each_process_environment():
    code = "import os\nprint(*(os.environ[k] for k in ('SHUFFLESGD_COORDINATOR', "
    code += "'SHUFFLESGD_NUM_PROCESSES', 'SHUFFLESGD_PROCESS_ID', 'JAX_PLATFORMS', 'XLA_FLAGS')))"
    base = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --other=1"}
    log = io.StringIO()
    assert launch.launch(python(code), 2, devices_per_process=3, port=4321, env=base, out=log) == 0
    lines = sorted(log.getvalue().splitlines())
    flags = "--other=1 --xla_force_host_platform_device_count=3"
    assert lines == [f"[{i}] 127.0.0.1:4321 2 {i} cpu {flags}" for i in range(2)]
    port = launch.free_port()
    assert 0 < port < 65536


@pytest.mark.parametrize(
    "arguments,field",
    [
        (dict(command="python", num_processes=2), "command"),
        (dict(command=[], num_processes=2), "command"),
        (dict(command=["python"], num_processes=0), "num_processes"),
        (dict(command=["python"], num_processes=2, devices_per_process=0), "devices_per_process"),
        (dict(command=["python"], num_processes=2, port=70000), "port"),
        (dict(command=["python"], num_processes=2, timeout=-1), "timeout"),
    ],
)
def test_bad_launch_arguments_raise(arguments, field):
    with pytest.raises(ValueError, match=field):
        launch.launch(**arguments)


def test_command_line(capsys):
    code = "import os; print(os.environ['SHUFFLESGD_PROCESS_ID'])"
    assert launch.main(["--num-processes", "2", "--", *python(code)]) == 0
    assert sorted(capsys.readouterr().out.split()) == ["0", "1", "[0]", "[1]"]
    with pytest.raises(SystemExit):
        launch.main(["--num-processes", "2", "--"])
    assert "command must be a non-empty list" in capsys.readouterr().err
