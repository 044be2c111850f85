r"""Our jitted SDE/ODE samplers against diffusers and k-diffusion on one analytic mixture.

The target is a 2-D Gaussian mixture (:data:`MIXTURE`, four anisotropic components), whose
score is exact at every noise level.  Both sides sample it with the same closed form:

* **ours**: :class:`shufflesgd.problems.GaussianMixture` diffused to :math:`(\alpha_t, \sigma_t)`
  and its ``score`` (a :class:`shufflesgd.solvers.Model` of output ``"score"``), run by a
  sampler of :mod:`shufflesgd.solvers` through ``sample_batch`` under one ``jax.jit``;
* **peer**: :class:`TorchMixture`, a line-for-line PyTorch port of the same computation
  (inverse Cholesky factors of the diffused covariances, whitened offsets by matrix products,
  responsibilities by a softmax in log space), converted to :math:`\varepsilon` or
  :math:`D(x;\sigma)` with the formulas of :func:`shufflesgd.sde.convert`;
  :func:`model_agreement` checks that the two agree to float32 rounding, and the test suite
  asserts it.

Six pairings, each with the same noise levels, the same number of model evaluations (NFE),
the same final step and the same initial points ``x_T`` on both sides:

1. ``diffusers.DPMSolverMultistepScheduler`` (its defaults: 1000 training steps, linear
   betas 1e-4 to 0.02, DPM-Solver++(2M) "midpoint", ``lower_order_final``, ``linspace``
   timesteps, final sigma zero, epsilon prediction) against ``dpm_solver_pp_2m`` on the VP
   process (beta 0.1 to 20); our grid holds, for each of the scheduler's noise levels
   :math:`\tilde\sigma = \sqrt{(1-\bar\alpha)/\bar\alpha}`, the VP time with the same
   log-SNR, so :math:`(\alpha, \sigma)` agree at every step, then :math:`t = 0`.
   ``x_T ~ N(0, I)``.  N steps, N evaluations.
2. ``diffusers.UniPCMultistepScheduler`` (its defaults: the same schedule and timesteps,
   UniPC-2 with the corrector, ``bh2``, data prediction, ``lower_order_final``) against
   ``unipc`` (the same options) on the same VP grid.  N steps, N evaluations.
3. ``diffusers.EulerDiscreteScheduler`` (same defaults) against ``pf_ode_euler`` on the EDM
   process with grid = the scheduler's sigmas (ending at 0): both are Euler steps of
   :math:`dx/d\tilde\sigma = (x - D(x;\tilde\sigma))/\tilde\sigma` on
   :math:`\tilde x = x/\alpha` (the scheduler feeds the eps model
   :math:`\tilde x/\sqrt{\tilde\sigma^2+1}`).  ``x_T = init_noise_sigma * z``.
4. ``diffusers.FlowMatchEulerDiscreteScheduler`` (``shift`` = :data:`FLOW_SHIFT`, Stable
   Diffusion 3's) against ``pf_ode_euler`` on the rectified flow
   (:class:`shufflesgd.diffusion.RectifiedFlow`, ``t_max = 1``) with the mixture's exact
   flow-matching velocity (finite at :math:`t = 1`): grid = the scheduler's sigmas (its
   "sigma" is the flow's :math:`t`), from 1 to 0; both take Euler steps
   :math:`x \leftarrow x + (t' - t)u(x, t)`.  ``x_T ~ N(0, I)``.  N steps, N evaluations.
5. ``k_diffusion.sampling.sample_dpmpp_2m`` on ``get_sigmas_karras(N, 0.002, 80, rho=7)``
   (N levels, then 0) against ``dpm_solver_pp_2m`` on the EDM process with grid
   ``time_grid(EDM, "karras", N - 1)`` followed by 0 and ``lower_order_final=False``
   (k-diffusion only lowers the order of the step to sigma 0).  ``x_T = 80 z``.
6. ``k_diffusion.sampling.sample_heun`` (no churn) against ``edm_heun`` (``S_churn = 0``) on
   the same grid: N steps, 2N - 1 evaluations (the step to 0 is Euler on both sides).

NFE budgets are given per row (``nfe_budgets``); Heun takes the most steps that fit
(2N - 1 <= budget).  The evaluations are counted on the peer side by wrapping its model and
compared with our ``info.nfe``.

Measured per pairing and budget:

* **samples/s**: batch / median wall time of one whole sampling run (``block_until_ready``
  for JAX; the peer's run includes ``set_timesteps``, which its pipelines call per run).
  The two sides take turns within each repeat (house pattern), so each ratio is given as
  the ratio of the medians, as the median of the per-repeat ratios (``paired``) and as the
  ratio of the fastest runs (the least disturbed by other load).  One warm-up per side (JAX
  compiles there), reported as ``first_call_seconds``.
* **error at equal NFE**: (a) RMS over samples of the distance to the same ``x_T``'s
  probability-flow ODE solution (``edm_heun`` with ``reference_steps`` Karras steps in
  :math:`\tilde\sigma` down to 1e-4, then to 0; on the flow, ``pf_ode_heun`` on
  ``reference_steps`` uniform steps in :math:`t` from 1 to 0): the discretisation error of each
  side;
  (b) the sliced 2-Wasserstein distance to as many exact mixture samples (``num_projections``
  random directions), with the same distance between two exact sample sets as the Monte
  Carlo floor; (c) the two sides' samples from the same ``x_T`` compared to each other.
* **compile time**: ``jax.jit(f).lower(...)`` and ``.compile()`` of a whole batched sampler
  (``dpm_solver_pp_2m``, ``euler_maruyama``, ``edm_heun``) at 10 and at 1000 steps; samplers
  are ``lax.scan`` loops, so the program does not grow with the steps.  Timed with the mixture
  model and with the isotropic stand-in below, to separate the model's share.

Two more parts say where the time goes:

* **sampler overhead**: the pairings again with a stand-in model whose score is a few
  elementwise operations (``N(0.5, 0.25 I)`` in closed form, the same on both sides), so
  that what is timed is the samplers' own machinery: a fused ``lax.scan`` against the
  peers' Python loops of tensor operations;
* **model alone**: one evaluation of the mixture score on the whole batch on each side (the
  noise level a runtime value, as inside a scan).

Run it on one core (``taskset -c 0``, as ``make bench`` does): both sides are then
single-threaded (torch's thread count follows the usable cores) and neither pays for handing
work to a second thread on a machine other processes are also using; on the shared 2-core dev
machine that hand-off cost up to 30 ms per batched LAPACK call, in both frameworks.

``torch``, ``diffusers`` and ``k-diffusion`` are optional (``make bench``); a missing peer is
reported as ``"not installed"`` and our side still runs.  k-diffusion 0.1.1.post1's package
``__init__`` imports its training stack (torchvision, clean-fid, CLIP, wandb, kornia...), so
:func:`import_k_diffusion_sampling` loads only ``k_diffusion/sampling.py`` under a bare
package; ``sampling.py`` uses one helper of ``k_diffusion/utils.py`` (``append_dims``), whose
module needs torchvision (no torchvision wheel matches torch 2.13.0+cpu here), so when
``utils`` does not import a stand-in module providing only ``append_dims`` is registered.
The JSON says which.

    taskset -c 0 python -m benchmarks.sde_samplers [--quick] [--out PATH] [--torch-threads N]

Run it without ``--xla_cpu_multi_thread_eigen=false`` in ``XLA_FLAGS`` (the Makefile's test
default), which was seen to make the batched LAPACK calls of the mixture score far slower.
``--quick`` shrinks everything for the smoke test.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import math
import os
import pathlib
import re
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    machine_info,
    summarize,
    time_round_robin,
    usable_cores,
    version,
    write_results,
)
from shufflesgd import diffusion, problems

DEFAULT_OUT = pathlib.Path("results/benchmarks/sde_samplers.json")
TARGET_SPEEDUP = 3.0
TARGET_COMPILE_SECONDS = 3.0
PAIRINGS = (
    "diffusers_dpm_solver_multistep",
    "diffusers_unipc_multistep",
    "diffusers_euler_discrete",
    "diffusers_flow_match_euler",
    "k_diffusion_dpmpp_2m",
    "k_diffusion_heun",
)

FULL = dict(
    batch=4096,
    nfe_budgets=(10, 20, 50),
    repeats=15,
    seed=0,
    num_projections=256,
    reference_steps=1000,
    compile_steps=(10, 1000),
    compile_repeats=2,
    compile_models=("mixture", "isotropic"),
    compile_samplers=("dpm_solver_pp_2m", "euler_maruyama", "edm_heun"),
    overhead_nfe_budgets=(20,),
    breakdown_repeats=20,
    overhead_pairings=PAIRINGS,
)
QUICK = dict(
    batch=64,
    nfe_budgets=(6,),
    repeats=3,
    seed=0,
    num_projections=32,
    reference_steps=50,
    compile_steps=(1000,),
    compile_repeats=1,
    compile_models=("mixture",),
    compile_samplers=("dpm_solver_pp_2m",),
    overhead_nfe_budgets=(6,),
    breakdown_repeats=3,
    overhead_pairings=("k_diffusion_dpmpp_2m",),
)

# The target: four anisotropic components in 2-D, unequal weights.
MIXTURE_WEIGHTS = [0.15, 0.25, 0.25, 0.35]
MIXTURE_MEANS = [[-2.0, -1.0], [2.0, -1.5], [-1.0, 2.0], [1.5, 1.5]]
MIXTURE_COVARIANCES = [
    [[0.30, 0.10], [0.10, 0.20]],
    [[0.20, -0.08], [-0.08, 0.40]],
    [[0.50, 0.00], [0.00, 0.10]],
    [[0.25, 0.15], [0.15, 0.35]],
]
MIXTURE = problems.gaussian_mixture(MIXTURE_WEIGHTS, MIXTURE_MEANS, MIXTURE_COVARIANCES)

VP_OPTIONS = dict(beta_min=0.1, beta_max=20.0)  # continuous limit of diffusers' linear 1e-4..0.02
EDM_OPTIONS = dict(sigma_min=0.002, sigma_max=80.0)  # k-diffusion / EDM defaults
KARRAS_RHO = 7.0
FLOW_SHIFT = 3.0  # diffusers' FlowMatchEulerDiscreteScheduler shift: Stable Diffusion 3's setting
REFERENCE_SIGMA_MIN = 1e-4


# ----------------------------------------------------------------------------- helpers


def sliced_w2(a: np.ndarray, b: np.ndarray, directions: np.ndarray) -> float:
    r"""Sliced 2-Wasserstein distance between two equal-size samples:
    :math:`(\mathrm{mean}_\theta W_2^2(\theta^\top a, \theta^\top b))^{1/2}`, each 1-D
    :math:`W_2` from sorted projections, in float64."""
    pa = np.sort(np.asarray(a, np.float64) @ directions.T, axis=0)
    pb = np.sort(np.asarray(b, np.float64) @ directions.T, axis=0)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def rms_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Root mean square over samples of the Euclidean distance between paired rows."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(np.sqrt(np.mean(np.sum(diff**2, axis=-1))))


def karras_sigmas(
    n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO
) -> np.ndarray:
    """Karras et al. (2022), Eq. 5: ``n`` levels from ``sigma_max`` down to ``sigma_min``
    (float64)."""
    u = np.linspace(0.0, 1.0, n)
    return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def vp_time_of_scaled_sigma(sde: diffusion.VP, scaled_sigma: np.ndarray) -> np.ndarray:
    r"""The VP time whose :math:`\sigma/\alpha` is ``scaled_sigma`` (float64 NumPy; the
    closed form of ``VP.time_of_log_snr`` at :math:`\lambda = -2\log\tilde\sigma`):
    :math:`\log\alpha^2 = -\log(1+\tilde\sigma^2)`."""
    log_alpha_sq = -np.log1p(np.asarray(scaled_sigma, np.float64) ** 2)
    delta = sde.beta_max - sde.beta_min
    return (-sde.beta_min + np.sqrt(sde.beta_min**2 - 2.0 * delta * log_alpha_sq)) / delta


# ----------------------------------------------------------------------------- the two models


def jax_model(mixture: problems.GaussianMixture, sde: diffusion.SDE) -> diffusion.Model:
    """The library's closed form: the mixture diffused to ``(alpha(t), sigma(t))``, its score;
    on an interpolant (the flow pairing) its flow-matching velocity
    (:func:`shufflesgd.diffusion.mixture_model`), finite at :math:`t = 1`."""
    if isinstance(sde, diffusion.Interpolant):
        return diffusion.mixture_model(sde, mixture.eigen(), output="velocity")

    def fn(x, t):
        return mixture.diffuse(sde.alpha(t), sde.sigma(t)).score(x)

    return diffusion.Model(fn, "score")


class TorchMixture:
    r"""The same mixture score in PyTorch, batched over rows of ``x`` ``[n, d]``, one noise
    level per call (as our samplers evaluate one grid time per step for the whole batch).

    It follows :class:`shufflesgd.problems.GaussianMixture` operation for operation:
    :math:`C_k = \alpha^2\Sigma_k + \sigma^2 I = L_kL_k^\top`, the inverse factors
    :math:`L_k^{-1}` (Cholesky, then a triangular solve against the identity, once per call),
    whitened offsets :math:`w_k = L_k^{-1}(x - \alpha\mu_k)` by batched matrix products,
    :math:`\log N(x; \alpha\mu_k, C_k)` from :math:`\|w_k\|^2` and the factors' diagonals,
    responsibilities by ``softmax`` in log space, :math:`s = -\sum_k r_k L_k^{-\top}w_k`; then
    :math:`\varepsilon = -\sigma s` and :math:`D = (x + \sigma^2 s)/\alpha` as
    :func:`shufflesgd.sde.convert` does.  Of the layouts tried on one core at batch 4096
    (this one, ``[K, n, d]``: 0.25 ms; feature-major ``[K, d, n]``: 0.26 ms; one stacked
    ``[n, K d]`` product with a softmax over the last axis: 0.50 ms; the earlier
    ``linalg.solve`` port: 0.38-0.40 ms), this was the fastest.
    """

    def __init__(self, mixture: problems.GaussianMixture, torch_module: Any):
        torch = torch_module
        self.torch = torch
        self.log_weights = torch.tensor(np.asarray(mixture.log_weights), dtype=torch.float32)
        self.means = torch.tensor(np.asarray(mixture.means), dtype=torch.float32)
        self.covariances = torch.tensor(np.asarray(mixture.covariances), dtype=torch.float32)
        self.dim = self.means.shape[-1]
        self.eye = torch.eye(self.dim, dtype=torch.float32)
        self.eyes = self.eye.expand(self.covariances.shape)
        self.calls = 0

    def score(self, x, alpha, sigma):
        torch = self.torch
        self.calls += 1
        cov = alpha**2 * self.covariances + sigma**2 * self.eye  # [K, d, d]
        inverse = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), self.eyes, upper=False)
        whitened = (x[None] - alpha * self.means[:, None]) @ inverse.transpose(1, 2)  # [K, n, d]
        log_det = -2.0 * torch.log(torch.diagonal(inverse, dim1=-2, dim2=-1)).sum(-1)  # [K]
        log_probs = -0.5 * (
            (whitened**2).sum(-1) + log_det[:, None] + self.dim * math.log(2 * math.pi)
        )
        resp = torch.softmax(self.log_weights[:, None] + log_probs, dim=0)  # [K, n]
        return -(resp[..., None] * (whitened @ inverse)).sum(0)  # [n, d]

    def velocity(self, x, alpha, sigma, alpha_dot, sigma_dot):
        r"""The flow-matching velocity :math:`\sum_k r_k(\dot\alpha\mu_k + (\alpha\dot\alpha
        \Sigma_k + \sigma\dot\sigma I)C_k^{-1}(x - \alpha\mu_k))`, the same factors as
        :meth:`score` (:meth:`shufflesgd.problems.EigenMixture.velocity`'s formula)."""
        torch = self.torch
        self.calls += 1
        cov = alpha**2 * self.covariances + sigma**2 * self.eye
        inverse = torch.linalg.solve_triangular(torch.linalg.cholesky(cov), self.eyes, upper=False)
        whitened = (x[None] - alpha * self.means[:, None]) @ inverse.transpose(1, 2)
        log_det = -2.0 * torch.log(torch.diagonal(inverse, dim1=-2, dim2=-1)).sum(-1)
        log_probs = -0.5 * (
            (whitened**2).sum(-1) + log_det[:, None] + self.dim * math.log(2 * math.pi)
        )
        resp = torch.softmax(self.log_weights[:, None] + log_probs, dim=0)
        precision_diff = whitened @ inverse  # rows C_k^-1 (x - alpha mu_k)
        per_component = (
            alpha_dot * self.means[:, None]
            + alpha * alpha_dot * precision_diff @ self.covariances
            + sigma * sigma_dot * precision_diff
        )
        return (resp[..., None] * per_component).sum(0)

    def eps(self, x, alpha, sigma):
        return -sigma * self.score(x, alpha, sigma)

    def denoise(self, x, alpha, sigma):
        return (x + sigma**2 * self.score(x, alpha, sigma)) / alpha


# A cheap stand-in model to isolate the samplers' own cost: N(m 1, v I), whose diffused score is
# -(x - alpha m) / (alpha^2 v + sigma^2), a few elementwise operations on both sides.
ISOTROPIC_MEAN, ISOTROPIC_VAR = 0.5, 0.25


def jax_isotropic_model(sde: diffusion.SDE) -> diffusion.Model:
    r"""The stand-in's score, or on an interpolant its velocity :math:`\dot\alpha m +
    (\alpha\dot\alpha v + \sigma\dot\sigma)(x - \alpha m)/(\alpha^2 v + \sigma^2)`."""
    if isinstance(sde, diffusion.Interpolant):

        def velocity(x, t):
            a, s, a_dot, s_dot = sde.alpha(t), sde.sigma(t), sde.alpha_dot(t), sde.sigma_dot(t)
            gain = (a * a_dot * ISOTROPIC_VAR + s * s_dot) / (a**2 * ISOTROPIC_VAR + s**2)
            return a_dot * ISOTROPIC_MEAN + gain * (x - a * ISOTROPIC_MEAN)

        return diffusion.Model(velocity, "velocity")

    def fn(x, t):
        alpha, sigma = sde.alpha(t), sde.sigma(t)
        return -(x - alpha * ISOTROPIC_MEAN) / (alpha**2 * ISOTROPIC_VAR + sigma**2)

    return diffusion.Model(fn, "score")


class TorchIsotropic(TorchMixture):
    """The isotropic stand-in in PyTorch (same interface as :class:`TorchMixture`)."""

    def __init__(self, torch_module: Any):
        self.torch = torch_module
        self.calls = 0

    def score(self, x, alpha, sigma):
        self.calls += 1
        return -(x - alpha * ISOTROPIC_MEAN) / (alpha**2 * ISOTROPIC_VAR + sigma**2)

    def velocity(self, x, alpha, sigma, alpha_dot, sigma_dot):
        self.calls += 1
        gain = (alpha * alpha_dot * ISOTROPIC_VAR + sigma * sigma_dot) / (
            alpha**2 * ISOTROPIC_VAR + sigma**2
        )
        return alpha_dot * ISOTROPIC_MEAN + gain * (x - alpha * ISOTROPIC_MEAN)


def model_agreement(
    mixture: problems.GaussianMixture, torch_module: Any, num: int = 256, seed: int = 0
) -> dict[str, float]:
    """Largest differences between the JAX and PyTorch closed forms (score, eps and D over
    ``num`` points at noise levels from 1e-3 to 80; the flow-matching velocity at rectified-flow
    times from 0 to 1), relative to the largest value (for D, to
    the largest of ``|D|`` and ``|x| / alpha``, the size of the terms that cancel in it)."""
    torch = torch_module
    rng = np.random.default_rng(seed)
    tm = TorchMixture(mixture, torch)
    worst = dict(score=0.0, eps=0.0, x0=0.0)
    for scaled in (1e-3, 0.05, 0.5, 2.0, 10.0, 80.0):
        alpha = 1.0 / math.sqrt(1.0 + scaled**2)  # a VP level; EDM's is alpha = 1, sigma = scaled
        for a, s in ((alpha, scaled * alpha), (1.0, scaled)):
            x = (
                rng.standard_normal((num, mixture.dim)) * (1.0 + s)
                + rng.uniform(-2, 2, mixture.dim) * a
            )
            x = x.astype(np.float32)
            diffused = mixture.diffuse(jnp.float32(a), jnp.float32(s))
            score = np.asarray(jax.vmap(diffused.score)(jnp.asarray(x)))
            ours = dict(score=score, eps=-s * score, x0=(x + s**2 * score) / a)
            with torch.inference_mode():
                xt = torch.from_numpy(x)
                theirs = dict(
                    score=tm.score(xt, a, s).numpy(),
                    eps=tm.eps(xt, a, s).numpy(),
                    x0=tm.denoise(xt, a, s).numpy(),
                )
            for name in worst:
                scale = max(float(np.max(np.abs(ours[name]))), 1e-30)
                if (
                    name == "x0"
                ):  # (x + sigma^2 s) / alpha cancels at low SNR: measure against |x| / alpha
                    scale = max(scale, float(np.max(np.abs(x))) / a)
                worst[name] = max(
                    worst[name], float(np.max(np.abs(ours[name] - theirs[name]))) / scale
                )
    eigen, worst["velocity"] = mixture.eigen(), 0.0
    velocity = jax.vmap(eigen.velocity, in_axes=(0, None, None, None, None))
    for t in (0.0, 1e-3, 0.3, 0.7, 0.999, 1.0):  # rectified flow: alpha = 1 - t, sigma = t
        x = (rng.standard_normal((num, mixture.dim)) * (1.0 + t)).astype(np.float32)
        a, s_, a_dot, s_dot = (np.float32(v) for v in (1.0 - t, t, -1.0, 1.0))
        ours = np.asarray(velocity(x, a, s_, a_dot, s_dot))
        with torch.inference_mode():
            theirs = tm.velocity(torch.from_numpy(x), float(a), float(s_), -1.0, 1.0).numpy()
        scale = max(float(np.max(np.abs(ours))), 1e-30)
        worst["velocity"] = max(worst["velocity"], float(np.max(np.abs(ours - theirs))) / scale)
    return {f"max_relative_difference_{name}": value for name, value in worst.items()}


# ----------------------------------------------------------------------------- peers


def import_torch() -> Any | str:
    try:
        import torch
    except ImportError as error:
        print(f"peer skipped: {error}", file=sys.stderr)
        return "not installed"
    return torch


#: Each diffusers pairing's scheduler class.
DIFFUSERS_SCHEDULERS = {
    "diffusers_dpm_solver_multistep": "DPMSolverMultistepScheduler",
    "diffusers_unipc_multistep": "UniPCMultistepScheduler",
    "diffusers_euler_discrete": "EulerDiscreteScheduler",
    "diffusers_flow_match_euler": "FlowMatchEulerDiscreteScheduler",
}
#: The diffusers pairings on the VP process (the others run on EDM's sigma = t).
VP_MULTISTEP = ("diffusers_dpm_solver_multistep", "diffusers_unipc_multistep")


def import_diffusers_schedulers() -> dict[str, Any] | str:
    """Each diffusers pairing's scheduler class, or ``"not installed"``."""
    try:
        import diffusers
    except ImportError as error:
        print(f"diffusers skipped: {error}", file=sys.stderr)
        return "not installed"
    return {name: getattr(diffusers, cls) for name, cls in DIFFUSERS_SCHEDULERS.items()}


def import_k_diffusion_sampling() -> tuple[types.ModuleType, str] | str:
    """``k_diffusion.sampling`` without running ``k_diffusion/__init__.py``.

    The package's ``__init__`` imports every submodule, and with them torchvision, clean-fid,
    CLIP, kornia, wandb and the rest of its training stack.  ``sampling.py`` needs only torch,
    scipy, torchdiffeq, torchsde, tqdm and ``utils.append_dims``.  So a bare package module with
    the installed folder as ``__path__`` is registered as ``k_diffusion`` and ``sampling`` is
    imported from it; if ``k_diffusion.utils`` itself does not import (it needs torchvision for
    image helpers), a stand-in ``utils`` holding only ``append_dims`` is registered, after
    checking that ``sampling.py`` uses no other name of ``utils``.  Returns the module and how
    ``utils`` was provided, or ``"not installed"``.
    """
    existing = sys.modules.get("k_diffusion.sampling")
    if existing is not None:
        return existing, "already imported"
    try:
        spec = importlib.util.find_spec("k_diffusion")  # finds the package without importing it
    except (ImportError, ValueError):  # e.g. sys.modules["k_diffusion"] is None
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return "not installed"
    folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
    used = set(re.findall(r"\butils\.(\w+)", (folder / "sampling.py").read_text()))
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = [str(folder)]
        package.__package__ = "k_diffusion"
        package.__spec__ = importlib.util.spec_from_loader(
            "k_diffusion", loader=None, is_package=True
        )
        package.__spec__.submodule_search_locations = [str(folder)]
        sys.modules["k_diffusion"] = package
    try:
        importlib.import_module("k_diffusion.utils")
        utils_source = "real k_diffusion.utils"
    except ImportError as error:
        if not used <= {"append_dims"}:
            return (
                f"not usable: k_diffusion.sampling needs utils.{sorted(used)} "
                f"and utils fails: {error}"
            )
        stand_in = types.ModuleType("k_diffusion.utils")

        def append_dims(x, target_dims):
            """Append trailing singleton axes to ``x`` until it has ``target_dims`` axes."""
            missing = target_dims - x.ndim
            if missing < 0:
                raise ValueError(
                    f"input has {x.ndim} dims but target_dims is {target_dims}, which is less"
                )
            return x.reshape(tuple(x.shape) + (1,) * missing)

        stand_in.append_dims = append_dims
        sys.modules["k_diffusion.utils"] = stand_in
        sys.modules["k_diffusion"].utils = stand_in
        utils_source = (
            f"stand-in k_diffusion.utils with append_dims only ({type(error).__name__}: {error}); "
            f"sampling.py uses utils.{sorted(used)}"
        )
    try:
        sampling = importlib.import_module("k_diffusion.sampling")
    except ImportError as error:
        return f"not usable: {error}"
    return sampling, utils_source


# ----------------------------------------------------------------------------- one pairing


class Pairing:
    """What both sides of one comparison need for one NFE budget.

    ``jax_run(x_T)`` / ``peer_run(x_T)`` return samples as NumPy (``peer_run`` is None when
    the peer is missing); ``reference`` solves the same x_T's ODE finely.
    """

    def __init__(
        self,
        name: str,
        budget: int,
        cfg: dict[str, Any],
        torch: Any,
        diffusers: Any,
        kdiff: Any,
        model: str = "mixture",
    ):
        self.name, self.budget, self.cfg, self.model = name, budget, cfg, model
        self.torch = None if isinstance(torch, str) else torch
        if self.torch is None:
            self.tmix = None
        else:
            self.tmix = (
                TorchMixture(MIXTURE, self.torch)
                if model == "mixture"
                else TorchIsotropic(self.torch)
            )
        self.peer_status = "ok"
        if name.startswith("diffusers"):
            self._diffusers(name, budget, diffusers)
        else:
            self._k_diffusion(name, budget, kdiff)

    # -- diffusers: VP, discrete linear betas
    def _diffusers(self, name: str, budget: int, diffusers: Any) -> None:
        self.num_steps = budget
        if name == "diffusers_flow_match_euler":
            self._flow_match(budget, diffusers)
            return
        if name == "diffusers_dpm_solver_multistep":
            self.sampler_name, self.sde = "dpm_solver_pp_2m", diffusion.make_sde("vp", **VP_OPTIONS)
            self.options = dict(lower_order_final=True, final="none")
        elif name == "diffusers_unipc_multistep":
            # diffusers' defaults: UniPC-2 with the corrector, B(h) = e^h - 1 ("bh2"), data
            # prediction, lower_order_final; ours has the same defaults
            self.sampler_name, self.sde = "unipc", diffusion.make_sde("vp", **VP_OPTIONS)
            self.options = dict(
                order=2, variant="bh2", prediction="x0", corrector=True, final="none"
            )
        else:
            self.sampler_name, self.sde = "pf_ode_euler", diffusion.make_sde("edm", **EDM_OPTIONS)
            self.options = dict(final="none")
        self.peer_sampler = f"diffusers.{DIFFUSERS_SCHEDULERS[name]}"
        if isinstance(diffusers, str) or self.torch is None:
            self.peer_status = "not installed"
            # Without diffusers the same levels are rebuilt from its documented defaults.
            scaled = default_diffusers_sigmas(name, budget)
            init_noise_sigma = float(scaled[0]) if name == "diffusers_euler_discrete" else 1.0
            self.scheduler_config = None
        else:
            cls = diffusers[name]
            scheduler = cls()
            self.scheduler_config = {
                k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")
            }
            scheduler.set_timesteps(budget)
            scaled = scheduler.sigmas.double().numpy()
            init_noise_sigma = float(scheduler.init_noise_sigma)
            self.scheduler_cls = cls
            # the noise level (sigma / alpha) the scheduler attaches to each timestep it calls
            # the model at (diffusers' Euler interpolates between training steps)
            self.level_of_timestep = {
                float(t): float(s) for t, s in zip(scheduler.timesteps, scaled[:-1])
            }
        self.scaled_sigmas = np.asarray(scaled, np.float64)
        if name in VP_MULTISTEP:
            grid = np.append(vp_time_of_scaled_sigma(self.sde, self.scaled_sigmas[:-1]), 0.0)
        else:
            grid = self.scaled_sigmas.copy()
        self.grid = grid
        self.init_noise_sigma = init_noise_sigma
        self.schedule = (
            "diffusers DDPM linear betas 1e-4..0.02 over 1000 training steps, "
            "timestep_spacing linspace, "
            "final_sigmas_type zero; ours: "
            + (
                "VP(beta 0.1..20) at the VP times with the scheduler's log-SNRs, then t = 0"
                if name in VP_MULTISTEP
                else "EDM process (alpha = 1, sigma = t) with t = the scheduler's sigmas "
                "= sigma/alpha, then 0"
            )
        )

    # -- diffusers: rectified flow, velocity model, from t = 1
    def _flow_match(self, budget: int, diffusers: Any) -> None:
        self.sampler_name, self.options = "pf_ode_euler", dict(final="none")
        self.sde = diffusion.make_sde("flow", t_max=1.0)
        name = "diffusers_flow_match_euler"
        self.peer_sampler = f"diffusers.{DIFFUSERS_SCHEDULERS[name]} (shift {FLOW_SHIFT:g})"
        if isinstance(diffusers, str) or self.torch is None:
            self.peer_status = "not installed"
            sigmas = default_flow_match_sigmas(budget)
            self.scheduler_config = None
        else:
            scheduler = diffusers[name](shift=FLOW_SHIFT)
            self.scheduler_config = {
                k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")
            }
            scheduler.set_timesteps(budget)
            sigmas = scheduler.sigmas.double().numpy()
            self.scheduler_cls = diffusers[name]
            self.level_of_timestep = {
                float(t): float(s) for t, s in zip(scheduler.timesteps, sigmas[:-1])
            }
        # the scheduler's "sigmas" are the flow's times t (alpha = 1 - t, sigma = t)
        self.grid = np.asarray(sigmas, np.float64)
        self.scaled_sigmas = self.grid.copy()
        self.init_noise_sigma = 1.0
        self.schedule = (
            f"diffusers flow matching: t = shift s / (1 + (shift - 1) s), shift {FLOW_SHIFT:g}, s "
            "from 1 to 1/1000 in N points, then 0; ours: RectifiedFlow (alpha = 1 - t, "
            "sigma = t, t_max = 1) on the same times, velocity model, Euler in t"
        )

    def _k_diffusion(self, name: str, budget: int, kdiff: Any) -> None:
        self.sde = diffusion.make_sde("edm", **EDM_OPTIONS)
        if name == "k_diffusion_dpmpp_2m":
            self.num_steps, self.sampler_name = budget, "dpm_solver_pp_2m"
            self.options = dict(lower_order_final=False, final="none")
            self.peer_sampler = "k_diffusion.sampling.sample_dpmpp_2m"
        else:
            self.num_steps, self.sampler_name = (budget + 1) // 2, "edm_heun"
            self.options = dict(S_churn=0.0, final="none")
            self.peer_sampler = "k_diffusion.sampling.sample_heun (s_churn = 0)"
        n = self.num_steps
        grid = (
            np.append(diffusion.time_grid(self.sde, "karras", n - 1, rho=KARRAS_RHO), 0.0)
            if n > 1
            else np.array([EDM_OPTIONS["sigma_max"], 0.0])
        )
        self.grid = grid
        self.scaled_sigmas = grid.copy()
        self.init_noise_sigma = EDM_OPTIONS["sigma_max"]
        self.scheduler_config = None
        if isinstance(kdiff, str) or self.torch is None:
            self.peer_status = (
                "not installed"
                if isinstance(kdiff, str) and kdiff == "not installed"
                else str(kdiff)
            )
            self.kdiff = None
        else:
            self.kdiff = kdiff[0]
            self.peer_sigmas = self.kdiff.get_sigmas_karras(
                n, EDM_OPTIONS["sigma_min"], EDM_OPTIONS["sigma_max"], rho=KARRAS_RHO
            )
        self.schedule = (
            f"Karras sigmas (rho 7) from {EDM_OPTIONS['sigma_max']} to {EDM_OPTIONS['sigma_min']}, "
            f"{n} levels then 0; ours: EDM process, grid time_grid(EDM, 'karras', {n - 1}) + [0]"
        )

    # -- our side
    def jax_fn(self) -> Callable:
        sampler = diffusion.make_sampler(self.sampler_name)
        sde, options = self.sde, self.options
        model = jax_model(MIXTURE, sde) if self.model == "mixture" else jax_isotropic_model(sde)

        def run(x_T, grid):
            x, info = diffusion.sample_batch(
                sampler, jax.random.key(0), model, sde, x_T, grid, **options
            )
            return x, info.nfe[0], jnp.max(info.nonfinite_step)

        return jax.jit(run)

    # -- the peer
    def peer_fn(self) -> Callable[[np.ndarray], np.ndarray] | None:
        if self.peer_status != "ok":
            return None
        torch, tmix = self.torch, self.tmix
        if self.name == "diffusers_flow_match_euler":
            cls, num_steps = self.scheduler_cls, self.num_steps
            level_of_timestep = self.level_of_timestep

            def velocity_model(x, timestep):
                t = level_of_timestep[float(timestep)]  # alpha = 1 - t, sigma = t
                return tmix.velocity(x, 1.0 - t, t, -1.0, 1.0)

            def run_flow(x_T):
                with torch.inference_mode():
                    scheduler = cls(shift=FLOW_SHIFT)
                    scheduler.set_timesteps(num_steps)
                    x = torch.from_numpy(x_T)
                    for t in scheduler.timesteps:
                        x = scheduler.step(velocity_model(x, t), t, x).prev_sample
                    return x.numpy()

            return run_flow
        if self.name.startswith("diffusers"):
            cls, num_steps = self.scheduler_cls, self.num_steps
            level_of_timestep = self.level_of_timestep

            def eps_model(x, timestep):
                # the "network" knows the noise level of the timestep it is given:
                # alpha = 1 / sqrt(1 + s^2), sigma = s * alpha with s = sigma / alpha
                level = level_of_timestep[float(timestep)]
                alpha = 1.0 / math.sqrt(1.0 + level**2)
                return tmix.eps(x, alpha, level * alpha)

            def run(x_T):
                with torch.inference_mode():
                    scheduler = cls()
                    scheduler.set_timesteps(num_steps)
                    x = torch.from_numpy(x_T)
                    for t in scheduler.timesteps:
                        eps = eps_model(scheduler.scale_model_input(x, t), t)
                        x = scheduler.step(eps, t, x).prev_sample
                    return x.numpy()

            return run
        sample = (
            self.kdiff.sample_dpmpp_2m
            if self.name == "k_diffusion_dpmpp_2m"
            else self.kdiff.sample_heun
        )
        sigmas = self.peer_sigmas

        def denoiser(x, sigma):
            return tmix.denoise(x, 1.0, sigma[0])  # one level for the whole batch, as on our side

        def run(x_T):
            with torch.inference_mode():
                return sample(denoiser, torch.from_numpy(x_T), sigmas, disable=True).numpy()

        return run

    def describe(self) -> dict[str, Any]:
        return dict(
            pairing=self.name,
            model=self.model,
            nfe_budget=self.budget,
            num_steps=self.num_steps,
            ours=f"shufflesgd.solvers.{self.sampler_name}",
            ours_sde=type(self.sde).__name__,
            ours_options={k: v for k, v in self.options.items()},
            peer=self.peer_sampler,
            peer_scheduler_config=self.scheduler_config,
            schedule=self.schedule,
            init_noise_sigma=self.init_noise_sigma,
            grid=[float(g) for g in self.grid],
            scaled_sigmas=[float(s) for s in self.scaled_sigmas],
        )


def default_diffusers_sigmas(name: str, num_steps: int) -> np.ndarray:
    """The sigmas diffusers' schedulers build with their defaults (used only when diffusers is
    absent, so that our side runs on the same levels): linear betas 1e-4..0.02 over 1000 steps,
    ``linspace`` timesteps (DPM: N + 1 rounded points, the last dropped; Euler: N points,
    not rounded), sigma = sqrt((1 - abar) / abar) interpolated at those timesteps, then 0."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)
    abar = np.cumprod(1.0 - betas, dtype=np.float32).astype(np.float64)  # float32, as diffusers
    train_sigmas = np.sqrt((1 - abar) / abar)
    if name in VP_MULTISTEP:
        steps = np.linspace(0, 999, num_steps + 1).round()[::-1][:-1]
    else:
        steps = np.linspace(0, 999, num_steps)[::-1]  # not rounded: levels interpolated linearly
    return np.append(np.interp(steps, np.arange(1000), train_sigmas), 0.0)


def shift_flow(s: np.ndarray) -> np.ndarray:
    """SD3's time shift :math:`s \\mapsto \\text{shift}\\,s/(1 + (\\text{shift}-1)s)` with
    :data:`FLOW_SHIFT` (Esser et al. 2024, Eq. 23)."""
    return FLOW_SHIFT * s / (1.0 + (FLOW_SHIFT - 1.0) * s)


def default_flow_match_sigmas(num_steps: int) -> np.ndarray:
    """The times diffusers' ``FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)`` builds
    (used only when diffusers is absent): its training sigmas are the shifted
    ``linspace(1, 1/1000)``, and ``set_timesteps`` spaces N points evenly between their ends and
    shifts them again, so the grid is ``shift_flow(linspace(1, shift_flow(1/1000), N))``, then 0
    (the low end shifted twice, as diffusers 0.42 does)."""
    s = np.linspace(1.0, shift_flow(np.float64(1.0 / 1000)), num_steps)
    return np.append(shift_flow(s), 0.0)


def reference_solution(pairing: Pairing, x_T: np.ndarray, steps: int) -> np.ndarray:
    r"""The probability-flow ODE from ``x_T`` at ``grid[0]`` to :math:`\sigma = 0`, solved with
    ``edm_heun`` on ``steps`` Karras levels of :math:`\tilde\sigma = \sigma/\alpha` from the
    pairing's first level down to 1e-4, then an Euler step to 0 (in the pairing's process); on an
    interpolant, ``pf_ode_heun`` with the velocity on ``steps`` uniform steps in :math:`t` from
    the first time to 0."""
    sde = pairing.sde
    if isinstance(sde, diffusion.Interpolant):  # Heun on the velocity, uniform in t from 1 to 0
        grid = np.linspace(float(pairing.grid[0]), 0.0, steps + 1)
        return np.asarray(_flow_reference_run(sde)(jnp.asarray(x_T), jnp.asarray(grid)))
    top = float(pairing.scaled_sigmas[0])
    levels = karras_sigmas(steps, REFERENCE_SIGMA_MIN, top)
    if isinstance(sde, diffusion.VP):
        grid = np.append(vp_time_of_scaled_sigma(sde, levels), 0.0)
        grid[0] = pairing.grid[0]
    else:
        grid = np.append(levels, 0.0)
    return np.asarray(_reference_run(sde)(jnp.asarray(x_T), jnp.asarray(grid, jnp.float32)))


@functools.cache
def _reference_run(sde: diffusion.SDE) -> Callable:
    model = jax_model(MIXTURE, sde)
    return jax.jit(
        lambda x, g: diffusion.sample_batch(
            diffusion.edm_heun, jax.random.key(0), model, sde, x, g, final="none"
        )[0]
    )


@functools.cache
def _flow_reference_run(sde: diffusion.SDE) -> Callable:
    model = jax_model(MIXTURE, sde)
    return jax.jit(
        lambda x, g: diffusion.sample_batch(
            diffusion.pf_ode_heun, jax.random.key(0), model, sde, x, g, final="none"
        )[0]
    )


def bench_pairing(
    pairing: Pairing,
    cfg: dict[str, Any],
    x_T: np.ndarray,
    exact: np.ndarray | None,
    directions: np.ndarray | None,
) -> dict[str, Any]:
    """Time both sides (turns within each repeat); with ``exact`` samples, also the errors."""
    row = pairing.describe()
    grid = jnp.asarray(pairing.grid, jnp.float32)
    x_T_jax = jnp.asarray(x_T)
    jax_run = pairing.jax_fn()
    peer_run = pairing.peer_fn()

    calls = {"jax": lambda: jax.block_until_ready(jax_run(x_T_jax, grid))}
    if peer_run is not None:
        calls["peer"] = lambda: peer_run(x_T)
        pairing.tmix.calls = 0  # counts the peer's warm-up call (our side does not call it)
    outputs: dict[str, Any] = {}

    def after_first(name: str, result: Any) -> None:  # the NFE of each side's warm-up call
        outputs[name] = result
        if name == "jax":
            row["nfe_ours"] = int(result[1])
            row["ours_nonfinite_step"] = int(result[2])
        else:
            row["nfe_peer"] = pairing.tmix.calls
            if row["nfe_peer"] != row["nfe_ours"]:
                raise RuntimeError(
                    f"{pairing.name}: unequal NFE, ours {row['nfe_ours']} peer {row['nfe_peer']}"
                )

    first, times = time_round_robin(calls, cfg["repeats"], after_first=after_first)
    ours, theirs = np.asarray(outputs["jax"][0]), outputs.get("peer")
    jax_times, peer_times = times["jax"], times.get("peer")
    batch = x_T.shape[0]
    row["jax"] = dict(
        run_seconds=summarize(jax_times),
        first_call_seconds=first["jax"],
        samples_per_second=batch / statistics.median(jax_times),
    )

    if peer_run is None:
        row["peer_result"] = pairing.peer_status
    else:
        row["peer_result"] = "ok"
        row["peer_timing"] = dict(
            run_seconds=summarize(peer_times),
            first_call_seconds=first["peer"],
            samples_per_second=batch / statistics.median(peer_times),
        )
        row["speedup"] = statistics.median(peer_times) / statistics.median(jax_times)
        row["speedup_paired"] = statistics.median(
            p / j for p, j in zip(peer_times, jax_times, strict=True)
        )
        row["speedup_of_fastest_runs"] = min(peer_times) / min(
            jax_times
        )  # least disturbed by other load
    if exact is None:  # the isotropic stand-in: timings only, and the two sides' agreement
        if peer_run is not None:
            row["max_abs_difference_ours_vs_peer"] = float(
                np.max(np.abs(ours.astype(np.float64) - theirs))
            )
        return row
    reference = reference_solution(pairing, x_T, cfg["reference_steps"])
    errors = dict(
        ours_rms_distance_to_reference_ode=rms_distance(ours, reference),
        ours_sliced_w2_to_exact=sliced_w2(ours, exact, directions),
        reference_ode_sliced_w2_to_exact=sliced_w2(reference, exact, directions),
    )
    if peer_run is not None:
        errors.update(
            peer_rms_distance_to_reference_ode=rms_distance(theirs, reference),
            peer_sliced_w2_to_exact=sliced_w2(theirs, exact, directions),
            rms_distance_ours_vs_peer=rms_distance(ours, theirs),
            max_abs_difference_ours_vs_peer=float(np.max(np.abs(ours.astype(np.float64) - theirs))),
        )
        errors["ours_over_peer_rms_distance_to_reference"] = errors[
            "ours_rms_distance_to_reference_ode"
        ] / max(errors["peer_rms_distance_to_reference_ode"], 1e-30)
    row["errors"] = errors
    return row


def bench_model_alone(cfg: dict[str, Any], torch: Any, x: np.ndarray) -> dict[str, Any]:
    """One evaluation of the mixture score on the whole batch, each side, at a noise level that
    is a runtime value (as inside a sampler's scan): where a sampler step's time goes."""
    sde = diffusion.make_sde("vp", **VP_OPTIONS)
    model = jax_model(MIXTURE, sde)
    score = jax.jit(jax.vmap(model.fn, in_axes=(0, None)))
    x_jax, t = jnp.asarray(x), jnp.float32(0.5)
    alpha, sigma = float(sde.alpha(t)), float(sde.sigma(t))
    calls = {"jax_mixture_score": lambda: jax.block_until_ready(score(x_jax, t))}
    if not isinstance(torch, str):
        tmix, x_torch = TorchMixture(MIXTURE, torch), torch.from_numpy(x)

        def torch_call():
            with torch.inference_mode():
                return tmix.score(x_torch, alpha, sigma)

        calls["torch_mixture_score"] = torch_call
    _, times = time_round_robin(calls, cfg["breakdown_repeats"])  # JAX compiles in the warm-up
    out: dict[str, Any] = {
        name: dict(call_seconds=summarize(values)) for name, values in times.items()
    }
    if "torch_mixture_score" in out:
        out["torch_over_jax"] = (
            out["torch_mixture_score"]["call_seconds"]["median"]
            / out["jax_mixture_score"]["call_seconds"]["median"]
        )
    return out


# ----------------------------------------------------------------------------- compile time


def bench_compile(cfg: dict[str, Any]) -> dict[str, Any]:
    """Seconds to ``lower`` and ``compile`` a whole batched sampler of 10 and of 1000 steps."""
    batch = cfg["batch"]
    cases = {
        "dpm_solver_pp_2m": (
            diffusion.make_sde("vp", **VP_OPTIONS),
            "uniform_log_snr",
            dict(final="denoise"),
        ),
        "euler_maruyama": (
            diffusion.make_sde("vp", **VP_OPTIONS),
            "uniform_time",
            dict(final="denoise"),
        ),
        "edm_heun": (diffusion.make_sde("edm", **EDM_OPTIONS), "karras", dict(final="none")),
    }
    out: dict[str, Any] = {}
    for name, model_kind in (
        (n, m) for n in cfg["compile_samplers"] for m in cfg["compile_models"]
    ):
        sde, kind, options = cases[name]
        sampler = diffusion.make_sampler(name)
        model = jax_model(MIXTURE, sde) if model_kind == "mixture" else jax_isotropic_model(sde)
        x_T = jax.ShapeDtypeStruct((batch, MIXTURE.dim), jnp.float32)
        label = name if model_kind == "mixture" else f"{name}[isotropic model]"
        out[label] = dict(sampler=name, model=model_kind, sde=type(sde).__name__, grid=kind)
        for steps in cfg["compile_steps"]:
            grid = jax.ShapeDtypeStruct((steps + 1,), jnp.float32)
            lowers, compiles = [], []
            for repeat in range(cfg["compile_repeats"]):
                # a new function object each time: nothing is reused from an earlier trace
                def run(
                    x, g, repeat=repeat, sampler=sampler, model=model, sde=sde, options=options
                ):
                    key = jax.random.key(repeat)
                    return diffusion.sample_batch(sampler, key, model, sde, x, g, **options)

                start = time.perf_counter()
                lowered = jax.jit(run).lower(x_T, grid)
                middle = time.perf_counter()
                lowered.compile()
                end = time.perf_counter()
                lowers.append(middle - start)
                compiles.append(end - middle)
            totals = [a + b for a, b in zip(lowers, compiles)]
            out[label][f"steps_{steps}"] = dict(
                lower_seconds=summarize(lowers),
                compile_seconds=summarize(compiles),
                total_seconds=summarize(totals),
            )
    longest = max(cfg["compile_steps"])
    worst = max(
        row[f"steps_{longest}"]["total_seconds"]["median"]
        for row in out.values()
        if row["model"] == "mixture"
    )
    return dict(
        samplers=out,
        batch=batch,
        longest_steps=longest,
        worst_total_seconds_at_longest=worst,
        target_seconds=TARGET_COMPILE_SECONDS,
        target_met=bool(worst < TARGET_COMPILE_SECONDS),
    )


# ----------------------------------------------------------------------------- report


def table(results: dict[str, Any]) -> str:
    lines = [
        (
            "| pairing | NFE | ours samples/s | peer samples/s | speedup (paired) | "
            "RMS to ODE ours | RMS to ODE peer | SW2 ours | SW2 peer | max |ours-peer| |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["pairings"]:
        e = row["errors"]
        if row["peer_result"] == "ok":
            peer = (
                f"{row['peer_timing']['samples_per_second']:.4g} | {row['speedup']:.2f} "
                f"({row['speedup_paired']:.2f}) | {e['ours_rms_distance_to_reference_ode']:.3g} | "
                f"{e['peer_rms_distance_to_reference_ode']:.3g} | "
                f"{e['ours_sliced_w2_to_exact']:.3g} | "
                f"{e['peer_sliced_w2_to_exact']:.3g} | {e['max_abs_difference_ours_vs_peer']:.2g}"
            )
        else:
            peer = (
                f"{row['peer_result']} | – | {e['ours_rms_distance_to_reference_ode']:.3g} | – | "
                f"{e['ours_sliced_w2_to_exact']:.3g} | – | –"
            )
        lines.append(
            f"| {row['pairing']} | {row['nfe_ours']} | "
            f"{row['jax']['samples_per_second']:.4g} | {peer} |"
        )
    lines.append(
        f"\nexact-vs-exact sliced W2 (Monte Carlo floor): {results['sliced_w2_floor']:.3g}"
    )
    lines += [
        "",
        "isotropic stand-in model (the samplers' own cost):",
        "| pairing | NFE | ours samples/s | peer samples/s | speedup (paired) |",
        "|---|---|---|---|---|",
    ]
    for row in results["sampler_overhead_isotropic_model"]:
        peer = (
            f"{row['peer_timing']['samples_per_second']:.4g} | {row['speedup']:.2f} "
            f"({row['speedup_paired']:.2f})"
            if row["peer_result"] == "ok"
            else f"{row['peer_result']} | –"
        )
        lines.append(
            f"| {row['pairing']} | {row['nfe_ours']} | "
            f"{row['jax']['samples_per_second']:.4g} | {peer} |"
        )
    lines += ["", "one mixture-score evaluation on the whole batch:"]
    for name, value in results["model_alone"].items():
        lines.append(
            f"  {name}: "
            + (
                f"{value['call_seconds']['median'] * 1e3:.3g} ms"
                if isinstance(value, dict)
                else f"{value:.2f}"
            )
        )
    comp = results["compile"]
    lines += ["", "| sampler | steps | lower s | compile s | total s |", "|---|---|---|---|---|"]
    for name, row in comp["samplers"].items():
        for key, value in row.items():
            if key.startswith("steps_"):
                lines.append(
                    f"| {name} | {key[6:]} | {value['lower_seconds']['median']:.3g} | "
                    f"{value['compile_seconds']['median']:.3g} | "
                    f"{value['total_seconds']['median']:.3g} |"
                )
    return "\n".join(lines)


def timings_positive(tree: Any) -> None:
    if isinstance(tree, dict):
        for name, value in tree.items():
            if "seconds" in name and isinstance(value, dict) and "median" in value:
                for v in value["repeats"] + [value["median"], value["min"]]:
                    if not (isinstance(v, float) and math.isfinite(v) and v > 0):
                        raise RuntimeError(f"non-positive or non-finite timing {name}={v}")
            else:
                timings_positive(value)
    elif isinstance(tree, list):
        for item in tree:
            timings_positive(item)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON path")
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (seconds)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: the usable cores, XLA's pool size)",
    )
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    wall = time.perf_counter()
    if "xla_cpu_multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", ""):
        print(
            "warning: XLA_FLAGS has --xla_cpu_multi_thread_eigen=false; JAX timings will suffer",
            file=sys.stderr,
        )

    torch = import_torch()
    diffusers = import_diffusers_schedulers() if not isinstance(torch, str) else "not installed"
    kdiff = import_k_diffusion_sampling() if not isinstance(torch, str) else "not installed"
    peers: dict[str, Any] = dict(
        torch=torch if isinstance(torch, str) else version("torch"),
        diffusers=diffusers if isinstance(diffusers, str) else version("diffusers"),
        k_diffusion=kdiff if isinstance(kdiff, str) else version("k-diffusion"),
        k_diffusion_utils=None if isinstance(kdiff, str) else kdiff[1],
    )
    if not isinstance(torch, str):
        torch.set_num_threads(args.torch_threads or usable_cores())
        peers["torch_num_threads"] = torch.get_num_threads()
        peers["model_agreement"] = model_agreement(MIXTURE, torch)

    rng = np.random.default_rng(cfg["seed"])
    directions = rng.standard_normal((cfg["num_projections"], MIXTURE.dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    key_a, key_b = jax.random.split(jax.random.key(cfg["seed"]))
    exact = np.asarray(MIXTURE.sample(key_a, cfg["batch"]))
    exact_other = np.asarray(MIXTURE.sample(key_b, cfg["batch"]))

    results: dict[str, Any] = dict(
        benchmark="sde_samplers",
        quick=args.quick,
        targets=dict(speedup=TARGET_SPEEDUP, compile_seconds=TARGET_COMPILE_SECONDS),
        machine=machine_info("torch", "diffusers", "k-diffusion"),
        peers=peers,
        settings=dict(
            cfg,
            dtype="float32",
            vp=VP_OPTIONS,
            edm=EDM_OPTIONS,
            karras_rho=KARRAS_RHO,
            reference_sigma_min=REFERENCE_SIGMA_MIN,
            x_T=(
                "z ~ N(0, I) from numpy default_rng(seed + 1), times the pairing's init_noise_sigma"
            ),
        ),
        mixture=dict(weights=MIXTURE_WEIGHTS, means=MIXTURE_MEANS, covariances=MIXTURE_COVARIANCES),
        sliced_w2_floor=sliced_w2(exact, exact_other, directions),
    )
    z = (
        np.random.default_rng(cfg["seed"] + 1)
        .standard_normal((cfg["batch"], MIXTURE.dim))
        .astype(np.float32)
    )

    def bench_all(names, budgets, model, tag=""):
        rows = []
        for name in names:
            for budget in budgets:
                pairing = Pairing(name, budget, cfg, torch, diffusers, kdiff, model=model)
                x_T = (z * np.float32(pairing.init_noise_sigma)).astype(np.float32)
                reference = (
                    (exact, directions) if model == "mixture" else (None, None)
                )  # errors: mixture only
                row = bench_pairing(pairing, cfg, x_T, *reference)
                rows.append(row)
                print(
                    f"{tag}{name} NFE {row['nfe_ours']}: "
                    f"{row['jax']['samples_per_second']:.4g} samples/s"
                    + (
                        f", peer {row['peer_timing']['samples_per_second']:.4g}, "
                        f"x{row['speedup']:.2f}"
                        if row["peer_result"] == "ok"
                        else f", peer {row['peer_result']}"
                    ),
                    flush=True,
                )
        return rows

    rows = results["pairings"] = bench_all(PAIRINGS, cfg["nfe_budgets"], "mixture")
    results["sampler_overhead_isotropic_model"] = bench_all(
        cfg["overhead_pairings"], cfg["overhead_nfe_budgets"], "isotropic", "[isotropic] "
    )
    results["model_alone"] = bench_model_alone(cfg, torch, z)
    results["compile"] = bench_compile(cfg)
    compared = [row for row in rows if row["peer_result"] == "ok"]
    if compared:
        results["summary"] = dict(
            min_speedup=min(row["speedup"] for row in compared),
            min_speedup_paired=min(row["speedup_paired"] for row in compared),
            max_speedup=max(row["speedup"] for row in compared),
            median_speedup=statistics.median(row["speedup"] for row in compared),
            speedup_target_met_everywhere=all(row["speedup"] >= TARGET_SPEEDUP for row in compared),
            # float32 rounding on both sides: "no worse" allows 1 % or 1e-5 above the peer
            error_no_worse_everywhere=all(
                row["errors"]["ours_rms_distance_to_reference_ode"]
                <= 1.01 * row["errors"]["peer_rms_distance_to_reference_ode"] + 1e-5
                for row in compared
            ),
        )
    results["summary_compile_target_met"] = results["compile"]["target_met"]
    results["total_seconds"] = time.perf_counter() - wall
    timings_positive(
        dict(
            pairings=rows,
            compile=results["compile"],
            overhead=results["sampler_overhead_isotropic_model"],
            model_alone=results["model_alone"],
        )
    )

    return write_results(args.out, results, table(results))


if __name__ == "__main__":
    main()
