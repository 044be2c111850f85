r"""Flat basins: Entropy-MCMC against SGLD, cyclical SGLD and SGHMC on a Bayesian MLP on the
digits, and a flat-vs-sharp toy whose flat-basin fractions are known.

**Part A: Bayesian MLP.**  A tanh MLP (widths ``hidden``) on scikit-learn's 8×8 digits (train
1536 / test 261, :func:`shufflesgd.nn.data.scaled_digits`), softmax likelihood, prior
:math:`\theta \sim N(0, s_p^2 I)` (``prior_std``), so that

.. math:: \log\pi(\theta) = -\frac{\|\theta\|^2}{2 s_p^2}
          + \sum_{i=1}^N \log p(y_i \mid x_i, \theta),
          \qquad \hat g(\theta) = -\frac{\theta}{s_p^2}
          + \frac Nb \sum_{i\in B}\nabla\log p(y_i \mid x_i, \theta)

is the minibatch gradient estimate every kernel uses, its batches :math:`B` of ``batch_size``
in random-reshuffling order (:func:`shufflesgd.shuffling.make_scheme`).  Kernels
(:mod:`shufflesgd.mcmc`), one gradient evaluation a step each:

* ``sgld`` -- Welling & Teh (2011), :func:`shufflesgd.mcmc.sgld`;
* ``csgld`` -- cyclical SGLD, Zhang et al. (2020), :func:`shufflesgd.mcmc.cyclical_sgld`,
  ``csgld_cycles`` cosine cycles of whole epochs, the first ``csgld_exploration`` of each
  noiseless; only the draws of sampling steps (:attr:`CyclicalInfo.is_sampling`) are kept;
* ``sghmc`` -- Chen, Fox & Guestrin (2014), Euler scheme, friction ``friction``;
* ``entropy_mcmc`` -- Li & Zhang (2024), :func:`shufflesgd.mcmc.entropy_mcmc`
  with coupling :math:`\eta` = ``coupling``: :math:`\theta` samples :math:`\pi`, the guide
  :math:`\theta_a` the smoothed :math:`\pi * N(0, \eta I)`.  Following the kernel's docstring
  (the authors' code keeps both as posterior samples), the method's output is the pool of
  both (row ``entropy_mcmc``); the rows ``entropy_mcmc:theta`` and ``entropy_mcmc:guide``
  average each alone.

Every method runs ``num_epochs`` epochs of the same batches, so the gradient evaluations (the
sum of the kernels' ``info.num_grad_evals``) are equal, and the result records them.  Draws
are the states at epoch ends from ``burn_in_epochs`` on, every ``thin``-th.  Metrics, on the
Bayesian model average :math:`\bar p(y\mid x) = \frac1K\sum_k p(y \mid x, \theta_k)` over the
kept draws: test accuracy, test negative log-likelihood :math:`-\frac1n\sum\log\bar p(y_i\mid
x_i)`, and the expected calibration error with 15 equal-width confidence bins,
:math:`\mathrm{ECE} = \sum_b \frac{n_b}{n}|\mathrm{acc}_b - \mathrm{conf}_b|`.  **Flatness**
is the mean over kept draws of :math:`E_\epsilon[L(\theta_k + \epsilon)] - L(\theta_k)`, with
:math:`L` the mean training cross-entropy and :math:`\epsilon \sim N(0, \sigma^2 I)` on every
weight (:math:`\sigma` = ``perturbation_std``), estimated with ``num_perturbations`` draws of
:math:`\epsilon` per kept draw.

**Seeds and pairing.**  Seed ``s`` gives every method the same initial network (LeCun normal
weights, zero biases), the same batch order, the same step keys and the same perturbations,
so the differences against ``sgld`` are paired: their standard errors are those of the
per-seed differences.  All ``num_seeds`` seeds of a method run in one ``jax.jit(jax.vmap(.))``
call, the seed axis split over the ``"seeds"`` axis of :func:`experiments.common.seed_mesh`
(``devices``).  A run that diverges is not stopped: its first non-finite step (per seed) is
recorded, and its metrics are NaN (``null`` in JSON).

**Part B: the toy.**  :math:`\pi(x) = w_s N(x; \mu_s, \sigma_s^2) + w_f N(x; \mu_f,
\sigma_f^2)` in one dimension, a sharp and a flat component (``toy_means``, ``toy_stds``,
:math:`w_f` = ``toy_flat_weight``), sampled with exact gradients (the batch is the whole
"data set") by SGLD and by Entropy-MCMC with coupling :math:`\eta` = ``toy_coupling``.  The
flat basin is :math:`x > b`, :math:`b` the minimum of :math:`\pi` between the two means.  The
fraction of samples in it (per chain, the time average after ``toy_burn_in`` steps; the MC
standard error is over the independent chains) is compared with its exact value by quadrature:
:math:`\int_b^\infty\pi` for SGLD and Entropy-MCMC's :math:`\theta` (less than :math:`w_f`: the
flat component's tail reaches into the sharp basin),
and :math:`\int_b^\infty\pi * N(0, \eta)` for the guide :math:`\theta_a`, the smoothed mixture
:math:`\sum_k w_k N(\mu_k, \sigma_k^2 + \eta)`, where the sharp component spreads into the flat
basin.

``fast_compile`` compiles at XLA's backend optimisation level 0 (the quick variant: its
compiles take longer than its runs).

Written: ``metrics.json`` (per row: mean ± SE, paired differences, per-seed values),
``results.csv`` (one row per method / Entropy-MCMC variable),
``table.txt`` (printed) and ``figure.png`` (accuracy, NLL, ECE and flatness ± 1 SE per row;
the toy's densities with the samples' histograms; its fractions against the quadrature
targets).

Run: ``python -m experiments.flat_basins --config configs/flat_basins.py`` (``:quick`` for the
short variant; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from ml_collections import ConfigDict
from scipy import integrate, optimize, stats
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import drivers, mcmc, shuffling
from shufflesgd.nn import data

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "flat_basins"
REFERENCE = "sgld"
METHODS = ("sgld", "csgld", "sghmc", "entropy_mcmc")
LABELS = {
    "sgld": "SGLD",
    "csgld": "cyclical SGLD",
    "sghmc": "SGHMC",
    "entropy_mcmc": "Entropy-MCMC (θ and θa)",
    "entropy_mcmc:theta": "Entropy-MCMC θ",
    "entropy_mcmc:guide": "Entropy-MCMC θa",
}
METRICS = ("test_accuracy", "test_nll", "ece", "flatness")
NUM_CLASSES = 10
NUM_PIXELS = 64
ECE_BINS = 15
SCHEME = "random_reshuffle"
HIST_BINS = 60
PyTree = Any


# ------------------------------------------------------------------ configuration


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built or compiled."""
    methods = common.check_names("methods", config.methods, METHODS)
    if REFERENCE not in methods:
        raise ValueError(
            f"config.methods must include {REFERENCE!r}, the reference of the paired differences"
        )
    common.check_positive_ints("hidden", list(config.hidden))
    for field in (
        "batch_size",
        "num_epochs",
        "thin",
        "num_seeds",
        "num_perturbations",
        "csgld_cycles",
        "toy_num_chains",
        "toy_num_steps",
    ):
        common.check_positive_ints(field, config[field])
    for field in ("seed", "burn_in_epochs", "toy_burn_in"):
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.{field} must be a non-negative integer, got {value!r}")
    if not isinstance(config.fast_compile, bool):
        raise ValueError(f"config.fast_compile must be True or False, got {config.fast_compile!r}")
    if config.num_seeds < 2:
        raise ValueError(
            f"config.num_seeds must be at least 2 for a standard error, got {config.num_seeds}"
        )
    total = data.DIGITS_NUM_TRAIN
    if total % config.batch_size:
        raise ValueError(
            f"config.batch_size must divide the {total} training examples, got {config.batch_size}"
        )
    if config.burn_in_epochs >= config.num_epochs:
        raise ValueError(
            f"config.burn_in_epochs must be less than config.num_epochs={config.num_epochs}, "
            f"got {config.burn_in_epochs}"
        )
    for method in methods:
        if method not in config.step_size:
            raise ValueError(f"config.step_size.{method} is missing")
        common.check_positive_number(f"step_size.{method}", config.step_size[method])
    for field in ("prior_std", "friction", "coupling", "perturbation_std", "toy_coupling"):
        common.check_positive_number(field, config[field])
    for field in ("toy_step_size", "toy_init_std"):
        common.check_positive_number(field, config[field])
    if "entropy_mcmc" in methods and config.step_size.entropy_mcmc >= config.coupling:
        raise ValueError(
            "config.step_size.entropy_mcmc must be below config.coupling (the coupling's "
            f"curvature 2/eta bounds the step), got {config.step_size.entropy_mcmc} >= "
            f"{config.coupling}"
        )
    if config.num_epochs % config.csgld_cycles:
        raise ValueError(
            f"config.csgld_cycles must divide config.num_epochs={config.num_epochs} (each cycle "
            f"is a whole number of epochs), got {config.csgld_cycles}"
        )
    beta = config.csgld_exploration
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"config.csgld_exploration must lie in [0, 1), got {beta!r}")
    if "csgld" in methods and not np.any(csgld_sampling(config)):
        raise ValueError(
            "config.csgld_exploration leaves no kept draw of cyclical SGLD in a sampling stage "
            "(lower it, or change config.burn_in_epochs / config.thin)"
        )
    weight = config.toy_flat_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < 1:
        raise ValueError(f"config.toy_flat_weight must lie in (0, 1), got {weight!r}")
    for field in ("toy_means", "toy_stds"):
        values = tuple(config[field])
        if len(values) != 2 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            for v in values
        ):
            raise ValueError(f"config.{field} must be two numbers (sharp, flat), got {values!r}")
    sharp, flat = config.toy_stds
    if not 0 < sharp < flat:
        raise ValueError(
            f"config.toy_stds must be (sharp, flat) with 0 < sharp < flat, got {(sharp, flat)!r}"
        )
    if config.toy_means[0] == config.toy_means[1]:
        raise ValueError(f"config.toy_means must differ, got {tuple(config.toy_means)!r}")
    toy = toy_mixture(config)
    if toy_density(toy, toy.boundary) >= min(toy_density(toy, m) for m in toy.means):
        raise ValueError(
            f"config.toy_means={tuple(config.toy_means)} and config.toy_stds="
            f"{tuple(config.toy_stds)} give no valley between the two modes (no flat basin)"
        )
    if config.toy_burn_in >= config.toy_num_steps:
        raise ValueError(
            f"config.toy_burn_in must be less than config.toy_num_steps={config.toy_num_steps}, "
            f"got {config.toy_burn_in}"
        )
    if config.toy_step_size >= config.toy_coupling:
        raise ValueError(
            f"config.toy_step_size must be below config.toy_coupling={config.toy_coupling}, "
            f"got {config.toy_step_size}"
        )
    common.seed_devices(config)
    common.check_optional_path("data_dir", config.data_dir)


def jit(config: ConfigDict, fn: Any) -> Any:
    """``jax.jit(fn)``; with ``config.fast_compile``, compiled at XLA's backend optimisation
    level 0 (about three times faster to compile, slower to run: for short runs)."""
    options = {"xla_backend_optimization_level": 0} if config.fast_compile else None
    return jax.jit(fn, compiler_options=options)


def steps_per_epoch(config: ConfigDict) -> int:
    return data.DIGITS_NUM_TRAIN // config.batch_size


def kept_epochs(config: ConfigDict) -> np.ndarray:
    """The epochs whose end-of-epoch draws are kept: ``burn_in_epochs, +thin, ...``."""
    return np.arange(config.burn_in_epochs, config.num_epochs, config.thin)


def csgld_sampling(config: ConfigDict) -> np.ndarray:
    """Whether each kept epoch's last step is a sampling step of cyclical SGLD (the library's
    :func:`shufflesgd.mcmc.cycle_fraction`, evaluated on the host)."""
    spe = steps_per_epoch(config)
    last_steps = (kept_epochs(config) + 1) * spe - 1
    fraction = mcmc.cycle_fraction(
        jnp.asarray(last_steps), config.num_epochs * spe, config.csgld_cycles
    )
    return np.asarray(fraction) >= config.csgld_exploration


# ------------------------------------------------------------------ the network


def layer_sizes(config: ConfigDict) -> list[int]:
    return [NUM_PIXELS, *config.hidden, NUM_CLASSES]


def num_params(config: ConfigDict) -> int:
    sizes = layer_sizes(config)
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def init_mlp(key: jax.Array, sizes: list[int]) -> list[dict[str, jax.Array]]:
    """LeCun-normal weights (variance ``1/fan_in``), zero biases."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (a, b)) / math.sqrt(a),
            "b": jnp.zeros((b,)),
        }
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_logits(params: list[dict[str, jax.Array]], images: jax.Array) -> jax.Array:
    """``images`` ``[n, 64]`` -> logits ``[n, 10]`` (tanh hidden layers)."""
    h = images
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def mean_loss(params: PyTree, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = mlp_logits(params, images)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def grad_estimator(
    images: jax.Array, labels: jax.Array, prior_std: float
) -> mcmc.GradientEstimator:
    r""":math:`\hat g(\theta) = -\theta/s_p^2 + \frac Nb\sum_{i\in B}\nabla\log p(y_i\mid
    x_i,\theta)` for the batch indices ``B``."""
    n = labels.shape[0]

    def log_posterior(params: PyTree, batch: jax.Array) -> jax.Array:
        logits = mlp_logits(params, images[batch])
        log_lik = -optax.softmax_cross_entropy_with_integer_labels(logits, labels[batch]).sum()
        prior = sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(params)) / (2 * prior_std**2)
        return log_lik * (n / batch.shape[0]) - prior

    return jax.grad(log_posterior)


# ------------------------------------------------------------------ the chains


class Chain(NamedTuple):
    """One seed's chain (a leading seed axis when vmapped).

    Attributes:
      theta: the position after each epoch's last step (leading axis ``num_epochs``).
      guide: Entropy-MCMC's :math:`\\theta_a` likewise (``None`` for the other methods).
      grad_evals: ``[num_epochs]``, the sum of ``info.num_grad_evals`` over each epoch.
      is_finite: ``[num_epochs, steps_per_epoch]``, every step's ``info.is_finite``.
      is_sampling: ``[num_epochs]``, whether each epoch's last step sampled (cSGLD; else all
        ``True``).
    """

    theta: PyTree
    guide: PyTree
    grad_evals: jax.Array
    is_finite: jax.Array
    is_sampling: jax.Array


def hyper_parameters(config: ConfigDict, method: str) -> tuple[jax.Array, ...]:
    """The traced step arguments of ``method``'s kernel after the batch."""
    step = jnp.float32(config.step_size[method])
    if method == "csgld":
        return step, jnp.float32(config.csgld_exploration)
    if method == "sghmc":
        return step, jnp.float32(config.friction)
    if method == "entropy_mcmc":
        return step, jnp.float32(config.coupling)
    return (step,)


def make_run(config: ConfigDict, method: str):
    """``run(key_data, hyper, images, labels) -> Chain`` for one seed of ``method``.

    The seed's key splits into the network's initialisation key, the chain's key (split, as
    :func:`shufflesgd.mcmc.run_minibatch_chain` does, into the scheme's order key and the
    steps' key) and the perturbations' key (unused here): the same for every method.
    """
    sizes = layer_sizes(config)
    spe = steps_per_epoch(config)
    num_epochs, batch_size = config.num_epochs, config.batch_size
    scheme = shuffling.make_scheme(SCHEME, data.DIGITS_NUM_TRAIN)

    def run(
        key_data: jax.Array, hyper: tuple[jax.Array, ...], images: jax.Array, labels: jax.Array
    ) -> Chain:
        init_key, chain_key, _ = jax.random.split(jax.random.wrap_key_data(key_data), 3)
        position = init_mlp(init_key, sizes)
        estimator = grad_estimator(images, labels, config.prior_std)
        if method == "sgld":
            kernel = mcmc.sgld(estimator)
        elif method == "csgld":
            kernel = mcmc.cyclical_sgld(estimator, num_epochs * spe, config.csgld_cycles)
        elif method == "sghmc":
            kernel = mcmc.sghmc(estimator)
        else:
            kernel = mcmc.entropy_mcmc(estimator)
        state = kernel.init(position)
        order_key, step_key = jax.random.split(chain_key)

        def step(key: jax.Array, chain_state: Any, batch: jax.Array) -> tuple[Any, Any, None]:
            chain_state, info = kernel.step(key, chain_state, batch, *hyper)
            return chain_state, info, None

        def summary(chain_state: Any, infos: Any) -> Chain:
            sampling = infos.is_sampling[-1] if method == "csgld" else jnp.bool_(True)
            return Chain(
                chain_state.position,
                chain_state.guide if method == "entropy_mcmc" else None,
                jnp.sum(infos.num_grad_evals),
                infos.is_finite,
                sampling,
            )

        _, _, chain = drivers.scan_epochs(
            step,
            scheme,
            order_key,
            step_key,
            state,
            scheme.init(order_key, None),
            num_epochs,
            batch_size=batch_size,
            summary=summary,
        )
        return chain

    return run


def seed_key_data(config: ConfigDict) -> jax.Array:
    """Raw key data of ``split(key(seed), num_seeds)``, one row per seed."""
    return jax.random.key_data(jax.random.split(jax.random.key(config.seed), config.num_seeds))


def run_seeds(config: ConfigDict, method: str, train: dict[str, Any]) -> Chain:
    """Every seed of ``method`` in one jitted ``vmap``, the seed axis over
    :func:`experiments.common.seed_mesh`."""
    keys = common.shard_seeds(seed_key_data(config), common.seed_mesh(config))
    images = jnp.asarray(train["image"]).reshape(-1, NUM_PIXELS)
    labels = jnp.asarray(train["label"])
    sweep = jit(config, jax.vmap(make_run(config, method), in_axes=(0, None, None, None)))
    return sweep(keys, hyper_parameters(config, method), images, labels)


# ------------------------------------------------------------------ evaluation


class DrawStats(NamedTuple):
    """Per kept draw (leading axes ``[seeds, draws]``).

    Attributes:
      test_probs: ``[.., n_test, 10]`` predictive probabilities of the draw.
      train_loss: mean training cross-entropy at the draw.
      loss_increase: mean over perturbations of the training loss increase.
    """

    test_probs: jax.Array
    train_loss: jax.Array
    loss_increase: jax.Array


def make_evaluate(config: ConfigDict):
    """``evaluate(draws, index, key_data, train, test) -> DrawStats`` for one seed's draws
    (leading axis ``K``); ``index[k]`` numbers draw ``k`` within its chain, and perturbation
    ``p`` of it uses ``split(fold_in(probe_key, index[k]), P)[p]``: the same for every method
    and variable, so that the flatness differences are paired."""
    num_perturbations, std = config.num_perturbations, config.perturbation_std

    def evaluate(
        draws: PyTree, index: jax.Array, key_data: jax.Array, train: Any, test: Any
    ) -> DrawStats:
        _, _, probe_key = jax.random.split(jax.random.wrap_key_data(key_data), 3)

        def one(params: PyTree, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            flat, unravel = ravel_pytree(params)
            base = mean_loss(params, *train)
            keys = jax.random.split(jax.random.fold_in(probe_key, k), num_perturbations)
            noise = jax.vmap(lambda key: jax.random.normal(key, flat.shape, flat.dtype))(keys)
            losses = jax.vmap(lambda z: mean_loss(unravel(flat + std * z), *train))(noise)
            probs = jax.nn.softmax(mlp_logits(params, test[0]), axis=-1)
            return probs, base, jnp.mean(losses) - base

        return DrawStats(*jax.vmap(one)(draws, index))

    return evaluate


def evaluate_seeds(
    config: ConfigDict, draws: PyTree, index: np.ndarray, train: dict[str, Any], test: Any
) -> DrawStats:
    """:func:`make_evaluate` for every seed in one jitted ``vmap`` (NumPy results); ``draws``
    have leading axes ``[seeds, draws]`` (every method's and variable's kept draws, side by
    side, so that one compiled program serves them all)."""
    keys = common.shard_seeds(seed_key_data(config), common.seed_mesh(config))
    train_xy = (jnp.asarray(train["image"]).reshape(-1, NUM_PIXELS), jnp.asarray(train["label"]))
    test_xy = (jnp.asarray(test["image"]).reshape(-1, NUM_PIXELS), jnp.asarray(test["label"]))
    sweep = jit(config, jax.vmap(make_evaluate(config), in_axes=(0, None, 0, None, None)))
    return jax.tree.map(np.asarray, sweep(draws, jnp.asarray(index), keys, train_xy, test_xy))


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, num_bins: int = ECE_BINS
) -> float:
    r"""ECE with ``num_bins`` equal-width confidence bins :math:`((b-1)/M, b/M]`:
    :math:`\sum_b \frac{n_b}{n}|\mathrm{acc}_b - \mathrm{conf}_b|`."""
    confidence = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
    total = 0.0
    for b in range(num_bins):
        inside = bins == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def averaged_metrics(
    stats: DrawStats, keep: np.ndarray, labels: np.ndarray
) -> dict[str, np.ndarray]:
    """Per seed: test accuracy, NLL and ECE of the model average over the draws with ``keep``
    (``[seeds, draws]``), the mean flatness and training loss of those draws; NaN for a seed
    with a non-finite draw."""
    out: dict[str, list[float]] = {name: [] for name in (*METRICS, "train_loss")}
    for s in range(keep.shape[0]):
        probs = stats.test_probs[s][keep[s]].astype(np.float64)
        sharp = stats.loss_increase[s][keep[s]]
        train_loss = stats.train_loss[s][keep[s]]
        if not (np.all(np.isfinite(probs)) and np.all(np.isfinite(sharp))):
            for values in out.values():
                values.append(math.nan)
            continue
        average = probs.mean(axis=0)
        out["test_accuracy"].append(float(np.mean(average.argmax(-1) == labels)))
        picked = average[np.arange(labels.size), labels]
        out["test_nll"].append(float(-np.mean(np.log(np.maximum(picked, 1e-300)))))
        out["ece"].append(expected_calibration_error(average, labels))
        out["flatness"].append(float(np.mean(sharp)))
        out["train_loss"].append(float(np.mean(train_loss)))
    return {name: np.asarray(values) for name, values in out.items()}


def summarise(values: np.ndarray) -> dict[str, float | None]:
    """Mean and SE over seeds; ``None`` for both when a seed is not finite (diverged)."""
    values = np.asarray(values, np.float64)
    if not np.all(np.isfinite(values)):
        return {"mean": None, "stderr": None}
    mean, stderr = common.mean_and_stderr(values)
    return {"mean": float(mean), "stderr": float(stderr)}


def first_nonfinite(is_finite: np.ndarray) -> list[int | None]:
    """Per seed, the first step whose state was not finite (``None`` when none was)."""
    flat = is_finite.reshape(is_finite.shape[0], -1)
    steps = np.asarray(drivers.first_nonfinite(jnp.where(flat, 0.0, jnp.inf)))
    return [None if s < 0 else int(s) for s in steps]


# ------------------------------------------------------------------ the toy


class Toy(NamedTuple):
    """The 1-D mixture: weights, means, variances (sharp first) and the basin boundary."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    boundary: float


def toy_mixture(config: ConfigDict) -> Toy:
    """The toy's mixture and :math:`b`, the minimum of :math:`\\pi` between the means."""
    weights = np.array([1.0 - config.toy_flat_weight, config.toy_flat_weight])
    means = np.asarray(config.toy_means, np.float64)
    variances = np.asarray(config.toy_stds, np.float64) ** 2
    unbounded = Toy(weights, means, variances, math.nan)
    low, high = sorted(means)
    boundary = optimize.minimize_scalar(
        lambda x: toy_density(unbounded, x), bounds=(low, high), method="bounded"
    ).x
    return unbounded._replace(boundary=float(boundary))


def toy_density(toy: Toy, x: float, smoothing: float = 0.0) -> float:
    r""":math:`\pi * N(0, \text{smoothing})` at ``x`` (``smoothing = 0``: :math:`\pi`)."""
    scales = np.sqrt(toy.variances + smoothing)
    return float(np.sum(toy.weights * stats.norm.pdf(x, toy.means, scales)))


def basin_mass(toy: Toy, smoothing: float) -> float:
    """:math:`\\int` over the flat basin of :math:`\\pi * N(0, \\text{smoothing})` by quadrature
    (``smoothing = 0``: of :math:`\\pi`)."""
    density = lambda x: toy_density(toy, x, smoothing)  # noqa: E731
    if toy.means[1] > toy.means[0]:
        mass, _ = integrate.quad(density, toy.boundary, np.inf, epsabs=1e-12, epsrel=1e-10)
    else:
        mass, _ = integrate.quad(density, -np.inf, toy.boundary, epsabs=1e-12, epsrel=1e-10)
    return float(mass)


def toy_chains(config: ConfigDict, toy: Toy) -> dict[str, np.ndarray]:
    """SGLD and Entropy-MCMC on the toy with exact gradients, ``toy_num_chains`` chains in one
    jitted ``vmap``: per chain and sampled variable, the fraction of post-burn-in steps in the
    flat basin, and the final positions."""
    weights, means = jnp.asarray(toy.weights), jnp.asarray(toy.means)
    scales = jnp.sqrt(jnp.asarray(toy.variances))
    flat_side = 1.0 if toy.means[1] > toy.means[0] else -1.0
    boundary, burn_in = toy.boundary, config.toy_burn_in
    kept = config.toy_num_steps - burn_in

    def log_density(x: jax.Array) -> jax.Array:
        return jax.nn.logsumexp(jnp.log(weights) + jax.scipy.stats.norm.logpdf(x, means, scales))

    exact = lambda x, batch: jax.grad(log_density)(x)  # noqa: E731  (the batch is everything)
    in_basin = lambda x: (flat_side * (x - boundary) > 0).astype(jnp.float32)  # noqa: E731
    sgld, emcmc = mcmc.sgld(exact), mcmc.entropy_mcmc(exact)
    batch = jnp.zeros((1,), jnp.int32)

    def chain(key: jax.Array, step_size: jax.Array, coupling: jax.Array):
        init_key, sgld_key, emcmc_key = jax.random.split(key, 3)
        x0 = 0.5 * (means[0] + means[1]) + config.toy_init_std * jax.random.normal(init_key)

        def sgld_step(k: jax.Array, carry: Any, count: jax.Array):
            state, total = carry
            state, _ = sgld.step(k, state, batch, step_size)
            return (state, total + count * in_basin(state.position)), None

        def emcmc_step(k: jax.Array, carry: Any, count: jax.Array):
            state, total = carry
            state, _ = emcmc.step(k, state, batch, step_size, coupling)
            seen = jnp.stack([in_basin(state.position), in_basin(state.guide)])
            return (state, total + count * seen), None

        def run_kernel(step: Any, key: jax.Array, state: Any, zeros: jax.Array):
            # burn-in steps count nothing; the keys continue across (start=burn_in)
            carry, _ = drivers.scan_steps(step, key, (state, zeros), burn_in, 0.0)
            carry, _ = drivers.scan_steps(step, key, carry, kept, 1.0, start=burn_in)
            return carry[0], carry[1] / kept

        s_state, s_frac = run_kernel(sgld_step, sgld_key, sgld.init(x0), jnp.zeros(()))
        e_state, e_frac = run_kernel(emcmc_step, emcmc_key, emcmc.init(x0), jnp.zeros(2))
        fractions = [s_frac, e_frac[0], e_frac[1]]
        finals = [s_state.position, e_state.position, e_state.guide]
        return jnp.stack(fractions), jnp.stack(finals)

    keys = jax.random.split(
        jax.random.fold_in(jax.random.key(config.seed), 1), config.toy_num_chains
    )
    run = jax.jit(jax.vmap(chain, in_axes=(0, None, None)))  # small program: run-bound
    fractions, finals = run(
        keys, jnp.float32(config.toy_step_size), jnp.float32(config.toy_coupling)
    )
    names = ("sgld", "entropy_mcmc:theta", "entropy_mcmc:guide")
    fractions, finals = np.asarray(fractions, np.float64), np.asarray(finals, np.float64)
    return {
        **{f"{n}/fraction": fractions[:, i] for i, n in enumerate(names)},
        **{f"{n}/final": finals[:, i] for i, n in enumerate(names)},
    }


def toy_study(config: ConfigDict) -> dict[str, Any]:
    """The toy's targets (quadrature), fractions ± MC SE over chains, and histograms."""
    toy = toy_mixture(config)
    targets = {"pi": basin_mass(toy, 0.0), "smoothed": basin_mass(toy, config.toy_coupling)}
    chains = toy_chains(config, toy)
    spread = 4.0 * math.sqrt(float(toy.variances.max() + config.toy_coupling))
    edges = np.linspace(toy.means.min() - spread, toy.means.max() + spread, HIST_BINS + 1)
    samplers = {}
    for name, target in (
        ("sgld", "pi"),
        ("entropy_mcmc:theta", "pi"),
        ("entropy_mcmc:guide", "smoothed"),
    ):
        values = chains[f"{name}/fraction"]
        result = summarise(values)
        finals = chains[f"{name}/final"]
        counts, _ = np.histogram(finals[np.isfinite(finals)], bins=edges)
        samplers[name] = {
            "flat_fraction": result,
            "target": target,
            "target_value": targets[target],
            "z_score": (
                None
                if result["mean"] is None or result["stderr"] == 0
                else (result["mean"] - targets[target]) / result["stderr"]
            ),
            "histogram": counts.tolist(),
            "diverged_chains": int(np.sum(~np.isfinite(finals))),
        }
    return {
        "weights": toy.weights.tolist(),
        "means": toy.means.tolist(),
        "stds": np.sqrt(toy.variances).tolist(),
        "coupling": config.toy_coupling,
        "boundary": toy.boundary,
        "flat_weight": config.toy_flat_weight,
        "basin_mass_pi": targets["pi"],
        "basin_mass_smoothed": targets["smoothed"],
        "histogram_edges": edges.tolist(),
        "num_chains": config.toy_num_chains,
        "samplers": samplers,
    }


# ------------------------------------------------------------------ output


def rows_of(methods: list[str]) -> list[str]:
    rows = []
    for method in methods:
        rows.append(method)
        if method == "entropy_mcmc":
            rows.extend(("entropy_mcmc:theta", "entropy_mcmc:guide"))
    return rows


def format_table(metrics: dict[str, Any]) -> str:
    """Per row: test accuracy, NLL, ECE, flatness (mean ± SE), paired differences against
    SGLD, draws kept, gradient evaluations, divergence; then the toy."""

    def cell(stat: dict[str, Any], scale: float = 1.0, digits: int = 4, sign: str = "") -> str:
        if stat["mean"] is None:
            return "diverged"
        return f"{scale * stat['mean']:{sign}.{digits}f} ± {scale * stat['stderr']:.{digits}f}"

    lines = [
        f"digits Bayesian MLP {metrics['layer_sizes']}, {metrics['num_params']} parameters; "
        f"mean ± SE over {metrics['num_seeds']} seeds; Δ: paired against SGLD (same seed, init "
        "and batches)",
        f"{'row':<20s} {'test acc, %':>14s} {'test NLL':>17s} {'ECE':>17s} {'flatness':>17s} "
        f"{'Δacc, pts':>14s} {'ΔNLL':>17s} {'Δflatness':>17s} {'draws':>5s} {'grad evals':>10s}"
        "  diverged",
    ]
    for row, r in metrics["rows"].items():
        diff = r.get("vs_sgld")
        bad = [s for s in r["first_nonfinite_step"] if s is not None]
        lines.append(
            f"{row:<20s} {cell(r['test_accuracy'], 100, 2):>14s} {cell(r['test_nll']):>17s} "
            f"{cell(r['ece']):>17s} {cell(r['flatness']):>17s} "
            + (
                f"{cell(diff['test_accuracy'], 100, 2, '+'):>14s} "
                f"{cell(diff['test_nll'], sign='+'):>17s} {cell(diff['flatness'], sign='+'):>17s} "
                if diff
                else f"{'-':>14s} {'-':>17s} {'-':>17s} "
            )
            + f"{r['num_draws']:>5.1f} {r['grad_evals']:>10d}  "
            + (f"{len(bad)} seeds, first at step {min(bad)}" if bad else "no")
        )
    if "entropy_mcmc" in metrics["rows"]:
        lines.append(
            "entropy_mcmc: the model average over theta and theta_a draws pooled (the method's "
            "output); :theta and :guide average each alone.  flatness: mean train-loss increase "
            f"under N(0, {metrics['perturbation_std']:g}² I) weight perturbations (lower: flatter)"
        )
    toy = metrics["toy"]
    lines.append(
        f"toy: pi = {toy['weights'][0]:.2f} N({toy['means'][0]:g}, {toy['stds'][0]:g}²) + "
        f"{toy['weights'][1]:.2f} N({toy['means'][1]:g}, {toy['stds'][1]:g}²), eta = "
        f"{toy['coupling']:g}, flat basin beyond b = {toy['boundary']:.4f}; "
        f"{toy['num_chains']} chains, exact gradients"
    )
    for name, s in toy["samplers"].items():
        frac = s["flat_fraction"]
        got = (
            "diverged"
            if frac["mean"] is None
            else f"{frac['mean']:.4f} ± {frac['stderr']:.4f} (z = {s['z_score']:+.2f})"
        )
        lines.append(
            f"  {name:<20s} fraction in the flat basin {got}; target {s['target_value']:.4f} "
            f"({'pi' if s['target'] == 'pi' else 'pi * N(0, eta)'}, quadrature)"
        )
    return "\n".join(lines)


def draw(metrics: dict[str, Any], path: pathlib.Path) -> None:
    """Top: test accuracy, NLL, ECE and flatness per row (± 1 SE; diverged rows are named in
    the legend).  Bottom left: the toy's densities and the histograms of the chains' final
    positions; bottom right: its flat-basin fractions against the quadrature targets."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    titles = {
        "test_accuracy": ("test accuracy (%)", 100.0),
        "test_nll": ("test NLL (nats)", 1.0),
        "ece": ("expected calibration error", 1.0),
        "flatness": ("train-loss increase under perturbation (lower: flatter)", 1.0),
    }
    rows = list(metrics["rows"])
    metric_axes = [axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0]]
    for axis, name in zip(metric_axes, METRICS, strict=True):
        ylabel, scale = titles[name]
        for i, row in enumerate(rows):
            stat = metrics["rows"][row][name]
            mean, stderr = stat["mean"], stat["stderr"]
            shown = mean is not None and math.isfinite(mean)
            label = common.not_shown(LABELS[row], 0 if shown else 1)
            if shown:
                axis.errorbar(
                    i,
                    scale * mean,
                    yerr=scale * (stderr or 0.0),
                    marker="o",
                    capsize=3,
                    ls="none",
                    label=label,
                    color=f"C{i}",
                )
            else:
                axis.plot([], [], marker="o", ls="none", label=label, color=f"C{i}")
        axis.set_xticks(range(len(rows)))
        axis.set_xticklabels(
            [LABELS[r].replace(" (θ and θa)", "") for r in rows],
            rotation=25,
            fontsize=7,
            ha="right",
        )
        axis.set(xlabel="sampler", ylabel=ylabel, title=ylabel)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=6)
    toy = metrics["toy"]
    density, bars = axes[1, 1], axes[1, 2]
    edges = np.asarray(toy["histogram_edges"])
    x = np.linspace(edges[0], edges[-1], 600)
    weights, means, stds = (np.asarray(toy[k]) for k in ("weights", "means", "stds"))
    for variance_add, label, style in ((0.0, "π", "-"), (toy["coupling"], "π * N(0, η)", "--")):
        y = np.sum(weights * stats.norm.pdf(x[:, None], means, np.sqrt(stds**2 + variance_add)), 1)
        density.plot(x, y, "k" + style, lw=1.2, label=label)
    width = np.diff(edges)
    for i, (name, s) in enumerate(toy["samplers"].items()):
        counts = np.asarray(s["histogram"], np.float64)
        total = counts.sum()
        heights = counts / (total * width) if total > 0 else counts
        density.stairs(
            heights,
            edges,
            color=f"C{i}",
            label=common.not_shown(f"{LABELS[name]} final positions", s["diverged_chains"]),
        )
    density.axvline(toy["boundary"], color="grey", ls=":", label="basin boundary b")
    density.set(xlabel="x", ylabel="density", title="toy: sharp and flat modes")
    density.legend(fontsize=7)
    names = list(toy["samplers"])
    for i, name in enumerate(names):
        s = toy["samplers"][name]
        frac = s["flat_fraction"]
        if frac["mean"] is not None:
            bars.errorbar(
                i,
                frac["mean"],
                yerr=2 * frac["stderr"],
                marker="o",
                capsize=4,
                color=f"C{i}",
                ls="none",
                label=f"{LABELS[name]} (± 2 SE)",
            )
        else:
            bars.plot(
                [],
                [],
                marker="o",
                ls="none",
                color=f"C{i}",
                label=common.not_shown(LABELS[name], 1),
            )
        bars.hlines(
            s["target_value"],
            i - 0.3,
            i + 0.3,
            colors="k",
            label="quadrature target" if i == 0 else None,
        )
    bars.axhline(toy["flat_weight"], color="grey", ls=":", label="flat component weight")
    bars.set_xticks(range(len(names)))
    bars.set_xticklabels([LABELS[n] for n in names], fontsize=7)
    bars.set(
        ylabel="fraction of samples in the flat basin",
        xlabel="sampler",
        title="toy: flat-basin fraction vs target",
    )
    bars.legend(fontsize=7)
    bars.grid(True, alpha=0.3)
    fig.suptitle(
        f"Flat basins: digits Bayesian MLP ({metrics['num_seeds']} seeds, equal gradient "
        "evaluations) and the flat-vs-sharp toy"
    )
    common.save_figure(fig, path)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table and the figure."""
    validate(config)
    train, test = data.scaled_digits(config.data_dir)
    folder = common.results_folder(config, NAME)
    keep_epochs = kept_epochs(config)
    methods = list(config.methods)
    labels = np.asarray(test["label"])
    metrics: dict[str, Any] = {
        "layer_sizes": layer_sizes(config),
        "num_params": num_params(config),
        "num_seeds": config.num_seeds,
        "devices": common.seed_devices(config),
        "kept_epochs": keep_epochs.tolist(),
        "perturbation_std": config.perturbation_std,
        "rows": {},
    }
    bar = tqdm(total=len(methods) + 2, desc=NAME)
    variables: dict[str, PyTree] = {}  # row -> kept draws [seeds, K, ...]
    keeps: dict[str, np.ndarray] = {}
    chains: dict[str, dict[str, Any]] = {}
    for method in methods:
        start = time.perf_counter()
        chain = run_seeds(config, method, train)
        keep = np.asarray(chain.is_sampling)[:, keep_epochs]
        named = {method: chain.theta}
        if method == "entropy_mcmc":
            named = {f"{method}:theta": chain.theta, f"{method}:guide": chain.guide}
        for row, tree in named.items():
            variables[row] = jax.tree.map(lambda a: a[:, keep_epochs], tree)
            keeps[row] = keep
        chains[method] = {
            "grad_evals": np.asarray(chain.grad_evals).sum(axis=1),
            "first_nonfinite_step": first_nonfinite(np.asarray(chain.is_finite)),
            "seconds": time.perf_counter() - start,
        }
        bar.update(1)
    # every variable's draws side by side: one compiled evaluation serves them all
    names = list(variables)
    count = len(keep_epochs)
    stacked = jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *variables.values())
    stats_all = evaluate_seeds(config, stacked, np.tile(np.arange(count), len(names)), train, test)
    stats_of = {
        row: jax.tree.map(lambda a, i=i: a[:, i * count : (i + 1) * count], stats_all)
        for i, row in enumerate(names)
    }
    bar.update(1)
    groups: dict[str, tuple[DrawStats, np.ndarray, str]] = {}
    for method in methods:
        if method == "entropy_mcmc":
            theta, guide = stats_of[f"{method}:theta"], stats_of[f"{method}:guide"]
            pooled = jax.tree.map(lambda a, b: np.concatenate([a, b], axis=1), theta, guide)
            keep = keeps[f"{method}:theta"]
            groups[method] = (pooled, np.concatenate([keep, keep], axis=1), method)
            groups[f"{method}:theta"] = (theta, keep, method)
            groups[f"{method}:guide"] = (guide, keep, method)
        else:
            groups[method] = (stats_of[method], keeps[method], method)
    per_row: dict[str, dict[str, np.ndarray]] = {}
    for row, (row_stats, row_keep, method) in groups.items():
        values = averaged_metrics(row_stats, row_keep, labels)
        per_row[row] = values
        grad_evals = chains[method]["grad_evals"]
        metrics["rows"][row] = {
            **{name: summarise(values[name]) for name in (*METRICS, "train_loss")},
            "per_seed": {name: values[name].tolist() for name in (*METRICS, "train_loss")},
            "num_draws": float(row_keep.sum(axis=1).mean()),
            "grad_evals": int(grad_evals[0]),
            "grad_evals_per_seed": grad_evals.tolist(),
            "first_nonfinite_step": chains[method]["first_nonfinite_step"],
            "step_size": config.step_size[method],
            "chain_seconds": chains[method]["seconds"],
        }
    for row, values in per_row.items():
        if row != REFERENCE:
            metrics["rows"][row]["vs_sgld"] = {
                name: summarise(values[name] - per_row[REFERENCE][name]) for name in METRICS
            }
    start = time.perf_counter()
    metrics["toy"] = {**toy_study(config), "seconds": time.perf_counter() - start}
    bar.update(1)
    bar.close()
    table = format_table(metrics)
    header = ["row", *(f"{m}_{s}" for m in METRICS for s in ("mean", "stderr"))]
    header += [f"{m}_vs_sgld_{s}" for m in METRICS for s in ("mean", "stderr")]
    header += ["num_draws", "grad_evals"]
    common.write_csv(
        folder / "results.csv",
        header,
        [
            [
                row,
                *(r[m][s] for m in METRICS for s in ("mean", "stderr")),
                *(
                    r["vs_sgld"][m][s] if "vs_sgld" in r else 0.0
                    for m in METRICS
                    for s in ("mean", "stderr")
                ),
                r["num_draws"],
                r["grad_evals"],
            ]
            for row, r in metrics["rows"].items()
        ],
    )
    return common.finish(folder, table, metrics, lambda path: draw(metrics, path))


if __name__ == "__main__":
    common.main(run, validate)
