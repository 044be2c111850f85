r"""Training Flax networks on real data, one shuffling-scheme epoch at a time.

Three layers, each usable alone:

1. **Losses** (:func:`cross_entropy_loss`, :func:`denoising_score_matching_loss`) turn a
   model (see :mod:`shufflesgd.nn.models`) into a pure
   ``loss_fn(params, batch_stats, batch, key, train) -> (losses [B], (new_batch_stats,
   metrics))`` with per-example losses and per-example metrics.
2. **The step** (:func:`make_train_step`) is the jitted pure function
   ``(params, opt_state, batch_stats, batch, key) -> ((params, opt_state, batch_stats),
   metrics)``: the gradient of the minibatch mean loss, one optax update.
3. **The epoch loop** (:func:`make_trainer`) threads a :class:`TrainState` (params,
   optimizer state, batch statistics, the shuffling scheme's state and key, the run's key
   and the step count) through the epochs: epoch ``k`` asks the scheme
   (:class:`~shufflesgd.shuffling.schemes.ShufflingScheme`) for its order with the key
   ``fold_in(scheme_key, k)``, reads exactly those examples from a
   :class:`~shufflesgd.nn.data.Source` batch by batch, and steps.  Step ``s`` draws its
   randomness from ``fold_in(key, s)`` (house rule 9), so a run resumed from a
   checkpoint at any epoch boundary replays the uninterrupted one bit for bit.  Herding
   schemes (GraB) are fed every example's gradient in visiting order through
   ``scheme.observe``.  The order, the keys and the observation are those of the epoch
   driver :mod:`shufflesgd.drivers`: ``scan_epoch`` is :func:`shufflesgd.drivers.scan_epoch`
   over in-memory arrays, and ``run_epoch`` streams the same batches from Python (a Grain
   pipeline, :func:`shufflesgd.nn.data.epoch_batches`) through
   :func:`shufflesgd.drivers.epoch_order` and :func:`shufflesgd.drivers.visit_batch`.

Data parallelism: given a mesh, every batch is placed on ``NamedSharding(mesh,
P('data'))`` and the state is replicated; the step is one ``jax.jit`` with those
shardings and XLA inserts the all-reduces (of gradients, and of BatchNorm's batch
moments, so BatchNorm sees the global batch and the result equals the single-device
run up to floating-point summation order).

Hyper-parameters: pass ``optax.inject_hyperparams(optax.sgd)(learning_rate=...)`` to keep
the learning rate a traced value in the optimizer state rather than a compiled constant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from shufflesgd import drivers, parallel
from shufflesgd._checks import check_int, check_key
from shufflesgd.diffusion.processes import MODEL_OUTPUTS, SDE, convert
from shufflesgd.nn import data as data_lib
from shufflesgd.nn.models import Model, apply_model
from shufflesgd.shuffling.schemes import ShufflingScheme

PyTree = Any


Batch = dict[str, jax.Array]


Metrics = dict[str, jax.Array]


LossFn = Callable[
    [PyTree, PyTree, Batch, jax.Array, bool], tuple[jax.Array, tuple[PyTree, Metrics]]
]


StepFn = Callable[
    [PyTree, optax.OptState, PyTree, Batch, jax.Array],
    tuple[tuple[PyTree, optax.OptState, PyTree], Metrics],
]


WEIGHTINGS = ("simple", "likelihood", "velocity")


_INDICES = "__indices__"  # the batch's example indices travel (and are sharded) with it


def cross_entropy_loss(
    model: Model, *, input_key: str = "image", label_key: str = "label"
) -> LossFn:
    r"""Softmax cross-entropy of a classifier: :math:`\ell_i = -\log\mathrm{softmax}(
    f_\theta(x_i))_{y_i}`, with the per-example ``accuracy`` as a metric.  The key is
    unused (the loss is deterministic)."""

    def loss_fn(
        params: PyTree, batch_stats: PyTree, batch: Batch, key: jax.Array, train: bool
    ) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
        del key
        logits, new_stats = apply_model(model, params, batch_stats, batch[input_key], train=train)
        labels = batch[label_key]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        accuracy = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return losses, (new_stats, {"accuracy": accuracy})

    return loss_fn


def denoising_score_matching_loss(
    model: Model,
    sde: SDE,
    *,
    prediction: str = "eps",
    weighting: str = "simple",
    input_key: str = "image",
) -> LossFn:
    r"""Denoising score matching for a linear forward SDE of :mod:`shufflesgd.diffusion.processes`.

    For each example draw :math:`t \sim U[t_{min}, t_{max}]` and :math:`\varepsilon \sim
    N(0, I)`, form :math:`x_t = \alpha(t) x_0 + \sigma(t)\varepsilon`, and read the network
    output (``prediction``, one of :data:`~shufflesgd.diffusion.MODEL_OUTPUTS`: ``score``,
    ``eps``, ``x0``, ``v`` or the flow-matching ``velocity``) as a score
    :math:`s_\theta(x_t, t)` through :func:`shufflesgd.diffusion.processes.convert`.  The
    per-example loss is (Vincent 2011; Song et al. 2021, Eq. 7)

    .. math:: \ell = \lambda(t)\,\|s_\theta(x_t, t) - \nabla\log p_{0t}(x_t|x_0)\|^2
              = \frac{\lambda(t)}{\sigma(t)^2}\,\|\hat\varepsilon_\theta - \varepsilon\|^2,

    since :math:`\nabla\log p_{0t} = -\varepsilon/\sigma`.  ``weighting="simple"`` takes
    :math:`\lambda = \sigma^2`, i.e. the :math:`\varepsilon`-MSE of Ho et al. (2020) and
    Song et al. (2021)'s default; ``weighting="likelihood"`` takes :math:`\lambda = g(t)^2`,
    for which Song, Durkan, Murray & Ermon (NeurIPS 2021), "Maximum Likelihood Training of
    Score-Based Diffusion Models", Thm. 1 gives
    :math:`D_{KL}(p_0\|p_\theta^{SDE}) \le \frac{t_{max}-t_{min}}{2}\,\mathbb E[\ell] +
    D_{KL}(p_T\|\pi)` (with :math:`t` uniform as here).  ``weighting="velocity"`` is the
    conditional flow-matching loss (Lipman et al. 2023, "Flow Matching for Generative
    Modeling", Eq. 9; Liu, Gong & Liu 2023, rectified flow, Eq. 1)
    :math:`\|\hat u_\theta(x_t, t) - (\dot\alpha x_0 + \dot\sigma\varepsilon)\|^2`, the
    network output read as a velocity; since :math:`\hat u - u = \frac{\dot\sigma\alpha -
    \dot\alpha\sigma}{\alpha}(\hat\varepsilon - \varepsilon)`, it is the score-matching loss with
    :math:`\lambda = \sigma^2(\dot\sigma\alpha - \dot\alpha\sigma)^2/\alpha^2`, computed
    directly so that it stays finite at :math:`\alpha = 0`.  The sum runs over all non-batch
    axes.  The key is split into the time and noise draws.
    """
    if prediction not in MODEL_OUTPUTS:
        raise ValueError(f"prediction must be one of {list(MODEL_OUTPUTS)}, got {prediction!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")

    def loss_fn(
        params: PyTree, batch_stats: PyTree, batch: Batch, key: jax.Array, train: bool
    ) -> tuple[jax.Array, tuple[PyTree, Metrics]]:
        x0 = batch[input_key]
        time_key, noise_key = jax.random.split(key)
        t = jax.random.uniform(time_key, x0.shape[:1], minval=sde.t_min, maxval=sde.t_max)
        eps = jax.random.normal(noise_key, x0.shape)
        t_b = t.reshape((-1,) + (1,) * (x0.ndim - 1))
        sigma = sde.sigma(t_b)
        x_t = sde.alpha(t_b) * x0 + sigma * eps
        output, new_stats = apply_model(model, params, batch_stats, x_t, t, train=train)
        if weighting == "velocity":
            target = sde.alpha_dot(t_b) * x0 + sde.sigma_dot(t_b) * eps
            error = convert(output, prediction, "velocity", x_t, t_b, sde) - target
        else:
            error = convert(output, prediction, "eps", x_t, t_b, sde) - eps
        squared_error = jnp.sum(error**2, axis=tuple(range(1, x0.ndim)))
        if weighting == "likelihood":
            squared_error = squared_error * sde.diffusion_squared(t) / sde.sigma(t) ** 2
        return squared_error, (new_stats, {})

    return loss_fn


def _gradients(
    loss_fn: LossFn,
    params: PyTree,
    batch_stats: PyTree,
    batch: Batch,
    key: jax.Array,
    per_example: bool,
) -> tuple[PyTree, PyTree, PyTree, Metrics]:
    """``(mean gradient, per-example gradients or None, new batch stats, metrics)``.

    Per example, the Jacobian of the loss vector :math:`(\\ell_1, \\dots, \\ell_B)` is
    taken: row ``i`` is :math:`\\nabla_\\theta \\ell_i` (with BatchNorm, through the batch
    moments that couple the examples), and the rows average to the minibatch gradient.
    """

    def losses(p: PyTree) -> tuple[jax.Array, tuple[jax.Array, PyTree, Metrics]]:
        values, (new_stats, metrics) = loss_fn(p, batch_stats, batch, key, True)
        return values, (values, new_stats, metrics)

    def mean_loss(p: PyTree) -> tuple[jax.Array, tuple[jax.Array, PyTree, Metrics]]:
        values, aux = losses(p)
        return jnp.mean(values), aux

    if per_example:
        example_grads, (values, new_stats, metrics) = jax.jacrev(losses, has_aux=True)(params)
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), example_grads)
    else:
        grads, (values, new_stats, metrics) = jax.grad(mean_loss, has_aux=True)(params)
        example_grads = None
    metrics = {
        "loss": jnp.mean(values),
        "grad_norm": optax.tree.norm(grads),
        **{name: jnp.mean(value) for name, value in metrics.items()},
    }
    return grads, example_grads, new_stats, metrics


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> StepFn:
    r"""The jitted pure step ``(params, opt_state, batch_stats, batch, key) ->
    ((params, opt_state, batch_stats), metrics)``.

    :math:`g = \nabla_\theta \frac1B\sum_{i\in B}\ell_i(\theta)` (BatchNorm in training
    mode, its running averages updated), then ``optimizer.update`` and
    ``optax.apply_updates``.  ``metrics`` holds the batch mean ``loss``, ``grad_norm``
    :math:`\|g\|` and the batch means of the loss's own metrics.
    """

    @jax.jit
    def train_step(
        params: PyTree, opt_state: optax.OptState, batch_stats: PyTree, batch: Batch, key: jax.Array
    ) -> tuple[tuple[PyTree, optax.OptState, PyTree], Metrics]:
        grads, _, new_stats, metrics = _gradients(loss_fn, params, batch_stats, batch, key, False)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, new_stats), metrics

    return train_step


class TrainState(NamedTuple):
    """Everything a run carries between steps (and what a checkpoint saves).

    Attributes:
      params: the model parameters.
      opt_state: the optax state.
      batch_stats: BatchNorm running averages (``{}`` without BatchNorm).
      scheme_state: the shuffling scheme's state (its epoch count, or GraB's orders).
      scheme_key: the scheme's key; epoch ``k``'s order uses ``fold_in(scheme_key, k)``.
      key: the run's key; step ``s`` uses ``fold_in(key, s)``.
      step: the number of steps taken (``int32`` scalar).
    """

    params: PyTree
    opt_state: optax.OptState
    batch_stats: PyTree
    scheme_state: PyTree
    scheme_key: jax.Array
    key: jax.Array
    step: jax.Array


def init_train_state(
    key: jax.Array,
    params: PyTree,
    batch_stats: PyTree,
    optimizer: optax.GradientTransformation,
    scheme: ShufflingScheme,
) -> TrainState:
    """A fresh :class:`TrainState`; ``key`` is split into the scheme's key and the run's
    (``TypeError`` naming ``key`` unless it is a PRNG key)."""
    check_key("key", key)
    scheme_key, run_key = jax.random.split(key)
    return TrainState(
        params,
        optimizer.init(params),
        batch_stats,
        scheme.init(scheme_key, params),
        scheme_key,
        run_key,
        jnp.zeros((), jnp.int32),
    )


class Trainer(NamedTuple):
    """The epoch loop of :func:`make_trainer`.

    Attributes:
      step: jitted ``(state, batch, indices) -> (state, metrics)``, one minibatch.
      run_epoch: ``(state, source) -> (state, metrics)``, one epoch in the scheme's order;
        ``metrics`` maps each name to a NumPy array with one value per step.
      train: ``(state, source, num_epochs, callback=None) -> (state, history)``; runs
        epochs until ``num_epochs`` are complete (so a restored state resumes where it
        stopped) and calls ``callback(epoch, state, metrics)`` after each (1-based count
        of completed epochs: the hook for progress bars, metric files and checkpoints);
        ``history`` lists the per-epoch metrics of the epochs it ran.
      scan_epoch: ``(state, arrays) -> (state, order, metrics)``, one epoch over in-memory
        arrays (a dict of arrays indexed by example) as a single ``lax.scan`` over the
        minibatches: pure, so it can be jitted, scanned over epochs and vmapped over seeds;
        ``order`` is the epoch's visiting order and ``metrics`` maps each name to an array
        with one value per step.  The same orders, keys and steps as ``run_epoch``, through
        :func:`shufflesgd.drivers.scan_epoch` (single device; on XLA:CPU convolution
        gradients run slower inside a scan than as separate dispatches).
      evaluate: ``(state, source, key, batch_size) -> metrics``; the example-weighted means
        over all of ``source`` in index order, BatchNorm in evaluation mode.
      completed_epochs: ``state -> int``, the number of finished epochs.
      place: ``state -> state`` on the mesh (replicated), or unchanged without one.
      steps_per_epoch: minibatches per epoch.
    """

    step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]
    run_epoch: Callable[[TrainState, data_lib.Source], tuple[TrainState, dict[str, np.ndarray]]]
    scan_epoch: Callable[[TrainState, Batch], tuple[TrainState, jax.Array, Metrics]]
    train: Callable[..., tuple[TrainState, list[dict[str, np.ndarray]]]]
    evaluate: Callable[..., dict[str, float]]
    completed_epochs: Callable[[TrainState], int]
    place: Callable[[TrainState], TrainState]
    steps_per_epoch: int


def make_trainer(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    scheme: ShufflingScheme,
    *,
    batch_size: int,
    drop_remainder: bool = False,
    mesh: Mesh | None = None,
    axis: str = parallel.DATA_AXIS,
    prefetch: int = 2,
) -> Trainer:
    r"""Build the epoch loop that trains with ``loss_fn`` in ``scheme``'s orders.

    Epoch :math:`k` visits the order :math:`\sigma_k` that ``scheme.step`` draws with the key
    ``fold_in(state.scheme_key, k)``; one step on its minibatch :math:`B_j` is
    :func:`make_train_step`'s update with key ``fold_in(state.key, state.step)``; a herding
    scheme (``scheme.uses_gradients``) also gets :math:`\nabla\ell_i` for each
    :math:`i \in B_j`, in visiting order, through ``scheme.observe`` (GraB; Lu, Guo & De Sa
    2022).  With ``mesh``, batches are split over ``axis`` and the state is replicated.
    ``run_epoch`` reads its batches through :func:`shufflesgd.nn.data.epoch_batches` (Grain,
    ``prefetch`` batches read ahead); with ``mesh``, each process reads only the rows of each
    batch that its own devices hold (:func:`shufflesgd.parallel.process_rows`).

    Raises ``ValueError`` before compiling: naming ``batch_size`` when it does not divide
    the epoch length (unless ``drop_remainder``) or is not divisible by the mesh axis, and
    naming ``axis`` when the mesh lacks it, and naming ``prefetch`` unless it is a
    non-negative int.
    """
    steps_per_epoch = drivers.check_batch_size(scheme.epoch_length, batch_size, drop_remainder)
    prefetch = check_int("prefetch", prefetch, minimum=0)
    if mesh is not None:
        parallel.check_data_axis(mesh, axis, batch_size)

    def update(
        key: jax.Array, state: TrainState, indices: jax.Array, batch: Batch
    ) -> tuple[TrainState, Metrics, PyTree]:
        """The driver's batch step: one optax update; the per-example gradients when herding."""
        del indices
        grads, example_grads, new_stats, metrics = _gradients(
            loss_fn, state.params, state.batch_stats, batch, key, scheme.uses_gradients
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state._replace(
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            batch_stats=new_stats,
            step=state.step + 1,
        )
        return new_state, metrics, example_grads

    # The driver threads the scheme's state beside the run's, so it is taken out of the
    # TrainState for the epoch (one copy in the loop carry) and put back after it.
    def state_step(
        state: TrainState, batch: Batch, indices: jax.Array
    ) -> tuple[TrainState, Metrics]:
        inner, scheme_state, metrics = drivers.visit_batch(
            update,
            scheme,
            state.key,
            state.step,
            state._replace(scheme_state=None),
            state.scheme_state,
            indices,
            batch,
        )
        return inner._replace(scheme_state=scheme_state), metrics

    def order_of(state: TrainState) -> tuple[PyTree, jax.Array]:
        epoch = state.step // steps_per_epoch
        return drivers.epoch_order(scheme, state.scheme_key, state.scheme_state, epoch)

    def eval_sums(params: PyTree, batch_stats: PyTree, batch: Batch, key: jax.Array) -> Metrics:
        values, (_, metrics) = loss_fn(params, batch_stats, batch, key, False)
        return {"loss": jnp.sum(values), **{name: jnp.sum(v) for name, v in metrics.items()}}

    eval_sums = jax.jit(eval_sums)
    if mesh is None:
        step = jax.jit(state_step)
        next_order = jax.jit(order_of)
        place = lambda state: state
        place_batch = lambda batch: batch
        share = {"process_index": 0, "process_count": 1}
    else:
        rep = parallel.replicated(mesh)
        step = jax.jit(state_step, out_shardings=rep)
        next_order = jax.jit(order_of, out_shardings=rep)
        place = lambda state: parallel.put_replicated(mesh, state)
        place_batch = lambda batch: parallel.shard_process_rows(mesh, batch, axis)
        # This process reads only the rows of each global batch that its devices hold: one
        # contiguous block of the batch (parallel.process_rows), the loader's process share.
        rows = parallel.process_rows(mesh, batch_size, axis)
        if rows.stop == rows.start:
            raise ValueError(f"mesh has no devices of this process on axis {axis!r}")
        share = {
            "process_index": rows.start // (rows.stop - rows.start),
            "process_count": batch_size // (rows.stop - rows.start),
        }

    def completed_epochs(state: TrainState) -> int:
        return int(state.step) // steps_per_epoch

    def run_epoch(
        state: TrainState, source: data_lib.Source
    ) -> tuple[TrainState, dict[str, np.ndarray]]:
        if len(source) != scheme.num_examples:
            raise ValueError(
                f"source has {len(source)} examples but scheme is over {scheme.num_examples}"
            )
        state = place(state)
        scheme_state, order = next_order(state)
        state = state._replace(scheme_state=scheme_state)
        history = []
        batches = data_lib.epoch_batches(
            source, order, batch_size, drop_remainder, **share, prefetch=prefetch
        )
        for indices, batch in batches:
            placed = place_batch({**batch, _INDICES: indices.astype(np.int32)})
            indices = placed.pop(_INDICES)
            state, metrics = step(state, placed, indices)
            history.append(metrics)
        return state, {
            name: np.asarray(jnp.stack([m[name] for m in history])) for name in history[0]
        }

    def scan_epoch(state: TrainState, arrays: Batch) -> tuple[TrainState, jax.Array, Metrics]:
        def gather(key: jax.Array, state: TrainState, indices: jax.Array, arrays: Batch):
            batch = {name: value[indices] for name, value in arrays.items()}
            return update(key, state, indices, batch)

        inner, scheme_state, order, metrics = drivers.scan_epoch(
            gather,
            scheme,
            state.scheme_key,
            state.key,
            state._replace(scheme_state=None),
            state.scheme_state,
            state.step // steps_per_epoch,
            arrays,
            batch_size=batch_size,
            drop_remainder=drop_remainder,
        )
        return inner._replace(scheme_state=scheme_state), order, metrics

    def train(
        state: TrainState,
        source: data_lib.Source,
        num_epochs: int,
        callback: Callable[[int, TrainState, dict[str, np.ndarray]], None] | None = None,
    ) -> tuple[TrainState, list[dict[str, np.ndarray]]]:
        check_int("num_epochs", num_epochs, minimum=0)
        history = []
        for epoch in range(completed_epochs(state), num_epochs):
            state, metrics = run_epoch(state, source)
            history.append(metrics)
            if callback is not None:
                callback(epoch + 1, state, metrics)
        return state, history

    def evaluate(
        state: TrainState, source: data_lib.Source, key: jax.Array, batch_size: int = 256
    ) -> dict[str, float]:
        totals: dict[str, float] = {}
        starts = range(0, len(source), batch_size)
        for number, start in enumerate(starts):
            batch = source[np.arange(start, min(start + batch_size, len(source)))]
            sums = eval_sums(
                state.params, state.batch_stats, batch, jax.random.fold_in(key, number)
            )
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        return {name: value / len(source) for name, value in totals.items()}

    return Trainer(
        step, run_epoch, scan_epoch, train, evaluate, completed_epochs, place, steps_per_epoch
    )
