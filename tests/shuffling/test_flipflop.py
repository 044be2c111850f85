"""FlipFlop: every other epoch is the previous one reversed, for each base scheme."""

import jax
import numpy as np
import pytest

from shufflesgd import shuffling
from support.epochs import epochs


@pytest.mark.parametrize("base", ["random_reshuffle", "single_shuffle", "incremental"])
def test_flipflop_reverses_every_other_epoch(base):
    orders = epochs(shuffling.flipflop(12, base=base), jax.random.key(2), 6)
    for pair in range(3):
        np.testing.assert_array_equal(orders[2 * pair + 1], orders[2 * pair][::-1])
    if base == "random_reshuffle":
        assert not np.array_equal(orders[0], orders[2])
    else:
        np.testing.assert_array_equal(orders[0], orders[2])
