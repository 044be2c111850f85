r"""Zeroth-order (SPSA / MeZO) updates with shared randomness: a few bits per worker a step.

**SPSA / MeZO.**  For a loss :math:`L(\theta; B)` and a direction
:math:`z \sim \mathcal N(0, I)` shaped like the parameters, the two-point estimate
(Spall 1992, "Multivariate Stochastic Approximation Using a Simultaneous Perturbation
Gradient Approximation"; Malladi, Gao, Nichani, Damian, Lee, Chen, Arora 2023,
"Fine-Tuning Language Models with Just Forward Passes", Alg. 1 and Def. 1) is

.. math:: p = \frac{L(\theta + \epsilon z; B) - L(\theta - \epsilon z; B)}{2\epsilon},
          \qquad \hat g = p\,z .

For a quadratic :math:`L` the difference is exactly :math:`p = z^\top\nabla L(\theta)` for
every :math:`\epsilon`; for a smooth one :math:`p = z^\top\nabla L + O(\epsilon^2)`, so
:math:`E_z[p z] = \nabla L + O(\epsilon^2)` (and :math:`E_z[p] = O(\epsilon^2)`).  With
:math:`K` directions (``num_directions``) the estimate is :math:`\frac1K\sum_j p_j z_j`.
The direction is drawn leaf by leaf from a key (:func:`direction`), so it is regenerated
from the key and never stored or sent.

**Shared randomness.**  Zelikman, Huang, Liang, Haber, Goodman (2023), "Just One Byte (per
gradient): A Note on Low-Bandwidth Decentralized Language Model Finetuning Using Shared
Randomness": :math:`n` workers share the direction key, each computes its own :math:`p_{ij}`
on its own batch, and sends only a ``bits``-bit code of it (:func:`quantize`).  Everyone who
holds the key and the codes, the server and every worker alike, rebuilds the same update

.. math:: \theta \leftarrow \theta - \eta\,\frac1K\sum_{j=1}^K
          \Big(\frac1n\sum_{i=1}^n Q(p_{ij})\Big) z_j

(:func:`reconstruct`, :func:`apply_codes`), so no :math:`d`-vector is on the wire: one worker sends
:math:`K \cdot \text{bits}` bits a step.

**The quantiser** is uniform on the clipping range :math:`[-r, r]` with :math:`2^b` levels
:math:`-r + j\Delta`, :math:`j = 0, \dots, 2^b - 1`, :math:`\Delta = 2r/(2^b - 1)`
(:math:`b = 1` sends the sign, scaled by :math:`r`).  Values outside :math:`[-r, r]` are
clipped to it first (and counted).  For :math:`|p| \le r`:

* nearest rounding: :math:`|Q(p) - p| \le \Delta/2 = r/(2^b - 1)`;
* stochastic rounding (to one of the two neighbouring levels): :math:`E[Q(p)] = p` and
  :math:`\mathrm{Var}[Q(p)] \le \Delta^2/4 = r^2/(2^b - 1)^2`.

These hold in exact arithmetic; in floating point add a few units in the last place of
:math:`r` (with float32 the grid is finer than the float spacing beyond about 24 bits).
The range :math:`r` (``radius``) is a traced hyper-parameter, like the step size and
:math:`\epsilon`, so one compiled program serves a ``vmap``-ped sweep; it is not sent.

The step's key :math:`k` is split into a direction key, shared, whose ``fold_in`` with
:math:`j` draws :math:`z_j`, and a rounding key, whose ``fold_in`` with worker :math:`i` is
worker :math:`i`'s own (used by stochastic rounding only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd._checks import check_float_array, check_int, check_key, check_positive_finite

PyTree = Any

#: The largest number of bits a projected gradient may be quantised to (codes are uint32).
MAX_BITS = 32

ROUNDINGS = ("nearest", "stochastic")


class ZOState(NamedTuple):
    """State of a shared-randomness zeroth-order method.

    Attributes:
      params: the model (the same on the server and every worker).
      step: number of steps taken.
    """

    params: PyTree
    step: jax.Array


class ZOInfo(NamedTuple):
    r"""Diagnostics of one step.

    Attributes:
      loss: the mean over workers and directions of
        :math:`\frac12(L(\theta + \epsilon z_j; B_i) + L(\theta - \epsilon z_j; B_i))`,
        an :math:`O(\epsilon^2)` estimate of the loss at ``params``; non-finite when a
        loss evaluation was, so divergence shows here.
      codes: the ``[n, K]`` uint32 messages, worker ``i``'s code of :math:`p_{ij}`.
      clipped: how many of the :math:`nK` projected gradients had :math:`|p_{ij}| > r`.
      bits_up: bits sent by one worker this step, :math:`K \cdot \text{bits}`.
      function_evaluations: loss evaluations by one worker this step, :math:`2K`.
    """

    loss: jax.Array
    codes: jax.Array
    clipped: jax.Array
    bits_up: jax.Array
    function_evaluations: jax.Array


class ZerothOrder(NamedTuple):
    """A shared-randomness zeroth-order method (see the module doc).

    Attributes:
      name: what it is, for tables.
      init: ``(key, params) -> ZOState``.
      step: ``(key, state, worker_batches, step_size, epsilon, radius) -> (ZOState, ZOInfo)``,
        ``worker_batches`` a pytree whose leaves have a leading worker axis ``n``.
      bits: bits one worker sends a step.
    """

    name: str
    init: Callable[[jax.Array, PyTree], ZOState]
    step: Callable[..., tuple[ZOState, ZOInfo]]
    bits: int


def check_bits(bits: Any) -> int:
    """``bits`` as a Python int; ``ValueError`` naming it unless it is an int in
    ``[1, 32]``."""
    bits = check_int("bits", bits)
    if bits > MAX_BITS:
        raise ValueError(f"bits must be at most {MAX_BITS}, got bits={bits!r}")
    return bits


def direction(key: jax.Array, params: PyTree) -> PyTree:
    """A standard normal direction shaped like ``params``: leaf ``l`` is drawn with the
    ``l``-th of ``split(key, leaves)`` in that leaf's dtype."""
    check_key("key", key)
    check_float_array("params", params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [
            jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf))
            for k, leaf in zip(keys, leaves)
        ]
    )


def _shift(params: PyTree, z: PyTree, scale: jax.Array) -> PyTree:
    return jax.tree.map(lambda p, v: p + jnp.asarray(scale, p.dtype) * v, params, z)


def spsa_projected_gradient(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
    key: jax.Array,
    epsilon: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    r"""The two-point projected gradient along :math:`z =` :func:`direction` ``(key, params)``
    (Malladi et al. 2023, Alg. 1):
    :math:`p = (L(\theta + \epsilon z) - L(\theta - \epsilon z)) / (2\epsilon)`.

    Returns ``(p, loss)`` with ``loss`` :math:`= \frac12(L(\theta + \epsilon z) +
    L(\theta - \epsilon z))`.  The gradient estimate is :math:`p z`; ``epsilon`` may be
    traced (a concrete one must be positive and finite).
    """
    check_positive_finite(epsilon=epsilon)
    z = direction(key, params)
    plus = loss_fn(_shift(params, z, epsilon), batch)
    minus = loss_fn(_shift(params, z, -epsilon), batch)
    return (plus - minus) / (2 * epsilon), (plus + minus) / 2


def _top_code(bits: int, dtype: Any) -> np.ndarray:
    """The largest code, ``2**bits - 1``, as the largest float of ``dtype`` not above it (so
    that it converts to uint32 without overflow when ``dtype`` rounds it up)."""
    levels = np.asarray(2**bits - 1, dtype)
    if int(levels) > 2**bits - 1:
        levels = np.nextafter(levels, np.zeros((), dtype))
    return levels


def quantize(
    values: jax.Array,
    radius: float | jax.Array,
    bits: int,
    *,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Codes of ``values`` on the uniform ``bits``-bit grid over :math:`[-r, r]`.

    The grid is :math:`-r + j\Delta`, :math:`\Delta = 2r/(2^b - 1)`; values are clipped to
    :math:`[-r, r]` and rounded to the nearest level, or, when ``key`` is given,
    stochastically to a neighbouring level with the probabilities that make
    :math:`E[Q(p)] = p`.  Error bounds in the module doc.  A NaN is coded as 0 would be.

    Returns ``(codes, clipped)``: uint32 codes in :math:`[0, 2^b - 1]` and a boolean mask of
    the entries with :math:`|p| > r` (infinities included), both shaped like ``values``.
    """
    bits = check_bits(bits)
    check_float_array("values", values)
    check_positive_finite(radius=radius)
    if key is not None:
        check_key("key", key)
    values = jnp.asarray(values)
    dtype = jnp.promote_types(values.dtype, jnp.float32)  # half precision: codes in float32
    radius = jnp.asarray(radius, dtype)
    clipped = jnp.abs(values) > radius
    inside = jnp.clip(jnp.where(jnp.isnan(values), 0.0, values), -radius, radius)
    scaled = (inside + radius) * (float(2**bits - 1) / (2 * radius))
    if key is None:
        rounded = jnp.round(scaled)
    else:
        low = jnp.floor(scaled)
        rounded = low + (jax.random.uniform(key, values.shape, dtype) < scaled - low)
    codes = jnp.clip(rounded, 0, _top_code(bits, dtype)).astype(jnp.uint32)
    return codes, clipped


def dequantize(
    codes: jax.Array, radius: float | jax.Array, bits: int, dtype: Any = jnp.float32
) -> jax.Array:
    r"""The levels :math:`-r + j\Delta` of uint32 ``codes`` :math:`j` (see :func:`quantize`),
    in ``dtype``."""
    bits = check_bits(bits)
    check_positive_finite(radius=radius)
    radius = jnp.asarray(radius, dtype)
    return jnp.asarray(codes).astype(dtype) * (2 * radius / float(2**bits - 1)) - radius


def reconstruct(key: jax.Array, params: PyTree, coefficients: jax.Array) -> PyTree:
    r"""The update direction :math:`\frac1K\sum_j c_j z_j` from the shared key and the ``[K]``
    coefficients :math:`c_j` (the workers' mean dequantised codes): :math:`z_j` is
    :func:`direction` ``(fold_in(key, j), params)``, regenerated one at a time.  The server and
    every worker run this same function on the same inputs, so they agree bit for bit."""
    check_key("key", key)
    check_float_array("params", params)
    check_float_array("coefficients", coefficients)
    if np.ndim(coefficients) != 1:
        raise ValueError(
            f"coefficients must be a vector [num_directions], got shape {np.shape(coefficients)}"
        )
    count = np.shape(coefficients)[0]

    def add(total: PyTree, inputs: tuple[jax.Array, jax.Array]) -> tuple[PyTree, None]:
        j, c = inputs
        z = direction(jax.random.fold_in(key, j), params)
        return jax.tree.map(lambda t, v: t + (c / count).astype(t.dtype) * v, total, z), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(add, zeros, (jnp.arange(count), coefficients))
    return total


def _apply(
    direction_key: jax.Array,
    params: PyTree,
    codes: jax.Array,
    step_size: float | jax.Array,
    radius: float | jax.Array,
    bits: int,
) -> PyTree:
    dtype = jnp.result_type(*jax.tree.leaves(params))
    coefficients = jnp.mean(dequantize(codes, radius, bits, dtype), axis=0)
    update = reconstruct(direction_key, params, coefficients)
    return jax.tree.map(lambda p, u: p - jnp.asarray(step_size, p.dtype) * u, params, update)


def apply_codes(
    key: jax.Array,
    params: PyTree,
    codes: jax.Array,
    step_size: float | jax.Array,
    radius: float | jax.Array,
    bits: int,
) -> PyTree:
    r"""The new parameters from the step's ``key`` and the workers' ``[n, K]`` uint32
    ``codes`` alone: :math:`\theta - \eta` :func:`reconstruct` of the mean
    :func:`dequantize`-d codes, with the direction key split from ``key`` as the step does.

    This is what the server and every worker compute on receiving the codes, and the
    update :func:`zeroth_order`'s ``step`` applies.  Parties that run it as the same
    compiled program (``jax.jit``) agree bit for bit; run op by op, XLA may order the
    dequantise-and-average differently and change the last bit.
    """
    check_key("key", key)
    check_float_array("params", params)
    bits = check_bits(bits)
    check_positive_finite(step_size=step_size, radius=radius)
    if np.ndim(codes) != 2 or jnp.result_type(codes) != jnp.uint32:
        raise ValueError(
            f"codes must be a uint32 [num_workers, num_directions] array, got "
            f"{jnp.result_type(codes)} of shape {np.shape(codes)}"
        )
    direction_key, _ = jax.random.split(key)
    return _apply(direction_key, params, codes, step_size, radius, bits)


def _num_workers(worker_batches: PyTree) -> int:
    """The common leading axis of ``worker_batches``; ``ValueError`` naming it when the leaves
    disagree, have no leading axis, or it is 0."""
    leaves = jax.tree.leaves(worker_batches)
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if not leaves or len(sizes) != 1 or None in sizes:
        shapes = [tuple(np.shape(leaf)) for leaf in leaves]
        raise ValueError(
            f"worker_batches must be a pytree of arrays with a common leading worker axis, "
            f"got leaf shapes {shapes}"
        )
    (n,) = sizes
    if n < 1:
        raise ValueError(f"worker_batches must hold at least one worker, got {n} workers")
    return int(n)


def zeroth_order(
    loss_fn: Callable[[PyTree, Any], jax.Array],
    *,
    num_directions: int = 1,
    bits: int = 8,
    rounding: str = "nearest",
) -> ZerothOrder:
    r"""Shared-randomness zeroth-order SGD (Zelikman et al. 2023 on MeZO, Malladi et al.
    2023, Alg. 1), as an ``(init, step)`` pair.

    ``loss_fn(params, batch) -> scalar``.  Each step, for :math:`j = 1..K`
    (``num_directions``), every worker :math:`i` computes
    :func:`spsa_projected_gradient` on its batch along the shared :math:`z_j`, sends
    :func:`quantize` of it (``bits`` bits, ``rounding`` ``"nearest"`` or ``"stochastic"``)
    and all apply :math:`\theta \leftarrow \theta - \eta` :func:`reconstruct` of the mean
    dequantised codes (:func:`apply_codes`).  ``step_size`` :math:`\eta`, ``epsilon``
    :math:`\epsilon` and ``radius`` :math:`r` are traced; concrete ones must be positive and
    finite.  Workers are ``vmap``-ped; directions are a ``lax.scan``, so memory holds one
    direction at a time.  One worker sends :math:`K \cdot \text{bits}` bits and evaluates
    the loss :math:`2K` times a step.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    num_directions = check_int("num_directions", num_directions)
    bits = check_bits(bits)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got rounding={rounding!r}")

    def init(key: jax.Array, params: PyTree) -> ZOState:
        check_key("key", key)
        check_float_array("params", params)
        return ZOState(params, jnp.zeros((), jnp.int32))

    def step(
        key: jax.Array,
        state: ZOState,
        worker_batches: PyTree,
        step_size: float | jax.Array,
        epsilon: float | jax.Array,
        radius: float | jax.Array,
    ) -> tuple[ZOState, ZOInfo]:
        check_key("key", key)
        check_float_array("state.params", state.params)
        n = _num_workers(worker_batches)
        check_positive_finite(step_size=step_size, epsilon=epsilon, radius=radius)
        direction_key, rounding_key = jax.random.split(key)

        def along(carry: None, j: jax.Array) -> tuple[None, tuple[jax.Array, jax.Array]]:
            shared = jax.random.fold_in(direction_key, j)
            projected, losses = jax.vmap(
                lambda batch: spsa_projected_gradient(loss_fn, state.params, batch, shared, epsilon)
            )(worker_batches)
            return carry, (projected, losses)

        _, (projected, losses) = jax.lax.scan(along, None, jnp.arange(num_directions))
        projected, losses = projected.T, losses.T  # [n, K]

        def encode(i: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
            own = jax.random.fold_in(rounding_key, i) if rounding == "stochastic" else None
            return quantize(p, radius, bits, key=own)

        codes, clipped = jax.vmap(encode)(jnp.arange(n), projected)
        params = _apply(direction_key, state.params, codes, step_size, radius, bits)
        info = ZOInfo(
            loss=jnp.mean(losses),
            codes=codes,
            clipped=jnp.sum(clipped, dtype=jnp.int32),
            bits_up=jnp.asarray(num_directions * bits, jnp.int32),
            function_evaluations=jnp.asarray(2 * num_directions, jnp.int32),
        )
        return ZOState(params, state.step + 1), info

    return ZerothOrder(f"zeroth_order_{bits}bit", init, step, num_directions * bits)
