"""Reverse-time samplers, one file per family.

* ``base.py``: the calling convention (:class:`Model`, :class:`SamplerInfo`, the noise and
  final-step conventions, :func:`sample_batch`) and the building blocks of a sampler;
* ``sde.py``: Euler–Maruyama, reverse diffusion, ancestral sampling (DDPM), predictor–corrector;
* ``ode.py``: the probability-flow ODE by Euler, Heun and adaptive Dopri5; DDIM;
* ``dpm_solver.py``: DPM-Solver++ 2M and 3M, dynamic thresholding;
* ``edm.py``: EDM's stochastic Heun sampler with churn;
* ``restart.py``: Restart sampling;
* ``gaussian_law.py``: exact output laws on a Gaussian target;
* ``registry.py``: :data:`SAMPLERS`, every sampler by name with its NFE and noise draws per step.
"""

from shufflesgd.diffusion.samplers.base import (
    FINALS,
    Model,
    SamplerInfo,
    check_final,
    check_grid,
    check_model_output,
    mixture_model,
    pf_ode_drift,
    sample_batch,
)
from shufflesgd.diffusion.samplers.dpm_solver import (
    dpm_solver_pp_2m,
    dpm_solver_pp_3m,
    dynamic_threshold,
)
from shufflesgd.diffusion.samplers.edm import edm_heun
from shufflesgd.diffusion.samplers.gaussian_law import (
    GaussianSamplerLaw,
    exact_gaussian_law,
    gaussian_sampler_law,
)
from shufflesgd.diffusion.samplers.ode import (
    ddim,
    pf_ode_adaptive,
    pf_ode_euler,
    pf_ode_heun,
)
from shufflesgd.diffusion.samplers.registry import (
    SAMPLERS,
    SamplerCost,
    SamplerSpec,
    make_sampler,
    sampler_spec,
)
from shufflesgd.diffusion.samplers.restart import restart
from shufflesgd.diffusion.samplers.sde import (
    ancestral,
    euler_maruyama,
    predictor_corrector,
    reverse_diffusion,
)

__all__ = [
    "FINALS",
    "SAMPLERS",
    "GaussianSamplerLaw",
    "Model",
    "SamplerCost",
    "SamplerInfo",
    "SamplerSpec",
    "ancestral",
    "check_final",
    "check_grid",
    "check_model_output",
    "ddim",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_3m",
    "dynamic_threshold",
    "edm_heun",
    "euler_maruyama",
    "exact_gaussian_law",
    "gaussian_sampler_law",
    "make_sampler",
    "mixture_model",
    "pf_ode_adaptive",
    "pf_ode_drift",
    "pf_ode_euler",
    "pf_ode_heun",
    "predictor_corrector",
    "restart",
    "reverse_diffusion",
    "sample_batch",
    "sampler_spec",
]
