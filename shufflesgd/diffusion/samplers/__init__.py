"""Reverse-time samplers, one file per family.

* ``base.py``: the calling convention (:class:`Model`, :class:`SamplerInfo`, the noise and
  final-step conventions, :func:`sample_batch`) and the building blocks of a sampler;
* ``sde.py``: Euler–Maruyama, reverse diffusion, ancestral sampling (DDPM), predictor–corrector;
* ``ode.py``: the probability-flow ODE by Euler, Heun and adaptive Dopri5; DDIM;
* ``dpm_solver.py``: DPM-Solver++ 2M and 3M, dynamic thresholding;
* ``dpm_solver_v3.py``: DPM-Solver-v3, the multistep predictor-corrector with empirical model
  statistics (``model_statistics.py``: the statistics, exact for Gaussian data or estimated);
* ``momentum.py``: heavy-ball momentum on DPM-Solver++ and PLMS, Generalized Heavy Ball;
* ``mrs.py``: MRS, the ODE and SDE solvers of mean-reverting diffusion (IR-SDE);
* ``edm.py``: EDM's stochastic Heun sampler with churn;
* ``restart.py``: Restart sampling;
* ``time_shift.py``: the Time-Shift sampler (TS-DDIM, TS-DDPM) against exposure bias;
* ``epsilon_scaling.py``: Epsilon Scaling, a model transform against exposure bias;
* ``unipc.py``: UniPC, the unified predictor-corrector (UniP-p with UniC), orders 1 to 3;
* ``dc_solver.py``: DC-Solver, UniPC with dynamic compensation, its ratio search and the
  cascade polynomial regression of the ratios;
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
from shufflesgd.diffusion.samplers.dc_solver import (
    CascadePolynomial,
    DCRatioFit,
    dc_solver,
    fit_cascade_polynomial,
    fit_dc_ratios,
    predict_dc_ratios,
)
from shufflesgd.diffusion.samplers.dpm_solver import (
    dpm_solver_pp_2m,
    dpm_solver_pp_3m,
    dynamic_threshold,
)
from shufflesgd.diffusion.samplers.dpm_solver_v3 import dpm_solver_v3
from shufflesgd.diffusion.samplers.edm import edm_heun
from shufflesgd.diffusion.samplers.epsilon_scaling import epsilon_scaling
from shufflesgd.diffusion.samplers.gaussian_law import (
    GaussianSamplerLaw,
    exact_gaussian_law,
    gaussian_sampler_law,
)
from shufflesgd.diffusion.samplers.model_statistics import (
    EMS,
    dpm_solver_pp_ems,
    ems_lambdas,
    estimate_ems,
    gaussian_ems,
)
from shufflesgd.diffusion.samplers.momentum import dpm_solver_pp_hb, ghvb, plms_hb
from shufflesgd.diffusion.samplers.mrs import MRS_PREDICTIONS, MRS_SOLVERS, mrs
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
from shufflesgd.diffusion.samplers.time_shift import time_shift_ddim, time_shift_ddpm
from shufflesgd.diffusion.samplers.unipc import unipc

__all__ = [
    "EMS",
    "FINALS",
    "MRS_PREDICTIONS",
    "MRS_SOLVERS",
    "SAMPLERS",
    "CascadePolynomial",
    "DCRatioFit",
    "GaussianSamplerLaw",
    "Model",
    "SamplerCost",
    "SamplerInfo",
    "SamplerSpec",
    "ancestral",
    "check_final",
    "check_grid",
    "check_model_output",
    "dc_solver",
    "ddim",
    "dpm_solver_pp_2m",
    "dpm_solver_pp_3m",
    "dpm_solver_pp_ems",
    "dpm_solver_pp_hb",
    "dpm_solver_v3",
    "dynamic_threshold",
    "edm_heun",
    "ems_lambdas",
    "epsilon_scaling",
    "estimate_ems",
    "euler_maruyama",
    "exact_gaussian_law",
    "fit_cascade_polynomial",
    "fit_dc_ratios",
    "gaussian_ems",
    "gaussian_sampler_law",
    "ghvb",
    "make_sampler",
    "mixture_model",
    "mrs",
    "pf_ode_adaptive",
    "pf_ode_drift",
    "pf_ode_euler",
    "pf_ode_heun",
    "plms_hb",
    "predict_dc_ratios",
    "predictor_corrector",
    "restart",
    "reverse_diffusion",
    "sample_batch",
    "sampler_spec",
    "time_shift_ddim",
    "time_shift_ddpm",
    "unipc",
]
