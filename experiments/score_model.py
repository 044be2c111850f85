r"""Train score networks by denoising score matching, then sample them with every sampler.

Two parts, each trained with :func:`experiments.common.train_resumable` (Orbax
checkpoint and one ``metrics.jsonl`` line per epoch, so a killed run loses at most the epoch
in progress; a tqdm bar counts epochs):

**mixture_2d.**  The three-mode 2-D Gaussian mixture of
:func:`shufflesgd.problems.three_mode_mixture_2d` (weights 0.5 / 0.3 / 0.2; the 2-D mixture of
``experiments.sampler_nfe`` too), whose exact samples give the training set and, from independent
keys, the held-out sets.  A :class:`shufflesgd.nn.models.ScoreMLP` predicts :math:`\varepsilon`
under the VP SDE (Song et al. 2021, Eq. 11) and is trained with the :math:`\varepsilon`-MSE
denoising score-matching loss (Vincent 2011; Ho et al. 2020, Eq. 14;
:func:`shufflesgd.nn.training.denoising_score_matching_loss`).  After training the network
is a :class:`shufflesgd.diffusion.Model` with output ``"eps"`` and every sampler of
:data:`shufflesgd.diffusion.SAMPLERS` runs at each NFE budget (the most steps whose NFE, with the
final Tweedie denoising step, fits the budget, as the sampler registry counts it; the NFE
reported is ``info.nfe``), except
``pf_ode_adaptive``, whose NFE is set by its tolerances (``adaptive_tolerances``, one row each).
Quality is the sliced 2-Wasserstein distance

.. math:: SW_2(X, Y) = \Bigl(\frac1L\sum_{l=1}^L W_2^2(\theta_l^\top X, \theta_l^\top Y)\Bigr)^{1/2}

over ``num_projections`` random unit directions, between ``num_samples`` generated points and as
many held-out exact draws, mean ± standard error over ``num_seeds`` seeds (each seed: its own
prior draws, noise, held-out set and directions).  Each sampler also runs, in the same compiled
program and with the same prior draws and noise, on the mixture's exact :math:`\varepsilon`
(closed form, :meth:`shufflesgd.problems.GaussianMixture.eigen`): that row is the solver's error
alone, and the gap network − exact is the network's.  Reference rows: a second exact sample (the
Monte Carlo floor of :math:`SW_2` at this sample size) and the prior :math:`N(0, I)` itself (a bad
baseline every sampler must beat).

**digits.**  scikit-learn's 8×8 digits (pixels :math:`p \in \{0, \dots, 16\}`, 17 levels),
built and read through TFDS (:func:`shufflesgd.nn.data.load_source`).  Uniform dequantisation
(Theis, van den Oord & Bethge 2016; Ho et al. 2020, Sec. 3.3; Song et al. 2021, App. D.2):
:math:`x = 2(p + u)/17 - 1 \in [-1, 1)^{64}`, :math:`u \sim U[0, 1)^{64}`, drawn afresh at every
training step from the step's key (so training is on the continuous dequantised density) and
once, from a fixed key, for every evaluation image.  The network is a ScoreMLP on the flattened
64-D vector (``digits_model="mlp"``, the default: it trains in minutes on 2 CPU cores) or
a small :class:`shufflesgd.nn.models.UNet` (``"unet"``), wrapped by default
(``digits_preconditioning="edm"``) in the input/output scalings of Karras et al. (2022), Table 1
(:class:`shufflesgd.nn.models.EDMPreconditioned`, ``digits_sigma_data`` = 0.5): the network then
learns a correction to the :math:`\varepsilon` of Gaussian data with unit-variance inputs and
targets at every :math:`t`.  Without it (``"none"``) the bare MLP fits large noise levels slowly
and, trained longer, memorises the 1536 training images at intermediate ones; either way the
PF-ODE of a few test images runs off to huge latents and the bits/dim suffer (the README has the
measured effect).  A digits "epoch" is
``digits_passes`` passes over the 1536 training images (one random permutation of the repeated
set), so that the per-epoch checkpoint and metrics line come every few hundred steps rather than
every twelve.
Bits/dim: with :math:`z = p + u \in [0, 17)^{64}`, unit-volume cells give
:math:`\log P(p) \ge \mathbb E_u \log p_z(p + u)` (Jensen), and
:math:`p_z(z) = p_x(x)\,(2/17)^{64}`, so

.. math:: \text{bits/dim} = -\frac{\log p_x(x)}{64\ln 2} + \log_2\frac{17}{2},

the convention of Ho et al. (2020) and Song et al. (2021) (their 256 levels on :math:`[-1, 1]`
give the offset :math:`\log_2 128 = 7`).  :math:`\log p_x` is the probability-flow-ODE
log-likelihood (:func:`shufflesgd.diffusion.log_likelihood_batch`, Dopri5, exact or Hutchinson
divergence) of :math:`p_{t_{min}}`, on the first ``likelihood_points`` test images, once per
tolerance in ``likelihood_tolerances`` (NFE against bits/dim).  References: the uniform
distribution on the 17 levels, :math:`\log_2 17 = 4.087` bits/dim (any model that learned
anything beats it), and a full-covariance Gaussian fitted to the dequantised training images
(exact bits/dim).  Samples of every sampler in ``digits_samplers`` at each budget in
``digits_nfe_budgets`` are scored by :math:`SW_2` in 64-D to the dequantised test images (floor:
dequantised training images; baselines: the fitted Gaussian and the prior), as they come and
clipped to the data range :math:`[-1, 1]` (as image pipelines clip, Ho et al. 2020), with the
fraction of pixels outside that range; a PNG grid shows the digits of ``png_samplers``.

Outputs in the results folder: ``metrics.json``, ``mixture_2d.csv``, ``digits_samplers.csv``,
``digits_likelihood.csv``, ``<part>_epochs.csv``, ``table.txt``, ``figure.png`` and
``digits.png``; with ``checkpoint_dir`` unset the checkpoints and ``metrics.jsonl`` lie under
``training/<part>/`` in the results folder, with it set under ``<checkpoint_dir>/<part>/``, so a
rerun of the same config resumes there.

Run: ``python -m experiments.score_model --config configs/score_model.py``
(``:quick`` for the short variant; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import diffusion, metrics, problems, shuffling
from shufflesgd.nn import checkpoint, data, models, training

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NAME = "score_model"
PARTS = ("mixture_2d", "digits")
DIGIT_MODELS = ("mlp", "unet")
DIGIT_PRECONDITIONINGS = ("edm", "none")
ADAPTIVE = "pf_ode_adaptive"
DIGIT_LEVELS = data.DIGITS_MAX_VALUE + 1  # pixels take the 17 values 0..16
DIGIT_SHAPE = (8, 8, 1)
DIGIT_DIM = 64
DIGITS_NUM_TEST = 261  # 1797 images, the first 1536 train (shufflesgd.nn.data.digits_arrays)
PyTree = Any


# ------------------------------------------------------------------ configuration


def _check_budgets(field: str, budgets: Any) -> None:
    common.check_positive_ints(field, list(budgets))
    if list(budgets) != sorted(set(budgets)):
        raise ValueError(f"config.{field} must be strictly increasing, got {list(budgets)}")


def _check_optional_path(field: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"config.{field} must be None or a non-empty path, got {value!r}")


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built, written or compiled."""
    common.check_names("parts", config.parts, PARTS)
    common.check_choice("sde", config.sde, diffusion.SDES)
    common.check_choice("grid", config.grid, diffusion.GRIDS)
    common.check_samplers("samplers", config.samplers, diffusion.SAMPLERS)
    common.check_samplers("digits_samplers", config.digits_samplers, diffusion.SAMPLERS)
    common.check_names("png_samplers", config.png_samplers, config.digits_samplers)
    common.check_names("exposure_samplers", config.exposure_samplers, TIME_SHIFTED)
    _check_budgets("exposure_nfe_budgets", config.exposure_nfe_budgets)
    if not list(config.epsilon_scaling_b):
        raise ValueError("config.epsilon_scaling_b must hold at least one scale")
    for value in config.epsilon_scaling_b:
        common.check_positive_number("epsilon_scaling_b", value)
    common.check_positive_ints("time_shift_window", config.time_shift_window)
    if config.time_shift_window % 2 == 0:
        raise ValueError(f"config.time_shift_window must be odd, got {config.time_shift_window}")
    for field in ("time_shift_window_width", "time_shift_cutoff"):
        value = config[field]
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ValueError(f"config.{field} must lie in [0, 1), got {value!r}")
    common.check_choice("digits_model", config.digits_model, DIGIT_MODELS)
    common.check_choice(
        "digits_preconditioning", config.digits_preconditioning, DIGIT_PRECONDITIONINGS
    )
    common.check_choice(
        "likelihood_divergence", config.likelihood_divergence, diffusion.DIVERGENCES
    )
    for field in ("nfe_budgets", "digits_nfe_budgets"):
        _check_budgets(field, config[field])
    for field in ("adaptive_tolerances", "likelihood_tolerances"):
        if not list(config[field]):
            raise ValueError(f"config.{field} must hold at least one tolerance")
        for value in config[field]:
            common.check_positive_number(field, value)
    for field in (
        "mixture_num_train",
        "mixture_batch_size",
        "mixture_epochs",
        "mixture_hidden",
        "mixture_num_layers",
        "digits_batch_size",
        "digits_epochs",
        "digits_hidden",
        "digits_num_layers",
        "digits_passes",
        "num_samples",
        "num_projections",
        "likelihood_points",
        "likelihood_max_steps",
        "restart_k",
        "restart_steps",
        "png_digits",
    ):
        common.check_positive_ints(field, config[field])
    common.check_positive_ints("digits_channels", list(config.digits_channels))
    if (
        config.num_seeds < 2
        or isinstance(config.num_seeds, bool)
        or not isinstance(config.num_seeds, int)
    ):
        raise ValueError(
            "config.num_seeds must be an int >= 2 (a standard error needs two), "
            f"got {config.num_seeds!r}"
        )
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"config.seed must be a non-negative integer, got {config.seed!r}")
    for field in (
        "mixture_learning_rate",
        "digits_learning_rate",
        "digits_sigma_data",
        "pc_snr",
        "restart_t_min",
        "restart_t_max",
    ):
        common.check_positive_number(field, config[field])
    for field, size in (
        ("mixture_batch_size", config.mixture_num_train),
        ("digits_batch_size", data.DIGITS_NUM_TRAIN),
    ):
        if config[field] > size or size % config[field]:
            raise ValueError(
                f"config.{field} must divide the {size} training examples, got {config[field]}"
            )
    for field in ("likelihood_points", "png_digits"):
        if config[field] > DIGITS_NUM_TEST:
            raise ValueError(
                f"config.{field} must be at most the {DIGITS_NUM_TEST} test images, "
                f"got {config[field]}"
            )
    sde = diffusion.make_sde(config.sde)
    if not sde.t_min <= config.restart_t_min < config.restart_t_max <= sde.t_max:
        raise ValueError(
            "config.restart_t_min and config.restart_t_max must satisfy "
            f"{sde.t_min} <= restart_t_min "
            f"< restart_t_max <= {sde.t_max}, got {config.restart_t_min}, {config.restart_t_max}"
        )
    for field in ("checkpoint_dir", "data_dir"):
        _check_optional_path(field, config[field])


# ------------------------------------------------------------------ networks as samplers' models


def network_eps(model: nn.Module, params: PyTree, x: jax.Array, t: jax.Array) -> jax.Array:
    r""":math:`\hat\varepsilon_\theta(x, t)` for ONE sample ``x`` (samplers and likelihoods vmap
    over rows)."""
    output, _ = models.apply_model(model, params, {}, x[None], jnp.reshape(t, (1,)), train=False)
    return output[0]


def network_model(model: nn.Module, params: PyTree) -> diffusion.Model:
    """The trained network as a :class:`shufflesgd.diffusion.Model` predicting
    :math:`\\varepsilon`."""
    return diffusion.Model(lambda x, t: network_eps(model, params, x, t), "eps")


def switched_model(
    model: nn.Module,
    params: PyTree,
    exact_eps: Callable[[jax.Array, jax.Array], jax.Array],
    use_exact: jax.Array,
) -> diffusion.Model:
    r"""The network's :math:`\hat\varepsilon`, or the exact
    :math:`\varepsilon = -\sigma_t\nabla\log p_t` when the traced flag ``use_exact`` is true: one
    compiled sampler serves both (house rule 8)."""
    return diffusion.Model(
        lambda x, t: jnp.where(use_exact, exact_eps(x, t), network_eps(model, params, x, t)), "eps"
    )


# ------------------------------------------------------------------ training


def dequantise(key: jax.Array, levels: jax.Array) -> jax.Array:
    r"""Uniform dequantisation of integer levels :math:`p \in \{0..16\}` to
    :math:`x = 2(p + u)/17 - 1`."""
    u = jax.random.uniform(key, levels.shape, levels.dtype)
    return 2.0 * (levels + u) / DIGIT_LEVELS - 1.0


def dequantised_loss(loss_fn: training.LossFn) -> training.LossFn:
    """``loss_fn`` on freshly dequantised images: ``batch["image"]`` holds levels, the step's key is
    split into the dequantisation noise and ``loss_fn``'s own draws."""

    def wrapped(
        params: PyTree,
        batch_stats: PyTree,
        batch: dict[str, jax.Array],
        key: jax.Array,
        train: bool,
    ) -> tuple[jax.Array, tuple[PyTree, dict[str, jax.Array]]]:
        noise_key, loss_key = jax.random.split(key)
        return loss_fn(
            params,
            batch_stats,
            {**batch, "image": dequantise(noise_key, batch["image"])},
            loss_key,
            train,
        )

    return wrapped


def train_part(
    part: str,
    model: nn.Module,
    loss_fn: training.LossFn,
    train: data.Source,
    heldout: data.Source,
    batch_size: int,
    learning_rate: float,
    epochs: int,
    key: jax.Array,
    fingerprint: dict[str, Any],
    run_dir: pathlib.Path,
) -> tuple[PyTree, list[dict[str, Any]]]:
    """Adam with cosine decay (Kingma & Ba 2015; Loshchilov & Hutter 2017) in random-reshuffling
    epochs, resumable from ``run_dir/checkpoints``, one line per epoch in ``run_dir/metrics.jsonl``
    (mean training DSM loss, and the held-out DSM loss with a fixed key so epochs compare)."""
    init_key, state_key, eval_key = jax.random.split(key, 3)
    example = train[np.arange(2)]["image"].astype(np.float32)
    params, stats = models.init_model(model, init_key, jnp.asarray(example), jnp.zeros(2))
    steps = epochs * (len(train) // batch_size)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    scheme = shuffling.make_scheme("random_reshuffle", len(train))
    trainer = training.make_trainer(loss_fn, optimizer, scheme, batch_size=batch_size)
    state = training.init_train_state(state_key, params, stats, optimizer, scheme)

    def evaluate(state: training.TrainState) -> dict[str, float]:
        return {"heldout_loss": trainer.evaluate(state, heldout, eval_key, len(heldout))["loss"]}

    run_dir.mkdir(parents=True, exist_ok=True)
    state, records = common.train_resumable(
        trainer,
        state,
        train,
        epochs,
        checkpoint_dir=run_dir / "checkpoints",
        experiment=checkpoint.experiment_fingerprint(f"{NAME}/{part}", fingerprint),
        metrics_path=run_dir / "metrics.jsonl",
        evaluate=evaluate,
        description=f"{NAME} {part}",
    )
    return state.params, records


def training_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-epoch training and held-out DSM losses of ``train_resumable``'s records."""
    return {
        "epochs": len(records),
        "train_loss": [r["train_loss"] for r in records],
        "heldout_loss": [r["heldout_loss"] for r in records],
    }


# ------------------------------------------------------------------ sampling


def make_runner(
    sampler: Callable,
    options: dict[str, Any],
    model_for: Callable[[PyTree, jax.Array], diffusion.Model],
    sde: diffusion.SDE,
    shape: tuple[int, ...],
    num_samples: int,
    num_seeds: int,
    switches: tuple[bool, ...],
) -> Callable:
    """A jitted
    ``(params, grid, key) -> (samples [W, S, n, *shape], nfe [W, S, n], nonfinite [W, S, n])``
    over the model switches W and seeds S; seed s draws its prior from ``fold_in(key_s, 0)`` and its
    noise from ``fold_in(key_s, 1)``, ``key_s = fold_in(key, s)``, the same for every switch."""

    def one(params: PyTree, switch: jax.Array, seed_key: jax.Array, grid: jax.Array):
        x_T = sde.prior_sample(jax.random.fold_in(seed_key, 0), (num_samples, *shape))
        x, info = diffusion.sample_batch(
            sampler,
            jax.random.fold_in(seed_key, 1),
            model_for(params, switch),
            sde,
            x_T,
            grid,
            final="denoise",
            **options,
        )
        return x, info.nfe, info.nonfinite_step

    def run(params: PyTree, grid: jax.Array, key: jax.Array):
        keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(num_seeds))
        per_seed = jax.vmap(one, in_axes=(None, None, 0, None))
        return jax.vmap(per_seed, in_axes=(None, 0, None, None))(
            params, jnp.asarray(switches), keys, grid
        )

    return jax.jit(run)


def labelled_sampler(
    label: str, config: ConfigDict, extra: dict[str, Any]
) -> tuple[Callable, dict[str, Any]]:
    """The sampler function of a config label (:func:`experiments.common.parse_sampler`) and its
    options, ``extra`` (a run's own, e.g. the adaptive tolerances) on top."""
    name, options = common.sampler_options(label, config)
    return diffusion.make_sampler(name), {**options, **extra}


def sampling_jobs(
    samplers: Any,
    budgets: Any,
    tolerances: Any,
    config: ConfigDict,
) -> list[tuple[str, str, dict[str, Any], int | None]]:
    """``(sampler, column label, extra options, steps)`` per run: a fixed-grid sampler once per
    budget, with the most steps whose NFE, final denoising evaluation included, fits it (the
    registry's count; None when one step exceeds it), ``pf_ode_adaptive`` once per tolerance (one
    step: the grid gives only its end points)."""
    jobs = []
    for name in samplers:
        if name == ADAPTIVE:
            jobs.extend((name, f"tol={tol:g}", {"rtol": tol, "atol": tol}, 1) for tol in tolerances)
        else:
            sampler_name, options = common.sampler_options(name, config)
            spec = diffusion.SAMPLERS[sampler_name]
            jobs.extend(
                (name, str(b), {}, spec.steps_within(b, final="denoise", **options))
                for b in budgets
            )
    return jobs


def seed_directions(key: jax.Array, num_seeds: int, num: int, dim: int) -> jax.Array:
    """``[S, L, d]`` random unit directions, seed s from ``fold_in(key, s)``."""
    return jax.vmap(lambda s: metrics.random_directions(jax.random.fold_in(key, s), num, dim))(
        jnp.arange(num_seeds)
    )


@jax.jit
def seed_sliced_w2(samples: jax.Array, references: jax.Array, directions: jax.Array) -> jax.Array:
    """:math:`SW_2` per seed: ``samples``, ``references`` ``[S, n, d]`` (references may be
    ``[n, d]``)."""
    if references.ndim == 2:
        references = jnp.broadcast_to(references, samples.shape)
    return jax.vmap(metrics.sliced_w2)(samples, references, directions)


def summarise(values: Any) -> dict[str, float]:
    """Mean, standard error and median over seeds (or test images)."""
    values = np.asarray(values, np.float64)
    return {
        "mean": float(values.mean()),
        "se": float(values.std(ddof=1) / np.sqrt(values.shape[0])),
        "median": float(np.median(values)),
    }


# ------------------------------------------------------------------ part 1: the 2-D mixture


def run_mixture(
    config: ConfigDict, sde: diffusion.SDE, key: jax.Array, run_dir: pathlib.Path
) -> dict[str, Any]:
    """Train on exact mixture draws; SW2 of every sampler (network and exact score) to held-out
    draws."""
    law = problems.three_mode_mixture_2d()
    eigen = law.eigen()
    keys = {
        name: jax.random.fold_in(key, i)
        for i, name in enumerate(
            (
                "train_data",
                "loss_heldout",
                "train",
                "heldout",
                "samples",
                "floor",
                "prior",
                "directions",
            )
        )
    }
    train = data.ArraySource(
        {"image": np.asarray(law.sample(keys["train_data"], config.mixture_num_train))}
    )
    loss_heldout = data.ArraySource(
        {"image": np.asarray(law.sample(keys["loss_heldout"], config.num_samples))}
    )
    model = models.ScoreMLP(hidden=config.mixture_hidden, num_layers=config.mixture_num_layers)
    loss_fn = training.denoising_score_matching_loss(model, sde, prediction="eps")
    fingerprint = {
        k: config[k]
        for k in (
            "sde",
            "seed",
            "mixture_num_train",
            "mixture_batch_size",
            "mixture_epochs",
            "mixture_hidden",
            "mixture_num_layers",
            "mixture_learning_rate",
        )
    }
    params, records = train_part(
        "mixture_2d",
        model,
        loss_fn,
        train,
        loss_heldout,
        config.mixture_batch_size,
        config.mixture_learning_rate,
        config.mixture_epochs,
        keys["train"],
        fingerprint,
        run_dir,
    )

    n, seeds = config.num_samples, config.num_seeds
    seed_keys = lambda k: jax.vmap(lambda s: jax.random.fold_in(k, s))(jnp.arange(seeds))
    heldout = jax.vmap(lambda k: law.sample(k, n))(seed_keys(keys["heldout"]))
    directions = seed_directions(keys["directions"], seeds, config.num_projections, law.dim)
    floor = jax.vmap(lambda k: law.sample(k, n))(seed_keys(keys["floor"]))
    prior = jax.vmap(lambda k: sde.prior_sample(k, (n, law.dim)))(seed_keys(keys["prior"]))
    result: dict[str, Any] = {
        "dim": law.dim,
        "weights": np.exp(np.asarray(law.log_weights)).tolist(),
        "grid": config.grid,
        "training": training_summary(records),
        "floor": summarise(seed_sliced_w2(floor, heldout, directions)),
        "prior": summarise(seed_sliced_w2(prior, heldout, directions)),
        "samplers": {},
    }

    def exact_eps(x: jax.Array, t: jax.Array) -> jax.Array:
        return -sde.sigma(t) * eigen.score(x, sde.alpha(t), sde.sigma(t))

    model_for = lambda p, use_exact: switched_model(model, p, exact_eps, use_exact)
    jobs = sampling_jobs(config.samplers, config.nfe_budgets, config.adaptive_tolerances, config)
    runners: dict[str, Callable] = {}
    for index, (name, label, extra, steps) in enumerate(
        tqdm(jobs, desc=f"{NAME} mixture_2d samplers")
    ):
        entry = result["samplers"].setdefault(name, {})
        if steps is None:
            entry[label] = {"steps": None, "nfe": None}
            continue
        key_opts = f"{name}{sorted(extra.items())}"
        if key_opts not in runners:
            runners[key_opts] = make_runner(
                *labelled_sampler(name, config, extra),
                model_for,
                sde,
                (law.dim,),
                n,
                seeds,
                (False, True),
            )
        grid = jnp.asarray(diffusion.time_grid(sde, config.grid, steps))
        samples, nfe, bad = runners[key_opts](
            params, grid, jax.random.fold_in(keys["samples"], index)
        )
        nfe, bad = np.asarray(nfe), np.asarray(bad)
        network, exact = (
            np.asarray(seed_sliced_w2(samples[w], heldout, directions)) for w in (0, 1)
        )
        entry[label] = {
            "steps": steps,
            "nfe": float(nfe[0].mean()),
            "nfe_max": int(nfe[0].max()),
            "nonfinite_samples": int(np.sum(bad >= 0)),
            "network": summarise(network),
            "exact": summarise(exact),
            "gap": summarise(network - exact),
        }
    return result


# ------------------------------------------------------------------ part 2: digits


def load_digits(config: ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """Train and test pixel levels (float32 ``[N, 8, 8, 1]`` in 0..16) read through TFDS."""
    data_dir = config.data_dir or os.path.join(config.results_dir, NAME, "tfds")
    splits = (
        data.to_array_source(data.load_source("digits", split, data_dir=data_dir))
        for split in ("train", "test")
    )
    return tuple(s.arrays["image"].astype(np.float32) for s in splits)


def digits_network(config: ConfigDict, sde: diffusion.SDE) -> tuple[nn.Module, tuple[int, ...]]:
    """The network and the per-sample shape it works on: 64-D vectors (MLP) or 8×8×1 images (U-Net),
    in EDM's input/output scalings (:class:`shufflesgd.nn.models.EDMPreconditioned`) unless
    ``digits_preconditioning`` is ``"none"``."""
    if config.digits_model == "mlp":
        network, shape = (
            models.ScoreMLP(hidden=config.digits_hidden, num_layers=config.digits_num_layers),
            (DIGIT_DIM,),
        )
    else:
        network, shape = models.UNet(channels=tuple(config.digits_channels)), DIGIT_SHAPE
    if config.digits_preconditioning == "edm":
        network = models.EDMPreconditioned(network, sde, sigma_data=config.digits_sigma_data)
    return network, shape


def gaussian_baseline(
    train_levels: np.ndarray, test_x: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""``(mean, covariance, log-density of test_x)``: the Gaussian fitted to the dequantised
    training images, the covariance of the level midpoints plus the dequantisation's
    :math:`(2/17)^2/12\,I`."""
    x = (
        2.0 * (train_levels.reshape(len(train_levels), -1).astype(np.float64) + 0.5) / DIGIT_LEVELS
        - 1.0
    )
    mean = x.mean(axis=0)
    cov = np.cov(x, rowvar=False) + (2.0 / DIGIT_LEVELS) ** 2 / 12.0 * np.eye(x.shape[1])
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, (test_x.reshape(len(test_x), -1) - mean).T)
    log_prob = (
        -0.5 * np.sum(z**2, axis=0)
        - np.sum(np.log(np.diag(chol)))
        - 0.5 * x.shape[1] * math.log(2 * math.pi)
    )
    return mean, cov, log_prob


def discrete_bits_per_dim(log_prob_nats: Any) -> np.ndarray:
    r"""Bits/dim of the 17-level pixels from :math:`\log p_x` on :math:`[-1, 1]^{64}`:
    :math:`-\log p_x/(64\ln 2) + \log_2(17/2)` (see the module docstring)."""
    return -np.asarray(log_prob_nats, np.float64) / (DIGIT_DIM * math.log(2.0)) + math.log2(
        DIGIT_LEVELS / 2.0
    )


def run_digits(
    config: ConfigDict, sde: diffusion.SDE, key: jax.Array, run_dir: pathlib.Path
) -> dict[str, Any]:
    """Train on dequantised digits; bits/dim by the PF-ODE; SW2 of every sampler; digit grids."""
    train_levels, test_levels = load_digits(config)
    model, shape = digits_network(config, sde)
    keys = {
        name: jax.random.fold_in(key, i)
        for i, name in enumerate(
            (
                "train",
                "dequantise_test",
                "dequantise_train",
                "likelihood",
                "samples",
                "baseline",
                "prior",
                "directions",
            )
        )
    }
    per_sample = lambda a: a.reshape(len(a), *shape)
    loss_fn = dequantised_loss(training.denoising_score_matching_loss(model, sde, prediction="eps"))
    fingerprint = {
        k: config[k]
        for k in (
            "sde",
            "seed",
            "digits_model",
            "digits_preconditioning",
            "digits_sigma_data",
            "digits_hidden",
            "digits_num_layers",
            "digits_channels",
            "digits_batch_size",
            "digits_passes",
            "digits_epochs",
            "digits_learning_rate",
        )
    }
    passes = np.tile(
        train_levels, (config.digits_passes, 1, 1, 1)
    )  # one epoch = digits_passes passes
    params, records = train_part(
        "digits",
        model,
        loss_fn,
        data.ArraySource({"image": per_sample(passes)}),
        data.ArraySource({"image": per_sample(test_levels)}),
        config.digits_batch_size,
        config.digits_learning_rate,
        config.digits_epochs,
        keys["train"],
        fingerprint,
        run_dir,
    )

    test_x = np.asarray(dequantise(keys["dequantise_test"], jnp.asarray(test_levels)))
    mean, cov, gauss_log_prob = gaussian_baseline(train_levels, test_x)
    points = jnp.asarray(per_sample(test_x[: config.likelihood_points]))
    likelihood_rows = []
    # one compiled solve for every tolerance: rtol / atol are traced arguments
    solve = jax.jit(
        lambda p, xs, k, tol: diffusion.log_likelihood_batch(
            k,
            network_model(model, p),
            sde,
            xs,
            divergence=config.likelihood_divergence,
            rtol=tol,
            atol=tol,
            max_steps=config.likelihood_max_steps,
        )
    )
    for i, tol in enumerate(tqdm(config.likelihood_tolerances, desc=f"{NAME} digits likelihood")):
        lik = solve(
            params,
            points,
            jax.random.fold_in(keys["likelihood"], i),
            jnp.asarray(tol, points.dtype),
        )
        bits = discrete_bits_per_dim(lik.log_prob_nats)
        likelihood_rows.append(
            {
                "tolerance": tol,
                "nfe": float(np.mean(lik.nfe)),
                "nfe_max": int(np.max(lik.nfe)),
                "succeeded": int(np.sum(lik.success)),
                "bits_per_dim": summarise(bits),
                "bits_per_dim_values": bits.tolist(),
            }
        )

    n, seeds = len(test_levels), config.num_seeds
    test_flat = jnp.asarray(test_x.reshape(n, -1))
    directions = seed_directions(keys["directions"], seeds, config.num_projections, DIGIT_DIM)
    train_x = np.asarray(dequantise(keys["dequantise_train"], jnp.asarray(train_levels[:n])))
    gauss = jax.random.multivariate_normal(
        keys["baseline"], jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32), (seeds, n)
    )
    prior = sde.prior_sample(keys["prior"], (seeds, n, DIGIT_DIM))
    result: dict[str, Any] = {
        "model": config.digits_model,
        "preconditioning": config.digits_preconditioning,
        "num_test": n,
        "num_params": models.count_params(params),
        "grid": config.grid,
        "training": training_summary(records),
        "uniform_bits_per_dim": math.log2(DIGIT_LEVELS),
        "gaussian_bits_per_dim": summarise(
            discrete_bits_per_dim(gauss_log_prob[: config.likelihood_points])
        ),
        "gaussian_bits_per_dim_all_test": float(discrete_bits_per_dim(gauss_log_prob).mean()),
        "likelihood": likelihood_rows,
        "floor": summarise(
            seed_sliced_w2(
                jnp.broadcast_to(train_x.reshape(1, n, -1), (seeds, n, DIGIT_DIM)),
                test_flat,
                directions,
            )
        ),
        "gaussian": summarise(seed_sliced_w2(gauss, test_flat, directions)),
        "gaussian_clipped": summarise(
            seed_sliced_w2(jnp.clip(gauss, -1.0, 1.0), test_flat, directions)
        ),
        "prior": summarise(seed_sliced_w2(prior, test_flat, directions)),
        "prior_clipped": summarise(
            seed_sliced_w2(jnp.clip(prior, -1.0, 1.0), test_flat, directions)
        ),
        "samplers": {},
    }
    model_for = lambda p, _: network_model(model, p)
    jobs = sampling_jobs(
        config.digits_samplers, config.digits_nfe_budgets, config.adaptive_tolerances, config
    )
    pictures: dict[str, np.ndarray] = {}
    for index, (name, label, extra, steps) in enumerate(tqdm(jobs, desc=f"{NAME} digits samplers")):
        entry = result["samplers"].setdefault(name, {})
        if steps is None:
            entry[label] = {"steps": None, "nfe": None}
            continue
        runner = make_runner(
            *labelled_sampler(name, config, extra),
            model_for,
            sde,
            shape,
            n,
            seeds,
            (False,),
        )
        grid = jnp.asarray(diffusion.time_grid(sde, config.grid, steps))
        samples, nfe, bad = runner(params, grid, jax.random.fold_in(keys["samples"], index))
        flat = samples[0].reshape(seeds, n, DIGIT_DIM)
        entry[label] = {
            "steps": steps,
            "nfe": float(np.mean(nfe)),
            "nfe_max": int(np.max(nfe)),
            "nonfinite_samples": int(np.sum(np.asarray(bad) >= 0)),
            "network": summarise(seed_sliced_w2(flat, test_flat, directions)),
            "clipped": summarise(seed_sliced_w2(jnp.clip(flat, -1.0, 1.0), test_flat, directions)),
            "outside": float(np.mean(np.abs(np.asarray(flat)) > 1.0)),
        }
        if name in config.png_samplers:
            pictures[f"{name}, NFE {entry[label]['nfe']:.0f}"] = np.asarray(
                flat[0, : config.png_digits]
            )
    # the data variance of Time-Shift's rule, from all dequantised training images
    variance_key = jax.random.fold_in(key, len(keys))
    train_all = np.asarray(dequantise(variance_key, jnp.asarray(train_levels)))
    result["exposure_bias"] = run_exposure_bias(
        config,
        sde,
        model,
        params,
        shape,
        test_flat,
        directions,
        float(np.mean(np.var(train_all.reshape(len(train_all), -1), axis=1))),
        jax.random.fold_in(key, len(keys) + 1),
    )
    result["pictures"] = pictures
    result["test_pictures"] = test_x.reshape(n, -1)[: config.png_digits]
    return result


#: Each exposure-bias base sampler and its Time-Shift version (Li et al. 2024).
TIME_SHIFTED = {"ddim": "time_shift_ddim", "ancestral": "time_shift_ddpm"}


def run_exposure_bias(
    config: ConfigDict,
    sde: diffusion.SDE,
    network: nn.Module,
    params: PyTree,
    shape: tuple[int, ...],
    test_flat: jax.Array,
    directions: jax.Array,
    data_variance: float,
    key: jax.Array,
) -> dict[str, Any]:
    r"""Exposure bias on the trained network: each base sampler of ``exposure_samplers``, the
    same with Epsilon Scaling (Ning et al. 2024; uniform :math:`\lambda = b`, each ``b`` of
    ``epsilon_scaling_b``) and its Time-Shift version (Li et al. 2024; ``time_shift_*`` options,
    the data variance estimated from the dequantised training images), at equal NFE, paired:
    every variant of a (sampler, budget) starts from the same prior draws with the same noise,
    and the difference of its per-seed SW2 from the base sampler's is reported with its
    standard error over seeds."""
    n, seeds = test_flat.shape[0], config.num_seeds
    scales = (1.0, *config.epsilon_scaling_b)
    scaled_for = lambda p, b: diffusion.epsilon_scaling(network_model(network, p), sde, 0.0, b)
    plain_for = lambda p, _: network_model(network, p)
    shift_options = {
        "window": config.time_shift_window,
        "window_width": config.time_shift_window_width,
        "cutoff": config.time_shift_cutoff,
        "data_variance": data_variance,
    }
    rows: dict[str, dict[str, Any]] = {}
    for index, base in enumerate(tqdm(config.exposure_samplers, desc=f"{NAME} exposure bias")):
        shifted = TIME_SHIFTED[base]
        labels = [base, *(f"{base} + ES(b={b:g})" for b in scales[1:]), shifted]
        scaled_run = make_runner(
            diffusion.make_sampler(base), {}, scaled_for, sde, shape, n, seeds, scales
        )
        shifted_run = make_runner(
            diffusion.make_sampler(shifted), shift_options, plain_for, sde, shape, n, seeds, (0.0,)
        )
        for budget in config.exposure_nfe_budgets:
            steps = diffusion.SAMPLERS[base].steps_within(budget, final="denoise")
            if steps is None:
                for label in labels:
                    rows.setdefault(label, {})[str(budget)] = {"steps": None, "nfe": None}
                continue
            grid = jnp.asarray(diffusion.time_grid(sde, config.grid, steps))
            run_key = jax.random.fold_in(key, 1000 * index + budget)  # shared: paired variants
            outputs = [scaled_run(params, grid, run_key), shifted_run(params, grid, run_key)]
            samples = jnp.concatenate([o[0] for o in outputs]).reshape(-1, seeds, n, DIGIT_DIM)
            nfe = np.concatenate([np.asarray(o[1]) for o in outputs])
            bad = np.concatenate([np.asarray(o[2]) for o in outputs])
            sw2 = np.stack([np.asarray(seed_sliced_w2(x, test_flat, directions)) for x in samples])
            clipped = np.stack(
                [
                    np.asarray(seed_sliced_w2(jnp.clip(x, -1.0, 1.0), test_flat, directions))
                    for x in samples
                ]
            )
            for v, label in enumerate(labels):
                rows.setdefault(label, {})[str(budget)] = {
                    "steps": steps,
                    "nfe": float(np.mean(nfe[v])),
                    "nonfinite_samples": int(np.sum(bad[v] >= 0)),
                    "network": summarise(sw2[v]),
                    "clipped": summarise(clipped[v]),
                    "difference": summarise(sw2[v] - sw2[0]),
                    "outside": float(np.mean(np.abs(np.asarray(samples[v])) > 1.0)),
                }
    return {"data_variance": data_variance, "time_shift": shift_options, "samplers": rows}


# ------------------------------------------------------------------ output


def _fmt(stat: dict[str, float] | None, spec: str = ".4f") -> str:
    if stat is None or not np.isfinite(stat["mean"]):
        return "—"
    return f"{format(stat['mean'], spec)} ± {format(stat['se'], spec)}"


def _loss_line(training: dict[str, Any]) -> str:
    train, heldout = training["train_loss"], training["heldout_loss"]
    return (
        f"DSM loss (eps-MSE, per example): train {train[0]:.4f} (epoch 1) -> {train[-1]:.4f} "
        f"(epoch {len(train)}); "
        f"held-out {heldout[0]:.4f} -> {heldout[-1]:.4f}"
    )


def format_table(metrics: dict[str, Any], config: ConfigDict) -> str:
    """The printed table: per part, training losses, references and one row per
    (sampler, budget)."""
    lines = []
    if "mixture_2d" in metrics:
        m = metrics["mixture_2d"]
        lines += [
            (
                f"mixture_2d: ScoreMLP (eps), VP, {m['training']['epochs']} epochs; "
                "sliced W2 to held-out exact draws, "
                f"{config.grid} grid, final Tweedie denoise; "
                f"mean ± SE over {config.num_seeds} seeds of "
                f"{config.num_samples} samples, {config.num_projections} directions"
            ),
            _loss_line(m["training"]),
            (
                f"{'sampler':20s} {'budget':>9s} {'steps':>5s} {'NFE':>6s} {'network SW2':>17s} "
                f"{'exact-score SW2':>17s} {'gap (net - exact)':>17s}"
            ),
            f"{'exact draws (floor)':20s} {'—':>9s} {'—':>5s} {'—':>6s} {_fmt(m['floor']):>17s}",
            f"{'prior N(0, I)':20s} {'—':>9s} {'—':>5s} {'—':>6s} {_fmt(m['prior']):>17s}",
        ]
        for name, per in m["samplers"].items():
            for label, r in per.items():
                if r["nfe"] is None:
                    lines.append(f"{name:20s} {label:>9s}     — (one step exceeds the budget)")
                    continue
                lines.append(
                    f"{name:20s} {label:>9s} {r['steps']:5d} {r['nfe']:6.1f} "
                    f"{_fmt(r['network']):>17s} "
                    f"{_fmt(r['exact']):>17s} {_fmt(r['gap'], '+.4f'):>17s}"
                    + (f" ({r['nonfinite_samples']} non-finite)" if r["nonfinite_samples"] else "")
                )
    if "digits" in metrics:
        d = metrics["digits"]
        lines += [
            (
                f"digits: {d['model']} ({d['num_params']} parameters, "
                f"{d['preconditioning']} preconditioning), "
                f"{config.sde.upper()}, {d['training']['epochs']} epochs, uniform "
                "dequantisation x = 2(p+u)/17 - 1; bits/dim = -log p_x/(64 ln 2) + log2(8.5), "
                "PF-ODE "
                f"({config.likelihood_divergence} divergence) on "
                f"{config.likelihood_points} test images"
            ),
            _loss_line(d["training"]),
            f"{'likelihood':20s} {'tolerance':>9s} {'NFE':>7s} {'bits/dim':>17s} {'median':>7s}",
        ]
        for r in d["likelihood"]:
            lines.append(
                f"{'PF-ODE (Dopri5)':20s} {r['tolerance']:>9.0e} {r['nfe']:7.1f} "
                f"{_fmt(r['bits_per_dim']):>17s} {r['bits_per_dim']['median']:7.4f}"
                + (
                    f" ({config.likelihood_points - r['succeeded']} failed)"
                    if r["succeeded"] < config.likelihood_points
                    else ""
                )
            )
        lines += [
            (
                f"{'Gaussian fit':20s} {'exact':>9s} {'—':>7s} "
                f"{_fmt(d['gaussian_bits_per_dim']):>17s} "
                f"{d['gaussian_bits_per_dim']['median']:7.4f}"
            ),
            f"{'uniform on levels':20s} {'exact':>9s} {'—':>7s} {d['uniform_bits_per_dim']:>10.4f}",
            (
                f"digits samples: sliced W2 (64-D) to the {d['num_test']} dequantised test images, "
                "mean ± SE over "
                f"{config.num_seeds} seeds; "
                "'clipped': samples clipped to the data range [-1, 1] first"
            ),
            (
                f"{'sampler':20s} {'budget':>9s} {'steps':>5s} {'NFE':>6s} {'SW2':>17s} "
                f"{'clipped SW2':>17s} {'|x|>1':>6s}"
            ),
            f"{'train images (floor)':20s} {'—':>9s} {'—':>5s} {'—':>6s} {_fmt(d['floor']):>17s}",
            (
                f"{'Gaussian fit':20s} {'—':>9s} {'—':>5s} {'—':>6s} {_fmt(d['gaussian']):>17s} "
                f"{_fmt(d['gaussian_clipped']):>17s}"
            ),
            (
                f"{'prior N(0, I)':20s} {'—':>9s} {'—':>5s} {'—':>6s} {_fmt(d['prior']):>17s} "
                f"{_fmt(d['prior_clipped']):>17s}"
            ),
        ]
        for name, per in d["samplers"].items():
            for label, r in per.items():
                if r["nfe"] is None:
                    lines.append(f"{name:20s} {label:>9s}     — (one step exceeds the budget)")
                    continue
                lines.append(
                    f"{name:20s} {label:>9s} {r['steps']:5d} {r['nfe']:6.1f} "
                    f"{_fmt(r['network']):>17s} "
                    f"{_fmt(r['clipped']):>17s} {r['outside']:6.1%}"
                    + (f" ({r['nonfinite_samples']} non-finite)" if r["nonfinite_samples"] else "")
                )
        e = d["exposure_bias"]
        ts = e["time_shift"]
        lines += [
            (
                "exposure bias at equal NFE, paired (same prior draws and noise per seed): "
                "Epsilon Scaling (Ning et al. 2024, eps / b) and Time-Shift (Li et al. 2024, "
                f"window {ts['window']}, width {ts['window_width']:g}, cutoff {ts['cutoff']:g}, "
                f"data variance {e['data_variance']:.4f}); difference = SW2 - base SW2"
            ),
            (
                f"{'sampler':24s} {'budget':>6s} {'NFE':>6s} {'SW2':>17s} {'clipped SW2':>17s} "
                f"{'difference':>17s}"
            ),
        ]
        for label, per in e["samplers"].items():
            for budget, r in per.items():
                if r["nfe"] is None:
                    lines.append(f"{label:24s} {budget:>6s}     — (one step exceeds the budget)")
                    continue
                lines.append(
                    f"{label:24s} {budget:>6s} {r['nfe']:6.1f} {_fmt(r['network']):>17s} "
                    f"{_fmt(r['clipped']):>17s} {_fmt(r['difference'], '+.4f'):>17s}"
                    + (f" ({r['nonfinite_samples']} non-finite)" if r["nonfinite_samples"] else "")
                )
    return "\n".join(lines)


def _none_to_nan(value: Any) -> float:
    return np.nan if value is None else value


def _sampler_curves(axis: Any, per_sampler: dict[str, Any], key: str, **style: Any) -> None:
    """NFE against ``key``'s SW2, only its finite, positive points (a log-log panel); a curve
    with points left out (a diverged sampler) says how many in its legend label."""
    for name, per in per_sampler.items():
        pts = [
            (r["nfe"], _none_to_nan(r[key]["mean"]), _none_to_nan(r[key]["se"]))
            for r in per.values()
            if r["nfe"] is not None
        ]
        if pts:
            nfe, mean, se, dropped = common.finite_curve(*zip(*sorted(pts)))
            label = common.not_shown(f"{name} ({key})", dropped)
            axis.errorbar(nfe, mean, yerr=se, marker="o", ms=3, capsize=2, label=label, **style)


def draw(metrics: dict[str, Any], path: pathlib.Path) -> None:
    """NFE against SW2 for each part (network solid, exact score dashed), and the digits' NFE
    against bits/dim."""
    panels = [p for p in PARTS if p in metrics]
    if "digits" in metrics:
        panels += ["likelihood"] + (
            ["exposure_bias"] if "exposure_bias" in metrics["digits"] else []
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        if panel == "exposure_bias":
            d = metrics["digits"]
            _sampler_curves(axis, d["exposure_bias"]["samplers"], "network")
            common.log_level(axis, d["floor"]["mean"], color="k", ls="--", lw=0.8, label="floor")
            axis.set(
                xscale="log",
                yscale="log",
                xlabel="NFE",
                ylabel="sliced W2 to test images",
                title="digits exposure bias: base vs Epsilon Scaling vs Time-Shift",
            )
        elif panel == "likelihood":
            d = metrics["digits"]
            rows = d["likelihood"]
            nfe, bits, se = (
                np.array([_none_to_nan(r["nfe"]) for r in rows], float),
                np.array([_none_to_nan(r["bits_per_dim"]["mean"]) for r in rows], float),
                np.array([_none_to_nan(r["bits_per_dim"]["se"]) for r in rows], float),
            )
            keep = np.isfinite(nfe) & (nfe > 0) & np.isfinite(bits) & np.isfinite(se)
            dropped = int(np.sum(~keep))
            axis.errorbar(
                nfe[keep],
                bits[keep],
                yerr=se[keep],
                marker="o",
                label=common.not_shown("PF-ODE", dropped),
            )
            gaussian = _none_to_nan(d["gaussian_bits_per_dim"]["mean"])
            if np.isfinite(gaussian):
                axis.axhline(gaussian, color="C1", ls="--", label="Gaussian fit")
            axis.axhline(d["uniform_bits_per_dim"], color="k", ls=":", label="uniform on 17 levels")
            axis.set(
                xscale="log",
                xlabel="likelihood NFE (Dopri5)",
                ylabel="bits/dim",
                title="digits test bits/dim",
            )
        else:
            m = metrics[panel]
            _sampler_curves(axis, m["samplers"], "network")
            if panel == "mixture_2d":
                axis.set_prop_cycle(None)
                _sampler_curves(axis, m["samplers"], "exact", ls="--", alpha=0.6)
            common.log_level(axis, m["floor"]["mean"], color="k", ls="--", lw=0.8, label="floor")
            common.log_level(axis, m["prior"]["mean"], color="k", ls=":", lw=0.8, label="prior")
            if "gaussian" in m:
                common.log_level(
                    axis, m["gaussian"]["mean"], color="C1", ls="-.", lw=0.8, label="Gaussian fit"
                )
            axis.set(
                xscale="log",
                yscale="log",
                xlabel="NFE",
                ylabel="sliced W2",
                title=f"{panel}: SW2 vs NFE",
            )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=5)
    common.save_figure(fig, path)


def draw_digits(pictures: dict[str, np.ndarray], test: np.ndarray, path: pathlib.Path) -> None:
    """Square grids of generated digits per sampler beside test digits
    (pixels clipped to [-1, 1])."""
    panels = {**pictures, "test images (dequantised)": test}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for axis, (title, images) in zip(axes[0], panels.items()):
        side = math.ceil(math.sqrt(len(images)))
        canvas = np.zeros((side * 9 - 1, side * 9 - 1))  # grey separators
        for i, image in enumerate(np.clip(images, -1.0, 1.0).reshape(-1, 8, 8)):
            r, c = divmod(i, side)
            canvas[9 * r : 9 * r + 8, 9 * c : 9 * c + 8] = image
        axis.imshow(canvas, cmap="gray_r", vmin=-1.0, vmax=1.0)
        axis.set_title(title, fontsize=8)
        axis.axis("off")
    common.save_figure(fig, path)


def sampler_rows(per_sampler: dict[str, Any], stats: tuple[str, ...]) -> list[list[Any]]:
    """CSV rows, one per (sampler, budget): steps, NFE, then mean and SE of each of ``stats``."""
    rows = []
    for name, per in per_sampler.items():
        for label, r in per.items():
            values = [r[k][s] if k in r else None for k in stats for s in ("mean", "se")]
            rows.append([name, label, r["steps"], r["nfe"], *values])
    return rows


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table, the CSVs and the figures."""
    validate(config)
    sde = diffusion.make_sde(config.sde)
    folder = common.results_folder(config, NAME)
    root = pathlib.Path(config.checkpoint_dir) if config.checkpoint_dir else folder / "training"
    base = jax.random.key(config.seed)
    metrics: dict[str, Any] = {}
    if "mixture_2d" in config.parts:
        metrics["mixture_2d"] = run_mixture(
            config, sde, jax.random.fold_in(base, 0), root / "mixture_2d"
        )
    if "digits" in config.parts:
        metrics["digits"] = run_digits(config, sde, jax.random.fold_in(base, 1), root / "digits")
        draw_digits(
            metrics["digits"].pop("pictures"),
            metrics["digits"].pop("test_pictures"),
            folder / "digits.png",
        )
    for part in metrics:
        common.write_csv(
            folder / f"{part}_epochs.csv",
            ["epoch", "train_loss", "heldout_loss"],
            [
                [i + 1, a, b]
                for i, (a, b) in enumerate(
                    zip(
                        metrics[part]["training"]["train_loss"],
                        metrics[part]["training"]["heldout_loss"],
                    )
                )
            ],
        )
    columns = ["sampler", "budget", "steps", "nfe"]
    if "mixture_2d" in metrics:
        common.write_csv(
            folder / "mixture_2d.csv",
            columns
            + ["network_sw2", "network_sw2_se", "exact_sw2", "exact_sw2_se", "gap", "gap_se"],
            sampler_rows(metrics["mixture_2d"]["samplers"], ("network", "exact", "gap")),
        )
    if "digits" in metrics:
        common.write_csv(
            folder / "digits_samplers.csv",
            columns + ["sw2", "sw2_se", "clipped_sw2", "clipped_sw2_se"],
            sampler_rows(metrics["digits"]["samplers"], ("network", "clipped")),
        )
        common.write_csv(
            folder / "digits_exposure_bias.csv",
            columns
            + ["sw2", "sw2_se", "clipped_sw2", "clipped_sw2_se", "difference", "difference_se"],
            sampler_rows(
                metrics["digits"]["exposure_bias"]["samplers"], ("network", "clipped", "difference")
            ),
        )
        common.write_csv(
            folder / "digits_likelihood.csv",
            ["tolerance", "nfe", "bits_per_dim", "bits_per_dim_se"],
            [
                [r["tolerance"], r["nfe"], r["bits_per_dim"]["mean"], r["bits_per_dim"]["se"]]
                for r in metrics["digits"]["likelihood"]
            ],
        )
    table = format_table(metrics, config)
    return common.finish(folder, table, metrics, lambda path: draw(metrics, path))


if __name__ == "__main__":
    common.main(run, validate)
