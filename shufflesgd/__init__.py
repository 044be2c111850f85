"""shufflesgd: pure-JAX shuffling SGD, error feedback, score-based SDE solvers and MCMC."""

from shufflesgd import compression, error_feedback, parallel, problems, shuffling, training

__all__ = ["compression", "error_feedback", "parallel", "problems", "shuffling", "training"]
__version__ = "0.1.0"
