r"""Strong guidance makes high-order multistep samplers diverge at low NFE; heavy-ball and GHVB
momentum enlarge their stability regions and keep them finite.

Wizadwongsa, Chinchuthakun, Khungurn, Raj & Suwajanakorn 2024, "Diffusion Sampling with
Momentum for Mitigating Divergence Artifacts" (ICLR 2024).

**Target.**  A Gaussian mixture :math:`p = \sum_k w_k N(\mu_k, \Sigma_k)` (the 2-D three-mode
mixture, :func:`shufflesgd.problems.three_mode_mixture_2d`, and a ``high_dim``-D mixture of
``num_components`` random anisotropic components), conditioned on its component
:math:`c` = ``component``.  Under VP both the mixture and the component have closed-form
marginals, :math:`p_t = \sum_k w_k N(\alpha_t\mu_k, \alpha_t^2\Sigma_k + \sigma_t^2 I)` and
:math:`p_t(\cdot\mid c) = N(\alpha_t\mu_c, \alpha_t^2\Sigma_c + \sigma_t^2 I)`, so the
classifier-free guided score (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Eq. 6
written for scores) is exact:

.. math:: s_w(x, t) = (1 + w)\,\nabla\log p_t(x\mid c) - w\,\nabla\log p_t(x),

with :math:`w` from ``guidance_scales``.  Every sampler integrates the probability-flow ODE of
:math:`s_w` (Song et al. 2021, Eq. 13) from the same prior draws :math:`x_T`.

**Why it diverges.**  The data prediction :math:`D_w = (x + \sigma_t^2 s_w)/\alpha_t` has the
Jacobian :math:`(I + \sigma_t^2[(1+w)\nabla s_c - w\nabla s])/\alpha_t`.  For a mixture,
:math:`\nabla s = \sum_k r_k\nabla s_k + \mathrm{Cov}_{r(x)}[s_k(x)]`
(:math:`r_k` the responsibilities): the covariance term is large wherever the responsibilities
are split between modes, and guidance multiplies it by :math:`-w`.  The eigenvalues
:math:`\lambda` of the ODE's linearisation therefore grow roughly like :math:`1 + w`, and a
multistep method with step :math:`\delta` is stable on the test equation :math:`u' = \lambda u`
only while :math:`\delta\lambda` stays in its region of absolute stability (the paper's
Sec. 3.2).  Those regions shrink with the order: on the negative real axis Adams–Bashforth of
order :math:`r = 1, 2, 3, 4` (PLMS, the DDIM ODE) is stable on
:math:`(-2, 0), (-1, 0), (-\tfrac6{11}, 0), (-\tfrac3{10}, 0)`.  Few steps (large
:math:`\delta`) and strong guidance (large :math:`\lambda`) leave the region: the iterates grow
from step to step — the divergence artifacts.  Heavy ball (HB, the paper's Eq. 14),
:math:`v_{n+1} = (1-\beta)v_n + \beta\sum_m b_m f_{n-m}`, :math:`x_{n+1} = x_n + \delta v_{n+1}`,
has the characteristic equation
:math:`(\zeta - 1)(\zeta - 1 + \beta) = \beta z\,\zeta\,\tilde\sigma(\zeta)`,
:math:`z = \delta\lambda`, :math:`\tilde\sigma(\zeta) = \sum_m b_m\zeta^{-m}`; a root crosses
:math:`\zeta = -1` at :math:`z = -2(2-\beta)/(\beta\,\tilde\sigma(-1))`, i.e. HB stretches the
real stability interval of AB\ :math:`r` by :math:`(2-\beta)/\beta` (1.5 at
:math:`\beta = 0.8`) at the price of first order (the paper's Theorem 1).  GHVB (Sec. 4.2,
Eq. 19) averages :math:`\hat\varepsilon` before the Adams recombination and keeps order
:math:`r`; the same crossing is at :math:`z = -2(2-\beta)/\sum_{j<r}\mu_j 2^j` with
:math:`\mu_j = \beta\gamma_j + (1-\beta)\gamma_{j-1}` (:math:`\gamma` the Adams–Bashforth
coefficients), a smaller stretch (about 1.17 for :math:`r = 4`, :math:`\beta = 0.8`; the
paper's Fig. 6 shows the whole regions).  DPM-Solver++ with HB is the same construction in the
exponential integrator's variables (the paper's App. D).  Predicted: at the largest :math:`w`
and the smallest NFE the plain solvers (DPM-Solver++(2M)/(3M), UniPC, PLMS4 =
``ghvb(order=4, beta=1.0)``) blow up on a fraction of the samples, their :math:`\beta < 1`
momentum versions on fewer or none; the HB versions trade that for first-order accuracy
(their error decays more slowly with NFE), GHVB keeps the order.  At :math:`\beta = 1` each
momentum sampler *is* its plain solver (``dpm_solver_pp_hb(beta=1.0)`` is DPM-Solver++(2M),
``ghvb(order=r, beta=1.0)`` and ``plms_hb(order=r, beta=1.0)`` are PLMS\ :math:`r`): the study
compares the samples of every such pair it runs (``beta_one_checks``).

**Measured**, per (problem, :math:`w`, sampler, NFE budget), over ``num_seeds`` seeds of
``num_samples`` prior draws (the same draws for every sampler and every :math:`w`), each
sampler taking the most steps of the ``grid`` spacing whose evaluations fit the budget
(``final="none"``, as :data:`shufflesgd.diffusion.SAMPLERS` counts them):

* the reference: the same ODE from the same :math:`x_T`, solved by ``reference_sampler`` with
  ``reference_steps`` steps on ``reference_grid``; its own error is bounded by the RMS
  distance to the same solver with half the steps (``reference_half_step_rms``);
* *blown up*: a sample whose run went non-finite (``info.nonfinite_step >= 0``) or whose
  :math:`\|x\|_\infty` exceeds ``blowup_factor`` times :math:`\max|x_{ref}|`, the largest
  coordinate of any reference sample of that problem and :math:`w`; the blown-up fraction
  over all seeds and samples, and the first non-finite step (the minimum over samples, -1
  when none);
* accuracy: the RMS distance per coordinate to the reference,
  :math:`\bigl(\frac1{|K|d}\sum_{i\in K}\|x_i - x_{ref,i}\|^2\bigr)^{1/2}` over the samples
  :math:`K` of a seed that did not blow up, mean ± standard error over the seeds that kept
  any (a survivor statistic: where many samples blew up it describes the rest only);
* *stable from*: the smallest budget from which on (that budget and every larger one) no
  sample blew up; ``None`` when the largest budget still blows up.

All seeds, samples and guidance scales of one (problem, sampler, budget) run in one vmapped,
jitted call, the seeds split over ``config.devices`` devices
(:func:`experiments.common.seed_mesh`).

Run: ``python -m experiments.momentum_divergence --config configs/momentum_divergence.py``
(``:quick`` for the short variant; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.ticker
import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import diffusion, problems

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "momentum_divergence"
PROBLEMS = ("mixture_2d", "mixture_high_dim")
#: Deterministic samplers with a fixed evaluation count: the ones that solve the guided ODE.
ODE_SAMPLERS = tuple(
    name
    for name, spec in diffusion.SAMPLERS.items()
    if spec.nfe_per_step is not None and spec.cost().noise_draws_per_step == 0
)
#: Options the study sets itself.
RESERVED_OPTIONS = ("final", "noise")


# ------------------------------------------------------------------ configuration


def _check_sampler_labels(field: str, labels: Any) -> list[str]:
    """Sampler labels of :data:`ODE_SAMPLERS` whose options draw no noise and leave ``final``
    to the study."""
    labels = common.check_samplers(field, labels, ODE_SAMPLERS)
    for label in labels:
        name, options = common.parse_sampler(field, label)
        reserved = sorted(set(options) & set(RESERVED_OPTIONS))
        if reserved:
            raise ValueError(
                f"config.{field}: {label!r} sets {', '.join(reserved)}, which the study sets "
                '(final="none", no noise)'
            )
        if diffusion.SAMPLERS[name].cost(**options).noise_draws_per_step:
            raise ValueError(
                f"config.{field}: {label!r} draws noise; the study compares deterministic "
                "ODE solutions"
            )
        _check_option_values(field, label, name, options)
    return labels


def _check_option_values(field: str, label: str, name: str, options: dict[str, Any]) -> None:
    """Trace (not compile) the sampler once on a tiny problem, so that an option value it
    refuses (``order=9``, ``beta=0``) is a ``ValueError`` naming the field before anything
    runs."""
    sde = diffusion.make_sde("vp")
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_log_snr", 2))
    model = diffusion.Model(lambda x, t: -x, "score")
    sampler = diffusion.SAMPLERS[name].sampler

    def trace(x: jax.Array) -> Any:
        return sampler(jax.random.key(0), model, sde, x, grid, final="none", **options)

    reason = None
    try:
        jax.eval_shape(trace, jax.ShapeDtypeStruct((2,), jnp.result_type(float)))
    except (ValueError, TypeError) as error:
        reason = str(error).strip().splitlines()[0]
    if reason is not None:  # raised outside the handler: the command line reports this message
        raise ValueError(f"config.{field}: {label!r}: {reason}")


def _check_non_negative_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.{field} must be a non-negative integer, got {value!r}")


def num_components(problem: str, config: ConfigDict) -> int:
    return 3 if problem == "mixture_2d" else config.num_components


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built, compiled or written."""
    common.check_names("problems", config.problems, PROBLEMS)
    scales = list(config.guidance_scales)
    if (
        not scales
        or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
            for w in scales
        )
        or len(set(scales)) != len(scales)
    ):
        raise ValueError(
            "config.guidance_scales must be distinct non-negative finite numbers, got "
            f"{config.guidance_scales!r}"
        )
    labels = _check_sampler_labels("samplers", config.samplers)
    common.check_positive_ints("nfe_budgets", config.nfe_budgets)
    budgets = list(config.nfe_budgets)
    if budgets != sorted(set(budgets)):
        raise ValueError(f"config.nfe_budgets must be strictly increasing, got {budgets}")
    for label in labels:
        name, options = common.parse_sampler("samplers", label)
        if diffusion.SAMPLERS[name].steps_within(budgets[0], final="none", **options) is None:
            raise ValueError(
                f"config.nfe_budgets: {label} takes more than {budgets[0]} evaluations for one "
                "step; raise the smallest budget"
            )
    common.check_choice("grid", config.grid, diffusion.GRIDS)
    if not isinstance(config.reference_sampler, str):
        raise ValueError(
            f"config.reference_sampler must be one sampler label, got {config.reference_sampler!r}"
        )
    _check_sampler_labels("reference_sampler", [config.reference_sampler])
    common.check_choice("reference_grid", config.reference_grid, diffusion.GRIDS)
    common.check_positive_ints("reference_steps", config.reference_steps)
    if config.reference_steps < 2 * max(budgets):
        raise ValueError(
            f"config.reference_steps must be at least twice the largest budget "
            f"({2 * max(budgets)}), got {config.reference_steps}"
        )
    common.check_positive_number("blowup_factor", config.blowup_factor)
    if config.blowup_factor < 1:
        raise ValueError(f"config.blowup_factor must be at least 1, got {config.blowup_factor}")
    for field in ("high_dim", "num_components", "num_samples", "num_seeds"):
        common.check_positive_ints(field, config[field])
    if config.num_components < 2:
        raise ValueError(f"config.num_components must be at least 2, got {config.num_components}")
    if config.num_seeds < 2:
        raise ValueError(
            f"config.num_seeds must be at least 2 (for standard errors), got {config.num_seeds}"
        )
    for field in ("component", "data_seed", "seed"):
        _check_non_negative_int(field, config[field])
    largest = min(num_components(p, config) for p in config.problems)
    if config.component >= largest:
        raise ValueError(
            f"config.component must index a component of every problem (< {largest}), "
            f"got {config.component}"
        )
    if not isinstance(config.x64, bool):
        raise ValueError(f"config.x64 must be a bool, got {config.x64!r}")
    common.seed_devices(config)


# ------------------------------------------------------------------ targets and samplers


def build_mixture(problem: str, config: ConfigDict) -> problems.GaussianMixture:
    """The 2-D three-mode mixture, or ``num_components`` random components in ``high_dim``-D."""
    if problem == "mixture_2d":
        return problems.three_mode_mixture_2d()
    return problems.random_gaussian_mixture(
        config.data_seed + 1, config.num_components, config.high_dim
    )


def guided_model(
    law: problems.GaussianMixture, component: int, sde: diffusion.SDE
) -> Callable[[jax.Array], diffusion.Model]:
    r"""``w -> Model``: the exact classifier-free guided score
    :math:`s_w = (1+w)\nabla\log p_t(\cdot\mid c) - w\nabla\log p_t`
    (:func:`shufflesgd.diffusion.classifier_free_guidance` at scale :math:`\gamma = 1 + w`;
    ``w`` may be traced), the class :math:`c` being the mixture's component ``component`` and
    the unconditional law the whole mixture."""
    labels = np.where(np.arange(law.means.shape[0]) == component, 0, 1)
    classes = problems.conditional_mixture(
        np.exp(np.asarray(law.log_weights, np.float64)), law.means, law.covariances, labels
    )
    conditional = diffusion.conditional_mixture_model(sde, classes)
    return lambda w: diffusion.classifier_free_guidance(conditional, 0, 1.0 + w)


def make_runner(
    label: str, model: Callable[[jax.Array], diffusion.Model], sde: diffusion.SDE
) -> Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
    """A jitted ``(grid, x_T [S, n, d], scales [W]) -> (x [W, S, n, d], nfe [W, S, n],
    nonfinite_step [W, S, n])``: every guidance scale, seed and sample in one call (one
    compilation per grid length)."""
    name, options = common.parse_sampler("samplers", label)
    sampler = diffusion.SAMPLERS[name].sampler

    def one(grid: jax.Array, x_T: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
        x, info = diffusion.sample_batch(
            sampler, jax.random.key(0), model(w), sde, x_T, grid, final="none", **options
        )
        return x, info.nfe, info.nonfinite_step

    per_seed = jax.vmap(one, in_axes=(None, 0, None))
    return jax.jit(jax.vmap(per_seed, in_axes=(None, None, 0)))


def prior_draws(config: ConfigDict, sde: diffusion.SDE, key: jax.Array, dim: int) -> jax.Array:
    """``[num_seeds, num_samples, dim]`` prior draws, seed s from ``fold_in(key, s)``, placed
    with the seed axis split over the devices of :func:`experiments.common.seed_mesh` (a
    runner's call then runs each device's seeds on that device)."""
    keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(config.num_seeds))
    draws = jax.vmap(lambda k: sde.prior_sample(k, (config.num_samples, dim)))(keys)
    return common.shard_seeds(draws, common.seed_mesh(config))


def solve_reference(
    config: ConfigDict,
    runner: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, ...]],
    sde: diffusion.SDE,
    x_T: jax.Array,
    scales: jax.Array,
    steps: int,
    problem: str,
) -> np.ndarray:
    """The reference samples ``[W, S, n, d]``: ``runner`` (``config.reference_sampler``'s, from
    :func:`make_runner`) with ``steps`` steps of ``config.reference_grid``; ``RuntimeError``
    when any of them went non-finite."""
    grid = jnp.asarray(diffusion.time_grid(sde, config.reference_grid, steps))
    x, _, bad = runner(grid, x_T, scales)
    if np.any(np.asarray(bad) >= 0):
        raise RuntimeError(
            f"the reference {config.reference_sampler} went non-finite on {problem}; "
            "raise config.reference_steps"
        )
    return np.asarray(x)


def reduces_to(label: str) -> tuple[str, dict[str, Any]] | None:
    """The plain solver a :math:`\\beta = 1` momentum label is, as ``(name, options)`` with every
    default filled in: ``dpm_solver_pp_hb`` of order 2 / 3 is ``dpm_solver_pp_2m`` /
    ``dpm_solver_pp_3m``; ``ghvb`` and ``plms_hb`` of order r are PLMS r, i.e. each other.
    ``None`` for any other label."""
    name, options = common.parse_sampler("samplers", label)
    if name not in ("dpm_solver_pp_hb", "ghvb", "plms_hb"):
        return None
    full = diffusion.SAMPLERS[name].options(**options)
    if full["beta"] != 1.0:
        return None
    if name == "dpm_solver_pp_hb":
        plain = {2: "dpm_solver_pp_2m", 3: "dpm_solver_pp_3m"}.get(full["order"])
        if plain is None:
            return None
        return plain, diffusion.SAMPLERS[plain].options(lower_order_final=full["lower_order_final"])
    twin = "plms_hb" if name == "ghvb" else "ghvb"
    return twin, diffusion.SAMPLERS[twin].options(order=full["order"], beta=1.0)


def _canonical(label: str) -> tuple[str, dict[str, Any]]:
    name, options = common.parse_sampler("samplers", label)
    return name, diffusion.SAMPLERS[name].options(**options)


def beta_one_pairs(labels: list[str]) -> list[tuple[str, str]]:
    """``(momentum label, plain label)`` for every :math:`\\beta = 1` label whose plain solver
    (:func:`reduces_to`) is also in ``labels`` (each unordered pair once)."""
    canonical = {label: _canonical(label) for label in labels}
    pairs = []
    for label in labels:
        plain = reduces_to(label)
        for other in labels:
            if other != label and plain == canonical[other] and (other, label) not in pairs:
                pairs.append((label, other))
    return pairs


def paper_name(label: str) -> str:
    """The name the paper (and DPM-Solver++/UniPC) give a sampler label, e.g. ``GHVB 3.8``."""
    name, options = _canonical(label)
    beta, order = options.get("beta"), options.get("order")
    if name == "dpm_solver_pp_2m":
        return "DPM-Solver++(2M)"
    if name == "dpm_solver_pp_3m":
        return "DPM-Solver++(3M)"
    if name == "dpm_solver_pp_hb":
        return f"DPM-Solver++({order}M)" + ("" if beta == 1.0 else f" HB {beta:g}")
    if name == "plms_hb":
        return f"PLMS{order}" + ("" if beta == 1.0 else f" HB {beta:g}")
    if name == "ghvb":
        return f"PLMS{order}" if beta == 1.0 else f"GHVB {order - 1 + beta:g}"
    if name == "unipc":
        return f"UniPC-{order}"
    return label


def display_names(labels: list[str]) -> dict[str, str]:
    """Paper names, with the label added where two labels share one (``dpm_solver_pp_2m`` and
    ``dpm_solver_pp_hb(beta=1.0)`` are both DPM-Solver++(2M))."""
    names = {label: paper_name(label) for label in labels}
    counts = {n: list(names.values()).count(n) for n in names.values()}
    return {
        label: n if counts[n] == 1 or n == label else f"{n} [{label}]" for label, n in names.items()
    }


# ------------------------------------------------------------------ measuring


def blown_up(x: np.ndarray, nonfinite: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """``[W, S, n]``: the run went non-finite, or :math:`\\|x\\|_\\infty` is not below
    ``threshold[w]`` (NaN counts as blown up)."""
    size = np.max(np.abs(x), axis=-1)
    return (nonfinite >= 0) | ~(size <= threshold[:, None, None])


def rms_per_seed(x: np.ndarray, reference: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``[W, S]``: RMS distance per coordinate over the kept samples (NaN where none is kept)."""
    squared = np.where(keep[..., None], (x - reference) ** 2, 0.0).sum(axis=(-1, -2))
    count = keep.sum(axis=-1) * x.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.sqrt(squared / np.maximum(count, 1)), np.nan)


def _number(value: float) -> float | None:
    """A JSON-safe float: ``None`` for NaN or infinity."""
    return float(value) if np.isfinite(value) else None


def summarise_rms(per_seed: np.ndarray) -> tuple[float | None, float | None, int]:
    """Mean and standard error over the seeds that kept a sample, and how many did."""
    kept = per_seed[np.isfinite(per_seed)]
    if kept.size == 0:
        return None, None, 0
    if kept.size == 1:
        return float(kept[0]), None, 1
    mean, se = common.mean_and_stderr(kept)
    return float(mean), float(se), int(kept.size)


def stable_from(budgets: list[int], fractions: list[float]) -> int | None:
    """The smallest budget from which on nothing blew up (``None`` if the last one did)."""
    first = None
    for budget, fraction in zip(budgets, fractions):
        if fraction == 0:
            first = budget if first is None else first
        else:
            first = None
    return first


def compare_samples(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """The largest difference between two runs' samples where both are finite, and whether
    they are non-finite at the same entries."""
    finite = np.isfinite(a) & np.isfinite(b)
    return {
        "max_abs_difference": float(np.max(np.abs(a - b), where=finite, initial=0.0)),
        "same_nonfinite": bool(np.array_equal(~np.isfinite(a), ~np.isfinite(b))),
    }


def run_problem(
    problem: str,
    index: int,
    config: ConfigDict,
    sde: diffusion.SDE,
    bar: tqdm,
) -> dict[str, Any]:
    """Reference, rows and :math:`\\beta = 1` checks of one problem."""
    law = build_mixture(problem, config)
    model = guided_model(law, config.component, sde)
    scales = jnp.asarray(config.guidance_scales, float)
    x_T = prior_draws(config, sde, jax.random.fold_in(jax.random.key(config.seed), index), law.dim)
    reference_run = make_runner(config.reference_sampler, model, sde)
    reference, half = (
        solve_reference(config, reference_run, sde, x_T, scales, steps, problem)
        for steps in (config.reference_steps, config.reference_steps // 2)
    )
    bar.update()
    reference_max = np.max(np.abs(reference), axis=(1, 2, 3))  # [W]
    threshold = config.blowup_factor * reference_max
    half_rms = np.sqrt(np.mean((reference - half) ** 2, axis=(1, 2, 3)))
    labels = list(config.samplers)
    budgets = list(config.nfe_budgets)
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    runners = {label: make_runner(label, model, sde) for label in labels}
    pairs = beta_one_pairs(labels)
    for budget in budgets:
        samples: dict[str, np.ndarray] = {}
        for label in labels:
            name, options = common.parse_sampler("samplers", label)
            steps = diffusion.SAMPLERS[name].steps_within(budget, final="none", **options)
            grid = jnp.asarray(diffusion.time_grid(sde, config.grid, steps))
            x, nfe, bad = (np.asarray(a) for a in runners[label](grid, x_T, scales))
            if np.any(nfe > budget):
                raise RuntimeError(f"{label} used {nfe.max()} evaluations for a budget of {budget}")
            samples[label] = x
            blown = blown_up(x, bad, threshold)
            rms = rms_per_seed(x, reference, ~blown)
            for j, w in enumerate(config.guidance_scales):
                mean, se, seeds = summarise_rms(rms[j])
                nonfinite = bad[j][bad[j] >= 0]
                rows.append(
                    dict(
                        problem=problem,
                        guidance_scale=float(w),
                        sampler=label,
                        budget=budget,
                        steps=steps,
                        nfe=int(nfe.max()),
                        blown_up_fraction=float(blown[j].mean()),
                        nonfinite_fraction=float((bad[j] >= 0).mean()),
                        first_nonfinite_step=int(nonfinite.min()) if nonfinite.size else -1,
                        rms_mean=mean,
                        rms_se=se,
                        rms_seeds=seeds,
                        rms_per_seed=[_number(v) for v in rms[j]],
                    )
                )
            bar.update()
        for momentum, plain in pairs:
            checks.append(
                dict(
                    problem=problem,
                    budget=budget,
                    momentum=momentum,
                    plain=plain,
                    **compare_samples(samples[momentum], samples[plain]),
                )
            )
    stable = {
        str(w): {
            label: stable_from(
                budgets,
                [
                    r["blown_up_fraction"]
                    for r in rows
                    if r["sampler"] == label and r["guidance_scale"] == float(w)
                ],
            )
            for label in labels
        }
        for w in config.guidance_scales
    }
    return dict(
        dim=law.dim,
        component=config.component,
        component_weight=float(np.exp(law.log_weights[config.component])),
        reference_max_abs=reference_max.tolist(),
        reference_half_step_rms=half_rms.tolist(),
        rows=rows,
        stable_from=stable,
        beta_one_checks=checks,
    )


# ------------------------------------------------------------------ output


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None or not np.isfinite(value) else format(value, spec)


def format_table(config: ConfigDict, metrics: dict[str, Any]) -> str:
    budgets = list(config.nfe_budgets)
    labels = list(config.samplers)
    names = {label: paper_name(label) for label in labels}
    w1, w2 = max(len(label) for label in labels), max(len(n) for n in names.values())
    width = w1 + 1 + w2

    def row_name(label: str) -> str:
        return f"{label:{w1}s} {names[label]:{w2}s}"

    lines = [
        f"guided PF-ODE (VP, {config.grid} grid, final='none'), s_w = (1+w) s_c - w s; "
        f"{config.num_seeds} seeds x {config.num_samples} samples; reference "
        f"{config.reference_sampler} with {config.reference_steps} steps ({config.reference_grid})"
        f"; blown up = non-finite or |x|_inf > {config.blowup_factor:g} x max|x_ref|"
    ]
    for problem, entry in metrics["problems"].items():
        for j, w in enumerate(config.guidance_scales):
            rows = [r for r in entry["rows"] if r["guidance_scale"] == float(w)]
            head = f"{'sampler':{width}s} " + " ".join(f"{b:>7d}" for b in budgets)
            lines += [
                "",
                f"{problem} ({entry['dim']}-D), component {entry['component']} "
                f"(weight {entry['component_weight']:.2f}), w = {w:g}: max|x_ref| = "
                f"{entry['reference_max_abs'][j]:.3f}, reference vs half its steps: RMS "
                f"{entry['reference_half_step_rms'][j]:.1e}",
                "blown-up fraction at NFE budget; stable from NFE; first non-finite step "
                "(NFE: step)",
                head + "  stable  non-finite",
            ]
            for label in labels:
                mine = [r for r in rows if r["sampler"] == label]
                stable = entry["stable_from"][str(w)][label]
                nonfinite = ", ".join(
                    f"{r['budget']}: {r['first_nonfinite_step']}"
                    for r in mine
                    if r["first_nonfinite_step"] >= 0
                )
                lines.append(
                    row_name(label)
                    + " "
                    + " ".join(f"{_fmt(r['blown_up_fraction'], '.3f'):>7s}" for r in mine)
                    + f"  {'>' + str(budgets[-1]) if stable is None else stable:>6}"
                    + f"  {nonfinite or '—'}"
                )
            lines.append("RMS distance to the reference per coordinate (kept samples), mean ± SE")
            lines.append(f"{'sampler':{width}s} " + " ".join(f"{b:>17d}" for b in budgets))
            for label in labels:
                mine = [r for r in rows if r["sampler"] == label]
                lines.append(
                    row_name(label)
                    + " "
                    + " ".join(
                        f"{_fmt(r['rms_mean'], '.2e'):>8s} ± {_fmt(r['rms_se'], '.1e'):>6s}"
                        for r in mine
                    )
                )
        checks = entry["beta_one_checks"]
        if checks:
            worst: dict[tuple[str, str], float] = {}
            same = True
            for c in checks:
                key = (c["momentum"], c["plain"])
                worst[key] = max(worst.get(key, 0.0), c["max_abs_difference"])
                same &= c["same_nonfinite"]
            lines.append(
                f"beta = 1 is the plain solver ({problem}): max |x - x_plain| over budgets, "
                f"seeds, w" + ("" if same else " (non-finite entries differ!)")
            )
            lines += [f"  {m} vs {p}: {d:.1e}" for (m, p), d in worst.items()]
    columns = [(p, w) for p in metrics["problems"] for w in config.guidance_scales]
    heads = [f"{p.removeprefix('mixture_')} w={w:g}" for p, w in columns]
    size = max(len(h) for h in heads) + 1
    lines += [
        "",
        f"stable from: the smallest NFE budget from which on no sample blew up "
        f"('>{budgets[-1]}': the largest still did)",
        f"{'sampler':{width}s} " + "".join(f"{h:>{size}s}" for h in heads),
    ]
    for label in labels:
        cells = []
        for p, w in columns:
            stable = metrics["problems"][p]["stable_from"][str(w)][label]
            cells.append(f"{'>' + str(budgets[-1]) if stable is None else stable:>{size}}")
        lines.append(row_name(label) + " " + "".join(cells))
    return "\n".join(lines)


def csv_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    return [
        [
            r["problem"],
            r["guidance_scale"],
            r["sampler"],
            r["budget"],
            r["steps"],
            r["nfe"],
            r["blown_up_fraction"],
            r["nonfinite_fraction"],
            r["first_nonfinite_step"],
            r["rms_mean"],
            r["rms_se"],
            r["rms_seeds"],
        ]
        for entry in metrics["problems"].values()
        for r in entry["rows"]
    ]


CSV_HEADER = (
    "problem",
    "guidance_scale",
    "sampler",
    "budget",
    "steps",
    "nfe",
    "blown_up_fraction",
    "nonfinite_fraction",
    "first_nonfinite_step",
    "rms_mean",
    "rms_se",
    "rms_seeds",
)


def _float(value: Any) -> float:
    return np.nan if value is None else float(value)


def draw(metrics: dict[str, Any], path: Any) -> None:
    """Per (problem, w): RMS error to the reference against NFE (log-log; only finite positive
    points, a sampler with points left out says how many in its legend) above the blown-up
    fraction against NFE (only finite points, likewise)."""
    problems_ = list(metrics["problems"])
    scales = {
        problem: list(dict.fromkeys(r["guidance_scale"] for r in entry["rows"]))
        for problem, entry in metrics["problems"].items()
    }
    cols = max([len(s) for s in scales.values()] + [1])
    rows_ = 2 * max(len(problems_), 1)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.6 * rows_), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for i, problem in enumerate(problems_):
        entry = metrics["problems"][problem]
        for j, w in enumerate(scales[problem]):
            top, bottom = axes[2 * i, j], axes[2 * i + 1, j]
            _draw_panel(top, bottom, problem, entry, w)
    factor = metrics.get("blowup_factor")
    fig.suptitle(
        "guided PF-ODE from the same x_T as a fine reference\n"
        "upper rows: RMS distance of the samples that did not blow up\n"
        "lower rows: fraction blown up (non-finite, or |x|_inf > "
        f"{'?' if factor is None else format(factor, 'g')} x max|x_ref|)",
        fontsize=9,
    )
    common.save_figure(fig, path)


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def _draw_panel(top: Any, bottom: Any, problem: str, entry: dict[str, Any], w: float) -> None:
    """One (problem, w): RMS error above, blown-up fraction below; a sampler whose paper name
    an earlier one shares (a beta = 1 twin) is dashed with open markers, so both stay visible."""
    top.axis("on")
    bottom.axis("on")
    rows = [r for r in entry["rows"] if r["guidance_scale"] == w]
    labels = list(dict.fromkeys(r["sampler"] for r in rows))
    names = display_names(labels)
    seen: set[str] = set()
    ticks: set[float] = set()
    drawn = {"top": False, "bottom": False}
    for k, label in enumerate(labels):
        mine = [r for r in rows if r["sampler"] == label]
        twin = paper_name(label) in seen
        seen.add(paper_name(label))
        style = dict(
            color=f"C{k % 10}",
            marker=MARKERS[k % len(MARKERS)],
            ms=6 if twin else 4,
            ls="--" if twin else "-",
            mfc="none" if twin else None,
        )
        nfe = [_float(r["nfe"]) for r in mine]
        x, y, err, dropped = common.finite_curve(
            nfe, [_float(r["rms_mean"]) for r in mine], [_float(r["rms_se"]) for r in mine]
        )
        ticks.update(x.tolist())
        text = common.not_shown(names[label], dropped)
        if len(x):
            drawn["top"] = True
            top.errorbar(x, y, err, capsize=2, label=text, **style)
        else:
            top.plot([], [], label=text, **{**style, "ls": ""})
        fraction = np.asarray([_float(r["blown_up_fraction"]) for r in mine])
        nfe = np.asarray(nfe)
        keep = np.isfinite(nfe) & np.isfinite(fraction) & (nfe > 0)
        ticks.update(nfe[keep].tolist())
        text = common.not_shown(names[label], int(np.sum(~keep)))
        if np.any(keep):
            drawn["bottom"] = True
            bottom.plot(nfe[keep], fraction[keep], label=text, **style)
        else:
            bottom.plot([], [], label=text, **{**style, "ls": ""})
    title = f"{problem} ({entry.get('dim', '?')}-D), w = {w:g}"
    if drawn["top"]:  # log axes need a positive point; a panel without one stays linear
        top.set(xscale="log", yscale="log")
    else:
        top.text(0.5, 0.5, "no finite points", transform=top.transAxes, ha="center")
    if drawn["bottom"]:
        bottom.set(xscale="log")
    top.set(
        xlabel="NFE",
        ylabel="RMS distance to reference (kept)",
        title=title,
    )
    bottom.set(
        xlabel="NFE",
        ylabel="blown-up fraction",
        ylim=(-0.03, 1.03),
        title=title,
    )
    for axis in (top, bottom):
        if ticks:
            axis.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
            axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=6)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table, the CSV and the figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    sde = diffusion.make_sde("vp")
    folder = common.results_folder(config, NAME)
    total = len(config.problems) * (1 + len(config.samplers) * len(config.nfe_budgets))
    with tqdm(total=total, desc=NAME) as bar:
        results = {
            problem: run_problem(problem, i, config, sde, bar)
            for i, problem in enumerate(config.problems)
        }
    metrics: dict[str, Any] = {
        "devices": common.seed_devices(config),  # the seed axis was split over these
        "guidance_scales": [float(w) for w in config.guidance_scales],
        "budgets": list(config.nfe_budgets),
        "blowup_factor": float(config.blowup_factor),
        "samplers": {label: paper_name(label) for label in config.samplers},
        "problems": results,
    }
    table = format_table(config, metrics)
    common.write_csv(folder / "rows.csv", CSV_HEADER, csv_rows(metrics))
    return common.finish(folder, table, metrics, lambda path: draw(metrics, path))


if __name__ == "__main__":
    common.main(run, validate)
