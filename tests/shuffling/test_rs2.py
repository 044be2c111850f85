"""RS2: the subsets of a pass cover the data without repetition before the next pass."""

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shufflesgd import shuffling
from support.epochs import epochs


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 50), ratio=st.floats(0.05, 1.0), seed=st.integers(0, 2**31 - 1))
def test_rs2_subsets_cover_the_data_before_repeating(n, ratio, seed):
    scheme = shuffling.rs2(n, ratio)
    m = shuffling.rs2_subset_size(n, ratio)
    assert scheme.epoch_length == m == max(1, int(np.ceil(round(ratio * n, 9))))
    per_pass = -(-n // m)
    orders = epochs(scheme, jax.random.key(seed), 2 * per_pass)
    for order in orders:
        assert len(set(order.tolist())) == m and order.min() >= 0 and order.max() < n
    for p in range(2):
        seen = orders[p * per_pass : (p + 1) * per_pass].ravel()
        assert set(seen.tolist()) == set(range(n))  # every example once per pass
        assert len(seen) - len(set(seen.tolist())) == per_pass * m - n  # only the wrap repeats
