r"""FlipFlop: shuffling epochs in pairs, a permutation and then its reverse.

Rajput, Lee & Papailiopoulos (ICLR 2022), "Permutation-Based SGD: Is Random Optimal?",
Sec. 5: epoch :math:`2j` visits a permutation :math:`\sigma_j` of a base scheme and epoch
:math:`2j+1` visits :math:`\sigma_j` reversed.  On quadratics the first-order error terms
of the two epochs of a pair cancel, which improves the rate of the base scheme.  Pair
:math:`j` draws from
:math:`\mathrm{fold\_in}(\text{key}, j)` with the key given to ``init`` (RR draws a new
:math:`\sigma_j` per pair, SS reuses :math:`\sigma_0`, IG is the identity), so the scheme's
state keeps that key and counts the epochs (:class:`~shufflesgd.shuffling.schemes.KeyedEpochState`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from shufflesgd.shuffling.schemes import (
    ShufflingScheme,
    _check_num_examples,
    _keyed_epoch_scheme,
    _permutation,
)

OrderFn = Callable[[jax.Array, jax.Array], jax.Array]


_FLIPFLOP_BASES: dict[str, Callable[[int], OrderFn]] = {
    "random_reshuffle": lambda n: lambda key, j: _permutation(key, j, n),
    "single_shuffle": lambda n: lambda key, j: _permutation(key, 0, n),
    "incremental": lambda n: lambda key, j: jnp.arange(n),
}


def flipflop(n: int, base: str = "random_reshuffle") -> ShufflingScheme:
    """FlipFlop over ``base`` (``random_reshuffle``, ``single_shuffle`` or ``incremental``).

    Rajput, Lee, Papailiopoulos (ICLR 2022), Sec. 5 (FlipFlop): epoch :math:`2j` uses
    :math:`\\sigma_j` from the ``base`` scheme, drawn from ``fold_in(key, j)``, and epoch
    :math:`2j+1` uses :math:`\\sigma_j` reversed, which cancels the leading error term on
    quadratics.
    """
    _check_num_examples(n)
    if base not in _FLIPFLOP_BASES:
        raise ValueError(f"base must be one of {sorted(_FLIPFLOP_BASES)}, got {base!r}")
    base_order = _FLIPFLOP_BASES[base](n)

    def order_fn(key: jax.Array, k: jax.Array) -> jax.Array:
        order = base_order(key, k // 2)
        return jnp.where(k % 2 == 1, order[::-1], order)

    return _keyed_epoch_scheme(n, order_fn, n)
