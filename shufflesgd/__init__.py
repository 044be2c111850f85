"""shufflesgd: pure-JAX shuffling SGD, error feedback, score-based SDE solvers and MCMC."""

from shufflesgd import problems, shuffling, training

__all__ = ["problems", "shuffling", "training"]
__version__ = "0.1.0"
