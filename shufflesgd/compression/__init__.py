"""The compression family: compressors, error feedback, and compressed distributed runs.

* :mod:`~shufflesgd.compression.base` -- the :class:`Compressor` protocol and pytree helpers;
* :mod:`~shufflesgd.compression.sparsification`, :mod:`~shufflesgd.compression.quantization`,
  :mod:`~shufflesgd.compression.low_rank` -- the compressors;
  :mod:`~shufflesgd.compression.threshold_top_k` -- Top-k by a threshold select on the
  magnitude bits, exact or from a sampled threshold;
  :mod:`~shufflesgd.compression.registry` names them;
* :mod:`~shufflesgd.compression.error_feedback` -- compressed GD, EF14, EF21, EF21-W/-PP/-BC,
  EF21-SGDM and EF21-HB;
* :mod:`~shufflesgd.compression.demo` -- DeMo, decoupled momentum as an optax transformation
  over a worker axis;
* :mod:`~shufflesgd.compression.zeroth_order` -- two-point zeroth-order updates whose
  directions come from a shared key, each worker sending a few bits per direction;
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
from shufflesgd.compression.demo import (
    DeMoState,
    demo,
    demo_bits,
    extract_fast_components,
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
    check_momentum,
    check_participation,
    check_weights,
    compressed_gd,
    ef14,
    ef21,
    ef21_bc,
    ef21_hb,
    ef21_pp,
    ef21_sgdm,
    ef21_w,
    mean_over_workers,
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
from shufflesgd.compression.threshold_top_k import (
    magnitude_bits,
    sampled_contraction,
    sampled_threshold_top_k,
    threshold_top_k,
)
from shufflesgd.compression.zeroth_order import (
    ZerothOrder,
    ZOInfo,
    ZOState,
    apply_codes,
    dequantize,
    direction,
    quantize,
    reconstruct,
    spsa_projected_gradient,
    zeroth_order,
)

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "DeMoState",
    "DistributedResult",
    "EFInfo",
    "EFState",
    "ErrorFeedback",
    "FLOAT_BITS",
    "INITIAL_MEMORIES",
    "METHODS",
    "ShardedRun",
    "ZOInfo",
    "ZOState",
    "ZerothOrder",
    "apply_codes",
    "approx_top_k",
    "check_momentum",
    "check_participation",
    "check_tree",
    "checked_compressor",
    "check_weights",
    "compress_tree",
    "compressed_gd",
    "demo",
    "demo_bits",
    "dequantize",
    "direction",
    "ef14",
    "ef21",
    "ef21_bc",
    "ef21_bc_step_size",
    "ef21_hb",
    "ef21_pp",
    "ef21_pp_constants",
    "ef21_pp_step_size",
    "ef21_sgdm",
    "ef21_step_size",
    "ef21_theta_beta",
    "ef21_w",
    "extract_fast_components",
    "identity",
    "init_tree",
    "low_rank",
    "magnitude_bits",
    "mean_over_workers",
    "make_compressor",
    "make_distributed_run",
    "make_sharded_distributed_run",
    "matrix_shape",
    "natural_compression",
    "natural_dithering",
    "power_sgd",
    "problem_shardings",
    "qsgd",
    "quantize",
    "rand_k",
    "reconstruct",
    "sampled_contraction",
    "sampled_threshold_top_k",
    "scaled_sign",
    "shard_problem",
    "sign",
    "smoothness_weights",
    "spsa_projected_gradient",
    "threshold_top_k",
    "top_k",
    "top_k_indices",
    "tree_bits",
    "tree_contraction",
    "tree_variance",
    "worker_keys",
    "zeroth_order",
]
