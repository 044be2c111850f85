r"""Mode tunnelling on well-separated Gaussian mixtures: fraction of modes visited, mode-weight
error and :math:`W_2` to the truth for walk–jump, the ensemble (Föllmer) sampler, the chain
of log-concave chains, ULA and MALA at an equal budget of evaluations.

**Targets.** :math:`p = \sum_k w_k N(\mu_k, s^2 I)` with ``weights`` :math:`w` and
``component_std`` :math:`s`: ``mixture_2d`` puts the means on a circle, neighbours
``separation`` apart (a square for four modes); ``mixture_high_dim`` puts them on a regular
simplex in ``high_dim`` dimensions, :math:`\mu_k = (\text{separation}/\sqrt2)\,e_k`, every
pair ``separation`` apart.  With separation :math:`8 = 16s` the log-density barrier between
neighbours is about :math:`\text{separation}^2/(8s^2) = 32` nats: a Langevin chain never
crosses it.  Every Markov chain starts at :math:`\mu_{\text{start\_mode}}`.

**Samplers** (all chains vmapped in one jitted call per problem and sampler):

* ``exact``: i.i.d. draws from :math:`p`, the reference (its :math:`W_2` is the Monte Carlo floor);
* ``exact_jump``: Tweedie jumps :math:`\hat x(y) = y + \sigma^2\nabla\log p_\sigma(y)` of exact
  draws :math:`y \sim p_\sigma`: the law that walk–jump with a perfect walk produces;
* ``ula`` / ``mala``: Roberts & Tweedie (1996) on :math:`\log p` with the exact gradient;
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
  variance); it is not a chain: each sample is an independent transport from the anchor 0.

**Equal budget.**  Each chain gets ``budget`` :math:`B` evaluations, counted from
``info.num_grad_evals`` (plus the initial gradient of ULA/MALA and one smoothed-score
evaluation per jump): gradients of :math:`\log p` or :math:`\log p_\sigma` for ``ula``,
``mala``, ``walk_jump`` and ``chain_of_chains``; log-density values for ``walk_jump_mc`` and
``follmer`` (each Monte Carlo score costs ``mc_samples``).  One gradient is counted like one
log-density value, which favours the gradient samplers (a gradient costs a small multiple of a
value).  ULA/MALA take :math:`B - 1` steps, walk–jump :math:`B - n` walk steps for :math:`n`
jumps; runs of the chain of chains (:math:`m\cdot\text{steps} + 1` each) and of Föllmer
(:math:`K\cdot\text{mc\_samples}` each) fill :math:`B` up to less than one run.

**Metrics.**  A sample is assigned to :math:`\arg\max_k r_k(x)` (the true responsibilities);
mode :math:`k` is *visited* by a chain when one of its samples is assigned to :math:`k` and lies
within ``visit_radius`` RMS radii :math:`\sqrt{d}\,s` of :math:`\mu_k`.  Per chain: the fraction
of modes visited (``iid@n`` gives the expected fraction for :math:`n` i.i.d. exact draws, the
fair reference for a sampler keeping :math:`n` samples), the total-variation error
:math:`\frac12\sum_k|\hat w_k - w_k|` of the assignment frequencies, and the spread ratio,
the RMS distance of the samples to their assigned means over the exact RMS radius (1 for
exact draws, :math:`\sqrt{1/(1 - h/2s^2)}` for ULA's stationary law inside a mode); mean ± SE
over chains.  :math:`W_2` is the exact distance between ``w2_points`` samples pooled from a
group of chains and as many fresh exact draws, by optimal assignment
(``scipy.optimize.linear_sum_assignment``), mean ± SE over ``num_groups`` groups; at these
sizes it is dominated by the multinomial fluctuation of the mode weights (a mass error
transported ``separation`` far), so ``exact``'s value is its Monte Carlo floor.
Walk–jump's jumps are posterior means :math:`E[x\mid y]`, not draws: inside one mode they
shrink towards the mean (spread ratio :math:`s/\sqrt{s^2+\sigma^2}`), while a walker between
modes jumps to a responsibility-weighted average of their means, i.e. between them; so the
jumps' law differs from :math:`p` even with a perfect walk (``exact_jump``), and for the
walk–jump samplers the walk's own :math:`W_2` to :math:`p_\sigma` (the law it targets) is
reported too.

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
from scipy.stats import chi2
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import mcmc, problems

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "walk_jump"
PROBLEMS = ("mixture_2d", "mixture_high_dim")
SAMPLERS = (
    "exact",
    "exact_jump",
    "ula",
    "mala",
    "walk_jump",
    "walk_jump_mc",
    "chain_of_chains",
    "follmer",
)
REFERENCES = ("exact", "exact_jump")  # not samplers at a budget: draws from known laws
DENSITY_SAMPLERS = (
    "walk_jump_mc",
    "follmer",
)  # budget in log-density values, the rest in gradients
WALKERS = ("walk_jump", "walk_jump_mc")  # report the walk's W2 to p_sigma too


# ------------------------------------------------------------------ configuration


class Plan(NamedTuple):
    """A sampler's share of the budget: ``steps`` kernel steps per run, ``runs`` runs per chain
    (1 for chains), ``samples`` kept samples per chain, ``unit`` what the budget counts."""

    steps: int
    runs: int
    samples: int
    unit: str


def plan(sampler: str, config: ConfigDict) -> Plan:
    """Steps, runs and kept samples per chain so that each sampler spends ``config.budget``."""
    budget, n = config.budget, config.samples_per_chain
    if sampler in REFERENCES:
        return Plan(0, 1, n, "none")
    if sampler in ("ula", "mala"):
        return Plan(budget - 1, 1, n, "gradient")  # one gradient at the start
    if sampler == "walk_jump":
        return Plan(budget - n, 1, n, "gradient")  # one smoothed score per walk step and per jump
    if sampler == "walk_jump_mc":
        return Plan(budget // config.mc_samples - n, 1, n, "density")
    if sampler == "chain_of_chains":
        steps = config.num_measurements * config.steps_per_measurement
        runs = budget // (steps + 1)  # + the jump's smoothed score
        return Plan(steps, runs, runs, "gradient")
    runs = budget // (config.follmer_steps * config.mc_samples)
    return Plan(config.follmer_steps, runs, runs, "density")


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built or compiled."""
    common.check_names("problems", config.problems, PROBLEMS)
    common.check_names("samplers", config.samplers, SAMPLERS)
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
    ):
        common.check_positive_ints(field, config[field])
    if "mixture_high_dim" in config.problems and config.high_dim < len(weights):
        raise ValueError(
            f"config.high_dim must be at least the number of modes ({len(weights)}) for the "
            f"simplex layout, got {config.high_dim}"
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
    if "walk_jump_mc" in config.samplers and config.budget % config.mc_samples:
        raise ValueError(
            f"config.budget must be a multiple of config.mc_samples={config.mc_samples} "
            f"(walk_jump_mc spends mc_samples a score), got {config.budget}"
        )
    chains_per_group = config.num_chains // config.num_groups
    for sampler in config.samplers:
        p = plan(sampler, config)
        if p.samples < 2 or (sampler not in REFERENCES and p.runs == 1 and p.steps < p.samples):
            raise ValueError(
                f"config.budget={config.budget} is too small for {sampler}: {p.steps} steps for "
                f"{p.samples} samples per chain"
            )
        if p.samples * chains_per_group < config.w2_points:
            raise ValueError(
                f"config.w2_points={config.w2_points} exceeds the {p.samples * chains_per_group} "
                f"samples a group of {sampler} chains has"
            )
    if not isinstance(config.x64, bool):
        raise ValueError(f"config.x64 must be True or False, got {config.x64!r}")


# ------------------------------------------------------------------ the targets


def build_problem(name: str, config: ConfigDict) -> problems.GaussianMixture:
    """The circle (2-D) or simplex (``high_dim``-D) mixture with isotropic components."""
    k = len(config.weights)
    if name == "mixture_2d":
        radius = config.separation / (2.0 * math.sin(math.pi / k))
        angles = 2.0 * math.pi * np.arange(k) / k + math.pi / k
        means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    else:
        means = config.separation / math.sqrt(2.0) * np.eye(config.high_dim)[:k]
    covariances = np.tile(config.component_std**2 * np.eye(means.shape[1]), (k, 1, 1))
    return problems.gaussian_mixture(config.weights, means, covariances)


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


def hyper_parameters(name: str, config: ConfigDict, dtype: Any) -> Hyper:
    r"""The step size of ULA / MALA, or the walk step
    :math:`h = \text{walk\_step\_fraction}\,\sigma^2` of the smoothed-density samplers, with
    :math:`\sigma` (unused by ULA, MALA, exact, Föllmer)."""
    sigma = config.sigma
    step = {"ula": config.ula_step_size, "mala": config.mala_step_size}.get(
        name, config.walk_step_fraction * sigma**2
    )
    return Hyper(jnp.asarray(step, dtype), jnp.asarray(sigma, dtype))


Sampler = Callable[[jax.Array, Hyper], tuple[jax.Array, jax.Array, jax.Array]]


def make_sampler(name: str, law: problems.GaussianMixture, config: ConfigDict) -> Sampler:
    """``(key, hyper) -> (samples [n, d], walk [n, d], evals)`` for one chain of sampler ``name``
    (``walk``: the walk points that were jumped, or the samples themselves)."""
    p = plan(name, config)
    start = law.means[config.start_mode]
    exact_score = mcmc.mixture_smoothed_score(law)
    m = config.mc_samples
    no_evals = jnp.zeros((), jnp.int32)

    def exact(key: jax.Array, hyper: Hyper):
        x = law.sample(key, p.samples)
        return x, x, no_evals

    def exact_jump(key: jax.Array, hyper: Hyper):
        sample_key, jump_key = jax.random.split(key)
        y = law.diffuse(1.0, hyper.sigma).sample(sample_key, p.samples)
        keys = jax.random.split(jump_key, p.samples)
        x = jax.vmap(lambda k, u: mcmc.jump(exact_score, k, u, hyper.sigma))(keys, y)
        return x, y, no_evals

    def langevin(kernel: mcmc.SamplingAlgorithm) -> Sampler:
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

    if name == "ula":
        return langevin(mcmc.ula(law.log_prob))
    if name == "mala":
        return langevin(mcmc.mala(law.log_prob))
    if name == "walk_jump":
        return walk_and_jump(exact_score, 1)
    if name == "walk_jump_mc":
        return walk_and_jump(mcmc.monte_carlo_smoothed_score(law.log_prob, m), m)
    return {
        "exact": exact,
        "exact_jump": exact_jump,
        "chain_of_chains": chain_of_chains,
        "follmer": follmer,
    }[name]


def simulate(name: str, law: problems.GaussianMixture, config: ConfigDict, key: jax.Array) -> Draws:
    """All ``num_chains`` chains of one sampler in one jitted call, vmapped over chains with the
    hyper-parameters as traced arguments."""
    one = make_sampler(name, law, config)
    keys = jax.random.split(key, config.num_chains)
    hyper = hyper_parameters(name, config, law.means.dtype)
    samples, walk, evals = jax.block_until_ready(
        jax.jit(jax.vmap(one, in_axes=(0, None)))(keys, hyper)
    )
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


# ------------------------------------------------------------------ output


def format_table(metrics: dict[str, Any]) -> str:
    header = (
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
    line = (
        "{:17s} {:15s} {:8s} {:>5s} {:>4s} {:>7s} {:>11s} {:>13s} {:>5s} {:>13s} {:>13s} {:>13s} "
        "{:>14s} {:>5s}"
    )
    lines = [line.format(*header)]
    for problem, entry in metrics["problems"].items():
        for sampler, r in entry["samplers"].items():
            walk = f"{r['w2_walk']:.3f}±{r['w2_walk_se']:.3f}" if "w2_walk" in r else "—"
            lines.append(
                line.format(
                    f"{problem} (d={entry['dim']})",
                    sampler,
                    r["unit"],
                    str(r["steps"]),
                    str(r["runs"]),
                    str(r["samples_per_chain"]),
                    f"{r['evals_per_chain']:.0f}",
                    f"{r['modes_visited']:.3f}±{r['modes_visited_se']:.3f}",
                    f"{r['iid_modes_visited']:.3f}",
                    f"{r['weight_tv']:.3f}±{r['weight_tv_se']:.3f}",
                    f"{r['spread_ratio']:.3f}±{r['spread_ratio_se']:.3f}",
                    f"{r['w2']:.3f}±{r['w2_se']:.3f}",
                    walk,
                    f"{r['seconds']:.1f}",
                )
            )
    c = metrics["config"]
    lines.append(
        f"(budget {c['budget']} evaluations per chain: gradients of log p or log p_sigma, or "
        "log-density values (unit); evals/chain summed from info.num_grad_evals (+1 initial "
        f"gradient for ULA/MALA, +1 score per jump), x{c['mc_samples']} for Monte-Carlo scores. "
        f"{c['num_chains']} chains from mode {c['start_mode']}; mean ± SE over chains, W2 over "
        f"{c['num_groups']} groups of {c['w2_points']} points (exact's W2 is the Monte Carlo "
        "floor); iid@n: modes visited by n i.i.d. exact draws; spread ratio: RMS distance to the "
        "assigned mean over the exact RMS radius; jumps are posterior means E[x|y], not draws: "
        "pulled to a mode's centre, or between modes for an ambiguous y (exact_jump: the jumps of "
        "a perfect walk))"
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
    laws: dict[str, problems.GaussianMixture],
    path,
) -> None:
    names = list(next(iter(pooled.values())))
    rows = len(pooled)
    fig, axes = plt.subplots(
        rows, len(names) + 1, figsize=(2.6 * (len(names) + 1) + 1.5, 2.7 * rows), squeeze=False
    )
    for row, (problem, by_sampler) in enumerate(pooled.items()):
        projection = _projection(laws[problem])
        means = np.asarray(laws[problem].means) @ projection
        start = means[metrics["config"]["start_mode"]]
        for col, name in enumerate(names):
            axis = axes[row, col]
            xy = by_sampler[name] @ projection
            axis.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.4)
            axis.scatter(means[:, 0], means[:, 1], marker="x", c="k", s=30)
            axis.scatter(
                [start[0]], [start[1]], marker="o", facecolors="none", edgecolors="r", s=80
            )
            axis.set_title(f"{name}", fontsize=8)
            axis.set_aspect("equal", adjustable="datalim")
            axis.tick_params(labelsize=6)
        bars = axes[row, -1]
        results = metrics["problems"][problem]["samplers"]
        values = [results[n]["modes_visited"] for n in names]
        errors = [results[n]["modes_visited_se"] for n in names]
        bars.bar(range(len(names)), values, yerr=errors, color=[f"C{i}" for i in range(len(names))])
        bars.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        bars.set_ylim(0, 1.05)
        bars.set_title(f"{problem}: modes visited / chain", fontsize=8)
    fig.suptitle(
        "samples pooled over chains (x: means, o: start); projection on the means' plane "
        "when d > 2",
        fontsize=9,
    )
    common.save_figure(fig, path)


# ------------------------------------------------------------------ the study


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the study; return the metrics and write them, the table, the CSV and the figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    laws = {name: build_problem(name, config) for name in config.problems}
    folder = common.results_folder(config, NAME)
    metrics: dict[str, Any] = {"config": config.to_dict(), "problems": {}}
    pooled: dict[str, dict[str, np.ndarray]] = {}
    rows = []
    base = jax.random.key(config.seed)
    combos = [(p, s) for p in config.problems for s in config.samplers]
    for index, (problem, sampler) in enumerate(tqdm(combos, desc=NAME)):
        law = laws[problem]
        run_key, reference_key, walk_reference_key = jax.random.split(
            jax.random.fold_in(base, index), 3
        )
        started = time.perf_counter()
        draws = simulate(sampler, law, config, run_key)
        seconds = time.perf_counter() - started
        p = plan(sampler, config)
        samples = np.asarray(draws.samples)
        visited, tv, spread = mode_statistics(law, draws.samples, config.visit_radius)
        num_groups, num_points = config.num_groups, config.w2_points
        rng = np.random.default_rng([config.seed, index])
        reference = np.asarray(law.sample(reference_key, num_groups * num_points)).reshape(
            num_groups, num_points, -1
        )
        w2 = grouped_w2(samples, reference, num_groups, num_points, rng)
        evals = np.asarray(draws.evals)
        result: dict[str, Any] = {
            "unit": p.unit,
            "steps": p.steps,
            "runs": p.runs,
            "samples_per_chain": p.samples,
            "evals_per_chain": float(evals.mean()),
            "evals_min": int(evals.min()),
            "evals_max": int(evals.max()),
            "iid_modes_visited": iid_modes_visited(law, p.samples, config.visit_radius),
            "seconds": seconds,
        }
        for field, values in (
            ("modes_visited", visited),
            ("weight_tv", tv),
            ("spread_ratio", spread),
            ("w2", w2),
        ):
            result[field], result[field + "_se"] = map(
                float, common.mean_and_stderr(np.ravel(values))
            )
        if sampler in WALKERS or sampler == "exact_jump":
            smoothed = law.diffuse(1.0, jnp.asarray(config.sigma, law.means.dtype))
            walk_reference = np.asarray(
                smoothed.sample(walk_reference_key, num_groups * num_points)
            )
            w2_walk = grouped_w2(
                np.asarray(draws.walk),
                walk_reference.reshape(num_groups, num_points, -1),
                num_groups,
                num_points,
                rng,
            )
            result["w2_walk"], result["w2_walk_se"] = map(
                float, common.mean_and_stderr(np.ravel(w2_walk))
            )
        metrics["problems"].setdefault(problem, {"dim": law.dim, "samplers": {}})["samplers"][
            sampler
        ] = result
        pooled.setdefault(problem, {})[sampler] = samples.reshape(-1, law.dim)
        rows.append(
            [
                problem,
                sampler,
                p.unit,
                p.steps,
                p.runs,
                p.samples,
                result["evals_per_chain"],
                result["modes_visited"],
                result["modes_visited_se"],
                result["iid_modes_visited"],
                result["weight_tv"],
                result["weight_tv_se"],
                result["spread_ratio"],
                result["spread_ratio_se"],
                result["w2"],
                result["w2_se"],
                result.get("w2_walk", ""),
                result.get("w2_walk_se", ""),
                seconds,
            ]
        )
    table = format_table(metrics)
    common.write_csv(
        folder / "samplers.csv",
        [
            "problem",
            "sampler",
            "unit",
            "steps",
            "runs",
            "samples_per_chain",
            "evals_per_chain",
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
            "seconds",
        ],
        rows,
    )
    return common.finish(folder, table, metrics, lambda path: draw(metrics, pooled, laws, path))


if __name__ == "__main__":
    common.main(run, validate)
