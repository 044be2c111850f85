"""The shuffling schemes by name: :data:`SCHEMES` and :func:`make_scheme`.

Experiments and configs name a scheme by the string its constructor is called by
(``"random_reshuffle"``, ``"grab_pair_balance"``, ...); :func:`make_scheme` turns the name and
the number of examples into the :class:`~shufflesgd.shuffling.schemes.ShufflingScheme` that every
driver of :mod:`shufflesgd.drivers` takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shufflesgd.shuffling.flipflop import flipflop
from shufflesgd.shuffling.grab import grab_mean_balance, grab_pair_balance
from shufflesgd.shuffling.rs2 import rs2
from shufflesgd.shuffling.schemes import (
    ShufflingScheme,
    incremental,
    random_reshuffle,
    single_shuffle,
    with_replacement,
)

#: Every scheme constructor by name, as :func:`make_scheme` takes it.
#:
#: :meta hide-value:
SCHEMES: dict[str, Callable[..., ShufflingScheme]] = {
    "with_replacement": with_replacement,
    "random_reshuffle": random_reshuffle,
    "single_shuffle": single_shuffle,
    "incremental": incremental,
    "flipflop": flipflop,
    "rs2": rs2,
    "grab_mean_balance": grab_mean_balance,
    "grab_pair_balance": grab_pair_balance,
}


def make_scheme(name: str, n: int, **options: Any) -> ShufflingScheme:
    """The scheme called ``name`` (a key of :data:`SCHEMES`) over ``n`` examples.

    ``options`` go to the constructor (``ratio`` for ``rs2``, ``base`` for ``flipflop``).
    Raises ``ValueError`` naming ``scheme`` for an unknown name.
    """
    if name not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {name!r}")
    return SCHEMES[name](n, **options)
