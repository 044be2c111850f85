r"""RS2: repeated random sampling, each epoch a random subset of the data.

Okanovic et al. (2023), "Repeated Random Sampling for Minimizing the Time-to-Accuracy of
Learning", Alg. 1 (without replacement): an epoch visits only :math:`m = \lceil r n\rceil`
of the :math:`n` examples, for a ratio :math:`r \in (0, 1]`.  The data are shuffled once
per pass and cut into :math:`P = \lceil n/m\rceil` successive chunks of :math:`m`; epoch
:math:`k` is chunk :math:`k \bmod P` of the permutation of pass :math:`\lfloor k/P\rfloor`,
drawn from :math:`\mathrm{fold\_in}(\text{key}, \lfloor k/P\rfloor)` with the key given to
``init`` (so the state keeps that key and counts the epochs,
:class:`~shufflesgd.shuffling.schemes.KeyedEpochState`).  When :math:`m` does not divide :math:`n`
the last chunk wraps to the start of the same permutation: every epoch is a set of
distinct indices, and no example is seen twice before every example has been seen once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from shufflesgd.shuffling.schemes import (
    ShufflingScheme,
    _check_num_examples,
    _keyed_epoch_scheme,
    _permutation,
)


def rs2_subset_size(n: int, ratio: float) -> int:
    """``ceil(ratio * n)``, the number of examples one RS2 epoch visits."""
    return max(1, math.ceil(round(ratio * n, 9)))


def rs2(n: int, ratio: float) -> ShufflingScheme:
    """RS2 without replacement: each epoch a random subset of size ``m = ceil(ratio n)``.

    Okanovic et al. (2023), Alg. 1 (without replacement): shuffle the data once per pass
    and take successive chunks of ``m`` until it is exhausted, then reshuffle.  With ``P =
    ceil(n/m)`` epochs per pass, epoch ``k`` is chunk ``j = k mod P`` of the permutation of
    pass ``p = k // P``; when ``m`` does not divide ``n`` the last chunk wraps to the start
    of the same permutation.
    """
    _check_num_examples(n)
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got ratio={ratio!r}")
    m = rs2_subset_size(n, ratio)
    epochs_per_pass = -(-n // m)

    def order_fn(key: jax.Array, k: jax.Array) -> jax.Array:
        perm = _permutation(key, k // epochs_per_pass, n)
        return perm[((k % epochs_per_pass) * m + jnp.arange(m)) % n]

    return _keyed_epoch_scheme(n, order_fn, m)
