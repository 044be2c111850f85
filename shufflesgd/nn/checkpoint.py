r"""Orbax checkpoints of a training run, tied to the experiment that wrote them.

:class:`Checkpointer` is the one wrapper over ``orbax.checkpoint.CheckpointManager``: it
saves any pytree of arrays -- in practice a
:class:`~shufflesgd.nn.training.TrainState` (params, optimizer state, batch
statistics, shuffling-scheme state, PRNG key, step) -- with
``ocp.args.StandardSave`` under an integer step (the number of completed epochs), and
restores it with ``ocp.args.StandardRestore`` into the structure, dtypes and shardings
of a template.  Typed PRNG keys (``jax.random.key``) are stored as their raw bits
(``jax.random.key_data``) and rewrapped with the template's implementation
(``jax.random.wrap_key_data``).  Saves are asynchronous; restoring, :meth:`~Checkpointer.close` and
:meth:`~Checkpointer.wait_until_finished` wait for them.

Each checkpoint directory belongs to one experiment: its fingerprint (e.g.
:func:`experiment_fingerprint` of a name and a config) is written once into the
manager's root metadata, and opening a directory that holds another experiment's
checkpoints raises ``ValueError`` before anything is written, so a resumed run cannot
silently continue, or overwrite, a different one.  Because every step draws from
``fold_in(key, step)`` and every piece of state is saved, a run restored at epoch ``e``
and continued ends bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Self

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PyTree = Any


_FINGERPRINT = "experiment"


def experiment_fingerprint(name: str, config: Mapping[str, Any]) -> str:
    """``"<name>-<first 16 hex digits of sha256(config as sorted JSON)>"``.

    ``config`` is any mapping (an ``ml_collections.ConfigDict`` via ``to_dict()``); values
    JSON cannot encode are hashed through ``repr``.
    """
    text = json.dumps(dict(config), sort_keys=True, default=repr)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _key_data(tree: PyTree) -> PyTree:
    """``tree`` with every typed PRNG key replaced by its ``uint32`` key data."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _wrap_keys(tree: PyTree, like: PyTree) -> PyTree:
    """Undo :func:`_key_data` where ``like`` holds typed keys (same implementation)."""
    return jax.tree.map(
        lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x,
        tree,
        like,
    )


class Checkpointer:
    """Save and restore one experiment's run state in ``directory``.

    Args:
      directory: the checkpoint directory (created if missing).
      experiment: the experiment's fingerprint, e.g. :func:`experiment_fingerprint`.
      max_to_keep: keep only the newest ``max_to_keep`` checkpoints (all when ``None``).

    Raises ``ValueError`` naming ``experiment`` when ``directory`` already holds
    checkpoints of a different (or an unnamed) experiment; nothing is written then.
    """

    def __init__(
        self, directory: str | os.PathLike, experiment: str, *, max_to_keep: int | None = None
    ):
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"experiment must be a non-empty str, got experiment={experiment!r}")
        directory = os.path.abspath(os.fspath(directory))
        probe = ocp.CheckpointManager(directory)  # reads only: no metadata is passed
        stored = probe.metadata().custom_metadata.get(_FINGERPRINT)
        steps = list(probe.all_steps())
        probe.close()
        if (stored is not None or steps) and stored != experiment:
            raise ValueError(
                f"experiment={experiment!r} does not match the checkpoints in {directory} "
                f"(written by experiment {stored!r}, steps {steps}); use another directory"
            )
        self.directory = directory
        self.experiment = experiment
        self._manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep),
            metadata={_FINGERPRINT: experiment},
        )

    def save(self, step: int, state: PyTree) -> None:
        """Start saving ``state`` as checkpoint ``step`` (asynchronously)."""
        self._manager.save(step, args=ocp.args.StandardSave(_key_data(state)))

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, like: PyTree, step: int | None = None) -> PyTree:
        """Checkpoint ``step`` (default: the latest) in the structure of ``like``.

        ``like`` is a template with the saved tree's structure (e.g. a freshly initialised
        state); each leaf comes back with the template leaf's dtype and sharding, and
        typed keys come back typed.  Raises ``ValueError`` naming ``step`` when there is no
        such checkpoint.
        """
        self.wait_until_finished()
        steps = self.all_steps()
        step = self.latest_step() if step is None else step
        if step is None or step not in steps:
            raise ValueError(
                f"step={step!r} is not a checkpoint in {self.directory}; saved steps: {steps}"
            )
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(_key_data(like)))
        return _wrap_keys(restored, like)

    def wait_until_finished(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
