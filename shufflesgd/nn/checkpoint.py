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

Integrity.  Every checkpoint carries an integrity record, ``<directory>/<step>/integrity.json``,
so that a restored state cannot be silently wrong.  It holds two SHA-256 digests:

* one per **array**, computed at :meth:`~Checkpointer.save` from the in-memory leaves (typed keys
  as their key data) in the canonical leaf order of ``jax.tree_util.tree_flatten_with_path``,
  over the dtype name, the shape and the C-order bytes;
* one per **file** of the step directory, computed after Orbax's asynchronous save has finished
  (``wait_until_finished``), over what was really written.

The record is written atomically (a temporary file, ``fsync``, ``os.replace``) when the save is
known to be complete: at the next :meth:`~Checkpointer.save`, at
:meth:`~Checkpointer.wait_until_finished`, :meth:`~Checkpointer.restore` or
:meth:`~Checkpointer.close`.  A process killed between Orbax's commit and that moment leaves a
step without a record, which restores as corrupt (the previous step is then the newest intact
one).  :meth:`~Checkpointer.restore` verifies every file digest *before* Orbax reads anything,
then compares the restored arrays' digests (for the leaves whose template has the saved dtype
and shape).  A missing or unreadable record, a missing, extra, truncated or altered file, an
Orbax failure to read the step, or an array digest mismatch raise one error,
:class:`CorruptCheckpointError` (a ``ValueError``), naming the directory and the step.  When
every file is intact but Orbax still cannot restore into ``like``, the files are what was
written, so the template is wrong: that is a plain ``ValueError``, not a corruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from shufflesgd._checks import check_int

PyTree = Any


_FINGERPRINT = "experiment"
INTEGRITY_FILE = "integrity.json"
_INTEGRITY_FORMAT = 1


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files or arrays do not match the integrity record written with it
    (or that has no readable record, or that Orbax cannot read).

    Attributes:
      directory: the checkpoint directory.
      step: the step of the corrupt checkpoint (``None`` for the directory's root metadata).
      reason: what was found wrong.
    """

    def __init__(self, directory: str, step: int | None, reason: str):
        self.directory, self.step, self.reason = directory, step, reason
        where = "the root metadata" if step is None else f"checkpoint step {step}"
        super().__init__(f"{where} in {directory} is corrupt: {reason}")


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digests(step_dir: pathlib.Path) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"size", "sha256"}}`` of every file under ``step_dir`` except
    the integrity record itself."""
    files = {}
    for path in sorted(step_dir.rglob("*")):
        relative = path.relative_to(step_dir).as_posix()
        if path.is_file() and relative not in (INTEGRITY_FILE, INTEGRITY_FILE + ".tmp"):
            files[relative] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
    return files


def _array_digests(tree: PyTree) -> list[dict[str, Any]]:
    """``[{"path", "dtype", "shape", "sha256"}]`` of every leaf of ``tree`` (no typed keys), in
    ``tree_flatten_with_path`` order; the digest covers the dtype name, the shape and the
    C-order bytes."""
    records = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        digest = hashlib.sha256(f"{array.dtype.name}|{array.shape}|".encode())
        digest.update(array.tobytes())
        records.append(
            {
                "path": jax.tree_util.keystr(path),
                "dtype": array.dtype.name,
                "shape": list(array.shape),
                "sha256": digest.hexdigest(),
            }
        )
    return records


def _write_atomically(path: pathlib.Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


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

    Raises ``ValueError`` naming ``experiment`` when it is not a non-empty str, or
    ``max_to_keep`` unless it is ``None`` or a positive int, before touching ``directory``;
    ``ValueError`` naming ``experiment`` when ``directory`` already holds
    checkpoints of a different (or an unnamed) experiment; nothing is written then.  Raises
    :class:`CorruptCheckpointError` (step ``None``) when Orbax cannot read the directory's root
    metadata.
    """

    def __init__(
        self, directory: str | os.PathLike, experiment: str, *, max_to_keep: int | None = None
    ):
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"experiment must be a non-empty str, got experiment={experiment!r}")
        if max_to_keep is not None:
            max_to_keep = check_int("max_to_keep", max_to_keep)
        directory = os.path.abspath(os.fspath(directory))
        try:
            probe = ocp.CheckpointManager(directory)  # reads only: no metadata is passed
            stored = probe.metadata().custom_metadata.get(_FINGERPRINT)
            steps = list(probe.all_steps())
            probe.close()
        except Exception as error:  # Orbax raises JSONDecodeError, KeyError, ... here
            raise CorruptCheckpointError(
                directory, None, f"{type(error).__name__}: {error}"
            ) from error
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
        self._pending: list[tuple[int, list[dict[str, Any]]]] = []

    def save(self, step: int, state: PyTree) -> None:
        """Start saving ``state`` as checkpoint ``step`` (asynchronously).

        The arrays' digests are taken now, from ``state``; the files' digests and the
        integrity record follow once Orbax has finished writing (see the module docstring).
        ``ValueError`` naming ``step`` unless it is a non-negative int.
        """
        step = check_int("step", step, minimum=0)
        self._seal_pending()
        tree = _key_data(state)
        arrays = _array_digests(tree)
        if self._manager.save(step, args=ocp.args.StandardSave(tree)):
            self._pending.append((int(step), arrays))

    def _step_dir(self, step: int) -> pathlib.Path:
        return pathlib.Path(self.directory) / str(step)

    def _seal_pending(self) -> None:
        """Wait for Orbax, then write the integrity record of every step saved since."""
        self._manager.wait_until_finished()
        pending, self._pending = self._pending, []
        for step, arrays in pending:
            step_dir = self._step_dir(step)
            if not step_dir.is_dir():  # already removed by ``max_to_keep``
                continue
            record = {
                "format": _INTEGRITY_FORMAT,
                "experiment": self.experiment,
                "step": step,
                "arrays": arrays,
                "files": _file_digests(step_dir),
            }
            _write_atomically(step_dir / INTEGRITY_FILE, json.dumps(record, indent=1))

    def _corrupt(self, step: int, reason: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(self.directory, step, reason)

    def verify(self, step: int) -> dict[str, Any]:
        """Check checkpoint ``step``'s files against its integrity record, reading no array.

        Returns the record; raises :class:`CorruptCheckpointError` naming the directory and
        ``step`` when the record is missing or unreadable, or a file is missing, extra,
        resized or altered.
        """
        self._seal_pending()
        step_dir = self._step_dir(step)
        try:
            record = json.loads((step_dir / INTEGRITY_FILE).read_text())
            expected = record["files"]
            arrays = record["arrays"]
            if record.get("format") != _INTEGRITY_FORMAT or record.get("step") != step:
                raise ValueError(f"format {record.get('format')!r}, step {record.get('step')!r}")
            if not isinstance(expected, dict) or not isinstance(arrays, list):
                raise ValueError("'files' or 'arrays' has the wrong type")
        except FileNotFoundError:
            raise self._corrupt(step, f"its integrity record {INTEGRITY_FILE} is missing") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise self._corrupt(
                step, f"its integrity record {INTEGRITY_FILE} is unreadable ({error})"
            ) from error
        found = _file_digests(step_dir)
        problems = [f"{name} is missing" for name in sorted(set(expected) - set(found))]
        problems += [f"{name} is unexpected" for name in sorted(set(found) - set(expected))]
        for name in sorted(set(expected) & set(found)):
            want, got = expected[name], found[name]
            if want.get("size") != got["size"]:
                problems.append(f"{name} has {got['size']} bytes, {want.get('size')} written")
            elif want.get("sha256") != got["sha256"]:
                problems.append(f"{name} does not match its SHA-256")
        if problems:
            raise self._corrupt(step, "; ".join(problems))
        return record

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
        such checkpoint, :class:`CorruptCheckpointError` naming the directory and ``step`` when
        the checkpoint fails :meth:`verify`, Orbax cannot read it, or a restored array's digest
        differs from the saved one, and a plain ``ValueError`` when the files are intact but
        do not fit ``like``.
        """
        self.wait_until_finished()
        steps = self.all_steps()
        step = self.latest_step() if step is None else step
        if step is None or step not in steps:
            raise ValueError(
                f"step={step!r} is not a checkpoint in {self.directory}; saved steps: {steps}"
            )
        record = self.verify(step)
        template = _key_data(like)
        try:
            restored = self._manager.restore(step, args=ocp.args.StandardRestore(template))
        except Exception as error:  # files intact (verified above): the template does not fit
            raise ValueError(
                f"checkpoint step {step} in {self.directory} is intact but cannot be restored "
                f"into the given template ({type(error).__name__}: {error})"
            ) from error
        saved = record["arrays"]
        found = _array_digests(restored)
        if len(found) != len(saved):
            raise self._corrupt(step, f"{len(found)} arrays restored, {len(saved)} saved")
        for want, got in zip(saved, found):
            comparable = (want.get("dtype"), want.get("shape")) == (got["dtype"], got["shape"])
            if comparable and want.get("sha256") != got["sha256"]:
                raise self._corrupt(
                    step, f"restored array {got['path']} does not match its SHA-256"
                )
        return _wrap_keys(restored, like)

    def delete(self, step: int) -> None:
        """Delete checkpoint ``step`` (e.g. a corrupt one, before saving that step again)."""
        self._seal_pending()
        self._manager.delete(step)

    def wait_until_finished(self) -> None:
        """Block until pending asynchronous saves are on disk, with their integrity records."""
        self._seal_pending()

    def close(self) -> None:
        """Finish pending saves (integrity records included) and release the manager."""
        self._seal_pending()
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
