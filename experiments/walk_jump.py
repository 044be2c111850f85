r"""Mode tunnelling on well-separated Gaussian mixtures, and the neck of Neal's funnel:
fraction of modes visited, mode-weight error and :math:`W_2` to the truth on the mixtures,
distances of the :math:`v`-marginal to its exact law on the funnel, for walk–jump (exact,
fresh-draw and ensemble smoothed scores), the Schrödinger–Föllmer sampler, the chain of
log-concave chains, ULA, MALA and HMC at an equal budget of evaluations.

**Targets.** :math:`p = \sum_k w_k N(\mu_k, s^2 I)` with ``weights`` :math:`w` and
``component_std`` :math:`s`: ``mixture_2d`` puts the means on a circle, neighbours
``separation`` apart (a square for four modes); ``mixture_high_dim`` puts them on a regular
simplex in ``high_dim`` dimensions, :math:`\mu_k = (\text{separation}/\sqrt2)\,e_k`, every
pair ``separation`` apart.  With separation :math:`8 = 16s` the log-density barrier between
neighbours is about :math:`\text{separation}^2/(8s^2) = 32` nats: a Langevin chain never
crosses it.  Every Markov chain starts at :math:`\mu_{\text{start\_mode}}`.
``funnel``: Neal's funnel (Neal 2003, "Slice sampling", Ann. Statist. 31, Sec. 8;
:func:`shufflesgd.problems.funnel_logdensity`) in ``funnel_dim`` dimensions,
:math:`v \sim N(0, a^2)` with :math:`a` = ``funnel_scale`` and :math:`x_i \mid v \sim
N(0, e^v)`; its chains start at the origin.  Its samplers are ``funnel_samplers`` (the
mixtures' are ``samplers``).

**Samplers** (all chains vmapped in one jitted call per problem and sampler, the independent
units, single chains or whole ensembles, split over ``config.devices`` devices,
:func:`chain_devices`):

* ``exact``: i.i.d. draws from :math:`p`, the reference (its :math:`W_2` is the Monte Carlo floor);
* ``exact_jump``: Tweedie jumps :math:`\hat x(y) = y + \sigma^2\nabla\log p_\sigma(y)` of exact
  draws :math:`y \sim p_\sigma`: the law that walk–jump with a perfect walk produces;
* ``ula`` / ``mala``: Roberts & Tweedie (1996) on :math:`\log p` with the exact gradient;
* ``hmc`` (funnel only): Duane, Kennedy, Pendleton & Roweth (1987) / Neal (2011),
  ``funnel_leapfrog`` leapfrog steps of size ``funnel_hmc_step_size``;
* ``walk_jump``: Saremi & Hyvärinen (2019), a ULA walk on :math:`p_\sigma` with step
  :math:`h = \text{walk\_step\_fraction}\cdot\sigma^2` and the exact smoothed score
  (:func:`shufflesgd.walk_jump.mixture_smoothed_score`), jumping at evenly spaced walk steps;
* ``walk_jump_mc``: the same walk and jumps with the gradient-free self-normalised
  importance-sampling score from ``mc_samples`` log-density values
  (:func:`shufflesgd.walk_jump.monte_carlo_smoothed_score`; Huang et al. 2021);
* ``chain_of_chains``: Saremi, Park & Bach (2024), ``num_measurements`` measurements of one
  :math:`x`, ``steps_per_measurement`` ULA steps each, then the jump at noise
  :math:`\sigma/\sqrt m`: one sample per run; consecutive runs continue from the last walk point;
* ``follmer``: the gradient-free Schrödinger–Föllmer sampler (Huang, Jiao, Kang, Liao, Liu,
  Liu 2021, arXiv:2106.10880) with ``follmer_steps`` Euler steps and ``mc_samples`` draws per
  drift, run on :math:`u = x/c` (``follmer_scale`` :math:`c`, i.e. the reference
  :math:`N(0, c^2 I)` of the paper's :math:`X_0 = 0`, so the importance weights stay finite in
  variance); it is not a chain: each sample is an independent transport from the anchor 0;
* ``ensemble``: Bischoff & Riel (2024, arXiv:2401.17539), walk–jump's walk and jumps run by
  ensembles of ``ensemble_size`` :math:`N` walkers, every walker's smoothed score the
  gradient-free deterministic-mixture importance estimate from one log-density value per
  walker (:func:`shufflesgd.mcmc.ensemble_walk_jump`, jumps by
  :func:`shufflesgd.mcmc.tweedie_denoiser` with :func:`shufflesgd.mcmc.ensemble_smoothed_score`
  at the kept walk points); same :math:`\sigma` and walk step as ``walk_jump_mc``.  Each walker
  is one of the ``num_chains`` chains: the chains are ``num_chains / N`` independent ensembles,
  all walkers of an ensemble starting at the same point.

**Equal budget.**  Each chain gets ``budget`` :math:`B` evaluations, counted from
``info.num_grad_evals`` or ``info.num_density_evals`` (plus the initial gradient of
ULA/MALA/HMC and one smoothed-score evaluation per jump): gradients of :math:`\log p` or
:math:`\log p_\sigma` for ``ula``, ``mala``, ``hmc``, ``walk_jump`` and ``chain_of_chains``;
log-density values for ``walk_jump_mc``, ``follmer`` and ``ensemble`` (each fresh-draw Monte
Carlo score costs ``mc_samples``).  One gradient is counted like one log-density value, which
favours the gradient samplers (a gradient costs a small multiple of a value).  ULA/MALA take
:math:`B - 1` steps, walk–jump :math:`B - n` walk steps for :math:`n` jumps; runs of the chain
of chains (:math:`m\cdot\text{steps} + 1` each), of Föllmer (:math:`K\cdot\text{mc\_samples}`
each) and HMC's steps (``funnel_leapfrog`` gradients each, after one initial gradient) fill
:math:`B` up to less than one run or step.  The ensemble spends :math:`N` log-density values
a walk step (one at each walker's proposal point :math:`y_i + \sigma z_i`) and :math:`N` per
jump (one ensemble score at the kept walk points), i.e. one per walker per step and per jump:
each walker (chain) takes :math:`B - n` walk steps and :math:`n` jumps, exactly :math:`B`
evaluations, and an ensemble :math:`NB`; its count per chain is the ensemble's sum of
``info.num_density_evals`` plus :math:`Nn`, over :math:`N`.  So at an equal budget the ensemble
walks ``mc_samples`` times as many steps as ``walk_jump_mc`` (whose :math:`M` fresh draws per
score serve one walker only), with :math:`N` importance points per score drawn around all the
walkers.

**Metrics.**  A sample is assigned to :math:`\arg\max_k r_k(x)` (the true responsibilities);
mode :math:`k` is *visited* by a chain when one of its samples is assigned to :math:`k` and lies
within ``visit_radius`` RMS radii :math:`\sqrt{d}\,s` of :math:`\mu_k`.  Per chain: the fraction
of modes visited (``iid@n`` gives the expected fraction for :math:`n` i.i.d. exact draws, the
fair reference for a sampler keeping :math:`n` samples), the total-variation error
:math:`\frac12\sum_k|\hat w_k - w_k|` of the assignment frequencies, and the spread ratio,
the RMS distance of the samples to their assigned means over the exact RMS radius (1 for
exact draws, :math:`\sqrt{1/(1 - h/2s^2)}` for ULA's stationary law inside a mode); mean ± SE
over chains (over ensembles for ``ensemble``, whose walkers are dependent: its per-chain values
are averaged over each ensemble first; ``ensemble_size`` must divide the chains of a
:math:`W_2` group, so that groups hold whole ensembles and stay independent).  :math:`W_2` is
the exact distance between ``w2_points`` samples pooled from a group of chains and as many
fresh exact draws, by optimal assignment (``scipy.optimize.linear_sum_assignment``), mean ± SE
over ``num_groups`` groups; at these sizes it is dominated by the multinomial fluctuation of
the mode weights (a mass error transported ``separation`` far), so ``exact``'s value is its
Monte Carlo floor.
Walk–jump's jumps are posterior means :math:`E[x\mid y]`, not draws: inside one mode they
shrink towards the mean (spread ratio :math:`s/\sqrt{s^2+\sigma^2}`), while a walker between
modes jumps to a responsibility-weighted average of their means, i.e. between them; so the
jumps' law differs from :math:`p` even with a perfect walk (``exact_jump``), and for the
walk–jump samplers the walk's own :math:`W_2` to :math:`p_\sigma` (the law it targets) is
reported too.

**Funnel metrics** (on :math:`v`, whose exact law is :math:`N(0, a^2)`): per chain (ensemble),
the mean of :math:`v` (exact 0) and of :math:`v^2` (``Var[v]`` about the known mean 0, exact
:math:`a^2`), and the fractions of samples in the *neck* :math:`v < -a` and the *mouth*
:math:`v > a` (exact :math:`\Phi(-1) = 0.159` each), mean ± SE over chains; per group of
chains (all its samples pooled), the Kolmogorov–Smirnov distance of the :math:`v`-samples to the
exact CDF :math:`\Phi(v/a)` and the 1-D :math:`W_1` (``scipy.stats.wasserstein_distance``) to as
many exact draws (:func:`shufflesgd.problems.funnel_sample`; ``exact``'s value is its Monte
Carlo floor), mean ± SE over ``num_groups`` groups.  For the walkers, the KS distance of the
walk's :math:`v` to the exact :math:`v`-marginal of :math:`p_\sigma`, :math:`N(0, a^2 +
\sigma^2)` (the noise is added coordinate-wise).  Jumps are posterior means, so their
:math:`v` is shrunk even after a perfect walk.

Run: ``python -m experiments.walk_jump --config configs/walk_jump.py``
(``:quick`` for the short variant; override any field with ``--config.<field>=<value>``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from ml_collections import ConfigDict
from scipy.optimize import linear_sum_assignment
from scipy.stats import chi2, kstest, norm, wasserstein_distance
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import mcmc, parallel, problems

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "walk_jump"
MIXTURES = ("mixture_2d", "mixture_high_dim")
PROBLEMS = (*MIXTURES, "funnel")
SAMPLERS = (
    "exact",
    "exact_jump",
    "ula",
    "mala",
    "walk_jump",
    "walk_jump_mc",
    "chain_of_chains",
    "follmer",
    "ensemble",
)  # on the mixtures
FUNNEL_SAMPLERS = ("exact", "mala", "hmc", "walk_jump_mc", "follmer", "ensemble")
REFERENCES = ("exact", "exact_jump")  # not samplers at a budget: draws from known laws
DENSITY_SAMPLERS = (
    "walk_jump_mc",
    "follmer",
    "ensemble",
)  # budget in log-density values, the rest in gradients
WALKERS = ("walk_jump", "walk_jump_mc", "ensemble")  # report the walk's distance to p_sigma too


# ------------------------------------------------------------------ configuration


class Plan(NamedTuple):
    """A sampler's share of the budget: ``steps`` kernel steps per run, ``runs`` runs per chain
    (1 for chains), ``samples`` kept samples per chain, ``unit`` what the budget counts,
    ``members`` chains per independent unit (the ensemble's walkers; 1 for every other)."""

    steps: int
    runs: int
    samples: int
    unit: str
    members: int = 1


def plan(sampler: str, config: ConfigDict) -> Plan:
    """Steps, runs and kept samples per chain so that each sampler spends ``config.budget``."""
    budget, n = config.budget, config.samples_per_chain
    if sampler in REFERENCES:
        return Plan(0, 1, n, "none")
    if sampler in ("ula", "mala"):
        return Plan(budget - 1, 1, n, "gradient")  # one gradient at the start
    if sampler == "hmc":  # one gradient at the start, funnel_leapfrog a step
        return Plan((budget - 1) // config.funnel_leapfrog, 1, n, "gradient")
    if sampler == "walk_jump":
        return Plan(budget - n, 1, n, "gradient")  # one smoothed score per walk step and per jump
    if sampler == "walk_jump_mc":
        return Plan(budget // config.mc_samples - n, 1, n, "density")
    if sampler == "ensemble":  # one value per walker per walk step and per jump
        return Plan(budget - n, 1, n, "density", config.ensemble_size)
    if sampler == "chain_of_chains":
        steps = config.num_measurements * config.steps_per_measurement
        runs = budget // (steps + 1)  # + the jump's smoothed score
        return Plan(steps, runs, runs, "gradient")
    runs = budget // (config.follmer_steps * config.mc_samples)
    return Plan(config.follmer_steps, runs, runs, "density")


def combinations(config: ConfigDict) -> list[tuple[str, str]]:
    """The (problem, sampler) pairs the study runs, in order: ``samplers`` on the mixtures,
    ``funnel_samplers`` on the funnel."""
    return [
        (problem, sampler)
        for problem in config.problems
        for sampler in (config.funnel_samplers if problem == "funnel" else config.samplers)
    ]


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built or compiled."""
    common.check_names("problems", config.problems, PROBLEMS)
    common.check_names("samplers", config.samplers, SAMPLERS)
    common.check_names("funnel_samplers", config.funnel_samplers, FUNNEL_SAMPLERS)
    weights = tuple(config.weights)
    if len(weights) < 2:
        raise ValueError(f"config.weights needs at least two modes, got {weights!r}")
    for value in weights:
        common.check_positive_number("weights", value)
    for field in (
        "component_std",
        "separation",
        "ula_step_size",
        "mala_step_size",
        "sigma",
        "walk_step_fraction",
        "follmer_scale",
        "visit_radius",
        "funnel_scale",
        "funnel_sigma",
        "funnel_mala_step_size",
        "funnel_hmc_step_size",
    ):
        common.check_positive_number(field, config[field])
    for field in (
        "high_dim",
        "budget",
        "samples_per_chain",
        "num_chains",
        "num_groups",
        "w2_points",
        "mc_samples",
        "num_measurements",
        "steps_per_measurement",
        "follmer_steps",
        "funnel_dim",
        "funnel_leapfrog",
        "ensemble_size",
    ):
        common.check_positive_ints(field, config[field])
    if "mixture_high_dim" in config.problems and config.high_dim < len(weights):
        raise ValueError(
            f"config.high_dim must be at least the number of modes ({len(weights)}) for the "
            f"simplex layout, got {config.high_dim}"
        )
    if config.funnel_dim < 2:
        raise ValueError(
            f"config.funnel_dim must be at least 2 (v and one x), got {config.funnel_dim}"
        )
    start = config.start_mode
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(weights):
        raise ValueError(
            f"config.start_mode must be a mode index in [0, {len(weights)}), got {start!r}"
        )
    if config.num_chains % config.num_groups:
        raise ValueError(
            f"config.num_groups must divide config.num_chains={config.num_chains}, "
            f"got {config.num_groups}"
        )
    if config.num_groups < 2 or config.num_chains < 2:
        raise ValueError(
            "config.num_chains and config.num_groups must be at least 2 (a standard error needs "
            "two)"
        )
    combos = combinations(config)
    used = list(dict.fromkeys(sampler for _, sampler in combos))
    if "walk_jump_mc" in used and config.budget % config.mc_samples:
        raise ValueError(
            f"config.budget must be a multiple of config.mc_samples={config.mc_samples} "
            f"(walk_jump_mc spends mc_samples a score), got {config.budget}"
        )
    chains_per_group = config.num_chains // config.num_groups
    if "ensemble" in used and (config.ensemble_size < 2 or chains_per_group % config.ensemble_size):
        raise ValueError(
            "config.ensemble_size must be at least 2 and divide the chains of a W2 group "
            f"(num_chains / num_groups = {chains_per_group}), got {config.ensemble_size}"
        )
    for sampler in used:
        p = plan(sampler, config)
        if p.samples < 2 or (sampler not in REFERENCES and p.runs == 1 and p.steps < p.samples):
            raise ValueError(
                f"config.budget={config.budget} is too small for {sampler}: {p.steps} steps for "
                f"{p.samples} samples per chain"
            )
    for problem, sampler in combos:
        p = plan(sampler, config)
        if problem != "funnel" and p.samples * chains_per_group < config.w2_points:
            raise ValueError(
                f"config.w2_points={config.w2_points} exceeds the {p.samples * chains_per_group} "
                f"samples a group of {sampler} chains has"
            )
    if not isinstance(config.x64, bool):
        raise ValueError(f"config.x64 must be True or False, got {config.x64!r}")
    chain_devices(config)


def chain_devices(config: ConfigDict) -> int:
    """How many devices the chain axis is split over: :func:`experiments.common.seed_devices`
    with the independent units as the seeds, ``num_chains / ensemble_size`` ensembles when
    ``ensemble`` runs (so that each ensemble stays whole on one device), else ``num_chains``
    (``ValueError`` naming ``config.devices`` when it is not ``None`` or a positive int, exceeds
    the devices available, or does not divide that number of units)."""
    used = {sampler for _, sampler in combinations(config)}
    members = config.ensemble_size if "ensemble" in used else 1
    label = "config.num_chains / config.ensemble_size" if members > 1 else "config.num_chains"
    return common.seed_devices(config, config.num_chains // members, label)


# ------------------------------------------------------------------ the targets


class Funnel(NamedTuple):
    r"""Neal's funnel in ``dim`` dimensions, :math:`v \sim N(0, \text{scale}^2)`,
    :math:`x_i \mid v \sim N(0, e^v)`, with the mixtures' ``log_prob`` / ``sample`` methods
    (:func:`shufflesgd.problems.funnel_logdensity`, :func:`shufflesgd.problems.funnel_sample`)."""

    dim: int
    scale: float

    def log_prob(self, position: jax.Array) -> jax.Array:
        return problems.funnel_logdensity(position, self.scale)

    def sample(self, key: jax.Array, num: int) -> jax.Array:
        return problems.funnel_sample(key, num, self.dim, self.scale)


Target = problems.GaussianMixture | Funnel


def build_problem(name: str, config: ConfigDict) -> Target:
    """The circle (2-D) or simplex (``high_dim``-D) mixture with isotropic components, or the
    funnel."""
    if name == "funnel":
        return Funnel(config.funnel_dim, float(config.funnel_scale))
    k = len(config.weights)
    if name == "mixture_2d":
        radius = config.separation / (2.0 * math.sin(math.pi / k))
        angles = 2.0 * math.pi * np.arange(k) / k + math.pi / k
        means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    else:
        means = config.separation / math.sqrt(2.0) * np.eye(config.high_dim)[:k]
    covariances = np.tile(config.component_std**2 * np.eye(means.shape[1]), (k, 1, 1))
    return problems.gaussian_mixture(config.weights, means, covariances)


def start_point(law: Target, config: ConfigDict) -> jax.Array:
    """Where every chain starts: the mean of mode ``start_mode``, or the funnel's origin."""
    if isinstance(law, Funnel):
        return jnp.zeros(law.dim, jnp.result_type(float))
    return law.means[config.start_mode]


# ------------------------------------------------------------------ the samplers


class Draws(NamedTuple):
    """Per chain: kept ``samples`` ``[C, n, d]``, the walk points they were jumped from (or the
    samples themselves) and the evaluations spent, summed from the kernels' infos."""

    samples: jax.Array
    walk: jax.Array
    evals: jax.Array


def _thinned(positions: jax.Array, num: int) -> jax.Array:
    """``num`` evenly spaced rows of ``positions`` ending at the last: rows ``stride*(i+1) - 1``."""
    stride = positions.shape[0] // num
    return positions[stride - 1 :: stride][:num]


class Hyper(NamedTuple):
    """The traced hyper-parameters of one sampler (rule 8: a new value does not recompile)."""

    step_size: jax.Array
    sigma: jax.Array


def hyper_parameters(name: str, problem: str, config: ConfigDict, dtype: Any) -> Hyper:
    r"""The step size of ULA / MALA / HMC, or the walk step
    :math:`h = \text{walk\_step\_fraction}\,\sigma^2` of the smoothed-density samplers, with
    :math:`\sigma` (``sigma`` on the mixtures, ``funnel_sigma`` on the funnel; unused by ULA,
    MALA, HMC, exact, Föllmer)."""
    if problem == "funnel":
        sigma = config.funnel_sigma
        steps = {"mala": config.funnel_mala_step_size, "hmc": config.funnel_hmc_step_size}
    else:
        sigma = config.sigma
        steps = {"ula": config.ula_step_size, "mala": config.mala_step_size}
    step = steps.get(name, config.walk_step_fraction * sigma**2)
    return Hyper(jnp.asarray(step, dtype), jnp.asarray(sigma, dtype))


Sampler = Callable[[jax.Array, Hyper], tuple[jax.Array, jax.Array, jax.Array]]


def make_sampler(name: str, law: Target, config: ConfigDict) -> Sampler:
    """``(key, hyper) -> (samples [u, n, d], walk [u, n, d], evals [u])`` for one independent
    unit of sampler ``name``: ``u = plan(name, config).members`` chains (the walkers of one
    ensemble, or a single chain); ``walk``: the walk points that were jumped, or the samples
    themselves; ``evals``: the evaluations each chain spent."""
    p = plan(name, config)
    start = start_point(law, config)
    m = config.mc_samples
    no_evals = jnp.zeros((), jnp.int32)

    def exact(key: jax.Array, hyper: Hyper):
        x = law.sample(key, p.samples)
        return x, x, no_evals

    def exact_jump(key: jax.Array, hyper: Hyper):
        exact_score = mcmc.mixture_smoothed_score(law)
        sample_key, jump_key = jax.random.split(key)
        y = law.diffuse(1.0, hyper.sigma).sample(sample_key, p.samples)
        keys = jax.random.split(jump_key, p.samples)
        x = jax.vmap(lambda k, u: mcmc.jump(exact_score, k, u, hyper.sigma))(keys, y)
        return x, y, no_evals

    def gradient_chain(kernel: mcmc.SamplingAlgorithm) -> Sampler:
        def one(key: jax.Array, hyper: Hyper):
            _, positions, info = mcmc.run_chain(
                kernel, key, kernel.init(start), p.steps, hyper.step_size
            )
            x = _thinned(positions, p.samples)
            return x, x, 1 + jnp.sum(info.num_grad_evals)  # + the gradient at the start

        return one

    def walk_and_jump(score: mcmc.SmoothedScore, cost: int) -> Sampler:
        kernel = mcmc.walk_jump(score)

        def one(key: jax.Array, hyper: Hyper):
            walk_key, jump_key = jax.random.split(key)
            _, positions, info = mcmc.run_chain(
                kernel, walk_key, kernel.init(start), p.steps, hyper.step_size, hyper.sigma
            )
            y = _thinned(positions, p.samples)
            keys = jax.random.split(jump_key, p.samples)
            x = jax.vmap(lambda k, u: mcmc.jump(score, k, u, hyper.sigma))(keys, y)
            return x, y, cost * (jnp.sum(info.num_grad_evals) + p.samples)  # + one score per jump

        return one

    def chain_of_chains(key: jax.Array, hyper: Hyper):
        exact_score = mcmc.mixture_smoothed_score(law)
        kernel = mcmc.chain_of_log_concave_chains(exact_score, config.steps_per_measurement)

        def one_run(y: jax.Array, r: jax.Array):
            walk_key, jump_key = jax.random.split(jax.random.fold_in(key, r))
            state, _, info = mcmc.run_chain(
                kernel, walk_key, kernel.init(y), p.steps, hyper.step_size, hyper.sigma
            )
            x = mcmc.multimeasurement_jump(exact_score, jump_key, state, hyper.sigma)
            return state.position, (x, jnp.sum(info.num_grad_evals) + 1)  # + the jump's score

        _, (x, evals) = jax.lax.scan(one_run, start, jnp.arange(p.runs))
        return x, x, jnp.sum(evals)

    scale = config.follmer_scale

    def scaled_logdensity(u: jax.Array) -> jax.Array:
        return law.log_prob(scale * u)

    def follmer(key: jax.Array, hyper: Hyper):
        kernel = mcmc.follmer(scaled_logdensity, p.steps, m)
        anchor = jnp.zeros_like(start)

        def one_run(r: jax.Array):
            _, positions, info = mcmc.run_chain(
                kernel, jax.random.fold_in(key, r), kernel.init(anchor), p.steps
            )
            return scale * positions[-1], m * jnp.sum(info.num_grad_evals)

        x, evals = jax.vmap(one_run)(jnp.arange(p.runs))
        return x, x, jnp.sum(evals)

    def ensemble(key: jax.Array, hyper: Hyper):
        kernel = mcmc.ensemble_walk_jump(law.log_prob)
        walk_key, jump_key = jax.random.split(key)
        walkers = jnp.broadcast_to(start, (p.members, start.shape[0]))
        _, positions, info = mcmc.run_chain(
            kernel, walk_key, kernel.init(walkers), p.steps, hyper.step_size, hyper.sigma
        )
        y = _thinned(positions, p.samples)  # [n, N, d]

        def jump_all(k: jax.Array, points: jax.Array) -> jax.Array:
            score = mcmc.ensemble_smoothed_score(law.log_prob, k, points, hyper.sigma).score
            return mcmc.tweedie_denoiser(points, score, hyper.sigma)

        x = jax.vmap(jump_all)(jax.random.split(jump_key, p.samples), y)
        # N values a walk step (info) and N per jump, one per walker each: the ensemble's total
        # over N is every walker's own count
        spent = jnp.sum(info.num_density_evals) + p.members * p.samples
        evals = jnp.full((p.members,), spent // p.members)
        return jnp.swapaxes(x, 0, 1), jnp.swapaxes(y, 0, 1), evals

    if name == "ensemble":
        return ensemble
    if name == "ula":
        single = gradient_chain(mcmc.ula(law.log_prob))
    elif name == "mala":
        single = gradient_chain(mcmc.mala(law.log_prob))
    elif name == "hmc":
        single = gradient_chain(mcmc.hmc(law.log_prob, config.funnel_leapfrog))
    elif name == "walk_jump":
        single = walk_and_jump(mcmc.mixture_smoothed_score(law), 1)
    elif name == "walk_jump_mc":
        single = walk_and_jump(mcmc.monte_carlo_smoothed_score(law.log_prob, m), m)
    else:
        single = {
            "exact": exact,
            "exact_jump": exact_jump,
            "chain_of_chains": chain_of_chains,
            "follmer": follmer,
        }[name]

    def unit(key: jax.Array, hyper: Hyper):
        return jax.tree.map(lambda a: a[None], single(key, hyper))  # a unit of one chain

    return unit


def simulate(name: str, problem: str, law: Target, config: ConfigDict, key: jax.Array) -> Draws:
    """All ``num_chains`` chains of one sampler in one jitted call, vmapped over the independent
    units (``num_chains / members``) with the hyper-parameters as traced arguments, the units
    split over the devices of :func:`chain_devices`; the result has the chains of a unit next
    to each other."""
    one = make_sampler(name, law, config)
    members = plan(name, config).members
    mesh = parallel.worker_mesh(chain_devices(config), axis=common.SEEDS)
    keys = common.shard_seeds(jax.random.split(key, config.num_chains // members), mesh)
    hyper = hyper_parameters(name, problem, config, start_point(law, config).dtype)
    out = jax.block_until_ready(jax.jit(jax.vmap(one, in_axes=(0, None)))(keys, hyper))
    samples, walk, evals = (a.reshape((config.num_chains,) + a.shape[2:]) for a in out)
    return Draws(samples, walk, evals)


# ------------------------------------------------------------------ metrics


def mode_statistics(
    law: problems.GaussianMixture, samples: jax.Array, visit_radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Per chain: the fraction of modes visited, the TV error of the assignment frequencies
    and the spread ratio :math:`(\overline{\|x - \mu_{a(x)}\|^2}/\mathrm{tr}\,\Sigma)^{1/2}`
    over all samples (1 for exact draws; :math:`s/\sqrt{s^2+\sigma^2}` for jumps)."""
    k = law.means.shape[0]
    rms = jnp.sqrt(jnp.trace(law.covariances, axis1=-2, axis2=-1))  # [K]

    def one_chain(x):
        assigned = jnp.argmax(jax.vmap(law.responsibilities)(x), axis=-1)  # [n]
        distance = jnp.linalg.norm(x - law.means[assigned], axis=-1)
        near = distance <= visit_radius * rms[assigned]
        onehot = jax.nn.one_hot(assigned, k)
        visited = jnp.any(onehot * near[:, None] > 0, axis=0)
        frequencies = onehot.mean(axis=0)
        tv = 0.5 * jnp.sum(jnp.abs(frequencies - jnp.exp(law.log_weights)))
        return visited.mean(), tv, jnp.sqrt(jnp.mean((distance / rms[assigned]) ** 2))

    visited, tv, spread = jax.jit(jax.vmap(one_chain))(samples)
    return np.asarray(visited), np.asarray(tv), np.asarray(spread)


def iid_modes_visited(
    law: problems.GaussianMixture, num_samples: int, visit_radius: float
) -> float:
    r"""The expected fraction of modes that ``num_samples`` i.i.d. exact draws visit:
    :math:`1 - \frac1K\sum_k(1 - w_k q)^n` with :math:`q = P(\chi^2_d \le \text{visit\_radius}^2 d)`
    (isotropic components; the rare draw assigned to another mode is neglected)."""
    q = chi2.cdf(visit_radius**2 * law.dim, law.dim)
    weights = np.exp(np.asarray(law.log_weights, np.float64))
    return float(1.0 - np.mean((1.0 - weights * q) ** num_samples))


def exact_w2(x: np.ndarray, y: np.ndarray) -> float:
    r""":math:`W_2` between two equal-size point clouds (uniform weights): the optimal assignment
    of the squared-distance matrix (an optimal plan between uniform measures on :math:`n`
    points can be taken to be a permutation, Birkhoff–von Neumann)."""
    cost = np.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
    rows, cols = linear_sum_assignment(cost)
    return float(math.sqrt(cost[rows, cols].mean()))


def grouped_w2(
    points: np.ndarray,
    references: np.ndarray,
    num_groups: int,
    num_points: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``W_2`` per group of chains: ``num_points`` of a group's pooled samples (without
    replacement) against ``references[g]`` (``[num_groups, num_points, d]`` exact draws)."""
    groups = points.reshape(num_groups, -1, points.shape[-1])
    out = []
    for g in range(num_groups):
        chosen = rng.choice(groups.shape[1], num_points, replace=False)
        out.append(exact_w2(groups[g, chosen], references[g]))
    return np.asarray(out)


def unit_mean_and_stderr(values: Any, members: int) -> tuple[float, float]:
    """Mean ± SE of per-chain ``values`` ``[C]`` over the independent units: the ``members``
    chains of a unit (an ensemble's walkers, adjacent) are averaged first."""
    per_unit = np.asarray(values, np.float64).reshape(-1, members).mean(axis=1)
    mean, stderr = common.mean_and_stderr(per_unit)
    return float(mean), float(stderr)


def funnel_chain_statistics(samples: np.ndarray, scale: float) -> dict[str, np.ndarray]:
    r"""Per chain, from the :math:`v`-coordinates of its samples ``[C, n, d]``: the mean of
    :math:`v` and of :math:`v^2` (the variance about the exact mean 0) and the fractions in the
    neck :math:`v < -a` and the mouth :math:`v > a` (:math:`a` = ``scale``)."""
    v = samples[..., 0]
    return {
        "mean_v": v.mean(axis=1),
        "var_v": (v**2).mean(axis=1),
        "neck": (v < -scale).mean(axis=1),
        "mouth": (v > scale).mean(axis=1),
    }


def grouped_v_distances(
    v: np.ndarray, reference: np.ndarray, num_groups: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    r"""Per group of chains (``v`` ``[C, n]`` pooled into ``num_groups`` groups): the
    Kolmogorov–Smirnov distance to the exact CDF of :math:`N(0, \text{scale}^2)` and the 1-D
    :math:`W_1` to ``reference[g]`` (as many exact draws of :math:`v`)."""
    groups = v.reshape(num_groups, -1)
    ks = [kstest(g, norm(0.0, scale).cdf).statistic for g in groups]
    w1 = [wasserstein_distance(g, r) for g, r in zip(groups, reference, strict=True)]
    return np.asarray(ks), np.asarray(w1)


def mixture_result(
    law: problems.GaussianMixture,
    draws: Draws,
    sampler: str,
    config: ConfigDict,
    keys: tuple[jax.Array, jax.Array],
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Modes visited, weight TV error, spread ratio and W2 (and the walk's W2 to p_sigma)."""
    members = plan(sampler, config).members
    samples = np.asarray(draws.samples)
    visited, tv, spread = mode_statistics(law, draws.samples, config.visit_radius)
    num_groups, num_points = config.num_groups, config.w2_points
    reference = np.asarray(law.sample(keys[0], num_groups * num_points)).reshape(
        num_groups, num_points, -1
    )
    w2 = grouped_w2(samples, reference, num_groups, num_points, rng)
    result: dict[str, Any] = {
        "iid_modes_visited": iid_modes_visited(law, samples.shape[1], config.visit_radius)
    }
    for field, values in (("modes_visited", visited), ("weight_tv", tv), ("spread_ratio", spread)):
        result[field], result[field + "_se"] = unit_mean_and_stderr(values, members)
    result["w2"], result["w2_se"] = map(float, common.mean_and_stderr(w2))
    if sampler in WALKERS or sampler == "exact_jump":
        smoothed = law.diffuse(1.0, jnp.asarray(config.sigma, law.means.dtype))
        walk_reference = np.asarray(smoothed.sample(keys[1], num_groups * num_points))
        w2_walk = grouped_w2(
            np.asarray(draws.walk),
            walk_reference.reshape(num_groups, num_points, -1),
            num_groups,
            num_points,
            rng,
        )
        result["w2_walk"], result["w2_walk_se"] = map(float, common.mean_and_stderr(w2_walk))
    return result


def funnel_result(
    law: Funnel, draws: Draws, sampler: str, config: ConfigDict, key: jax.Array
) -> dict[str, Any]:
    """E[v], Var[v], neck and mouth fractions, KS and W1 of the v-marginal (and the walk's KS to
    the v-marginal of p_sigma)."""
    members = plan(sampler, config).members
    samples = np.asarray(draws.samples, np.float64)
    result: dict[str, Any] = {}
    for field, values in funnel_chain_statistics(samples, law.scale).items():
        result[field], result[field + "_se"] = unit_mean_and_stderr(values, members)
    v = samples[..., 0]
    reference = np.asarray(law.sample(key, v.size)[:, 0], np.float64)
    ks, w1 = grouped_v_distances(
        v, reference.reshape(config.num_groups, -1), config.num_groups, law.scale
    )
    result["ks_v"], result["ks_v_se"] = map(float, common.mean_and_stderr(ks))
    result["w1_v"], result["w1_v_se"] = map(float, common.mean_and_stderr(w1))
    result["exact_tail"] = float(norm.cdf(-1.0))
    if sampler in WALKERS:
        walk_v = np.asarray(draws.walk, np.float64)[..., 0].reshape(config.num_groups, -1)
        walk_scale = math.hypot(law.scale, config.funnel_sigma)
        ks_walk = [kstest(g, norm(0.0, walk_scale).cdf).statistic for g in walk_v]
        result["ks_walk"], result["ks_walk_se"] = map(float, common.mean_and_stderr(ks_walk))
    return result


# ------------------------------------------------------------------ output


def _budget_columns(r: dict[str, Any]) -> list[str]:
    members = f"/{r['members']}" if r["members"] > 1 else ""
    return [
        r["unit"],
        str(r["steps"]),
        str(r["runs"]) + members,
        str(r["samples_per_chain"]),
        f"{r['evals_per_chain']:.0f}",
    ]


def _pm(r: dict[str, Any], field: str, digits: int = 3) -> str:
    return f"{r[field]:.{digits}f}±{r[field + '_se']:.{digits}f}" if field in r else "—"


def format_table(metrics: dict[str, Any]) -> str:
    """The mixtures' table, then the funnel's, each with its legend."""
    c = metrics["config"]
    lines = []
    mixtures = {k: v for k, v in metrics["problems"].items() if k != "funnel"}
    budget = (
        f"budget {c['budget']} evaluations per chain: gradients of log p or log p_sigma, or "
        "log-density values (unit); evals/chain summed from info.num_grad_evals / "
        "num_density_evals (+1 initial gradient for ULA/MALA/HMC, +1 score per jump), "
        f"x{c['mc_samples']} for fresh-draw Monte-Carlo scores; runs/N: an ensemble of N walkers "
        f"spends N values a step and N per jump, i.e. every walker (chain) exactly its budget"
    )
    if mixtures:
        line = (
            "{:17s} {:15s} {:8s} {:>5s} {:>5s} {:>7s} {:>11s} {:>13s} {:>5s} {:>13s} {:>13s} "
            "{:>13s} {:>14s} {:>5s}"
        )
        lines.append(
            line.format(
                "problem",
                "sampler",
                "unit",
                "steps",
                "runs",
                "n/chain",
                "evals/chain",
                "modes visited",
                "iid@n",
                "weight TV",
                "spread ratio",
                "W2 to p",
                "W2 walk->p_sig",
                "s",
            )
        )
        for problem, entry in mixtures.items():
            for sampler, r in entry["samplers"].items():
                lines.append(
                    line.format(
                        f"{problem} (d={entry['dim']})",
                        sampler,
                        *_budget_columns(r),
                        _pm(r, "modes_visited"),
                        f"{r['iid_modes_visited']:.3f}",
                        _pm(r, "weight_tv"),
                        _pm(r, "spread_ratio"),
                        _pm(r, "w2"),
                        _pm(r, "w2_walk"),
                        f"{r['seconds']:.1f}",
                    )
                )
        lines.append(
            f"({budget}. {c['num_chains']} chains from mode {c['start_mode']}; mean ± SE over "
            f"chains (over ensembles of {c['ensemble_size']} for ensemble), W2 over "
            f"{c['num_groups']} groups of {c['w2_points']} points (exact's W2 is the Monte Carlo "
            "floor); iid@n: modes visited by n i.i.d. exact draws; spread ratio: RMS distance to "
            "the assigned mean over the exact RMS radius; jumps are posterior means E[x|y], not "
            "draws: pulled to a mode's centre, or between modes for an ambiguous y (exact_jump: "
            "the jumps of a perfect walk))"
        )
    if "funnel" in metrics["problems"]:
        entry = metrics["problems"]["funnel"]
        a = c["funnel_scale"]
        line = (
            "{:13s} {:13s} {:8s} {:>5s} {:>5s} {:>7s} {:>11s} {:>14s} {:>14s} {:>13s} {:>13s} "
            "{:>13s} {:>13s} {:>13s} {:>5s}"
        )
        if lines:
            lines.append("")
        lines.append(
            line.format(
                "problem",
                "sampler",
                "unit",
                "steps",
                "runs",
                "n/chain",
                "evals/chain",
                "E[v] (0)",
                f"Var[v] ({a**2:g})",
                f"neck v<-{a:g}",
                f"mouth v>{a:g}",
                "KS(v)",
                "W1(v)",
                "KS walk->p_sig",
                "s",
            )
        )
        for sampler, r in entry["samplers"].items():
            lines.append(
                line.format(
                    f"funnel (d={entry['dim']})",
                    sampler,
                    *_budget_columns(r),
                    _pm(r, "mean_v"),
                    _pm(r, "var_v"),
                    _pm(r, "neck"),
                    _pm(r, "mouth"),
                    _pm(r, "ks_v"),
                    _pm(r, "w1_v"),
                    _pm(r, "ks_walk"),
                    f"{r['seconds']:.1f}",
                )
            )
        tail = norm.cdf(-1.0)
        lines.append(
            f"({budget}. {c['num_chains']} chains from the origin, v ~ N(0, {a**2:g}) exactly; "
            f"E[v], Var[v] (about 0), neck and mouth fractions (exact {tail:.3f} each): mean ± SE "
            f"over chains (ensembles); KS to the exact CDF of v and W1 to as many exact draws: "
            f"mean ± SE over {c['num_groups']} groups of pooled chains (exact's values are the "
            f"Monte Carlo floor); KS walk->p_sig: the walk's v against N(0, {a**2:g} + "
            f"sigma^2), sigma = {c['funnel_sigma']:g}; jumps are posterior means, shrunk)"
        )
    return "\n".join(lines)


def _projection(law: problems.GaussianMixture) -> np.ndarray:
    """The identity in 2-D; otherwise the plane of the two leading principal directions of the
    means."""
    means = np.asarray(law.means)
    if means.shape[1] == 2:
        return np.eye(2)
    return np.linalg.svd(means - means.mean(axis=0), full_matrices=False)[2][:2].T


def draw(
    metrics: dict[str, Any],
    pooled: dict[str, dict[str, np.ndarray]],
    laws: dict[str, Target],
    path,
) -> None:
    """One row per problem: the pooled samples of every sampler (mixtures: projected on the
    means' plane; funnel: :math:`(x_1, v)`, :math:`x_1` on a symmetric log scale), then a bar
    panel (modes visited, or the KS distance of :math:`v`)."""
    width = max(len(by_sampler) for by_sampler in pooled.values()) + 1
    rows = len(pooled)
    fig, axes = plt.subplots(rows, width, figsize=(2.6 * width + 1.5, 2.7 * rows), squeeze=False)
    for row, (problem, by_sampler) in enumerate(pooled.items()):
        names = list(by_sampler)
        results = metrics["problems"][problem]["samplers"]
        for col, name in enumerate(names):
            axis = axes[row, col]
            if problem == "funnel":
                x = by_sampler[name]
                axis.scatter(x[:, 1], x[:, 0], s=2, alpha=0.4)
                axis.set_xscale("symlog", linthresh=0.1)
                a = laws[problem].scale
                for level in (-a, a):
                    axis.axhline(level, color="k", lw=0.5, ls="--")
                axis.set_xlabel("x_1", fontsize=7)
                axis.set_ylabel("v", fontsize=7)
            else:
                projection = _projection(laws[problem])
                means = np.asarray(laws[problem].means) @ projection
                start = means[metrics["config"]["start_mode"]]
                xy = by_sampler[name] @ projection
                axis.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.4)
                axis.scatter(means[:, 0], means[:, 1], marker="x", c="k", s=30)
                axis.scatter(
                    [start[0]], [start[1]], marker="o", facecolors="none", edgecolors="r", s=80
                )
                axis.set_aspect("equal", adjustable="datalim")
            axis.set_title(f"{problem}: {name}", fontsize=8)
            axis.tick_params(labelsize=6)
        for col in range(len(names), width - 1):
            axes[row, col].axis("off")
        bars = axes[row, -1]
        field, title = (
            ("ks_v", "KS distance of v (per group)")
            if problem == "funnel"
            else ("modes_visited", "modes visited / chain")
        )
        values = [results[n][field] for n in names]
        errors = [results[n][field + "_se"] for n in names]
        bars.bar(range(len(names)), values, yerr=errors, color=[f"C{i}" for i in range(len(names))])
        bars.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        if problem != "funnel":
            bars.set_ylim(0, 1.05)
        bars.set_title(f"{problem}: {title}", fontsize=8)
    fig.suptitle(
        "samples pooled over chains (x: means, o: start; projection on the means' plane when "
        "d > 2; funnel: dashed at v = ±funnel_scale, the neck below)",
        fontsize=9,
    )
    common.save_figure(fig, path)


# ------------------------------------------------------------------ the study

MIXTURE_COLUMNS = (
    "modes_visited",
    "modes_visited_se",
    "iid_modes_visited",
    "weight_tv",
    "weight_tv_se",
    "spread_ratio",
    "spread_ratio_se",
    "w2",
    "w2_se",
    "w2_walk",
    "w2_walk_se",
)
FUNNEL_COLUMNS = (
    "mean_v",
    "mean_v_se",
    "var_v",
    "var_v_se",
    "neck",
    "neck_se",
    "mouth",
    "mouth_se",
    "ks_v",
    "ks_v_se",
    "w1_v",
    "w1_v_se",
    "ks_walk",
    "ks_walk_se",
)
BUDGET_COLUMNS = (
    "unit",
    "steps",
    "runs",
    "members",
    "samples_per_chain",
    "evals_per_chain",
    "evals_min",
    "evals_max",
)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the tables, the CSVs and the figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    laws = {name: build_problem(name, config) for name in config.problems}
    folder = common.results_folder(config, NAME)
    metrics: dict[str, Any] = {
        "config": config.to_dict(),
        "devices": chain_devices(config),  # the chain axis was split over these
        "problems": {},
    }
    pooled: dict[str, dict[str, np.ndarray]] = {}
    rows: dict[str, list[list[Any]]] = {"mixture": [], "funnel": []}
    base = jax.random.key(config.seed)
    for index, (problem, sampler) in enumerate(tqdm(combinations(config), desc=NAME)):
        law = laws[problem]
        run_key, reference_key, walk_reference_key = jax.random.split(
            jax.random.fold_in(base, index), 3
        )
        started = time.perf_counter()
        draws = simulate(sampler, problem, law, config, run_key)
        seconds = time.perf_counter() - started
        p = plan(sampler, config)
        evals = np.asarray(draws.evals)
        result: dict[str, Any] = {
            "unit": p.unit,
            "steps": p.steps,
            "runs": p.runs,
            "members": p.members,
            "samples_per_chain": p.samples,
            "evals_per_chain": float(evals.mean()),
            "evals_min": int(evals.min()),
            "evals_max": int(evals.max()),
            "seconds": seconds,
        }
        if problem == "funnel":
            result.update(funnel_result(law, draws, sampler, config, reference_key))
            kind, columns = "funnel", FUNNEL_COLUMNS
        else:
            rng = np.random.default_rng([config.seed, index])
            keys = (reference_key, walk_reference_key)
            result.update(mixture_result(law, draws, sampler, config, keys, rng))
            kind, columns = "mixture", MIXTURE_COLUMNS
        metrics["problems"].setdefault(problem, {"dim": law.dim, "samplers": {}})["samplers"][
            sampler
        ] = result
        pooled.setdefault(problem, {})[sampler] = np.asarray(draws.samples).reshape(-1, law.dim)
        rows[kind].append(
            [problem, sampler]
            + [result[c] for c in BUDGET_COLUMNS]
            + [result.get(c, "") for c in columns]
            + [seconds]
        )
    table = format_table(metrics)
    for kind, name, columns in (
        ("mixture", "samplers.csv", MIXTURE_COLUMNS),
        ("funnel", "funnel.csv", FUNNEL_COLUMNS),
    ):
        if rows[kind]:
            header = ["problem", "sampler", *BUDGET_COLUMNS, *columns, "seconds"]
            common.write_csv(folder / name, header, rows[kind])
    return common.finish(folder, table, metrics, lambda path: draw(metrics, pooled, laws, path))


if __name__ == "__main__":
    common.main(run, validate)
