"""default_float: NumPy float64 data to JAX's default float (float32, or float64 under x64)."""

import jax.numpy as jnp
import numpy as np

from shufflesgd.problems._casting import default_float


def test_float32_by_default():
    out = default_float(np.array([1.0, 2.5], np.float64))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, [1.0, 2.5])


def test_float64_under_x64_and_ints_become_floats(x64):
    assert default_float(np.array([0.1])).dtype == jnp.float64
    out = default_float(np.array([1, 2]))
    assert out.dtype == jnp.float64 and out.tolist() == [1.0, 2.0]
