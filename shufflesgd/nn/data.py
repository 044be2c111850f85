r"""Random-access data sources driven by the epoch orders of :mod:`shufflesgd.shuffling`.

A shuffling scheme decides *which* examples an epoch visits and in what order; this module
fetches them.  Every source follows one small protocol, :class:`Source`: ``len(source)``
examples, and ``source[indices]`` for an integer index array returns a dict of NumPy
arrays with leading axis ``len(indices)``.  So one epoch is

.. code-block:: python

    scheme_state, order = scheme.step(jax.random.fold_in(scheme_key, epoch), scheme_state)
    for indices, batch in epoch_batches(source, order, batch_size):
        ...                                           # batch = source[indices]

:func:`epoch_batches` is a Grain pipeline (``grain.MapDataset`` → ``grain.IterDataset``):
the scheme's order is the sampler (Grain does not reshuffle), each element is one
minibatch read from the source in a single call, batches are read ahead by Grain's
prefetch threads, and in a multi-process run each process reads only its own rows of every
global batch (what it passes to :func:`jax.make_array_from_process_local_data`).

Three sources implement the protocol:

* :class:`ArraySource` -- in-memory arrays (a synthetic problem, a toy 2-D density);
* :class:`TFDSSource` -- a TFDS random-access data source (``array_record`` files read
  through ``tfds.data_source`` or ``builder.as_data_source``; no TensorFlow is needed);
* :class:`MappedSource` -- any source with a per-batch function applied
  (e.g. :func:`scale_images`).

:func:`load_source` opens a split by name.  ``"digits"`` is scikit-learn's 8×8
handwritten digits (UCI ML digits, Alpaydin & Kaynak 1998), written at first use by the
real TFDS builder :class:`Digits` into ``data_dir`` and read back with
``builder.as_data_source(split)``; MNIST, Fashion-MNIST, CIFAR-10 and every other TFDS
name go unchanged through ``tfds.data_source(name, split=..., data_dir=...)`` (this needs
the prepared ``array_record`` files or a network connection to build them).

:func:`~shufflesgd.parallel.shard_batch` places a host batch on
``NamedSharding(mesh, P('data'))`` for data-parallel training (see :mod:`shufflesgd.nn.training`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from shufflesgd._checks import check_int
from shufflesgd.drivers import minibatches

Batch = dict[str, np.ndarray]


DIGITS_NUM_TRAIN = 1536


DIGITS_MAX_VALUE = 16


@runtime_checkable
class Source(Protocol):
    """A finite, random-access dataset: ``len(source)`` examples, fetched by index arrays."""

    def __len__(self) -> int: ...

    def __getitem__(self, indices: np.ndarray) -> Batch: ...


def _check_indices(indices: Any, size: int, name: str = "indices") -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"{name} must be a 1-D integer array, got shape {indices.shape} "
            f"and dtype {indices.dtype}"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise ValueError(
            f"{name} must lie in [0, {size}), got values in [{indices.min()}, {indices.max()}]"
        )
    return indices


class ArraySource:
    """In-memory arrays as a :class:`Source`: ``source[idx] = {k: v[idx]}``.

    Raises ``ValueError`` naming ``arrays`` when it is empty or its leaves disagree on the
    number of examples (the leading axis).
    """

    def __init__(self, arrays: Mapping[str, Any]):
        if not arrays:
            raise ValueError("arrays must hold at least one array")
        self.arrays = {name: np.asarray(value) for name, value in arrays.items()}
        sizes = {
            name: value.shape[0] if value.ndim else None for name, value in self.arrays.items()
        }
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise ValueError(f"arrays must share one leading (example) axis, got sizes {sizes}")
        self._size = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, indices: np.ndarray) -> Batch:
        indices = _check_indices(indices, self._size)
        return {name: value[indices] for name, value in self.arrays.items()}


class TFDSSource:
    """A TFDS random-access data source (``tfds.data_source`` / ``as_data_source``) as a
    :class:`Source`: the records at ``indices`` are read (``__getitems__``, one batched
    read from the ``array_record`` files) and stacked feature by feature.
    """

    def __init__(self, data_source: Any):
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, indices: np.ndarray) -> Batch:
        indices = _check_indices(indices, len(self))
        records = self.data_source.__getitems__(indices.tolist())
        return {name: np.stack([np.asarray(r[name]) for r in records]) for name in records[0]}


class MappedSource:
    """``source`` with ``fn`` applied to every fetched batch (``fn(batch) -> batch``)."""

    def __init__(self, source: Source, fn: Callable[[Batch], Batch]):
        self.source = source
        self.fn = fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, indices: np.ndarray) -> Batch:
        return self.fn(self.source[indices])


def scale_images(
    batch: Batch, max_value: float, low: float = 0.0, high: float = 1.0, key: str = "image"
) -> Batch:
    r"""Map the integer pixels :math:`p \in [0, p_{max}]` of ``batch[key]`` to float32
    :math:`low + (high - low)\,p / p_{max}` (``[0, 1]`` for classifiers, ``[-1, 1]`` for
    diffusion models as in Ho et al. 2020); other entries are kept."""
    scaled = low + (high - low) * batch[key].astype(np.float32) / np.float32(max_value)
    return {**batch, key: scaled.astype(np.float32)}


def dequantise(key: jax.Array, levels: jax.Array, num_levels: int) -> jax.Array:
    r"""Uniform dequantisation of integer pixel levels :math:`p \in \{0, \dots, L - 1\}`
    (``num_levels`` :math:`L`) to :math:`x = 2(p + u)/L - 1 \in [-1, 1]`,
    :math:`u \sim U[0, 1)` (Theis, van den Oord & Bethge 2016, "A note on the evaluation of
    generative models", Sec. 3.1): a continuous density on :math:`x` then bounds the discrete
    log-likelihood of :math:`p`."""
    u = jax.random.uniform(key, levels.shape, levels.dtype)
    return 2.0 * (levels + u) / num_levels - 1.0


def to_array_source(source: Source) -> ArraySource:
    """Read every example of ``source`` into memory (index order ``0..len-1``)."""
    return ArraySource(source[np.arange(len(source))])


def scaled_digits(data_dir: str | os.PathLike | None = None) -> tuple[Batch, Batch]:
    """The digits ``(train, test)`` splits in memory, read through the TFDS builder (built into
    ``data_dir`` when missing): ``image`` ``float32[N, 8, 8, 1]`` scaled to ``[0, 1]``,
    ``label`` ``int32[N]``."""

    def read(split: str) -> Batch:
        source = MappedSource(
            load_source("digits", split, data_dir=data_dir),
            lambda batch: scale_images(batch, DIGITS_MAX_VALUE),
        )
        arrays = to_array_source(source).arrays
        return {"image": arrays["image"], "label": arrays["label"].astype(np.int32)}

    return read("train"), read("test")


def digits_arrays(split: str) -> Batch:
    """scikit-learn's digits split exactly as :class:`Digits` stores it.

    ``train`` is examples ``0..1535`` of :func:`sklearn.datasets.load_digits` and ``test``
    the remaining 261 (``1536..1796``), in sklearn's order; ``image`` is ``uint8[N, 8, 8,
    1]`` with values ``0..16`` and ``label`` is ``int64[N]`` in ``0..9``.  (1536 = 2^9 * 3,
    so the train split divides by every batch size up to 512 that is a power of two.)
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(
            f"split must be one of ['test', 'train'] for dataset 'digits', got {split!r}"
        )
    digits = load_digits()
    rows = slice(0, DIGITS_NUM_TRAIN) if split == "train" else slice(DIGITS_NUM_TRAIN, None)
    return {
        "image": digits.images[rows].astype(np.uint8)[..., None],
        "label": digits.target[rows].astype(np.int64),
    }


class Digits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for scikit-learn's 8×8 digits (1797 images of 10 classes).

    The UCI "Optical Recognition of Handwritten Digits" set (Alpaydin & Kaynak 1998) as
    shipped with scikit-learn, so building needs no download.  Splits are fixed and
    documented in :func:`digits_arrays` (train: the first 1536 examples, test: the last
    261).  ``disable_shuffling=True`` keeps record ``i`` of a split equal to row ``i`` of
    :func:`digits_arrays` (TFDS otherwise orders records by a hash of their keys).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "scikit-learn digits, train = first 1536, test = last 261."
    }

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file.  TFDS's default looks the package up through ``importlib_resources``,
        which it imports lazily but only requires on Python < 3.9, so it fails on 3.11."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn 8x8 handwritten digits (UCI), pixels 0..16.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        arrays = digits_arrays(split)
        for i, (image, label) in enumerate(zip(arrays["image"], arrays["label"])):
            yield i, {"image": image, "label": int(label)}


def build_digits(data_dir: str | os.PathLike | None = None) -> Digits:
    """The :class:`Digits` builder over ``data_dir``, written there (``array_record``) if
    it is not prepared yet; a second call reuses the files.  ``None``: TFDS's default
    (``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``)."""
    builder = Digits(
        data_dir=None if data_dir is None else os.fspath(data_dir), file_format="array_record"
    )
    builder.download_and_prepare()
    return builder


def load_source(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> TFDSSource:
    """Open split ``split`` of dataset ``name`` as a random-access :class:`TFDSSource`.

    ``"digits"`` is built at first use into ``data_dir`` (:func:`build_digits`) and read
    with ``builder.as_data_source(split)``.  Any other name (``"mnist"``,
    ``"fashion_mnist"``, ``"cifar10"``, ...) goes to ``tfds.data_source`` (which prepares
    it on first use, needing the network) once TFDS is known to list the name.  Both open
    every split lazily (``split=None``) and the requested one is checked against the
    builder's splits before anything is read.

    Raises ``ValueError`` naming ``name`` for a dataset TFDS does not know, and naming
    ``split`` (with the available splits) for a split the dataset does not have.
    """
    if name == "digits":
        sources = build_digits(data_dir).as_data_source()
    elif name in tfds.list_builders(with_community_datasets=False):
        sources = tfds.data_source(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    else:
        raise ValueError(f"name must be 'digits' or a TFDS dataset name, got {name!r}")
    if split not in sources:
        raise ValueError(
            f"split must be one of {sorted(sources)} for dataset {name!r}, got {split!r}"
        )
    return TFDSSource(sources[split])


def epoch_batches(
    source: Source,
    order: Any,
    batch_size: int,
    drop_remainder: bool = False,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    num_threads: int = 1,
) -> grain.IterDataset:
    """The minibatches of one epoch in the order ``order``, as a Grain pipeline yielding
    ``(indices, source[indices])``.

    Global batch ``j`` holds ``order[j * batch_size : (j + 1) * batch_size]`` (the last
    partial batch dropped when ``drop_remainder``).  Process ``process_index`` of
    ``process_count`` (by default :func:`jax.process_index` and :func:`jax.process_count`)
    yields only its contiguous share of each, rows ``process_index * b : (process_index + 1)
    * b`` with ``b = batch_size // process_count``: the rows it feeds to
    :func:`jax.make_array_from_process_local_data`, so the processes' batches concatenate in
    process order to the global batch.  Grain indexes a ``MapDataset`` of these index rows
    in order (``order`` is the sampler: nothing is reshuffled), maps each row to one batched
    read ``source[indices]``, and its iterator reads up to ``prefetch`` batches ahead on
    ``num_threads`` threads (``0`` for either reads in the calling thread, on demand).  The
    batches do not depend on ``prefetch`` or ``num_threads``; the source must allow reads
    from several threads (the sources of this module do).

    Raises, before anything is read: ``ValueError`` naming ``batch_size`` when it does not
    divide the epoch length and ``drop_remainder`` is False (see
    :func:`shufflesgd.drivers.check_batch_size`) or does not split evenly over
    ``process_count``; ``ValueError`` naming ``order`` unless it is a 1-D integer array of
    indices of ``source``; ``ValueError`` naming ``process_count``, ``process_index``,
    ``prefetch`` or ``num_threads`` when it is not an int in range.
    """
    order = _check_indices(order, len(source), "order")
    process_count = check_int(
        "process_count", jax.process_count() if process_count is None else process_count
    )
    process_index = check_int(
        "process_index",
        jax.process_index() if process_index is None else process_index,
        minimum=0,
    )
    if process_index >= process_count:
        raise ValueError(
            f"process_index must lie in [0, {process_count}), got process_index={process_index}"
        )
    prefetch = check_int("prefetch", prefetch, minimum=0)
    num_threads = check_int("num_threads", num_threads, minimum=0)
    rows = minibatches(order, batch_size, drop_remainder)
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} does not split evenly over {process_count} processes"
        )
    local = batch_size // process_count
    rows = rows[:, process_index * local : (process_index + 1) * local]

    def read(indices: np.ndarray) -> tuple[np.ndarray, Batch]:
        return indices, source[indices]

    return (
        grain.MapDataset.source(rows)
        .map(read)
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    )


SKLEARN_DATASETS = ("diabetes", "breast_cancer")


def sklearn_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A small real dataset shipped inside scikit-learn (no download), standardised.

    ``"diabetes"`` (Efron et al. 2004; 442 x 10): features and the target standardised
    to mean 0 and variance 1 (so no intercept is needed).  ``"breast_cancer"`` (Wisconsin
    diagnostic; 569 x 30): standardised features with a trailing column of ones (the
    intercept) and labels mapped to -1 (malignant) / +1 (benign).
    """
    from sklearn import datasets  # local import: only this loader needs scikit-learn

    if name not in SKLEARN_DATASETS:
        raise ValueError(f"name must be one of {list(SKLEARN_DATASETS)}, got {name!r}")
    standardise = lambda u: (u - u.mean(axis=0)) / u.std(axis=0)  # noqa: E731
    if name == "diabetes":
        features, targets = datasets.load_diabetes(return_X_y=True)
        return standardise(features), standardise(targets)
    features, labels = datasets.load_breast_cancer(return_X_y=True)
    features = np.concatenate([standardise(features), np.ones((len(features), 1))], axis=1)
    return features, np.where(labels == 1, 1.0, -1.0)
