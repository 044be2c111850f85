r"""Compressed distributed runs with the workers spread over a device mesh.

The error-feedback methods (:mod:`shufflesgd.compression.error_feedback`) keep their
per-worker state stacked on a leading axis ``n`` and ``vmap`` the per-worker work over it;
the only cross-worker operation is the mean of the compressed messages.  So scaling out
needs no new algorithm: shard that leading axis over a mesh axis (``"workers"``) and let
XLA partition the same program.

* :func:`problem_shardings` -- the shardings of a
  :class:`~shufflesgd.problems.DistributedSum`: worker data split, the rest replicated;
* :func:`shard_problem` -- place a problem with those shardings;
* :func:`make_sharded_distributed_run` --
  :func:`~shufflesgd.compression.make_distributed_run` jitted with the problem's data
  sharded over the mesh (a :class:`ShardedRun`); it returns the same numbers as the
  single-device run.

Meshes and shardings themselves come from :mod:`shufflesgd.parallel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh

from shufflesgd.compression.distributed import DistributedResult, make_distributed_run
from shufflesgd.compression.error_feedback import ErrorFeedback
from shufflesgd.drivers import check_learning_rate
from shufflesgd.parallel import (
    WORKERS,
    _auto,
    _check_worker_counts,
    replicated,
    worker_sharding,
)
from shufflesgd.problems.distributed_sums import DistributedSum
from shufflesgd.shuffling.schemes import ShufflingScheme

PyTree = Any


def problem_shardings(mesh: Mesh, problem: DistributedSum, axis: str = WORKERS) -> DistributedSum:
    """The shardings of a :class:`DistributedSum` as a pytree of the same structure:
    ``data`` (leading axes ``[n, m]``) split over ``axis``, everything else replicated."""
    rep, shard = replicated(mesh), worker_sharding(mesh, axis)
    data = jax.tree.map(lambda _: shard, problem.data)
    return jax.tree.map(lambda _: rep, problem).replace(data=data)


def shard_problem(mesh: Mesh, problem: DistributedSum, axis: str = WORKERS) -> DistributedSum:
    """Place ``problem`` on ``mesh``: each device holds the data of its ``n/k`` workers.

    Raises ``ValueError`` ("mismatched worker counts") when ``problem.num_workers`` is not
    divisible by the size of the mesh axis.
    """
    _check_worker_counts(mesh, problem.data, axis)
    return jax.device_put(problem, problem_shardings(mesh, problem, axis))


class ShardedRun(NamedTuple):
    """A compiled-once distributed run whose problem lives sharded on a mesh.

    Call it as ``run(key, x0, step_size, *hyper) -> DistributedResult`` (the signature of
    :func:`~shufflesgd.compression.make_distributed_run`'s ``run``; ``hyper`` are the
    method's hyper-parameters, ``method.hyper``).

    Attributes:
      jitted: ``jitted(problem, key, x0, step_size, *hyper)``, the jitted program; the
        problem is an argument (not a constant baked into the program), so any problem of
        the same shapes reuses it, and so do other values of the step size and ``hyper``.
      problem: the problem, placed with :func:`shard_problem`.
      mesh: the mesh (with ``Auto`` axes) that the program is partitioned over.
      method: the error-feedback method, whose ``check`` validates ``hyper`` before a call.
    """

    jitted: Callable[..., DistributedResult]
    problem: DistributedSum
    mesh: Mesh
    method: ErrorFeedback

    def __call__(
        self, key: jax.Array, x0: jax.Array, step_size: jax.Array, *hyper: Any
    ) -> DistributedResult:
        check_learning_rate(step_size)
        self.method.check(self.problem.num_workers, *hyper)
        return self.jitted(self.problem, key, x0, step_size, *hyper)

    def lower(self, key: jax.Array, x0: jax.Array, step_size: jax.Array, *hyper: Any) -> Any:
        """``jax.jit(...).lower`` for these arguments: ``.compile().as_text()`` is the
        partitioned HLO, where the cross-device traffic shows as collectives."""
        return self.jitted.lower(self.problem, key, x0, step_size, *hyper)


def make_sharded_distributed_run(
    problem: DistributedSum,
    method: ErrorFeedback,
    mesh: Mesh,
    *,
    num_steps: int,
    batch_size: int | None = None,
    scheme: ShufflingScheme | None = None,
    axis: str = WORKERS,
) -> ShardedRun:
    r""":func:`~shufflesgd.compression.make_distributed_run`, with the workers spread over ``mesh``.

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
    make_distributed_run(problem, method, num_steps=num_steps, batch_size=batch_size, scheme=scheme)
    rep = replicated(mesh)

    def run(
        sharded: DistributedSum, key: jax.Array, x0: jax.Array, step_size: jax.Array, *hyper: Any
    ) -> DistributedResult:
        inner = make_distributed_run(
            sharded, method, num_steps=num_steps, batch_size=batch_size, scheme=scheme
        )
        return inner(key, x0, step_size, *hyper)

    jitted = jax.jit(
        run,
        in_shardings=(problem_shardings(mesh, problem, axis), rep, rep, rep)
        + (rep,) * len(method.hyper),
        out_shardings=rep,
    )
    return ShardedRun(jitted, shard_problem(mesh, problem, axis), mesh, method)
