"""Data sources: the digits TFDS builder read back offline, scheme-driven epochs, sharding."""

import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from shufflesgd import drivers, parallel, shuffling
from shufflesgd.nn import data


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    data.build_digits(directory)
    return directory


@pytest.mark.parametrize("split, rows", [("train", slice(0, 1536)), ("test", slice(1536, 1797))])
def test_digits_tfds_matches_sklearn_in_split_order(digits_dir, split, rows):
    source = data.load_source("digits", split, data_dir=digits_dir)
    assert isinstance(source, data.TFDSSource) and isinstance(source, data.Source)
    everything = source[np.arange(len(source))]
    reference = load_digits()
    n = rows.stop - rows.start
    assert len(source) == n
    chex.assert_shape(everything["image"], (n, 8, 8, 1))
    assert everything["image"].dtype == np.uint8 and everything["label"].dtype == np.int64
    np.testing.assert_array_equal(everything["image"][..., 0], reference.images[rows])
    np.testing.assert_array_equal(everything["label"], reference.target[rows])
    np.testing.assert_array_equal(everything["label"], data.digits_arrays(split)["label"])
    in_memory = data.to_array_source(source)
    np.testing.assert_array_equal(in_memory[np.array([5, 0])]["image"], everything["image"][[5, 0]])


def test_digits_builder_is_real_array_record_builder(digits_dir):
    builder = data.build_digits(digits_dir)  # second call reuses the prepared files
    assert isinstance(builder, data.tfds.core.GeneratorBasedBuilder)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
        "train": 1536,
        "test": 261,
    }
    assert list(builder.data_path.glob("digits-train.array_record*"))


@pytest.mark.parametrize(
    "name, options",
    [
        ("random_reshuffle", {}),
        ("single_shuffle", {}),
        ("incremental", {}),
        ("flipflop", {}),
        ("grab_mean_balance", {}),
        ("rs2", {"ratio": 1 / 3}),
    ],
)
def test_scheme_epoch_reads_each_example_once(digits_dir, name, options):
    source = data.load_source("digits", "test", data_dir=digits_dir)
    reference = data.digits_arrays("test")
    scheme = shuffling.make_scheme(name, len(source), **options)
    key = jax.random.key(0)
    state = scheme.init(key, jnp.zeros(2))
    visited = []
    for epoch in range(2):
        state, order = drivers.epoch_order(scheme, key, state, epoch)
        batches = list(
            data.epoch_batches(source, order, batch_size=29)
        )  # 261 = 9 * 29, 87 = 3 * 29
        for indices, batch in batches:
            np.testing.assert_array_equal(batch["label"], reference["label"][indices])
            np.testing.assert_array_equal(batch["image"], reference["image"][indices])
        epoch_indices = np.concatenate([indices for indices, _ in batches])
        np.testing.assert_array_equal(
            epoch_indices, np.asarray(order)
        )  # read in the scheme's order
        assert len(np.unique(epoch_indices)) == len(epoch_indices) == scheme.epoch_length
        visited.append(epoch_indices)
    if name == "rs2":  # two disjoint thirds of one pass
        assert not set(visited[0]) & set(visited[1])
    else:
        np.testing.assert_array_equal(np.sort(visited[0]), np.arange(261))
    if name == "flipflop":
        np.testing.assert_array_equal(visited[1], visited[0][::-1])


def test_unknown_dataset_or_split_names_the_argument(digits_dir):
    with pytest.raises(ValueError, match="name must be"):
        data.load_source("not_a_dataset", "train", data_dir=digits_dir)
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train'\]"):
        data.load_source("digits", "validation", data_dir=digits_dir)


def test_batch_size_must_divide_unless_dropping_remainder():
    source = data.ArraySource({"x": np.arange(10.0)[:, None], "y": np.arange(10)})
    with pytest.raises(ValueError, match="batch_size=4 does not divide"):
        list(data.epoch_batches(source, np.arange(10), 4))
    batches = list(data.epoch_batches(source, np.arange(10)[::-1], 4, drop_remainder=True))
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[1][1]["y"], [5, 4, 3, 2])


def test_array_source_validates():
    with pytest.raises(ValueError, match="arrays must share"):
        data.ArraySource({"x": np.zeros((3, 2)), "y": np.zeros(4)})
    source = data.ArraySource({"x": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="indices must lie"):
        source[np.array([0, 3])]


def test_mapped_source_scales_images():
    source = data.MappedSource(
        data.ArraySource({"image": np.array([[0], [8], [16]], np.uint8), "label": np.arange(3)}),
        lambda b: data.scale_images(b, data.DIGITS_MAX_VALUE, -1.0, 1.0),
    )
    batch = source[np.array([2, 0, 1])]
    assert batch["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["image"][:, 0], [1.0, -1.0, 0.0])
    np.testing.assert_array_equal(batch["label"], [2, 0, 1])


def test_shard_batch_splits_examples_over_data_axis():
    mesh = parallel.data_mesh(8)
    batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "label": np.arange(16)}
    sharded = parallel.shard_batch(batch, mesh)
    for name, value in sharded.items():
        assert value.sharding.spec == jax.P("data")
        assert len(value.addressable_shards) == 8
        chex.assert_shape(value.addressable_shards[0].data, (2,) + batch[name].shape[1:])
        np.testing.assert_array_equal(np.asarray(value), batch[name])
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
        parallel.shard_batch({"x": np.zeros((12, 2))}, mesh)


def test_dequantise_keeps_each_level_in_its_own_cell():
    levels = jnp.arange(17.0).repeat(50)
    x = data.dequantise(jax.random.key(0), levels, 17)
    assert float(x.min()) >= -1.0 and float(x.max()) < 1.0
    np.testing.assert_array_equal(np.floor((np.asarray(x) + 1.0) * 17 / 2), np.asarray(levels))


def test_scaled_digits_are_the_sklearn_splits_in_the_unit_interval(digits_dir):
    train, test = data.scaled_digits(digits_dir)
    for split, arrays in (("train", train), ("test", test)):
        raw = data.digits_arrays(split)
        assert arrays["image"].dtype == np.float32 and arrays["label"].dtype == np.int32
        np.testing.assert_allclose(arrays["image"] * data.DIGITS_MAX_VALUE, raw["image"])
        np.testing.assert_array_equal(arrays["label"], raw["label"])


def direct_batches(source, order, batch_size, drop_remainder):
    """The closed form: global batch j is source[order[j B : (j + 1) B]], by plain indexing."""
    order = np.asarray(order)
    stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
    return [
        (order[start : start + batch_size], source[order[start : start + batch_size]])
        for start in range(0, stop, batch_size)
    ]


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (indices, batch), (want_indices, want) in zip(got, expected):
        assert indices.dtype == want_indices.dtype
        np.testing.assert_array_equal(indices, want_indices)
        assert batch.keys() == want.keys()
        for name in want:
            assert batch[name].dtype == want[name].dtype
            np.testing.assert_array_equal(batch[name], want[name])


def small_array_source():
    rng = np.random.default_rng(1)
    return data.ArraySource(
        {"x": rng.standard_normal((40, 3)).astype(np.float32), "y": rng.integers(0, 5, 40)}
    )


ORDERS = {  # orders a shuffling scheme can produce on n examples
    "permutation": lambda n, rng: rng.permutation(n).astype(np.int32),
    "with_replacement": lambda n, rng: rng.integers(0, n, n).astype(np.int32),
    "subset": lambda n, rng: rng.permutation(n)[: n // 3].astype(np.int32),  # RS2's part
    "reversed": lambda n, rng: np.arange(n, dtype=np.int32)[::-1],  # FlipFlop's second pass
}


@pytest.mark.parametrize("order_name", list(ORDERS))
@pytest.mark.parametrize(
    "batch_size, drop_remainder", [(1, False), (29, False), (50, True), (87, True)]
)
def test_grain_batches_equal_direct_indexing_on_tfds(
    digits_dir, order_name, batch_size, drop_remainder
):
    source = data.load_source("digits", "test", data_dir=digits_dir)  # 261 = 9 * 29
    order = ORDERS[order_name](len(source), np.random.default_rng(batch_size))
    if len(order) % batch_size and not drop_remainder:
        order = order[: len(order) - len(order) % batch_size]
    got = list(data.epoch_batches(source, order, batch_size, drop_remainder))
    assert_same_batches(got, direct_batches(source, order, batch_size, drop_remainder))


@pytest.mark.parametrize("order_name", list(ORDERS))
@pytest.mark.parametrize("batch_size, drop_remainder", [(4, False), (5, False), (7, True)])
def test_grain_batches_equal_direct_indexing_on_arrays(order_name, batch_size, drop_remainder):
    source = data.MappedSource(small_array_source(), lambda b: {**b, "x": 2 * b["x"]})
    order = ORDERS[order_name](len(source), np.random.default_rng(batch_size))
    order = jnp.asarray(order[: len(order) - len(order) % 2])  # a device array, as schemes give
    if len(order) % batch_size and not drop_remainder:
        order = order[: len(order) - len(order) % batch_size]
    got = list(data.epoch_batches(source, order, batch_size, drop_remainder))
    assert isinstance(data.epoch_batches(source, order, batch_size, True), data.grain.IterDataset)
    assert_same_batches(got, direct_batches(source, order, batch_size, drop_remainder))


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_process_shares_concatenate_to_the_global_batch(digits_dir, process_count, drop_remainder):
    source = data.load_source("digits", "test", data_dir=digits_dir)
    order = np.random.default_rng(process_count).permutation(len(source))
    order = order if drop_remainder else order[:240]
    shares = [
        list(
            data.epoch_batches(
                source, order, 60, drop_remainder, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    expected = direct_batches(source, order, 60, drop_remainder)
    assert all(len(share) == len(expected) == 4 for share in shares)
    for j, (indices, batch) in enumerate(expected):
        rows = [share[j] for share in shares]
        assert all(len(share_indices) == 60 // process_count for share_indices, _ in rows)
        np.testing.assert_array_equal(np.concatenate([i for i, _ in rows]), indices)
        for name in batch:
            np.testing.assert_array_equal(np.concatenate([b[name] for _, b in rows]), batch[name])
    single = data.epoch_batches(source, order, 60, drop_remainder)  # jax.process_* defaults
    assert_same_batches(list(single), expected)


class _CountingSource:
    """An ArraySource that records every read."""

    def __init__(self, source):
        self.source, self.reads = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, indices):
        self.reads.append(indices)
        return self.source[indices]


def test_prefetch_reads_ahead_without_changing_the_batches(digits_dir):
    source = data.load_source("digits", "test", data_dir=digits_dir)
    order = np.random.default_rng(2).permutation(len(source))
    runs = [
        list(data.epoch_batches(source, order, 9, prefetch=prefetch, num_threads=threads))
        for prefetch, threads in [(0, 0), (1, 1), (8, 4), (3, 0)]
    ]
    assert len(runs[0]) == 29
    for run in runs[1:]:
        assert_same_batches(run, runs[0])
    lazy = _CountingSource(small_array_source())
    batches = iter(data.epoch_batches(lazy, np.arange(40), 4, prefetch=0))
    next(batches)
    assert len(lazy.reads) == 1  # read on demand only
    eager = _CountingSource(small_array_source())
    batches = iter(data.epoch_batches(eager, np.arange(40), 4, prefetch=3))
    next(batches)
    deadline = time.monotonic() + 10.0
    while len(eager.reads) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(eager.reads) == 4  # the batch returned and the 3 read ahead of it


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"batch_size": 10, "process_count": 4}, "batch_size=10 does not split evenly over 4"),
        ({"batch_size": 7}, "batch_size=7 does not divide"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"process_count": 0}, "process_count must be a positive int"),
        ({"process_index": 2, "process_count": 2}, r"process_index must lie in \[0, 2\)"),
        ({"process_index": -1}, "process_index must be a non-negative int"),
        ({"prefetch": -1}, "prefetch must be a non-negative int"),
        ({"num_threads": 1.5}, "num_threads must be a non-negative int"),
        ({"order": np.arange(40).reshape(2, 20)}, "order must be a 1-D integer array"),
        ({"order": np.arange(40.0)}, "order must be a 1-D integer array"),
        ({"order": np.arange(1, 41)}, r"order must lie in \[0, 40\)"),
    ],
)
def test_epoch_batches_validates_before_reading(arguments, message):
    source = _CountingSource(small_array_source())
    arguments = {"order": np.arange(40), "batch_size": 20, **arguments}
    with pytest.raises(ValueError, match=message):
        data.epoch_batches(source, **arguments)
    assert source.reads == []
