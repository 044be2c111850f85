r"""The MCMC family: kernels as ``(init, step)`` pairs, in the manner of BlackJAX.

``base`` (the protocol), ``langevin`` (ULA, MALA), ``hmc``, ``integrators`` (BAOAB),
``stochastic_gradient`` (SGLD, SGHMC), ``cyclical`` (cyclical SGLD / SGHMC),
``thermostat`` (SGNHT), ``entropy_mcmc`` (Entropy-MCMC), ``ensemble`` (gradient-free
ensemble smoothed scores), ``smoothing`` (Gaussian-smoothed scores, Tweedie),
``walk_jump`` (walk–jump, the chain of log-concave chains), ``follmer``
(Schrödinger–Föllmer), ``adaptation`` (dual averaging) and ``diagnostics`` (ESS, split
:math:`\hat R`).  Every public name is re-exported here.
"""

from shufflesgd.mcmc.adaptation import (
    adapt_step_size,
)
from shufflesgd.mcmc.base import (
    GradientState,
    LogDensity,
    MCMCInfo,
    SamplingAlgorithm,
    check_logdensity,
)
from shufflesgd.mcmc.chains import (
    first_nonfinite_step,
    run_chain,
    run_minibatch_chain,
)
from shufflesgd.mcmc.cyclical import (
    CyclicalInfo,
    CyclicalState,
    cycle_fraction,
    cyclical_sghmc,
    cyclical_sgld,
    cyclical_step_size,
)
from shufflesgd.mcmc.diagnostics import (
    effective_sample_size,
    split_rhat,
)
from shufflesgd.mcmc.ensemble import (
    EnsembleInfo,
    EnsembleState,
    ensemble_smoothed_score,
    ensemble_walk_jump,
)
from shufflesgd.mcmc.entropy_mcmc import (
    EntropyMCMCState,
    entropy_mcmc,
)
from shufflesgd.mcmc.follmer import (
    FollmerState,
    follmer,
)
from shufflesgd.mcmc.hmc import (
    hmc,
)
from shufflesgd.mcmc.integrators import (
    baoab,
)
from shufflesgd.mcmc.langevin import (
    mala,
    ula,
)
from shufflesgd.mcmc.smoothing import (
    ImportanceScore,
    SmoothedScore,
    importance_smoothed_score,
    mixture_smoothed_score,
    monte_carlo_smoothed_score,
    tweedie_denoiser,
)
from shufflesgd.mcmc.stochastic_gradient import (
    SGHMC_INTEGRATORS,
    GradientEstimator,
    SGState,
    sghmc,
    sgld,
)
from shufflesgd.mcmc.thermostat import (
    SGNHTState,
    sgnht,
)
from shufflesgd.mcmc.walk_jump import (
    MultiMeasurementState,
    UnderdampedWalkState,
    WalkState,
    chain_of_log_concave_chains,
    conditional_measurement_score,
    jump,
    multimeasurement_jump,
    underdamped_walk_jump,
    walk_jump,
)

__all__ = [
    "CyclicalInfo",
    "CyclicalState",
    "EnsembleInfo",
    "EnsembleState",
    "EntropyMCMCState",
    "FollmerState",
    "GradientEstimator",
    "GradientState",
    "ImportanceScore",
    "LogDensity",
    "MCMCInfo",
    "MultiMeasurementState",
    "SGHMC_INTEGRATORS",
    "SGNHTState",
    "SGState",
    "SamplingAlgorithm",
    "SmoothedScore",
    "UnderdampedWalkState",
    "WalkState",
    "adapt_step_size",
    "baoab",
    "chain_of_log_concave_chains",
    "check_logdensity",
    "conditional_measurement_score",
    "cycle_fraction",
    "cyclical_sghmc",
    "cyclical_sgld",
    "cyclical_step_size",
    "effective_sample_size",
    "ensemble_smoothed_score",
    "ensemble_walk_jump",
    "entropy_mcmc",
    "first_nonfinite_step",
    "follmer",
    "hmc",
    "importance_smoothed_score",
    "jump",
    "mala",
    "mixture_smoothed_score",
    "monte_carlo_smoothed_score",
    "multimeasurement_jump",
    "run_chain",
    "run_minibatch_chain",
    "sghmc",
    "sgld",
    "sgnht",
    "split_rhat",
    "tweedie_denoiser",
    "ula",
    "underdamped_walk_jump",
    "walk_jump",
]
