"""shufflesgd: pure-JAX shuffling SGD, error feedback, score-based diffusion sampling and MCMC.

One subpackage per family: :mod:`shufflesgd.shuffling`, :mod:`shufflesgd.compression`,
:mod:`shufflesgd.diffusion`, :mod:`shufflesgd.mcmc`, :mod:`shufflesgd.problems`, and
:mod:`shufflesgd.nn` (networks, data, checkpoints); :mod:`shufflesgd.parallel` holds meshes and
shardings and :mod:`shufflesgd.drivers` the ``lax.scan`` drivers every family uses.
``shufflesgd.nn`` is imported on its own, so that ``import shufflesgd`` does not load Flax,
TensorFlow Datasets or Orbax.
"""

from shufflesgd import (
    compression,
    diffusion,
    drivers,
    mcmc,
    metrics,
    parallel,
    problems,
    shuffling,
)

__all__ = [
    "compression",
    "diffusion",
    "drivers",
    "mcmc",
    "metrics",
    "parallel",
    "problems",
    "shuffling",
]
__version__ = "0.1.0"
