r"""The problems family: test beds whose answers are known exactly.

* :mod:`~shufflesgd.problems.finite_sums` -- :math:`f = \frac1n\sum_i f_i` with its optimum
  (least squares and ridge in closed form, logistic regression by Newton's method) and the
  synthetic instances;
* :mod:`~shufflesgd.problems.lower_bounds` -- the instances on which shuffling schemes attain
  their worst-case rates;
* :mod:`~shufflesgd.problems.distributed_sums` -- finite sums split over workers, with each
  worker's smoothness constant;
* :mod:`~shufflesgd.problems.mixtures` -- Gaussian mixtures with exact scores under every
  linear forward process, class-conditional ones too;
* :mod:`~shufflesgd.problems.targets` -- sampling targets (Neal's funnel, Bayesian linear and
  logistic regression).
"""

from shufflesgd.problems.distributed_sums import (
    DistributedSum,
    distributed_least_squares,
    distributed_logistic_regression,
    distributed_quadratic,
    heterogeneous_regression,
)
from shufflesgd.problems.finite_sums import (
    FiniteSum,
    least_squares,
    logistic_regression,
    synthetic_classification,
    synthetic_regression,
)
from shufflesgd.problems.lower_bounds import (
    piecewise_quadratic,
    safran_shamir_quadratic,
)
from shufflesgd.problems.mixtures import (
    SHORT_AXIS,
    ConditionalMixture,
    EigenMixture,
    GaussianMixture,
    conditional_mixture,
    gaussian_mixture,
    random_gaussian_mixture,
    three_mode_mixture_2d,
)
from shufflesgd.problems.targets import (
    BayesianFiniteSum,
    GaussianPosterior,
    bayesian_linear_regression,
    bayesian_logistic_regression,
    funnel_logdensity,
    funnel_sample,
)

__all__ = [
    "BayesianFiniteSum",
    "ConditionalMixture",
    "DistributedSum",
    "EigenMixture",
    "FiniteSum",
    "GaussianMixture",
    "GaussianPosterior",
    "SHORT_AXIS",
    "bayesian_linear_regression",
    "bayesian_logistic_regression",
    "conditional_mixture",
    "distributed_least_squares",
    "distributed_logistic_regression",
    "distributed_quadratic",
    "funnel_logdensity",
    "funnel_sample",
    "gaussian_mixture",
    "heterogeneous_regression",
    "least_squares",
    "logistic_regression",
    "piecewise_quadratic",
    "random_gaussian_mixture",
    "safran_shamir_quadratic",
    "synthetic_classification",
    "synthetic_regression",
    "three_mode_mixture_2d",
]
