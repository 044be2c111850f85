r"""The sampler registry: every sampler by name, with what one run costs.

:data:`SAMPLERS` maps each name to a :class:`SamplerSpec`: the sampler function, the paper it
implements, and its cost per grid step — model evaluations (NFE) and standard Gaussian draws —
plus the evaluations that do not depend on the number of steps (Restart's :math:`2KS`).  A
count that depends on the sampler's options is a function of those options, named by its
arguments (``corrector_steps``, ``restart_k``, ...); :meth:`SamplerSpec.cost` fills them from
the options given and the sampler's own defaults.  On an :math:`N`-step grid that ends at
:math:`\sigma > 0`,

.. math:: \mathrm{NFE} = N \cdot \mathrm{nfe\_per\_step} + \mathrm{nfe\_fixed}
          + [\mathrm{final} \ne \mathrm{"none"}],

which is what the sampler reports in ``info.nfe``; the noise array of an explicit-noise run
(:func:`shufflesgd.diffusion.exact_gaussian_law`) has ``noise_draws_per_step`` draws a step.
``affine`` says whether, with a model affine in :math:`x` (a Gaussian target), the output is
affine in :math:`(x_T, \text{noise})`, so that its law is exactly Gaussian.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from shufflesgd._checks import check_int, is_concrete
from shufflesgd.diffusion.samplers.base import SamplerInfo
from shufflesgd.diffusion.samplers.dc_solver import dc_solver
from shufflesgd.diffusion.samplers.dpm_solver import dpm_solver_pp_2m, dpm_solver_pp_3m
from shufflesgd.diffusion.samplers.dpm_solver_v3 import dpm_solver_v3
from shufflesgd.diffusion.samplers.edm import edm_heun
from shufflesgd.diffusion.samplers.momentum import dpm_solver_pp_hb, ghvb, plms_hb
from shufflesgd.diffusion.samplers.ode import (
    ddim,
    pf_ode_adaptive,
    pf_ode_euler,
    pf_ode_heun,
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

Array = jax.Array
Sampler = Callable[..., tuple[Array, SamplerInfo]]
Count = int | Callable[..., int]


class SamplerCost(NamedTuple):
    """What one run of a sampler costs, for given options: model evaluations per grid step, the
    evaluations that do not depend on the number of steps, and Gaussian draws per grid step."""

    nfe_per_step: int
    nfe_fixed: int
    noise_draws_per_step: int


def _count(count: Count, options: dict[str, Any]) -> int:
    if callable(count):
        return int(count(**{name: options[name] for name in inspect.signature(count).parameters}))
    return count


class SamplerSpec(NamedTuple):
    """A registered sampler and its cost.

    ``nfe_per_step``, ``nfe_fixed`` and ``noise_draws_per_step`` are ints, or functions of the
    sampler options they depend on (their argument names); ``nfe_per_step`` is ``None`` when
    the count is set at run time (an adaptive step-size controller).  ``affine``: the output is
    affine in :math:`(x_T, \\text{noise})` whenever the model is affine in :math:`x`.
    """

    sampler: Sampler
    paper: str
    nfe_per_step: Count | None
    noise_draws_per_step: Count
    nfe_fixed: Count = 0
    affine: bool = True

    @property
    def name(self) -> str:
        return self.sampler.__name__

    def options(self, **options: Any) -> dict[str, Any]:
        """The sampler's keyword options: its defaults, overridden by ``options``.  ``TypeError``
        for a name the sampler does not take."""
        parameters = inspect.signature(self.sampler).parameters.items()
        keyword_only = inspect.Parameter.KEYWORD_ONLY
        defaults = {name: p.default for name, p in parameters if p.kind is keyword_only}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise TypeError(
                f"{self.name} has no option {', '.join(unknown)}; "
                f"its options are {sorted(defaults)}"
            )
        return {**defaults, **options}

    def cost(self, **options: Any) -> SamplerCost:
        """NFE per step, fixed NFE and draws per step under ``options`` (the sampler's defaults
        for the rest).  ``ValueError`` when the NFE is set at run time."""
        if self.nfe_per_step is None:
            raise ValueError(
                f"{self.name}'s evaluations are chosen by its step-size controller "
                "at run time, not by the grid: read info.nfe"
            )
        options = self.options(**options)
        return SamplerCost(
            _count(self.nfe_per_step, options),
            _count(self.nfe_fixed, options),
            _count(self.noise_draws_per_step, options),
        )

    def nfe(self, num_steps: int, **options: Any) -> int:
        r"""``info.nfe`` of a run on a ``num_steps``-step grid that ends at :math:`\sigma > 0`,
        final step (the option ``final``, by default the sampler's) included."""
        num_steps = check_int("num_steps", num_steps)
        cost = self.cost(**options)
        final = self.options(**options)["final"]
        return cost.nfe_per_step * num_steps + cost.nfe_fixed + (final != "none")

    def steps_within(self, budget: int, **options: Any) -> int | None:
        """The most grid steps whose :meth:`nfe` fits ``budget`` (``None`` when one step does
        not)."""
        budget = check_int("budget", budget)
        cost = self.cost(**options)
        final = self.options(**options)["final"]
        steps = (budget - cost.nfe_fixed - (final != "none")) // cost.nfe_per_step
        return steps if steps >= 1 else None


def _churn_draws(S_churn: Any) -> int:
    """EDM Heun skips its draws when the churn is a concrete zero."""
    return 0 if is_concrete(S_churn) and float(S_churn) == 0.0 else 1


#: Every sampler by name, with its :class:`SamplerSpec`.
#:
#: :meta hide-value:
SAMPLERS: dict[str, SamplerSpec] = {
    "euler_maruyama": SamplerSpec(
        euler_maruyama,
        "Song et al. 2021, Score-Based Generative Modeling through SDEs, Sec. 4.1",
        nfe_per_step=1,
        noise_draws_per_step=1,
    ),
    "reverse_diffusion": SamplerSpec(
        reverse_diffusion,
        "Song et al. 2021, Score-Based Generative Modeling through SDEs, App. E, Eq. 45",
        nfe_per_step=1,
        noise_draws_per_step=1,
    ),
    "ancestral": SamplerSpec(
        ancestral,
        "Ho, Jain & Abbeel 2020, Denoising Diffusion Probabilistic Models, Alg. 2",
        nfe_per_step=1,
        noise_draws_per_step=1,
    ),
    "ddim": SamplerSpec(
        ddim,
        "Song, Meng & Ermon 2021, Denoising Diffusion Implicit Models, Eq. 12",
        nfe_per_step=1,
        noise_draws_per_step=1,
    ),
    "predictor_corrector": SamplerSpec(
        predictor_corrector,
        "Song et al. 2021, Score-Based Generative Modeling through SDEs, Alg. 1-3",
        nfe_per_step=lambda corrector_steps: corrector_steps + 1,
        noise_draws_per_step=lambda corrector_steps: corrector_steps + 1,
        affine=False,
    ),
    "pf_ode_euler": SamplerSpec(
        pf_ode_euler,
        "Song et al. 2021, Score-Based Generative Modeling through SDEs, Sec. 4.3 (Euler)",
        nfe_per_step=1,
        noise_draws_per_step=0,
    ),
    "pf_ode_heun": SamplerSpec(
        pf_ode_heun,
        "Karras, Aittala, Aila & Laine 2022, Elucidating the Design Space of Diffusion-Based "
        "Generative Models, Alg. 1",
        nfe_per_step=2,
        noise_draws_per_step=0,
    ),
    "dpm_solver_pp_2m": SamplerSpec(
        dpm_solver_pp_2m,
        "Lu et al. 2022, DPM-Solver++, Alg. 2 (second order)",
        nfe_per_step=1,
        noise_draws_per_step=0,
    ),
    "dpm_solver_pp_3m": SamplerSpec(
        dpm_solver_pp_3m,
        "Lu et al. 2022, DPM-Solver++, Alg. 2 with the authors' third-order update",
        nfe_per_step=1,
        noise_draws_per_step=0,
    ),
    "dpm_solver_v3": SamplerSpec(
        dpm_solver_v3,
        "Zheng, Lu, Chen & Zhu 2023, DPM-Solver-v3: Improved Diffusion ODE Solver with "
        "Empirical Model Statistics, Sec. 3 (multistep predictor-corrector)",
        nfe_per_step=1,
        noise_draws_per_step=0,
    ),
    "edm_heun": SamplerSpec(
        edm_heun,
        "Karras, Aittala, Aila & Laine 2022, Elucidating the Design Space of Diffusion-Based "
        "Generative Models, Alg. 2",
        nfe_per_step=2,
        noise_draws_per_step=_churn_draws,
    ),
    "restart": SamplerSpec(
        restart,
        "Xu et al. 2023, Restart Sampling for Improving Generative Processes, Alg. 1",
        nfe_per_step=2,
        noise_draws_per_step=lambda restart_k: restart_k,
        nfe_fixed=lambda restart_k, restart_steps: 2 * restart_k * restart_steps,
    ),
    "dpm_solver_pp_hb": SamplerSpec(
        dpm_solver_pp_hb,
        "Wizadwongsa et al. 2024, Diffusion Sampling with Momentum for Mitigating Divergence "
        "Artifacts, Eq. 14 (heavy ball) on Lu et al. 2022, DPM-Solver++, Alg. 2",
        nfe_per_step=1,
        noise_draws_per_step=0,
    ),
    "plms_hb": SamplerSpec(
        plms_hb,
        "Wizadwongsa et al. 2024, Diffusion Sampling with Momentum for Mitigating Divergence "
        "Artifacts, Alg. 1 (PLMS with heavy ball)",
        nfe_per_step=1,
        noise_draws_per_step=0,
    ),
    "ghvb": SamplerSpec(
        ghvb,
        "Wizadwongsa et al. 2024, Diffusion Sampling with Momentum for Mitigating Divergence "
        "Artifacts, Alg. 2 (Generalized Heavy Ball)",
        nfe_per_step=1,
        noise_draws_per_step=0,
    ),
    "unipc": SamplerSpec(
        unipc,
        "Zhao, Bai, Rao, Zhou & Lu 2023, UniPC: A Unified Predictor-Corrector Framework for "
        "Fast Sampling of Diffusion Models, Alg. 1-3 (multistep UniP-p with UniC)",
        nfe_per_step=1,
        noise_draws_per_step=0,
    ),
    "dc_solver": SamplerSpec(
        dc_solver,
        "Zhao, Wang, Zhou & Lu 2024, DC-Solver: Improving Predictor-Corrector Diffusion Sampler "
        "via Dynamic Compensation, Sec. 3 (UniPC with dynamic compensation; uncompensated UniPC "
        "with ratios=None)",
        nfe_per_step=1,
        noise_draws_per_step=0,
    ),
    "pf_ode_adaptive": SamplerSpec(
        pf_ode_adaptive,
        "Dormand & Prince 1980 (Dopri5) on Song et al. 2021's probability-flow ODE, Sec. 4.3",
        nfe_per_step=None,
        noise_draws_per_step=0,
        affine=False,
    ),
    "time_shift_ddim": SamplerSpec(
        time_shift_ddim,
        "Li, Qu, Yao, Sun & Moens 2024, Alleviating Exposure Bias in Diffusion Models through "
        "Sampling with Shifted Time Steps, Alg. 1 (TS-DDIM)",
        nfe_per_step=1,
        noise_draws_per_step=1,
        affine=False,
    ),
    "time_shift_ddpm": SamplerSpec(
        time_shift_ddpm,
        "Li, Qu, Yao, Sun & Moens 2024, Alleviating Exposure Bias in Diffusion Models through "
        "Sampling with Shifted Time Steps, Alg. 1 (TS-DDPM)",
        nfe_per_step=1,
        noise_draws_per_step=1,
        affine=False,
    ),
}


def sampler_spec(name: str) -> SamplerSpec:
    """The :class:`SamplerSpec` registered as ``name`` (a key of :data:`SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def make_sampler(name: str) -> Sampler:
    """The sampler function registered as ``name`` (a key of :data:`SAMPLERS`)."""
    return sampler_spec(name).sampler
