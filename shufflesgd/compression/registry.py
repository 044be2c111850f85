r"""Compressors by name: :data:`COMPRESSORS` and :func:`make_compressor`, the lookup that
configuration files use (``make_compressor("top_k", fraction=0.01)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shufflesgd.compression.base import Compressor, identity
from shufflesgd.compression.low_rank import low_rank, power_sgd
from shufflesgd.compression.quantization import (
    natural_compression,
    natural_dithering,
    qsgd,
    scaled_sign,
    sign,
)
from shufflesgd.compression.sparsification import approx_top_k, rand_k, top_k
from shufflesgd.compression.threshold_top_k import sampled_threshold_top_k, threshold_top_k

PyTree = Any


#: Every compressor constructor by name, as :func:`make_compressor` takes it.
#:
#: :meta hide-value:
COMPRESSORS: dict[str, Callable[..., Compressor]] = {
    "identity": identity,
    "top_k": top_k,
    "approx_top_k": approx_top_k,
    "threshold_top_k": threshold_top_k,
    "sampled_threshold_top_k": sampled_threshold_top_k,
    "rand_k": rand_k,
    "sign": sign,
    "scaled_sign": scaled_sign,
    "qsgd": qsgd,
    "natural": natural_compression,
    "natural_dithering": natural_dithering,
    "low_rank": low_rank,
    "power_sgd": power_sgd,
}


def make_compressor(name: str, **options: Any) -> Compressor:
    """The compressor called ``name`` (a key of :data:`COMPRESSORS`) with ``options``."""
    if name not in COMPRESSORS:
        raise ValueError(f"compressor must be one of {sorted(COMPRESSORS)}, got {name!r}")
    return COMPRESSORS[name](**options)
