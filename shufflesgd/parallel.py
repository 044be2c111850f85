r"""Meshes and shardings, and nothing else: where the worker axis of a distributed sum and
the batch axis of data-parallel training live on devices.

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
used through an ``Auto`` copy over the same devices.  Multi-host runs call
:func:`jax.distributed.initialize` first; the mesh then spans every process's devices.
"""

from __future__ import annotations

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
