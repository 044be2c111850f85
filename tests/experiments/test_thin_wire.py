"""The thin-wire study on its ``:quick`` config: outputs written, the networks learn, bits per
worker as the formulas say, 1 and 8 devices agree, divergence recorded, bad configs refused."""

import json
import math

import jax
import numpy as np
import pytest

from experiments import thin_wire
from shufflesgd.nn import data


@pytest.fixture(scope="module")
def study(tmp_path_factory, quick_config):
    """The quick study on one device, run once: ``(config, metrics, run folder)``."""
    tmp_path = tmp_path_factory.mktemp("thin_wire")
    config = quick_config(
        "thin_wire",
        tmp_path / "results",
        data_dir=str(tmp_path / "tfds"),
        num_devices=1,
        devices=1,
    )
    metrics = thin_wire.run(config)
    (folder,) = list((tmp_path / "results" / "thin_wire").iterdir())
    return config, metrics, folder


def test_writes_every_output(study):
    config, _, folder = study
    for name in (
        "config.json",
        "metrics.json",
        "results.csv",
        "per_seed.npz",
        "table.txt",
        "figure.png",
    ):
        assert (folder / name).stat().st_size > 0, name
    saved = json.loads((folder / "metrics.json").read_text())
    assert list(saved["methods"]) == list(config.methods)
    assert "figure_error" not in saved
    assert (saved["num_devices"], saved["devices"]) == (1, 1)  # workers, seeds
    for method, result in saved["methods"].items():
        steps = thin_wire.method_steps(config, method)
        assert len(result["test_loss"]["mean"]) == steps // config.eval_every + 1
        assert result["first_nonfinite_step"] == [None] * config.num_seeds, method
        assert ("vs_reference" in result) == (method != "dp")
    per_seed = np.load(folder / "per_seed.npz")
    assert per_seed["zeroth_order/train_loss"].shape == (config.num_seeds, config.zo_num_steps)
    assert per_seed["dp/test_accuracy"].shape == (
        config.num_seeds,
        config.num_steps // config.eval_every + 1,
    )
    assert len((folder / "results.csv").read_text().splitlines()) == 1 + len(config.methods)
    table = (folder / "table.txt").read_text()
    assert all(method in table for method in config.methods) and "untrained" in table


def test_uncompressed_loss_falls(study):
    config, metrics, folder = study
    per_seed = np.load(folder / "per_seed.npz")
    train = per_seed["dp/train_loss"]
    # the last eval_every minibatch losses against the first step's, every seed
    assert np.all(train[:, -config.eval_every :].mean(axis=1) < 0.5 * train[:, 0])
    test_loss = metrics["methods"]["dp"]["test_loss"]["mean"]
    assert test_loss[-1] < 0.5 * test_loss[0]


@pytest.mark.parametrize("method", ["dp", "ef21_sgdm_topk", "demo"])
def test_methods_beat_the_untrained_network(study, method):
    config, metrics, folder = study
    untrained = np.load(folder / "per_seed.npz")[f"{method}/test_accuracy"][:, 0]
    # same seed, same initial network for every method
    np.testing.assert_array_equal(
        untrained, np.load(folder / "per_seed.npz")["dp/test_accuracy"][:, 0]
    )
    final = np.load(folder / "per_seed.npz")[f"{method}/test_accuracy"][:, -1]
    assert np.all(final > untrained + 0.4), (method, final, untrained)  # chance is 0.1


def test_bits_per_worker_follow_the_formulas(study):
    config, metrics, _ = study
    assert tuple(config.hidden) == (32,) and config.topk_fraction == 0.01
    shapes = [(64, 32), (32,), (32, 10), (10,)]  # Dense kernels and biases of the MLP
    d = sum(math.prod(s) for s in shapes)
    assert metrics["num_params"] == d == 2410
    steps = config.num_steps
    k = math.ceil(0.01 * d)
    # PowerSGD leaf by leaf: a matrix m×n sends 32 r (m + n); a bias of length L is viewed as
    # (a, L/a) with a its largest divisor <= sqrt(L): 32 -> 4×8, 10 -> 2×5.
    rank = config.powersgd_rank
    power = 32 * rank * ((64 + 32) + (4 + 8) + (32 + 10) + (2 + 5))
    # DeMo: per chunk of 64, topk values and 6-bit indices; a leaf of r < 64 entries is one
    # chunk and sends min(topk, r) values with ceil(log2 r)-bit indices.
    t = config.demo_topk
    assert config.demo_chunk == 64
    demo = 32 * t * (32 + 6) + t * (32 + 5) + 5 * t * (32 + 6) + t * (32 + 4)
    expected = {
        "dp": steps * 32 * d,
        "ef21_sgdm_topk": steps * k * (32 + math.ceil(math.log2(d))),
        "powersgd_ef14": steps * power,
        "demo": steps * demo,
        "zeroth_order": config.zo_num_steps * config.zo_num_directions * config.zo_bits,
    }
    got = {m: r["bits_per_worker"] for m, r in metrics["methods"].items()}
    assert got == expected
    order = ["dp", "powersgd_ef14", "demo", "ef21_sgdm_topk", "zeroth_order"]
    assert [got[m] for m in order] == sorted(got.values(), reverse=True)


@pytest.mark.parametrize("seed_devices, worker_devices", [(1, 8), (2, 4)])
def test_one_and_eight_devices_agree(study, seed_devices, worker_devices):
    """EF21-SGDM + Top-k on 8 forced CPU devices, the worker axis over 8 of them or the 2 seeds
    over 2 rows of 4 worker devices, against the study's one-device run: equal up to the order
    of the floating-point sums (seen: up to 2.4e-7 relative in the losses, accuracies equal;
    PowerSGD's orthogonalisation amplifies such differences, to 4e-3 in the quick losses)."""
    config, _, folder = study
    per_seed = np.load(folder / "per_seed.npz")
    sharded = config.copy_and_resolve_references()
    sharded.devices, sharded.num_devices = seed_devices, worker_devices
    thin_wire.validate(sharded)
    mesh = thin_wire.sweep_mesh(sharded)
    assert dict(mesh.shape) == {"seeds": seed_devices, "workers": worker_devices}
    train, test = (
        {k: np.asarray(v) for k, v in split.items()}
        for split in data.scaled_digits(config.data_dir)
    )
    curves = thin_wire.run_seeds(sharded, "ef21_sgdm_topk", train, test)
    assert len(curves.train_loss.sharding.device_set) == 8
    for name in ("train_loss", "test_loss"):
        np.testing.assert_allclose(
            np.asarray(getattr(curves, name)),
            per_seed[f"ef21_sgdm_topk/{name}"],
            rtol=1e-4,
            err_msg=name,
        )
    # at most one test example may flip
    np.testing.assert_allclose(
        np.asarray(curves.test_accuracy),
        per_seed["ef21_sgdm_topk/test_accuracy"],
        atol=1.01 / 261,
    )


@pytest.mark.parametrize("seed_devices, worker_devices", [(1, 8), (2, 4)])
def test_sharded_program_keeps_workers_on_their_devices(study, seed_devices, worker_devices):
    """On 8 devices each device holds its own seeds' and workers' slice of the per-worker
    arrays (the first-layer gradients ``[seeds / s, 8 / w, 64, 32]`` on an ``s × w`` mesh,
    never the whole worker stack) and nothing is all-gathered: the one all-reduce is the mean
    of the messages."""
    config, _, _ = study
    sharded = config.copy_and_resolve_references()
    sharded.devices, sharded.num_devices = seed_devices, worker_devices
    train, test = data.scaled_digits(config.data_dir)
    jitted, shards = thin_wire.sweep_program(sharded, "ef21_sgdm_topk", train)
    assert len(shards["label"].sharding.device_set) == 8
    hlo = (
        jitted.lower(
            thin_wire.seed_keys(sharded),
            thin_wire.hyper_parameters(sharded, "ef21_sgdm_topk"),
            shards,
            test,
        )
        .compile()
        .as_text()
    )
    seeds, local_seeds = config.num_seeds, config.num_seeds // seed_devices
    assert f"f32[{local_seeds},{8 // worker_devices},64,32]" in hlo
    assert f"f32[{seeds},8,64,32]" not in hlo and f"f32[{local_seeds},8,64,32]" not in hlo
    assert "all-gather" not in hlo and "all-reduce" in hlo


@pytest.mark.parametrize(
    "overrides, seeds, workers",
    [
        ({}, 1, 8),  # the workers take every device
        ({"num_devices": 4}, 2, 4),
        ({"num_devices": 1}, 2, 1),  # the most of 8 that divide the 2 seeds
        ({"num_devices": 2, "num_seeds": 8}, 4, 2),
        ({"num_devices": 2, "num_seeds": 6}, 3, 2),
        ({"num_devices": 4, "devices": 1}, 1, 4),
    ],
)
def test_seed_and_worker_device_counts(tmp_path, quick_config, overrides, seeds, workers):
    config = quick_config("thin_wire", tmp_path, **overrides)
    assert (thin_wire.seed_devices(config), thin_wire.devices_used(config)) == (seeds, workers)
    mesh = thin_wire.sweep_mesh(config)
    assert dict(mesh.shape) == {"seeds": seeds, "workers": workers}
    assert list(mesh.devices.flat) == jax.devices()[: seeds * workers]


def test_divergence_is_recorded_not_raised(study):
    config, _, _ = study
    train, test = data.scaled_digits(config.data_dir)
    wild = config.copy_and_resolve_references()
    wild.learning_rate.dp = 1e30  # activations overflow float32
    wild.num_steps = wild.eval_every = 12
    losses = np.asarray(thin_wire.run_seeds(wild, "dp", train, test).train_loss)
    steps = thin_wire.first_nonfinite(losses)
    assert all(s is not None and 0 < s < 12 for s in steps), steps
    assert thin_wire.first_nonfinite(np.array([[1.0, np.inf, 2.0], [1.0, 2.0, 3.0]])) == [1, None]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"methods": ("dp", "bogus")}, "config.methods must be one of"),
        ({"methods": ("demo", "ef21_sgdm_topk")}, "config.methods must include 'dp'"),
        ({"methods": ("dp", "dp")}, "must not repeat"),
        ({"topk_fraction": 0.0}, r"config.topk_fraction must lie in \(0, 1\]"),
        ({"topk_fraction": 1.5}, r"config.topk_fraction must lie in \(0, 1\]"),
        ({"ef21_momentum": 0.0}, r"config.ef21_momentum must lie in \(0, 1\]"),
        ({"zo_bits": 0}, r"config.zo_bits must lie in \[1, 32\]"),
        ({"num_workers": 7}, "config.num_workers must divide the 1536"),
        ({"num_devices": 3}, "config.num_devices must divide config.num_workers"),
        ({"num_devices": 16}, "config.num_devices must be at most"),
        ({"devices": 9}, r"config\.devices=9 exceeds the 8 available devices"),
        ({"devices": 3, "num_devices": 1}, r"config\.devices=3 does not divide config\.num_se"),
        ({"devices": 2}, r"config\.devices=2 seed devices times 8 worker devices \(config\.num_"),
        ({"devices": 0}, r"config\.devices must be"),
        ({"batch_size": 7}, "config.batch_size must divide each worker's 192"),
        ({"eval_every": 5}, "config.eval_every must divide config.num_steps"),
        ({"powersgd_rank": 3}, "config.powersgd_rank"),
        ({"demo_topk": 65}, "config.demo_topk must be at most"),
        ({"demo_chunk": 48}, "config.demo_chunk: chunk=48 does not divide the 2048 entries"),
        ({"num_seeds": 1}, "config.num_seeds must be at least 2"),
        ({"momentum": 1.0}, r"config.momentum must lie in \[0, 1\)"),
        ({"zo_radius": -1.0}, "config.zo_radius must be a positive"),
        ({"hidden": (32, 0)}, "config.hidden must be positive integers"),
        ({"model": "resnet"}, "config.model"),
        ({"channels": (4, 0)}, "config.channels must be positive integers"),
    ],
)
def test_bad_config_fails_before_anything_runs(tmp_path, overrides, match, quick_config):
    data_dir = tmp_path / "tfds"
    with pytest.raises(ValueError, match=match):
        thin_wire.run(
            quick_config("thin_wire", tmp_path / "results", data_dir=str(data_dir), **overrides)
        )
    assert not (tmp_path / "results").exists() and not data_dir.exists()


def test_bad_learning_rate_fails(tmp_path, quick_config):
    config = quick_config("thin_wire", tmp_path / "results", data_dir=str(tmp_path / "tfds"))
    config.learning_rate.demo = -0.1
    with pytest.raises(ValueError, match="config.learning_rate.demo must be a positive"):
        thin_wire.run(config)
    assert not (tmp_path / "results").exists()


def test_the_cnn_trains_on_the_same_wire(tmp_path, quick_config):
    config = quick_config(
        "thin_wire",
        tmp_path / "results",
        data_dir=str(tmp_path / "tfds"),
        num_devices=1,
        model="cnn",
        channels=(4, 8),
        methods=("dp", "ef21_sgdm_topk"),
        num_seeds=2,
    )
    # conv kernels 3x3x1x4 and 3x3x4x8 with biases, then Dense(8 -> 10)
    d = 3 * 3 * 1 * 4 + 4 + 3 * 3 * 4 * 8 + 8 + 8 * 10 + 10
    assert thin_wire.num_params(config) == d
    metrics = thin_wire.run(config)
    assert metrics["model"] == "cnn"
    dp = metrics["methods"]["dp"]
    assert dp["bits_per_worker"] == config.num_steps * 32 * d
    ef = metrics["methods"]["ef21_sgdm_topk"]
    assert ef["bits_per_worker"] == config.num_steps * math.ceil(0.01 * d) * (
        32 + math.ceil(math.log2(d))
    )
    for result in (dp, ef):
        loss = result["test_loss"]["mean"]
        assert loss[-1] < loss[0], loss
