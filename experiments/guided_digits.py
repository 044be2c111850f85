r"""Guidance on the 8×8 digits: a class-conditional score network, a classifier, and every
guidance method of :mod:`shufflesgd.diffusion.guidance` at a sweep of guidance scales.

**Network.**  scikit-learn's 8×8 digits (10 classes; pixels :math:`p \in \{0, \dots, 16\}`),
built and read through TFDS (:func:`shufflesgd.nn.data.load_source`), uniformly dequantised to
:math:`x = 2(p + u)/17 - 1 \in [-1, 1)^{64}` (Theis, van den Oord & Bethge 2016; Ho et al.
2020, Sec. 3.3), :math:`u` drawn afresh at every training step.  A
:class:`shufflesgd.nn.models.ConditionalScoreMLP` (the score MLP with a learned label
embedding, ten classes and one null token, added to its time embedding) in the input/output
scalings of Karras et al. (2022), Table 1 (:class:`shufflesgd.nn.models.EDMPreconditioned`)
predicts :math:`\varepsilon` under the VP SDE (Song et al. 2021, Eq. 11), trained by the
:math:`\varepsilon`-MSE (Ho et al. 2020, Eq. 14) with **label dropout**: each training
example's label is replaced by the null token with probability ``label_dropout`` (Ho & Salimans
2022, "Classifier-Free Diffusion Guidance", Alg. 1), so that the one network learns both
:math:`\hat\varepsilon(x_t, t, c)` and the unconditional :math:`\hat\varepsilon(x_t, t)`.
Training is resumable (:func:`experiments.common.train_resumable`: an Orbax checkpoint and one
``metrics.jsonl`` line per epoch, an epoch being ``passes`` passes over the 1536 training
images); each line holds the held-out DSM loss on the test images with their labels and with the
null token (fixed draws, so epochs compare).  The trained network is a
:class:`shufflesgd.diffusion.guidance.ConditionalModel`, its label
:data:`~shufflesgd.diffusion.guidance.NULL_LABEL` the null token.

**Classifier.**  A :class:`shufflesgd.nn.models.MLP` trained by Adam on the softmax
cross-entropy (:func:`shufflesgd.nn.training.cross_entropy_loss`) of dequantised training
digits, resumable as well; its accuracy on the dequantised test digits is reported (it must be
high for its verdicts on samples to mean anything).

**Sampling.**  For every class :math:`c` and every scale :math:`\gamma` of ``scales``
(:math:`\gamma = 1` the conditional model, :math:`\gamma = 0` the unconditional one; Ho &
Salimans' weight is :math:`w = \gamma - 1`), ``samples_per_class`` samples from the same prior
draws for every method and scale (paired), all of a method's in one jitted, vmapped call whose
sample axis is split over ``config.devices`` devices (the ``"seeds"`` mesh of
:mod:`experiments.common`, :func:`sample_all`):

* ``conditional``: the conditional branch alone (scale 1 only), one evaluation a call;
* ``cfg``: classifier-free guidance :math:`\hat\varepsilon_u + \gamma(\hat\varepsilon_c -
  \hat\varepsilon_u)` (Ho & Salimans 2022, Eq. 6);
* ``rescaled``: CFG rescaled to the conditional output's standard deviation, mixed with factor
  ``rescale`` (Lin, Liu, Li & Yang 2024, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", Sec. 3.4);
* ``adaptive``: CFG switched off where the cosine similarity of the two branches reaches
  ``adaptive_threshold`` (Castillo et al. 2023, "Adaptive Guidance: Training-free Acceleration
  of Conditional Diffusion Models"), with the fraction of calls where it was off;
* ``apg``: adaptive projected guidance (Sadat, Hilliges & Weber 2024, "Eliminating
  Oversaturation and Artifacts of High Guidance Scales in Diffusion Models"), parallel weight
  ``apg_parallel_weight`` and radius ``apg_radius``;
* ``pcg``: predictor–corrector guidance (Bradley & Nakkiran 2024, "Classifier-Free Guidance is a
  Predictor-Corrector", Alg. 2): a conditional DDIM predictor and ``pcg_corrector_steps``
  Langevin steps of size ``pcg_step_scale`` :math:`\cdot\sigma^2` on
  :math:`p_t(x \mid c)^\gamma p_t(x)^{1-\gamma}` at each grid time.

The first five run the sampler ``sampler`` (one of :data:`SAMPLER_CHOICES`) through a model
transform (:func:`shufflesgd.diffusion.guidance.guided_model`) on a ``num_steps``-step ``grid``
with the final denoising step; PCG runs its own DDIM predictor on the same grid.  **Network
evaluations** per sample: a transform evaluates both branches at each sampler call,
:math:`2\,\mathrm{NFE}`; the conditional branch one, :math:`\mathrm{NFE}`; PCG
:math:`(1 + 2K)N + 2` for :math:`N` steps and :math:`K` corrector steps (its ``info.nfe``).
Adaptive guidance as a model transform evaluates both branches at every call, so its saving is
reported (the fraction of calls with guidance off, counted inside the model by a local
``jax.new_ref``), not taken.  The unconditional branch is sampled too, from the same prior
draws, as a reference: the classifier's predicted-class histogram of its samples shows whether
label dropout trained it (a trained branch spreads over the ten classes as the data do).

**Measured** per method and scale, on samples clipped to the data range :math:`[-1, 1]`:
*class accuracy* (the fraction the classifier assigns to the class asked for; mean ± standard
error over all samples, and the SE over the ten per-class accuracies), the paired difference
from the conditional samples of the same prior draws, the classifier's *confidence* (mean
softmax probability of the class asked for), the *diversity* (per class, the pixel standard
deviation across that class's samples averaged over pixels; mean ± SE over classes; the same
statistic of the dequantised training images is the reference), the network evaluations per
sample, and for adaptive guidance the fraction of sampler calls with guidance off.  Guidance is
expected to raise class accuracy and confidence above the conditional samples' and lower the
diversity as :math:`\gamma` grows (Ho & Salimans 2022, Fig. 1 and Table 1: the
fidelity–diversity trade-off); rescaling and APG are meant to keep the gain at high scales while
limiting the loss of diversity and the over-saturation (pixels pushed past :math:`[-1, 1]`).

Outputs in the results folder: ``metrics.json``, ``rows.csv`` (one row per method and scale),
``table.txt``, ``samples.npz`` (the grid images), ``figure.png`` (class accuracy and diversity
against the guidance scale per method) and ``samples.png`` (rows classes 0–9, columns
``grid_samples`` samples, one panel per method at ``grid_scale``, beside test digits).  With
``checkpoint_dir`` unset the checkpoints and ``metrics.jsonl`` lie under
``training/{network,classifier}/`` in the results folder, with it set under
``<checkpoint_dir>/{network,classifier}/``, so a rerun of the same config resumes there.

Run: ``python -m experiments.guided_digits --config configs/guided_digits.py``
(``:quick`` for the short variant; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import diffusion, parallel, shuffling
from shufflesgd.diffusion import guidance
from shufflesgd.nn import checkpoint, data, models, training

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "guided_digits"
NUM_CLASSES = 10
DIGIT_LEVELS = data.DIGITS_MAX_VALUE + 1  # pixels take the 17 values 0..16
DIGIT_DIM = 64
#: Every sampling method: the conditional branch, the four guidance transforms, PCG.
METHODS = ("conditional", "cfg", "rescaled", "adaptive", "apg", "pcg")
TRANSFORMS = ("cfg", "rescaled", "adaptive", "apg")  # run through guidance.guided_model
#: Fixed-grid samplers that run with their library defaults alone.
SAMPLER_CHOICES = (
    "ddim",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_3m",
    "unipc",
    "pf_ode_euler",
    "pf_ode_heun",
    "euler_maruyama",
    "ancestral",
)
SDE_CHOICES = ("vp", "subvp")
#: The key indices, folded into the run's key, in this order.
KEYS = (
    "network",
    "classifier",
    "dequantise_test",
    "dequantise_train",
    "prior",
    "samples",
    "probe",
)
PyTree = Any


# ------------------------------------------------------------------ configuration


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.{field} must be an integer >= {minimum}, got {value!r}")


def _check_in(field: str, value: Any, low: float, high: float, *, open_high: bool) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = (
        number
        and math.isfinite(value)
        and low <= value
        and (value < high if open_high else value <= high)
    )
    if not inside:
        interval = f"[{low}, {high})" if open_high else f"[{low}, {high}]"
        raise ValueError(f"config.{field} must lie in {interval}, got {value!r}")


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built, written or compiled."""
    common.check_choice("sde", config.sde, SDE_CHOICES)
    common.check_choice("grid", config.grid, diffusion.GRIDS)
    common.check_choice("sampler", config.sampler, SAMPLER_CHOICES)
    common.check_names("methods", config.methods, METHODS)
    scales = list(config.scales)
    if not scales:
        raise ValueError("config.scales must hold at least one guidance scale")
    for value in scales:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"config.scales must be finite numbers >= 0, got {scales!r}")
    if scales != sorted(set(scales)):
        raise ValueError(f"config.scales must be strictly increasing, got {scales!r}")
    if config.grid_scale not in scales:
        raise ValueError(
            f"config.grid_scale must be one of config.scales {scales}, got {config.grid_scale!r}"
        )
    for field in (
        "hidden",
        "num_layers",
        "embed_dim",
        "batch_size",
        "passes",
        "epochs",
        "classifier_batch_size",
        "classifier_passes",
        "classifier_epochs",
        "num_steps",
        "pcg_corrector_steps",
        "grid_samples",
    ):
        common.check_positive_ints(field, config[field])
    common.check_positive_ints("classifier_hidden", config.classifier_hidden)
    if config.embed_dim % 2:
        raise ValueError(f"config.embed_dim must be even, got {config.embed_dim}")
    _check_int("samples_per_class", config.samples_per_class, 2)  # a standard error needs two
    if config.grid_samples > config.samples_per_class:
        raise ValueError(
            "config.grid_samples must be at most config.samples_per_class "
            f"({config.samples_per_class}), got {config.grid_samples}"
        )
    for field in ("batch_size", "classifier_batch_size"):
        if data.DIGITS_NUM_TRAIN % config[field]:
            raise ValueError(
                f"config.{field} must divide the {data.DIGITS_NUM_TRAIN} training images, "
                f"got {config[field]}"
            )
    for field in (
        "learning_rate",
        "classifier_learning_rate",
        "sigma_data",
        "apg_radius",
        "pcg_step_scale",
    ):
        common.check_positive_number(field, config[field])
    _check_in("label_dropout", config.label_dropout, 0.0, 1.0, open_high=True)
    _check_in("rescale", config.rescale, 0.0, 1.0, open_high=False)
    _check_in("adaptive_threshold", config.adaptive_threshold, -1.0, 1.0, open_high=False)
    if (
        isinstance(config.apg_parallel_weight, bool)
        or not isinstance(config.apg_parallel_weight, (int, float))
        or not math.isfinite(config.apg_parallel_weight)
    ):
        raise ValueError(
            "config.apg_parallel_weight must be a finite number, "
            f"got {config.apg_parallel_weight!r}"
        )
    _check_int("seed", config.seed, 0)
    for field in ("checkpoint_dir", "data_dir"):
        common.check_optional_path(field, config[field])
    if not isinstance(config.results_dir, str) or not config.results_dir:
        raise ValueError(f"config.results_dir must be a non-empty path, got {config.results_dir!r}")
    sample_devices(config)


# ------------------------------------------------------------------ data and training


def load_digits(config: ConfigDict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train and test digits read through TFDS: ``image`` float32 ``[N, 64]`` pixel levels in
    0..16, ``label`` int32 ``[N]``."""
    data_dir = config.data_dir or os.path.join(config.results_dir, NAME, "tfds")

    def read(split: str) -> dict[str, np.ndarray]:
        arrays = data.to_array_source(data.load_source("digits", split, data_dir=data_dir)).arrays
        return {
            "image": arrays["image"].reshape(len(arrays["image"]), -1).astype(np.float32),
            "label": arrays["label"].astype(np.int32),
        }

    return read("train"), read("test")


def conditional_network(config: ConfigDict, sde: diffusion.SDE) -> models.Model:
    """The class-conditional score MLP in EDM's scalings for an :math:`\\varepsilon` output."""
    return models.EDMPreconditioned(
        models.ConditionalScoreMLP(
            num_classes=NUM_CLASSES,
            hidden=config.hidden,
            num_layers=config.num_layers,
            embed_dim=config.embed_dim,
        ),
        sde,
        sigma_data=config.sigma_data,
    )


def label_dropout_loss(model: models.Model, sde: diffusion.SDE, dropout: float) -> training.LossFn:
    r"""The :math:`\varepsilon`-MSE (Ho et al. 2020, Eq. 14) of a conditional network on freshly
    dequantised images, :math:`\|\hat\varepsilon(x_t, t, \tilde c) - \varepsilon\|^2` with
    :math:`t \sim U[t_{min}, t_{max}]`, :math:`\tilde c` the label replaced by the null token
    (:data:`~shufflesgd.diffusion.guidance.NULL_LABEL`) with probability ``dropout`` in training
    (Ho & Salimans 2022, Alg. 1).  Evaluation (``train=False``) keeps every label and adds the
    metric ``null_loss``, the same draws with the null token."""

    def loss_fn(
        params: PyTree,
        batch_stats: PyTree,
        batch: dict[str, jax.Array],
        key: jax.Array,
        train: bool,
    ) -> tuple[jax.Array, tuple[PyTree, dict[str, jax.Array]]]:
        dequantise_key, time_key, noise_key, drop_key = jax.random.split(key, 4)
        x0 = data.dequantise(dequantise_key, batch["image"], DIGIT_LEVELS)
        labels = batch["label"]
        t = jax.random.uniform(time_key, labels.shape, minval=sde.t_min, maxval=sde.t_max)
        eps = jax.random.normal(noise_key, x0.shape)
        x_t = sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * eps

        def squared_error(label: jax.Array) -> jax.Array:
            output, _ = models.apply_model(model, params, batch_stats, x_t, t, label, train=train)
            return jnp.sum((output - eps) ** 2, axis=-1)

        if train:
            dropped = jax.random.bernoulli(drop_key, dropout, labels.shape)
            return squared_error(jnp.where(dropped, guidance.NULL_LABEL, labels)), (batch_stats, {})
        null = jnp.full_like(labels, guidance.NULL_LABEL)
        return squared_error(labels), (batch_stats, {"null_loss": squared_error(null)})

    return loss_fn


def dequantised_cross_entropy(model: models.Model) -> training.LossFn:
    """:func:`shufflesgd.nn.training.cross_entropy_loss` on freshly dequantised images (the
    step's key split into the dequantisation noise and the loss's own key)."""
    loss = training.cross_entropy_loss(model)

    def loss_fn(
        params: PyTree,
        batch_stats: PyTree,
        batch: dict[str, jax.Array],
        key: jax.Array,
        train: bool,
    ) -> tuple[jax.Array, tuple[PyTree, dict[str, jax.Array]]]:
        noise_key, loss_key = jax.random.split(key)
        images = data.dequantise(noise_key, batch["image"], DIGIT_LEVELS)
        return loss(params, batch_stats, {**batch, "image": images}, loss_key, train)

    return loss_fn


def train_part(
    part: str,
    model: models.Model,
    loss_fn: training.LossFn,
    example: tuple[jax.Array, ...],
    arrays: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    settings: tuple[int, float, int, int],
    key: jax.Array,
    fingerprint: dict[str, Any],
    run_dir: pathlib.Path,
) -> tuple[PyTree, PyTree, list[dict[str, Any]]]:
    """Adam with cosine decay (Kingma & Ba 2015; Loshchilov & Hutter 2017) in random-reshuffling
    epochs of ``passes`` passes over the training arrays, resumable from
    ``run_dir/checkpoints``, one line per epoch in ``run_dir/metrics.jsonl`` (the mean training
    metrics and ``heldout_<metric>`` of the test arrays, with a fixed key so epochs compare).
    ``settings`` is ``(batch_size, learning_rate, epochs, passes)``; ``example`` the network's
    example inputs.  Returns the initial and trained parameters and the records."""
    batch_size, learning_rate, epochs, passes = settings
    train, test = arrays
    init_key, state_key, eval_key = jax.random.split(key, 3)
    params, stats = models.init_model(model, init_key, *example)
    repeated = data.ArraySource(
        {k: np.tile(v, (passes,) + (1,) * (v.ndim - 1)) for k, v in train.items()}
    )
    heldout = data.ArraySource(test)
    steps = epochs * (len(repeated) // batch_size)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    scheme = shuffling.make_scheme("random_reshuffle", len(repeated))
    trainer = training.make_trainer(loss_fn, optimizer, scheme, batch_size=batch_size)
    state = training.init_train_state(state_key, params, stats, optimizer, scheme)

    def evaluate(state: training.TrainState) -> dict[str, float]:
        metrics = trainer.evaluate(state, heldout, eval_key, len(heldout))
        return {f"heldout_{name}": value for name, value in metrics.items()}

    run_dir.mkdir(parents=True, exist_ok=True)
    state, records = common.train_resumable(
        trainer,
        state,
        repeated,
        epochs,
        checkpoint_dir=run_dir / "checkpoints",
        experiment=checkpoint.experiment_fingerprint(f"{NAME}/{part}", fingerprint),
        metrics_path=run_dir / "metrics.jsonl",
        evaluate=evaluate,
        description=f"{NAME} {part}",
    )
    return params, state.params, records


def training_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every per-epoch metric of ``train_resumable``'s records, as lists."""
    names = [name for name in records[0] if name != "epoch"] if records else []
    return {"epochs": len(records), **{name: [r[name] for r in records] for name in names}}


def train_network(
    config: ConfigDict,
    sde: diffusion.SDE,
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    key: jax.Array,
    run_dir: pathlib.Path,
) -> tuple[models.Model, PyTree, dict[str, Any]]:
    """Train (or resume) the conditional network: ``(model, params, summary)``, the summary
    holding the per-epoch losses and how far each label embedding row moved from its initial
    value (relative; the null token's row moves only through label dropout)."""
    model = conditional_network(config, sde)
    fields = (
        "sde",
        "seed",
        "hidden",
        "num_layers",
        "embed_dim",
        "sigma_data",
        "label_dropout",
        "batch_size",
        "passes",
        "epochs",
        "learning_rate",
    )
    example = (jnp.zeros((2, DIGIT_DIM)), jnp.zeros(2), jnp.zeros(2, jnp.int32))
    initial, params, records = train_part(
        "network",
        model,
        label_dropout_loss(model, sde, config.label_dropout),
        example,
        (train, test),
        (config.batch_size, config.learning_rate, config.epochs, config.passes),
        key,
        {k: config[k] for k in fields},
        run_dir,
    )
    embedding = lambda p: np.asarray(p["network"]["label_embedding"]["embedding"], np.float64)
    change = np.linalg.norm(embedding(params) - embedding(initial), axis=1) / np.linalg.norm(
        embedding(initial), axis=1
    )
    summary = {
        "num_params": models.count_params(params),
        "training": training_summary(records),
        "embedding_change": {"classes": change[:NUM_CLASSES].tolist(), "null": float(change[-1])},
    }
    return model, params, summary


def train_classifier(
    config: ConfigDict,
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    key: jax.Array,
    run_dir: pathlib.Path,
) -> tuple[models.Model, PyTree, dict[str, Any]]:
    """Train (or resume) the digit classifier: ``(model, params, summary)`` with its test
    accuracy and loss on the dequantised test digits."""
    model = models.MLP(hidden=tuple(config.classifier_hidden), num_classes=NUM_CLASSES)
    fields = (
        "seed",
        "classifier_hidden",
        "classifier_batch_size",
        "classifier_passes",
        "classifier_epochs",
        "classifier_learning_rate",
    )
    _, params, records = train_part(
        "classifier",
        model,
        dequantised_cross_entropy(model),
        (jnp.zeros((2, DIGIT_DIM)),),
        (train, test),
        (
            config.classifier_batch_size,
            config.classifier_learning_rate,
            config.classifier_epochs,
            config.classifier_passes,
        ),
        key,
        {k: config[k] for k in fields},
        run_dir,
    )
    return (
        model,
        params,
        {
            "num_params": models.count_params(params),
            "test_accuracy": records[-1]["heldout_accuracy"],
            "test_loss": records[-1]["heldout_loss"],
            "training": training_summary(records),
        },
    )


# ------------------------------------------------------------------ sampling


def conditional_model(model: models.Model, params: PyTree) -> guidance.ConditionalModel:
    r"""The trained network as a :class:`~shufflesgd.diffusion.guidance.ConditionalModel`
    predicting :math:`\varepsilon` for ONE sample ``x`` (samplers vmap over rows); the label
    :data:`~shufflesgd.diffusion.guidance.NULL_LABEL` selects the null token."""

    def fn(x: jax.Array, t: jax.Array, label: jax.Array) -> jax.Array:
        output, _ = models.apply_model(
            model, params, {}, x[None], jnp.reshape(t, (1,)), jnp.reshape(label, (1,)), train=False
        )
        return output[0]

    return guidance.ConditionalModel(fn, "eps")


def network_evaluations(method: str, config: ConfigDict) -> int:
    """Network evaluations per sample of ``method`` (``"unconditional"`` too) on the config's
    grid: the sampler's NFE (final step included) for one branch, twice that for a transform
    (both branches a call), :math:`(1 + 2K)N + 2` for PCG."""
    if method == "pcg":
        return (1 + 2 * config.pcg_corrector_steps) * config.num_steps + 2
    calls = diffusion.SAMPLERS[config.sampler].nfe(config.num_steps)
    return 2 * calls if method in TRANSFORMS else calls


def null_gaps(
    network: models.Model,
    params: PyTree,
    sde: diffusion.SDE,
    test: dict[str, np.ndarray],
    key: jax.Array,
) -> np.ndarray:
    r"""``[10]``: for each class :math:`c`, the RMS over entries of
    :math:`\hat\varepsilon(x_t, t, \varnothing) - \hat\varepsilon(x_t, t, c)` on the test
    images noised at :math:`t \sim U[t_{min}, t_{max}]` (one draw each from ``key``), relative
    to the RMS of :math:`\hat\varepsilon(x_t, t, c)`: how far the null token's output lies from
    each class's (0 would be a null branch that is one of the classes)."""
    dequantise_key, time_key, noise_key = jax.random.split(key, 3)
    x0 = data.dequantise(dequantise_key, jnp.asarray(test["image"]), DIGIT_LEVELS)
    t = jax.random.uniform(time_key, x0.shape[:1], minval=sde.t_min, maxval=sde.t_max)
    x_t = sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * jax.random.normal(
        noise_key, x0.shape
    )

    @jax.jit
    def gaps(params: PyTree) -> jax.Array:
        def output(label: jax.Array) -> jax.Array:
            return models.apply_model(network, params, {}, x_t, t, label, train=False)[0]

        null = output(jnp.asarray(guidance.NULL_LABEL))
        classes = jax.vmap(output)(jnp.arange(NUM_CLASSES))
        rms = lambda a: jnp.sqrt(jnp.mean(a**2, axis=(1, 2)))
        return rms(classes - null[None]) / rms(classes)

    return np.asarray(gaps(params), np.float64)


def counting_off_calls(
    model: diffusion.Model,
    conditional: guidance.ConditionalModel,
    sde: diffusion.SDE,
    label: jax.Array,
    threshold: jax.Array,
) -> tuple[diffusion.Model, Any]:
    """``model`` (adaptive guidance) with a counter of the calls at which
    :func:`~shufflesgd.diffusion.guidance.guidance_is_off` holds: a ``jax.new_ref`` local to the
    traced sampling run, read after it."""
    off_calls = jax.new_ref(jnp.zeros((), jnp.int32))

    def fn(x: jax.Array, t: jax.Array) -> jax.Array:
        off = guidance.guidance_is_off(conditional, sde, x, t, label, threshold)
        off_calls[...] += off.astype(jnp.int32)
        return model.fn(x, t)

    return diffusion.Model(fn, model.output), off_calls


def make_sampling(
    method: str, config: ConfigDict, sde: diffusion.SDE, network: models.Model, grid: np.ndarray
) -> Callable:
    """A jitted ``(params, x_T [C, n, 64], labels [C], scales [S], keys [C, n], options) ->
    (samples [S, C, n, 64], evaluations [S, C, n], off fraction [S, C, n], first non-finite step
    [S, C, n])`` of ``method`` (or ``"unconditional"``, the null token's branch).  Sample ``i``
    of class ``c`` uses the key ``keys[c, i]`` (:func:`sample_keys`) at every scale; ``options``
    holds the methods' hyper-parameters as traced scalars (house rule 8).  Call it through
    :func:`sample_all`, which lays the sample axis over the devices."""
    sampler = diffusion.make_sampler(config.sampler)
    grid = jnp.asarray(grid)

    def one(params, x_T, label, scale, key, options):
        cond = conditional_model(network, params)
        zero = jnp.zeros((), jnp.float32)
        if method == "pcg":
            x, info = guidance.predictor_corrector_guidance(
                key,
                cond,
                sde,
                x_T,
                grid,
                label=label,
                scale=scale,
                corrector_steps=config.pcg_corrector_steps,
                step_scale=options["pcg_step_scale"],
            )
            return x, info.nfe, zero, info.nonfinite_step
        if method in ("conditional", "unconditional"):
            branch = cond.unconditional() if method == "unconditional" else cond.given(label)
            x, info = sampler(key, branch, sde, x_T, grid)
            return x, info.nfe, zero, info.nonfinite_step
        transform_options = {
            "cfg": {},
            "rescaled": {"rescale": options["rescale"]},
            "adaptive": {"threshold": options["adaptive_threshold"]},
            "apg": {
                "parallel_weight": options["apg_parallel_weight"],
                "radius": options["apg_radius"],
            },
        }[method]
        model = guidance.guided_model(method, cond, label, scale, sde=sde, **transform_options)
        if method == "adaptive":
            model, off_calls = counting_off_calls(
                model, cond, sde, label, options["adaptive_threshold"]
            )
            # The sampler's final denoising step, taken here: a counter is a state effect, which
            # JAX does not allow inside the lax.cond of some samplers' final step under vmap.
            x, info = sampler(key, model, sde, x_T, grid, final="none")
            x, calls = model.predict(sde, x, grid[-1], "x0"), info.nfe + 1
            bad = jnp.where(
                (info.nonfinite_step < 0) & ~jnp.all(jnp.isfinite(x)),
                grid.shape[0] - 1,
                info.nonfinite_step,
            )
            return x, 2 * calls, off_calls[...] / calls, bad
        x, info = sampler(key, model, sde, x_T, grid)
        return x, 2 * info.nfe, zero, info.nonfinite_step

    def run(params, x_T, labels, scales, keys, options):
        def per_class(x_c, label, keys_c, scale):
            return jax.vmap(lambda x, k: one(params, x, label, scale, k, options))(x_c, keys_c)

        per_scale = lambda scale: jax.vmap(per_class, in_axes=(0, 0, 0, None))(
            x_T, labels, keys, scale
        )
        return jax.vmap(per_scale)(scales)

    return jax.jit(run)


def sample_keys(key: jax.Array, labels: jax.Array, num_samples: int) -> jax.Array:
    """The ``[C, n]`` sampling keys: sample ``i`` of class ``c`` gets
    ``fold_in(fold_in(key, c), i)``, at every scale."""
    samples = jnp.arange(num_samples)
    return jax.vmap(
        lambda c: jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, c), i))(samples)
    )(labels)


def sample_devices(config: ConfigDict) -> int:
    """How many devices the samples of each class are split over:
    :func:`experiments.common.seed_devices` with ``samples_per_class`` as the units
    (``ValueError`` naming ``config.devices`` when it exceeds the devices available or does not
    divide ``config.samples_per_class``)."""
    return common.seed_devices(config, config.samples_per_class, "config.samples_per_class")


def sample_all(
    sampling: Callable,
    config: ConfigDict,
    params: PyTree,
    x_T: jax.Array,
    labels: jax.Array,
    scales: jax.Array,
    key: jax.Array,
    options: dict[str, jax.Array],
) -> tuple[jax.Array, ...]:
    """Call ``sampling`` (:func:`make_sampling`) with the sample axis of the prior draws
    ``x_T [C, n, 64]`` and of the keys (:func:`sample_keys`, built here, outside the jit) split
    over the ``"seeds"`` axis of a mesh of :func:`sample_devices` devices, everything else
    replicated, so that ``jax.jit`` partitions the samples; the results come back split alike."""
    mesh = parallel.worker_mesh(sample_devices(config), axis=common.SEEDS)
    by_sample = jax.sharding.NamedSharding(mesh, jax.P(None, common.SEEDS))
    keys = sample_keys(key, labels, x_T.shape[1])
    params, labels, scales, options = parallel.put_replicated(
        mesh, (params, labels, scales, options)
    )
    x_T, keys = jax.device_put((x_T, keys), by_sample)
    return sampling(params, x_T, labels, scales, keys, options)


def method_options(config: ConfigDict) -> dict[str, jax.Array]:
    """The methods' hyper-parameters as float32 scalars (traced arguments of the samplers)."""
    names = ("rescale", "adaptive_threshold", "apg_parallel_weight", "apg_radius", "pcg_step_scale")
    return {name: jnp.asarray(config[name], jnp.float32) for name in names}


def classify(
    classifier: models.Model, params: PyTree, samples: jax.Array
) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted class, softmax probabilities)`` of samples ``[..., 64]`` clipped to the data
    range."""
    flat = jnp.clip(samples.reshape(-1, DIGIT_DIM), -1.0, 1.0)
    logits, _ = jax.jit(lambda p, x: models.apply_model(classifier, p, {}, x, train=False))(
        params, flat
    )
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    shape = samples.shape[:-1]
    return probs.argmax(-1).reshape(shape), probs.reshape(*shape, NUM_CLASSES)


def summarise(values: Any) -> dict[str, float]:
    """Mean and standard error (``std(ddof=1)/sqrt(n)``) of a flat set of values."""
    mean, se = common.mean_and_stderr(np.asarray(values, np.float64).ravel())
    return {"mean": float(mean), "se": float(se)}


def class_diversity(samples: np.ndarray) -> np.ndarray:
    """Per class, the pixel standard deviation across that class's samples, averaged over the
    pixels: ``[C]`` of samples ``[C, n, 64]`` (clipped to the data range)."""
    clipped = np.clip(np.asarray(samples, np.float64), -1.0, 1.0)
    return clipped.std(axis=1, ddof=1).mean(axis=-1)


def method_row(
    scale: float,
    samples: np.ndarray,
    predicted: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    evaluations: np.ndarray,
    off: np.ndarray,
    bad: np.ndarray,
    reference: np.ndarray | None,
) -> tuple[dict[str, Any], np.ndarray]:
    """The metrics of one method at one scale from its samples ``[C, n, 64]`` and their
    classification, and the per-sample correctness ``[C, n]`` (``reference``: the conditional
    samples' correctness, for the paired difference)."""
    correct = (predicted == labels[:, None]).astype(np.float64)
    per_class = correct.mean(axis=1)
    confidence = np.take_along_axis(probs, labels[:, None, None], axis=-1)[..., 0]
    row = {
        "scale": scale,
        "accuracy": {**summarise(correct), "se_classes": summarise(per_class)["se"]},
        "per_class_accuracy": per_class.tolist(),
        "confidence": summarise(confidence),
        "diversity": summarise(class_diversity(samples)),
        "outside": float(np.mean(np.abs(samples) > 1.0)),
        "evaluations": float(np.mean(evaluations)),
        "evaluations_max": int(np.max(evaluations)),
        "nonfinite_samples": int(np.sum(bad >= 0)),
        "off_fraction": float(np.mean(off)),
    }
    if reference is not None:
        row["difference"] = summarise(correct - reference)
    return row, correct


def unconditional_row(predicted: np.ndarray, samples: np.ndarray, evaluations: Any) -> dict:
    """The unconditional samples' predicted-class histogram (fractions), its entropy in bits
    (:math:`\\log_2 10 = 3.32` for uniform classes), the largest fraction and the diversity."""
    histogram = np.bincount(predicted.ravel(), minlength=NUM_CLASSES) / predicted.size
    nonzero = histogram[histogram > 0]
    return {
        "histogram": histogram.tolist(),
        "entropy_bits": float(-np.sum(nonzero * np.log2(nonzero))),
        "max_fraction": float(histogram.max()),
        "classes_seen": int(np.sum(histogram > 0)),
        "diversity": float(
            np.clip(samples.reshape(-1, DIGIT_DIM), -1.0, 1.0).std(axis=0, ddof=1).mean()
        ),
        "evaluations": float(np.mean(evaluations)),
    }


def run_sampling(
    config: ConfigDict,
    sde: diffusion.SDE,
    network: models.Model,
    params: PyTree,
    classifier: models.Model,
    classifier_params: PyTree,
    keys: dict[str, jax.Array],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every method at every scale (``conditional`` at scale 1, the unconditional branch as a
    reference) from the same prior draws; the metrics and the grid images."""
    n = config.samples_per_class
    labels = np.arange(NUM_CLASSES, dtype=np.int32)
    x_T = sde.prior_sample(keys["prior"], (NUM_CLASSES, n, DIGIT_DIM))
    grid = diffusion.time_grid(sde, config.grid, config.num_steps)
    options = method_options(config)
    result: dict[str, Any] = {"methods": {}}
    pictures: dict[str, np.ndarray] = {}
    reference = None
    jobs = ["unconditional"] + sorted(config.methods, key=lambda m: m != "conditional")
    for index, method in enumerate(tqdm(jobs, desc=f"{NAME} methods", leave=False)):
        scales = [1.0] if method in ("conditional", "unconditional") else list(config.scales)
        run = make_sampling(method, config, sde, network, grid)
        samples, evaluations, off, bad = (
            np.asarray(a)
            for a in sample_all(
                run,
                config,
                params,
                x_T,
                jnp.asarray(labels),
                jnp.asarray(scales, jnp.float32),
                jax.random.fold_in(keys["samples"], index),
                options,
            )
        )
        predicted, probs = classify(classifier, classifier_params, jnp.asarray(samples))
        if method == "unconditional":
            result["unconditional"] = unconditional_row(predicted[0], samples[0], evaluations)
            continue
        rows = {}
        for s, scale in enumerate(scales):
            rows[f"{scale:g}"], correct = method_row(
                scale,
                samples[s],
                predicted[s],
                probs[s],
                labels,
                evaluations[s],
                off[s],
                bad[s],
                reference,
            )
            if method == "conditional":
                reference = correct
            if method == "conditional" or scale == config.grid_scale:
                pictures[method] = samples[s, :, : config.grid_samples]
        result["methods"][method] = rows
    return result, pictures


# ------------------------------------------------------------------ outputs


def _fmt(stat: dict[str, float], spec: str = ".3f") -> str:
    return f"{stat['mean']:{spec}} ± {stat['se']:{spec}}"


def format_table(metrics: dict[str, Any]) -> str:
    """The classifier, the training losses, the unconditional reference and one line per
    method and scale."""
    net, clf, unc = metrics["network"], metrics["classifier"], metrics["unconditional"]
    train = net["training"]
    lines = [
        f"classifier: test accuracy {clf['test_accuracy']:.4f} ({clf['num_params']} parameters)",
        f"network ({net['num_params']} parameters, {train['epochs']} epochs): held-out DSM loss "
        f"{train['heldout_loss'][-1]:.3f} with labels, {train['heldout_null_loss'][-1]:.3f} "
        f"with the null token; null-token embedding moved {net['embedding_change']['null']:.2f} "
        f"(relative); null-token output off each class's by {min(net['null_gap']):.3f} to "
        f"{max(net['null_gap']):.3f} (relative RMS)",
        f"unconditional branch: predicted classes {np.round(unc['histogram'], 3).tolist()}, "
        f"entropy {unc['entropy_bits']:.2f} bits (uniform: {math.log2(NUM_CLASSES):.2f}), "
        f"diversity {unc['diversity']:.3f}",
        f"data diversity (dequantised training images): {_fmt(metrics['data_diversity'])}",
        f"sampler {metrics['sampler']}, {metrics['num_steps']} steps on {metrics['grid']}; "
        f"{metrics['samples_per_class']} samples per class; accuracy mean ± SE over samples "
        "(SE over classes in brackets); diff: paired difference from conditional",
        f"{'method':>12s} {'scale':>5s} {'accuracy':>24s} {'diff':>16s} {'confidence':>15s} "
        f"{'diversity':>15s} {'outside':>7s} {'evals':>6s} {'off':>5s}",
    ]
    for method, rows in metrics["methods"].items():
        for r in rows.values():
            diff = _fmt(r["difference"]) if "difference" in r else "—"
            off = f"{r['off_fraction']:.2f}" if method == "adaptive" else "—"
            accuracy = f"{_fmt(r['accuracy'])} ({r['accuracy']['se_classes']:.3f})"
            lines.append(
                f"{method:>12s} {r['scale']:5g} {accuracy:>24s} {diff:>16s} "
                f"{_fmt(r['confidence']):>15s} {_fmt(r['diversity']):>15s} "
                f"{r['outside']:7.3f} {r['evaluations']:6.0f} {off:>5s}"
            )
    return "\n".join(lines)


ROW_COLUMNS = (
    "method",
    "scale",
    "accuracy",
    "accuracy_se",
    "accuracy_se_classes",
    "difference",
    "difference_se",
    "confidence",
    "confidence_se",
    "diversity",
    "diversity_se",
    "outside",
    "evaluations",
    "off_fraction",
)


def table_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    """The CSV rows of :data:`ROW_COLUMNS`, one per method and scale."""
    rows = []
    for method, per in metrics["methods"].items():
        for r in per.values():
            diff = r.get("difference", {"mean": None, "se": None})
            rows.append(
                [method, r["scale"], r["accuracy"]["mean"], r["accuracy"]["se"]]
                + [r["accuracy"]["se_classes"], diff["mean"], diff["se"]]
                + [r["confidence"]["mean"], r["confidence"]["se"]]
                + [r["diversity"]["mean"], r["diversity"]["se"], r["outside"]]
                + [r["evaluations"], r["off_fraction"] if method == "adaptive" else None]
            )
    return rows


def _finite_points(rows: dict[str, Any], key: str) -> tuple[np.ndarray, ...]:
    """``(scales, means, ses, dropped)``: the rows whose statistic ``key`` is finite, and how
    many were left out (``None`` counts as not finite)."""
    number = lambda v: np.nan if v is None else v
    points = np.array(
        [(number(r["scale"]), number(r[key]["mean"]), number(r[key]["se"])) for r in rows.values()],
        float,
    ).reshape(-1, 3)
    keep = np.all(np.isfinite(points), axis=1)
    scale, mean, se = points[keep].T
    return scale, mean, se, int(np.sum(~keep))


def draw(metrics: dict[str, Any], path: pathlib.Path) -> None:
    """Class accuracy and diversity against the guidance scale, one curve per method (± 1 SE);
    the conditional samples (scale 1) as a point, chance and the data's diversity as levels.
    Points that are not finite are left out and counted in the legend."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, label in (
        (axes[0], "accuracy", "class accuracy (classifier)"),
        (axes[1], "diversity", "per-class pixel std"),
    ):
        for method, rows in metrics["methods"].items():
            scale, mean, se, dropped = _finite_points(rows, key)
            axis.errorbar(
                scale,
                mean,
                yerr=se,
                marker="o" if method != "conditional" else "s",
                ms=4,
                capsize=2,
                ls="-" if method != "conditional" else "none",
                label=common.not_shown(method, dropped),
            )
        if key == "accuracy":
            axis.axhline(1.0 / NUM_CLASSES, color="k", ls=":", lw=0.8, label="chance")
        else:
            level = metrics.get("data_diversity", {}).get("mean")
            if level is not None and np.isfinite(level):
                axis.axhline(level, color="k", ls="--", lw=0.8, label="training images")
        axis.set(
            xlabel="guidance scale γ (1: conditional)",
            ylabel=label,
            title=f"digits: {label} vs guidance scale",
        )
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    common.save_figure(fig, path)


def draw_samples(
    pictures: dict[str, np.ndarray], scale: float, test: np.ndarray, path: pathlib.Path
) -> None:
    """Per-class grids (rows classes 0–9, columns samples; pixels clipped to [-1, 1]), one
    panel per method (``conditional`` at γ = 1, the others at ``scale``), beside test digits of
    each class."""
    panels = {
        f"{method}, γ={1.0 if method == 'conditional' else scale:g}": images
        for method, images in pictures.items()
    }
    panels["test images"] = test
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 3.0), squeeze=False)
    for axis, (title, images) in zip(axes[0], panels.items()):
        rows, cols = images.shape[:2]
        canvas = np.full((rows * 9 - 1, cols * 9 - 1), -1.0)
        for r in range(rows):
            for c in range(cols):
                canvas[9 * r : 9 * r + 8, 9 * c : 9 * c + 8] = np.clip(
                    images[r, c].reshape(8, 8), -1.0, 1.0
                )
        axis.imshow(canvas, cmap="gray_r", vmin=-1.0, vmax=1.0)
        axis.set_title(title, fontsize=8)
        axis.set_yticks(9 * np.arange(rows) + 3.5, [str(r) for r in range(rows)], fontsize=6)
        axis.set_xticks([])
    common.save_figure(fig, path)


def real_digit_grid(test: dict[str, np.ndarray], key: jax.Array, columns: int) -> np.ndarray:
    """``[10, columns, 64]`` dequantised test digits, the first ``columns`` of each class (all
    of them repeated cyclically when a class has fewer)."""
    images = np.asarray(data.dequantise(key, jnp.asarray(test["image"]), DIGIT_LEVELS))
    out = []
    for c in range(NUM_CLASSES):
        rows = images[test["label"] == c]
        out.append(rows[np.arange(columns) % len(rows)])
    return np.stack(out)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table, the CSV and the figures."""
    validate(config)
    sde = diffusion.make_sde(config.sde)
    folder = common.results_folder(config, NAME)
    root = pathlib.Path(config.checkpoint_dir) if config.checkpoint_dir else folder / "training"
    base = jax.random.key(config.seed)
    keys = {name: jax.random.fold_in(base, i) for i, name in enumerate(KEYS)}
    train, test = load_digits(config)
    network, params, network_summary = train_network(
        config, sde, train, test, keys["network"], root / "network"
    )
    classifier, classifier_params, classifier_summary = train_classifier(
        config, train, test, keys["classifier"], root / "classifier"
    )
    network_summary["null_gap"] = null_gaps(network, params, sde, test, keys["probe"]).tolist()
    sampled, pictures = run_sampling(
        config, sde, network, params, classifier, classifier_params, keys
    )
    train_x = np.asarray(
        data.dequantise(keys["dequantise_train"], jnp.asarray(train["image"]), DIGIT_LEVELS)
    )
    data_diversity = [
        np.clip(train_x[train["label"] == c], -1.0, 1.0).std(axis=0, ddof=1).mean()
        for c in range(NUM_CLASSES)
    ]
    metrics = {
        "network": network_summary,
        "classifier": classifier_summary,
        "sampler": config.sampler,
        "grid": config.grid,
        "num_steps": config.num_steps,
        "samples_per_class": config.samples_per_class,
        "devices": sample_devices(config),  # the samples of each class were split over these
        "expected_evaluations": {
            m: network_evaluations(m, config) for m in ("unconditional", *config.methods)
        },
        "data_diversity": summarise(data_diversity),
        **sampled,
    }
    common.write_csv(folder / "rows.csv", ROW_COLUMNS, table_rows(metrics))
    test_grid = real_digit_grid(test, keys["dequantise_test"], config.grid_samples)
    np.savez(folder / "samples.npz", test=test_grid, **pictures)

    def draw_all(path: pathlib.Path) -> None:
        draw(metrics, path)
        draw_samples(pictures, config.grid_scale, test_grid, path.with_name("samples.png"))

    return common.finish(folder, format_table(metrics), metrics, draw_all)


if __name__ == "__main__":
    common.main(run, validate)
