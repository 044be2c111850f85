"""shufflesgd: pure-JAX shuffling SGD, error feedback, score-based SDE solvers and MCMC.

``shufflesgd.data`` (TFDS sources), ``shufflesgd.network_training`` (which reads through it)
and ``shufflesgd.checkpoint`` (Orbax) are imported on their own, so that ``import shufflesgd``
does not load TensorFlow Datasets or Orbax.
"""

from shufflesgd import (
    compression,
    error_feedback,
    likelihood,
    mcmc,
    models,
    parallel,
    problems,
    sde,
    shuffling,
    solvers,
    targets,
    training,
    walk_jump,
)

__all__ = [
    "compression", "error_feedback", "likelihood", "mcmc", "models", "parallel",
    "problems", "sde", "shuffling", "solvers", "targets", "training", "walk_jump",
]
__version__ = "0.1.0"
