r"""The ``lax.scan`` drivers that run every family's steps and epochs.

Every stateful algorithm of the library is an ``(init, step)`` pair whose
``step(key, state, *args) -> (state, info)`` takes its PRNG key first.  This module runs them,
so no family writes its own loop:

* :func:`scan_steps` -- steps :math:`t = s, \dots, s + T - 1` of ``step`` with the keys
  :math:`\mathrm{fold\_in}(\text{key}, t)` (an MCMC chain, an error-feedback run on full
  gradients).
* :func:`scan_epoch` / :func:`scan_epochs` -- shuffled epochs.  Epoch :math:`k` asks a
  :class:`~shufflesgd.shuffling.schemes.ShufflingScheme` for its order :math:`\sigma_k` with the
  epoch key :math:`\mathrm{fold\_in}(\text{scheme\_key}, k)` (:func:`epoch_order`), cuts it into
  the consecutive minibatches :math:`B_{k,0}, \dots, B_{k,S-1}` of :func:`minibatches`, and
  scans a *batch step* ``step(key, state, indices, *args) -> (state, info, grads)`` over them
  with keys :math:`\mathrm{fold\_in}(\text{step\_key}, kS + j)`.  ``grads`` holds the batch's
  per-example gradients (leading axis the batch); when the scheme herds
  (``scheme.uses_gradients``: GraB, Lu, Guo & De Sa 2022) the driver feeds them to
  ``scheme.observe`` in visiting order (:func:`observe_batch`), otherwise it may be ``None``.
  :func:`visit_batch` is that one batch, for loops that stream their batches from Python.

Every key is ``fold_in`` of a fixed key and a counter, so a run resumed at step or epoch
:math:`s` (``start=s``) draws exactly what the uninterrupted run drew, and the programs
compile once whatever the number of steps.  A ``scheme_key`` with leading axes runs one
scheme per entry (per worker of a distributed run, each shuffling its own examples): the
orders are drawn entry by entry and each batch is ``int32[*axes, batch_size]``.

Also here: :func:`check_batch_size`, :func:`first_nonfinite` and :func:`check_learning_rate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from shufflesgd._checks import check_int, check_positive_finite

if TYPE_CHECKING:
    from shufflesgd.shuffling.schemes import ShufflingScheme

PyTree = Any


#: ``step(key, state, *args) -> (state, info)``, what :func:`scan_steps` runs.
Step = Callable[..., tuple[PyTree, PyTree]]


#: ``step(key, state, indices, *args) -> (state, info, grads)``, what the epoch drivers run;
#: ``grads`` are the batch's per-example gradients (``None`` unless the scheme herds).
BatchStep = Callable[..., tuple[PyTree, PyTree, PyTree]]


def first_nonfinite(values: jax.Array) -> jax.Array:
    """Index of the first non-finite entry along the last axis, or ``-1`` if all are finite."""
    bad = ~jnp.isfinite(values)
    return jnp.where(bad.any(axis=-1), jnp.argmax(bad, axis=-1), -1)


def check_learning_rate(learning_rate: Any) -> None:
    """``ValueError`` for a learning rate that is not positive and finite (no-op on tracers)."""
    check_positive_finite(learning_rate=learning_rate)


def check_batch_size(epoch_length: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Validate ``batch_size`` for epochs of ``epoch_length`` indices; return batches per epoch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be a Python int, got {type(batch_size).__name__}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got batch_size={batch_size}")
    if batch_size > epoch_length:
        raise ValueError(f"batch_size={batch_size} exceeds the {epoch_length} examples of an epoch")
    if epoch_length % batch_size and not drop_remainder:
        raise ValueError(
            f"batch_size={batch_size} does not divide the epoch length {epoch_length}; "
            "pass drop_remainder=True to drop the last partial batch"
        )
    return epoch_length // batch_size


def minibatches(order: jax.Array, batch_size: int, drop_remainder: bool = False) -> jax.Array:
    """Reshape an epoch order into ``int32[num_batches, batch_size]`` consecutive batches."""
    num_batches = check_batch_size(order.shape[0], batch_size, drop_remainder)
    return order[: num_batches * batch_size].reshape(num_batches, batch_size)


def _key_axes(key: jax.Array) -> int:
    """The number of leading (per-worker) axes of ``key``: its batch dimensions."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim
    return key.ndim - 1  # a raw uint32 key carries its key data on the last axis


def _over_axes(fn: Callable[..., Any], axes: int) -> Callable[..., Any]:
    """``fn`` vmapped over ``axes`` leading axes of every argument."""
    for _ in range(axes):
        fn = jax.vmap(fn)
    return fn


def scan_steps(
    step: Step,
    key: jax.Array,
    state: PyTree,
    num_steps: int,
    *args: Any,
    start: int | jax.Array = 0,
) -> tuple[PyTree, PyTree]:
    """``num_steps`` steps of ``step(fold_in(key, t), state, *args) -> (state, info)``.

    ``t`` runs over ``start, ..., start + num_steps - 1``, so a run resumed from the state after
    ``s`` steps with ``start=s`` draws the keys of the uninterrupted run; ``start`` may be
    traced.  Returns the final state and the stacked infos (leading axis ``num_steps``).
    ``args`` (hyper-parameters) are passed unchanged to every step.
    """
    num_steps = check_int("num_steps", num_steps, minimum=0)

    def body(state: PyTree, t: jax.Array) -> tuple[PyTree, PyTree]:
        return step(jax.random.fold_in(key, t), state, *args)

    return jax.lax.scan(body, state, start + jnp.arange(num_steps))


def epoch_order(
    scheme: ShufflingScheme, key: jax.Array, scheme_state: PyTree, epoch: int | jax.Array
) -> tuple[PyTree, jax.Array]:
    """``scheme.step(fold_in(key, epoch), scheme_state)``: the scheme's state and epoch order.

    With leading axes on ``key`` (and on ``scheme_state``), one order per entry:
    ``int32[*axes, epoch_length]``.
    """

    def draw(key: jax.Array, scheme_state: PyTree) -> tuple[PyTree, jax.Array]:
        return scheme.step(jax.random.fold_in(key, epoch), scheme_state)

    return _over_axes(draw, _key_axes(key))(key, scheme_state)


def observe_batch(
    scheme: ShufflingScheme, scheme_state: PyTree, indices: jax.Array, grads: PyTree
) -> PyTree:
    """Feed ``grads[i]``, the gradient of example ``indices[i]``, to ``scheme.observe`` for
    ``i = 0, 1, ...`` (visiting order); the state unchanged for a scheme that does not herd.

    ``indices`` is ``int32[*axes, batch]`` and ``grads`` a pytree with leading axes
    ``[*axes, batch]``; the leading ``axes`` (one scheme per worker) are mapped over.
    Raises ``ValueError`` when the scheme herds and ``grads`` is ``None``.
    """
    if not scheme.uses_gradients:
        return scheme_state
    if grads is None:
        raise ValueError(
            "the scheme herds gradients (scheme.uses_gradients) but the step "
            "returned grads=None; return the batch's per-example gradients"
        )

    def observe(scheme_state: PyTree, indices: jax.Array, grads: PyTree) -> PyTree:
        def one(scheme_state: PyTree, item: tuple[jax.Array, PyTree]) -> tuple[PyTree, None]:
            return scheme.observe(scheme_state, *item), None

        return jax.lax.scan(one, scheme_state, (indices, grads))[0]

    return _over_axes(observe, indices.ndim - 1)(scheme_state, indices, grads)


def visit_batch(
    step: BatchStep,
    scheme: ShufflingScheme,
    step_key: jax.Array | None,
    t: int | jax.Array,
    state: PyTree,
    scheme_state: PyTree,
    indices: jax.Array,
    *args: Any,
) -> tuple[PyTree, PyTree, PyTree]:
    """One batch of an epoch: ``step(fold_in(step_key, t), state, indices, *args)``, then the
    scheme observes the batch's per-example gradients.  Returns ``(state, scheme_state, info)``.

    ``step_key=None`` is for a deterministic step: it is passed ``key=None``.
    """
    key = None if step_key is None else jax.random.fold_in(step_key, t)
    state, info, grads = step(key, state, indices, *args)
    return state, observe_batch(scheme, scheme_state, indices, grads), info


def scan_epoch(
    step: BatchStep,
    scheme: ShufflingScheme,
    scheme_key: jax.Array,
    step_key: jax.Array | None,
    state: PyTree,
    scheme_state: PyTree,
    epoch: int | jax.Array,
    *args: Any,
    batch_size: int,
    drop_remainder: bool = False,
) -> tuple[PyTree, PyTree, jax.Array, PyTree]:
    """Epoch ``epoch`` as one ``lax.scan`` over the minibatches of the scheme's order.

    The order is :func:`epoch_order` with ``scheme_key``; batch ``j`` of the
    ``S = epoch_length // batch_size`` batches is :func:`visit_batch` at step
    ``t = epoch * S + j``.  ``epoch`` may be traced.  Returns the state, the scheme's state,
    the order (``int32[*axes, epoch_length]``) and the batch steps' infos (leading axis
    ``S``).  Raises ``ValueError`` naming ``batch_size`` when it does not divide the epoch
    length (unless ``drop_remainder``).
    """
    steps_per_epoch = check_batch_size(scheme.epoch_length, batch_size, drop_remainder)
    axes = _key_axes(scheme_key)
    scheme_state, order = epoch_order(scheme, scheme_key, scheme_state, epoch)
    batches = _over_axes(lambda o: minibatches(o, batch_size, drop_remainder), axes)(order)
    batches = jnp.moveaxis(batches, axes, 0)  # [S, *axes, batch_size]
    first = epoch * steps_per_epoch

    def body(carry: tuple[PyTree, PyTree], inputs: tuple[jax.Array, jax.Array]):
        (state, scheme_state), (j, indices) = carry, inputs
        state, scheme_state, info = visit_batch(
            step, scheme, step_key, first + j, state, scheme_state, indices, *args
        )
        return (state, scheme_state), info

    (state, scheme_state), infos = jax.lax.scan(
        body, (state, scheme_state), (jnp.arange(steps_per_epoch), batches)
    )
    return state, scheme_state, order, infos


def scan_epochs(
    step: BatchStep,
    scheme: ShufflingScheme,
    scheme_key: jax.Array,
    step_key: jax.Array | None,
    state: PyTree,
    scheme_state: PyTree,
    num_epochs: int,
    *args: Any,
    batch_size: int,
    start: int | jax.Array = 0,
    drop_remainder: bool = False,
    summary: Callable[[PyTree, PyTree], PyTree] | None = None,
) -> tuple[PyTree, PyTree, PyTree]:
    """Epochs ``start, ..., start + num_epochs - 1`` of :func:`scan_epoch`, in one ``lax.scan``.

    Returns ``(state, scheme_state, out)``.  Without ``summary``, ``out`` is every batch
    step's info (leading axis ``num_epochs * S``); with it, ``out`` is
    ``summary(state, infos)`` after each epoch, given the epoch's infos (leading axis
    ``num_epochs``; memory then stays flat in the number of steps).  A run resumed from the
    states after ``s`` epochs with ``start=s`` equals the uninterrupted run; ``start`` may be
    traced.
    """
    num_epochs = check_int("num_epochs", num_epochs, minimum=0)
    steps_per_epoch = check_batch_size(scheme.epoch_length, batch_size, drop_remainder)

    def body(carry: tuple[PyTree, PyTree], epoch: jax.Array):
        state, scheme_state = carry
        state, scheme_state, _, infos = scan_epoch(
            step,
            scheme,
            scheme_key,
            step_key,
            state,
            scheme_state,
            epoch,
            *args,
            batch_size=batch_size,
            drop_remainder=drop_remainder,
        )
        return (state, scheme_state), (infos if summary is None else summary(state, infos))

    epochs = start + jnp.arange(num_epochs)
    (state, scheme_state), out = jax.lax.scan(body, (state, scheme_state), epochs)
    if summary is None:
        out = jax.tree.map(lambda a: a.reshape((num_epochs * steps_per_epoch,) + a.shape[2:]), out)
    return state, scheme_state, out
