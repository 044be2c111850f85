"""shufflesgd: pure-JAX shuffling SGD, error feedback, score-based SDE solvers and MCMC."""

from shufflesgd import compression, error_feedback, mcmc, parallel, problems, sde, shuffling, solvers, training

__all__ = ["compression", "error_feedback", "mcmc", "parallel", "problems", "sde", "shuffling", "solvers", "training"]
__version__ = "0.1.0"
