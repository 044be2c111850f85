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


def _describe(value: Any) -> str:
    """A short description of ``value`` for an error message: its type, dtype and shape."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return f"{type(value).__name__} {value!r}"
    return f"{type(value).__name__} of dtype {dtype} and shape {tuple(np.shape(value))}"


def check_key(name: str, key: Any) -> None:
    """``TypeError`` unless ``key`` is a JAX PRNG key: a typed key (``jax.random.key``) or a
    raw ``uint32[..., 2]`` key (``jax.random.PRNGKey``).  The dtype and shape of a traced key
    are known, so a traced key of the wrong kind fails too; a traced key of the right kind
    passes."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return
        if dtype == np.uint32 and np.shape(key)[-1:] == (2,):
            return
    raise TypeError(
        f"{name} must be a PRNG key (jax.random.key(seed) or a uint32[..., 2] "
        f"jax.random.PRNGKey(seed)), got {name}: {_describe(key)}"
    )


def check_float_array(name: str, value: Any, shape: tuple[int, ...] | None = None) -> None:
    """``TypeError`` unless ``value`` (array or pytree of arrays) has a floating dtype;
    ``ValueError`` unless its shape is ``shape`` (when given, for an array).  Dtypes and shapes
    are static, so traced values are checked too."""
    for leaf in jax.tree.leaves(value):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            dtype = np.asarray(leaf).dtype
        if not jax.dtypes.issubdtype(dtype, np.floating):
            raise TypeError(f"{name} must be a float array, got {name}: {_describe(leaf)}")
    if shape is not None and tuple(np.shape(value)) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got shape {np.shape(value)}")


def check_like(name: str, value: Any, reference: Any, reference_name: str) -> None:
    """``ValueError`` unless the pytree ``value`` has the structure and leaf shapes of
    ``reference``; ``TypeError`` unless its leaves are floating (see :func:`check_float_array`)."""
    check_float_array(name, value)
    leaves, treedef = jax.tree.flatten(value)
    ref_leaves, ref_treedef = jax.tree.flatten(reference)
    got = [tuple(np.shape(leaf)) for leaf in leaves]
    expected = [tuple(np.shape(leaf)) for leaf in ref_leaves]
    if treedef != ref_treedef or got != expected:
        shown = lambda s: s[0] if len(s) == 1 else s
        raise ValueError(
            f"{name} must be shaped like {reference_name}: expected {shown(expected)}, "
            f"got {shown(got) if got else value!r}"
        )


def check_finite(name: str, value: Any) -> None:
    """``ValueError`` when a concrete ``value`` has a NaN or infinite entry (no-op on tracers)."""
    if is_concrete(value) and not np.all(np.isfinite(np.asarray(value, np.float64))):
        raise ValueError(f"{name} must be finite, got a non-finite entry in {name}")
