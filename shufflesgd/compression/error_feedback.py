r"""Error feedback for compressed distributed gradient methods, as ``(init, step)`` pairs.

``n`` workers hold :math:`f_1, \dots, f_n` and minimise :math:`f = \frac1n\sum_i f_i`;
each step every worker sends the server a compressed message.  Sent naively
(:func:`compressed_gd`) a biased compressor can make gradient descent diverge; error
feedback keeps, per worker, a memory of what compression lost and feeds it back:

* EF14 / EF-SGD (Seide et al. 2014; Karimireddy, Rebjock, Stich, Jaggi 2019, Alg. 2)
  accumulates the error :math:`e_i` of the compressed steps;
* EF21 (Richtárik, Sokolov, Fatkhullin 2021, Alg. 1) keeps a gradient estimate
  :math:`g_i` and sends :math:`C(\nabla f_i(x) - g_i)`; its variants EF21-W (Richtárik,
  Gasanov, Burlachenko 2024, Alg. 2), EF21-PP and EF21-BC (Fatkhullin, Sokolov, Gorbunov,
  Li, Richtárik 2021, Algs. 4-5) weight the workers, let them skip steps, or compress the
  downlink too;
* EF21-SGDM (Fatkhullin, Tyurin, Richtárik 2023, Alg. 1) runs EF21 on a per-worker
  momentum average of the stochastic gradients, EF21-HB (Fatkhullin et al. 2021, Alg. 6)
  puts heavy-ball momentum on the server's step.

Each method is an :class:`ErrorFeedback` over an :class:`EFState` whose per-worker fields
carry a leading axis ``n``:

* ``init(key, x0, num_workers, worker_grads=None, *hyper) -> state``, where
  ``worker_grads`` (the ``[n, ...]`` gradients of the :math:`f_i` at ``x0``) is needed only
  by an EF21 method started from the local gradients (``initial_memory``);
* ``step(key, state, worker_grads, step_size, *hyper) -> (state, info)`` with
  ``worker_grads`` the ``[n, ...]`` gradients of the :math:`f_i` at the model ``state.x``
  and ``info`` an :class:`EFInfo` (bits sent, participants).

``hyper`` are the method's own hyper-parameters after the step size (EF21-W's ``weights``,
EF21-PP's ``participation``, EF21-SGDM's and EF21-HB's ``momentum``;
``ErrorFeedback.hyper`` names them).  Like the step size they are traced arguments, so one
compiled program serves a ``vmap`` over them; concrete values are checked by
``ErrorFeedback.check`` (:func:`check_weights`, :func:`check_participation`,
:func:`check_momentum`), traced ones are the caller's to check.

Per-worker work is ``vmap``-ped over the leading axis and the only cross-worker operation
is the average of the compressed messages, so the same step runs on one device or with the
worker axis sharded over a mesh (:mod:`shufflesgd.compression.sharded`).  Per-worker
randomness is ``fold_in(key, worker)``, independent of how workers are laid out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from shufflesgd._checks import (
    check_float_array,
    check_int,
    check_key,
    check_positive_finite,
    is_concrete,
)
from shufflesgd.compression.base import (
    FLOAT_BITS,
    Compressor,
    compress_tree,
    init_tree,
    tree_bits,
)

PyTree = Any

INITIAL_MEMORIES = ("zero", "gradient", "compressed_gradient")


class EFState(NamedTuple):
    """State of an error-feedback method (``None`` for the fields a method does not use).

    Attributes:
      x: the model (the same on the server and every worker).
      broadcast: the gradient estimate the server broadcasts compressed (EF21-BC), else
        ``None``.
      memory: per-worker ``[n, ...]`` memory: ``g_i`` (EF21 family) or the error ``e_i``
        (EF14).
      estimate: the server's gradient estimate, the (weighted) mean of the ``g_i`` (EF21
        family).
      compressor_state: per-worker compressor states (PowerSGD's factor), leading axis ``n``.
      server_compressor_state: the downlink compressor's state (EF21-BC).
      step: number of steps taken.
      momentum: EF21-SGDM's per-worker ``[n, ...]`` momentum averages :math:`v_i`, or
        EF21-HB's heavy-ball direction :math:`v` (shaped like ``x``); else ``None``.
    """

    x: PyTree
    broadcast: PyTree
    memory: PyTree
    estimate: PyTree
    compressor_state: PyTree
    server_compressor_state: PyTree
    step: jax.Array
    momentum: PyTree = None


class EFInfo(NamedTuple):
    """Diagnostics of one step.

    Attributes:
      bits_up: bits sent by one worker this step, averaged over workers.
      bits_down: bits broadcast by the server this step.
      participants: how many workers sent a message.
    """

    bits_up: jax.Array
    bits_down: jax.Array
    participants: jax.Array


class ErrorFeedback(NamedTuple):
    """A compressed distributed method (see the module doc).

    Attributes:
      name: what it is, for tables.
      init: ``(key, x0, num_workers, worker_grads=None, *hyper) -> EFState``.
      step: ``(key, state, worker_grads, step_size, *hyper) -> (EFState, EFInfo)``.
      hyper: the names of the hyper-parameters ``step`` takes after ``step_size``:
        ``("weights",)`` for EF21-W, ``("participation",)`` for EF21-PP,
        ``("momentum",)`` for EF21-SGDM and EF21-HB, else ``()``.
      check: ``(num_workers, *hyper) -> None``: ``TypeError`` for a wrong number of
        hyper-parameters, ``ValueError`` (naming it) for a bad one; values are checked only
        when concrete.
      initial_bits: ``x0 -> bits`` that one worker sends before the first step to give the
        server its starting memory (``0`` unless an EF21 method starts from the local
        gradients; see :func:`ef21`).  Not counted in any :class:`EFInfo`; the distributed
        runs add it to their cumulative ``bits_up``.
    """

    name: str
    init: Callable[..., EFState]
    step: Callable[..., tuple[EFState, EFInfo]]
    hyper: tuple[str, ...]
    check: Callable[..., None]
    initial_bits: Callable[[PyTree], int]


def worker_keys(key: jax.Array, num_workers: int) -> jax.Array:
    """``fold_in(key, i)`` for each worker ``i``: a worker's randomness is its own."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_workers))


def check_weights(weights: Any, num_workers: int) -> None:
    """``ValueError`` unless ``weights`` (EF21-W's :math:`w_i`) has ``num_workers`` entries
    along its last axis, and, when concrete, each vector is positive and sums to 1.

    Leading axes are a sweep's stack of weight vectors (check it before ``vmap``-ping a run
    over it); a traced value's entries cannot be inspected and are the caller's to check.
    """
    num_workers = check_int("num_workers", num_workers)
    shape = tuple(np.shape(weights))
    if shape[-1:] != (num_workers,):
        raise ValueError(
            f"weights must have shape ({num_workers},) for num_workers={num_workers}, got {shape}"
        )
    if not is_concrete(weights):
        return
    values = np.asarray(weights, np.float64)
    if not np.all(values > 0):
        raise ValueError(f"weights must be positive, got weights={values}")
    totals = values.sum(axis=-1)
    if not np.allclose(totals, 1.0, rtol=1e-5, atol=0.0):
        raise ValueError(f"weights must sum to 1, got sums {totals}")


def _check_unit_interval(name: str, value: Any, *, heavy_ball: bool = False) -> None:
    """``ValueError`` unless every entry of a concrete ``value`` lies in :math:`(0, 1]`, or
    in :math:`[0, 1)` with ``heavy_ball=True``; a traced value is skipped."""
    if not is_concrete(value):
        return
    values = np.asarray(value, np.float64)
    if heavy_ball:
        inside, interval = (values >= 0.0) & (values < 1.0), "[0, 1)"
    else:
        inside, interval = (values > 0.0) & (values <= 1.0), "(0, 1]"
    if not np.all(inside):
        raise ValueError(f"{name} must lie in {interval}, got {name}={value}")


def check_participation(participation: Any) -> None:
    """``ValueError`` unless every entry of a concrete ``participation`` (EF21-PP's
    probability :math:`p`, or a sweep's array of them) lies in :math:`(0, 1]`; a traced
    value is the caller's to check."""
    _check_unit_interval("participation", participation)


def check_momentum(momentum: Any, *, heavy_ball: bool = False) -> None:
    """``ValueError`` unless every entry of a concrete ``momentum`` (or a sweep's array of
    them) lies in :math:`(0, 1]`, EF21-SGDM's averaging weight :math:`\\eta` (``1``: no
    averaging), or with ``heavy_ball=True`` in :math:`[0, 1)`, EF21-HB's :math:`\\eta`
    (``0``: no momentum); a traced value is the caller's to check."""
    _check_unit_interval("momentum", momentum, heavy_ball=heavy_ball)


def _check_hyper_count(name: str, hyper: tuple[str, ...], values: tuple[Any, ...]) -> None:
    if len(values) != len(hyper):
        raise TypeError(
            f"{name} takes the hyper-parameters {hyper} after step_size, got {len(values)} value(s)"
        )


def _check_scalar(name: str, value: Any) -> None:
    if np.shape(value) != ():
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")


def _stack(tree: PyTree, num_workers: int) -> PyTree:
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (num_workers, *jnp.shape(leaf))), tree)


def _zeros_per_worker(x: PyTree, num_workers: int) -> PyTree:
    return _stack(optax.tree.zeros_like(x), num_workers)


def mean_over_workers(tree: PyTree, weights: jax.Array | None = None) -> PyTree:
    """The (weighted) average over the leading worker axis of every leaf (what the server
    of a distributed run computes from the workers' messages), written as a contraction with a
    weight vector: on XLA:CPU ``jnp.mean(axis=0)`` over many workers of long vectors lowers
    to a much slower fusion than the dot (see the benchmarks' README)."""

    def average(leaf: jax.Array) -> jax.Array:
        w = (
            jnp.full(leaf.shape[:1], 1.0 / leaf.shape[0], leaf.dtype)
            if weights is None
            else weights
        )
        return jnp.tensordot(w, leaf, axes=1, precision=jax.lax.Precision.HIGHEST)

    return jax.tree.map(average, tree)


def _over_workers(vector: jax.Array, leaf: jax.Array) -> jax.Array:
    """A per-worker ``[n]`` vector shaped to broadcast against an ``[n, ...]`` leaf."""
    return vector.reshape(vector.shape + (1,) * (leaf.ndim - 1))


def _scale_by_weights(grads: PyTree, weights: jax.Array) -> PyTree:
    """EF21-W's local targets :math:`\\nabla f_i / (n w_i)`."""
    n = _num_workers(grads)
    return jax.tree.map(lambda g: g / (n * _over_workers(weights, g)), grads)


def _num_workers(tree: PyTree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def _compress_each(
    compressor: Compressor, keys: jax.Array, states: PyTree, vectors: PyTree, leafwise: bool
) -> tuple[PyTree, PyTree]:
    return jax.vmap(lambda k, s, v: compress_tree(compressor, k, s, v, leafwise))(
        keys, states, vectors
    )


def _init_compressor_states(
    compressor: Compressor, key: jax.Array, x0: PyTree, num_workers: int, leafwise: bool
) -> PyTree:
    return jax.vmap(lambda k: init_tree(compressor, k, x0, leafwise))(worker_keys(key, num_workers))


def _check_worker_grads(worker_grads: PyTree, x0: PyTree, num_workers: int, why: str) -> None:
    """``ValueError`` naming ``worker_grads`` when missing or not ``[n, ...]`` per leaf of
    ``x0``."""
    if worker_grads is None:
        raise ValueError(
            f"{why} starts from the workers' gradients at x0: pass worker_grads, "
            f"their [num_workers, ...] stack"
        )
    leaves, treedef = jax.tree.flatten(x0)
    grad_leaves, grad_treedef = jax.tree.flatten(worker_grads)
    expected = [(num_workers, *np.shape(leaf)) for leaf in leaves]
    got = [tuple(np.shape(leaf)) for leaf in grad_leaves]
    if grad_treedef != treedef or got != expected:
        raise ValueError(
            f"worker_grads must be shaped like x0 with a leading axis of "
            f"num_workers={num_workers}: expected leaves {expected}, got {got}"
        )


def _check_init(key: Any, x0: PyTree) -> None:
    """``TypeError`` unless ``key`` is a PRNG key and ``x0`` is floating."""
    check_key("key", key)
    check_float_array("x0", x0)


def _check_step(key: Any, state: EFState, grads: PyTree, step_size: Any) -> None:
    """Check a step's arguments in Python, before tracing: ``key`` a PRNG key, ``grads`` the
    workers' float gradients stacked as ``[num_workers, *x.shape]`` per leaf of ``state.x``
    (``num_workers`` read from the memory when the method keeps one), and a concrete
    ``step_size`` positive and finite."""
    check_key("key", key)
    check_float_array("grads", grads)
    leaves, treedef = jax.tree.flatten(state.x)
    grad_leaves, grad_treedef = jax.tree.flatten(grads)
    got = [tuple(np.shape(leaf)) for leaf in grad_leaves]
    memory = jax.tree.leaves(state.memory)
    n = np.shape(memory[0])[0] if memory else (got[0][0] if got and got[0] else None)
    expected = [(n, *np.shape(leaf)) for leaf in leaves]
    if grad_treedef != treedef or got != expected:
        raise ValueError(
            f"grads must be the workers' gradients stacked as [num_workers, *x.shape] per leaf "
            f"of state.x (num_workers={n}): expected {expected}, got {got}"
        )
    check_positive_finite(step_size=step_size)


def _uplink_bits(compressor: Compressor, x: PyTree, leafwise: bool) -> int:
    return tree_bits(compressor, x, leafwise)


def _dense_bits(x: PyTree) -> int:
    return FLOAT_BITS * sum(int(np.size(leaf)) for leaf in jax.tree.leaves(x))


def _no_bits(x: PyTree) -> int:
    del x
    return 0


def _info(bits_up: Any, bits_down: Any, participants: Any) -> EFInfo:
    return EFInfo(
        jnp.asarray(bits_up, jnp.float32),
        jnp.asarray(bits_down, jnp.float32),
        jnp.asarray(participants, jnp.int32),
    )


def _sgd_update(x: PyTree, direction: PyTree, step_size: jax.Array) -> PyTree:
    return jax.tree.map(lambda p, g: p - step_size * g, x, direction)


def _without_hyper(name: str) -> Callable[..., None]:
    """The ``check`` of a method that takes no hyper-parameters besides the step size."""

    def check(num_workers: int, *values: Any) -> None:
        check_int("num_workers", num_workers)
        _check_hyper_count(name, (), values)

    return check


def compressed_gd(compressor: Compressor, *, leafwise: bool = False) -> ErrorFeedback:
    r"""Distributed compressed gradient descent, no error feedback:
    :math:`x \leftarrow x - \gamma\frac1n\sum_i C(\nabla f_i(x))`.

    With a biased compressor such as Top-k this can diverge even on strongly convex
    quadratics (Beznosikov, Horváth, Richtárik, Safaryan 2020, "On Biased Compression for
    Distributed Learning", Example 1), which error feedback repairs.  With an unbiased
    compressor it is DCGD (Khirirat, Feyzmahdavian, Johansson 2018).  It has no memory, so
    ``init`` ignores ``worker_grads``.
    """
    check = _without_hyper("compressed_gd")

    def init(
        key: jax.Array, x0: PyTree, num_workers: int, worker_grads: PyTree = None, *hyper: Any
    ) -> EFState:
        _check_init(key, x0)
        check(num_workers, *hyper)
        states = _init_compressor_states(compressor, key, x0, num_workers, leafwise)
        return EFState(x0, None, None, None, states, None, jnp.zeros((), jnp.int32), None)

    def step(
        key: jax.Array, state: EFState, grads: PyTree, step_size: jax.Array, *hyper: Any
    ) -> tuple[EFState, EFInfo]:
        _check_hyper_count("compressed_gd", (), hyper)
        _check_step(key, state, grads, step_size)
        n = _num_workers(grads)
        states, messages = _compress_each(
            compressor, worker_keys(key, n), state.compressor_state, grads, leafwise
        )
        x = _sgd_update(state.x, mean_over_workers(messages), step_size)
        new = state._replace(x=x, compressor_state=states, step=state.step + 1)
        return new, _info(_uplink_bits(compressor, state.x, leafwise), _dense_bits(state.x), n)

    return ErrorFeedback("compressed_gd", init, step, (), check, _no_bits)


def ef14(compressor: Compressor, *, leafwise: bool = False) -> ErrorFeedback:
    r"""EF14 / EF-SGD: error accumulation.

    Seide et al. (2014), "1-Bit Stochastic Gradient Descent ..."; Karimireddy, Rebjock,
    Stich, Jaggi (ICML 2019), "Error Feedback Fixes SignSGD", Alg. 2 (EF-SGD); Stich &
    Karimireddy (2020), distributed form.  Each worker keeps the error :math:`e_i`:

    .. math:: p_i = \gamma\nabla f_i(x) + e_i,\quad c_i = C(p_i),\quad e_i \leftarrow p_i - c_i,
              \quad x \leftarrow x - \tfrac1n\textstyle\sum_i c_i.

    The errors start at :math:`e_i = 0` (``init`` ignores ``worker_grads``).  The step size
    enters before compression, so ``step_size`` must be the same every step for the error
    to stay consistent.  With stochastic gradients this is EF-SGD.
    """
    check = _without_hyper("ef14")

    def init(
        key: jax.Array, x0: PyTree, num_workers: int, worker_grads: PyTree = None, *hyper: Any
    ) -> EFState:
        _check_init(key, x0)
        check(num_workers, *hyper)
        states = _init_compressor_states(compressor, key, x0, num_workers, leafwise)
        return EFState(
            x0,
            None,
            _zeros_per_worker(x0, num_workers),
            None,
            states,
            None,
            jnp.zeros((), jnp.int32),
            None,
        )

    def step(
        key: jax.Array, state: EFState, grads: PyTree, step_size: jax.Array, *hyper: Any
    ) -> tuple[EFState, EFInfo]:
        _check_hyper_count("ef14", (), hyper)
        _check_step(key, state, grads, step_size)
        n = _num_workers(grads)
        corrected = jax.tree.map(lambda g, e: step_size * g + e, grads, state.memory)
        states, messages = _compress_each(
            compressor, worker_keys(key, n), state.compressor_state, corrected, leafwise
        )
        errors = optax.tree.sub(corrected, messages)
        x = optax.tree.sub(state.x, mean_over_workers(messages))
        new = state._replace(x=x, memory=errors, compressor_state=states, step=state.step + 1)
        return new, _info(_uplink_bits(compressor, state.x, leafwise), _dense_bits(state.x), n)

    return ErrorFeedback("ef14", init, step, (), check, _no_bits)


def _ef21_family(
    name: str,
    compressor: Compressor,
    leafwise: bool,
    initial_memory: str,
    *,
    weighted: bool = False,
    partial: bool = False,
    server_compressor: Compressor | None = None,
    momentum: str | None = None,
) -> ErrorFeedback:
    """EF21 and its variants share one step; the static options switch the variant on
    (``momentum``: ``"average"`` for EF21-SGDM, ``"heavy_ball"`` for EF21-HB)."""
    if initial_memory not in INITIAL_MEMORIES:
        raise ValueError(
            f"initial_memory must be one of {INITIAL_MEMORIES}, got {initial_memory!r}"
        )
    hyper: tuple[str, ...] = ()
    if weighted:
        hyper = ("weights",)
    elif partial:
        hyper = ("participation",)
    elif momentum is not None:
        hyper = ("momentum",)

    def check(num_workers: int, *values: Any) -> None:
        check_int("num_workers", num_workers)
        _check_hyper_count(name, hyper, values)
        if weighted:
            if np.ndim(values[0]) != 1:
                raise ValueError(
                    f"weights must have shape ({num_workers},) for num_workers={num_workers}, "
                    f"got {np.shape(values[0])}"
                )
            check_weights(values[0], num_workers)
        if partial:
            _check_scalar("participation", values[0])
            check_participation(values[0])
        if momentum is not None:
            _check_scalar("momentum", values[0])
            check_momentum(values[0], heavy_ball=momentum == "heavy_ball")

    def initial_bits(x0: PyTree) -> int:
        if initial_memory == "gradient":
            return _dense_bits(x0)
        if initial_memory == "compressed_gradient":
            return _uplink_bits(compressor, x0, leafwise)
        return 0

    def init(
        key: jax.Array, x0: PyTree, num_workers: int, worker_grads: PyTree = None, *values: Any
    ) -> EFState:
        _check_init(key, x0)
        check_int("num_workers", num_workers)
        if values:
            check(num_workers, *values)
        elif weighted and initial_memory != "zero":
            raise ValueError(
                f"{name} with initial_memory={initial_memory!r} scales the starting memory "
                f"by the weights: pass them to init after worker_grads"
            )
        if initial_memory != "zero":
            _check_worker_grads(worker_grads, x0, num_workers, f"initial_memory={initial_memory!r}")
        keys = jax.random.split(key, 3 if initial_memory == "compressed_gradient" else 2)
        states = _init_compressor_states(compressor, keys[0], x0, num_workers, leafwise)
        server_state = None
        if server_compressor is not None:
            server_state = init_tree(server_compressor, keys[1], x0, leafwise)
        zeros = optax.tree.zeros_like(x0)
        if initial_memory == "zero":
            memory, estimate = _zeros_per_worker(x0, num_workers), zeros
        else:
            weights = jnp.asarray(values[0]) if weighted else None
            memory = worker_grads if weights is None else _scale_by_weights(worker_grads, weights)
            if initial_memory == "compressed_gradient":
                states, memory = _compress_each(
                    compressor, worker_keys(keys[2], num_workers), states, memory, leafwise
                )
            estimate = mean_over_workers(memory, weights)
        momenta = None
        if momentum == "average":
            momenta = _zeros_per_worker(x0, num_workers)
        elif momentum == "heavy_ball":
            momenta = zeros
        return EFState(
            x=x0,
            broadcast=zeros if server_compressor is not None else None,
            memory=memory,
            estimate=estimate,
            compressor_state=states,
            server_compressor_state=server_state,
            step=jnp.zeros((), jnp.int32),
            momentum=momenta,
        )

    def step(
        key: jax.Array, state: EFState, grads: PyTree, step_size: jax.Array, *values: Any
    ) -> tuple[EFState, EFInfo]:
        _check_hyper_count(name, hyper, values)
        _check_step(key, state, grads, step_size)
        n = _num_workers(grads)
        uplink_key, participation_key, downlink_key = jax.random.split(key, 3)
        weights = jnp.asarray(values[0]) if weighted else None
        if weighted:  # EF21-W: worker i compresses grad_i / (n w_i)
            grads = _scale_by_weights(grads, weights)
        momenta = state.momentum
        if momentum == "average":  # EF21-SGDM: v_i <- (1 - eta) v_i + eta grad_i, v_i^0 = grad_i
            rate = jnp.where(state.step == 0, 1.0, values[0])

            def average(v: jax.Array, g: jax.Array) -> jax.Array:
                eta = rate.astype(g.dtype)
                return (1 - eta) * v + eta * g

            momenta = jax.tree.map(average, momenta, grads)
            grads = momenta
        differences = optax.tree.sub(grads, state.memory)
        states, messages = _compress_each(
            compressor, worker_keys(uplink_key, n), state.compressor_state, differences, leafwise
        )
        if partial:  # EF21-PP: each worker joins independently with probability p
            active = jax.random.uniform(participation_key, (n,)) < values[0]
        else:
            active = jnp.ones((n,), bool)
        messages = jax.tree.map(lambda m: jnp.where(_over_workers(active, m), m, 0.0), messages)
        states = jax.tree.map(
            lambda new, old: jnp.where(_over_workers(active, new), new, old),
            states,
            state.compressor_state,
        )
        memory = optax.tree.add(state.memory, messages)
        estimate = optax.tree.add(state.estimate, mean_over_workers(messages, weights))
        broadcast, server_state, bits_down = (
            estimate,
            state.server_compressor_state,
            _dense_bits(state.x),
        )
        if server_compressor is not None:  # EF21-BC: EF21 on the downlink too
            server_state, update = compress_tree(
                server_compressor,
                downlink_key,
                server_state,
                optax.tree.sub(estimate, state.broadcast),
                leafwise,
            )
            broadcast = optax.tree.add(state.broadcast, update)
            bits_down = tree_bits(server_compressor, state.x, leafwise)
        direction = broadcast
        if momentum == "heavy_ball":  # EF21-HB: v <- eta v + g, x <- x - gamma v
            momenta = jax.tree.map(
                lambda v, g: jnp.asarray(values[0], g.dtype) * v + g, momenta, broadcast
            )
            direction = momenta
        x = _sgd_update(state.x, direction, step_size)
        participants = jnp.sum(active)
        bits_up = participants * _uplink_bits(compressor, state.x, leafwise) / n
        new = EFState(
            x,
            broadcast if server_compressor is not None else None,
            memory,
            estimate,
            states,
            server_state,
            state.step + 1,
            momenta,
        )
        return new, _info(bits_up, bits_down, participants)

    return ErrorFeedback(name, init, step, hyper, check, initial_bits)


def ef21(
    compressor: Compressor, *, leafwise: bool = False, initial_memory: str = "zero"
) -> ErrorFeedback:
    r"""EF21 (Richtárik, Sokolov, Fatkhullin, NeurIPS 2021, Alg. 1).

    Each step, at the model :math:`x`:

    .. math:: g_i \leftarrow g_i + C(\nabla f_i(x) - g_i),\quad
              g = \tfrac1n\textstyle\sum_i g_i,\quad x \leftarrow x - \gamma g.

    Only the compressed differences cross the network; the server updates :math:`g` by
    their mean.  ``initial_memory`` sets the workers' :math:`g_i` before the first step
    (Alg. 1 leaves :math:`g_i^0` free; the EF21 papers use the last two):

    * ``"zero"`` (default): :math:`g_i = 0`, so the first message is
      :math:`C(\nabla f_i(x_0))` and the first model step uses Alg. 1's
      :math:`g_i^0 = C(\nabla f_i(x_0))`; costs nothing before the first step;
    * ``"gradient"``: :math:`g_i = \nabla f_i(x_0)`, sent uncompressed, :math:`32d` bits per
      worker; the first step is then a plain gradient step (Alg. 1 with
      :math:`g_i^0 = \nabla f_i(x_0)` whenever :math:`C(0) = 0`);
    * ``"compressed_gradient"``: :math:`g_i = C(\nabla f_i(x_0))`, one compressed message
      per worker (with ``fold_in`` of a key split from ``init``'s), which the first step
      then refines by :math:`C(\nabla f_i(x_0) - g_i)`.

    The two non-zero starts need ``worker_grads`` in ``init``; the server's estimate
    starts at their mean, and their bits are ``ErrorFeedback.initial_bits``.
    Theoretical step size (Thm. 1): :math:`\gamma = 1/(L + L_{QM}\sqrt{\beta/\theta})` with
    :math:`\theta = 1-\sqrt{1-\alpha}`, :math:`\beta = (1-\alpha)/(1-\sqrt{1-\alpha})`; see
    :func:`~shufflesgd.compression.ef21_step_size`.  Fed stochastic gradients (e.g.
    minibatches from a shuffling scheme) this is EF21-SGD (Fatkhullin, Sokolov, Gorbunov,
    Li, Richtárik 2021, "EF21 with Bells & Whistles", Alg. 2).
    """
    return _ef21_family("ef21", compressor, leafwise, initial_memory)


def ef21_w(
    compressor: Compressor, *, leafwise: bool = False, initial_memory: str = "zero"
) -> ErrorFeedback:
    r"""EF21-W (Richtárik, Gasanov, Burlachenko, ICLR 2024, "Error Feedback Reloaded", Alg. 2).

    ``step(key, state, worker_grads, step_size, weights)``: with weights :math:`w_i > 0`,
    :math:`\sum_i w_i = 1` (the paper's :math:`w_i = L_i/\sum_j L_j`,
    :func:`~shufflesgd.compression.smoothness_weights`), worker ``i`` runs EF21 on
    :math:`\nabla f_i(x)/(n w_i)` and the server averages with weights:
    :math:`g = \sum_i w_i g_i`.  The weights are a traced ``[n]`` argument, so one compiled
    program serves a ``vmap`` over weight vectors; :func:`check_weights` checks concrete
    ones.  ``initial_memory`` as in :func:`ef21`, on the scaled gradients (so a non-zero
    start needs the weights in ``init`` too).  Step size (Thm. 1 there):
    :math:`\gamma = 1/(L + L_{AM}\sqrt{\beta/\theta})`, the arithmetic mean :math:`L_{AM}`
    replacing EF21's quadratic mean :math:`L_{QM} \ge L_{AM}`.
    """
    return _ef21_family("ef21_w", compressor, leafwise, initial_memory, weighted=True)


def ef21_pp(
    compressor: Compressor, *, leafwise: bool = False, initial_memory: str = "zero"
) -> ErrorFeedback:
    r"""EF21-PP, partial participation (Fatkhullin et al. 2021, "EF21 with Bells & Whistles",
    Alg. 4).

    ``step(key, state, worker_grads, step_size, participation)``: every worker takes part
    independently with probability :math:`p` = ``participation``, a traced scalar in
    :math:`(0, 1]` (:func:`check_participation`), so one compiled program sweeps it.
    Participants run the EF21 update and send :math:`C(\nabla f_i(x) - g_i)`, the others
    keep :math:`g_i` and send nothing.  ``initial_memory`` as in :func:`ef21` (every worker
    sends its starting memory).  The theory asks for a step size smaller than EF21's as
    :math:`p` falls (:func:`~shufflesgd.compression.ef21_pp_step_size`).
    """
    return _ef21_family("ef21_pp", compressor, leafwise, initial_memory, partial=True)


def ef21_bc(
    compressor: Compressor,
    server_compressor: Compressor,
    *,
    leafwise: bool = False,
    initial_memory: str = "zero",
) -> ErrorFeedback:
    r"""EF21-BC, bidirectional compression (Fatkhullin et al. 2021, "EF21 with Bells &
    Whistles", Alg. 5).

    Error feedback in both directions: workers run the EF21 uplink
    :math:`g_i \leftarrow g_i + C_W(\nabla f_i(x) - g_i)`, the server forms
    :math:`w = \frac1n\sum_i g_i` and runs EF21 on the downlink,
    :math:`g \leftarrow g + C_M(w - g)`, broadcasting only :math:`C_M(w - g)`; everyone
    steps :math:`x \leftarrow x - \gamma g`, so the model stays in sync without being
    sent.  ``initial_memory`` sets the workers' :math:`g_i` as in :func:`ef21`; the
    broadcast :math:`g` always starts at zero.  Rate :math:`O(1/(\alpha_W\alpha_M
    \varepsilon^2))` (their Table 1); step size
    :func:`~shufflesgd.compression.ef21_bc_step_size`.
    """
    return _ef21_family(
        "ef21_bc", compressor, leafwise, initial_memory, server_compressor=server_compressor
    )


def ef21_sgdm(
    compressor: Compressor, *, leafwise: bool = False, initial_memory: str = "zero"
) -> ErrorFeedback:
    r"""EF21-SGDM (Fatkhullin, Tyurin, Richtárik, NeurIPS 2023, "Momentum Provably Improves
    Error Feedback!", Alg. 1).

    ``step(key, state, worker_grads, step_size, momentum)``: each worker keeps a Polyak
    momentum average :math:`v_i` of its stochastic gradients ``worker_grads`` and runs
    EF21 on it:

    .. math:: v_i \leftarrow (1 - \eta) v_i + \eta\nabla f_i(x, \xi_i),\quad
              g_i \leftarrow g_i + C(v_i - g_i),\quad
              g = \tfrac1n\textstyle\sum_i g_i,\quad x \leftarrow x - \gamma g.

    :math:`\eta` = ``momentum`` is a traced scalar in :math:`(0, 1]`
    (:func:`check_momentum`), so one compiled program sweeps it; :math:`\eta = 1` is EF21
    (EF21-SGD on stochastic gradients).  The averages start as in Alg. 1 at a stochastic
    gradient at :math:`x_0`, :math:`v_i^0 = \nabla f_i(x_0, \xi_i^0)`: the first step
    (``state.step == 0``) takes :math:`v_i` = its ``worker_grads`` (weight 1), so they carry
    no bias towards zero.  ``initial_memory`` sets the :math:`g_i` as in :func:`ef21`.
    Averaging the gradient noise before compressing it is what removes EF21-SGD's need for
    large batches: EF21-SGD's estimates :math:`g_i` chase the noise of every sample, and
    their error does not shrink with the step size; with small :math:`\eta` the
    :math:`v_i` carry little noise.  The state's ``momentum`` holds the :math:`v_i`.
    """
    return _ef21_family("ef21_sgdm", compressor, leafwise, initial_memory, momentum="average")


def ef21_hb(
    compressor: Compressor, *, leafwise: bool = False, initial_memory: str = "zero"
) -> ErrorFeedback:
    r"""EF21-HB, EF21 with heavy-ball momentum (Fatkhullin, Sokolov, Gorbunov, Li, Richtárik
    2021, "EF21 with Bells & Whistles", JMLR 2025, the heavy-ball extension; its algorithm
    number could not be checked offline, so none is cited).

    ``step(key, state, worker_grads, step_size, momentum)``: the workers run EF21 and the
    model steps along a heavy-ball direction :math:`v` of the server's estimate:

    .. math:: g_i \leftarrow g_i + C(\nabla f_i(x) - g_i),\quad
              g = \tfrac1n\textstyle\sum_i g_i,\quad v \leftarrow \eta v + g,\quad
              x \leftarrow x - \gamma v,

    i.e. :math:`x_{t+1} = x_t - \gamma g_t + \eta(x_t - x_{t-1})` (Polyak 1964), with
    :math:`v^0 = g^0`: :math:`v` starts at zero, so the first step moves along :math:`g`.
    :math:`\eta` = ``momentum`` is a traced scalar in :math:`[0, 1)` (:func:`check_momentum`
    with ``heavy_ball=True``); :math:`\eta = 0` is EF21.
    ``initial_memory`` as in :func:`ef21`.  The state's ``momentum`` holds :math:`v`; only
    the workers' messages cross the network, as in EF21.
    """
    return _ef21_family("ef21_hb", compressor, leafwise, initial_memory, momentum="heavy_ball")


METHODS = (
    "compressed_gd",
    "ef14",
    "ef21",
    "ef21_w",
    "ef21_pp",
    "ef21_bc",
    "ef21_sgdm",
    "ef21_hb",
)
