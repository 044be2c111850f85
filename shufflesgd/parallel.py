r"""Meshes and shardings -- where the worker axis of a distributed sum and the batch axis of
data-parallel training live on devices -- and the multi-process set-up through
:mod:`jax.distributed`.

The library's algorithms are written without sharding annotations: per-worker state is
stacked on a leading axis ``n`` and the per-worker work is ``vmap``-ped over it, and a
minibatch is one array with a leading batch axis.  Scaling out therefore needs no new
algorithm: shard that leading axis over a mesh axis with
``NamedSharding(mesh, jax.P(axis))`` and let XLA partition the same program.

* :func:`worker_mesh`, :func:`worker_sharding`, :func:`shard_workers` -- a 1-D mesh over
  the first ``num_devices`` devices with the axis ``"workers"``, and a worker-stacked pytree
  placed with its leading axis sharded over it (the distributed runs built on this are in
  :mod:`shufflesgd.compression.sharded`);
* :func:`data_mesh`, :func:`check_data_axis`, :func:`shard_batch` -- the same for the
  ``"data"`` axis of data-parallel training (:mod:`shufflesgd.nn.training`);
* :func:`replicated` -- the sharding of what every device holds whole.

The meshes here use :attr:`jax.sharding.AxisType.Auto` ("XLA propagates the sharding"):
``vmap`` over a worker axis, per-worker state initialised by broadcasting and ``lax.scan``
carries are written without annotations, which ``Explicit`` axes -- the default of
:func:`jax.make_mesh` -- would reject.  A mesh with ``Explicit`` axes may be passed; it is
used through an ``Auto`` copy over the same devices.

Several processes (hosts, or local processes on one machine) run the same program through
JAX's own distributed runtime, :func:`jax.distributed.initialize`; the meshes above then
span every process's devices and the same jitted programs run on them.  What changes is how
inputs reach the devices: each process places only what its own devices hold, or passes
the same host value on every process.

* :func:`initialize_distributed` -- the validated call to :func:`jax.distributed.initialize`
  (explicit settings, the ``SHUFFLESGD_*`` variables that :mod:`shufflesgd.launch` sets, or
  JAX's own detection of SLURM, Open MPI and Cloud TPU), with gloo collectives on CPU;
* :func:`process_rows`, :func:`shard_process_rows` -- which rows of a sharded leading axis
  this process holds, and the global array built from every process's own rows;
* :func:`put_replicated` -- a pytree (typed PRNG keys included) whole on every device;
* :func:`is_main_process` -- whether this is process 0, the one that writes results.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from shufflesgd._checks import check_int

PyTree = Any


WORKERS = "workers"


def _auto(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis ``Auto`` (the same devices, names and shape)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.axis_names:
        raise ValueError(
            f"axis={axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}"
        )
    return int(mesh.shape[axis])


def worker_mesh(num_devices: int | None = None, axis: str = WORKERS) -> Mesh:
    """A 1-D mesh named ``axis`` over the first ``num_devices`` of :func:`jax.devices`
    (all of them when ``None``; in a multi-process run, the devices of every process).

    Raises ``ValueError`` when ``num_devices`` is not a positive int no larger than the
    number of devices available.
    """
    available = jax.device_count()
    if num_devices is None:
        num_devices = available
    num_devices = check_int("num_devices", num_devices)
    if num_devices > available:
        raise ValueError(
            f"num_devices={num_devices} exceeds the {available} available devices "
            "(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
        )
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"axis must be a non-empty str, got axis={axis!r}")
    return jax.make_mesh(
        (int(num_devices),), (axis,), (AxisType.Auto,), devices=jax.devices()[: int(num_devices)]
    )


def worker_sharding(mesh: Mesh, axis: str = WORKERS) -> NamedSharding:
    """``NamedSharding(mesh, P(axis))``: leading (worker) axis split over ``axis``."""
    _axis_size(mesh, axis)
    return NamedSharding(_auto(mesh), jax.P(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P())``: a full copy on every device of ``mesh``."""
    return NamedSharding(_auto(mesh), jax.P())


def put_replicated(mesh: Mesh, tree: PyTree) -> PyTree:
    """Place every leaf of ``tree`` whole on every device of ``mesh`` (:func:`replicated`),
    typed PRNG keys included.

    In a single-process run this is ``jax.device_put(tree, replicated(mesh))``.  In a
    multi-process run every process passes the same values (JAX checks that they agree)
    and gets global arrays.  :func:`jax.device_put` itself refuses there a typed key
    (``jax.random.key``) and an array committed to one of this process's devices, so such
    leaves go through the host (a key as its :func:`jax.random.key_data`, wrapped back).
    """
    sharding = replicated(mesh)
    multi_process = jax.process_count() > 1

    def put(leaf: Any) -> jax.Array:
        is_key = isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
            leaf.dtype, jax.dtypes.prng_key
        )
        value = jax.random.key_data(leaf) if is_key else leaf
        if multi_process and isinstance(value, jax.Array) and value.is_fully_addressable:
            value = np.asarray(value)
        placed = jax.device_put(value, sharding)
        if is_key:
            return jax.random.wrap_key_data(placed, impl=jax.random.key_impl(leaf))
        return placed

    return jax.tree.map(put, tree)


def _check_worker_counts(mesh: Mesh, tree: PyTree, axis: str) -> int:
    size = _axis_size(mesh, axis)
    leaves = jax.tree.leaves(tree)
    counts = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if None in counts:
        raise ValueError(
            "mismatched worker counts: every leaf needs a leading worker axis, got a scalar"
        )
    if len(counts) > 1:
        raise ValueError(
            f"mismatched worker counts: the leaves' leading axes differ, {sorted(counts)}"
        )
    if not counts:
        return 0
    (n,) = counts
    if n % size:
        raise ValueError(
            f"mismatched worker counts: {n} workers do not split evenly over the {size} devices "
            f"of mesh axis {axis!r}; use a number of workers divisible by {size}"
        )
    return n


def shard_workers(mesh: Mesh, tree: PyTree, axis: str = WORKERS) -> PyTree:
    """Place a worker-stacked pytree (every leaf has leading axis ``n``) with that axis
    sharded over ``axis`` of ``mesh``: device ``j`` holds workers ``j n/k .. (j+1) n/k - 1``.

    Raises ``ValueError`` ("mismatched worker counts") when ``n`` is not divisible by the
    size ``k`` of the mesh axis or the leaves disagree on ``n``.  In a multi-process run
    every process passes the same global array here (or builds the array itself from its
    own rows with :func:`jax.make_array_from_process_local_data` and this sharding).
    """
    _check_worker_counts(mesh, tree, axis)
    return jax.device_put(tree, worker_sharding(mesh, axis))


DATA_AXIS = "data"


def data_mesh(num_devices: int | None = None, axis: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh named ``axis`` (``"data"``) over the first ``num_devices`` devices."""
    return worker_mesh(num_devices, axis=axis)


def check_data_axis(mesh: Mesh, axis: str, batch_size: int) -> None:
    """``ValueError`` naming ``axis`` when ``mesh`` lacks it, or naming ``batch_size`` when
    the batch does not split evenly over that axis's devices."""
    if axis not in mesh.axis_names:
        raise ValueError(
            f"axis={axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}"
        )
    size = int(mesh.shape[axis])
    if batch_size % size:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {size} devices of mesh axis {axis!r}"
        )


def shard_batch(
    batch: Mapping[str, Any], mesh: Mesh, axis: str = DATA_AXIS
) -> dict[str, jax.Array]:
    """Place a host batch with its leading (example) axis split over ``axis`` of ``mesh``,
    i.e. on ``NamedSharding(mesh, P(axis))``: device ``j`` of ``k`` holds examples
    ``j B/k .. (j+1) B/k - 1``.

    Raises ``ValueError`` naming ``batch_size`` when ``B`` is not divisible by the size of
    the mesh axis.
    """
    sizes = {np.shape(v)[0] for v in batch.values()}
    if len(sizes) != 1:
        raise ValueError(f"batch entries must share one leading axis, got sizes {sorted(sizes)}")
    (batch_size,) = sizes
    check_data_axis(mesh, axis, batch_size)
    return jax.device_put(dict(batch), worker_sharding(mesh, axis))


COORDINATOR_ENV = "SHUFFLESGD_COORDINATOR"
NUM_PROCESSES_ENV = "SHUFFLESGD_NUM_PROCESSES"
PROCESS_ID_ENV = "SHUFFLESGD_PROCESS_ID"


def check_coordinator_address(coordinator_address: Any) -> str:
    """``coordinator_address`` unchanged when it is ``"host:port"`` (an IPv6 host in
    brackets, ``"[::1]:1234"``) with a port in ``1..65535``; ``ValueError`` naming
    ``coordinator_address`` otherwise."""
    host, sep, port = str(coordinator_address).rpartition(":")
    if (
        not isinstance(coordinator_address, str)
        or not sep
        or not host.strip("[]")
        or any(c.isspace() for c in coordinator_address)
        or not port.isdigit()
        or not 0 < int(port) < 65536
    ):
        raise ValueError(
            "coordinator_address must be 'host:port' with a port in 1..65535, "
            f"got coordinator_address={coordinator_address!r}"
        )
    return coordinator_address


def wait_for_coordinator(coordinator_address: str, timeout: float) -> None:
    """Return once something accepts a TCP connection at ``coordinator_address``; raise
    ``ConnectionError`` naming ``coordinator_address`` when nothing has within ``timeout``
    seconds.  Processes other than 0 check this before joining: JAX itself aborts the whole
    process (a fatal log, no exception) when the coordinator never answers."""
    host, _, port = coordinator_address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"coordinator_address={coordinator_address!r} is unreachable: nothing "
                    f"accepted a connection there within {timeout:g} s ({error}); is process 0 "
                    "running, and is the address the one it listens on?"
                ) from error
            time.sleep(0.2)


def _settings_from_environment() -> tuple[str, int, int] | None:
    """The ``SHUFFLESGD_*`` settings when any is set (all three then required), else None."""
    names = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV)
    values = {name: os.environ.get(name) for name in names}
    if all(value is None for value in values.values()):
        return None
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ValueError(
            f"partial distributed settings in the environment: {', '.join(names)} go together; "
            f"{', '.join(missing)} is not set"
        )
    numbers = {}
    for name in (NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        try:
            numbers[name] = int(values[name])
        except ValueError:
            raise ValueError(f"{name} must be an int, got {name}={values[name]!r}") from None
    return values[COORDINATOR_ENV], numbers[NUM_PROCESSES_ENV], numbers[PROCESS_ID_ENV]


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
    heartbeat_timeout: int = 100,
    shutdown_timeout: int = 300,
) -> None:
    """Join this process to a multi-process run: :func:`jax.distributed.initialize`, after
    checking its settings.  Call it first, before any other JAX operation.

    The settings come from, in this order:

    1. the arguments ``coordinator_address`` (``"host:port"`` of process 0, which starts
       the coordination service there), ``num_processes`` and ``process_id`` (in
       ``0 .. num_processes - 1``): all three or none;
    2. with none given, the environment variables ``SHUFFLESGD_COORDINATOR``,
       ``SHUFFLESGD_NUM_PROCESSES`` and ``SHUFFLESGD_PROCESS_ID`` (all three or none), which
       :mod:`shufflesgd.launch` sets for each local process it starts;
    3. with neither, JAX's own detection of the cluster (SLURM, Open MPI, Cloud TPU, and
       ``JAX_COORDINATOR_ADDRESS``), which raises where there is none.

    On CPU, processes exchange collectives through gloo: ``jax_cpu_collectives_implementation``
    (JAX's default there) is set to ``"gloo"`` when unset and left alone when another
    implementation (``"mpi"``) was chosen.  The timeouts, in seconds, are JAX's: how long to
    wait for every process to connect, after how long without heartbeats a process counts
    as dead, and how long a finishing process waits at the exit barrier for the others --
    so a process that raises holds the run that long before every process fails; shorten
    ``shutdown_timeout`` to fail fast.

    Raises ``ValueError`` naming the setting -- ``coordinator_address`` not ``host:port``,
    ``num_processes`` not a positive int, ``process_id`` outside ``[0, num_processes)``, a
    timeout not a positive int, some but not all settings given (as arguments, or as
    environment variables) -- before anything starts; ``ConnectionError`` naming
    ``coordinator_address`` when a process other than 0 finds nothing listening there within
    ``initialization_timeout`` (:func:`wait_for_coordinator`); and ``RuntimeError`` when
    called twice or after JAX has started its backends.
    """
    for name, value in (
        ("initialization_timeout", initialization_timeout),
        ("heartbeat_timeout", heartbeat_timeout),
        ("shutdown_timeout", shutdown_timeout),
    ):
        check_int(name, value)
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if any(value is not None for value in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(
                "partial distributed settings: coordinator_address, num_processes and "
                f"process_id are given together (or none of them); missing {', '.join(missing)}"
            )
        settings = (coordinator_address, num_processes, process_id)
    else:
        settings = _settings_from_environment()
    if settings is not None:
        coordinator_address, num_processes, process_id = settings
        check_coordinator_address(coordinator_address)
        num_processes = check_int("num_processes", num_processes)
        process_id = check_int("process_id", process_id, minimum=0)
        if process_id >= num_processes:
            raise ValueError(
                f"process_id must be in [0, num_processes) = [0, {num_processes}), "
                f"got process_id={process_id}"
            )
        if process_id > 0:
            wait_for_coordinator(coordinator_address, initialization_timeout)
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
        shutdown_timeout_seconds=shutdown_timeout,
    )


def is_main_process() -> bool:
    """Whether this is process 0 of the run (always, in a single-process run): the one
    that writes results and logs."""
    return jax.process_index() == 0


def _local_positions(mesh: Mesh, axis: str) -> list[int]:
    """The positions along ``axis`` (``0 .. size - 1``) held by this process's devices."""
    size = _axis_size(mesh, axis)
    indices = worker_sharding(mesh, axis).addressable_devices_indices_map((size,))
    return sorted({range(size)[index[0]][0] for index in indices.values()})


def process_rows(mesh: Mesh, num_rows: int, axis: str = DATA_AXIS) -> slice:
    """The rows ``start:stop`` of a leading axis of ``num_rows`` split over ``axis`` of
    ``mesh`` that live on this process's devices: what this process feeds to
    :func:`shard_process_rows`.  In a single-process run, all of them.

    Raises ``ValueError`` naming ``num_rows`` when it is not a positive int divisible by the
    size of the axis, and ``ValueError`` when this process's positions along ``axis`` are
    not one contiguous block (the meshes of this module list each process's devices
    together, so theirs are).  A process without devices on ``mesh`` holds no rows.
    """
    num_rows = check_int("num_rows", num_rows)
    size = _axis_size(mesh, axis)
    if num_rows % size:
        raise ValueError(
            f"num_rows={num_rows} is not divisible by the {size} devices of mesh axis {axis!r}"
        )
    positions = _local_positions(mesh, axis)
    if not positions:
        return slice(0, 0)
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise ValueError(
            f"this process's devices sit at positions {positions} of mesh axis {axis!r}, "
            "not one contiguous block"
        )
    per_device = num_rows // size
    return slice(positions[0] * per_device, (positions[-1] + 1) * per_device)


def shard_process_rows(mesh: Mesh, tree: PyTree, axis: str = DATA_AXIS) -> PyTree:
    """The global arrays, leading axis split over ``axis`` of ``mesh``, whose rows
    :func:`process_rows` are this process's ``tree``:
    :func:`jax.make_array_from_process_local_data` with ``NamedSharding(mesh, P(axis))``
    applied to every leaf.

    Each process passes only its own rows, e.g. ``source[order[process_rows(mesh, B)]]``
    for a global batch of ``B`` examples; the global leading axis is the local one times
    the number of processes along ``axis``.  In a single-process run this places ``tree``
    as :func:`shard_workers` does.  Raises ``ValueError`` ("mismatched worker counts")
    when the leaves disagree on their leading axis or it does not split evenly over this
    process's devices along ``axis``.
    """
    local_size = len(_local_positions(mesh, axis))
    if not local_size:
        raise ValueError(f"this process has no devices on mesh axis {axis!r} to hold rows")
    counts = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}
    if None in counts or len(counts) > 1:
        raise ValueError(
            "mismatched worker counts: every leaf needs the same leading axis of local rows, "
            f"got {sorted(counts, key=str)}"
        )
    if counts and next(iter(counts)) % local_size:
        raise ValueError(
            f"mismatched worker counts: {next(iter(counts))} local rows do not split evenly "
            f"over this process's {local_size} devices along mesh axis {axis!r}"
        )
    sharding = worker_sharding(mesh, axis)
    return jax.tree.map(lambda leaf: jax.make_array_from_process_local_data(sharding, leaf), tree)
