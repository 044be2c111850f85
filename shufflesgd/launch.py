"""Run one program as several local JAX processes: the laptop stand-in for a cluster.

``python -m shufflesgd.launch --num-processes N [--devices-per-process K] [--port P]
[--timeout S] -- <command ...>`` starts ``N`` copies of the command on this machine, each
on the CPU with ``K`` forced host devices, and sets for process ``i``:

* ``SHUFFLESGD_COORDINATOR=127.0.0.1:P`` (a free port when ``--port`` is not given),
  ``SHUFFLESGD_NUM_PROCESSES=N``, ``SHUFFLESGD_PROCESS_ID=i`` -- read by
  :func:`shufflesgd.parallel.initialize_distributed` called with no arguments, which
  joins the processes through :func:`jax.distributed.initialize` (gloo collectives);
* ``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS`` with ``--xla_force_host_platform_device_count=K``
  (replacing any device count already there, keeping the other flags).

Every line a process prints (stdout and stderr) is echoed prefixed with ``[i]``.  The run
succeeds when every process exits with status 0.  When one fails (non-zero status, or
killed by a signal), the others are terminated at once -- they would otherwise wait for it
at their next collective -- and the launcher reports which process failed and how, every
process's exit, and which process printed a Python traceback first; it exits non-zero.
After ``--timeout`` seconds all are stopped and it exits with status 124.  :func:`launch`
is the function behind the command.  POSIX only (process groups, signals).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

from shufflesgd._checks import check_int
from shufflesgd.parallel import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")

#: The exit status after ``--timeout``, as coreutils' ``timeout(1)``.
TIMED_OUT = 124

_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL when stopping the others

_POLL_SECONDS = 0.05  # how often the processes' states are read


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_environment(
    process_id: int,
    num_processes: int,
    port: int,
    devices_per_process: int,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of local process ``process_id``: ``base`` (default ``os.environ``)
    with the ``SHUFFLESGD_*`` settings, ``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS`` forcing
    ``devices_per_process`` host devices."""
    env = dict(os.environ if base is None else base)
    flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env.update(
        {
            COORDINATOR_ENV: f"127.0.0.1:{port}",
            NUM_PROCESSES_ENV: str(num_processes),
            PROCESS_ID_ENV: str(process_id),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join(flags),
        }
    )
    return env


def _describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by signal {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


_TRACEBACK = "Traceback (most recent call last):"


def _echo(
    process_id: int,
    stream: TextIO,
    out: TextIO,
    lock: threading.Lock,
    tracebacks: dict[int, float],
) -> None:
    """Copy ``stream`` to ``out`` line by line, prefixed; note when a Python traceback first
    shows (an uncaught exception is printed before JAX's exit barrier, which can then fail
    every process at once, hiding which one raised)."""
    for line in stream:
        line = line if line.endswith("\n") else line + "\n"
        with lock:
            if line.startswith(_TRACEBACK):
                tracebacks.setdefault(process_id, time.monotonic())
            out.write(f"[{process_id}] {line}")
            out.flush()


def _stop(processes: Sequence[subprocess.Popen]) -> None:
    """SIGTERM every live process's group, then SIGKILL those still there after the grace."""
    live = [p for p in processes if p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + _GRACE_SECONDS
    for p in live:
        try:
            p.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int = 1,
    port: int | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    """Run ``command`` as ``num_processes`` local processes of one JAX run; return 0 when
    all succeed, else a non-zero status (the failed process's status, 1 for a signal,
    :data:`TIMED_OUT` after ``timeout`` seconds).

    ``command`` is an argument list (``[sys.executable, "script.py", ...]``); each process
    gets :func:`process_environment` (over ``env``, default ``os.environ``) with the
    coordinator at ``127.0.0.1:port`` (a :func:`free_port` when ``None``).  Output lines are
    written to ``out`` (default ``sys.stdout``) prefixed ``[i]``; the launcher's own
    messages, prefixed ``shufflesgd.launch:``, go there too.  When a process fails the
    others are stopped (SIGTERM, then SIGKILL after a grace period), so a run never hangs
    on a dead peer.

    A process that raises a Python exception prints its traceback, then waits at JAX's exit
    barrier for the others (``shutdown_timeout`` of
    :func:`shufflesgd.parallel.initialize_distributed`) until JAX fails every process; the
    launcher then names the process whose traceback came first.

    Raises ``ValueError`` naming ``command``, ``num_processes``, ``devices_per_process``,
    ``port`` or ``timeout`` when invalid, before anything starts.
    """
    if isinstance(command, str) or not command or not all(isinstance(c, str) for c in command):
        raise ValueError(f"command must be a non-empty list of str, got command={command!r}")
    num_processes = check_int("num_processes", num_processes)
    devices_per_process = check_int("devices_per_process", devices_per_process)
    if port is None:
        port = free_port()
    elif check_int("port", port) > 65535:
        raise ValueError(f"port must be in 1..65535, got port={port!r}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise ValueError(f"timeout must be a positive number of seconds, got timeout={timeout!r}")
    out = sys.stdout if out is None else out
    lock = threading.Lock()

    def say(message: str) -> None:
        with lock:
            out.write(f"shufflesgd.launch: {message}\n")
            out.flush()

    processes: list[subprocess.Popen] = []
    echoes: list[threading.Thread] = []
    tracebacks: dict[int, float] = {}
    status = 0
    try:
        for i in range(num_processes):
            p = subprocess.Popen(
                list(command),
                env=process_environment(i, num_processes, port, devices_per_process, env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,  # its own process group: stopped with its children
            )
            processes.append(p)
            echo = threading.Thread(
                target=_echo, args=(i, p.stdout, out, lock, tracebacks), daemon=True
            )
            echo.start()
            echoes.append(echo)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            failed = [(i, p.returncode) for i, p in enumerate(processes) if p.poll()]
            if failed:
                i, code = failed[0]
                say(
                    f"process {i} of {num_processes} {_describe_exit(code)}; "
                    "stopping the other processes"
                )
                status = code if code > 0 else 1
                break
            if all(p.returncode == 0 for p in processes):
                break
            if deadline is not None and time.monotonic() > deadline:
                running = [i for i, p in enumerate(processes) if p.returncode is None]
                say(f"timed out after {timeout} s; stopping processes {running}")
                status = TIMED_OUT
                break
            time.sleep(_POLL_SECONDS)
    finally:
        _stop(processes)
        for echo in echoes:
            echo.join()
        for p in processes:
            p.stdout.close()
    if status:
        statuses = ", ".join(f"{i} {_describe_exit(p.returncode)}" for i, p in enumerate(processes))
        say(f"processes: {statuses}")
        if tracebacks:
            first = min(tracebacks, key=tracebacks.get)
            say(f"process {first} printed a Python traceback first (above, prefixed [{first}])")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module's docstring); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m shufflesgd.launch",
        description="Run a command as several local JAX processes on the CPU.",
    )
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--timeout", type=float, default=None, help="seconds; default: none")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command [args ...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        return launch(
            command,
            args.num_processes,
            devices_per_process=args.devices_per_process,
            port=args.port,
            timeout=args.timeout,
        )
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
