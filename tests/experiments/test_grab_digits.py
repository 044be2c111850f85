"""The GraB-on-digits study on its ``:quick`` config: outputs written, the vmapped seeds equal
single-seed runs, the networks learn, GraB's orders are permutations, bad configs refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import grab_digits
from shufflesgd.nn import data

GRAB = "grab_mean_balance"


@pytest.fixture(scope="module")
def study(tmp_path_factory, quick_config):
    """The quick study, run once: ``(config, metrics, run folder)``."""
    tmp_path = tmp_path_factory.mktemp("grab_digits")
    config = quick_config("grab_digits", tmp_path / "results", data_dir=str(tmp_path / "tfds"))
    metrics = grab_digits.run(config)
    (folder,) = list((tmp_path / "results" / "grab_digits").iterdir())
    return config, metrics, folder


def test_writes_every_output(study):
    config, _, folder = study
    for name in (
        "config.json",
        "metrics.json",
        "curves.csv",
        "per_seed.npz",
        "table.txt",
        "figure.png",
    ):
        assert (folder / name).stat().st_size > 0, name
    saved = json.loads((folder / "metrics.json").read_text())
    assert list(saved["schemes"]) == list(config.schemes)
    assert (saved["num_train"], saved["num_test"]) == (1536, 261)
    assert saved["devices"] == 8
    for result in saved["schemes"].values():
        for name in grab_digits.METRICS:
            assert len(result[name]["mean"]) == len(result[name]["stderr"]) == config.num_epochs
    per_seed = np.load(folder / "per_seed.npz")
    assert per_seed[f"{GRAB}/test_accuracy"].shape == (config.num_seeds, config.num_epochs)
    csv_lines = (folder / "curves.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(config.schemes) * config.num_epochs
    table = (folder / "table.txt").read_text()
    assert "test accuracy" in table and "paired difference against random_reshuffle" in table


def test_networks_learn_and_share_their_first_epoch(study):
    config, metrics, folder = study
    per_seed = np.load(folder / "per_seed.npz")
    for scheme, result in metrics["schemes"].items():
        accuracy = result["test_accuracy"]["mean"]
        assert accuracy[-1] > 0.75, (scheme, accuracy)  # chance is 0.1
        assert result["train_loss"]["mean"][-1] < 0.5 * result["train_loss"]["mean"][0], scheme
        assert np.all(np.isfinite(per_seed[f"{scheme}/train_loss"]))
    # Common random numbers: every scheme's first epoch is permutation(fold_in(key, 0)) from the
    # same initial network, so epoch 1 agrees up to the per-example vs mean-gradient rounding.
    reference = per_seed["random_reshuffle/train_loss"][:, 0]
    for scheme in config.schemes:
        np.testing.assert_allclose(per_seed[f"{scheme}/train_loss"][:, 0], reference, rtol=1e-4)


def test_grab_orders_are_permutations(study):
    _, metrics, _ = study
    assert metrics["schemes"][GRAB]["orders_are_permutations"]
    assert grab_digits.is_permutation(np.array([[2, 0, 1], [0, 1, 2]]))
    assert not grab_digits.is_permutation(np.array([[2, 0, 1], [0, 0, 2]]))


def test_vmapped_seeds_equal_single_seed_runs(study):
    """Seeds 0 and last of the vmapped GraB call, rerun one at a time through ``jax.jit(run)``."""
    config, _, folder = study
    per_seed = np.load(folder / "per_seed.npz")
    train, test = (
        jax.tree.map(jnp.asarray, split) for split in data.scaled_digits(config.data_dir)
    )
    single = jax.jit(grab_digits.build_run(config, GRAB, len(train["label"])))
    for seed in (0, config.num_seeds - 1):
        curves = single(
            grab_digits.seed_keys(config)[seed], jnp.float32(config.learning_rate), train, test
        )
        for name in grab_digits.METRICS:
            np.testing.assert_allclose(
                np.asarray(getattr(curves, name)),
                per_seed[f"{GRAB}/{name}"][seed],
                rtol=1e-5,
                atol=1e-6,
                err_msg=name,
            )
        orders = np.asarray(curves.orders)
        assert orders.shape == (config.num_epochs, 1536)
        assert grab_digits.is_permutation(orders)
        assert not np.array_equal(orders[0], orders[1])  # GraB reorders after the first epoch


def test_seeds_on_1_device_give_the_8_device_results(study):
    """The first epoch of random reshuffling rerun with all 8 seeds on one device, against the
    study's run with one seed per device.  Not bitwise: XLA vectorises a block of 8 seeds and
    one of 1 differently, so the float32 curves differ by rounding (2.4e-7 absolute, 2e-7
    relative seen); the tolerances are those of the vmapped-against-single-seed test above."""
    config, _, folder = study
    per_seed = np.load(folder / "per_seed.npz")
    one = config.copy_and_resolve_references()
    one.devices, one.num_epochs = 1, 1
    grab_digits.validate(one)
    train, test = (
        jax.tree.map(jnp.asarray, split) for split in data.scaled_digits(config.data_dir)
    )
    curves = grab_digits.run_seeds(one, "random_reshuffle", train, test)
    for name in grab_digits.METRICS:
        np.testing.assert_allclose(
            np.asarray(getattr(curves, name))[:, 0],
            per_seed[f"random_reshuffle/{name}"][:, 0],
            rtol=1e-5,
            atol=1e-6,
            err_msg=name,
        )


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"schemes": ("random_reshuffle", "bogus")}, "config.schemes must be one of"),
        ({"schemes": ("single_shuffle", GRAB)}, "config.schemes must include 'random_reshuffle'"),
        ({"schemes": ("random_reshuffle", "random_reshuffle")}, "must not repeat"),
        ({"batch_size": 10}, "config.batch_size must divide the 1536"),
        ({"num_seeds": 1}, "config.num_seeds must be at least 2"),
        ({"num_epochs": 0}, "config.num_epochs must be positive integers"),
        ({"hidden": (64, 0)}, "config.hidden must be positive integers"),
        ({"learning_rate": -0.1}, "config.learning_rate must be positive and finite"),
        ({"devices": 9}, "config.devices=9 exceeds the 8 available devices"),
        ({"devices": 3}, "config.devices=3 does not divide config.num_seeds=8"),
    ],
)
def test_bad_config_fails_before_anything_runs(tmp_path, overrides, match, quick_config):
    data_dir = tmp_path / "tfds"
    with pytest.raises(ValueError, match=match):
        grab_digits.run(
            quick_config("grab_digits", tmp_path / "results", data_dir=str(data_dir), **overrides)
        )
    assert not (tmp_path / "results").exists() and not data_dir.exists()
