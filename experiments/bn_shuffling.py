r"""Single shuffle (SS) and random reshuffling (RR) with BatchNorm: distorted optima and divergence.

Wu, Yun & Sra (ICML 2023, arXiv:2302.12444), "On the Training Instability of Shuffling SGD
with Batch Normalization", study the linear network with batch-normalised inputs
:class:`shufflesgd.models.LinearBatchNorm`,
:math:`f(x) = W_L\cdots W_1(\Gamma\,\mathrm{BN}_P(x) + \beta)`.  On a minibatch :math:`P` it is
affine in the batch-normalised inputs :math:`z_i^P = (x_i - \mu_P)/\sqrt{\sigma_P^2 + \epsilon}`:
:math:`f(x_i) = M^\top z_i^P + c` with the *end-to-end map*
:math:`M = \Gamma\,(W_L\cdots W_1)^\top` and :math:`c = (W_L\cdots W_1)\beta`
(:func:`end_to_end`).  Because :math:`z_i^P` depends on the batch, an epoch of minibatch SGD over
the partition :math:`\pi` descends the *distorted risk*
:math:`L_\pi(M, c) = \frac1m\sum_{P\in\pi}\frac1B\sum_{i\in P}\ell(M^\top z_i^P + c, y_i)`
(Sec. 3): SS minimises :math:`L_\pi` for its one partition, RR the average
:math:`\mathbb E_\pi L_\pi` over uniformly random partitions, and full-batch GD the undistorted
risk :math:`L(M, c)` with the whole-set statistics.

**Regression** (Sec. 3: SS and RR converge to distinct optima, both distorted away from GD's).
With the squared loss each risk is a least-squares problem in :math:`\theta = (M, c)`, so all
three optima are computed in closed form (:func:`distorted_optima`): GD's by least squares on the
standardised data, SS's on the distorted data of the seed's own partition (read from the scheme
state the run starts from), RR's from the normal equations averaged over
``rr_reference_permutations`` random partitions (Monte Carlo; its standard error is reported).
For every learning rate and seed the study trains GD (batch = all ``n``), SS and RR (batch
``B``) for the same number of steps and reports the distances between the end points, relative to
:math:`\|\theta_{GD}^*\|`: SS-GD, RR-GD and SS-RR, and each run to its own predicted optimum.
The distorted optima do not depend on the learning rate: a smaller step brings SS and RR closer
to *their* optima (the gap shrinks with the step size), not to GD's.

**Classification** (Sec. 4: SS can diverge where RR does not).  With the logistic
(two-class softmax cross-entropy) loss, the minimiser of a risk is finite unless some
:math:`(u, b)\ne 0` has :math:`y_i(u^\top z_i + b)\ge 0` for every point of its (distorted)
data set, with a positive sum (:func:`weakly_separable`, a linear programme); then the
iterates grow without bound along such a direction, and if that direction misclassifies some
point of the *undistorted* data (certain when those are not separable) the full-batch risk grows
without bound too.  Our construction (ours: the
sources we could consult did not give the paper's own example in full): ``n = 32`` Gaussian
points in :math:`\mathbb R^{16}`, alternating labels, batch size 2.  BatchNorm maps a pair to
:math:`\pm\mathrm{sign}(x_a - x_b)`, so an SS partition is 16 sign vectors in 16 dimensions,
separable (weakly, where a pair shares its label) whenever they are linearly independent, as
random sign vectors almost always are, whereas RR's risk averages all :math:`\binom{32}{2}`
pairs, whose union is not separable.  Predicted: SS's full-batch risk grows without bound
(slowly: the norm of the iterates grows like the log of the step count), RR's stays bounded,
GD's decreases to its infimum (0 here: 32 Gaussian points in 16 dimensions happen to be
separable, and GD's max-margin direction classifies them all).  The separability of each data set is
checked and reported; per run we report the first epoch at which the full-batch risk exceeds
``divergence_loss`` (or is not finite: a result, not a crash) and the growth of the risk per
e-fold of epochs over the second half of training (least-squares slope against log epoch).

Training uses :func:`shufflesgd.network_training.make_trainer` with the schemes of
:func:`shufflesgd.shuffling.make_scheme`; each epoch is its ``scan_epoch``, a ``lax.scan`` over
the epoch's minibatches in the order ``scheme.step`` draws (the same steps, keys and batches as
``Trainer.run_epoch``), vmapped over seeds and learning rates (a traced
``optax.inject_hyperparams`` learning rate), in compiled chunks of epochs with a tqdm bar; the
run axis is split over ``config.devices`` devices (:func:`experiments.common.seed_mesh`).
(:func:`experiments.common.train_resumable` drives one run with one Python dispatch per
step; here there are tens of thousands of microsecond steps per run, so the runs are vmapped
instead, and each takes seconds, which needs no checkpoint.)

Run: ``python -m experiments.bn_shuffling --config configs/bn_shuffling.py`` (``:quick`` for
the short variant; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from ml_collections import ConfigDict
from scipy.optimize import linprog
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import drivers
from shufflesgd.nn import models, training
from shufflesgd.shuffling import ShufflingScheme, make_scheme

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NAME = "bn_shuffling"
SCHEMES = ("gd", "single_shuffle", "random_reshuffle")  # gd: one full batch per step
BN_EPSILON = models.BN_EPSILON  # the BatchNorm epsilon of LinearBatchNorm
PyTree = Any
Arrays = dict[str, np.ndarray]


# ----------------------------------------------------------------------------- validation


def _check_task(prefix: str, task: ConfigDict) -> None:
    for field in ("num_examples", "dim", "batch_size", "num_epochs", "epochs_per_chunk"):
        common.check_positive_ints(f"{prefix}.{field}", task[field])
    common.check_positive_ints(f"{prefix}.hidden", task.hidden)
    if (
        task.batch_size < 2
        or task.batch_size >= task.num_examples
        or task.num_examples % task.batch_size
    ):
        raise ValueError(
            f"config.{prefix}.batch_size must be at least 2, below num_examples and divide it, "
            f"got batch_size={task.batch_size}, num_examples={task.num_examples}"
        )
    if task.num_epochs % task.epochs_per_chunk:
        raise ValueError(
            f"config.{prefix}.epochs_per_chunk must divide num_epochs, got "
            f"{task.epochs_per_chunk} and {task.num_epochs}"
        )


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built or compiled (``ValueError`` naming it)."""
    common.check_positive_ints("num_seeds", config.num_seeds)
    if config.num_seeds < 2:
        raise ValueError(
            f"config.num_seeds must be at least 2 (a spread needs two), got {config.num_seeds}"
        )
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"config.seed must be a non-negative int, got {config.seed!r}")
    reg, cls = config.regression, config.classification
    _check_task("regression", reg)
    _check_task("classification", cls)
    rates = list(reg.learning_rates)
    if not rates:
        raise ValueError("config.regression.learning_rates must hold at least one step size")
    for rate in rates:
        common.check_positive_number("regression.learning_rates", rate)
    for field in ("feature_log_std", "noise"):
        common.check_positive_number(f"regression.{field}", reg[field])
    common.check_positive_ints(
        "regression.rr_reference_permutations", reg.rr_reference_permutations
    )
    if reg.rr_reference_permutations < 10:
        raise ValueError(
            "config.regression.rr_reference_permutations must be at least 10 (its standard "
            f"error uses 10 chunks), got {reg.rr_reference_permutations}"
        )
    for field in ("learning_rate", "divergence_loss"):
        common.check_positive_number(f"classification.{field}", cls[field])
    shift = cls.class_shift
    if (
        isinstance(shift, bool)
        or not isinstance(shift, (int, float))
        or not math.isfinite(shift)
        or shift < 0
    ):
        raise ValueError(
            f"config.classification.class_shift must be a non-negative finite number, got {shift!r}"
        )
    common.seed_devices(config)  # config.num_seeds divides both tasks' run axes


# ----------------------------------------------------------------------------- data


def regression_data(task: ConfigDict, rng: np.random.Generator) -> Arrays:
    r""":math:`x_{ij} = e^{s g_{ij}}` (log-normal, skewed: minibatch moments vary a lot),
    :math:`y = \langle w^*, x\rangle + \sigma\varepsilon` with
    :math:`w^*, g, \varepsilon \sim N(0, 1)`."""
    x = np.exp(task.feature_log_std * rng.standard_normal((task.num_examples, task.dim)))
    w = rng.standard_normal(task.dim)
    y = x @ w + task.noise * rng.standard_normal(task.num_examples)
    return {"x": x.astype(np.float32), "y": y.astype(np.float32)}


def classification_data(task: ConfigDict, rng: np.random.Generator) -> Arrays:
    r"""Alternating labels :math:`y_i \in \{0, 1\}` and Gaussian inputs
    :math:`x_i \sim N(\mathrm{shift}\,(2y_i - 1)\,e_1, I_d)`."""
    labels = np.arange(task.num_examples) % 2
    x = rng.standard_normal((task.num_examples, task.dim))
    x[:, 0] += task.class_shift * (2.0 * labels - 1.0)
    return {"x": x.astype(np.float32), "y": labels.astype(np.int32)}


def batch_normalise(x: np.ndarray) -> np.ndarray:
    """Per-feature standardisation with the batch's biased variance and BatchNorm's epsilon."""
    return (x - x.mean(axis=-2, keepdims=True)) / np.sqrt(
        x.var(axis=-2, keepdims=True) + BN_EPSILON
    )


def distorted_inputs(x: np.ndarray, order: np.ndarray, batch_size: int) -> np.ndarray:
    r"""Every :math:`z_i^P`, normalised with the moments of its batch :math:`P` under ``order``
    (rows in the original index order)."""
    z = np.empty(x.shape, np.float64)
    batches = np.asarray(order).reshape(-1, batch_size)
    z[batches.ravel()] = batch_normalise(x[batches].astype(np.float64)).reshape(-1, x.shape[1])
    return z


# ----------------------------------------------------------------------------- model pieces


def squared_loss(
    model: models.Model, *, input_key: str = "x", target_key: str = "y"
) -> training.LossFn:
    r"""Per-example squared loss :math:`\ell_i = \frac12(f_\theta(x_i) - y_i)^2` of a one-output
    model (the regression loss of Wu et al. 2023, Sec. 3), with the signature of
    :func:`shufflesgd.network_training.cross_entropy_loss`; the key is unused."""

    def loss_fn(
        params: PyTree, batch_stats: PyTree, batch: training.Batch, key: jax.Array, train: bool
    ) -> tuple[jax.Array, tuple[PyTree, training.Metrics]]:
        del key
        output, new_stats = models.apply_model(
            model, params, batch_stats, batch[input_key], train=train
        )
        return 0.5 * (output[:, 0] - batch[target_key]) ** 2, (new_stats, {})

    return loss_fn


def end_to_end(params: PyTree, depth: int) -> tuple[jax.Array, jax.Array]:
    r"""``(M [d, k], c [k])`` with :math:`f(x) = M^\top z + c` on normalised inputs :math:`z`:
    :math:`M = \mathrm{diag}(\gamma)\,K_1\cdots K_{depth}`,
    :math:`c = \beta^\top K_1\cdots K_{depth}` (NNX kernels :math:`K_l` are ``[in, out]``)."""
    kernels = [params["layers"][str(layer)]["kernel"] for layer in range(depth - 1)]
    product = functools.reduce(jnp.matmul, [*kernels, params["output"]["kernel"]])
    norm = params["input_norm"]
    return norm["scale"][:, None] * product, norm["bias"] @ product


def regression_theta(params: PyTree, depth: int) -> jax.Array:
    """The regression end-to-end map flattened to :math:`\\theta = (M_{:,0}, c_0) \\in R^{d+1}`."""
    matrix, offset = end_to_end(params, depth)
    return jnp.concatenate([matrix[:, 0], offset])


def weakly_separable(z: np.ndarray, signs: np.ndarray, tol: float = 1e-3) -> bool:
    r"""Whether some :math:`(u, b)` with :math:`\|(u, b)\|_\infty \le 1` has
    :math:`s_i(u^\top z_i + b) \ge 0` for all :math:`i` and :math:`\sum_i s_i(u^\top z_i + b) > tol`
    (an LP, HiGHS; the box and ``tol`` keep float32 round-off in directions the data do not
    span from counting).  Exactly then the logistic risk on :math:`\{(z_i, s_i)\}` has no
    minimiser and gradient methods diverge in norm along such a direction."""
    rows = signs[:, None] * np.concatenate([z, np.ones((len(z), 1))], axis=1)
    result = linprog(
        -rows.sum(0),
        A_ub=-rows,
        b_ub=np.zeros(len(rows)),
        bounds=[(-1.0, 1.0)] * rows.shape[1],
        method="highs",
    )
    return bool(result.status == 0 and -result.fun > tol)


def distorted_optima(
    data: Arrays,
    orders: np.ndarray,
    batch_size: int,
    num_permutations: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    r"""Closed-form minimisers in :math:`\theta = (M, c)` of the squared-loss risks.

    GD: least squares on :math:`[z^{full}, 1]`; SS (one per row of ``orders``, the seed's
    partition): least squares on :math:`[z^{\pi}, 1]`; RR: :math:`\bar G^{-1}\bar b` with
    :math:`\bar G, \bar b` the normal-equation terms averaged over ``num_permutations`` uniformly
    random partitions (10 chunks give the Monte Carlo standard error of :math:`\theta_{RR}^*`).
    """
    x, y = data["x"].astype(np.float64), data["y"].astype(np.float64)
    design = lambda z: np.concatenate([z, np.ones((len(z), 1))], axis=1)
    lstsq = lambda z: np.linalg.lstsq(design(z), y, rcond=None)[0]
    gd = lstsq(batch_normalise(x))
    ss = np.stack([lstsq(distorted_inputs(x, order, batch_size)) for order in orders])
    n, d = x.shape
    chunks = np.array_split(np.arange(num_permutations), 10)
    gram_sums, rhs_sums = [], []
    for chunk in chunks:
        perms = np.argsort(rng.random((len(chunk), n)), axis=1)
        z = batch_normalise(x[perms].reshape(len(chunk), n // batch_size, batch_size, d))
        a = np.concatenate([z, np.ones(z.shape[:-1] + (1,))], axis=-1).reshape(len(chunk), n, d + 1)
        gram_sums.append(np.einsum("pni,pnj->ij", a, a))
        rhs_sums.append(np.einsum("pni,pn->i", a, y[perms]))
    rr = np.linalg.solve(sum(gram_sums), sum(rhs_sums))
    rr_chunks = np.stack([np.linalg.solve(g, b) for g, b in zip(gram_sums, rhs_sums)])
    rr_se = float(np.linalg.norm(rr_chunks.std(axis=0, ddof=1)) / math.sqrt(len(chunks)))
    return {"gd": gd, "single_shuffle": ss, "random_reshuffle": rr, "random_reshuffle_se": rr_se}


# ----------------------------------------------------------------------------- training


def make_run(
    loss_fn: training.LossFn,
    scheme: ShufflingScheme,
    batch_size: int,
    data: Arrays,
    epochs_per_record: int,
    record_fn: Callable[[PyTree], jax.Array],
) -> Callable:
    r"""A jitted ``chunk(states, num_records) -> (states, (risk [runs, R], record [runs, R, ...]))``
    over a batch of :class:`~shufflesgd.network_training.TrainState` (leading axis: runs).

    One epoch is ``Trainer.scan_epoch``: the scheme's order for the epoch, the trainer's step over
    its consecutive minibatches (what ``Trainer.run_epoch`` does, in one program); after every
    ``epochs_per_record`` epochs it records the full-batch (undistorted) risk, BatchNorm using the
    whole set's moments, and ``record_fn(params)``.
    """
    optimizer = optax.inject_hyperparams(optax.sgd)(
        learning_rate=0.0
    )  # each state carries its rate
    trainer = training.make_trainer(loss_fn, optimizer, scheme, batch_size=batch_size)
    arrays = {name: jnp.asarray(value) for name, value in data.items()}
    full_key = jax.random.key(0)  # the losses here ignore their key

    def epoch(state: training.TrainState, _: None) -> tuple[training.TrainState, None]:
        return trainer.scan_epoch(state, arrays)[0], None

    def record(state: training.TrainState, _: None) -> tuple[training.TrainState, tuple]:
        state, _ = jax.lax.scan(epoch, state, None, length=epochs_per_record)
        losses, _ = loss_fn(state.params, state.batch_stats, arrays, full_key, True)
        return state, (jnp.mean(losses), record_fn(state.params))

    @functools.partial(jax.jit, static_argnums=1)
    def chunk(states: training.TrainState, num_records: int):
        return jax.vmap(lambda s: jax.lax.scan(record, s, None, length=num_records))(states)

    return chunk


def initial_states(
    model: models.Model,
    trainer_scheme: ShufflingScheme,
    example: jax.Array,
    init_keys: jax.Array,
    train_keys: jax.Array,
    rates: Sequence[float],
) -> training.TrainState:
    """States for every (learning rate, seed), rate-major: seed ``s`` has the same initial
    parameters and the same scheme key under every rate (paired comparisons)."""
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)
    params, stats = jax.vmap(lambda k: models.init_model(model, k, example))(init_keys)
    seeds = jax.vmap(lambda k, p, b: training.init_train_state(k, p, b, optimizer, trainer_scheme))(
        train_keys, params, stats
    )
    tiled = jax.tree.map(lambda leaf: jnp.concatenate([leaf] * len(rates)), seeds)
    rate_per_run = jnp.repeat(jnp.asarray(rates, jnp.float32), len(init_keys))
    opt_state = tiled.opt_state._replace(
        hyperparams={**tiled.opt_state.hyperparams, "learning_rate": rate_per_run}
    )
    return tiled._replace(opt_state=opt_state)


def train_all(
    model: models.Model,
    loss_fn: training.LossFn,
    task: ConfigDict,
    data: Arrays,
    rates: Sequence[float],
    seed_keys: jax.Array,
    record_fn: Callable[[PyTree], jax.Array],
    label: str,
    mesh: jax.sharding.Mesh,
) -> dict[str, dict[str, np.ndarray]]:
    """Train GD, SS and RR for every (rate, seed) for the same number of steps.

    Returns per scheme ``risk [runs, epochs]``, ``record [runs, epochs, ...]`` (runs rate-major),
    the first epoch's ``order [seeds, n]`` (SS's fixed partition) and ``seconds``.  Seed ``s``
    has key ``seed_keys[s]``: its fold 0 initialises the model (the same initial network for
    all three schemes and every rate), fold ``1 + scheme`` the run.  The states are built here,
    outside the compiled chunks, and placed with the run axis split over the ``"seeds"`` axis of
    ``mesh`` (:func:`experiments.common.shard_seeds`), so each device trains its block of runs.
    """
    n, batch = task.num_examples, task.batch_size
    steps_per_epoch = n // batch
    init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(seed_keys)
    example = jnp.asarray(data["x"][:batch])
    results = {}
    for index, name in enumerate(SCHEMES):
        scheme_name, batch_size, per_record = (
            ("incremental", n, steps_per_epoch) if name == "gd" else (name, batch, 1)
        )
        scheme = make_scheme(scheme_name, n)
        chunk = make_run(loss_fn, scheme, batch_size, data, per_record, record_fn)
        train_keys = jax.vmap(functools.partial(jax.random.fold_in, data=1 + index))(seed_keys)
        states = initial_states(model, scheme, example, init_keys, train_keys, rates)
        first_keys, first_states = jax.tree.map(
            lambda leaf: leaf[: len(seed_keys)], (states.scheme_key, states.scheme_state)
        )
        first_order = functools.partial(drivers.epoch_order, scheme)
        first_orders = np.asarray(
            jax.vmap(first_order, in_axes=(0, 0, None))(first_keys, first_states, 0)[1]
        )
        states = common.shard_seeds(states, mesh)
        start = time.perf_counter()
        risks, records = [], []
        for _ in tqdm(
            range(task.num_epochs // task.epochs_per_chunk), desc=f"{label} {name}", leave=False
        ):
            states, (risk, record) = chunk(states, task.epochs_per_chunk)
            risks.append(np.asarray(risk))
            records.append(np.asarray(record))
        results[name] = {
            "risk": np.concatenate(risks, axis=1),
            "record": np.concatenate(records, axis=1),
            "order": first_orders,
            "seconds": time.perf_counter() - start,
        }
    return results


# ----------------------------------------------------------------------------- the two studies


def _relative(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    return np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1) / scale


def regression_study(
    config: ConfigDict, seed_keys: jax.Array
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train GD/SS/RR on the regression data; distances of the end points and to the optima.
    NumPy streams: ``[seed, 0]`` draws the data, ``[seed, 1]`` RR's Monte Carlo partitions."""
    task = config.regression
    data = regression_data(task, np.random.default_rng([config.seed, 0]))
    depth = len(task.hidden) + 1
    model = models.LinearBatchNorm(hidden=tuple(task.hidden), num_outputs=1)
    rates = list(task.learning_rates)
    runs = train_all(
        model,
        squared_loss(model),
        task,
        data,
        rates,
        seed_keys,
        lambda p: regression_theta(p, depth),
        "regression",
        common.seed_mesh(config),
    )
    optima = distorted_optima(
        data,
        runs["single_shuffle"]["order"],
        task.batch_size,
        task.rr_reference_permutations,
        np.random.default_rng([config.seed, 1]),
    )
    scale = float(np.linalg.norm(optima["gd"]))
    seeds = config.num_seeds
    final = {name: runs[name]["record"][:, -1].reshape(len(rates), seeds, -1) for name in SCHEMES}
    predicted = {
        "ss_gd": _relative(optima["single_shuffle"], optima["gd"], scale),
        "rr_gd": float(_relative(optima["random_reshuffle"], optima["gd"], scale)),
        "ss_rr": _relative(optima["single_shuffle"], optima["random_reshuffle"], scale),
        "rr_monte_carlo_se": optima["random_reshuffle_se"] / scale,
    }
    per_rate = []
    for r, rate in enumerate(rates):
        gd, ss, rr = final["gd"][r], final["single_shuffle"][r], final["random_reshuffle"][r]
        distances = {
            "ss_gd": _relative(ss, gd, scale),
            "rr_gd": _relative(rr, gd, scale),
            "ss_rr": _relative(ss, rr, scale),
            "gd_to_optimum": _relative(gd, optima["gd"], scale),
            "ss_to_optimum": _relative(ss, optima["single_shuffle"], scale),
            "rr_to_optimum": _relative(rr, optima["random_reshuffle"], scale),
            "gd_seed_spread": _relative(gd, gd.mean(axis=0), scale),
            "rr_seed_spread": _relative(rr, rr.mean(axis=0), scale),
        }
        risks = {
            name: runs[name]["risk"].reshape(len(rates), seeds, -1)[r, :, -1] for name in SCHEMES
        }
        per_rate.append(
            {
                "learning_rate": rate,
                "distances": {k: v.tolist() for k, v in distances.items()},
                "mean": {k: float(np.mean(v)) for k, v in distances.items()},
                "std": {k: float(np.std(v, ddof=1)) for k, v in distances.items()},
                "final_risk_mean": {k: float(np.mean(v)) for k, v in risks.items()},
            }
        )
    metrics = {
        "num_examples": task.num_examples,
        "dim": task.dim,
        "batch_size": task.batch_size,
        "steps": task.num_epochs * (task.num_examples // task.batch_size),
        "theta_norm_gd_optimum": scale,
        "optimal_risk": {
            "gd": _squared_risk(
                optima["gd"], batch_normalise(data["x"].astype(np.float64)), data["y"]
            )
        },
        "optima": {
            "gd": optima["gd"],
            "random_reshuffle": optima["random_reshuffle"],
            "single_shuffle": optima["single_shuffle"],
        },
        "predicted": {
            k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in predicted.items()
        },
        "per_rate": per_rate,
        "seconds": {name: runs[name]["seconds"] for name in SCHEMES},
    }
    curves = {
        "risk": {name: runs[name]["risk"] for name in SCHEMES},
        "to_gd_optimum": {
            name: _relative(runs[name]["record"], optima["gd"], scale) for name in SCHEMES
        },
        "rates": rates,
    }
    return metrics, curves


def _squared_risk(theta: np.ndarray, z: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(0.5 * (z @ theta[:-1] + theta[-1] - y) ** 2))


def _log_epoch_slope(risk: np.ndarray) -> float:
    """Least-squares slope of ``risk`` against ``log(epoch)`` over the second half of the epochs
    (NaN if any value there is not finite)."""
    epochs = np.arange(1, len(risk) + 1)[len(risk) // 2 :]
    tail = risk[len(risk) // 2 :]
    if not np.all(np.isfinite(tail)):
        return float("nan")
    return float(np.polyfit(np.log(epochs), tail, 1)[0])


def _all_batches(
    n: int, batch_size: int, rng: np.random.Generator, limit: int = 20_000
) -> np.ndarray:
    """Every ``batch_size``-subset of ``range(n)``, or ``limit`` uniformly random ones if there are
    more."""
    if math.comb(n, batch_size) <= limit:
        return np.array(list(itertools.combinations(range(n), batch_size)))
    return np.argsort(rng.random((limit, n)), axis=1)[:, :batch_size]


def classification_study(
    config: ConfigDict, seed_keys: jax.Array
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train GD/SS/RR on the classification data; divergence epochs and separability checks.
    NumPy streams: ``[seed, 2]`` draws the data, ``[seed, 3]`` the batches of RR's union."""
    task = config.classification
    data = classification_data(task, np.random.default_rng([config.seed, 2]))
    depth = len(task.hidden) + 1
    model = models.LinearBatchNorm(hidden=tuple(task.hidden), num_outputs=2)
    loss_fn = training.cross_entropy_loss(model, input_key="x", label_key="y")

    def norm_record(params: PyTree) -> jax.Array:
        matrix, offset = end_to_end(params, depth)
        return jnp.sqrt(jnp.sum(matrix**2) + jnp.sum(offset**2))

    runs = train_all(
        model,
        loss_fn,
        task,
        data,
        [task.learning_rate],
        seed_keys,
        norm_record,
        "classification",
        common.seed_mesh(config),
    )
    x, signs = data["x"].astype(np.float64), 2.0 * data["y"] - 1.0
    batches = _all_batches(
        task.num_examples, task.batch_size, np.random.default_rng([config.seed, 3])
    )
    separable = {
        "original": weakly_separable(batch_normalise(x), signs),
        "single_shuffle": [
            weakly_separable(distorted_inputs(x, order, task.batch_size), signs)
            for order in runs["single_shuffle"]["order"]
        ],
        "random_reshuffle_union": weakly_separable(
            batch_normalise(x[batches]).reshape(-1, x.shape[1]), signs[batches].ravel()
        ),
        "union_batches": len(batches),
    }
    per_scheme = {}
    for name in SCHEMES:
        risk = runs[name]["risk"]
        over = ~np.isfinite(risk) | (risk > task.divergence_loss)
        epochs = [int(np.argmax(row)) + 1 if row.any() else None for row in over]
        per_scheme[name] = {
            "divergence_epoch": epochs,
            "diverged": [e is not None for e in epochs],
            "final_risk": risk[:, -1].tolist(),
            "max_risk": np.nanmax(np.where(np.isfinite(risk), risk, np.nan), axis=1).tolist(),
            "final_end_to_end_norm": runs[name]["record"][:, -1].tolist(),
            "risk_growth_per_efold": [_log_epoch_slope(row) for row in risk],
        }
    metrics = {
        "num_examples": task.num_examples,
        "dim": task.dim,
        "class_shift": task.class_shift,
        "batch_size": task.batch_size,
        "learning_rate": task.learning_rate,
        "divergence_loss": task.divergence_loss,
        "separable": separable,
        "schemes": per_scheme,
        "seconds": {name: runs[name]["seconds"] for name in SCHEMES},
    }
    curves = {
        "risk": {name: runs[name]["risk"] for name in SCHEMES},
        "norm": {name: runs[name]["record"] for name in SCHEMES},
    }
    return metrics, curves


# ----------------------------------------------------------------------------- output


def format_table(metrics: dict[str, Any]) -> str:
    reg, cls = metrics["regression"], metrics["classification"]
    pm = lambda per, key: (
        f"{per['mean'][key]:.1e}±{per['std'][key]:.0e}"
        if key == "gd_to_optimum"
        else f"{per['mean'][key]:.4f}±{per['std'][key]:.4f}"
    )
    lines = [
        (
            f"Regression: n={reg['num_examples']}, d={reg['dim']}, B={reg['batch_size']}, "
            f"{reg['steps']} steps; "
            "distances between end-to-end maps (M, c), relative to |theta*_GD|, mean±sd over seeds"
        ),
        "{:>8s} {:>15s} {:>15s} {:>15s} {:>15s} {:>15s} {:>15s}".format(
            "lr", "SS-GD", "RR-GD", "SS-RR", "GD-GD*", "SS-SS*", "RR-RR*"
        ),
    ]
    for per in reg["per_rate"]:
        lines.append(
            f"{per['learning_rate']:8.4g} "
            + " ".join(
                f"{pm(per, k):>15s}"
                for k in (
                    "ss_gd",
                    "rr_gd",
                    "ss_rr",
                    "gd_to_optimum",
                    "ss_to_optimum",
                    "rr_to_optimum",
                )
            )
        )
    pred = reg["predicted"]
    ss_gd, ss_rr = np.asarray(pred["ss_gd"]), np.asarray(pred["ss_rr"])
    lines.append(
        f"{'optima':>8s} {ss_gd.mean():.4f}±{ss_gd.std(ddof=1):.4f} {pred['rr_gd']:>15.4f} "
        f"{ss_rr.mean():.4f}±{ss_rr.std(ddof=1):.4f}   (closed form: SS*, RR*, GD*; "
        f"RR* Monte Carlo SE {pred['rr_monte_carlo_se']:.1e})"
    )
    lines.append(
        "final full-batch risk (mean over seeds): "
        + "; ".join(
            f"lr {per['learning_rate']:g}: GD {per['final_risk_mean']['gd']:.4f} SS "
            f"{per['final_risk_mean']['single_shuffle']:.4f} RR "
            f"{per['final_risk_mean']['random_reshuffle']:.4f}"
            for per in reg["per_rate"]
        )
        + f"; optimum {reg['optimal_risk']['gd']:.4f}"
    )
    sep = cls["separable"]
    lines.append(
        f"Classification: n={cls['num_examples']}, d={cls['dim']}, class shift "
        f"{cls['class_shift']:g}, "
        f"B={cls['batch_size']}, lr={cls['learning_rate']:g}; diverged = full-batch risk > "
        f"{cls['divergence_loss']:g} or non-finite"
    )
    lines.append(
        "{:>18s} {:>9s} {:>22s} {:>20s} {:>9s} {:>16s} {:>11s}".format(
            "scheme",
            "diverged",
            "divergence epochs",
            "final risk (range)",
            "max risk",
            "growth/e-fold",
            "final |M,c|",
        )
    )
    for name, r in cls["schemes"].items():
        epochs = ",".join("-" if e is None else str(e) for e in r["divergence_epoch"])
        lines.append(
            f"{name:>18s} {sum(r['diverged']):>4d}/{len(r['diverged']):<4d} {epochs:>22s} "
            f"{np.min(r['final_risk']):9.3f}..{np.max(r['final_risk']):<9.3f} "
            f"{np.max(r['max_risk']):9.3f} {np.min(r['risk_growth_per_efold']):+7.3f}.."
            f"{np.max(r['risk_growth_per_efold']):+7.3f} "
            f"{np.max(r['final_end_to_end_norm']):11.2f}"
        )
    lines.append(
        f"weakly separable: original {sep['original']}; SS partitions "
        f"{sum(sep['single_shuffle'])}/{len(sep['single_shuffle'])}; union of all "
        f"{sep['union_batches']} batches (RR) {sep['random_reshuffle_union']}"
    )
    return "\n".join(lines)


def _draw_runs(axis: Any, rows: Any, color: str, name: str) -> None:
    """One line per run, only its finite positive points; the first carries the label, with the
    number of points left out over all the runs."""
    curves = []
    for row in rows:
        row = np.asarray(row, float)
        epochs, values, _, dropped = common.finite_curve(np.arange(1, len(row) + 1), row)
        curves.append((epochs, values, dropped))
    total = sum(c[2] for c in curves)
    for s, (epochs, values, _) in enumerate(curves):
        label = common.not_shown(name, total) if s == 0 else None
        axis.plot(epochs, values, color=color, lw=0.8, label=label)


def draw(curves: dict[str, Any], metrics: dict[str, Any], config: ConfigDict, path) -> None:
    """Risk and distance curves, and the distortion against the learning rate, on log axes: only
    finite, positive points are drawn; a curve with points left out (a diverged run) says how
    many in its legend label."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    colors = {"gd": "k", "single_shuffle": "tab:red", "random_reshuffle": "tab:blue"}
    reg, seeds = curves["regression"], config.num_seeds
    last = len(reg["rates"]) - 1  # smallest-rate runs are the last block (rate-major)
    block = slice(last * seeds, (last + 1) * seeds)
    for name in SCHEMES:
        _draw_runs(axes[0], np.asarray(reg["risk"][name], float)[block], colors[name], name)
        _draw_runs(
            axes[1], np.asarray(reg["to_gd_optimum"][name], float)[block], colors[name], name
        )
    common.log_level(
        axes[0],
        metrics["regression"]["optimal_risk"]["gd"],
        color="0.5",
        ls=":",
        label="GD optimum",
    )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="epoch (GD: as many steps)",
        ylabel="full-batch risk",
        title=f"regression, lr {reg['rates'][last]:g}",
    )
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="epoch",
        ylabel="|theta - theta*_GD| / |theta*_GD|",
        title="distance to GD's optimum",
    )
    per_rate = metrics["regression"]["per_rate"]
    rates = [p["learning_rate"] for p in per_rate]
    for key, color, label in (
        ("ss_gd", "tab:red", "SS-GD"),
        ("rr_gd", "tab:blue", "RR-GD"),
        ("ss_rr", "tab:purple", "SS-RR"),
        ("ss_to_optimum", "tab:orange", "SS-SS*"),
        ("rr_to_optimum", "tab:cyan", "RR-RR*"),
    ):
        xs, ys, err, dropped = common.finite_curve(
            rates,
            [np.nan if p["mean"][key] is None else p["mean"][key] for p in per_rate],
            [np.nan if p["std"][key] is None else p["std"][key] for p in per_rate],
        )
        axes[2].errorbar(
            xs, ys, err, color=color, marker="o", capsize=3, label=common.not_shown(label, dropped)
        )
    axes[2].set(
        xscale="log",
        yscale="log",
        xlabel="learning rate",
        ylabel="relative distance",
        title="distortion vs learning rate (mean±sd)",
    )
    cls = curves["classification"]
    for name in SCHEMES:
        _draw_runs(axes[3], cls["risk"][name], colors[name], name)
    common.log_level(
        axes[3],
        config.classification.divergence_loss,
        color="0.5",
        ls=":",
        label="divergence threshold",
    )
    axes[3].set(
        yscale="log", xlabel="epoch", ylabel="full-batch risk", title="classification: SS diverges"
    )
    for axis in axes:
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    common.save_figure(fig, path)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run both studies; write metrics.json, the CSVs, table.txt and figure.png; return the
    metrics."""
    validate(config)
    folder = common.results_folder(config, NAME)
    base = jax.random.key(config.seed)
    task_keys = [
        jax.vmap(lambda s, t=t: jax.random.fold_in(jax.random.fold_in(base, t), s))(
            jnp.arange(config.num_seeds)
        )
        for t in range(2)
    ]
    reg_metrics, reg_curves = regression_study(config, task_keys[0])
    cls_metrics, cls_curves = classification_study(config, task_keys[1])
    metrics = {
        "devices": common.seed_devices(config),  # the run axis was split over these
        "regression": reg_metrics,
        "classification": cls_metrics,
    }
    table = format_table(metrics)
    rates, seeds = reg_curves["rates"], config.num_seeds
    common.write_csv(
        folder / "regression.csv",
        [
            "learning_rate",
            "seed",
            "ss_gd",
            "rr_gd",
            "ss_rr",
            "gd_to_optimum",
            "ss_to_optimum",
            "rr_to_optimum",
        ],
        [
            [p["learning_rate"], s]
            + [
                p["distances"][k][s]
                for k in (
                    "ss_gd",
                    "rr_gd",
                    "ss_rr",
                    "gd_to_optimum",
                    "ss_to_optimum",
                    "rr_to_optimum",
                )
            ]
            for p in reg_metrics["per_rate"]
            for s in range(seeds)
        ],
    )
    rows = []
    for name in SCHEMES:
        for run_index, row in enumerate(reg_curves["risk"][name]):
            rate = rates[run_index // seeds]
            rows += [
                ["regression", name, rate, run_index % seeds, e + 1, v] for e, v in enumerate(row)
            ]
        for s, row in enumerate(cls_curves["risk"][name]):
            rows += [
                ["classification", name, config.classification.learning_rate, s, e + 1, v]
                for e, v in enumerate(row)
            ]
    common.write_csv(
        folder / "curves.csv",
        ["task", "scheme", "learning_rate", "seed", "epoch", "full_batch_risk"],
        rows,
    )
    return common.finish(
        folder,
        table,
        metrics,
        lambda path: draw(
            {"regression": reg_curves, "classification": cls_curves}, metrics, config, path
        ),
    )


if __name__ == "__main__":
    common.main(run, validate)
