"""Argument checks shared across the library.

Each raises a ``ValueError`` that names the argument and shows its value, and runs in Python
before anything is traced.  Values that are already JAX tracers (a step size swept under
``vmap``, a tolerance under ``jit``) pass: they cannot be inspected, and the caller owns them.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def is_concrete(value: Any) -> bool:
    """Whether ``value`` can be inspected in Python (it is not a JAX tracer)."""
    return not isinstance(value, jax.core.Tracer)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as a Python int; ``ValueError`` unless it is an int (a NumPy integer counts, a
    bool does not) of at least ``minimum``.  Sizes, counts and loop lengths are static, so a
    traced value fails too."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        wanted = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {wanted}, got {name}={value!r}")
    return int(value)


def check_positive(name: str, value: Any) -> None:
    """``ValueError`` unless every entry of a concrete ``value`` is positive (NaN fails)."""
    if is_concrete(value) and not np.all(np.asarray(value) > 0):
        raise ValueError(f"{name} must be positive, got {name}={value!r}")


def check_positive_finite(**values: Any) -> None:
    """``ValueError`` for the first concrete keyword value that is not positive and finite."""
    for name, value in values.items():
        if is_concrete(value) and not np.all(
            np.isfinite(np.asarray(value)) & (np.asarray(value) > 0)
        ):
            raise ValueError(f"{name} must be positive and finite, got {name}={value!r}")
