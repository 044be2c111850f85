r"""GraB against random reshuffling and single shuffle: an MLP on the 8×8 digits, per epoch.

Lu, Guo & De Sa (NeurIPS 2022), "GraB: Finding Provably Better Data Permutations than
Random Reshuffling", choose each epoch's order so that the prefix sums of the centred
example gradients stay :math:`O(1)` (herding) instead of the :math:`O(\sqrt n)` of a random
permutation; for smooth non-convex sums this gives :math:`\tilde O((nK)^{-2/3})` against
RR's :math:`\tilde O(n^{-1/3}K^{-2/3})` after :math:`K` epochs (rates as stated in their
abstract), and their experiments report faster early convergence of the training loss
and test accuracy.  This study asks the same question on a small real data set.

**Set-up.** scikit-learn's 8×8 digits read through the TFDS builder
(:func:`shufflesgd.data.load_source`, train 1536 / test 261 examples, pixels scaled to
``[0, 1]``), held in memory; a :class:`shufflesgd.models.MLP`; plain SGD
:math:`\theta \leftarrow \theta - \eta\,\frac1B\sum_{i\in B_j}\nabla\ell_i(\theta)` on the
softmax cross-entropy, minibatches :math:`B_j` taken in each scheme's epoch order.  For
every scheme all ``num_seeds`` seeds run in **one** ``jax.jit(jax.vmap(run))`` call (the
seeds split over ``config.devices`` devices, :func:`experiments.common.seed_mesh`):
``lax.scan`` over epochs of :func:`shufflesgd.network_training.make_trainer`'s
``scan_epoch`` (one ``lax.scan`` over the minibatches of the trainer's step, so herding
schemes get each example's gradient through ``scheme.observe`` exactly as in the per-batch
loop).  After
every epoch, inside the scan, the full training loss, test loss and test accuracy are
recorded (BatchNorm, if any, in evaluation mode).  The learning rate is a traced argument.

**Common random numbers.** Seed ``s`` gives the same initial network and the same first
epoch order to every scheme (RR, SS and GraB all start from ``permutation(fold_in(key,
0))``), so the schemes differ only from epoch 2 on and the differences ``scheme − RR``
are paired: their standard errors are those of the per-seed differences.

Written: mean ± standard error over seeds of each metric per scheme and epoch, and the
paired differences against ``random_reshuffle`` (``metrics.json``, ``curves.csv``), the
per-seed curves (``per_seed.npz``, keys ``<scheme>/<metric>``, shape ``[seeds, epochs]``),
the printed tables (``table.txt``) and a figure (accuracy and training loss against epochs,
bands of ± 1 SE, ``figure.png``).

Run: ``python -m experiments.grab_digits --config configs/grab_digits.py`` (``:quick`` for
the demo; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import pathlib
import time
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
from shufflesgd import shuffling
from shufflesgd.nn import data, models, training

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "grab_digits"
REFERENCE = "random_reshuffle"  # the paired differences are taken against this scheme
# Schemes whose epochs visit all n examples (so batch_size | 1536 is the only constraint).
SCHEMES = (
    "with_replacement",
    "random_reshuffle",
    "single_shuffle",
    "incremental",
    "flipflop",
    "grab_mean_balance",
    "grab_pair_balance",
)
METRICS = ("test_accuracy", "train_loss", "test_loss")
Arrays = dict[str, jax.Array]


class EpochCurves(NamedTuple):
    """One run's record, one entry per epoch (a leading seed axis when vmapped).

    Attributes:
      train_loss: mean cross-entropy over the whole training set after each epoch.
      test_loss: mean cross-entropy over the test set after each epoch.
      test_accuracy: fraction of the test set classified correctly after each epoch.
      orders: ``int32[num_epochs, n]``, the order each epoch visited.
    """

    train_loss: jax.Array
    test_loss: jax.Array
    test_accuracy: jax.Array
    orders: jax.Array


def make_run(
    model: models.Model, scheme: shuffling.ShufflingScheme, *, num_epochs: int, batch_size: int
) -> Callable[[jax.Array, jax.Array, Arrays, Arrays], EpochCurves]:
    r"""Build ``run(key, learning_rate, train, test) -> EpochCurves``, SGD in ``scheme``'s orders.

    ``key`` is split into the network's initialisation key and the key of
    :func:`shufflesgd.network_training.init_train_state` (which splits it again into the
    scheme's key and the per-step keys ``fold_in(key, s)``).  Each epoch is the trainer's
    ``scan_epoch`` (the scheme's order for the epoch, then its minibatches of ``batch_size``;
    optimizer ``optax.inject_hyperparams(optax.sgd)``, so the traced
    ``learning_rate`` lives in the optimizer state), then the evaluation.  Pure and
    vmappable: ``jax.jit(jax.vmap(run, in_axes=(0, None, None, None)))`` runs many seeds
    in one program.  Arguments are validated by the caller (``batch_size`` must divide
    ``scheme.epoch_length``).
    """
    loss_fn = training.cross_entropy_loss(model)

    def evaluate(state: training.TrainState, arrays: Arrays) -> tuple[jax.Array, jax.Array]:
        # the cross-entropy ignores its key; BatchNorm uses its running averages
        losses, (_, metrics) = loss_fn(state.params, state.batch_stats, arrays, state.key, False)
        return jnp.mean(losses), jnp.mean(metrics["accuracy"])

    def run(key: jax.Array, learning_rate: jax.Array, train: Arrays, test: Arrays) -> EpochCurves:
        optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)
        trainer = training.make_trainer(loss_fn, optimizer, scheme, batch_size=batch_size)
        init_key, state_key = jax.random.split(key)
        params, batch_stats = models.init_model(model, init_key, train["image"][:1])
        state = training.init_train_state(state_key, params, batch_stats, optimizer, scheme)

        def epoch(state: training.TrainState, _: None) -> tuple[training.TrainState, EpochCurves]:
            state, order, _ = trainer.scan_epoch(state, train)
            train_loss, _ = evaluate(state, train)
            test_loss, test_accuracy = evaluate(state, test)
            return state, EpochCurves(train_loss, test_loss, test_accuracy, order)

        _, curves = jax.lax.scan(epoch, state, length=num_epochs)
        return curves

    return run


def build_run(
    config: ConfigDict, scheme_name: str, num_train: int
) -> Callable[[jax.Array, jax.Array, Arrays, Arrays], EpochCurves]:
    """The single-seed ``run`` of :func:`make_run` for the config's network and ``scheme_name``."""
    scheme = shuffling.make_scheme(scheme_name, num_train)
    model = models.MLP(hidden=tuple(config.hidden), num_classes=10, batch_norm=config.batch_norm)
    return make_run(model, scheme, num_epochs=config.num_epochs, batch_size=config.batch_size)


def seed_keys(config: ConfigDict) -> jax.Array:
    """The ``num_seeds`` keys, the same for every scheme (common random numbers)."""
    return jax.random.split(jax.random.key(config.seed), config.num_seeds)


def run_seeds(config: ConfigDict, scheme_name: str, train: Arrays, test: Arrays) -> EpochCurves:
    """All ``config.num_seeds`` seeds of one scheme in one jitted, vmapped call (leading seed
    axis), the seeds split over the devices of :func:`experiments.common.seed_mesh`."""
    sweep = jax.jit(
        jax.vmap(build_run(config, scheme_name, len(train["label"])), in_axes=(0, None, None, None))
    )
    return jax.block_until_ready(
        sweep(
            common.shard_seeds(seed_keys(config), common.seed_mesh(config)),
            jnp.float32(config.learning_rate),
            train,
            test,
        )
    )


def is_permutation(orders: np.ndarray) -> bool:
    """Whether every row of ``orders`` (``[..., n]``) is a permutation of ``0..n-1``."""
    n = orders.shape[-1]
    return bool(np.all(np.sort(orders, axis=-1) == np.arange(n)))


def summarise(values: np.ndarray) -> dict[str, list[float]]:
    """Mean and Monte Carlo standard error over seeds (axis 0), per epoch."""
    mean, stderr = common.mean_and_stderr(values)
    return {"mean": mean.tolist(), "stderr": stderr.tolist()}


def validate(config: ConfigDict) -> None:
    """Check every field before any data is read or anything compiles."""
    schemes = common.check_names("schemes", config.schemes, SCHEMES)
    if REFERENCE not in schemes:
        raise ValueError(
            f"config.schemes must include {REFERENCE!r}, the reference of the paired differences"
        )
    common.check_positive_ints("hidden", list(config.hidden))
    for field in ("num_epochs", "batch_size", "num_seeds"):
        common.check_positive_ints(field, config[field])
    if config.num_seeds < 2:
        raise ValueError(
            f"config.num_seeds must be at least 2 for a standard error, got {config.num_seeds}"
        )
    if config.batch_size > data.DIGITS_NUM_TRAIN or data.DIGITS_NUM_TRAIN % config.batch_size:
        raise ValueError(
            f"config.batch_size must divide the {data.DIGITS_NUM_TRAIN} training examples, "
            f"got {config.batch_size}"
        )
    rate = config.learning_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < float("inf"):
        raise ValueError(f"config.learning_rate must be positive and finite, got {rate!r}")
    if not isinstance(config.batch_norm, bool):
        raise ValueError(f"config.batch_norm must be True or False, got {config.batch_norm!r}")
    common.seed_devices(config)


def report_epochs(num_epochs: int) -> list[int]:
    """The 1-based epochs shown in the printed table: the first five, then about five more."""
    late = np.unique(np.linspace(5, num_epochs, 6).round().astype(int))
    return sorted(
        {e for e in range(1, min(num_epochs, 5) + 1)} | {int(e) for e in late if e <= num_epochs}
    )


def format_table(metrics: dict[str, Any]) -> str:
    """Test accuracy and training loss (mean ± SE) at the :func:`report_epochs`, then the paired
    differences of every scheme against ``random_reshuffle``."""
    schemes = list(metrics["schemes"])
    epochs = report_epochs(metrics["num_epochs"])
    blocks = []
    for metric, scale, unit, fmt in (
        ("test_accuracy", 100.0, "test accuracy, %", "{:6.2f} ± {:4.2f}"),
        ("train_loss", 1.0, "training loss", "{:6.4f} ± {:6.4f}"),
    ):
        width = max(len(fmt.format(0.0, 0.0)), *map(len, schemes))
        lines = [
            f"{unit} (mean ± SE over {metrics['num_seeds']} seeds)",
            f"{'epoch':>5s}  " + "  ".join(f"{s:>{width}s}" for s in schemes),
        ]
        for e in epochs:
            cells = [
                fmt.format(
                    scale * metrics["schemes"][s][metric]["mean"][e - 1],
                    scale * metrics["schemes"][s][metric]["stderr"][e - 1],
                )
                for s in schemes
            ]
            lines.append(f"{e:5d}  " + "  ".join(f"{cell:>{width}s}" for cell in cells))
        blocks.append("\n".join(lines))
    others = [s for s in schemes if s != REFERENCE]
    if others:
        lines = [
            (
                f"paired difference against {REFERENCE} (mean ± SE): test accuracy in points | "
                "training loss"
            ),
            f"{'epoch':>5s}  " + "  ".join(f"{s:>31s}" for s in others),
        ]
        for e in epochs:
            cells = []
            for s in others:
                acc = metrics["schemes"][s]["vs_reference"]["test_accuracy"]
                loss = metrics["schemes"][s]["vs_reference"]["train_loss"]
                cells.append(
                    f"{100 * acc['mean'][e - 1]:+6.2f} ± {100 * acc['stderr'][e - 1]:4.2f} | "
                    f"{loss['mean'][e - 1]:+7.4f} ± {loss['stderr'][e - 1]:6.4f}"
                )
            lines.append(f"{e:5d}  " + "  ".join(cells))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def draw(metrics: dict[str, Any], config: ConfigDict, path: pathlib.Path) -> None:
    """Test accuracy and training loss against epochs, mean ± SE bands, one line per scheme.
    Only finite points are drawn (and, for the log-scale loss, positive ones); a curve with
    points left out (a diverged run) says how many in its legend label."""
    fig, (acc_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    all_epochs = np.arange(1, metrics["num_epochs"] + 1)
    for scheme, result in metrics["schemes"].items():
        for axis, metric, scale in (
            (acc_axis, "test_accuracy", 100.0),
            (loss_axis, "train_loss", 1.0),
        ):
            mean = scale * np.asarray(result[metric]["mean"], float)
            stderr = scale * np.asarray(result[metric]["stderr"], float)
            if metric == "train_loss":  # log axis: finite, positive points only
                epochs, mean, stderr, dropped = common.finite_curve(all_epochs, mean, stderr)
            else:
                keep = np.isfinite(mean) & np.isfinite(stderr)
                epochs, mean, stderr = all_epochs[keep], mean[keep], stderr[keep]
                dropped = int(np.sum(~keep))
            label = common.not_shown(scheme, dropped)
            (line,) = axis.plot(epochs, mean, marker="o", ms=2.5, lw=1.2, label=label)
            axis.fill_between(
                epochs, mean - stderr, mean + stderr, color=line.get_color(), alpha=0.25, lw=0
            )
    acc_axis.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    loss_axis.set(
        xlabel="epoch", ylabel="training cross-entropy", yscale="log", title="training loss"
    )
    for axis in (acc_axis, loss_axis):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(
        f"digits, MLP {tuple(config.hidden)}{' + BN' if config.batch_norm else ''}, SGD η = "
        f"{config.learning_rate}, batch {config.batch_size}; mean ± SE over {config.num_seeds} "
        "seeds"
    )
    common.save_figure(fig, path)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the tables and the figure."""
    validate(config)
    train_np, test_np = data.scaled_digits(config.data_dir)
    train = {k: jnp.asarray(v) for k, v in train_np.items()}
    test = {k: jnp.asarray(v) for k, v in test_np.items()}
    folder = common.results_folder(config, NAME)
    metrics: dict[str, Any] = {
        "num_epochs": config.num_epochs,
        "num_seeds": config.num_seeds,
        "devices": common.seed_devices(config),  # the seed axis was split over these
        "num_train": len(train_np["label"]),
        "num_test": len(test_np["label"]),
        "schemes": {},
    }
    curves: dict[str, dict[str, np.ndarray]] = {}
    for scheme in tqdm(config.schemes, desc=NAME):
        start = time.perf_counter()
        result = run_seeds(config, scheme, train, test)
        seconds = time.perf_counter() - start
        curves[scheme] = {name: np.asarray(getattr(result, name)) for name in METRICS}
        metrics["schemes"][scheme] = {
            **{name: summarise(values) for name, values in curves[scheme].items()},
            "orders_are_permutations": is_permutation(np.asarray(result.orders)),
            "seconds": seconds,
        }
    for scheme, values in curves.items():
        if scheme == REFERENCE:
            continue
        metrics["schemes"][scheme]["vs_reference"] = {
            name: summarise(values[name] - curves[REFERENCE][name]) for name in METRICS
        }
    table = format_table(metrics)
    common.write_csv(
        folder / "curves.csv",
        ["scheme", "epoch", *(f"{name}_{stat}" for name in METRICS for stat in ("mean", "stderr"))],
        [
            [scheme, e + 1, *(r[name][stat][e] for name in METRICS for stat in ("mean", "stderr"))]
            for scheme, r in metrics["schemes"].items()
            for e in range(config.num_epochs)
        ],
    )
    np.savez(
        folder / "per_seed.npz",
        **{
            f"{scheme}/{name}": values
            for scheme, per_scheme in curves.items()
            for name, values in per_scheme.items()
        },
    )
    return common.finish(folder, table, metrics, lambda path: draw(metrics, config, path))


if __name__ == "__main__":
    common.main(run, validate)
