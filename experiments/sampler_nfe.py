r"""Sampler error against the number of function evaluations (NFE), with the exact score.

**Part A: exact KL on one Gaussian.**  For a Gaussian target
:math:`N(\mu, \Sigma)` the score of every marginal :math:`p_t = N(\alpha_t\mu,
\alpha_t^2\Sigma + \sigma_t^2 I)` is affine in :math:`x`, so every fixed-grid sampler is
affine in its prior draw and its noise, and :func:`shufflesgd.diffusion.exact_gaussian_law`
returns its output law exactly (Jacobians, no Monte Carlo).  For each sampler, each time grid
of :data:`shufflesgd.diffusion.GRIDS` and each NFE budget, the sampler takes the most steps whose
evaluation count (``final="none"``) fits the budget, as the sampler registry
(:data:`shufflesgd.diffusion.SAMPLERS`) states it (the run's ``info.nfe`` is checked against the
budget), and we report
:math:`KL(q_{sampler}\,\|\,p_{t_{min}})` and :math:`W_2`.

*The floor.*  The probability-flow ODE is a bijection carrying :math:`p_T` onto
:math:`p_{t_{min}}` (Song et al. 2021, Sec. 4.3), and KL is invariant under bijections, so a
perfect ODE solver started from the prior :math:`\pi = N(0, \sigma_T^2 I)` ends at
:math:`KL(\pi\,\|\,p_T)` from the target: the prior-mismatch floor, printed with the table.
Stochastic samplers contract the mismatch and may go below it (Xu et al. 2023, Thm. 2).

*Orders.*  A solver of order :math:`p` has an :math:`O(N^{-p})` error in the law's mean and
covariance, hence :math:`KL \propto N^{-2p}` (KL is quadratic in small perturbations): the
fitted order is :math:`-\tfrac12` the log-log slope.  Points near the floor measure the floor,
not the solver, so the fit keeps the points with :math:`KL \ge` ``floor_factor`` times the
floor, and of those the ``fit_points`` largest budgets (the asymptotic regime).  Expected:
Euler–Maruyama, DDIM and PF-ODE Euler first order (Song et al. 2021; Song, Meng, Ermon 2021);
Heun (Karras et al. 2022, Alg. 1) and DPM-Solver++(2M) (Lu et al. 2022) second order;
log-SNR grids (Lu et al. 2022, Sec. 3.4) far better than uniform time at low NFE on VP.

*DPM-Solver-v3's statistics.*  DPM-Solver-v3 (Zheng, Lu, Chen & Zhu 2023) takes its empirical
model statistics :math:`l, s, b` from its label's ``statistics`` option, a study-level choice
(``dpm_solver_v3(statistics="estimated")``; the quotes make it a Python literal, as every
option of a label in :func:`experiments.common.parse_sampler`):

* ``"exact"``: :func:`shufflesgd.diffusion.gaussian_ems`, the exact statistics of the Gaussian
  with its exact model, on ``ems_num_lambdas`` half log-SNRs (Part A only; Part A's default
  when the label gives no ``statistics``);
* ``"estimated"``: as the paper obtains them for a network, estimated from data samples with
  the model (:func:`shufflesgd.diffusion.estimate_ems`, whose docstring says how): here from
  ``ems_num_draws`` draws of the data law :math:`p_0` with the exact model, on
  ``ems_estimate_num_lambdas`` half log-SNRs (Part B's default; a mixture has no closed form);
* ``None``: the library's default :math:`l = 1, s = b = 0`, DPM-Solver++ in Taylor form.

So ``dpm_solver_v3(statistics="exact")`` next to ``dpm_solver_v3(statistics="estimated")``
shows what estimation costs in KL at each budget.  The estimate's keys come from
``config.seed``: with :math:`k` = ``fold_in(key(seed), 2)`` in Part A and ``fold_in(k_p, 4)``
for mixture :math:`p` in Part B (:math:`k_p` its key below), the data are drawn from
``fold_in(k, 0)`` and the estimator's noise and probes from ``fold_in(k, 1)``.

Samplers excluded from Part A: those the registry marks not affine, ``predictor_corrector``
(its Langevin step size :math:`\epsilon \propto \|z\|^2/\|s\|^2` is not affine, so the law
is not Gaussian) and ``pf_ode_adaptive`` (the NFE is chosen by its step-size controller, not by
a budget; excluded from Part B too).

**Part B: Monte Carlo on mixtures.**  A 2-D mixture of three well separated modes with
weights 0.5 / 0.3 / 0.2, and a ``high_dim``-D mixture of ``num_components`` random anisotropic
components; every sampler at equal NFE on ``mixture_grid``, ``num_seeds`` seeds of
``num_samples`` samples in one vmapped call, the seeds split over ``config.devices`` devices
(:func:`experiments.common.seed_mesh`; the exact draws and the scoring too).  Metrics, each
against ``num_samples`` exact draws from :math:`p_{t_{min}}` (the same draws for every sampler
of a seed), mean ± standard error over seeds:

* sliced :math:`W_2`:
  :math:`\bigl(\frac1L\sum_l W_2^2(\theta_l^\top X, \theta_l^\top Y)\bigr)^{1/2}`
  over ``num_projections`` random unit directions (sorted projections);
* :math:`MMD^2`, the unbiased U-statistic with the Gaussian kernel
  :math:`k(x, y) = \exp(-\|x-y\|^2/(2h^2))`, :math:`h^2` fixed per mixture by the median
  heuristic (the median squared distance between exact samples);
* mode-weight error :math:`\frac12\sum_k|\hat w_k - w_k|` (total variation), each sample
  assigned to the component of largest responsibility under :math:`p_{t_{min}}`.

The row ``exact`` scores a second set of exact draws the same way: the Monte Carlo floor of
each metric.  Mixture :math:`p` (its index in ``mixtures``) draws everything from
:math:`k_p` = ``fold_in(key(seed), p)``.  Expected: Restart (Xu et al. 2023) better than a pure
ODE and a pure SDE sampler at equal NFE.

**Part C: exact KL on the mean-reverting process.**  IR-SDE's forward SDE (Luo, Gustafsson,
Zhao, Sjölund & Schön 2023, "Image Restoration with Mean-Reverting Stochastic Differential
Equations", ICML, Eqs. 1-3; :class:`shufflesgd.diffusion.MeanReverting`)

.. math:: dx = \theta_t(\mu - x)\,dt + \sqrt{2\lambda^2\theta_t}\,dw,

with the :math:`\theta` schedule ``mean_reverting_schedule``, :math:`\lambda` =
``mean_reverting_std`` and :math:`e^{-\bar\theta(t_{max})}` = ``mean_reverting_terminal_alpha``,
started at Part A's Gaussian :math:`N(m, \Sigma)`.  The mean it reverts to is
:math:`\mu = m + \delta u`, :math:`\delta` = ``mean_reverting_offset`` and :math:`u` a random unit
vector (in image restoration :math:`\mu` is the degraded observation, near the clean image).
Its marginals are :math:`p_t = N(\mu + \alpha_t(m - \mu), \alpha_t^2\Sigma + \sigma_t^2 I)`,
:math:`\alpha_t = e^{-\bar\theta_t}`, :math:`\sigma_t = \lambda\sqrt{1 - \alpha_t^2}`, and the
prior is :math:`\pi = N(\mu, \lambda^2 I)`.  The samplers (``mean_reverting_samplers``) are MRS
(Li, Fang, Zhao, Lu, Yang & Xu 2025, "MRS: A Fast Sampler for Mean Reverting Diffusion based on
ODE and SDE Solvers", ICLR 2025, arXiv:2502.07856; :func:`shufflesgd.diffusion.mrs`), labelled
``mrs(solver=..., prediction=..., order=...)``, and the house samplers run on the centred
variable :math:`y = x - \mu`, a zero-mean linear process with the same :math:`\alpha_t,
\sigma_t` (:func:`shufflesgd.diffusion.sample_centred`).  Every one of them is affine in its
prior draw and its noise here: the exact score is affine in :math:`x`, MRS's update is a linear
combination of :math:`x_s`, the model's predictions (affine in :math:`x`, by
:func:`shufflesgd.diffusion.convert_mean_reverting`), :math:`\mu` and its Gaussian draw, and a
house sampler is affine in :math:`(y_T, \text{noise})` (Part A).  So
:func:`~shufflesgd.diffusion.exact_gaussian_law` gives each output law exactly, for a sampler
started at :math:`x_T = \mu + \xi`, :math:`\xi \sim N(0, \lambda^2 I)` (the prior draw
``exact_gaussian_law`` differentiates in); the test checks the affinity and the law against
runs at basis vectors.  Budgets ``mean_reverting_nfe_budgets`` on the ``mean_reverting_grid``
grid, ``final="none"``, one evaluation a step for MRS; KL to :math:`p_{t_{min}}` and
:math:`W_2`, the floor :math:`KL(\pi\,\|\,p_T)` (the argument of Part A), orders fitted as in
Part A.  Expected (Li et al. 2025; :func:`shufflesgd.diffusion.mrs`): the ODE solvers
of order 1 and 2 at those orders (order 1 is DDIM on :math:`y`), the authors' order 3 globally
second order (its :math:`D^{(2)}` term carries half the Taylor coefficient) and
``consistent_third_order=True`` third order; the SDE solvers with data prediction of orders 1
and 2 at those orders, stochastic ones possibly below the floor; noise prediction far worse than
data prediction at low NFE with the SDE solver (the paper's case for data prediction); MRS ahead
of Euler–Maruyama and the PF-ODE Euler solver at equal NFE.  DPM-Solver-v3 is not run in
Part C.

**Part D: DC-Solver on the Part A Gaussian.**  DC-Solver (Zhao, Wang, Zhou & Lu 2024,
"DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation", ECCV 2024;
:func:`shufflesgd.diffusion.dc_solver`) is UniPC whose model outputs are moved by a compensation
ratio a step.  For each grid of ``dc_grids`` and each step count of ``dc_steps`` (``final="none"``,
so the NFE is the step count): the ratios searched by
:func:`shufflesgd.diffusion.fit_dc_ratios` (``dc_search_steps`` AdamW steps a grid step, the
authors' greedy search) on ``dc_reference_draws`` prior draws against the exact
probability-flow trajectories from those draws (:func:`exact_flow_states`; the authors use a
many-step solver's), and the ratios predicted by the cascade polynomial regression
(:func:`shufflesgd.diffusion.fit_cascade_polynomial`, NFE degree ``dc_cpr_nfe_degree``) fitted
to the ratios searched at the *other* step counts: leave one out, so each prediction is for an
NFE the regression never saw.  Exact KL to :math:`p_{t_{min}}` of UniPC (the neutral ratios,
the same program), DC-Solver with searched and with predicted ratios, at equal NFE.  UniPC
order ``dc_order``, interpolation order ``dc_interpolation_order``.  Empty ``dc_grids``: no
Part D.

Run: ``python -m experiments.sampler_nfe --config configs/sampler_nfe.py``
(``:quick`` for the short variant; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import diffusion, metrics, problems

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "sampler_nfe"
GAUSSIAN_SAMPLERS = tuple(name for name, spec in diffusion.SAMPLERS.items() if spec.affine)
MIXTURE_SAMPLERS = tuple(
    name for name, spec in diffusion.SAMPLERS.items() if spec.nfe_per_step is not None
)
MIXTURES = ("mixture_2d", "mixture_high_dim")
#: The table names the best sampler of Part A at each budget up to this NFE.
LOW_NFE = 10
#: Part A's stream of the root key ``key(seed)``, after the mixtures' ``0 .. len(MIXTURES) - 1``.
GAUSSIAN_STREAM = len(MIXTURES)
#: Part D's stream of ``key(seed)`` (its prior draws).
DC_STREAM = GAUSSIAN_STREAM + 1
#: DPM-Solver-v3's ``statistics`` choices in a label of each part (module docstring).
STATISTICS = {
    "gaussian_samplers": ("exact", "estimated", None),
    "mixture_samplers": ("estimated", None),
}
#: The choice a DPM-Solver-v3 label without ``statistics`` gets in each part.
DEFAULT_STATISTICS = {"gaussian_samplers": "exact", "mixture_samplers": "estimated"}
#: Part C: MRS and every affine house sampler but DPM-Solver-v3 (module docstring).
MEAN_REVERTING_SAMPLERS = ("mrs", *(name for name in GAUSSIAN_SAMPLERS if name != "dpm_solver_v3"))
#: MRS's options that a label may set (``final`` and ``noise`` are the study's).
MRS_OPTIONS = tuple(
    name
    for name, parameter in inspect.signature(diffusion.mrs).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("final", "noise")
)
#: MRS's orders for each solver (Li et al. 2025: multistep ODE solvers to third order, SDE
#: solvers to second).
MRS_ORDERS = {"ode": (1, 2, 3), "sde": (1, 2)}


# ------------------------------------------------------------------ configuration


def _check_budgets(field: str, budgets: Any, minimum_count: int) -> None:
    common.check_positive_ints(field, list(budgets))
    if len(budgets) < minimum_count or list(budgets) != sorted(set(budgets)):
        raise ValueError(
            f"config.{field} must be at least {minimum_count} strictly increasing budgets, "
            f"got {list(budgets)}"
        )


def _check_statistics(field: str, labels: Any) -> None:
    """``ValueError`` naming ``config.<field>`` when a DPM-Solver-v3 label's ``statistics`` is not
    one of that part's :data:`STATISTICS`."""
    for label in labels:
        name, options = common.parse_sampler(field, label)
        if name == "dpm_solver_v3" and options.get("statistics", None) not in STATISTICS[field]:
            raise ValueError(
                f"config.{field}: {label}: dpm_solver_v3's statistics must be one of "
                f"{list(STATISTICS[field])} in this part, got {options['statistics']!r}"
            )


def _check_mrs_options(field: str, label: str, options: dict[str, Any]) -> None:
    """``ValueError`` naming ``config.<field>`` unless an MRS label sets only :data:`MRS_OPTIONS`,
    each to a value :func:`shufflesgd.diffusion.mrs` takes."""
    unknown = sorted(set(options) - set(MRS_OPTIONS))
    if unknown:
        raise ValueError(
            f"config.{field}: {label}: mrs has no option {', '.join(unknown)} here; "
            f"its options are {list(MRS_OPTIONS)}"
        )
    solver = options.get("solver", "ode")
    allowed = {
        "solver": diffusion.MRS_SOLVERS,
        "prediction": diffusion.MRS_PREDICTIONS,
        "order": MRS_ORDERS.get(solver, ()),
    }
    for option, values in allowed.items():
        value = options.get(option)
        if option in options and (isinstance(value, bool) or value not in values):
            raise ValueError(
                f"config.{field}: {label}: mrs's {option} must be one of {list(values)}"
                + (f" with solver={solver!r}" if option == "order" else "")
                + f", got {value!r}"
            )
    for option in ("lower_order_final", "consistent_third_order"):
        if option in options and not isinstance(options[option], bool):
            raise ValueError(
                f"config.{field}: {label}: mrs's {option} must be a bool, got {options[option]!r}"
            )


def _check_mean_reverting_samplers(field: str, labels: Any) -> None:
    """Part C's labels: MRS with the options :func:`_check_mrs_options` allows, or a house sampler
    of :data:`MEAN_REVERTING_SAMPLERS` with options it takes; distinct."""
    labels = list(labels)
    if not labels:
        raise ValueError(
            f"config.{field} must name at least one of {list(MEAN_REVERTING_SAMPLERS)}"
        )
    for label in labels:
        name, options = common.parse_sampler(field, label)
        common.check_choice(field, name, MEAN_REVERTING_SAMPLERS)
        if name == "mrs":
            _check_mrs_options(field, label, options)
        else:
            common.check_samplers(field, [label], MEAN_REVERTING_SAMPLERS[1:])
    if len(labels) != len(set(labels)):
        raise ValueError(f"config.{field} must not repeat a sampler, got {labels!r}")


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built or compiled."""
    common.check_choice("sde", config.sde, diffusion.SDES)
    common.check_names("grids", config.grids, diffusion.GRIDS)
    common.check_samplers("gaussian_samplers", config.gaussian_samplers, GAUSSIAN_SAMPLERS)
    _check_statistics("gaussian_samplers", config.gaussian_samplers)
    common.check_names("mixtures", config.mixtures, MIXTURES)
    common.check_samplers("mixture_samplers", config.mixture_samplers, MIXTURE_SAMPLERS)
    _check_statistics("mixture_samplers", config.mixture_samplers)
    common.check_choice("mixture_grid", config.mixture_grid, diffusion.GRIDS)
    _check_mean_reverting_samplers("mean_reverting_samplers", config.mean_reverting_samplers)
    common.check_choice("mean_reverting_grid", config.mean_reverting_grid, diffusion.GRIDS)
    common.check_choice(
        "mean_reverting_schedule", config.mean_reverting_schedule, diffusion.THETA_SCHEDULES
    )
    _check_budgets("nfe_budgets", config.nfe_budgets, 2)
    _check_budgets("mixture_nfe_budgets", config.mixture_nfe_budgets, 1)
    _check_budgets("mean_reverting_nfe_budgets", config.mean_reverting_nfe_budgets, 2)
    if list(config.dc_grids):
        common.check_names("dc_grids", config.dc_grids, diffusion.GRIDS)
    common.check_positive_ints("dc_cpr_nfe_degree", config.dc_cpr_nfe_degree)
    # leave one out: the other step counts must determine the NFE polynomial
    _check_budgets("dc_steps", config.dc_steps, config.dc_cpr_nfe_degree + 2)
    for field in ("dc_order", "dc_interpolation_order"):
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value not in (1, 2, 3):
            raise ValueError(f"config.{field} must be 1, 2 or 3, got {value!r}")
    if min(config.dc_steps) <= config.dc_interpolation_order:
        raise ValueError(
            "config.dc_steps must exceed config.dc_interpolation_order (the first "
            f"{config.dc_interpolation_order} steps are never compensated), got {config.dc_steps}"
        )
    for field in (
        "gaussian_dim",
        "high_dim",
        "num_components",
        "num_samples",
        "num_projections",
        "restart_k",
        "restart_steps",
    ):
        common.check_positive_ints(field, config[field])
    for field, minimum in (
        ("fit_points", 2),
        ("num_seeds", 2),
        ("ems_num_lambdas", 2),
        ("ems_num_draws", 2),
        ("ems_estimate_num_lambdas", 2),
        ("dc_search_steps", 1),
        ("dc_reference_draws", 1),
    ):
        common.check_positive_ints(field, config[field])
        if config[field] < minimum:
            raise ValueError(f"config.{field} must be at least {minimum}, got {config[field]}")
    for field in ("data_seed", "seed"):
        if (
            isinstance(config[field], bool)
            or not isinstance(config[field], int)
            or config[field] < 0
        ):
            raise ValueError(
                f"config.{field} must be a non-negative integer, got {config[field]!r}"
            )
    for field in (
        "gaussian_var_min",
        "gaussian_var_max",
        "gaussian_mean_norm",
        "floor_factor",
        "pc_snr",
        "restart_t_min",
        "restart_t_max",
        "mean_reverting_std",
    ):
        common.check_positive_number(field, config[field])
    offset = config.mean_reverting_offset
    if (
        isinstance(offset, bool)
        or not isinstance(offset, (int, float))
        or not math.isfinite(offset)
        or offset < 0
    ):
        raise ValueError(
            f"config.mean_reverting_offset must be a non-negative finite number, got {offset!r}"
        )
    alpha = config.mean_reverting_terminal_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"config.mean_reverting_terminal_alpha must lie in (0, 1), got {alpha!r}")
    if config.gaussian_var_max < config.gaussian_var_min:
        raise ValueError(
            f"config.gaussian_var_max must be >= config.gaussian_var_min, got "
            f"{config.gaussian_var_max} < {config.gaussian_var_min}"
        )
    if config.floor_factor <= 1.0:
        raise ValueError(f"config.floor_factor must exceed 1, got {config.floor_factor}")
    sde = diffusion.make_sde(config.sde)
    if not sde.t_min <= config.restart_t_min < config.restart_t_max <= sde.t_max:
        raise ValueError(
            "config.restart_t_min and config.restart_t_max must satisfy "
            f"{sde.t_min} <= restart_t_min "
            f"< restart_t_max <= {sde.t_max} ({config.sde}), got {config.restart_t_min}, "
            f"{config.restart_t_max}"
        )
    common.seed_devices(config)


# ------------------------------------------------------------------ targets


def build_gaussian(config: ConfigDict) -> problems.GaussianMixture:
    r""":math:`N(\mu, U\,\mathrm{diag}(v)\,U^\top)`: variances log-spaced from ``gaussian_var_min``
    to ``gaussian_var_max``, a random rotation :math:`U`, :math:`|\mu|` = ``gaussian_mean_norm``."""
    rng = np.random.default_rng(config.data_seed)
    d = config.gaussian_dim
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    variances = np.geomspace(config.gaussian_var_min, config.gaussian_var_max, d)
    covariance = rotation @ np.diag(variances) @ rotation.T
    direction = rng.standard_normal(d)
    mean = config.gaussian_mean_norm * direction / np.linalg.norm(direction)
    return problems.gaussian_mixture([1.0], [mean], [0.5 * (covariance + covariance.T)])


def build_mixture(name: str, config: ConfigDict) -> problems.GaussianMixture:
    """Three well separated 2-D modes (:func:`shufflesgd.problems.three_mode_mixture_2d`), or
    ``num_components`` random anisotropic components in ``high_dim`` dimensions."""
    if name == "mixture_2d":
        return problems.three_mode_mixture_2d()
    return problems.random_gaussian_mixture(
        config.data_seed + 1, config.num_components, config.high_dim
    )


def marginal(
    law: problems.GaussianMixture, sde: diffusion.SDE, t: float
) -> problems.GaussianMixture:
    r""":math:`p_t` of the process started at ``law``."""
    t = jnp.asarray(t)
    return law.diffuse(sde.alpha(t), sde.sigma(t))


def prior_mismatch_floor(law: problems.GaussianMixture, sde: diffusion.SDE) -> float:
    r""":math:`KL(\pi\,\|\,p_T)`, :math:`\pi = N(0, \sigma_T^2 I)`: an exact ODE flow's KL to
    :math:`p_{t_{min}}`."""
    p_T = marginal(law, sde, sde.t_max)
    d = law.dim
    return float(
        metrics.gaussian_kl(
            jnp.zeros(d), sde.prior_std**2 * jnp.eye(d), p_T.means[0], p_T.covariances[0]
        )
    )


# ------------------------------------------------------------------ Part A: exact Gaussian laws


def gaussian_laws(
    sampler: Callable,
    options: dict[str, Any],
    draws: int,
    model: diffusion.Model,
    sde: diffusion.SDE,
    target: problems.GaussianMixture,
) -> Callable:
    """A jitted ``grids [G, N+1] -> (KL, W2, nfe)``, one value per grid: the exact law of each run
    against the target :math:`p_{t_{min}}`, grids vmapped (one compilation per N)."""
    dim = target.dim
    mean_q, cov_q = target.means[0], target.covariances[0]

    def one(grid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        mean, cov = diffusion.exact_gaussian_law(
            sampler, model, sde, grid, dim, draws, final="none", **options
        )
        noise = jnp.zeros((grid.shape[0] - 1, draws, dim))
        nfe = sampler(None, model, sde, jnp.zeros(dim), grid, final="none", noise=noise, **options)[
            1
        ].nfe
        w2 = jnp.sqrt(jnp.clip(metrics.gaussian_w2(mean, cov, mean_q, cov_q), 0.0))
        return metrics.gaussian_kl(mean, cov, mean_q, cov_q), w2, nfe

    return jax.jit(jax.vmap(one))


def local_orders(nfe: list[int], kl: list[float]) -> list[float]:
    r"""Orders between consecutive budgets, :math:`-\frac12\,\Delta\log KL/\Delta\log NFE` (NaN
    where a budget did not run): the whole curve, pre-asymptotic stretch and floor included."""
    return [
        -0.5 * math.log(k2 / k1) / math.log(n2 / n1)
        if n1 > 0 and n2 > n1 and k1 > 0 and k2 > 0
        else float("nan")
        for n1, n2, k1, k2 in zip(nfe[:-1], nfe[1:], kl[:-1], kl[1:])
    ]


def fit_order(
    nfe: list[float], kl: list[float], floor: float, config: ConfigDict
) -> dict[str, Any]:
    """Slope of log KL against log NFE over the pre-floor points (KL >= floor_factor * floor), the
    ``fit_points`` largest budgets among them; order = -slope / 2.  NaN with fewer than two
    points."""
    points = [
        (n, k) for n, k in zip(nfe, kl) if np.isfinite(k) and k >= config.floor_factor * floor
    ]
    points = points[-config.fit_points :]
    if len(points) < 2:
        return {"slope": float("nan"), "order": float("nan"), "fit_nfe": [n for n, _ in points]}
    slope = common.loglog_slope([n for n, _ in points], [k for _, k in points])
    return {"slope": slope, "order": -0.5 * slope, "fit_nfe": [n for n, _ in points]}


def estimated_statistics(
    law: problems.GaussianMixture,
    model: diffusion.Model,
    sde: diffusion.SDE,
    key: jax.Array,
    config: ConfigDict,
) -> diffusion.EMS:
    r"""DPM-Solver-v3's statistics estimated from samples (Zheng et al. 2023, Sec. 3.1):
    :func:`shufflesgd.diffusion.estimate_ems` on ``ems_num_draws`` draws of the data law ``law``
    (from ``fold_in(key, 0)``) with ``model``, at ``ems_estimate_num_lambdas`` half log-SNRs
    (:func:`shufflesgd.diffusion.ems_lambdas`), its noise and probes from ``fold_in(key, 1)``."""
    data = law.sample(jax.random.fold_in(key, 0), config.ems_num_draws)
    lambdas = diffusion.ems_lambdas(sde, config.ems_estimate_num_lambdas)
    return diffusion.estimate_ems(jax.random.fold_in(key, 1), model, sde, data, lambdas)


def labelled_sampler(
    label: str,
    field: str,
    config: ConfigDict,
    statistics: dict[str, Callable[[], diffusion.EMS]],
) -> tuple[str, dict[str, Any]]:
    """:func:`experiments.common.sampler_options` of a label of ``config.<field>``, with a
    DPM-Solver-v3 label's ``statistics`` choice (its own, else :data:`DEFAULT_STATISTICS`) made
    into the statistics: ``statistics[choice]()``, or ``None`` (the library's default)."""
    name, options = common.sampler_options(label, config)
    if name == "dpm_solver_v3":
        choice = options.get("statistics", DEFAULT_STATISTICS[field])
        options["statistics"] = None if choice is None else statistics[choice]()
    return name, options


def exact_curves(
    label: str,
    laws: Callable,
    steps: list[int | None],
    budgets: list[int],
    grids: list[str],
    sde: Any,
    floor: float,
    config: ConfigDict,
    bar: tqdm,
) -> dict[str, dict[str, Any]]:
    """Per grid: steps, NFE, exact KL and W2 at each budget (``steps[i]`` steps, or ``None`` where
    one step exceeds budget ``i``), through ``laws`` (:func:`gaussian_laws`; ``RuntimeError`` when a
    run's NFE exceeds its budget), the fitted order (:func:`fit_order`) and the local orders."""
    per_grid = {g: {"steps": [], "nfe": [], "kl": [], "w2": []} for g in grids}
    for budget, n in zip(budgets, steps):
        if n is None:
            kl = w2 = np.full(len(grids), np.nan)
            nfe = np.full(len(grids), -1)
        else:
            stacked = jnp.asarray(np.stack([diffusion.time_grid(sde, g, n) for g in grids]))
            kl, w2, nfe = (np.asarray(a) for a in laws(stacked))
            if np.any(nfe > budget):
                raise RuntimeError(f"{label} used {nfe.max()} evaluations for a budget of {budget}")
        for i, g in enumerate(grids):
            per_grid[g]["steps"].append(n)
            per_grid[g]["nfe"].append(int(nfe[i]))
            per_grid[g]["kl"].append(float(kl[i]))
            per_grid[g]["w2"].append(float(w2[i]))
        bar.update()
    for r in per_grid.values():
        ran = [i for i, n in enumerate(r["steps"]) if n is not None]
        r.update(fit_order([r["nfe"][i] for i in ran], [r["kl"][i] for i in ran], floor, config))
        r["local_orders"] = local_orders(r["nfe"], r["kl"])
    return per_grid


def run_gaussian(
    config: ConfigDict, sde: diffusion.SDE, key: jax.Array, bar: tqdm
) -> dict[str, Any]:
    """Part A: exact KL and W2 for every (sampler, grid, budget); fitted orders.  ``key`` seeds
    DPM-Solver-v3's estimated statistics (:func:`estimated_statistics`), computed only when a
    label asks for them."""
    law = build_gaussian(config)
    target = marginal(law, sde, sde.t_min)
    model = diffusion.mixture_model(sde, law.eigen())
    floor = prior_mismatch_floor(law, sde)
    budgets, grids = list(config.nfe_budgets), list(config.grids)
    exact_lambdas = diffusion.ems_lambdas(sde, config.ems_num_lambdas)
    statistics = {
        "exact": functools.cache(
            lambda: diffusion.gaussian_ems(sde, law.means[0], law.covariances[0], exact_lambdas)
        ),
        "estimated": functools.cache(lambda: estimated_statistics(law, model, sde, key, config)),
    }
    result: dict[str, Any] = {
        "sde": config.sde,
        "dim": law.dim,
        "floor_kl": floor,
        "budgets": budgets,
        "samplers": {},
    }
    for name in config.gaussian_samplers:
        sampler_name, options = labelled_sampler(name, "gaussian_samplers", config, statistics)
        spec = diffusion.SAMPLERS[sampler_name]
        cost = spec.cost(**options)
        laws = gaussian_laws(spec.sampler, options, cost.noise_draws_per_step, model, sde, target)
        steps = [spec.steps_within(b, final="none", **options) for b in budgets]
        result["samplers"][name] = {
            "nfe_per_step": cost.nfe_per_step,
            "nfe_fixed": cost.nfe_fixed,
            "grids": exact_curves(name, laws, steps, budgets, grids, sde, floor, config, bar),
        }
    return result


# ------------------------------------------------------------------ Part B: mixtures


def seed_keys(key: jax.Array, config: ConfigDict) -> jax.Array:
    """``key_s = fold_in(key, s)`` for the ``num_seeds`` seeds ``s``, split over the devices of
    :func:`experiments.common.seed_mesh`: the seed axis of Part B's jitted calls."""
    keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(config.num_seeds))
    return common.shard_seeds(keys, common.seed_mesh(config))


def mixture_scorer(
    target: problems.GaussianMixture, bandwidth_sq: float, config: ConfigDict
) -> Callable:
    """A jitted ``(samples [S, n, d], keys [S]) -> metrics [S, 3]`` (sliced W2, MMD², mode-weight
    error) against ``n`` exact draws per seed s (key ``fold_in(keys[s], 0)``; ``keys`` from
    :func:`seed_keys`); each device's block of seeds in ``lax.map``, so that only one seed's
    kernel matrices are live at a time on a device, the blocks vmapped."""
    n, d = config.num_samples, target.dim
    blocks = common.seed_devices(config)

    def one(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, seed_key = args
        reference = target.sample(jax.random.fold_in(seed_key, 0), n)
        directions = metrics.random_directions(
            jax.random.fold_in(seed_key, 1), config.num_projections, d
        )
        return jnp.stack(
            [
                metrics.sliced_w2(x, reference, directions),
                metrics.mmd_squared(x, reference, bandwidth_sq),
                metrics.mode_weight_error(x, target),
            ]
        )

    def score(samples: jax.Array, keys: jax.Array) -> jax.Array:
        if blocks == 1:
            return jax.lax.map(one, (samples, keys))
        split = jax.tree.map(lambda a: a.reshape((blocks, -1) + a.shape[1:]), (samples, keys))
        values = jax.vmap(lambda block: jax.lax.map(one, block))(split)
        return values.reshape((-1,) + values.shape[2:])

    return jax.jit(score)


def mixture_sampler(
    sampler: Callable,
    options: dict[str, Any],
    model: diffusion.Model,
    sde: diffusion.SDE,
    dim: int,
    config: ConfigDict,
) -> Callable:
    """A jitted ``(grid, keys) -> (samples [S, n, d], nfe [S, n], nonfinite [S, n])``: all seeds in
    one vmapped call, split over the devices that ``keys`` (:func:`seed_keys`) lie on; seed s
    draws its prior from ``fold_in(keys[s], 0)`` and its noise from ``fold_in(keys[s], 1)``."""

    def one(seed_key: jax.Array, grid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x_T = sde.prior_sample(jax.random.fold_in(seed_key, 0), (config.num_samples, dim))
        x, info = diffusion.sample_batch(
            sampler, jax.random.fold_in(seed_key, 1), model, sde, x_T, grid, final="none", **options
        )
        return x, info.nfe, info.nonfinite_step

    def run(grid: jax.Array, keys: jax.Array):
        return jax.vmap(one, in_axes=(0, None))(keys, grid)

    return jax.jit(run)


def summarise(values: np.ndarray) -> dict[str, float]:
    """Mean and standard error over seeds (axis 0) of one metric."""
    mean, stderr = common.mean_and_stderr(np.ravel(values))
    return {"mean": float(mean), "se": float(stderr)}


def run_mixtures(
    config: ConfigDict, sde: diffusion.SDE, key: jax.Array, bar: tqdm
) -> dict[str, Any]:
    """Part B: sliced W2, MMD² and mode-weight error of every sampler at every budget, and of exact
    draws.  Mixture ``p`` draws from ``fold_in(key, p)``; DPM-Solver-v3's statistics are estimated
    for it (:func:`estimated_statistics`) only when a label asks for them."""
    result: dict[str, Any] = {}
    metric_names = ("sliced_w2", "mmd2", "mode_weight_error")
    for p, problem in enumerate(config.mixtures):
        law = build_mixture(problem, config)
        target = marginal(law, sde, sde.t_min)
        model = diffusion.mixture_model(sde, law.eigen())
        problem_key = jax.random.fold_in(key, p)
        reference_key, sample_key, exact_key, bandwidth_key, statistics_key = (
            jax.random.fold_in(problem_key, i) for i in range(5)
        )
        statistics = {
            "estimated": functools.cache(
                lambda law=law, model=model, key=statistics_key: estimated_statistics(
                    law, model, sde, key, config
                )
            )
        }
        pool = target.sample(bandwidth_key, min(config.num_samples, 2048))
        bandwidth_sq = float(
            jnp.median(metrics.squared_distances(pool, pool)[jnp.triu_indices(pool.shape[0], 1)])
        )
        score = mixture_scorer(target, bandwidth_sq, config)
        entry: dict[str, Any] = {
            "dim": law.dim,
            "weights": np.exp(np.asarray(law.log_weights)).tolist(),
            "bandwidth_sq": bandwidth_sq,
            "grid": config.mixture_grid,
            "samplers": {},
        }
        # the Monte Carlo floor: exact draws (independent of the references) scored the same way
        exact_keys = seed_keys(exact_key, config)
        exact = jax.vmap(target.sample, in_axes=(0, None))(exact_keys, config.num_samples)
        values = np.asarray(score(exact, seed_keys(reference_key, config)))
        entry["exact"] = {m: summarise(values[:, i]) for i, m in enumerate(metric_names)}
        bar.update()
        for s, name in enumerate(config.mixture_samplers):
            sampler_name, options = labelled_sampler(name, "mixture_samplers", config, statistics)
            spec = diffusion.SAMPLERS[sampler_name]
            run = mixture_sampler(spec.sampler, options, model, sde, law.dim, config)
            per_budget: dict[str, Any] = {}
            for budget in config.mixture_nfe_budgets:
                steps = spec.steps_within(budget, final="none", **options)
                if steps is None:
                    per_budget[str(budget)] = {"steps": None, "nfe": None}
                    bar.update()
                    continue
                grid = jnp.asarray(diffusion.time_grid(sde, config.mixture_grid, steps))
                samples, nfe, bad = run(grid, seed_keys(jax.random.fold_in(sample_key, s), config))
                nfe, bad = np.asarray(nfe), np.asarray(bad)
                if np.any(nfe > budget):
                    raise RuntimeError(
                        f"{name} used {nfe.max()} evaluations for a budget of {budget}"
                    )
                values = np.asarray(score(samples, seed_keys(reference_key, config)))
                per_budget[str(budget)] = {
                    "steps": steps,
                    "nfe": int(nfe.max()),
                    "nonfinite_samples": int(np.sum(bad >= 0)),
                    **{m: summarise(values[:, i]) for i, m in enumerate(metric_names)},
                }
                bar.update()
            entry["samplers"][name] = per_budget
        result[problem] = entry
    return result


# ------------------------------------------------------------------ Part C: mean-reverting


def build_mean_reverting(
    law: problems.GaussianMixture, config: ConfigDict
) -> tuple[diffusion.MeanReverting, problems.GaussianMixture, diffusion.Model]:
    r"""IR-SDE's process towards :math:`\mu = m + \delta u` (:math:`m` the mean of the Gaussian
    ``law``, :math:`\delta` = ``mean_reverting_offset``, :math:`u` a random unit vector from
    ``data_seed + 2``), the law of the centred :math:`y_0 = x_0 - \mu`, and the exact model in
    :math:`x`: the score of :math:`p_t = N(\mu + \alpha_t(m - \mu), \alpha_t^2\Sigma +
    \sigma_t^2 I)`."""
    direction = np.random.default_rng(config.data_seed + 2).standard_normal(law.dim)
    mean = np.asarray(law.means[0])
    mu = mean + config.mean_reverting_offset * direction / np.linalg.norm(direction)
    sde = diffusion.mean_reverting(
        jnp.asarray(mu),
        config.mean_reverting_std,
        schedule=config.mean_reverting_schedule,
        terminal_alpha=config.mean_reverting_terminal_alpha,
    )
    centred = problems.gaussian_mixture([1.0], [mean - mu], [np.asarray(law.covariances[0])])
    eigen = centred.eigen()
    model = diffusion.Model(
        lambda x, t: eigen.score(x - sde.mu, sde.alpha(t), sde.sigma(t)), "score"
    )
    return sde, centred, model


def mean_reverting_sampler(name: str) -> Callable:
    r"""Sampler ``name`` of Part C with the signature that
    :func:`shufflesgd.diffusion.exact_gaussian_law` calls, ``(key, model, sde, xi, grid,
    **options)``, started at :math:`x_T = \mu + \xi`
    (``exact_gaussian_law`` draws :math:`\xi \sim N(0, \lambda^2 I)`, so :math:`x_T` is a prior
    draw): MRS on :math:`x`, or the house sampler ``name`` on :math:`y = x - \mu` through
    :func:`shufflesgd.diffusion.sample_centred`."""
    run = (
        diffusion.mrs
        if name == "mrs"
        else functools.partial(diffusion.sample_centred, diffusion.SAMPLERS[name].sampler)
    )

    def started_at_mu(
        key: jax.Array | None,
        model: diffusion.Model,
        sde: diffusion.MeanReverting,
        xi: jax.Array,
        grid: jax.Array,
        **options: Any,
    ) -> tuple[jax.Array, diffusion.SamplerInfo]:
        return run(key, model, sde, sde.mu + xi, grid, **options)

    return started_at_mu


def mean_reverting_cost(name: str, options: dict[str, Any]) -> diffusion.SamplerCost:
    """What one run costs: the registry's :meth:`~shufflesgd.diffusion.SamplerSpec.cost`, and for
    MRS one evaluation a step (multistep at every order) and one draw a step for its SDE solver."""
    if name == "mrs":
        return diffusion.SamplerCost(1, 0, int(options.get("solver", "ode") == "sde"))
    return diffusion.SAMPLERS[name].cost(**options)


def steps_within(cost: diffusion.SamplerCost, budget: int) -> int | None:
    """The most steps whose evaluations (``final="none"``) fit ``budget``; ``None`` when one step
    does not (the registry's :meth:`~shufflesgd.diffusion.SamplerSpec.steps_within`)."""
    steps = (budget - cost.nfe_fixed) // cost.nfe_per_step
    return steps if steps >= 1 else None


def run_mean_reverting(config: ConfigDict, bar: tqdm) -> dict[str, Any]:
    """Part C: exact KL and W2 of MRS and of the house samplers (on the centred variable) on IR-SDE
    from Part A's Gaussian, at every budget; fitted orders."""
    law = build_gaussian(config)
    sde, centred, model = build_mean_reverting(law, config)
    target_centred = marginal(centred, sde, sde.t_min)
    target = problems.gaussian_mixture(
        [1.0], [sde.mu + target_centred.means[0]], [target_centred.covariances[0]]
    )
    # KL is invariant under the shift by mu: the floor of x is that of y = x - mu
    floor = prior_mismatch_floor(centred, sde.centred())
    budgets, grid = list(config.mean_reverting_nfe_budgets), config.mean_reverting_grid
    result: dict[str, Any] = {
        "dim": law.dim,
        "schedule": config.mean_reverting_schedule,
        "stationary_std": config.mean_reverting_std,
        "terminal_alpha": config.mean_reverting_terminal_alpha,
        "offset": config.mean_reverting_offset,
        "mu": np.asarray(sde.mu).tolist(),
        "grid": grid,
        "floor_kl": floor,
        "budgets": budgets,
        "samplers": {},
    }
    for label in config.mean_reverting_samplers:
        name, options = common.sampler_options(label, config)
        cost = mean_reverting_cost(name, options)
        sampler = mean_reverting_sampler(name)
        laws = gaussian_laws(sampler, options, cost.noise_draws_per_step, model, sde, target)
        steps = [steps_within(cost, b) for b in budgets]
        curves = exact_curves(label, laws, steps, budgets, [grid], sde, floor, config, bar)
        result["samplers"][label] = {
            "nfe_per_step": cost.nfe_per_step,
            "nfe_fixed": cost.nfe_fixed,
            **curves[grid],
        }
    return result


# ------------------------------------------------------------------ Part D: DC-Solver


def exact_flow_states(
    law: problems.GaussianMixture, sde: diffusion.SDE, x_T: jax.Array, grid: jax.Array
) -> jax.Array:
    r"""The exact probability-flow trajectories of a one-Gaussian ``law`` from ``x_T``
    (``[B, d]``) at ``grid[0]``, at the times ``grid[1:]`` (``[B, N, d]``).  With
    :math:`\Sigma = U\,\mathrm{diag}(w)\,U^\top` every marginal covariance
    :math:`C_t = \alpha_t^2\Sigma + \sigma_t^2 I` shares the eigenvectors :math:`U`, the ODE is
    linear with commuting matrices, and its flow is
    :math:`x_s = \alpha_s\mu + U\,\mathrm{diag}\bigl(\sqrt{c_s/c_t}\bigr)U^\top
    (x_t - \alpha_t\mu)`, :math:`c_t = \alpha_t^2 w + \sigma_t^2`."""
    mu = law.means[0]
    w, u = jnp.linalg.eigh(law.covariances[0])
    alpha, sigma = sde.alpha(grid), sde.sigma(grid)
    c = alpha[:, None] ** 2 * w + sigma[:, None] ** 2  # [N+1, d]
    centred = (x_T - alpha[0] * mu) @ u  # [B, d] in the eigenbasis
    scale = jnp.sqrt(c[1:] / c[0])  # [N, d]
    return alpha[None, 1:, None] * mu + jnp.einsum("nd,bd,ed->bne", scale, centred, u)


def run_dc_solver(
    config: ConfigDict, sde: diffusion.SDE, key: jax.Array, bar: tqdm
) -> dict[str, Any]:
    r"""Part D: DC-Solver (Zhao et al. 2024) on the Part A Gaussian.  For each grid of
    ``dc_grids`` and each step count :math:`N` of ``dc_steps``: the compensation ratios searched
    (:func:`shufflesgd.diffusion.fit_dc_ratios`) on ``dc_reference_draws`` prior draws against
    the exact probability-flow trajectories (:func:`exact_flow_states`, in place of the authors'
    many-step reference solver), and predicted by a cascade polynomial regression
    (:func:`shufflesgd.diffusion.fit_cascade_polynomial`) fitted to the ratios searched at the
    *other* step counts (leave one out: the prediction for an unseen NFE); exact KL of the three
    samplers at equal NFE: UniPC (neutral ratios), DC-Solver with searched and with predicted
    ratios."""
    law = build_gaussian(config)
    target = marginal(law, sde, sde.t_min)
    model = diffusion.mixture_model(sde, law.eigen())
    mean_q, cov_q = target.means[0], target.covariances[0]
    options = {"order": config.dc_order, "dc_order": config.dc_interpolation_order}

    def kl(grid: jax.Array, ratios: jax.Array) -> jax.Array:
        mean, cov = diffusion.exact_gaussian_law(
            diffusion.dc_solver,
            model,
            sde,
            grid,
            law.dim,
            0,
            final="none",
            ratios=ratios,
            **options,
        )
        return metrics.gaussian_kl(mean, cov, mean_q, cov_q)

    def search(x_T: jax.Array, grid: jax.Array) -> jax.Array:
        reference = exact_flow_states(law, sde, x_T, grid)
        fit = diffusion.fit_dc_ratios(
            model, sde, x_T, grid, reference, steps=config.dc_search_steps, **options
        )
        return fit.ratios

    kl, search = jax.jit(kl), jax.jit(search)
    steps = list(config.dc_steps)
    x_T = sde.prior_sample(key, (config.dc_reference_draws, law.dim))
    result: dict[str, Any] = {
        "order": config.dc_order,
        "interpolation_order": config.dc_interpolation_order,
        "reference_draws": config.dc_reference_draws,
        "steps": steps,
        "grids": {},
    }
    for grid_kind in config.dc_grids:
        grids = [jnp.asarray(diffusion.time_grid(sde, grid_kind, n)) for n in steps]
        searched = [np.asarray(search(x_T, g), np.float64) for g in grids]
        rows = {
            "kl_unipc": [],
            "kl_searched": [],
            "kl_predicted": [],
            "ratios": [],
            "predicted": [],
        }
        for i, (n, grid) in enumerate(zip(steps, grids)):
            others = [j for j in range(len(steps)) if j != i]
            cpr = diffusion.fit_cascade_polynomial(
                [steps[j] for j in others],
                [searched[j] for j in others],
                dc_order=config.dc_interpolation_order,
                nfe_degree=config.dc_cpr_nfe_degree,
            )
            predicted = diffusion.predict_dc_ratios(cpr, n)
            rows["kl_unipc"].append(float(kl(grid, jnp.ones(n, grid.dtype))))
            rows["kl_searched"].append(float(kl(grid, jnp.asarray(searched[i], grid.dtype))))
            rows["kl_predicted"].append(float(kl(grid, jnp.asarray(predicted, grid.dtype))))
            rows["ratios"].append(searched[i].tolist())
            rows["predicted"].append(predicted.tolist())
            bar.update()
        result["grids"][grid_kind] = rows
    return result


# ------------------------------------------------------------------ output


def best_at_low_nfe(gaussian: dict[str, Any], largest: int) -> dict[str, dict[str, Any]]:
    """Per grid and budget up to ``largest``: the sampler of lowest exact KL (ties to the first
    listed) and its KL; ``None`` where no sampler ran or every KL is non-finite."""
    best: dict[str, dict[str, Any]] = {}
    for grid in next(iter(gaussian["samplers"].values()))["grids"]:
        best[grid] = {}
        for i, budget in enumerate(gaussian["budgets"]):
            if budget > largest:
                continue
            scored = [
                (r["grids"][grid]["kl"][i], name)
                for name, r in gaussian["samplers"].items()
                if r["grids"][grid]["kl"][i] is not None and np.isfinite(r["grids"][grid]["kl"][i])
            ]
            kl, name = min(scored, key=lambda pair: pair[0]) if scored else (None, None)
            best[grid][str(budget)] = None if name is None else {"sampler": name, "kl": kl}
    return best


def grid_ratios(gaussian: dict[str, Any]) -> dict[str, list[float]]:
    """KL(uniform_time) / KL(uniform_log_snr) per sampler and budget (when both grids ran)."""
    ratios = {}
    for name, r in gaussian["samplers"].items():
        grids = r["grids"]
        if "uniform_time" in grids and "uniform_log_snr" in grids:
            ratios[name] = [
                a / b if np.isfinite(a) and np.isfinite(b) and b > 0 else float("nan")
                for a, b in zip(grids["uniform_time"]["kl"], grids["uniform_log_snr"]["kl"])
            ]
    return ratios


def mixture_rows(mixtures: dict[str, Any]) -> list[list[Any]]:
    """CSV rows of Part B: the exact draws (no budget, no NFE), then every sampler and budget."""
    metric_names = ("sliced_w2", "mmd2", "mode_weight_error")

    def values(r: dict[str, Any]) -> list[Any]:
        return [r[m][k] if m in r else None for m in metric_names for k in ("mean", "se")]

    rows = []
    for problem, entry in mixtures.items():
        rows.append([problem, "exact", None, None, None, *values(entry["exact"])])
        for name, per_budget in entry["samplers"].items():
            rows.extend(
                [problem, name, budget, r["steps"], r["nfe"], *values(r)]
                for budget, r in per_budget.items()
            )
    return rows


def _fmt(value: float, spec: str = ".2e") -> str:
    return "—" if value is None or not np.isfinite(value) else format(value, spec)


def _curve_lines(
    rows: list[tuple[str, dict[str, Any]]], budgets: list[int], head: str, width: int
) -> list[str]:
    """Table lines of exact-KL curves: ``head`` (the label columns, ``width`` wide), the KL at each
    budget and the fitted order; then the local orders between consecutive budgets."""
    lines = [f"{head:{width}s} " + " ".join(f"{b:>8d}" for b in budgets) + "   order  (fit NFE)"]
    for label, v in rows:
        fit = ",".join(str(n) for n in v["fit_nfe"])
        lines.append(
            f"{label:{width}s} "
            + " ".join(f"{_fmt(k):>8s}" for k in v["kl"])
            + f"   {_fmt(v['order'], '+.2f'):>5s}  ({fit})"
        )
    lines.append(
        "local orders -1/2 dlog KL / dlog NFE between consecutive budgets "
        "(the floor flattens the last ones)"
    )
    lines.append(
        f"{head:{width}s} "
        + " ".join(f"{f'{a}-{b}':>8s}" for a, b in zip(budgets[:-1], budgets[1:]))
    )
    for label, v in rows:
        lines.append(
            f"{label:{width}s} " + " ".join(f"{_fmt(o, '+.2f'):>8s}" for o in v["local_orders"])
        )
    return lines


def format_table(metrics: dict[str, Any]) -> str:
    g = metrics["gaussian"]
    budgets = g["budgets"]
    ems = metrics["ems"]
    lines = [
        (
            f"Part A: exact KL(sampler law || p_tmin), {g['dim']}-D anisotropic Gaussian, "
            f"{g['sde']}, "
            "final='none'; NFE budget per column (each sampler takes the most steps that fit)"
        ),
        (
            f"prior-mismatch floor KL(prior || p_T) = {g['floor_kl']:.4e} nats "
            "(a perfect ODE solver's KL; "
            f"fits use KL >= {metrics['floor_factor']:g} x floor, "
            f"the {metrics['fit_points']} largest such NFE)"
        ),
    ]
    if any(
        common.parse_sampler("gaussian_samplers", name)[0] == "dpm_solver_v3"
        for name in g["samplers"]
    ):
        lines.append(
            "DPM-Solver-v3 statistics: exact = gaussian_ems on "
            f"{ems['exact_num_lambdas']} half log-SNRs; estimated = estimate_ems from "
            f"{ems['num_draws']} data draws on {ems['estimate_num_lambdas']} half log-SNRs"
        )
    rows = [
        (f"{name:{max([18, *map(len, g['samplers'])])}s} {grid:16s}", v)
        for name, r in g["samplers"].items()
        for grid, v in r["grids"].items()
    ]
    width = len(rows[0][0])
    head = "{:{}s} {:16s}".format("sampler", width - 17, "grid")
    lines.extend(_curve_lines(rows, budgets, head, width))
    ratios = metrics["grid_ratio_uniform_time_over_log_snr"]
    if ratios:
        lines.append(
            f"low NFE on {g['sde']}: KL(uniform_time) / KL(uniform_log_snr) at NFE budgets "
            + ", ".join(str(b) for b in budgets[:3])
        )
        for name, values in ratios.items():
            lines.append(
                f"  {name:{width - 17}s} " + " ".join(f"{_fmt(v, '.3g'):>9s}" for v in values[:3])
            )
    lines.append(f"best sampler (lowest exact KL) at each NFE budget <= {LOW_NFE}:")
    for grid, per_budget in metrics["best_at_low_nfe"].items():
        best = [
            f"{budget}: —" if r is None else f"{budget}: {r['sampler']} ({_fmt(r['kl'])})"
            for budget, r in per_budget.items()
        ]
        lines.append(f"  {grid:16s} " + "  ".join(best))
    for problem, entry in metrics["mixtures"].items():
        width = max([20, *map(len, entry["samplers"])])
        lines.append(
            f"Part B: {problem} ({entry['dim']}-D, weights "
            + "/".join(f"{w:.2f}" for w in entry["weights"])
            + f"), {entry['grid']} grid, mean ± SE over {metrics['num_seeds']} seeds of "
            f"{metrics['num_samples']} samples; "
            f"MMD² Gaussian kernel h² = {entry['bandwidth_sq']:.3g} "
            "(median heuristic)"
        )
        lines.append(
            "{:{}s} {:>6s} {:>4s} {:>21s} {:>23s} {:>21s}".format(
                "sampler", width, "budget", "NFE", "sliced W2", "MMD²", "mode-weight TV"
            )
        )

        def row(label: str, budget: str, nfe: str, r: dict[str, Any], width: int = width) -> str:
            return f"{label:{width}s} {budget:>6s} {nfe:>4s} " + " ".join(
                f"{_fmt(r[m]['mean']):>9s} ± {_fmt(r[m]['se'], '.1e'):>7s}   "
                for m in ("sliced_w2", "mmd2", "mode_weight_error")
            )

        lines.append(row("exact (MC floor)", "—", "—", entry["exact"]))
        for name, per_budget in entry["samplers"].items():
            for budget, r in per_budget.items():
                if r["nfe"] is None:
                    lines.append(
                        f"{name:{width}s} {budget:>6s}    — (its smallest run exceeds the budget)"
                    )
                else:
                    lines.append(
                        row(name, budget, str(r["nfe"]), r)
                        + (
                            f" ({r['nonfinite_samples']} non-finite)"
                            if r["nonfinite_samples"]
                            else ""
                        )
                    )
    if any(
        common.parse_sampler("mixture_samplers", name)[0] == "dpm_solver_v3"
        for entry in metrics["mixtures"].values()
        for name in entry["samplers"]
    ):
        lines.append(
            "Part B: DPM-Solver-v3's estimated statistics: estimate_ems from "
            f"{ems['num_draws']} draws of each mixture on {ems['estimate_num_lambdas']} half "
            "log-SNRs, with its exact model"
        )
    c = metrics["mean_reverting"]
    lines.append(
        f"Part C: exact KL(sampler law || p_tmin), mean-reverting SDE (IR-SDE, {c['schedule']} "
        f"theta, lambda = {c['stationary_std']:g}, exp(-theta_bar(T)) = "
        f"{c['terminal_alpha']:g}) from the {c['dim']}-D Gaussian, |mu - mean| = "
        f"{c['offset']:g}; {c['grid']} grid, final='none'; MRS on x, the others on x - mu"
    )
    lines.append(
        f"prior-mismatch floor KL(N(mu, lambda^2 I) || p_T) = {c['floor_kl']:.4e} nats "
        "(a perfect ODE solver's KL)"
    )
    width = max([18, *map(len, c["samplers"])])
    lines.extend(_curve_lines(list(c["samplers"].items()), c["budgets"], "sampler", width))
    d = metrics.get("dc_solver")
    if d:
        lines.append(
            f"Part D: DC-Solver (UniPC-{d['order']}, interpolation order "
            f"{d['interpolation_order']}) on the Part A Gaussian, final='none' (NFE = steps): "
            "exact KL(sampler law || p_tmin); ratios searched on "
            f"{d['reference_draws']} exact PF-ODE trajectories, or predicted by CPR fitted to the "
            "other step counts (leave one out)"
        )
        lines.append(
            f"{'grid':<16} {'NFE':>4} {'UniPC':>10} {'DC searched':>12} {'DC predicted':>13}"
            f" {'searched/UniPC':>15}"
        )
        for grid, r in d["grids"].items():
            for i, n in enumerate(d["steps"]):
                ratio = r["kl_searched"][i] / r["kl_unipc"][i] if r["kl_unipc"][i] > 0 else math.nan
                lines.append(
                    f"{grid:<16} {n:>4} {_fmt(r['kl_unipc'][i]):>10} "
                    f"{_fmt(r['kl_searched'][i]):>12} {_fmt(r['kl_predicted'][i]):>13} "
                    f"{ratio:>15.3f}"
                )
    return "\n".join(lines)


def _short_label(label: str) -> str:
    """An MRS label in the figure's legend: ``MRS SDE-data-2`` (solver, prediction, order; any
    other option as ``name=value``); other labels as they are."""
    name, options = common.parse_sampler("mean_reverting_samplers", label)
    if name != "mrs":
        return label
    parameters = inspect.signature(diffusion.mrs).parameters
    defaults = {option: parameters[option].default for option in MRS_OPTIONS}
    options = {**defaults, **options}
    rest = ", ".join(
        f"{option}={options[option]}"
        for option in MRS_OPTIONS
        if option not in ("solver", "prediction", "order") and options[option] != defaults[option]
    )
    head = f"MRS {options['solver'].upper()}-{options['prediction']}-{options['order']}"
    return head + (f" ({rest})" if rest else "")


def _kl_curve(axis: Any, name: str, v: dict[str, Any]) -> None:
    """One sampler's exact KL against NFE (finite positive points; the order in the label)."""
    run = [(n, np.nan if k is None else k) for n, k in zip(v["nfe"], v["kl"]) if n > 0]
    nfe, kl, _, dropped = common.finite_curve(*zip(*run)) if run else ([], [], None, 0)
    label = common.not_shown(f"{name} ({_fmt(v['order'], '.2f')})", dropped)
    if len(nfe):
        axis.plot(nfe, kl, marker="o", ms=3, label=label)
    elif dropped:
        axis.plot([], [], marker="x", ls="", label=label)


def _draw_mean_reverting(axes: Any, c: dict[str, Any]) -> None:
    """Part C on one row of panels: MRS, then the house samplers on the centred variable."""
    mrs = {n: common.parse_sampler("mean_reverting_samplers", n)[0] == "mrs" for n in c["samplers"]}
    panels = (
        ("MRS", [n for n in c["samplers"] if mrs[n]]),
        ("house samplers on x - mu", [n for n in c["samplers"] if not mrs[n]]),
    )
    for axis, (title, names) in zip(axes, panels):
        for name in names:
            _kl_curve(axis, _short_label(name), c["samplers"][name])
        common.log_level(axis, c["floor_kl"], color="k", ls="--", lw=0.8, label="KL(prior || p_T)")
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="NFE",
            ylabel="exact KL to p_tmin",
            title=f"Part C: IR-SDE ({c['schedule']} theta, {c['grid']})\n{title}",
        )
    for axis in axes[len(panels) :]:
        axis.axis("off")


def _draw_dc_solver(axes: Any, d: dict[str, Any]) -> None:
    """Part D on one row of panels, one per grid: UniPC and DC-Solver's two sets of ratios."""
    for axis, (grid, r) in zip(axes, d["grids"].items()):
        for key, label in (
            ("kl_unipc", f"UniPC-{d['order']}"),
            ("kl_searched", "DC-Solver, searched ratios"),
            ("kl_predicted", "DC-Solver, CPR-predicted ratios"),
        ):
            nfe, kl, _, dropped = common.finite_curve(
                np.asarray(d["steps"], float), np.asarray(r[key], float), None
            )
            axis.plot(nfe, kl, marker="o", ms=3, label=common.not_shown(label, dropped))
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="NFE",
            ylabel="exact KL to p_tmin",
            title=f"Part D: DC-Solver, {grid}",
        )
    for axis in axes[len(d["grids"]) :]:
        axis.axis("off")


def draw(metrics: dict[str, Any], path) -> None:
    """Error against NFE: only finite points (and, on a log axis, positive ones) are drawn; a
    sampler with dropped (diverged) points says how many in its legend label.  Rows: Part A's
    grids, one per mixture of Part B, and Part C when the metrics hold it."""
    g = metrics["gaussian"]
    grids = list(next(iter(g["samplers"].values()))["grids"])
    problems_ = list(metrics["mixtures"])
    part_c = metrics.get("mean_reverting")
    part_d = metrics.get("dc_solver")
    cols = max(len(grids), 3, len(part_d["grids"]) if part_d else 0)
    rows = 1 + len(problems_) + (part_c is not None) + bool(part_d)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for j, grid in enumerate(grids):
        axis = axes[0, j]
        for name, r in g["samplers"].items():
            _kl_curve(axis, name, r["grids"][grid])
        common.log_level(axis, g["floor_kl"], color="k", ls="--", lw=0.8, label="KL(prior || p_T)")
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="NFE",
            ylabel="exact KL to p_tmin",
            title=f"{g['sde']}, {grid}",
        )
    for j in range(len(grids), cols):
        axes[0, j].axis("off")
    labels = {
        "sliced_w2": "sliced W2",
        "mmd2": "MMD² (unbiased)",
        "mode_weight_error": "mode-weight TV",
    }
    for i, problem in enumerate(problems_, start=1):
        entry = metrics["mixtures"][problem]
        for j, metric in enumerate(labels):
            axis = axes[i, j]
            for name, per_budget in entry["samplers"].items():
                pts = [
                    (r["nfe"], r[metric]["mean"], r[metric]["se"])
                    for r in per_budget.values()
                    if r["nfe"]
                ]
                if not pts:
                    continue
                nfe, mean, se = (np.asarray(c, float) for c in zip(*pts))  # None -> NaN
                if metric == "sliced_w2":  # log axis
                    nfe, mean, se, dropped = common.finite_curve(nfe, mean, se)
                else:  # linear axis: MMD² (unbiased) may be negative
                    keep = np.isfinite(nfe) & np.isfinite(mean) & np.isfinite(se)
                    nfe, mean, se, dropped = nfe[keep], mean[keep], se[keep], int(np.sum(~keep))
                label = common.not_shown(name, dropped)
                if len(nfe):
                    axis.errorbar(nfe, mean, yerr=se, marker="o", ms=3, capsize=2, label=label)
                else:
                    axis.plot([], [], marker="x", ls="", label=label)
            exact = entry["exact"][metric]["mean"]
            if exact is not None and np.isfinite(exact) and (metric != "sliced_w2" or exact > 0):
                axis.axhline(exact, color="k", ls="--", lw=0.8, label="exact (MC floor)")
            axis.set(
                xscale="log",
                xlabel="NFE",
                ylabel=labels[metric],
                title=f"{problem} ({entry['dim']}-D)",
            )
            if metric == "sliced_w2":
                axis.set_yscale("log")
        for j in range(len(labels), cols):
            axes[i, j].axis("off")
    if part_c is not None:
        _draw_mean_reverting(axes[1 + len(problems_)], part_c)
    if part_d:
        _draw_dc_solver(axes[rows - 1], part_d)
    for axis in axes.flat:
        if axis.has_data():
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=6)
    common.save_figure(fig, path)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table, the CSVs and the figure.
    Streams of ``key(seed)``: ``p`` for mixture ``p`` (Part B), :data:`GAUSSIAN_STREAM` for Part A,
    :data:`DC_STREAM` for Part D's prior draws; Part C draws nothing."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    sde = diffusion.make_sde(config.sde)
    folder = common.results_folder(config, NAME)
    runs_per_mixture = 1 + len(config.mixture_samplers) * len(config.mixture_nfe_budgets)
    total = (
        len(config.gaussian_samplers) * len(config.nfe_budgets)
        + len(config.mixtures) * runs_per_mixture
        + len(config.mean_reverting_samplers) * len(config.mean_reverting_nfe_budgets)
        + len(config.dc_grids) * len(config.dc_steps)
    )
    key = jax.random.key(config.seed)
    with tqdm(total=total, desc=NAME) as bar:
        gaussian = run_gaussian(config, sde, jax.random.fold_in(key, GAUSSIAN_STREAM), bar)
        mixtures = run_mixtures(config, sde, key, bar)
        mean_reverting = run_mean_reverting(config, bar)
        dc = (
            run_dc_solver(config, sde, jax.random.fold_in(key, DC_STREAM), bar)
            if config.dc_grids
            else {}
        )
    metrics: dict[str, Any] = {
        "devices": common.seed_devices(config),  # Part B's seed axis was split over these
        "floor_factor": config.floor_factor,
        "fit_points": config.fit_points,
        "num_seeds": config.num_seeds,
        "num_samples": config.num_samples,
        "ems": {
            "exact_num_lambdas": config.ems_num_lambdas,
            "num_draws": config.ems_num_draws,
            "estimate_num_lambdas": config.ems_estimate_num_lambdas,
        },
        "gaussian": gaussian,
        "grid_ratio_uniform_time_over_log_snr": grid_ratios(gaussian),
        "best_at_low_nfe": best_at_low_nfe(gaussian, LOW_NFE),
        "mixtures": mixtures,
        "mean_reverting": mean_reverting,
        "dc_solver": dc,
    }
    table = format_table(metrics)
    common.write_csv(
        folder / "gaussian_kl.csv",
        ["sampler", "grid", "budget", "steps", "nfe", "kl", "w2", "floor_kl"],
        [
            [
                name,
                grid,
                b,
                v["steps"][i],
                v["nfe"][i],
                v["kl"][i],
                v["w2"][i],
                gaussian["floor_kl"],
            ]
            for name, r in gaussian["samplers"].items()
            for grid, v in r["grids"].items()
            for i, b in enumerate(gaussian["budgets"])
        ],
    )
    common.write_csv(
        folder / "mixtures.csv",
        [
            "problem",
            "sampler",
            "budget",
            "steps",
            "nfe",
            "sliced_w2",
            "sliced_w2_se",
            "mmd2",
            "mmd2_se",
            "mode_weight_error",
            "mode_weight_error_se",
        ],
        mixture_rows(mixtures),
    )
    common.write_csv(
        folder / "mean_reverting_kl.csv",
        ["sampler", "grid", "budget", "steps", "nfe", "kl", "w2", "floor_kl"],
        [
            [name, mean_reverting["grid"], b, v["steps"][i], v["nfe"][i], v["kl"][i], v["w2"][i]]
            + [mean_reverting["floor_kl"]]
            for name, v in mean_reverting["samplers"].items()
            for i, b in enumerate(mean_reverting["budgets"])
        ],
    )
    if dc:
        common.write_csv(
            folder / "dc_solver_kl.csv",
            ["grid", "steps", "nfe", "kl_unipc", "kl_searched", "kl_predicted"],
            [
                [grid, n, n, r["kl_unipc"][i], r["kl_searched"][i], r["kl_predicted"][i]]
                for grid, r in dc["grids"].items()
                for i, n in enumerate(dc["steps"])
            ],
        )
    return common.finish(folder, table, metrics, lambda path: draw(metrics, path))


if __name__ == "__main__":
    common.main(run, validate)
