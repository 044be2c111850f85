"""The shuffling family: the order in which SGD visits the components of a finite sum.

Every scheme is a :class:`ShufflingScheme` (``init``, ``step``, ``observe``), driven epoch by
epoch by :mod:`shufflesgd.drivers`; :func:`make_sgd_run` is shuffling SGD on a finite sum.
"""

from shufflesgd.shuffling.flipflop import (
    flipflop,
)
from shufflesgd.shuffling.grab import (
    MeanBalanceState,
    PairBalanceState,
    grab_mean_balance,
    grab_pair_balance,
)
from shufflesgd.shuffling.registry import (
    SCHEMES,
    make_scheme,
)
from shufflesgd.shuffling.rs2 import (
    rs2,
    rs2_subset_size,
)
from shufflesgd.shuffling.schemes import (
    EpochState,
    FixedOrderState,
    KeyedEpochState,
    ShufflingScheme,
    checked_scheme,
    incremental,
    random_reshuffle,
    single_shuffle,
    with_replacement,
)
from shufflesgd.shuffling.sgd import (
    OptimizerFactory,
    SGDResult,
    make_sgd_run,
    theory_step_size,
)

__all__ = [
    "EpochState",
    "FixedOrderState",
    "KeyedEpochState",
    "MeanBalanceState",
    "OptimizerFactory",
    "PairBalanceState",
    "SCHEMES",
    "SGDResult",
    "ShufflingScheme",
    "checked_scheme",
    "flipflop",
    "grab_mean_balance",
    "grab_pair_balance",
    "incremental",
    "make_scheme",
    "make_sgd_run",
    "random_reshuffle",
    "rs2",
    "rs2_subset_size",
    "single_shuffle",
    "theory_step_size",
    "with_replacement",
]
