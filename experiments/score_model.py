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
prior draws, noise, held-out set and directions; the seeds of each sampler run, here and in the
digits part, are vmapped in one jitted call and split over ``config.devices`` devices,
:func:`experiments.common.seed_mesh`).  Each sampler also runs, in the same compiled
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

*Exposure bias* (``exposure_samplers``): each base sampler beside its Epsilon Scaling versions
(Ning et al. 2024, :func:`shufflesgd.diffusion.epsilon_scaling`, :math:`\hat\varepsilon/b` for
each ``b`` of ``epsilon_scaling_b``) and its Time-Shift version (Li et al. 2024), at equal NFE
from the same prior draws and noise, scored by :math:`SW_2`.  The :math:`\varepsilon`-scaled
network is itself a model, whose PF-ODE defines a density: its bits/dim on the first
``exposure_likelihood_points`` of the likelihood images (the first tolerance, the same key and
divergence as the plain network's row) stand beside the plain network's (:math:`b = 1`, through
the same wrapper, which returns the network's output bit for bit), with the per-image paired
difference.  Time-Shift changes the times a sampler queries, not the model, so it has no PF-ODE
density of its own: its bits/dim are "—".

*VP against flow matching* (``digits_processes``, ``digits_process_samplers``): one network per
process of :data:`shufflesgd.diffusion.SDES`, of the same architecture, width, depth, epochs,
batch size, learning rate, preconditioning and seed (the same initial weights, batch order and
training draws).  On a diffusion SDE (``"vp"``) the network predicts :math:`\varepsilon` under the
:math:`\varepsilon`-MSE above; on an interpolant (``"flow"``, the rectified flow
:math:`x_t = (1-t)x_0 + t\varepsilon` of Liu, Gong & Liu 2023, Eq. 1) it predicts the velocity
:math:`u = \dot\alpha x_0 + \dot\sigma\varepsilon` (:math:`= \varepsilon - x_0`) under the
conditional flow-matching loss :math:`E\|\hat u_\theta(x_t, t) - u\|^2` (Lipman et al. 2023,
"Flow Matching for Generative Modeling", Eq. 9; ``weighting="velocity"`` of
:func:`shufflesgd.nn.training.denoising_score_matching_loss`), in the velocity form of the EDM
preconditioning (``EDMPreconditioned(output="velocity")``: the exact velocity of
:math:`N(0, \sigma_d^2 I)` data plus a unit-variance residual).  Each process keeps its library
default time range (VP :math:`[10^{-3}, 1]`, rectified flow :math:`[10^{-3}, 1 - 10^{-3}]`, so
that the log-SNR samplers run), so its bits/dim are those of its own :math:`p_{t_{min}}`, whose
noise level (:math:`\sigma(t_{min}) \approx 0.01` and :math:`10^{-3}`) is far below the
dequantisation's cell width :math:`2/17`.  Per process: the training losses (each in its own
units), bits/dim on the same test images at every likelihood tolerance (with the per-image
difference from the first process's), and :math:`SW_2` of each sampler of
``digits_process_samplers`` at each budget, paired across processes (both priors are
:math:`N(0, I)`: the same prior draws and noise per seed), with the paired difference from the
first process.  The network of the process ``sde`` is the digits network above (not retrained),
and its rows for a sampler and budget that the digits samplers ran are those rows (the other
processes then run with that row's key).

Outputs in the results folder: ``metrics.json``, ``mixture_2d.csv``, ``digits_samplers.csv``,
``digits_likelihood.csv``, ``digits_exposure_bias.csv``, ``digits_exposure_likelihood.csv``,
``digits_processes.csv`` (samplers), ``digits_processes_likelihood.csv``,
``digits_processes_epochs.csv``, ``<part>_epochs.csv``, ``table.txt``, ``figure.png`` and
``digits.png``; with ``checkpoint_dir`` unset the checkpoints and ``metrics.jsonl`` lie under
``training/<part>/`` in the results folder, with it set under ``<checkpoint_dir>/<part>/``, and
each further process's network under ``<that folder>/digits/<process>/``, so a rerun of the same
config resumes every network there.

Run: ``python -m experiments.score_model --config configs/score_model.py``
(``:quick`` for the short variant; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

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


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built, written or compiled."""
    common.check_names("parts", config.parts, PARTS)
    common.check_choice("sde", config.sde, diffusion.SDES)
    common.check_choice("grid", config.grid, diffusion.GRIDS)
    common.check_samplers("samplers", config.samplers, diffusion.SAMPLERS)
    common.check_samplers("digits_samplers", config.digits_samplers, diffusion.SAMPLERS)
    common.check_names("png_samplers", config.png_samplers, config.digits_samplers)
    common.check_names("digits_processes", config.digits_processes, diffusion.SDES)
    common.check_samplers(
        "digits_process_samplers", config.digits_process_samplers, diffusion.SAMPLERS
    )
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
        "exposure_likelihood_points",
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
    if config.exposure_likelihood_points > config.likelihood_points:
        raise ValueError(
            "config.exposure_likelihood_points must be at most config.likelihood_points "
            f"({config.likelihood_points}), got {config.exposure_likelihood_points}"
        )
    sde = diffusion.make_sde(config.sde)
    if not sde.t_min <= config.restart_t_min < config.restart_t_max <= sde.t_max:
        raise ValueError(
            "config.restart_t_min and config.restart_t_max must satisfy "
            f"{sde.t_min} <= restart_t_min "
            f"< restart_t_max <= {sde.t_max}, got {config.restart_t_min}, {config.restart_t_max}"
        )
    if any(
        common.parse_sampler("digits_process_samplers", s)[0] == "restart"
        for s in config.digits_process_samplers
    ):
        for name in config.digits_processes:
            process = diffusion.make_sde(name)
            if not process.t_min <= config.restart_t_min < config.restart_t_max <= process.t_max:
                raise ValueError(
                    "config.restart_t_min and config.restart_t_max must lie in the time range "
                    f"[{process.t_min}, {process.t_max}] of every process of "
                    f"config.digits_processes (restart is in config.digits_process_samplers), "
                    f"got {config.restart_t_min}, {config.restart_t_max} for {name!r}"
                )
    for field in ("checkpoint_dir", "data_dir"):
        common.check_optional_path(field, config[field])
    common.seed_devices(config)  # the sampling seeds split over config.devices


# ------------------------------------------------------------------ networks as samplers' models


def network_output(model: models.Model, params: PyTree, x: jax.Array, t: jax.Array) -> jax.Array:
    r"""The network's output (:math:`\hat\varepsilon_\theta(x, t)` or a velocity) for ONE sample
    ``x`` (samplers and likelihoods vmap over rows)."""
    output, _ = models.apply_model(model, params, {}, x[None], jnp.reshape(t, (1,)), train=False)
    return output[0]


def network_model(model: models.Model, params: PyTree, output: str = "eps") -> diffusion.Model:
    r"""The trained network as a :class:`shufflesgd.diffusion.Model` predicting ``output``
    (:math:`\varepsilon` by default, the flow-matching ``"velocity"`` on an interpolant)."""
    return diffusion.Model(lambda x, t: network_output(model, params, x, t), output)


def switched_model(
    model: models.Model,
    params: PyTree,
    exact_eps: Callable[[jax.Array, jax.Array], jax.Array],
    use_exact: jax.Array,
) -> diffusion.Model:
    r"""The network's :math:`\hat\varepsilon`, or the exact
    :math:`\varepsilon = -\sigma_t\nabla\log p_t` when the traced flag ``use_exact`` is true: one
    compiled sampler serves both (house rule 8)."""
    return diffusion.Model(
        lambda x, t: jnp.where(use_exact, exact_eps(x, t), network_output(model, params, x, t)),
        "eps",
    )


# ------------------------------------------------------------------ training


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
            {**batch, "image": data.dequantise(noise_key, batch["image"], DIGIT_LEVELS)},
            loss_key,
            train,
        )

    return wrapped


def train_part(
    part: str,
    model: models.Model,
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
    ``(params, grid, keys) -> (samples [W, S, n, *shape], nfe [W, S, n], nonfinite [W, S, n])``
    over the model switches W and the seeds S of ``keys`` (``[S]``, :func:`seed_keys`: jit splits
    the seeds over their devices); seed s draws its prior from ``fold_in(keys[s], 0)`` and its
    noise from ``fold_in(keys[s], 1)``, the same for every switch."""

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

    def run(params: PyTree, grid: jax.Array, keys: jax.Array):
        if keys.shape != (num_seeds,):
            raise ValueError(f"expected {num_seeds} seed keys, got shape {keys.shape}")
        per_seed = jax.vmap(one, in_axes=(None, None, 0, None))
        return jax.vmap(per_seed, in_axes=(None, 0, None, None))(
            params, jnp.asarray(switches), keys, grid
        )

    jitted = jax.jit(run)

    def on_the_seeds_devices(params: PyTree, grid: jax.Array, keys: jax.Array):
        # the parameters (committed to one device once restored from a checkpoint) and the grid
        # replicated on the devices that the seed keys are split over
        replicated = jax.sharding.NamedSharding(keys.sharding.mesh, jax.sharding.PartitionSpec())
        return jitted(*jax.device_put((params, grid), replicated), keys)

    return on_the_seeds_devices


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


def seed_keys(key: jax.Array, num_seeds: int, mesh: jax.sharding.Mesh) -> jax.Array:
    """The ``[S]`` keys ``fold_in(key, s)`` of the seeds, split over the ``"seeds"`` axis of
    ``mesh`` (:func:`experiments.common.shard_seeds`), so that what is vmapped over them runs each
    device's block of seeds on that device."""
    keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(num_seeds))
    return common.shard_seeds(keys, mesh)


def seed_directions(keys: jax.Array, num: int, dim: int) -> jax.Array:
    """``[S, L, d]`` random unit directions, seed s from ``keys[s]`` (:func:`seed_keys`)."""
    return jax.vmap(lambda k: metrics.random_directions(k, num, dim))(keys)


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

    n, seeds, mesh = config.num_samples, config.num_seeds, common.seed_mesh(config)
    per_seed = lambda name: seed_keys(keys[name], seeds, mesh)
    heldout = jax.vmap(lambda k: law.sample(k, n))(per_seed("heldout"))
    directions = seed_directions(per_seed("directions"), config.num_projections, law.dim)
    floor = jax.vmap(lambda k: law.sample(k, n))(per_seed("floor"))
    prior = jax.vmap(lambda k: sde.prior_sample(k, (n, law.dim)))(per_seed("prior"))
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
            params, grid, seed_keys(jax.random.fold_in(keys["samples"], index), seeds, mesh)
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


def process_output(sde: diffusion.SDE) -> str:
    r"""What a digits network predicts under ``sde``: the flow-matching velocity
    :math:`\dot\alpha x_0 + \dot\sigma\varepsilon` on an interpolant
    (:class:`shufflesgd.diffusion.Interpolant`), :math:`\varepsilon` on a diffusion SDE."""
    return "velocity" if isinstance(sde, diffusion.Interpolant) else "eps"


def digits_network(
    config: ConfigDict, sde: diffusion.SDE, output: str = "eps"
) -> tuple[models.Model, tuple[int, ...]]:
    """The network and the per-sample shape it works on: 64-D vectors (MLP) or 8×8×1 images (U-Net),
    in EDM's input/output scalings for ``output`` (:class:`shufflesgd.nn.models.EDMPreconditioned`)
    unless ``digits_preconditioning`` is ``"none"``."""
    if config.digits_model == "mlp":
        network, shape = (
            models.ScoreMLP(hidden=config.digits_hidden, num_layers=config.digits_num_layers),
            (DIGIT_DIM,),
        )
    else:
        network, shape = models.UNet(channels=tuple(config.digits_channels)), DIGIT_SHAPE
    if config.digits_preconditioning == "edm":
        network = models.EDMPreconditioned(
            network, sde, sigma_data=config.digits_sigma_data, output=output
        )
    return network, shape


def digits_loss(model: models.Model, sde: diffusion.SDE, output: str) -> training.LossFn:
    r"""The training loss on freshly dequantised images: the :math:`\varepsilon`-MSE (Ho et al.
    2020, Eq. 14) for an :math:`\varepsilon` network, the conditional flow-matching loss
    :math:`\|\hat u_\theta(x_t, t) - (\dot\alpha x_0 + \dot\sigma\varepsilon)\|^2` (Lipman et al.
    2023, Eq. 9) for a velocity network."""
    if output == "velocity":
        loss = training.denoising_score_matching_loss(
            model, sde, prediction="velocity", weighting="velocity"
        )
    else:
        loss = training.denoising_score_matching_loss(model, sde, prediction="eps")
    return dequantised_loss(loss)


class DigitsNetwork(NamedTuple):
    """A trained digits network: its process (name and object), module, output kind
    (:func:`process_output`), parameters, per-epoch records, training folder and the per-sample
    shape it works on."""

    process: str
    sde: diffusion.SDE
    model: models.Model
    output: str
    params: PyTree
    records: list[dict[str, Any]]
    run_dir: pathlib.Path
    shape: tuple[int, ...]


def train_digits(
    config: ConfigDict,
    process: str,
    sde: diffusion.SDE,
    train_levels: np.ndarray,
    test_levels: np.ndarray,
    key: jax.Array,
    run_dir: pathlib.Path,
) -> DigitsNetwork:
    """Train (or resume) the digits network of ``process`` in ``run_dir``: the part ``"digits"``
    for the process ``config.sde`` (the checkpoints of earlier runs keep resuming), the part
    ``"digits/<process>"`` for any other, each guarded by its own fingerprint."""
    output = process_output(sde)
    model, shape = digits_network(config, sde, output)
    per_sample = lambda a: a.reshape(len(a), *shape)
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
    fingerprint["sde"] = process
    passes = np.tile(
        train_levels, (config.digits_passes, 1, 1, 1)
    )  # one epoch = digits_passes passes
    params, records = train_part(
        "digits" if process == config.sde else f"digits/{process}",
        model,
        digits_loss(model, sde, output),
        data.ArraySource({"image": per_sample(passes)}),
        data.ArraySource({"image": per_sample(test_levels)}),
        config.digits_batch_size,
        config.digits_learning_rate,
        config.digits_epochs,
        key,
        fingerprint,
        run_dir,
    )
    return DigitsNetwork(process, sde, model, output, params, records, run_dir, shape)


def likelihood_solver(
    config: ConfigDict,
    sde: diffusion.SDE,
    model_for: Callable[[PyTree, jax.Array], diffusion.Model],
) -> Callable:
    """A jitted ``(params, points, key, tolerance, switch) -> LikelihoodResult``: the PF-ODE
    log-likelihood of each point under ``model_for(params, switch)``, one compiled solve for every
    tolerance (rtol = atol) and switch (both traced arguments, house rule 8)."""
    return jax.jit(
        lambda p, xs, k, tol, switch: diffusion.log_likelihood_batch(
            k,
            model_for(p, switch),
            sde,
            xs,
            divergence=config.likelihood_divergence,
            rtol=tol,
            atol=tol,
            max_steps=config.likelihood_max_steps,
        )
    )


def likelihood_row(lik: Any, tolerance: float) -> dict[str, Any]:
    """A likelihood table row: NFE, solves that succeeded and bits/dim (:func:`summarise` and the
    per-image values) of a batched PF-ODE solve."""
    bits = discrete_bits_per_dim(lik.log_prob_nats)
    return {
        "tolerance": tolerance,
        "nfe": float(np.mean(lik.nfe)),
        "nfe_max": int(np.max(lik.nfe)),
        "succeeded": int(np.sum(lik.success)),
        "bits_per_dim": summarise(bits),
        "bits_per_dim_values": bits.tolist(),
    }


def likelihood_rows(
    config: ConfigDict, network: DigitsNetwork, points: jax.Array, key: jax.Array
) -> list[dict[str, Any]]:
    """Bits/dim of ``points`` under ``network``'s PF-ODE at every tolerance of
    ``likelihood_tolerances``, tolerance ``i`` with the key ``fold_in(key, i)``."""
    solve = likelihood_solver(
        config, network.sde, lambda p, _: network_model(network.model, p, network.output)
    )
    rows = []
    for i, tol in enumerate(
        tqdm(config.likelihood_tolerances, desc=f"{NAME} digits likelihood ({network.process})")
    ):
        lik = solve(
            network.params,
            points,
            jax.random.fold_in(key, i),
            jnp.asarray(tol, points.dtype),
            jnp.zeros((), points.dtype),
        )
        rows.append(likelihood_row(lik, tol))
    return rows


def cached_runner(
    runners: dict[tuple[Any, ...], Callable],
    network: DigitsNetwork,
    name: str,
    extra: dict[str, Any],
    config: ConfigDict,
    num_samples: int,
) -> Callable:
    """The :func:`make_runner` of ``network`` and the sampler label ``name`` with ``extra``
    options, built once per (process, sampler, options) and kept in ``runners`` (jit compiles it
    once per grid length): the process comparison reuses the digits samplers' programs."""
    key = (network.process, name, tuple(sorted(extra.items())))
    if key not in runners:
        runners[key] = make_runner(
            *labelled_sampler(name, config, extra),
            lambda p, _: network_model(network.model, p, network.output),
            network.sde,
            network.shape,
            num_samples,
            config.num_seeds,
            (False,),
        )
    return runners[key]


def digits_sample_row(
    steps: int,
    nfe: Any,
    bad: Any,
    flat: jax.Array,
    test_flat: jax.Array,
    directions: jax.Array,
) -> tuple[dict[str, Any], np.ndarray]:
    """A digits sampler row (NFE, non-finite samples, SW2 as they come and clipped to
    :math:`[-1, 1]`, the fraction of pixels outside it) of samples ``flat`` ``[S, n, 64]``, and
    the per-seed SW2."""
    sw2 = np.asarray(seed_sliced_w2(flat, test_flat, directions))
    row = {
        "steps": steps,
        "nfe": float(np.mean(nfe)),
        "nfe_max": int(np.max(nfe)),
        "nonfinite_samples": int(np.sum(np.asarray(bad) >= 0)),
        "network": summarise(sw2),
        "clipped": summarise(seed_sliced_w2(jnp.clip(flat, -1.0, 1.0), test_flat, directions)),
        "outside": float(np.mean(np.abs(np.asarray(flat)) > 1.0)),
    }
    return row, sw2


#: The key indices of :func:`run_digits`, folded into the part's key, in this order.
DIGIT_KEYS = (
    "train",
    "dequantise_test",
    "dequantise_train",
    "likelihood",
    "samples",
    "baseline",
    "prior",
    "directions",
    "data_variance",
    "exposure_bias",
    "processes",
)


def run_digits(
    config: ConfigDict, sde: diffusion.SDE, key: jax.Array, run_dir: pathlib.Path
) -> dict[str, Any]:
    """Train on dequantised digits; bits/dim by the PF-ODE; SW2 of every sampler; digit grids;
    exposure bias; the network of every process of ``digits_processes`` side by side."""
    train_levels, test_levels = load_digits(config)
    keys = {name: jax.random.fold_in(key, i) for i, name in enumerate(DIGIT_KEYS)}
    main = train_digits(config, config.sde, sde, train_levels, test_levels, keys["train"], run_dir)
    model, params, shape = main.model, main.params, main.shape
    per_sample = lambda a: a.reshape(len(a), *shape)

    test_x = np.asarray(
        data.dequantise(keys["dequantise_test"], jnp.asarray(test_levels), DIGIT_LEVELS)
    )
    mean, cov, gauss_log_prob = gaussian_baseline(train_levels, test_x)
    points = jnp.asarray(per_sample(test_x[: config.likelihood_points]))
    likelihood = likelihood_rows(config, main, points, keys["likelihood"])

    n, seeds, mesh = len(test_levels), config.num_seeds, common.seed_mesh(config)
    test_flat = jnp.asarray(test_x.reshape(n, -1))
    directions = seed_directions(
        seed_keys(keys["directions"], seeds, mesh), config.num_projections, DIGIT_DIM
    )
    train_x = np.asarray(
        data.dequantise(keys["dequantise_train"], jnp.asarray(train_levels[:n]), DIGIT_LEVELS)
    )
    # the baselines are drawn whole from one key each, then split over the seeds' devices
    gauss = jax.random.multivariate_normal(
        keys["baseline"], jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32), (seeds, n)
    )
    gauss, prior = common.shard_seeds(
        (gauss, sde.prior_sample(keys["prior"], (seeds, n, DIGIT_DIM))), mesh
    )
    result: dict[str, Any] = {
        "model": config.digits_model,
        "preconditioning": config.digits_preconditioning,
        "process": config.sde,
        "num_test": n,
        "num_params": models.count_params(params),
        "grid": config.grid,
        "training": training_summary(main.records),
        "uniform_bits_per_dim": math.log2(DIGIT_LEVELS),
        "gaussian_bits_per_dim": summarise(
            discrete_bits_per_dim(gauss_log_prob[: config.likelihood_points])
        ),
        "gaussian_bits_per_dim_all_test": float(discrete_bits_per_dim(gauss_log_prob).mean()),
        "likelihood": likelihood,
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
    jobs = sampling_jobs(
        config.digits_samplers, config.digits_nfe_budgets, config.adaptive_tolerances, config
    )
    runners: dict[tuple[Any, ...], Callable] = {}
    done: dict[tuple[str, str], tuple[int, dict[str, Any], np.ndarray]] = {}
    pictures: dict[str, np.ndarray] = {}
    for index, (name, label, extra, steps) in enumerate(tqdm(jobs, desc=f"{NAME} digits samplers")):
        entry = result["samplers"].setdefault(name, {})
        if steps is None:
            entry[label] = {"steps": None, "nfe": None}
            continue
        runner = cached_runner(runners, main, name, extra, config, n)
        grid = jnp.asarray(diffusion.time_grid(sde, config.grid, steps))
        samples, nfe, bad = runner(
            params, grid, seed_keys(jax.random.fold_in(keys["samples"], index), seeds, mesh)
        )
        flat = samples[0].reshape(seeds, n, DIGIT_DIM)
        entry[label], sw2 = digits_sample_row(steps, nfe, bad, flat, test_flat, directions)
        done[(name, label)] = (index, entry[label], sw2)
        if name in config.png_samplers:
            pictures[f"{name}, NFE {entry[label]['nfe']:.0f}"] = np.asarray(
                flat[0, : config.png_digits]
            )
    # the data variance of Time-Shift's rule, from all dequantised training images
    train_all = np.asarray(
        data.dequantise(keys["data_variance"], jnp.asarray(train_levels), DIGIT_LEVELS)
    )
    result["exposure_bias"] = run_exposure_bias(
        config,
        sde,
        model,
        params,
        shape,
        test_flat,
        directions,
        float(np.mean(np.var(train_all.reshape(len(train_all), -1), axis=1))),
        keys["exposure_bias"],
        points[: config.exposure_likelihood_points],
        jax.random.fold_in(keys["likelihood"], 0),  # the key of the first likelihood row
    )
    # every process trains from the part's training key (common random numbers: the same initial
    # weights, batch order and draws of t, noise and dequantisation), folded in afresh
    networks = {
        process: main
        if process == config.sde
        else train_digits(
            config,
            process,
            diffusion.make_sde(process),
            train_levels,
            test_levels,
            jax.random.fold_in(key, DIGIT_KEYS.index("train")),
            run_dir / process,
        )
        for process in config.digits_processes
    }
    result["processes"] = run_processes(
        config,
        networks,
        {config.sde: likelihood},
        done,
        points,
        test_flat,
        directions,
        keys["likelihood"],
        keys["samples"],
        keys["processes"],
        runners,
    )
    result["pictures"] = pictures
    result["test_pictures"] = test_x.reshape(n, -1)[: config.png_digits]
    return result


def run_processes(
    config: ConfigDict,
    networks: dict[str, DigitsNetwork],
    known_likelihoods: dict[str, list[dict[str, Any]]],
    known_runs: dict[tuple[str, str], tuple[int, dict[str, Any], np.ndarray]],
    points: jax.Array,
    test_flat: jax.Array,
    directions: jax.Array,
    likelihood_key: jax.Array,
    known_key: jax.Array,
    key: jax.Array,
    runners: dict[tuple[Any, ...], Callable],
) -> dict[str, Any]:
    """The networks of ``digits_processes`` side by side: training losses, bits/dim of the same
    test images (the likelihood rows of ``known_likelihoods`` reused, the same keys for the
    others) with the per-image difference from the first process's, and SW2 of every sampler of
    ``digits_process_samplers`` at every budget, paired: job ``j`` runs every process with the
    key ``fold_in(key, j)`` (the same prior draws and noise), and each process's per-seed SW2
    minus the first process's is reported with its standard error.  A (sampler, budget) that the
    digits samplers already ran on the process ``config.sde`` (``known_runs``: its job index
    ``i``, row and per-seed SW2) is not run again: its row is reused and the other processes run
    with its key ``fold_in(known_key, i)``."""
    n, mesh = test_flat.shape[0], common.seed_mesh(config)
    first = config.digits_processes[0]
    result: dict[str, Any] = {"names": list(networks), "networks": {}, "samplers": {}}
    for process, network in networks.items():
        result["networks"][process] = {
            "output": network.output,
            "loss": "flow matching" if network.output == "velocity" else "eps-MSE",
            "t_min": float(network.sde.t_min),
            "t_max": float(network.sde.t_max),
            "num_params": models.count_params(network.params),
            "params_norm": float(optax.tree.norm(network.params)),
            "checkpoints": str(network.run_dir / "checkpoints"),
            "training": training_summary(network.records),
            "likelihood": known_likelihoods.get(process)
            or likelihood_rows(config, network, points, likelihood_key),
        }
        result["samplers"][process] = {}
    # bits/dim paired per test image: each process's minus the first's, tolerance by tolerance
    first_rows = result["networks"][first]["likelihood"]
    for net in result["networks"].values():
        net["likelihood_difference"] = [
            summarise(np.subtract(r["bits_per_dim_values"], f["bits_per_dim_values"]))
            for r, f in zip(net["likelihood"], first_rows)
        ]
    jobs = sampling_jobs(
        config.digits_process_samplers,
        config.digits_nfe_budgets,
        config.adaptive_tolerances,
        config,
    )
    for index, (name, label, extra, steps) in enumerate(
        tqdm(jobs, desc=f"{NAME} digits processes")
    ):
        known = known_runs.get((name, label))
        first_sw2 = None
        for process, network in networks.items():
            entry = result["samplers"][process].setdefault(name, {})
            if steps is None:
                entry[label] = {"steps": None, "nfe": None}
                continue
            if known is not None and process == config.sde:
                entry[label], sw2 = dict(known[1]), known[2]
            else:
                runner = cached_runner(runners, network, name, extra, config, n)
                grid = jnp.asarray(diffusion.time_grid(network.sde, config.grid, steps))
                job_key = (
                    jax.random.fold_in(known_key, known[0])
                    if known is not None
                    else jax.random.fold_in(key, index)
                )
                samples, nfe, bad = runner(
                    network.params, grid, seed_keys(job_key, config.num_seeds, mesh)
                )
                flat = samples[0].reshape(config.num_seeds, n, DIGIT_DIM)
                entry[label], sw2 = digits_sample_row(steps, nfe, bad, flat, test_flat, directions)
            first_sw2 = sw2 if process == first else first_sw2
            entry[label]["difference"] = summarise(sw2 - first_sw2)
    return result


#: Each exposure-bias base sampler and its Time-Shift version (Li et al. 2024).
TIME_SHIFTED = {"ddim": "time_shift_ddim", "ancestral": "time_shift_ddpm"}


def run_exposure_bias(
    config: ConfigDict,
    sde: diffusion.SDE,
    network: models.Model,
    params: PyTree,
    shape: tuple[int, ...],
    test_flat: jax.Array,
    directions: jax.Array,
    data_variance: float,
    key: jax.Array,
    points: jax.Array,
    likelihood_key: jax.Array,
) -> dict[str, Any]:
    r"""Exposure bias on the trained network: each base sampler of ``exposure_samplers``, the
    same with Epsilon Scaling (Ning et al. 2024; uniform :math:`\lambda = b`, each ``b`` of
    ``epsilon_scaling_b``) and its Time-Shift version (Li et al. 2024; ``time_shift_*`` options,
    the data variance estimated from the dequantised training images), at equal NFE, paired:
    every variant of a (sampler, budget) starts from the same prior draws with the same noise,
    and the difference of its per-seed SW2 from the base sampler's is reported with its
    standard error over seeds.

    Bits/dim of ``points`` under the PF-ODE of each :math:`\varepsilon`-scaled network
    :math:`\hat\varepsilon/b` (a model like any other: its PF-ODE drift
    :math:`f x + \frac12 g^2\hat\varepsilon/(b\sigma)` transports the prior onto a density),
    :math:`b = 1` included (the plain network through the same wrapper and compiled solve, bit
    for bit its output), at the first likelihood tolerance with the key ``likelihood_key``
    (that of the plain network's first row), and the per-image difference from
    :math:`b = 1`.  Time-Shift keeps the network and moves the times a sampler queries it at, so
    it defines no density of its own (``"time_shift": None``)."""
    n, seeds, mesh = test_flat.shape[0], config.num_seeds, common.seed_mesh(config)
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
            run_keys = seed_keys(run_key, seeds, mesh)
            outputs = [scaled_run(params, grid, run_keys), shifted_run(params, grid, run_keys)]
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
    tolerance = config.likelihood_tolerances[0]
    solve = likelihood_solver(config, sde, scaled_for)
    likelihood: dict[str, Any] = {
        "tolerance": tolerance,
        "points": int(points.shape[0]),
        "scales": {},
        "time_shift": None,
    }
    plain_bits = None
    for b, label in zip(scales, ["network (b=1)", *(f"ES(b={b:g})" for b in scales[1:])]):
        lik = solve(
            params,
            points,
            likelihood_key,
            jnp.asarray(tolerance, points.dtype),
            jnp.asarray(b, points.dtype),
        )
        row = {"b": b, **likelihood_row(lik, tolerance)}
        bits = np.asarray(row["bits_per_dim_values"])
        plain_bits = bits if plain_bits is None else plain_bits
        row["difference"] = summarise(bits - plain_bits)
        likelihood["scales"][label] = row
    return {
        "data_variance": data_variance,
        "time_shift": shift_options,
        "samplers": rows,
        "likelihood": likelihood,
    }


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
        lines += _exposure_likelihood_lines(e, config)
        lines += _process_lines(d, config)
    return "\n".join(lines)


def _exposure_likelihood_lines(e: dict[str, Any], config: ConfigDict) -> list[str]:
    """The exposure-bias bits/dim rows: the plain and each eps-scaled network, Time-Shift '—'."""
    lik = e["likelihood"]
    lines = [
        (
            "exposure bias, bits/dim of the eps-scaled network eps/b (its own PF-ODE, Dopri5, "
            f"tolerance {lik['tolerance']:.0e}, {config.likelihood_divergence} divergence) on "
            f"the first {lik['points']} test images; difference = bits/dim - the b=1 network's, "
            "paired per image"
        ),
        f"{'model':24s} {'NFE':>7s} {'bits/dim':>17s} {'median':>7s} {'difference':>17s}",
    ]
    for label, r in lik["scales"].items():
        lines.append(
            f"{label:24s} {r['nfe']:7.1f} {_fmt(r['bits_per_dim']):>17s} "
            f"{r['bits_per_dim']['median']:7.4f} {_fmt(r['difference'], '+.4f'):>17s}"
            + (
                f" ({lik['points'] - r['succeeded']} failed)"
                if r["succeeded"] < lik["points"]
                else ""
            )
        )
    lines.append(
        f"{'Time-Shift':24s} {'—':>7s} {'—':>17s} {'—':>7s} {'—':>17s} "
        "(moves the sampler's query times, not the model: no PF-ODE density)"
    )
    return lines


def _process_lines(d: dict[str, Any], config: ConfigDict) -> list[str]:
    """The process comparison: training losses, bits/dim and paired SW2 per process."""
    procs = d["processes"]
    first = procs["names"][0]
    lines = [
        (
            f"digits, one network per process ({', '.join(procs['names'])}): the same "
            f"{d['model']} ({d['preconditioning']} preconditioning), epochs, batch, learning "
            "rate and seed; eps-MSE on a diffusion SDE, flow-matching (velocity) loss on an "
            "interpolant; losses per example, each in its own units"
        ),
        (
            f"{'process':8s} {'output':9s} {'loss':14s} {'t range':>15s} "
            f"{'train loss (first -> last)':>27s} {'held-out loss':>19s}"
        ),
    ]
    for name, net in procs["networks"].items():
        train, heldout = net["training"]["train_loss"], net["training"]["heldout_loss"]
        times = "[{:g}, {:g}]".format(net["t_min"], net["t_max"])
        train_change = f"{train[0]:.4f} -> {train[-1]:.4f}"
        heldout_change = f"{heldout[0]:.4f} -> {heldout[-1]:.4f}"
        lines.append(
            f"{name:8s} {net['output']:9s} {net['loss']:14s} {times:>15s} "
            f"{train_change:>27s} {heldout_change:>19s}"
        )
    lines += [
        (
            f"bits/dim by process: PF-ODE (Dopri5, {config.likelihood_divergence} divergence) "
            f"of each process's p_t_min on the same {config.likelihood_points} test images; "
            f"difference = bits/dim - {first}'s, paired per image"
        ),
        (
            f"{'process':8s} {'tolerance':>9s} {'NFE':>7s} {'bits/dim':>17s} {'median':>7s} "
            f"{'difference':>17s}"
        ),
    ]
    for name, net in procs["networks"].items():
        for r, diff in zip(net["likelihood"], net["likelihood_difference"]):
            lines.append(
                f"{name:8s} {r['tolerance']:>9.0e} {r['nfe']:7.1f} "
                f"{_fmt(r['bits_per_dim']):>17s} {r['bits_per_dim']['median']:7.4f} "
                f"{_fmt(diff, '+.4f'):>17s}"
                + (
                    f" ({config.likelihood_points - r['succeeded']} failed)"
                    if r["succeeded"] < config.likelihood_points
                    else ""
                )
            )
    lines += [
        (
            f"samples by process: sliced W2 (64-D) to the {d['num_test']} dequantised test "
            f"images, mean ± SE over {config.num_seeds} seeds, paired across processes (the "
            f"same prior draws and noise); difference = SW2 - {first}'s SW2"
        ),
        (
            f"{'sampler':20s} {'budget':>9s} {'steps':>5s} {'process':>8s} {'NFE':>6s} "
            f"{'SW2':>17s} {'clipped SW2':>17s} {'|x|>1':>6s} {'difference':>17s}"
        ),
    ]
    samplers = procs["samplers"]
    for sampler, per in samplers[first].items():
        for label in per:
            for name in procs["names"]:
                r = samplers[name][sampler][label]
                if r["nfe"] is None:
                    lines.append(
                        f"{sampler:20s} {label:>9s}     — {name:>8s} (one step exceeds the budget)"
                    )
                    continue
                lines.append(
                    f"{sampler:20s} {label:>9s} {r['steps']:5d} {name:>8s} {r['nfe']:6.1f} "
                    f"{_fmt(r['network']):>17s} {_fmt(r['clipped']):>17s} {r['outside']:6.1%} "
                    f"{_fmt(r['difference'], '+.4f'):>17s}"
                    + (f" ({r['nonfinite_samples']} non-finite)" if r["nonfinite_samples"] else "")
                )
    return lines


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
    """NFE against SW2 for each part (network solid, exact score dashed), the digits' NFE
    against bits/dim per process, the exposure-bias SW2, and NFE against SW2 per process."""
    panels = [p for p in PARTS if p in metrics]
    if "digits" in metrics:
        panels += ["likelihood"] + [
            p for p in ("exposure_bias", "processes") if p in metrics["digits"]
        ]
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
        elif panel == "processes":
            d = metrics["digits"]
            procs = d["processes"]
            for process, style in zip(procs["names"], ("-", "--", ":", "-.") * len(procs)):
                axis.set_prop_cycle(None)
                per = {f"{name}, {process}": v for name, v in procs["samplers"][process].items()}
                _sampler_curves(axis, per, "network", ls=style)
            common.log_level(axis, d["floor"]["mean"], color="k", ls="--", lw=0.8, label="floor")
            axis.set(
                xscale="log",
                yscale="log",
                xlabel="NFE",
                ylabel="sliced W2 to test images",
                title=f"digits: {' vs '.join(procs['names'])} (same network, paired seeds)",
            )
        elif panel == "likelihood":
            d = metrics["digits"]
            curves = {d["process"]: d["likelihood"]}
            for process, net in d.get("processes", {}).get("networks", {}).items():
                curves.setdefault(process, net["likelihood"])
            for process, rows in curves.items():
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
                    label=common.not_shown(f"PF-ODE, {process}", dropped),
                )
            gaussian = _none_to_nan(d["gaussian_bits_per_dim"]["mean"])
            if np.isfinite(gaussian):
                axis.axhline(gaussian, color="C7", ls="--", label="Gaussian fit")
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


def write_digits_comparisons(
    folder: pathlib.Path, digits: dict[str, Any], columns: list[str]
) -> None:
    """The CSVs of the exposure-bias bits/dim and of the process comparison (samplers, bits/dim,
    epochs), one row per (process or model, ...)."""
    lik = digits["exposure_bias"]["likelihood"]
    common.write_csv(
        folder / "digits_exposure_likelihood.csv",
        ["model", "b", "tolerance", "points", "nfe", "bits_per_dim", "bits_per_dim_se"]
        + ["difference", "difference_se"],
        [
            [label, r["b"], r["tolerance"], lik["points"], r["nfe"]]
            + [r[k][s] for k in ("bits_per_dim", "difference") for s in ("mean", "se")]
            for label, r in lik["scales"].items()
        ],
    )
    procs = digits["processes"]
    common.write_csv(
        folder / "digits_processes.csv",
        ["process", *columns]
        + ["sw2", "sw2_se", "clipped_sw2", "clipped_sw2_se", "difference", "difference_se"],
        [
            [name, *row]
            for name in procs["names"]
            for row in sampler_rows(procs["samplers"][name], ("network", "clipped", "difference"))
        ],
    )
    common.write_csv(
        folder / "digits_processes_likelihood.csv",
        ["process", "tolerance", "nfe", "bits_per_dim", "bits_per_dim_se"]
        + ["difference", "difference_se"],
        [
            [name, r["tolerance"], r["nfe"], r["bits_per_dim"]["mean"], r["bits_per_dim"]["se"]]
            + [diff["mean"], diff["se"]]
            for name, net in procs["networks"].items()
            for r, diff in zip(net["likelihood"], net["likelihood_difference"])
        ],
    )
    common.write_csv(
        folder / "digits_processes_epochs.csv",
        ["process", "epoch", "train_loss", "heldout_loss"],
        [
            [name, i + 1, a, b]
            for name, net in procs["networks"].items()
            for i, (a, b) in enumerate(
                zip(net["training"]["train_loss"], net["training"]["heldout_loss"])
            )
        ],
    )


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table, the CSVs and the figures."""
    validate(config)
    sde = diffusion.make_sde(config.sde)
    folder = common.results_folder(config, NAME)
    root = pathlib.Path(config.checkpoint_dir) if config.checkpoint_dir else folder / "training"
    base = jax.random.key(config.seed)
    # the seed axis of every sampling sweep was split over these
    metrics: dict[str, Any] = {"devices": common.seed_devices(config)}
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
    for part in (p for p in PARTS if p in metrics):
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
        write_digits_comparisons(folder, metrics["digits"], columns)
    table = format_table(metrics, config)
    return common.finish(folder, table, metrics, lambda path: draw(metrics, path))


if __name__ == "__main__":
    common.main(run, validate)
