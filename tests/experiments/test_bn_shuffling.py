"""The BatchNorm shuffling study end to end (quick variant): GD reaches the closed-form
least-squares optimum, SS and RR end near their own distorted optima, far from GD's, with the gap
to their optima shrinking with the learning rate; SS's full-batch risk grows where RR's stays
bounded; outputs written; bad configs rejected before anything is written."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import bn_shuffling as config_module
from experiments import bn_shuffling, common
from shufflesgd.nn import models, training
from shufflesgd.nn.data import ArraySource
from shufflesgd.shuffling import make_scheme


def test_quick_study_reproduces_distortion_and_divergence(tmp_path, capsys, quick_config):
    config = quick_config("bn_shuffling", tmp_path)
    metrics = bn_shuffling.run(config)
    (folder,) = list((tmp_path / "bn_shuffling").iterdir())
    for name in (
        "config.json",
        "metrics.json",
        "regression.csv",
        "curves.csv",
        "table.txt",
        "figure.png",
    ):
        assert (folder / name).stat().st_size > 0, name
    saved = json.loads((folder / "metrics.json").read_text())
    assert set(saved) == {"devices", "regression", "classification"}
    assert saved["devices"] == 3  # the 3 seeds over 3 of the 8 devices
    seeds, rates = config.num_seeds, list(config.regression.learning_rates)
    with (folder / "regression.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == seeds * len(rates)
    assert "SS-GD" in capsys.readouterr().out

    reg = metrics["regression"]
    predicted = reg["predicted"]
    # the distorted optima (closed form) are far from GD's (measured 0.27-0.35 for SS, 0.27 for RR)
    # and from each other (SS*-RR* 0.07-0.16, against RR*'s Monte Carlo standard error 1.3e-3)
    assert min(predicted["ss_gd"]) > 0.1 and predicted["rr_gd"] > 0.1, predicted
    assert predicted["rr_monte_carlo_se"] < 0.01, predicted
    assert min(predicted["ss_rr"]) > 10 * predicted["rr_monte_carlo_se"], predicted
    by_rate = {p["learning_rate"]: p for p in reg["per_rate"]}
    for per in reg["per_rate"]:
        d = {k: np.asarray(v) for k, v in per["distances"].items()}
        # GD reaches the least-squares optimum of the undistorted risk (measured < 1e-6)
        assert d["gd_to_optimum"].max() < 1e-3, per
        floor = max(d["gd_to_optimum"].max(), d["gd_seed_spread"].max(), 1e-4)
        # SS and RR end far from GD, far above the run-to-run float noise (measured >= 0.3)
        assert d["ss_gd"].min() > 100 * floor and d["rr_gd"].min() > 100 * floor, per
    small, large = by_rate[min(rates)], by_rate[max(rates)]
    ds, dl = ({k: np.asarray(v) for k, v in p["distances"].items()} for p in (small, large))
    # at the small rate each run sits near its own distorted optimum, not GD's
    # (measured SS-SS* 0.03-0.08 vs SS-GD 0.32-0.37, RR-RR* 0.03-0.14 vs RR-GD 0.29-0.39)
    assert np.all(ds["ss_to_optimum"] < 0.5 * ds["ss_gd"]), small
    assert np.all(ds["rr_to_optimum"] < 0.5 * ds["rr_gd"]), small
    # the gap to the distorted optimum shrinks with the step size (measured 3-4x down for 4x
    # smaller)
    assert ds["ss_to_optimum"].mean() < 0.6 * dl["ss_to_optimum"].mean(), (small, large)
    assert ds["rr_to_optimum"].mean() < 0.6 * dl["rr_to_optimum"].mean(), (small, large)
    # SS and RR end at different points: SS-RR exceeds RR's own seed-to-seed spread
    # (measured 0.12 vs 0.06 on average)
    assert ds["ss_rr"].mean() > 1.5 * ds["rr_seed_spread"].mean(), small

    cls = metrics["classification"]
    sep = cls["separable"]
    assert all(sep["single_shuffle"]) and not sep["random_reshuffle_union"], sep
    ss, rr, gd = (cls["schemes"][k] for k in ("single_shuffle", "random_reshuffle", "gd"))
    # SS's full-batch risk keeps growing over the second half (measured +0.07 to +0.19 per e-fold
    # of epochs); GD's does not
    assert min(ss["risk_growth_per_efold"]) > 0.0, ss
    assert max(gd["risk_growth_per_efold"]) < 1e-3, gd
    # SS's end-to-end map grows without bound, RR's stays bounded (measured 3.2-6.7 vs 0.56-0.75)
    assert min(ss["final_end_to_end_norm"]) > 2 * max(rr["final_end_to_end_norm"]), (ss, rr)
    assert not any(rr["diverged"]) and not any(gd["diverged"]), (rr, gd)


def test_runs_split_over_8_devices_give_the_1_device_results(tmp_path, quick_config):
    """GD, SS and RR on the regression data for 8 seeds and 2 rates (16 runs), a few epochs,
    the run axis split over 8 devices (2 runs each) against all 16 on one device.  SS and RR
    (minibatches of 4) agree bitwise; GD (full batches of 64) does not: XLA vectorises its
    steps over 16 runs and over 2 differently, and the float32 risks and end-to-end maps differ
    by rounding (2e-7 to 1.4e-6 absolute seen, a few float32 ulps); the tolerance allows about
    ten times that.  The first orders agree exactly."""
    results = {}
    for devices in (1, 8):
        config = quick_config("bn_shuffling", tmp_path, num_seeds=8, devices=devices)
        task = config.regression
        task.update(dict(hidden=(4,), num_epochs=4, epochs_per_chunk=2))
        bn_shuffling.validate(config)
        data = bn_shuffling.regression_data(task, np.random.default_rng(0))
        model = models.LinearBatchNorm(hidden=(4,), num_outputs=1)
        seed_keys = jax.random.split(jax.random.key(5), 8)
        runs = bn_shuffling.train_all(
            model,
            bn_shuffling.squared_loss(model),
            task,
            data,
            [0.02, 0.005],
            seed_keys,
            lambda p: bn_shuffling.regression_theta(p, 2),
            "regression",
            common.seed_mesh(config),
        )
        results[devices] = runs
    for name in bn_shuffling.SCHEMES:
        one, eight = results[1][name], results[8][name]
        assert one["risk"].shape == (16, 4) and np.all(np.isfinite(one["risk"]))
        assert np.ptp(one["record"][:8, -1], axis=0).max() > 0  # the seeds differ
        np.testing.assert_array_equal(eight["order"], one["order"], err_msg=name)
        for field in ("risk", "record"):
            if name == "gd":
                np.testing.assert_allclose(
                    eight[field], one[field], rtol=1e-5, atol=1e-5, err_msg=f"{name} {field}"
                )
            else:
                np.testing.assert_array_equal(eight[field], one[field], err_msg=f"{name} {field}")


def test_end_to_end_map_reproduces_the_network():
    model = models.LinearBatchNorm(hidden=(5, 3), num_outputs=2)
    x = jax.random.normal(jax.random.key(1), (12, 4)) * jnp.arange(1.0, 5.0) + 2.0
    params, stats = models.init_model(model, jax.random.key(2), x)
    params = jax.tree.map(lambda p: p + 0.3, params)  # non-trivial BatchNorm scale and shift
    output, _ = models.apply_model(model, params, stats, x, train=True)
    matrix, offset = bn_shuffling.end_to_end(params, 3)
    z = bn_shuffling.batch_normalise(np.asarray(x, np.float64))
    np.testing.assert_allclose(
        z @ np.asarray(matrix) + np.asarray(offset), output, rtol=1e-4, atol=1e-4
    )


def test_scanned_epoch_equals_the_trainers_epoch():
    config = config_module.get_config("quick").regression
    data = bn_shuffling.regression_data(config, np.random.default_rng(0))
    model = models.LinearBatchNorm(hidden=(4,), num_outputs=1)
    loss_fn = bn_shuffling.squared_loss(model)
    scheme = make_scheme("random_reshuffle", config.num_examples)
    keys = jax.random.split(jax.random.key(3), 2)
    state = bn_shuffling.initial_states(
        model, scheme, jnp.asarray(data["x"][:4]), keys[:1], keys[1:], [0.01]
    )
    chunk = bn_shuffling.make_run(
        loss_fn, scheme, 4, data, 1, lambda p: bn_shuffling.regression_theta(p, 2)
    )
    scanned, (risk, theta) = chunk(state, 1)
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)
    trainer = training.make_trainer(loss_fn, optimizer, scheme, batch_size=4)
    single = jax.tree.map(lambda leaf: leaf[0], state)
    looped, _ = trainer.run_epoch(single, ArraySource(data))
    for scanned_leaf, looped_leaf in zip(
        jax.tree.leaves(scanned.params), jax.tree.leaves(looped.params)
    ):
        np.testing.assert_allclose(scanned_leaf[0], looped_leaf, rtol=1e-5, atol=1e-6)
    assert int(scanned.step[0]) == int(looped.step) == config.num_examples // 4
    np.testing.assert_allclose(
        theta[0, 0], bn_shuffling.regression_theta(looped.params, 2), rtol=1e-5, atol=1e-6
    )
    full = {name: jnp.asarray(value) for name, value in data.items()}
    losses, _ = loss_fn(looped.params, looped.batch_stats, full, jax.random.key(4), True)
    np.testing.assert_allclose(risk[0, 0], jnp.mean(losses), rtol=1e-5)


def test_closed_form_optima_and_separability():
    config = config_module.get_config("quick").regression
    data = bn_shuffling.regression_data(config, np.random.default_rng(0))
    n = config.num_examples
    # with one batch of all n examples every distorted risk is the undistorted one
    optima = bn_shuffling.distorted_optima(
        data, np.arange(n)[None], n, 10, np.random.default_rng(1)
    )
    np.testing.assert_allclose(optima["single_shuffle"][0], optima["gd"], rtol=1e-10)
    np.testing.assert_allclose(optima["random_reshuffle"], optima["gd"], rtol=1e-8)
    signs = np.array([1.0, 1.0, -1.0, -1.0])
    xor = np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    assert not bn_shuffling.weakly_separable(xor, signs)
    assert bn_shuffling.weakly_separable(np.array([[2.0], [1.0], [-1.0], [-2.0]]), signs)


@pytest.mark.parametrize(
    "path, value, match",
    [
        ("num_seeds", 1, r"config\.num_seeds must be at least 2"),
        ("seed", -1, r"config\.seed must be a non-negative int"),
        ("regression.batch_size", 5, r"config\.regression\.batch_size must be at least 2"),
        ("regression.batch_size", 64, r"config\.regression\.batch_size must be at least 2"),
        (
            "regression.learning_rates",
            (0.01, -0.1),
            r"config\.regression\.learning_rates must be a positive",
        ),
        (
            "regression.learning_rates",
            (),
            r"config\.regression\.learning_rates must hold at least one",
        ),
        (
            "regression.epochs_per_chunk",
            7,
            r"config\.regression\.epochs_per_chunk must divide num_epochs",
        ),
        ("regression.noise", 0.0, r"config\.regression\.noise must be a positive"),
        ("regression.hidden", (8, 0), r"config\.regression\.hidden must be positive integers"),
        (
            "regression.rr_reference_permutations",
            5,
            r"config\.regression\.rr_reference_permutations must be at least 10",
        ),
        (
            "classification.class_shift",
            -1.0,
            r"config\.classification\.class_shift must be a non-negative",
        ),
        (
            "classification.divergence_loss",
            float("nan"),
            r"config\.classification\.divergence_loss must be a positive",
        ),
        (
            "classification.num_epochs",
            0,
            r"config\.classification\.num_epochs must be positive integers",
        ),
        ("devices", 9, r"config\.devices=9 exceeds the 8 available devices"),
        ("devices", 2, r"config\.devices=2 does not divide config\.num_seeds=3"),
        ("devices", 0, r"config\.devices must be"),
    ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, path, value, match, quick_config):
    config = quick_config("bn_shuffling", tmp_path)
    group, _, field = path.rpartition(".")
    (config[group] if group else config)[field] = value
    with pytest.raises(ValueError, match=match):
        bn_shuffling.run(config)
    assert not (tmp_path / "bn_shuffling").exists()
