r"""Meshes and shardings: the n workers of a distributed sum laid out over devices.

The error-feedback methods (:mod:`shufflesgd.error_feedback`) keep their per-worker
state stacked on a leading axis ``n`` and ``vmap`` the per-worker work over it; the only
cross-worker operation is the mean of the compressed messages.  So scaling out needs no
new algorithm: shard that leading axis over a mesh axis (``"workers"``) with
``NamedSharding(mesh, jax.P("workers"))`` and let XLA partition the same program.

* :func:`worker_mesh` -- a 1-D mesh over the first ``num_devices`` devices;
* :func:`shard_workers` -- place a worker-stacked pytree with its leading axis sharded;
* :func:`shard_problem` -- place a :class:`~shufflesgd.problems.DistributedSum`: worker
  data sharded, the small rest (optimum, constants) replicated;
* :func:`make_sharded_distributed_run` -- :func:`shufflesgd.training.make_distributed_run`
  jitted with the problem's data sharded over the mesh; it returns the same numbers as the
  single-device run.

The meshes here use :attr:`jax.sharding.AxisType.Auto` ("XLA propagates the sharding"):
the library's algorithms are written without sharding annotations (``vmap`` over a
worker axis, per-worker state initialised by broadcasting, ``lax.scan`` carries), which
``Explicit`` axes -- the default of :func:`jax.make_mesh` -- would reject.  A mesh with
``Explicit`` axes may be passed; it is used through an ``Auto`` copy over the same
devices.  Multi-host runs call :func:`jax.distributed.initialize` first; the mesh then
spans every process's devices (see the README).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding

from shufflesgd import training
from shufflesgd._checks import check_int
from shufflesgd.error_feedback import ErrorFeedback
from shufflesgd.problems import DistributedSum
from shufflesgd.training import DistributedResult

PyTree = Any
WORKERS = "workers"


def _auto(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis ``Auto`` (the same devices, names and shape)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.axis_names:
        raise ValueError(f"axis={axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}")
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
    return jax.make_mesh((int(num_devices),), (axis,), (AxisType.Auto,),
                         devices=jax.devices()[: int(num_devices)])


def worker_sharding(mesh: Mesh, axis: str = WORKERS) -> NamedSharding:
    """``NamedSharding(mesh, P(axis))``: leading (worker) axis split over ``axis``."""
    _axis_size(mesh, axis)
    return NamedSharding(_auto(mesh), jax.P(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P())``: a full copy on every device of ``mesh``."""
    return NamedSharding(_auto(mesh), jax.P())


def _check_worker_counts(mesh: Mesh, tree: PyTree, axis: str) -> int:
    size = _axis_size(mesh, axis)
    leaves = jax.tree.leaves(tree)
    counts = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if None in counts:
        raise ValueError("mismatched worker counts: every leaf needs a leading worker axis, got a scalar")
    if len(counts) > 1:
        raise ValueError(f"mismatched worker counts: the leaves' leading axes differ, {sorted(counts)}")
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


def problem_shardings(mesh: Mesh, problem: DistributedSum, axis: str = WORKERS) -> DistributedSum:
    """The shardings of a :class:`DistributedSum` as a pytree of the same structure:
    ``data`` (leading axes ``[n, m]``) split over ``axis``, everything else replicated."""
    rep, shard = replicated(mesh), worker_sharding(mesh, axis)
    return jax.tree.map(lambda _: rep, problem).replace(data=jax.tree.map(lambda _: shard, problem.data))


def shard_problem(mesh: Mesh, problem: DistributedSum, axis: str = WORKERS) -> DistributedSum:
    """Place ``problem`` on ``mesh``: each device holds the data of its ``n/k`` workers.

    Raises ``ValueError`` ("mismatched worker counts") when ``problem.num_workers`` is not
    divisible by the size of the mesh axis.
    """
    _check_worker_counts(mesh, problem.data, axis)
    return jax.device_put(problem, problem_shardings(mesh, problem, axis))


class ShardedRun(NamedTuple):
    """A compiled-once distributed run whose problem lives sharded on a mesh.

    Call it as ``run(key, x0, step_size) -> DistributedResult`` (the signature of
    :func:`shufflesgd.training.make_distributed_run`'s ``run``).

    Attributes:
      jitted: ``jitted(problem, key, x0, step_size)``, the jitted program; the problem is an
        argument (not a constant baked into the program), so any problem of the same shapes
        reuses it.
      problem: the problem, placed with :func:`shard_problem`.
      mesh: the mesh (with ``Auto`` axes) that the program is partitioned over.
    """

    jitted: Callable[..., DistributedResult]
    problem: DistributedSum
    mesh: Mesh

    def __call__(self, key: jax.Array, x0: jax.Array, step_size: jax.Array) -> DistributedResult:
        training.check_learning_rate(step_size)
        return self.jitted(self.problem, key, x0, step_size)

    def lower(self, key: jax.Array, x0: jax.Array, step_size: jax.Array):
        """``jax.jit(...).lower`` for these arguments: ``.compile().as_text()`` is the
        partitioned HLO, where the cross-device traffic shows as collectives."""
        return self.jitted.lower(self.problem, key, x0, step_size)


def make_sharded_distributed_run(
    problem: DistributedSum,
    method: ErrorFeedback,
    mesh: Mesh,
    *,
    num_steps: int,
    batch_size: int | None = None,
    scheme: str = "random_reshuffle",
    axis: str = WORKERS,
) -> ShardedRun:
    r""":func:`shufflesgd.training.make_distributed_run`, with the workers spread over ``mesh``.

    The problem's worker data (leading axes ``[n, m]``) is placed with its worker axis
    split over ``axis`` (device ``j`` of ``k`` holds workers ``j n/k, ..., (j+1)n/k - 1``)
    and passed to one ``jax.jit`` with those ``in_shardings``; inside it the very same
    ``make_distributed_run(problem, method, ...)`` is built and run, and XLA's partitioner
    propagates the sharding from the data to everything stacked over workers: the
    gradients, the error-feedback memories :math:`g_i` (or :math:`e_i`), the compressor
    states and the local shuffling orders stay on the device of their worker (no sharding
    constraints were needed).  The server-side quantities (model :math:`x`, estimate
    :math:`g`, EF21-BC's broadcast estimate and its downlink compression, EF21-PP's
    participation draw)
    are computed redundantly on every device from replicated inputs.  Keys are
    ``fold_in(key, worker)``, so the result equals the single-device run up to the order of
    floating-point sums (the tests check this for 2, 4 and 8 devices).

    What crosses devices each step, as seen in the partitioned HLO on CPU (jax 0.10):

    * the mean :math:`\frac1n\sum_i c_i` of the compressed messages: one ``all-reduce`` of
      a ``d``-vector over ``axis``.  XLA reduces the messages *as dense arrays* (a Top-k or
      Rand-k message is a sparse vector stored densely), so the wire carries ``d`` floats
      per device, not the ``k`` values and indices that ``info.bits_up`` counts -- the bit
      counts are the accounting for a real sparse transport, not what XLA sends;
    * the per-step diagnostics ``||∇f(x)||^2`` and ``f(x) - f*`` reduce over all workers'
      data: an ``all-reduce`` of a ``d``-vector and a scalar, and one of a scalar;
      EF21-PP also all-reduces its participant count (a scalar);
    * nothing else: every compressor works on its own workers' vectors.  Top-k and Rand-k
      select through :func:`shufflesgd.compression.top_k_indices`, partitioned along the
      worker axis; a plain ``lax.top_k`` would not be (XLA all-gathers the ``[n, d]``
      values to every device before a batched TopK), and the tests check that no
      ``all-gather`` is left.

    Raises ``ValueError`` before compiling for bad run options (as
    ``make_distributed_run``), an ``axis`` missing from the mesh, or "mismatched worker
    counts" when ``problem.num_workers`` is not divisible by the mesh axis size.
    """
    mesh = _auto(mesh)
    # Validation at the edge: the worker split, and the run options (building the
    # single-device run reads only static shapes; nothing is traced).
    _check_worker_counts(mesh, problem.data, axis)
    training.make_distributed_run(problem, method, num_steps=num_steps, batch_size=batch_size, scheme=scheme)
    rep = replicated(mesh)

    def run(sharded: DistributedSum, key: jax.Array, x0: jax.Array, step_size: jax.Array) -> DistributedResult:
        inner = training.make_distributed_run(
            sharded, method, num_steps=num_steps, batch_size=batch_size, scheme=scheme
        )
        return inner(key, x0, step_size)

    jitted = jax.jit(
        run,
        in_shardings=(problem_shardings(mesh, problem, axis), rep, rep, rep),
        out_shardings=rep,
    )
    return ShardedRun(jitted, shard_problem(mesh, problem, axis), mesh)
