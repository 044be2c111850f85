"""The one cast the problem builders share: NumPy float64 data to JAX's default float."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def default_float(array: np.ndarray) -> jax.Array:
    """``array`` in JAX's default float dtype (float64 when x64 is on, else float32)."""
    return jnp.asarray(array, dtype=jnp.result_type(float))
