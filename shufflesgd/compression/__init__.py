"""The compression family: compressors, error feedback, and compressed distributed runs.

* :mod:`~shufflesgd.compression.base` -- the :class:`Compressor` protocol and pytree helpers;
* :mod:`~shufflesgd.compression.sparsification`, :mod:`~shufflesgd.compression.quantization`,
  :mod:`~shufflesgd.compression.low_rank` -- the compressors;
  :mod:`~shufflesgd.compression.registry` names them;
* :mod:`~shufflesgd.compression.error_feedback` -- compressed GD, EF14, EF21, EF21-W/-PP/-BC;
* :mod:`~shufflesgd.compression.step_sizes` -- their theoretical step sizes;
* :mod:`~shufflesgd.compression.distributed`, :mod:`~shufflesgd.compression.sharded` -- jitted
  runs on a :class:`~shufflesgd.problems.DistributedSum`, on one device or a mesh.
"""

from shufflesgd.compression.base import (
    FLOAT_BITS,
    Compressor,
    check_tree,
    checked_compressor,
    compress_tree,
    identity,
    init_tree,
    tree_bits,
    tree_contraction,
    tree_variance,
)
from shufflesgd.compression.distributed import (
    DistributedResult,
    make_distributed_run,
)
from shufflesgd.compression.error_feedback import (
    INITIAL_MEMORIES,
    METHODS,
    EFInfo,
    EFState,
    ErrorFeedback,
    check_participation,
    check_weights,
    compressed_gd,
    ef14,
    ef21,
    ef21_bc,
    ef21_pp,
    ef21_w,
    worker_keys,
)
from shufflesgd.compression.low_rank import (
    low_rank,
    matrix_shape,
    power_sgd,
)
from shufflesgd.compression.quantization import (
    natural_compression,
    natural_dithering,
    qsgd,
    scaled_sign,
    sign,
)
from shufflesgd.compression.registry import (
    COMPRESSORS,
    make_compressor,
)
from shufflesgd.compression.sharded import (
    ShardedRun,
    make_sharded_distributed_run,
    problem_shardings,
    shard_problem,
)
from shufflesgd.compression.sparsification import (
    approx_top_k,
    rand_k,
    top_k,
    top_k_indices,
)
from shufflesgd.compression.step_sizes import (
    ef21_bc_step_size,
    ef21_pp_constants,
    ef21_pp_step_size,
    ef21_step_size,
    ef21_theta_beta,
    smoothness_weights,
)

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "DistributedResult",
    "EFInfo",
    "EFState",
    "ErrorFeedback",
    "FLOAT_BITS",
    "INITIAL_MEMORIES",
    "METHODS",
    "ShardedRun",
    "approx_top_k",
    "check_participation",
    "check_tree",
    "checked_compressor",
    "check_weights",
    "compress_tree",
    "compressed_gd",
    "ef14",
    "ef21",
    "ef21_bc",
    "ef21_bc_step_size",
    "ef21_pp",
    "ef21_pp_constants",
    "ef21_pp_step_size",
    "ef21_step_size",
    "ef21_theta_beta",
    "ef21_w",
    "identity",
    "init_tree",
    "low_rank",
    "make_compressor",
    "make_distributed_run",
    "make_sharded_distributed_run",
    "matrix_shape",
    "natural_compression",
    "natural_dithering",
    "power_sgd",
    "problem_shardings",
    "qsgd",
    "rand_k",
    "scaled_sign",
    "shard_problem",
    "sign",
    "smoothness_weights",
    "top_k",
    "top_k_indices",
    "tree_bits",
    "tree_contraction",
    "tree_variance",
    "worker_keys",
]
