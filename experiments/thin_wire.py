r"""The thin wire: digits networks trained by 8 workers under communication-efficient methods.

``n`` workers (``num_workers``, 8 by default) each hold a contiguous shard of the training set
of scikit-learn's 8×8 digits (train 1536 / test 261 examples, read through the TFDS builder
:func:`shufflesgd.nn.data.load_source`, pixels scaled to ``[0, 1]``; sklearn's order cycles
through the classes, so every shard holds every digit) and minimise the mean softmax
cross-entropy of a :class:`shufflesgd.nn.models.MLP` (or, with ``model="cnn"``, the small
:class:`shufflesgd.nn.models.CNN`).  Each step every worker takes a
minibatch of ``batch_size`` examples of its own shard in **random-reshuffling** order
(Mishchenko, Khaled, Richtárik 2020): worker :math:`i`'s order in its epoch :math:`e` is
``permutation(fold_in(fold_in(data_key, i), e))`` of its shard, so step :math:`t` draws the
same batches whatever ran before (resumable, ``fold_in`` randomness), and computes the
gradient of its minibatch loss at the shared model.  The methods differ in what a worker
sends:

* ``dp`` -- uncompressed data parallel: the mean of the worker gradients, SGD with heavy-ball
  momentum (``optax.sgd(lr, momentum)``); :math:`32 d` bits per worker and step;
* ``ef21_sgdm_topk`` -- EF21-SGDM (Fatkhullin, Tyurin, Richtárik 2023, Alg. 1) with Top-k of
  a fraction ``topk_fraction`` of all :math:`d` parameters (one vector, not leaf-wise):
  :math:`k(32 + \lceil\log_2 d\rceil)` bits;
* ``powersgd_ef14`` -- PowerSGD of rank ``powersgd_rank`` (Vogels, Karimireddy, Jaggi 2019),
  leaf by leaf, with EF14 error feedback (Seide et al. 2014; Karimireddy et al. 2019,
  Alg. 2): :math:`32 r (m + n)` bits per leaf viewed as an :math:`m\times n` matrix;
* ``demo`` -- DeMo (Peng, Quesnelle, Kingma 2024, Alg. 1), ``optax.chain(demo(n, beta,
  chunk, topk, sign), optax.scale(-lr))`` with :math:`\beta` = ``momentum``;
  :func:`shufflesgd.compression.demo_bits` bits;
* ``zeroth_order`` -- shared-randomness two-point zeroth-order SGD (Zelikman et al. 2023 on
  MeZO, Malladi et al. 2023): ``zo_num_directions`` directions, each projected gradient sent
  as ``zo_bits`` bits.  Its steps move the model along one random direction, so it gets its
  own budget ``zo_num_steps`` and step size; the table says so.

Bits are the methods' own counts: the sum over steps of ``info.bits_up`` (EF methods,
zeroth order; plus ``method.initial_bits``), and :math:`32 d` or ``demo_bits`` per step for
the optax methods.  The server's broadcast is not counted.

**Seeds and pairing.**  Seed ``s`` gives every method the same initial network and the same
data orders, so the differences against ``dp`` are paired and their standard errors are
those of the per-seed differences.  All ``num_seeds`` seeds of a method run in one
``jax.jit(jax.vmap(run))`` call; ``run`` is a ``lax.scan`` over evaluations of a ``lax.scan``
over ``eval_every`` steps; the test loss and accuracy are recorded at step 0 (the untrained
network) and every ``eval_every`` steps, and the workers' mean minibatch loss every step.
A run whose loss goes non-finite is not stopped: ``first_nonfinite_step`` (per seed, ``None``
when finite throughout) records the first step whose loss was not finite.

**Sharding.**  The sweep runs on a 2-D mesh ``("seeds", "workers")`` of ``devices`` ×
``num_devices`` devices (:func:`sweep_mesh`): the seed keys are split over ``"seeds"`` and
the worker shards over ``"workers"`` (``jax.jit`` ``in_shardings``), and the per-worker
batches and gradients carry ``jax.lax.with_sharding_constraint`` to the worker sharding
(``vmap``'s ``spmd_axis_name`` adds the seed axis), so the per-worker states derived from
them (EF memories and momenta, DeMo momenta) stay with their worker and seed; only the mean of
the messages crosses devices, within a seed's row of the mesh.  Every key is ``fold_in`` of a
worker index, so the result equals the one-device run up to the order of floating-point sums
(the tests check 1 against 8 worker devices, and 2 seed × 4 worker devices).

Written: ``metrics.json`` (per method: final test loss/accuracy mean ± SE, bits per worker,
paired differences against ``dp``, curves, first non-finite step), ``results.csv`` (one row
per method), ``per_seed.npz`` (``<method>/<curve>``, leading seed axis), ``table.txt``
(printed) and ``figure.png`` (test accuracy against total bits per worker, log x, ± 1 SE;
test loss against steps).

Run: ``python -m experiments.thin_wire --config configs/thin_wire.py`` (``:quick`` for the
demo; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import math
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
from shufflesgd import parallel
from shufflesgd.compression import (
    FLOAT_BITS,
    Compressor,
    ErrorFeedback,
    check_tree,
    demo,
    demo_bits,
    ef14,
    ef21_sgdm,
    power_sgd,
    threshold_top_k,
    tree_bits,
    zeroth_order,
)
from shufflesgd.compression.zeroth_order import MAX_BITS
from shufflesgd.nn import data, models

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "thin_wire"
REFERENCE = "dp"  # the paired differences are taken against uncompressed data parallel
METHODS = ("dp", "ef21_sgdm_topk", "powersgd_ef14", "demo", "zeroth_order")
MODELS = ("mlp", "cnn")
LABELS = {
    "dp": "DP (uncompressed)",
    "ef21_sgdm_topk": "EF21-SGDM + Top-k",
    "powersgd_ef14": "PowerSGD + EF14",
    "demo": "DeMo",
    "zeroth_order": "zeroth order",
}
CURVES = ("train_loss", "test_loss", "test_accuracy")
INPUT_SHAPE = (1, 8, 8, 1)
Arrays = dict[str, jax.Array]
PyTree = Any


class Curves(NamedTuple):
    """One run's record (a leading seed axis when vmapped).

    Attributes:
      train_loss: ``[num_steps]``, the workers' mean minibatch loss at each step's model
        (zeroth order: the mean of its perturbed losses).
      test_loss: ``[num_steps // eval_every + 1]``, mean test cross-entropy at steps
        ``0, eval_every, ...``.
      test_accuracy: same steps, fraction of the test set classified correctly.
      bits_up: ``[num_steps]``, bits one worker sent at each step.
    """

    train_loss: jax.Array
    test_loss: jax.Array
    test_accuracy: jax.Array
    bits_up: jax.Array


def worker_shards(train: dict[str, Any], num_workers: int) -> dict[str, Any]:
    """The training set cut into ``num_workers`` contiguous shards: leaves ``[n, N/n, ...]``."""
    return {k: v.reshape(num_workers, -1, *v.shape[1:]) for k, v in train.items()}


def build_model(config: ConfigDict) -> models.Model:
    """``config.model``: the MLP of widths ``config.hidden`` or the small CNN of
    ``config.channels`` (3×3 convolutions, no BatchNorm: the workers share no statistics)."""
    if config.model == "cnn":
        return models.CNN(channels=tuple(config.channels), num_classes=10)
    return models.MLP(hidden=tuple(config.hidden), num_classes=10)


def param_shapes(config: ConfigDict) -> PyTree:
    """The network's parameters as ``ShapeDtypeStruct`` s (nothing is computed)."""
    model = build_model(config)
    params, _ = jax.eval_shape(
        lambda: models.init_model(model, jax.random.key(0), jnp.zeros(INPUT_SHAPE, jnp.float32))
    )
    return params


def num_params(config: ConfigDict) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(param_shapes(config)))


def method_steps(config: ConfigDict, method: str) -> int:
    """The step budget of ``method``: ``zo_num_steps`` for zeroth order, else ``num_steps``."""
    return config.zo_num_steps if method == "zeroth_order" else config.num_steps


def bits_per_step(config: ConfigDict, method: str) -> int:
    """Bits one worker sends a step, from each method's own count."""
    params = param_shapes(config)
    if method == "dp":
        return FLOAT_BITS * num_params(config)
    if method == "demo":
        return demo_bits(params, config.demo_chunk, config.demo_topk)
    if method == "zeroth_order":
        return config.zo_num_directions * config.zo_bits
    compressor, leafwise = _compressor(config, method)
    return tree_bits(compressor, params, leafwise)


def _compressor(config: ConfigDict, method: str) -> tuple[Compressor, bool]:
    if method == "ef21_sgdm_topk":
        return threshold_top_k(fraction=config.topk_fraction), False
    return power_sgd(config.powersgd_rank), True


def ef_method(config: ConfigDict, method: str) -> ErrorFeedback:
    """EF21-SGDM with Top-k of the whole parameter vector, or EF14 with leaf-wise PowerSGD."""
    compressor, leafwise = _compressor(config, method)
    if method == "ef21_sgdm_topk":
        return ef21_sgdm(compressor, leafwise=leafwise)
    return ef14(compressor, leafwise=leafwise)


def hyper_parameters(config: ConfigDict, method: str) -> dict[str, jax.Array]:
    """The traced hyper-parameters of ``run`` (one compiled program serves any values)."""
    return {
        "learning_rate": jnp.float32(config.learning_rate[method]),
        "momentum": jnp.float32(config.momentum),
        "ef21_momentum": jnp.float32(config.ef21_momentum),
        "epsilon": jnp.float32(config.zo_epsilon),
        "radius": jnp.float32(config.zo_radius),
    }


def make_run(
    config: ConfigDict, method: str, mesh: jax.sharding.Mesh | None
) -> Callable[[jax.Array, dict[str, jax.Array], Arrays, Arrays], Curves]:
    r"""Build ``run(key, hyper, shards, test) -> Curves`` for one seed of ``method``.

    ``key`` splits into the network's initialisation key, the data key (worker orders) and
    the method's key (its ``init`` key and per-step keys ``fold_in(step_key, t)``).
    ``shards`` are the :func:`worker_shards`; ``hyper`` as :func:`hyper_parameters`.  With a
    ``mesh``, per-worker batches and gradients are constrained to the worker sharding.
    """
    model = build_model(config)
    n, batch_size = config.num_workers, config.batch_size
    num_steps, eval_every = method_steps(config, method), config.eval_every
    step_bits = bits_per_step(config, method)

    def constrain(tree: PyTree) -> PyTree:
        if mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, parallel.worker_sharding(mesh))

    def loss_fn(params: PyTree, batch: Arrays) -> jax.Array:
        logits, _ = models.apply_model(model, params, {}, batch["image"], train=False)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))

    def evaluate(params: PyTree, test: Arrays) -> tuple[jax.Array, jax.Array]:
        logits, _ = models.apply_model(model, params, {}, test["image"], train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, test["label"])
        return jnp.mean(loss), jnp.mean(jnp.argmax(logits, -1) == test["label"])

    def minibatches(data_key: jax.Array, shards: Arrays, t: jax.Array) -> Arrays:
        shard_size = shards["label"].shape[1]
        epoch, position = jnp.divmod(t, shard_size // batch_size)

        def one(worker: jax.Array, shard: Arrays) -> Arrays:
            epoch_key = jax.random.fold_in(jax.random.fold_in(data_key, worker), epoch)
            order = jax.random.permutation(epoch_key, shard_size)
            rows = jax.lax.dynamic_slice_in_dim(order, position * batch_size, batch_size)
            return jax.tree.map(lambda leaf: leaf[rows], shard)

        return constrain(jax.vmap(one)(jnp.arange(n), shards))

    def worker_gradients(params: PyTree, batches: Arrays) -> tuple[jax.Array, PyTree]:
        losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, batches)
        return jnp.mean(losses), constrain(grads)

    def run(key: jax.Array, hyper: dict[str, jax.Array], shards: Arrays, test: Arrays) -> Curves:
        init_key, data_key, method_key = jax.random.split(key, 3)
        method_init_key, step_key = jax.random.split(method_key)
        params, _ = models.init_model(model, init_key, test["image"][:1])
        lr = hyper["learning_rate"]

        if method in ("dp", "demo"):
            if method == "dp":
                optimizer = optax.sgd(lr, momentum=hyper["momentum"])
                reduce = lambda grads: jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)  # noqa: E731
            else:
                optimizer = optax.chain(
                    demo(
                        n, hyper["momentum"], config.demo_chunk, config.demo_topk, config.demo_sign
                    ),
                    optax.scale(-lr),
                )
                reduce = lambda grads: grads  # noqa: E731  (DeMo takes the worker axis)
            state = (params, optimizer.init(params))

            def step(state: Any, t: jax.Array) -> tuple[Any, tuple[jax.Array, jax.Array]]:
                params, opt_state = state
                loss, grads = worker_gradients(params, minibatches(data_key, shards, t))
                updates, opt_state = optimizer.update(reduce(grads), opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), (
                    loss,
                    jnp.float32(step_bits),
                )

            get_params = lambda state: state[0]  # noqa: E731
        elif method == "zeroth_order":
            zeroth = zeroth_order(
                loss_fn, num_directions=config.zo_num_directions, bits=config.zo_bits
            )
            state = zeroth.init(method_init_key, params)

            def step(state: Any, t: jax.Array) -> tuple[Any, tuple[jax.Array, jax.Array]]:
                state, info = zeroth.step(
                    jax.random.fold_in(step_key, t),
                    state,
                    minibatches(data_key, shards, t),
                    lr,
                    hyper["epsilon"],
                    hyper["radius"],
                )
                return state, (info.loss, info.bits_up.astype(jnp.float32))

            get_params = lambda state: state.params  # noqa: E731
        else:
            algorithm = ef_method(config, method)
            extra = (hyper["ef21_momentum"],) if method == "ef21_sgdm_topk" else ()
            state = algorithm.init(method_init_key, params, n)

            def step(state: Any, t: jax.Array) -> tuple[Any, tuple[jax.Array, jax.Array]]:
                loss, grads = worker_gradients(state.x, minibatches(data_key, shards, t))
                state, info = algorithm.step(
                    jax.random.fold_in(step_key, t), state, grads, lr, *extra
                )
                return state, (loss, info.bits_up)

            get_params = lambda state: state.x  # noqa: E731

        def block(state: Any, first: jax.Array) -> tuple[Any, tuple[jax.Array, ...]]:
            state, (losses, bits) = jax.lax.scan(step, state, first + jnp.arange(eval_every))
            return state, (losses, bits, *evaluate(get_params(state), test))

        starts = jnp.arange(0, num_steps, eval_every)
        _, (losses, bits, test_loss, test_accuracy) = jax.lax.scan(block, state, starts)
        loss0, accuracy0 = evaluate(params, test)
        return Curves(
            train_loss=losses.reshape(-1),
            test_loss=jnp.concatenate([loss0[None], test_loss]),
            test_accuracy=jnp.concatenate([accuracy0[None], test_accuracy]),
            bits_up=bits.reshape(-1),
        )

    return run


def seed_keys(config: ConfigDict) -> jax.Array:
    """The ``num_seeds`` keys, the same for every method (common random numbers)."""
    return jax.random.split(jax.random.key(config.seed), config.num_seeds)


def devices_used(config: ConfigDict) -> int:
    """``config.num_devices``, or (``None``) the most available devices dividing the workers."""
    if config.num_devices is not None:
        return config.num_devices
    available = jax.device_count()
    return max(k for k in range(1, available + 1) if config.num_workers % k == 0)


def seed_devices(config: ConfigDict) -> int:
    """How many devices the seed axis is split over (the rows of :func:`sweep_mesh`, each of
    :func:`devices_used` worker devices): ``config.devices``, or (``None``) the most of
    ``available // devices_used`` that divide ``config.num_seeds``.  ``ValueError`` naming
    ``config.devices`` when it is not a positive int, does not divide ``config.num_seeds``, or
    times the worker devices exceeds the devices available."""
    workers = devices_used(config)
    available = jax.device_count()
    if config.devices is None:
        return max(k for k in range(1, available // workers + 1) if config.num_seeds % k == 0)
    devices = common.seed_devices(config)  # a positive int, at most available, divides seeds
    if devices * workers > available:
        raise ValueError(
            f"config.devices={devices} seed devices times {workers} worker devices "
            f"(config.num_devices) exceeds the {available} available devices"
        )
    return devices


def sweep_mesh(config: ConfigDict) -> jax.sharding.Mesh | None:
    """The 2-D mesh ``("seeds", "workers")`` of :func:`seed_devices` × :func:`devices_used`
    devices, the first of :func:`jax.devices` in row-major order; ``None`` on one device."""
    shape = (seed_devices(config), devices_used(config))
    if shape == (1, 1):
        return None
    devices = np.array(jax.devices()[: shape[0] * shape[1]]).reshape(shape)
    auto = jax.sharding.AxisType.Auto
    return jax.sharding.Mesh(devices, (common.SEEDS, parallel.WORKERS), axis_types=(auto, auto))


def sweep_program(
    config: ConfigDict, method: str, train: Arrays
) -> tuple[Callable[..., Curves], Arrays]:
    """``(jitted, shards)``: the jitted, seed-vmapped ``run`` of ``method`` and the worker
    shards placed for it.  On more than one device (:func:`sweep_mesh`) the keys' seed axis is
    split over the mesh axis ``"seeds"``, the shards' worker axis over ``"workers"``
    (``in_shardings``; the per-worker constraints of :func:`make_run` get the seed axis through
    ``vmap``'s ``spmd_axis_name``), the curves come back split over ``"seeds"`` and everything
    else is replicated.  Call ``jitted(seed_keys(config), hyper_parameters(config, method),
    shards, test)``."""
    mesh = sweep_mesh(config)
    shards = worker_shards(train, config.num_workers)
    if mesh is None:
        sweep = jax.vmap(make_run(config, method, None), in_axes=(0, None, None, None))
        return jax.jit(sweep), shards
    sweep = jax.vmap(
        make_run(config, method, mesh), in_axes=(0, None, None, None), spmd_axis_name=common.SEEDS
    )
    rep = parallel.replicated(mesh)
    by_seed = parallel.worker_sharding(mesh, common.SEEDS)
    jitted = jax.jit(
        sweep,
        in_shardings=(by_seed, rep, parallel.worker_sharding(mesh), rep),
        out_shardings=by_seed,
    )
    return jitted, parallel.shard_workers(mesh, shards)


def run_seeds(config: ConfigDict, method: str, train: Arrays, test: Arrays) -> Curves:
    """All ``config.num_seeds`` seeds of ``method`` in one jitted, vmapped call (leading seed
    axis), the seed axis split over :func:`seed_devices` devices and the worker axis over
    :func:`devices_used` devices (:func:`sweep_program`)."""
    jitted, shards = sweep_program(config, method, train)
    return jax.block_until_ready(
        jitted(seed_keys(config), hyper_parameters(config, method), shards, test)
    )


def first_nonfinite(losses: np.ndarray) -> list[int | None]:
    """Per seed (rows), the first step whose loss is not finite, or ``None``."""
    bad = ~np.isfinite(losses)
    return [int(np.argmax(row)) if row.any() else None for row in bad]


def summarise(values: np.ndarray) -> dict[str, Any]:
    """Mean and Monte Carlo standard error over seeds (axis 0)."""
    mean, stderr = common.mean_and_stderr(values)
    return {"mean": mean.tolist(), "stderr": stderr.tolist()}


def validate(config: ConfigDict) -> None:
    """Check every field before any data is read or anything compiles."""
    methods = common.check_names("methods", config.methods, METHODS)
    if REFERENCE not in methods:
        raise ValueError(
            f"config.methods must include {REFERENCE!r}, the reference of the paired differences"
        )
    common.check_choice("model", config.model, MODELS)
    common.check_positive_ints("hidden", list(config.hidden))
    common.check_positive_ints("channels", list(config.channels))
    for field in (
        "num_workers",
        "batch_size",
        "num_steps",
        "eval_every",
        "num_seeds",
        "zo_num_steps",
        "zo_num_directions",
        "powersgd_rank",
        "demo_chunk",
        "demo_topk",
    ):
        common.check_positive_ints(field, config[field])
    if isinstance(config.seed, bool) or not isinstance(config.seed, int):
        raise ValueError(f"config.seed must be an int, got {config.seed!r}")
    if config.num_seeds < 2:
        raise ValueError(
            f"config.num_seeds must be at least 2 for a standard error, got {config.num_seeds}"
        )
    total = data.DIGITS_NUM_TRAIN
    if total % config.num_workers:
        raise ValueError(
            f"config.num_workers must divide the {total} training examples, "
            f"got {config.num_workers}"
        )
    shard = total // config.num_workers
    if config.batch_size > shard or shard % config.batch_size:
        raise ValueError(
            f"config.batch_size must divide each worker's {shard} examples, got {config.batch_size}"
        )
    for field in ("num_steps", "zo_num_steps"):
        if config[field] % config.eval_every:
            raise ValueError(
                f"config.eval_every must divide config.{field}={config[field]}, "
                f"got {config.eval_every}"
            )
    for method in methods:
        if method not in config.learning_rate:
            raise ValueError(f"config.learning_rate.{method} is missing")
        common.check_positive_number(f"learning_rate.{method}", config.learning_rate[method])
    momentum = config.momentum
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise ValueError(f"config.momentum must lie in [0, 1), got {momentum!r}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"config.momentum must lie in [0, 1), got {momentum!r}")
    common.check_fraction("ef21_momentum", config.ef21_momentum)
    common.check_fraction("topk_fraction", config.topk_fraction)
    if config.demo_topk > config.demo_chunk:
        raise ValueError(
            f"config.demo_topk must be at most config.demo_chunk={config.demo_chunk}, "
            f"got {config.demo_topk}"
        )
    if "demo" in methods:
        try:
            demo_bits(param_shapes(config), config.demo_chunk, config.demo_topk)
        except ValueError as error:
            raise ValueError(f"config.demo_chunk: {error}") from error
    if not isinstance(config.demo_sign, bool):
        raise ValueError(f"config.demo_sign must be True or False, got {config.demo_sign!r}")
    if not isinstance(config.zo_bits, int) or isinstance(config.zo_bits, bool):
        raise ValueError(f"config.zo_bits must be an int in [1, {MAX_BITS}]")
    if not 1 <= config.zo_bits <= MAX_BITS:
        raise ValueError(f"config.zo_bits must lie in [1, {MAX_BITS}], got {config.zo_bits}")
    common.check_positive_number("zo_epsilon", config.zo_epsilon)
    common.check_positive_number("zo_radius", config.zo_radius)
    try:
        check_tree(power_sgd(config.powersgd_rank), param_shapes(config), True)
    except ValueError as error:
        raise ValueError(f"config.powersgd_rank: {error}") from error
    if config.num_devices is not None:
        common.check_positive_ints("num_devices", config.num_devices)
        if config.num_devices > jax.device_count():
            raise ValueError(
                f"config.num_devices must be at most the {jax.device_count()} devices "
                f"available, got {config.num_devices}"
            )
        if config.num_workers % config.num_devices:
            raise ValueError(
                f"config.num_devices must divide config.num_workers={config.num_workers}, "
                f"got {config.num_devices}"
            )
    seed_devices(config)
    common.check_optional_path("data_dir", config.data_dir)


def format_table(metrics: dict[str, Any]) -> str:
    """Per method: steps, bits per worker, final test loss and accuracy (mean ± SE) and the
    paired differences against ``dp``; then the untrained network's accuracy."""
    header = (
        f"{'method':<18s} {'steps':>6s} {'bits/worker':>11s} {'test loss':>17s} "
        f"{'test acc, %':>13s} {'Δloss vs dp':>17s} {'Δacc vs dp, pts':>15s}  diverged"
    )
    lines = [
        f"digits {metrics['model'].upper()}, {metrics['num_workers']} workers; mean ± SE over "
        f"{metrics['num_seeds']} "
        "seeds (paired differences: same seed, same init and data order)",
        header,
    ]
    for method, result in metrics["methods"].items():
        loss, acc = result["final_test_loss"], result["final_test_accuracy"]
        diff = result.get("vs_reference")
        dloss = (
            f"{diff['final_test_loss']['mean']:+.4f} ± {diff['final_test_loss']['stderr']:.4f}"
            if diff
            else "-"
        )
        dacc = (
            f"{100 * diff['final_test_accuracy']['mean']:+.2f} ± "
            f"{100 * diff['final_test_accuracy']['stderr']:.2f}"
            if diff
            else "-"
        )
        bad = [s for s in result["first_nonfinite_step"] if s is not None]
        lines.append(
            f"{method:<18s} {result['num_steps']:>6d} {result['bits_per_worker']:>11.3e} "
            f"{loss['mean']:7.4f} ± {loss['stderr']:6.4f} "
            f"{100 * acc['mean']:6.2f} ± {100 * acc['stderr']:4.2f} {dloss:>17s} {dacc:>15s}  "
            + (f"{len(bad)} seeds, first at step {min(bad)}" if bad else "no")
        )
    lines.append(
        f"untrained network: test accuracy {100 * metrics['untrained_test_accuracy']:.2f} %; "
        "zeroth_order runs its own step budget (zo_num_steps) and step size"
    )
    return "\n".join(lines)


def draw(metrics: dict[str, Any], path: pathlib.Path) -> None:
    """Left: final test accuracy against total bits per worker (log x, ± 1 SE), one marker
    per method.  Right: test loss against steps (symlog x, log y), ± 1 SE bands; non-finite
    points are left out and counted in the legend."""
    fig, (pareto, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, result in metrics["methods"].items():
        acc = result["final_test_accuracy"]
        pareto.errorbar(
            result["bits_per_worker"],
            100 * acc["mean"],
            yerr=100 * acc["stderr"],
            marker="o",
            capsize=3,
            ls="none",
            label=LABELS[method],
        )
        steps, mean, stderr, dropped = common.finite_curve(
            result["eval_steps"], result["test_loss"]["mean"], result["test_loss"]["stderr"]
        )
        (line,) = curves.plot(steps, mean, lw=1.2, label=common.not_shown(LABELS[method], dropped))
        curves.fill_between(
            steps, mean - stderr, mean + stderr, color=line.get_color(), alpha=0.25, lw=0
        )
    pareto.axhline(
        100 * metrics["untrained_test_accuracy"], color="grey", ls=":", label="untrained"
    )
    pareto.set(
        xscale="log",
        xlabel="total bits sent per worker",
        ylabel="final test accuracy (%)",
        title="accuracy against communication",
    )
    # symlog: linear up to the first evaluation, so step 0 (the untrained network) shows and
    # the short budgets are not squeezed against zeroth order's long one
    first = min(r["eval_steps"][1] for r in metrics["methods"].values())
    curves.set_xscale("symlog", linthresh=first)
    curves.set(xlabel="step (symlog)", ylabel="test cross-entropy", yscale="log", title="test loss")
    for axis in (pareto, curves):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(
        f"digits {metrics['model'].upper()}, {metrics['num_workers']} workers; mean ± SE over "
        f"{metrics['num_seeds']} seeds"
    )
    common.save_figure(fig, path)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table and the figure."""
    validate(config)
    train_np, test_np = data.scaled_digits(config.data_dir)
    train = {k: jnp.asarray(v) for k, v in train_np.items()}
    test = {k: jnp.asarray(v) for k, v in test_np.items()}
    folder = common.results_folder(config, NAME)
    metrics: dict[str, Any] = {
        "model": config.model,
        "num_workers": config.num_workers,
        "num_seeds": config.num_seeds,
        "num_devices": devices_used(config),  # the worker axis was split over these
        "devices": seed_devices(config),  # and the seed axis over these
        "num_params": num_params(config),
        "methods": {},
    }
    per_seed: dict[str, dict[str, np.ndarray]] = {}
    for method in tqdm(config.methods, desc=NAME):
        start = time.perf_counter()
        result = run_seeds(config, method, train, test)
        seconds = time.perf_counter() - start
        per_seed[method] = {name: np.asarray(getattr(result, name)) for name in CURVES}
        bits = np.asarray(result.bits_up, np.float64)
        initial = 0
        if method in ("ef21_sgdm_topk", "powersgd_ef14"):
            initial = ef_method(config, method).initial_bits(param_shapes(config))
        metrics["methods"][method] = {
            "num_steps": method_steps(config, method),
            "learning_rate": config.learning_rate[method],
            "bits_per_step": bits_per_step(config, method),
            "bits_per_worker": float(bits[0].sum()) + initial,
            "eval_steps": list(range(0, method_steps(config, method) + 1, config.eval_every)),
            "final_test_loss": summarise(per_seed[method]["test_loss"][:, -1]),
            "final_test_accuracy": summarise(per_seed[method]["test_accuracy"][:, -1]),
            "test_loss": summarise(per_seed[method]["test_loss"]),
            "test_accuracy": summarise(per_seed[method]["test_accuracy"]),
            "first_nonfinite_step": first_nonfinite(per_seed[method]["train_loss"]),
            "seconds": seconds,
        }
    metrics["untrained_test_accuracy"] = float(np.mean(per_seed[REFERENCE]["test_accuracy"][:, 0]))
    for method, values in per_seed.items():
        if method != REFERENCE:
            metrics["methods"][method]["vs_reference"] = {
                f"final_{name}": summarise(values[name][:, -1] - per_seed[REFERENCE][name][:, -1])
                for name in ("test_loss", "test_accuracy")
            }
    table = format_table(metrics)
    fields = ("final_test_loss", "final_test_accuracy")
    common.write_csv(
        folder / "results.csv",
        [
            "method",
            "num_steps",
            "bits_per_worker",
            *(f"{f}_{s}" for f in fields for s in ("mean", "stderr")),
            *(f"{f}_vs_dp_{s}" for f in fields for s in ("mean", "stderr")),
        ],
        [
            [
                method,
                r["num_steps"],
                r["bits_per_worker"],
                *(r[f][s] for f in fields for s in ("mean", "stderr")),
                *(
                    r["vs_reference"][f][s] if "vs_reference" in r else 0.0
                    for f in fields
                    for s in ("mean", "stderr")
                ),
            ]
            for method, r in metrics["methods"].items()
        ],
    )
    np.savez(
        folder / "per_seed.npz",
        **{f"{m}/{name}": v for m, curves in per_seed.items() for name, v in curves.items()},
    )
    return common.finish(folder, table, metrics, lambda path: draw(metrics, path))


if __name__ == "__main__":
    common.main(run, validate)
