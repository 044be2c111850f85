"""The guided-digits study end to end (quick variant): the classifier scores real test digits far
above chance, conditional samples are of the class asked for far above chance, every guidance
method at a scale above 1 is at least as accurate as the conditional samples of the same prior
draws (paired, within their standard error), each method spends the network evaluations its
formula says, adaptive guidance is off at some calls and on at others; label dropout trains the
null token (its gradient is zero without dropout, and the unconditional samples spread over the
ten classes); bad configs are rejected before anything is written."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import guided_digits as config_module
from experiments import guided_digits
from shufflesgd import diffusion
from shufflesgd.diffusion import guidance
from shufflesgd.nn import models


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, quick_config):
    """The quick study, run once for the tests of this module: ``(config, metrics, folder)``."""
    tmp_path = tmp_path_factory.mktemp("guided_digits")
    config = quick_config("guided_digits", tmp_path)
    metrics = guided_digits.run(config)
    (folder,) = list((tmp_path / "guided_digits").glob("2*"))
    return config, metrics, folder


def test_quick_study_writes_every_file(quick_run):
    config, metrics, folder = quick_run
    for name in ("config.json", "metrics.json", "table.txt", "rows.csv", "samples.npz"):
        assert (folder / name).stat().st_size > 0, name
    for name in ("figure.png", "samples.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    saved = json.loads((folder / "metrics.json").read_text())
    assert "figure_error" not in saved
    assert saved["devices"] == 8  # the 32 samples of each class over the 8 test devices
    assert list(saved["methods"]) == list(config.methods)
    table = (folder / "table.txt").read_text()
    assert "classifier: test accuracy" in table and "unconditional branch" in table
    with (folder / "rows.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    # conditional at scale 1, every other method at every scale
    assert len(rows) == 1 + (len(config.methods) - 1) * len(config.scales)
    grids = np.load(folder / "samples.npz")
    assert set(grids.files) == {*config.methods, "test"}
    for name in grids.files:
        assert grids[name].shape == (10, config.grid_samples, 64), name
    # one metrics line per epoch of each trained network, and its checkpoint
    for part, epochs in (("network", config.epochs), ("classifier", config.classifier_epochs)):
        lines = (folder / "training" / part / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == list(range(1, epochs + 1)), part
        assert (folder / "training" / part / "checkpoints").is_dir(), part


def test_classifier_and_conditional_samples_are_far_above_chance(quick_run):
    _, metrics, _ = quick_run
    # measured (quick): test accuracy 0.92 on the 261 real test digits
    assert metrics["classifier"]["test_accuracy"] > 0.8, metrics["classifier"]
    training = metrics["network"]["training"]
    assert training["heldout_loss"][-1] < 0.9 * training["heldout_loss"][0], training
    # measured 0.90 ± 0.02 (320 samples; chance 0.1): four standard errors above 0.6
    accuracy = metrics["methods"]["conditional"]["1"]["accuracy"]
    assert accuracy["mean"] - 4 * accuracy["se"] > 0.6, accuracy


def test_guided_samples_are_at_least_as_accurate_as_conditional_ones(quick_run):
    config, metrics, _ = quick_run
    conditional = metrics["methods"]["conditional"]["1"]
    for method, rows in metrics["methods"].items():
        for label, r in rows.items():
            assert r["nonfinite_samples"] == 0, (method, label)
            assert 0.0 <= r["confidence"]["mean"] <= 1.0 and r["diversity"]["mean"] > 0, r
            if method == "conditional" or r["scale"] <= 1.0:
                continue
            # paired over the same prior draws: the difference of per-sample correctness, three
            # standard errors (measured +0.08 to +0.10 at scales 2 and 4, SE 0.02)
            difference = r["difference"]
            assert difference["mean"] >= -3 * difference["se"], (method, label, difference)
            expected = r["accuracy"]["mean"] - conditional["accuracy"]["mean"]
            assert difference["mean"] == pytest.approx(expected, abs=1e-9), (method, label)


def test_network_evaluations_follow_each_method_formula(quick_run):
    config, metrics, _ = quick_run
    steps, corrector = config.num_steps, config.pcg_corrector_steps
    calls = diffusion.SAMPLERS[config.sampler].nfe(steps)  # the sampler's NFE, final step too
    assert calls == steps + 1  # dpm_solver_pp_2m: one a step, plus the final denoising step
    formula = {
        "conditional": calls,  # one branch a call
        "cfg": 2 * calls,  # both branches a call
        "rescaled": 2 * calls,
        "adaptive": 2 * calls,  # the saving is reported, not taken
        "apg": 2 * calls,
        "pcg": (1 + 2 * corrector) * steps + 2,  # predictor, K Langevin steps, CFG denoise
    }
    assert metrics["expected_evaluations"] == {"unconditional": calls, **formula}
    assert metrics["unconditional"]["evaluations"] == calls
    for method, rows in metrics["methods"].items():
        for r in rows.values():
            assert r["evaluations"] == r["evaluations_max"] == formula[method], (method, r)


def test_adaptive_guidance_switches_off_at_some_calls_only(quick_run):
    _, metrics, _ = quick_run
    for method, rows in metrics["methods"].items():
        for r in rows.values():
            if method == "adaptive":
                # measured 0.48-0.49 of the calls (threshold 0.99)
                assert 0.05 < r["off_fraction"] < 0.95, r
            else:
                assert r["off_fraction"] == 0.0, (method, r)


def test_label_dropout_trains_the_unconditional_branch(quick_run):
    _, metrics, _ = quick_run
    net = metrics["network"]
    # the null token's embedding row moved from its initial value (only dropped labels move it)
    # and its output differs from every class's (measured relative RMS gaps 0.12-0.20)
    assert net["embedding_change"]["null"] > 0.05, net["embedding_change"]
    assert min(net["null_gap"]) > 0.02, net["null_gap"]
    # a trained null branch is a model of all digits: its samples spread over the ten classes as
    # the data do (measured entropy 3.26 bits of the uniform 3.32, largest class 0.18 of 320
    # samples, whose binomial SE is 0.02), not concentrated on one
    unconditional = metrics["unconditional"]
    assert unconditional["classes_seen"] == 10, unconditional
    assert unconditional["max_fraction"] < 0.3, unconditional
    assert unconditional["entropy_bits"] > 3.0, unconditional


@pytest.mark.parametrize("method", ["adaptive", "pcg"])
def test_samples_split_over_8_devices_give_the_1_device_results(method):
    """A small untrained network, 8 samples per class at two scales, 4 grid steps: the sample
    axis over 8 devices against all on one.  Each sample runs the same program on its own key;
    the evaluation counts, off fractions and non-finite steps agree bitwise, and so do the
    adaptive samples (guidance off at counted calls), while PCG's samples were seen to differ by
    up to 8e-7 (float32 rounding of the partitioned program), hence its tolerance."""
    sde = diffusion.make_sde("vp")
    config = config_module.get_config("quick")
    config.hidden, config.embed_dim, config.num_steps, config.samples_per_class = 16, 8, 4, 8
    network = guided_digits.conditional_network(config, sde)
    example = (jnp.zeros((1, 64)), jnp.zeros(1), jnp.zeros(1, jnp.int32))
    params, _ = models.init_model(network, jax.random.key(0), *example)
    grid = diffusion.time_grid(sde, config.grid, config.num_steps)
    x_T = sde.prior_sample(jax.random.key(1), (10, 8, 64))
    labels, scales = jnp.arange(10, dtype=jnp.int32), jnp.asarray([1.0, 3.0], jnp.float32)
    options = guided_digits.method_options(config)
    arguments = (params, x_T, labels, scales, jax.random.key(2), options)
    results = {}
    for devices in (1, 8):
        config.devices = devices
        guided_digits.validate(config)
        sampling = guided_digits.make_sampling(method, config, sde, network, grid)
        out = guided_digits.sample_all(sampling, config, *arguments)
        assert len(out[0].sharding.device_set) == devices
        results[devices] = [np.asarray(a) for a in out]
    (one, *counts_1), (eight, *counts_8) = results[1], results[8]
    assert one.shape == (2, 10, 8, 64) and np.all(np.isfinite(one))
    for a, b in zip(counts_1, counts_8):
        np.testing.assert_array_equal(b, a)
    if method == "pcg":
        np.testing.assert_allclose(eight, one, rtol=0, atol=1e-5)
    else:
        np.testing.assert_array_equal(eight, one)


@pytest.mark.parametrize("dropout, trained", [(0.0, False), (0.5, True)])
def test_only_dropped_labels_reach_the_null_token(dropout, trained):
    sde = diffusion.make_sde("vp")
    config = config_module.get_config("quick")
    config.hidden, config.embed_dim = 16, 8
    model = guided_digits.conditional_network(config, sde)
    loss_fn = guided_digits.label_dropout_loss(model, sde, dropout)
    keys = jax.random.split(jax.random.key(0), 3)
    batch = {
        "image": jax.random.randint(keys[0], (64, 64), 0, 17).astype(jnp.float32),
        "label": jnp.arange(64, dtype=jnp.int32) % 10,
    }
    params, stats = models.init_model(model, keys[1], batch["image"], jnp.zeros(64), batch["label"])
    grads = jax.jit(jax.grad(lambda p: jnp.mean(loss_fn(p, stats, batch, keys[2], True)[0])))(
        params
    )
    rows = np.asarray(grads["network"]["label_embedding"]["embedding"])
    assert np.any(rows[:10] != 0)
    assert np.any(rows[10] != 0) == trained, rows[10]


def test_null_label_selects_the_null_token():
    sde = diffusion.make_sde("vp")
    config = config_module.get_config("quick")
    config.hidden, config.embed_dim = 16, 8
    model = guided_digits.conditional_network(config, sde)
    x = jax.random.normal(jax.random.key(1), (64,))
    example = (x[None], jnp.zeros(1), jnp.zeros(1, jnp.int32))
    params, _ = models.init_model(model, jax.random.key(0), *example)

    @jax.jit
    def outputs(x, t):
        conditional = guided_digits.conditional_model(model, params)
        token = models.apply_model(
            model, params, {}, x[None], t[None], jnp.full(1, 10), train=False
        )
        cond, uncond = conditional.branches(x, t, jnp.asarray(3))
        return conditional.unconditional().fn(x, t), token[0][0], cond, uncond

    null, token, cond, uncond = outputs(x, jnp.asarray(0.5))
    # label -1 (NULL_LABEL) and label 10 are the same token; branches() evaluates it beside the
    # class's in one batched call
    np.testing.assert_allclose(null, token, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(uncond, null, rtol=1e-5, atol=1e-6)
    assert not np.allclose(cond, uncond, atol=1e-3)
    assert guidance.NULL_LABEL == -1


def test_configs():
    quick, full = config_module.get_config("quick"), config_module.get_config("full")
    for config in (quick, full):
        guided_digits.validate(config)
        assert tuple(config.methods) == guided_digits.METHODS
        assert config.grid_scale in config.scales
    assert tuple(quick.scales) == (1.0, 2.0, 4.0)
    assert tuple(full.scales) == (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    with pytest.raises(ValueError, match="variant"):
        config_module.get_config("bogus")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"scales": (1.0, -2.0)}, r"config\.scales must be finite numbers >= 0"),
        ({"scales": (2.0, 1.0)}, r"config\.scales must be strictly increasing"),
        ({"scales": (1.0, float("inf"))}, r"config\.scales must be finite"),
        ({"scales": ()}, r"config\.scales must hold at least one"),
        ({"grid_scale": 3.0}, r"config\.grid_scale must be one of config\.scales"),
        ({"methods": ("cfg", "bogus")}, r"config\.methods must be one of"),
        ({"methods": ("cfg", "cfg")}, r"config\.methods must not repeat"),
        ({"methods": ()}, r"config\.methods must name at least one"),
        ({"sampler": "pf_ode_adaptive"}, r"config\.sampler must be one of"),
        ({"sampler": "bogus"}, r"config\.sampler must be one of"),
        ({"sde": "flow"}, r"config\.sde must be one of"),
        ({"grid": "log"}, r"config\.grid must be one of"),
        ({"label_dropout": 1.0}, r"config\.label_dropout must lie in \[0\.0, 1\.0\)"),
        ({"label_dropout": -0.1}, r"config\.label_dropout must lie in"),
        ({"rescale": 1.5}, r"config\.rescale must lie in \[0\.0, 1\.0\]"),
        ({"adaptive_threshold": 2.0}, r"config\.adaptive_threshold must lie in"),
        ({"apg_parallel_weight": float("nan")}, r"config\.apg_parallel_weight must be a finite"),
        ({"apg_radius": 0.0}, r"config\.apg_radius must be a positive finite"),
        ({"pcg_corrector_steps": 0}, r"config\.pcg_corrector_steps must be positive integers"),
        ({"pcg_step_scale": -0.1}, r"config\.pcg_step_scale must be a positive finite"),
        ({"num_steps": 0}, r"config\.num_steps must be positive integers"),
        ({"samples_per_class": 1}, r"config\.samples_per_class must be an integer >= 2"),
        ({"grid_samples": 40}, r"config\.grid_samples must be at most config\.samples_per_class"),
        ({"grid_samples": 0}, r"config\.grid_samples must be positive integers"),
        ({"epochs": 0}, r"config\.epochs must be positive integers"),
        ({"hidden": -8}, r"config\.hidden must be positive integers"),
        ({"embed_dim": 31}, r"config\.embed_dim must be even"),
        ({"batch_size": 100}, r"config\.batch_size must divide the 1536"),
        ({"classifier_batch_size": 0}, r"config\.classifier_batch_size must be positive"),
        ({"classifier_hidden": (64, 0)}, r"config\.classifier_hidden must be positive integers"),
        ({"classifier_epochs": 0}, r"config\.classifier_epochs must be positive integers"),
        ({"learning_rate": 0.0}, r"config\.learning_rate must be a positive finite"),
        ({"classifier_learning_rate": float("nan")}, r"config\.classifier_learning_rate must"),
        ({"sigma_data": -0.5}, r"config\.sigma_data must be a positive finite"),
        ({"seed": -1}, r"config\.seed must be an integer >= 0"),
        ({"checkpoint_dir": ""}, r"config\.checkpoint_dir must be None or a non-empty path"),
        ({"data_dir": ""}, r"config\.data_dir must be None or a non-empty path"),
        ({"devices": 9}, r"config\.devices=9 exceeds the 8 available devices"),
        ({"devices": 3}, r"config\.devices=3 does not divide config\.samples_per_class=32"),
        ({"devices": 0}, r"config\.devices must be"),
    ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        guided_digits.run(quick_config("guided_digits", tmp_path, **overrides))
    assert not (tmp_path / "guided_digits").exists()
