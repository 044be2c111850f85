"""The score-model study end to end (quick variant): DSM training lowers the loss and writes one
metrics line per epoch, the trained network's samples beat the prior on the 2-D mixture, the
exact-score rows sit at the Monte Carlo floor, digits bits/dim beat the uniform distribution on
the 17 pixel levels, the flow-matching network trains and beats it too beside VP, the
eps-scaled network's bits/dim at b = 1 are the plain network's, the flow network resumes from its
own checkpoints, the PNGs exist, and bad configs are rejected before anything is written."""

import csv
import json
import math

import jax
import numpy as np
import optax
import pytest

from configs import score_model as config_module
from experiments import common, score_model


def _combined_se(*stats):
    return math.sqrt(sum(s["se"] ** 2 for s in stats))


def test_quick_study_trains_samples_and_scores(tmp_path, capsys, quick_config):
    config = quick_config("score_model", tmp_path)
    metrics = score_model.run(config)
    (folder,) = list((tmp_path / "score_model").glob("2*"))
    for name in (
        "config.json",
        "metrics.json",
        "table.txt",
        "mixture_2d.csv",
        "digits_samplers.csv",
        "digits_likelihood.csv",
        "digits_exposure_bias.csv",
        "digits_exposure_likelihood.csv",
        "digits_processes.csv",
        "digits_processes_likelihood.csv",
        "digits_processes_epochs.csv",
        "mixture_2d_epochs.csv",
        "digits_epochs.csv",
    ):
        assert (folder / name).stat().st_size > 0, name
    for name in ("figure.png", "digits.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    saved = json.loads((folder / "metrics.json").read_text())
    assert set(saved) == {"devices", "mixture_2d", "digits"}
    assert saved["devices"] == 4  # the 4 sampling seeds over 4 of the 8 devices
    printed = capsys.readouterr().out
    assert "bits/dim" in printed and "network SW2" in printed and f"results: {folder}" in printed

    # training: one metrics line per epoch (checkpointed, so a killed run loses at most one), loss
    # falls
    for part, epochs in (("mixture_2d", config.mixture_epochs), ("digits", config.digits_epochs)):
        lines = (folder / "training" / part / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == list(range(1, epochs + 1)), part
        assert (folder / "training" / part / "checkpoints" / str(_steps(config, part))).is_dir(), (
            part
        )
        training = metrics[part]["training"]
        # measured (quick): mixture train 1.39 -> 0.65, held-out 1.03 -> 0.63; digits 10.6 -> 8.2,
        # 9.85 -> 8.25. The digits network is EDM-preconditioned: its skip term is already the eps
        # of Gaussian data, so its first epoch starts far lower than the bare MLP's did (held-out
        # 14.1 -> 9.6) and it must fall by 10 %
        ratio = 0.8 if part == "mixture_2d" else 0.9
        assert training["train_loss"][-1] < ratio * training["train_loss"][0], (part, training)
        assert training["heldout_loss"][-1] < ratio * training["heldout_loss"][0], (part, training)

    # 2-D mixture: every sampler ran at its budget; the trained network's samples are far closer to
    # held-out data than the prior is, and the exact-score rows sit at the Monte Carlo floor
    m = metrics["mixture_2d"]
    assert set(m["samplers"]) == set(config.samplers)
    prior, floor = m["prior"], m["floor"]
    assert floor["mean"] < 0.5 * prior["mean"], m  # measured 0.37 vs 1.37
    for name, per in m["samplers"].items():
        for label, r in per.items():
            assert r["nonfinite_samples"] == 0, (name, label)
            if name == "pf_ode_adaptive":
                assert 7 <= r["nfe"] <= 6 * 4096 + 2, (name, r)
            else:
                budget = int(label)
                assert budget - 3 <= r["nfe"] <= r["nfe_max"] <= budget, (name, label, r)
            # measured 0.43-0.53 (network) and 0.33-0.37 (exact) against the prior's 1.37
            # (SE 0.02-0.06)
            assert r["network"]["mean"] < 0.6 * prior["mean"], (name, label, r, prior)
            assert r["exact"]["mean"] <= prior["mean"] - 4 * _combined_se(r["exact"], prior), (
                name,
                label,
                r,
            )
            gap = abs(r["exact"]["mean"] - floor["mean"])
            assert gap <= 4 * _combined_se(r["exact"], floor), r
    with (folder / "mixture_2d.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == sum(len(per) for per in m["samplers"].values())

    # digits: PF-ODE bits/dim finite, every solve succeeded, and below the uniform distribution on
    # the 17 levels (log2 17 = 4.087 bits/dim), a bound any model that learned the data beats
    d = metrics["digits"]
    assert d["uniform_bits_per_dim"] == pytest.approx(math.log2(17))
    for r in d["likelihood"]:
        assert r["succeeded"] == config.likelihood_points, r
        values = np.asarray(r["bits_per_dim_values"])
        assert values.shape == (config.likelihood_points,) and np.all(np.isfinite(values)), r
        # one-sided, 3 standard errors over the test images (measured 3.25 ± 0.04 with 16 images,
        # 3.57 ± 0.09 before the EDM preconditioning; a bare net trained for 72 steps gave 9.6)
        bits = r["bits_per_dim"]
        assert 0.0 < bits["mean"] < d["uniform_bits_per_dim"] - 3 * bits["se"], r
    assert d["gaussian_bits_per_dim"]["mean"] < d["uniform_bits_per_dim"], d[
        "gaussian_bits_per_dim"
    ]
    assert set(d["samplers"]) == set(config.digits_samplers)
    for name, per in d["samplers"].items():
        for label, r in per.items():
            assert r["nonfinite_samples"] == 0 and np.isfinite(r["network"]["mean"]), (
                name,
                label,
                r,
            )
            assert np.isfinite(r["clipped"]["mean"]) and 0.0 <= r["outside"] <= 1.0, r

    # exposure bias: the base sampler, each Epsilon Scaling and the Time-Shift version at every
    # budget, paired with the base (its own difference is exactly 0); the data variance is that of
    # dequantised digits in [-1, 1]
    e = d["exposure_bias"]
    assert 0.05 < e["data_variance"] < 1.0, e["data_variance"]
    labels = ["ddim", "ddim + ES(b=1.01)", "time_shift_ddim"]
    assert list(e["samplers"]) == labels
    for label in labels:
        for budget in config.exposure_nfe_budgets:
            r = e["samplers"][label][str(budget)]
            assert r["nfe"] == budget and r["nonfinite_samples"] == 0, (label, r)
            assert r["network"]["mean"] < d["prior"]["mean"], (label, r)
            expected = r["network"]["mean"] - e["samplers"]["ddim"][str(budget)]["network"]["mean"]
            assert r["difference"]["mean"] == pytest.approx(expected, abs=1e-6), (label, r)
    base = e["samplers"]["ddim"][str(config.exposure_nfe_budgets[0])]["difference"]
    assert base["mean"] == 0.0 and base["se"] == 0.0

    # exposure bias, bits/dim: the eps-scaled network at b = 1 is the plain network bit for bit
    # (the same images, tolerance and key as the first likelihood row), b = 1.01 is another model
    # (measured +0.045 bits/dim on 4 images); Time-Shift has no density of its own
    lik = e["likelihood"]
    k = config.exposure_likelihood_points
    assert lik["points"] == k and lik["time_shift"] is None
    assert list(lik["scales"]) == ["network (b=1)", "ES(b=1.01)"]
    plain = np.asarray(d["likelihood"][0]["bits_per_dim_values"][:k])
    one, scaled = (np.asarray(r["bits_per_dim_values"]) for r in lik["scales"].values())
    np.testing.assert_array_equal(one, plain)
    assert np.all(np.isfinite(scaled)) and not np.array_equal(scaled, plain), scaled
    np.testing.assert_allclose(
        lik["scales"]["ES(b=1.01)"]["difference"]["mean"], np.mean(scaled - plain)
    )
    printed_rows = [line for line in printed.splitlines() if line.startswith("Time-Shift")]
    assert (
        len(printed_rows) == 1 and "—" in printed_rows[0] and "no PF-ODE density" in printed_rows[0]
    )

    # VP against flow matching: the VP network is the digits network above; the flow network
    # (velocity output, flow-matching loss, the same settings) trains, wrote its own metrics
    # lines and checkpoints, and its bits/dim beat the uniform distribution too (measured 3.06
    # ± 0.06 against VP's 3.25 ± 0.04); its samples are paired with VP's (difference = its SW2
    # - VP's, exactly 0 for VP), VP's rows being those of the digits samplers above
    procs = d["processes"]
    assert procs["names"] == ["vp", "flow"]
    vp, flow = procs["networks"]["vp"], procs["networks"]["flow"]
    assert vp["likelihood"] == d["likelihood"] and vp["training"] == d["training"]
    assert (vp["output"], flow["output"]) == ("eps", "velocity")
    assert all(diff["mean"] == diff["se"] == 0.0 for diff in vp["likelihood_difference"])
    assert flow["num_params"] == vp["num_params"] == d["num_params"]
    lines = (folder / "training" / "digits" / "flow" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, config.digits_epochs + 1))
    steps = _steps(config, "digits")
    assert (folder / "training" / "digits" / "flow" / "checkpoints" / str(steps)).is_dir()
    # measured train 48.4 -> 36.9, held-out 45.6 -> 37.7 (velocity MSE, per example)
    for loss in ("train_loss", "heldout_loss"):
        assert flow["training"][loss][-1] < 0.9 * flow["training"][loss][0], flow["training"]
    for r, diff, vp_row in zip(flow["likelihood"], flow["likelihood_difference"], vp["likelihood"]):
        paired = np.subtract(r["bits_per_dim_values"], vp_row["bits_per_dim_values"])
        assert diff["mean"] == pytest.approx(np.mean(paired)), (diff, r)
        values = np.asarray(r["bits_per_dim_values"])
        assert r["succeeded"] == config.likelihood_points and np.all(np.isfinite(values)), r
        bits = r["bits_per_dim"]
        assert 0.0 < bits["mean"] < d["uniform_bits_per_dim"] - 3 * bits["se"], r
    for name in config.digits_process_samplers:
        for budget in config.digits_nfe_budgets:
            rows = {p: procs["samplers"][p][name][str(budget)] for p in procs["names"]}
            for p, r in rows.items():
                assert r["nonfinite_samples"] == 0 and r["nfe"] <= budget, (p, r)
                assert np.isfinite(r["network"]["mean"]) and np.isfinite(r["clipped"]["mean"]), r
                assert r["network"]["mean"] < d["prior"]["mean"], (p, r)
            assert rows["vp"]["difference"]["mean"] == 0.0 and rows["vp"]["difference"]["se"] == 0
            if name in config.digits_samplers:  # VP's run above, reused: flow ran with its key
                vp_row = {k: v for k, v in rows["vp"].items() if k != "difference"}
                assert vp_row == d["samplers"][name][str(budget)], (vp_row, name)
            assert rows["flow"]["difference"]["mean"] == pytest.approx(
                rows["flow"]["network"]["mean"] - rows["vp"]["network"]["mean"], abs=1e-6
            )
    with (folder / "digits_processes.csv").open() as handle:
        assert {r["process"] for r in csv.DictReader(handle)} == {"vp", "flow"}

    # resume: the flow network restores its own final checkpoint from training/digits/flow (no
    # epoch trained again: the same records and parameters; a fresh run from another key would
    # give other parameters), beside VP's in training/digits
    from shufflesgd import diffusion

    network = score_model.train_digits(
        config,
        "flow",
        diffusion.make_sde("flow"),
        *score_model.load_digits(config),
        jax.random.key(1),
        folder / "training" / "digits" / "flow",
    )
    assert score_model.training_summary(network.records) == flow["training"]
    assert float(optax.tree.norm(network.params)) == flow["params_norm"]


def test_seeds_split_over_8_devices_give_the_1_device_results(tmp_path, quick_config):
    """The mixture part's sampling sweep (Euler-Maruyama, a small untrained ScoreMLP and the
    exact eps, 8 seeds of 32 samples, 5 steps), the seeds split over 8 devices against all on
    one device, with per-seed held-out draws and directions and the SW2 of the samples.  The
    held-out draws, the directions and the NFE agree bitwise; the float32 samples do not: XLA
    vectorises 8 seeds on one device and 1 seed per device differently, and the sampler steps
    amplify the rounding (seen: at most 3.2e-6 of the largest sample, 7e-7 relative in the
    SW2s).  The tolerances allow 30 and 14 times that, far below the SW2 standard errors the
    study reports.  The whole quick study (float32, the same trained networks, in one process
    kind), its 4 seeds over 4 devices against 1: 53 of 351 metrics values differ, the
    fixed-grid SW2s by at most 3.5e-6 relative, but pf_ode_adaptive's step-size control turns
    the rounding into other accepted steps (mean NFE 55.90 against 55.96, its network SW2 0.5153
    against 0.5132, SE 0.075)."""
    from shufflesgd import diffusion, problems
    from shufflesgd.nn import models

    sde = diffusion.make_sde("vp")
    law = problems.three_mode_mixture_2d()
    eigen = law.eigen()
    model = models.ScoreMLP(hidden=16, num_layers=2)
    params, _ = models.init_model(model, jax.random.key(0), np.zeros((2, 2)), np.zeros(2))
    # committed to one device, as parameters restored from a checkpoint are
    params = jax.device_put(params, jax.devices()[0])
    exact = lambda x, t: -sde.sigma(t) * eigen.score(x, sde.alpha(t), sde.sigma(t))
    model_for = lambda p, use_exact: score_model.switched_model(model, p, exact, use_exact)
    grid = np.asarray(diffusion.time_grid(sde, "uniform_log_snr", 5))
    results = {}
    for devices in (1, 8):
        config = quick_config("score_model", tmp_path, devices=devices, num_seeds=8)
        score_model.validate(config)
        mesh = common.seed_mesh(config)
        keys = score_model.seed_keys(jax.random.key(1), 8, mesh)
        run = score_model.make_runner(
            *score_model.labelled_sampler("euler_maruyama", config, {}),
            model_for,
            sde,
            (2,),
            32,
            8,
            (False, True),
        )
        samples, nfe, bad = run(params, grid, keys)
        assert samples.sharding.num_devices == devices
        heldout_keys, direction_keys = (
            score_model.seed_keys(jax.random.key(k), 8, mesh) for k in (2, 3)
        )
        heldout = jax.vmap(lambda k: law.sample(k, 32))(heldout_keys)
        directions = score_model.seed_directions(direction_keys, 4, 2)
        sw2 = score_model.seed_sliced_w2(samples[0], heldout, directions)
        results[devices] = jax.device_get((samples, nfe, bad, heldout, directions, sw2))
    one, eight = results[1], results[8]
    assert one[0].shape == (2, 8, 32, 2) and np.all(np.isfinite(one[0]))
    assert np.all(one[2] < 0) and np.ptp(one[5]) > 0  # no non-finite step; the seeds differ
    for name, a, b in zip(("nfe", "bad", "heldout", "directions"), one[1:5], eight[1:5]):
        np.testing.assert_array_equal(b, a, err_msg=name)
    for w in (0, 1):  # the network, the exact eps
        scale = np.abs(one[0][w]).max()
        np.testing.assert_allclose(eight[0][w], one[0][w], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(eight[5], one[5], rtol=1e-5)


def _steps(config, part):
    """Optimizer steps of a whole run: the name of the last checkpoint."""
    if part == "mixture_2d":
        return config.mixture_epochs * (config.mixture_num_train // config.mixture_batch_size)
    return config.digits_epochs * config.digits_passes * (1536 // config.digits_batch_size)


def test_quick_config_is_valid_and_full_config_covers_every_sampler():
    from shufflesgd import diffusion

    score_model.validate(config_module.get_config("quick"))
    full = config_module.get_config("full")
    score_model.validate(full)
    assert set(full.samplers) == set(diffusion.SAMPLERS) == set(full.digits_samplers)
    assert tuple(full.digits_processes) == ("vp", "flow")
    with pytest.raises(ValueError, match="variant"):
        config_module.get_config("bogus")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"parts": ("mixture_2d", "cifar")}, r"config\.parts must be one of"),
        ({"parts": ()}, r"config\.parts must name at least one"),
        ({"samplers": ("ddim", "bogus")}, r"config\.samplers must be one of"),
        ({"samplers": ("ddim", "ddim")}, r"config\.samplers must not repeat"),
        ({"png_samplers": ("restart",)}, r"config\.png_samplers must be one of"),
        ({"grid": "log"}, r"config\.grid must be one of"),
        ({"sde": "vpp"}, r"config\.sde must be one of"),
        ({"digits_model": "resnet"}, r"config\.digits_model must be one of"),
        ({"digits_preconditioning": "karras"}, r"config\.digits_preconditioning must be one of"),
        ({"digits_sigma_data": 0.0}, r"config\.digits_sigma_data must be a positive finite"),
        ({"likelihood_divergence": "trace"}, r"config\.likelihood_divergence must be one of"),
        ({"nfe_budgets": (20, 10)}, r"config\.nfe_budgets must be strictly increasing"),
        ({"nfe_budgets": (0, 10)}, r"config\.nfe_budgets must be positive integers"),
        ({"adaptive_tolerances": ()}, r"config\.adaptive_tolerances must hold at least one"),
        (
            {"likelihood_tolerances": (1e-3, -1.0)},
            r"config\.likelihood_tolerances must be a positive finite",
        ),
        ({"mixture_batch_size": 1000}, r"config\.mixture_batch_size must divide"),
        ({"digits_batch_size": 100}, r"config\.digits_batch_size must divide"),
        ({"digits_epochs": 0}, r"config\.digits_epochs must be positive integers"),
        ({"num_seeds": 1}, r"config\.num_seeds must be an int >= 2"),
        (
            {"mixture_learning_rate": float("nan")},
            r"config\.mixture_learning_rate must be a positive finite",
        ),
        ({"likelihood_points": 262}, r"config\.likelihood_points must be at most the 261"),
        ({"restart_t_min": 0.5}, r"config\.restart_t_min and config\.restart_t_max"),
        ({"checkpoint_dir": ""}, r"config\.checkpoint_dir must be None or a non-empty path"),
        ({"seed": -1}, r"config\.seed must be a non-negative integer"),
        ({"exposure_samplers": ("dpm_solver_pp_2m",)}, r"config\.exposure_samplers must be one"),
        ({"exposure_nfe_budgets": (20, 10)}, r"config\.exposure_nfe_budgets must be strictly"),
        ({"epsilon_scaling_b": (1.01, 0.0)}, r"config\.epsilon_scaling_b must be a positive"),
        ({"time_shift_window": 4}, r"config\.time_shift_window must be odd"),
        ({"time_shift_window_width": 1.0}, r"config\.time_shift_window_width must lie in"),
        ({"time_shift_cutoff": -0.1}, r"config\.time_shift_cutoff must lie in"),
        ({"digits_processes": ("vp", "bogus")}, r"config\.digits_processes must be one of"),
        ({"digits_processes": ()}, r"config\.digits_processes must name at least one"),
        ({"digits_processes": ("flow", "flow")}, r"config\.digits_processes must not repeat"),
        ({"digits_process_samplers": ("bogus",)}, r"config\.digits_process_samplers must be one"),
        (
            {"digits_process_samplers": ("restart",), "restart_t_max": 0.9995},
            r"config\.restart_t_min and config\.restart_t_max must lie in the time range",
        ),
        (
            {"exposure_likelihood_points": 17},
            r"config\.exposure_likelihood_points must be at most config\.likelihood_points",
        ),
        ({"exposure_likelihood_points": 0}, r"config\.exposure_likelihood_points must be positive"),
        ({"devices": 9}, r"config\.devices=9 exceeds the 8 available devices"),
        ({"devices": 3}, r"config\.devices=3 does not divide config\.num_seeds=4"),
        ({"devices": 0}, r"config\.devices must be"),
    ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, overrides, match, quick_config):
    with pytest.raises(ValueError, match=match):
        score_model.run(quick_config("score_model", tmp_path, **overrides))
    assert not (tmp_path / "score_model").exists()
