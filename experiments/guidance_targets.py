r"""What guidance samples: CFG against the γ-powered target it is often taken to sample, and the
two samplers that do sample it, CFG as a predictor–corrector and Feynman–Kac correctors.

Classifier-free guidance (Ho & Salimans 2022) drives a sampler with the score
:math:`\gamma\nabla\log p_t(x \mid c) + (1-\gamma)\nabla\log p_t(x)`, the score of
:math:`p_t(x \mid c)^\gamma p_t(x)^{1-\gamma}` at every noise level.  Those laws are not the
noised versions of one law, so the sampler does not end at the γ-powered data law
:math:`p_\gamma \propto p(x \mid c)^\gamma p(x)^{1-\gamma}` (Bradley & Nakkiran 2024, Sec. 3).
Two samplers do reach it as their budget grows: PCG (Bradley & Nakkiran 2024, Sec. 4), which
adds :math:`K` Langevin corrector steps on :math:`p_{t,\gamma}` after each conditional DDIM
step, and the Feynman–Kac corrector (Skreta et al. 2025), which weights and resamples
:math:`N` particles of the guided SDE, exact as :math:`N \to \infty`.

* **Part A, one Gaussian class** (dimension ``gaussian_dim``): the class law
  :math:`N(m_c, S_c)` and a wider unconditional law :math:`N(m_u, S_u)` (:math:`S_u \succ S_c`,
  so :math:`p_\gamma` is Gaussian with precision :math:`\gamma S_c^{-1} + (1-\gamma)S_u^{-1}` at
  every :math:`\gamma \ge 0`).  Every guided sampler here but FK is affine in its inputs, so its
  output law is exact (:func:`shufflesgd.diffusion.exact_gaussian_law`) and the KL divergence
  to :math:`p_\gamma` is measured without Monte Carlo: CFG with DDIM and with DDPM (ancestral)
  steps, PCG at each number of corrector steps.  FK's weighted particles are fitted by their
  weighted mean and covariance; the KL of that fit is shown with the same fit to as many exact
  draws of :math:`p_\gamma` (the Monte Carlo floor), mean ± SE over ``gaussian_systems``
  particle systems.
* **Part B, a class-conditional mixture** (2-D, two classes of two modes, the unconditional
  law their marginal): :math:`p_\gamma` has no closed form, so it is computed by quadrature on a
  grid and sampled exactly up to the cell size; each method's samples are compared with those
  by sliced :math:`W_2`, beside the distance between two exact sample sets (mean ± SE over
  ``floor_pairs`` pairs: a distance between two draws of a two-mode law moves with the
  binomial spread of the mode masses).  FK runs ``mixture_samples / N`` systems of :math:`N`
  particles each, pooled after resampling each system to equal weights.  The corrections of
  CFG that act on one evaluation (guidance rescale, APG, adaptive guidance;
  ``mixture_corrections``) run with DDIM too.  (Guidance
  rescale acts on the spread of a sample's entries, which in 2-D is half the difference of the
  two coordinates: the study keeps it for completeness; the digits study,
  ``experiments/guided_digits.py``, is where it matters.)

Network evaluations per sample: CFG and its corrections evaluate both branches at every call,
two per call; PCG one conditional evaluation per step plus two per Langevin step; FK two per
step and particle, on its own finer grid (``fk_steps`` Euler–Maruyama steps, against
``num_steps`` for the others: its weights are an Euler discretisation of a continuous-time
identity).  Expected: CFG's KL to :math:`p_\gamma` grows with :math:`\gamma`, while PCG's
and FK's fall toward zero (or the Monte Carlo floor) as :math:`K` or :math:`N` grows.

The independent axes, FK's particle systems (both parts) and Part B's samples, are split over
``config.devices`` devices (:func:`sample_devices`).

Run: ``python -m experiments.guidance_targets --config configs/guidance_targets.py``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

from experiments import common
from shufflesgd import diffusion, metrics, parallel, problems
from shufflesgd.diffusion import smc

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "guidance_targets"
CORRECTIONS = tuple(name for name in diffusion.GUIDANCE if name != "cfg")
#: Part B's two classes of two isotropic modes each: class 0 near the upper right, class 1
#: near the lower left.
MIXTURE_MEANS = ((0.0, 2.0), (2.0, 0.0), (-2.0, 0.0), (0.0, -2.0))
MIXTURE_LABELS = (0, 0, 1, 1)
MIXTURE_VARIANCE = 0.3


def validate(config: ConfigDict) -> None:
    common.check_choice("sde", config.sde, diffusion.SDES)
    for field in ("num_steps", "fk_steps", "gaussian_dim", "gaussian_systems", "mixture_samples"):
        common.check_positive_ints(field, config[field])
    for field in ("quadrature_cells", "num_directions", "floor_pairs"):
        common.check_positive_ints(field, config[field])
    if config.gaussian_systems < 2:
        raise ValueError(
            f"config.gaussian_systems must be at least 2 (standard errors), "
            f"got {config.gaussian_systems}"
        )
    scales = list(config.scales)
    if not scales or any(
        isinstance(s, bool) or not isinstance(s, (int, float)) or not np.isfinite(s) or s < 0
        for s in scales
    ):
        raise ValueError(f"config.scales must be finite numbers >= 0, got {config.scales!r}")
    if config.budget_scale not in scales:
        raise ValueError(
            f"config.budget_scale must be one of config.scales {scales}, "
            f"got {config.budget_scale!r}"
        )
    common.check_positive_ints("pcg_corrector_steps", config.pcg_corrector_steps)
    common.check_positive_number("pcg_step_scale", config.pcg_step_scale)
    if config.pcg_step_scale >= 2.0:
        raise ValueError(
            "config.pcg_step_scale must be below 2 (the Langevin step is unstable above), "
            f"got {config.pcg_step_scale!r}"
        )
    common.check_positive_ints("fk_particles", config.fk_particles)
    if not 0.0 <= config.fk_ess_threshold <= 1.0:
        raise ValueError(
            f"config.fk_ess_threshold must lie in [0, 1], got {config.fk_ess_threshold!r}"
        )
    common.check_choice("fk_resampling", config.fk_resampling, smc.RESAMPLING)
    if max(config.fk_particles) > config.mixture_samples:
        raise ValueError(
            "config.fk_particles must not exceed config.mixture_samples "
            f"({config.mixture_samples}), got {config.fk_particles!r}"
        )
    for label in config.mixture_corrections:
        name, options = common.parse_sampler("mixture_corrections", label)
        common.check_choice("mixture_corrections", name, CORRECTIONS)
        try:  # unknown options and out-of-range values, without tracing anything
            diffusion.guided_model(
                name, _untraceable_model(), 0, 2.0, sde=diffusion.make_sde("vp"), **options
            )
        except (TypeError, ValueError) as error:
            raise ValueError(f"config.mixture_corrections: {label}: {error}") from error
    if len(set(config.mixture_corrections)) != len(config.mixture_corrections):
        raise ValueError(
            f"config.mixture_corrections must not repeat, got {config.mixture_corrections!r}"
        )
    common.check_positive_number("quadrature_half_width", config.quadrature_half_width)
    sample_devices(config)


def sample_devices(config: ConfigDict) -> int:
    """How many devices the independent axes are split over: :func:`experiments.common.
    seed_devices` with, as the seeds, the greatest common divisor of their lengths,
    ``gaussian_systems``, ``mixture_samples`` and ``mixture_samples // N`` for each ``N`` of
    ``fk_particles`` (``ValueError`` naming ``config.devices`` when it is not ``None`` or a
    positive int, exceeds the devices available, or does not divide that divisor)."""
    sizes = [config.gaussian_systems, config.mixture_samples]
    sizes += [config.mixture_samples // n for n in config.fk_particles]
    label = "gcd(gaussian_systems, mixture_samples, mixture_samples // fk_particles)"
    return common.seed_devices(config, math.gcd(*sizes), label)


def _untraceable_model() -> diffusion.ConditionalModel:
    def fn(x: jax.Array, t: jax.Array, label: jax.Array) -> jax.Array:
        raise AssertionError("validation must not trace a model")

    return diffusion.ConditionalModel(fn, "score")


def gaussian_laws(config: ConfigDict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Part A's class law :math:`N(m_c, S_c)` and unconditional law :math:`N(m_u, S_u)`, drawn
    from the seed: :math:`S_c = \\frac12 FF^\\top/d + 0.1 I`, :math:`S_u = S_c + bb^\\top + 0.5I`
    with :math:`m_u = m_c - b`, :math:`b` the between-class offset."""
    rng = np.random.default_rng(config.seed)
    d = config.gaussian_dim
    factor = rng.standard_normal((d, d)) / np.sqrt(d)
    cov_c = 0.5 * factor @ factor.T + 0.1 * np.eye(d)
    mean_c = rng.standard_normal(d)
    offset = rng.standard_normal(d)
    cov_u = cov_c + np.outer(offset, offset) + 0.5 * np.eye(d)
    return mean_c, cov_c, mean_c - offset, cov_u


def powered_gaussian(
    mean_c: np.ndarray, cov_c: np.ndarray, mean_u: np.ndarray, cov_u: np.ndarray, gamma: float
) -> tuple[np.ndarray, np.ndarray]:
    """:math:`p_\\gamma \\propto N(m_c, S_c)^\\gamma N(m_u, S_u)^{1-\\gamma}`: precision
    :math:`\\gamma P_c + (1-\\gamma)P_u`, mean :math:`P^{-1}(\\gamma P_c m_c + (1-\\gamma)P_u
    m_u)`."""
    p_c, p_u = np.linalg.inv(cov_c), np.linalg.inv(cov_u)
    cov = np.linalg.inv(gamma * p_c + (1.0 - gamma) * p_u)
    return cov @ (gamma * p_c @ mean_c + (1.0 - gamma) * p_u @ mean_u), cov


def weighted_moments(x: jax.Array, log_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Self-normalised weighted mean and covariance of particles ``[N, d]``."""
    w = jax.nn.softmax(log_weights)
    mean = w @ x
    centred = x - mean
    return mean, (centred * w[:, None]).T @ centred


def feynman_kac_systems(
    key: jax.Array,
    model: diffusion.ConditionalModel,
    gamma: Any,
    sde: diffusion.SDE,
    grid: jax.Array,
    num_particles: int,
    num_systems: int,
    dim: int,
    config: ConfigDict,
    mesh: jax.sharding.Mesh,
) -> tuple[jax.Array, jax.Array, Any]:
    """``num_systems`` independent FK systems of ``num_particles`` particles aimed at
    :math:`p(x \\mid 0)^\\gamma p(x)^{1-\\gamma}`: particles ``[S, N, d]``, log-weights and info;
    the systems split over the ``"seeds"`` axis of ``mesh`` (call it inside ``jax.jit``)."""
    models = (model.given(0), model.unconditional())
    exponents = jnp.stack([jnp.asarray(gamma), 1.0 - jnp.asarray(gamma)])

    def system(index: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
        prior_key, run_key = jax.random.split(jax.random.fold_in(key, index))
        x_T = sde.prior_sample(prior_key, (num_particles, dim))
        return diffusion.feynman_kac_corrector(
            run_key,
            models,
            exponents,
            sde,
            x_T,
            grid,
            scheme=config.fk_resampling,
            ess_threshold=config.fk_ess_threshold,
            final="denoise",
        )

    split = parallel.worker_sharding(mesh, axis=common.SEEDS)
    return jax.vmap(system)(jax.lax.with_sharding_constraint(jnp.arange(num_systems), split))


def moment_kls(
    particles: jax.Array, log_weights: jax.Array, mean: jax.Array, cov: jax.Array
) -> jax.Array:
    """KL to :math:`N(\text{mean}, \text{cov})` of each system's weighted-moment Gaussian fit."""
    return jax.vmap(lambda x, lw: metrics.gaussian_kl(*weighted_moments(x, lw), mean, cov))(
        particles, log_weights
    )


def exact_draw_kls(
    key: jax.Array, mean: jax.Array, cov: jax.Array, num: int, systems: int
) -> jax.Array:
    """The same fit to ``num`` exact draws, ``systems`` times: the Monte Carlo floor."""
    draws = jax.random.multivariate_normal(key, mean, cov, (systems, num))
    return moment_kls(draws, jnp.zeros((systems, num)), mean, cov)


def pcg_step_scale(config: ConfigDict, gamma: float) -> float:
    return config.pcg_step_scale / max(gamma, 1.0)


def run_gaussian(config: ConfigDict, sde: diffusion.SDE, key: jax.Array) -> dict[str, Any]:
    """Part A: exact KL to :math:`p_\\gamma` of CFG (DDIM, DDPM) and PCG; FK by weighted
    moments, beside the moment fit of as many exact draws."""
    mean_c, cov_c, mean_u, cov_u = gaussian_laws(config)
    d = config.gaussian_dim
    law = problems.conditional_mixture(
        [1.0],
        [mean_c],
        [cov_c],
        [0],
        unconditional=problems.gaussian_mixture([1.0], [mean_u], [cov_u]),
    )
    model = diffusion.conditional_mixture_model(sde, law)
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_time", config.num_steps))
    n = config.num_steps
    mesh = parallel.worker_mesh(sample_devices(config), axis=common.SEEDS)

    cfg_law = jax.jit(
        lambda gamma, eta: diffusion.exact_gaussian_law(
            diffusion.ddim, diffusion.classifier_free_guidance(model, 0, gamma),
            sde, grid, d, 1, eta=eta,
        )
    )  # fmt: skip

    def pcg_law(steps: int) -> Any:
        law = jax.jit(
            lambda gamma, kappa: diffusion.exact_gaussian_law(
                diffusion.predictor_corrector_guidance, model, sde, grid, d, steps,
                label=0, scale=gamma, corrector_steps=steps, step_scale=kappa,
            )
        )  # fmt: skip
        return lambda gamma: law(gamma, pcg_step_scale(config, gamma))

    methods: dict[str, tuple[Any, int]] = {
        "cfg_ddim": (lambda gamma: cfg_law(gamma, 0.0), 2 * (n + 1)),
        "cfg_ddpm": (lambda gamma: cfg_law(gamma, 1.0), 2 * (n + 1)),
    }
    for steps in config.pcg_corrector_steps:
        methods[f"pcg_K{steps}"] = (pcg_law(steps), (1 + 2 * steps) * n + 2)
    rows = []
    work = [(gamma, name) for gamma in config.scales for name in methods]
    for gamma, name in tqdm(work, desc=f"{NAME} A (exact laws)"):
        target = powered_gaussian(mean_c, cov_c, mean_u, cov_u, gamma)
        function, evaluations = methods[name]
        mean, cov = function(gamma)
        kl = float(metrics.gaussian_kl(mean, cov, *map(jnp.asarray, target)))
        rows.append(dict(method=name, scale=gamma, kl=kl, kl_se=0.0, evaluations=evaluations))
    fk_rows = []
    fk_grid = jnp.asarray(diffusion.time_grid(sde, "uniform_time", config.fk_steps))
    fk = jax.jit(
        lambda k, gamma, num: feynman_kac_systems(
            k, model, gamma, sde, fk_grid, num, config.gaussian_systems, d, config, mesh
        ),
        static_argnums=2,
    )
    work = [(gamma, num) for gamma in config.scales for num in config.fk_particles]
    for gamma, num in tqdm(work, desc=f"{NAME} A (FK)"):
        target_mean, target_cov = map(
            jnp.asarray, powered_gaussian(mean_c, cov_c, mean_u, cov_u, gamma)
        )
        fk_key = jax.random.fold_in(jax.random.fold_in(key, num), int(round(1000 * gamma)))
        particles, log_weights, info = fk(fk_key, gamma, num)
        kls = moment_kls(particles, log_weights, target_mean, target_cov)
        exact = exact_draw_kls(
            jax.random.fold_in(fk_key, 1), target_mean, target_cov, num, config.gaussian_systems
        )
        kl, kl_se = common.mean_and_stderr(kls)
        floor, floor_se = common.mean_and_stderr(exact)
        fk_rows.append(
            dict(
                method=f"fk_N{num}",
                particles=num,
                scale=gamma,
                kl=float(kl),
                kl_se=float(kl_se),
                exact_draws_kl=float(floor),
                exact_draws_kl_se=float(floor_se),
                evaluations=int(np.asarray(info.nfe).max()),
                min_ess=float(np.asarray(info.ess).min()),
                mean_resamplings=float(np.asarray(info.num_resampling).mean()),
                nonfinite_systems=int(np.sum(np.asarray(info.nonfinite_step) >= 0)),
            )
        )
    return dict(rows=rows, fk_rows=fk_rows)


def mixture_law(config: ConfigDict) -> problems.ConditionalMixture:
    covariances = np.repeat(MIXTURE_VARIANCE * np.eye(2)[None], len(MIXTURE_MEANS), axis=0)
    weights = np.full(len(MIXTURE_MEANS), 1.0 / len(MIXTURE_MEANS))
    return problems.conditional_mixture(weights, MIXTURE_MEANS, covariances, MIXTURE_LABELS)


def quadrature_samples(
    key: jax.Array, law: problems.ConditionalMixture, gamma: float, num: int, config: ConfigDict
) -> jax.Array:
    """Exact draws of :math:`p_\\gamma \\propto p(x \\mid 0)^\\gamma p(x)^{1-\\gamma}` up to
    the cell size: a cell of the quadrature grid by its mass, then a uniform point in it."""
    cells, half = config.quadrature_cells, config.quadrature_half_width
    width = 2.0 * half / cells
    centres = -half + width * (jnp.arange(cells) + 0.5)
    points = jnp.stack(jnp.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)
    log_c = jax.vmap(law.conditional(0).log_prob)(points)
    log_u = jax.vmap(law.unconditional.log_prob)(points)
    log_mass = gamma * log_c + (1.0 - gamma) * log_u
    cumulative = jnp.cumsum(jax.nn.softmax(log_mass))
    cell_key, jitter_key = jax.random.split(key)
    uniforms = jax.random.uniform(cell_key, (num,)) * cumulative[-1]
    index = jnp.minimum(jnp.searchsorted(cumulative, uniforms), points.shape[0] - 1)
    return points[index] + width * (jax.random.uniform(jitter_key, (num, 2)) - 0.5)


def run_mixture(config: ConfigDict, sde: diffusion.SDE, key: jax.Array) -> dict[str, Any]:
    """Part B: sliced W2 to exact draws of :math:`p_\\gamma` on the class-conditional mixture."""
    law = mixture_law(config)
    model = diffusion.conditional_mixture_model(sde, law)
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_time", config.num_steps))
    n, num = config.num_steps, config.mixture_samples
    directions = metrics.random_directions(jax.random.fold_in(key, 1), config.num_directions, 2)
    mesh = parallel.worker_mesh(sample_devices(config), axis=common.SEEDS)
    # the samples (rows) split over the devices: each row is sampled with its own key
    prior = common.shard_seeds(sde.prior_sample(jax.random.fold_in(key, 2), (num, 2)), mesh)
    sample_key = jax.random.fold_in(key, 3)

    def guided_run(method: str, options: dict[str, Any]) -> Any:
        def sample(gamma: jax.Array, eta: jax.Array) -> jax.Array:
            guided = diffusion.guided_model(method, model, 0, gamma, sde=sde, **options)
            return diffusion.sample_batch(
                diffusion.ddim, sample_key, guided, sde, prior, grid, eta=eta
            )[0]

        return jax.jit(sample)

    def pcg_run(steps: int) -> Any:
        run = jax.jit(
            lambda gamma, kappa: diffusion.sample_batch(
                diffusion.predictor_corrector_guidance, sample_key, model, sde, prior, grid,
                label=0, scale=gamma, corrector_steps=steps, step_scale=kappa,
            )[0]
        )  # fmt: skip
        return lambda gamma: run(gamma, pcg_step_scale(config, gamma))

    cfg = guided_run("cfg", {})
    runs: dict[str, tuple[Any, int]] = {
        "cfg_ddim": (lambda gamma: cfg(gamma, 0.0), 2 * (n + 1)),
        "cfg_ddpm": (lambda gamma: cfg(gamma, 1.0), 2 * (n + 1)),
    }
    for label in config.mixture_corrections:
        name, options = common.parse_sampler("mixture_corrections", label)
        correction = guided_run(name, options)
        runs[f"{label} ddim"] = (
            lambda gamma, correction=correction: correction(gamma, 0.0),
            2 * (n + 1),
        )
    for steps in config.pcg_corrector_steps:
        runs[f"pcg_K{steps}"] = (pcg_run(steps), (1 + 2 * steps) * n + 2)
    fk_grid = jnp.asarray(diffusion.time_grid(sde, "uniform_time", config.fk_steps))
    fk = jax.jit(
        lambda k, gamma, particles: feynman_kac_systems(
            k, model, gamma, sde, fk_grid, particles, num // particles, 2, config, mesh
        ),
        static_argnums=2,
    )
    rows, pictures = [], {}
    fk_names = [f"fk_N{particles}" for particles in config.fk_particles]
    work = [(g, name) for g in config.scales for name in (*runs, *fk_names)]
    exact = jax.jit(lambda k, gamma: quadrature_samples(k, law, gamma, num, config))
    references = {
        gamma: exact(
            jax.random.fold_in(jax.random.fold_in(key, 4), int(round(1000 * gamma))), gamma
        )
        for gamma in config.scales
    }
    for gamma, name in tqdm(work, desc=f"{NAME} B (mixture)"):
        fk_key = jax.random.fold_in(jax.random.fold_in(key, 5), int(round(1000 * gamma)))
        reference = references[gamma]
        extra: dict[str, Any] = {}
        if name.startswith("fk_N"):
            particles = int(name[4:])
            x, log_weights, info = fk(jax.random.fold_in(fk_key, particles), gamma, particles)
            keys = jax.random.split(jax.random.fold_in(fk_key, 2000 + particles), x.shape[0])
            x = jax.vmap(diffusion.resample_final)(keys, x, log_weights).reshape(-1, 2)
            evaluations = int(np.asarray(info.nfe).max())
            extra = dict(
                particles=particles,
                min_ess=float(np.asarray(info.ess).min()),
                mean_resamplings=float(np.asarray(info.num_resampling).mean()),
            )
            reference = reference[: x.shape[0]]
        else:
            function, evaluations = runs[name]
            x = function(gamma)
        finite = bool(jnp.all(jnp.isfinite(x)))
        distance = float(metrics.sliced_w2(x, reference, directions)) if finite else float("nan")
        rows.append(
            dict(method=name, scale=gamma, sliced_w2=distance, evaluations=evaluations, **extra)
        )
        if gamma == config.budget_scale:
            pictures[name] = np.asarray(x[:1024])
            pictures["exact"] = np.asarray(reference[:1024])
    floors, floor_ses = {}, {}
    for gamma in config.scales:
        gamma_key = jax.random.fold_in(jax.random.fold_in(key, 10), int(round(1000 * gamma)))
        pairs = []
        for pair in range(config.floor_pairs):
            pair_key = jax.random.fold_in(gamma_key, pair)
            first, second = (exact(jax.random.fold_in(pair_key, i), gamma) for i in range(2))
            pairs.append(metrics.sliced_w2(first, second, directions))
        floors[str(gamma)], floor_ses[str(gamma)] = map(float, common.mean_and_stderr(pairs))
    return dict(
        rows=rows,
        exact_draws_sliced_w2=floors,
        exact_draws_sliced_w2_se=floor_ses,
        pictures=pictures,
    )


def run(config: ConfigDict) -> dict[str, Any]:
    """Run both parts; write metrics, CSVs, table and figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    sde = diffusion.make_sde(config.sde)
    folder = common.results_folder(config, NAME)
    key = jax.random.key(config.seed)
    gaussian = run_gaussian(config, sde, jax.random.fold_in(key, 0))
    mixture = run_mixture(config, sde, jax.random.fold_in(key, 1))
    pictures = mixture.pop("pictures")
    # the independent axes were split over these devices
    results = dict(devices=sample_devices(config), gaussian=gaussian, mixture=mixture)
    common.write_csv(
        folder / "gaussian_kl.csv",
        ["method", "scale", "kl", "kl_se", "evaluations"],
        [
            [r["method"], r["scale"], r["kl"], r["kl_se"], r["evaluations"]]
            for r in gaussian["rows"] + gaussian["fk_rows"]
        ],
    )
    common.write_csv(
        folder / "mixture_sliced_w2.csv",
        ["method", "scale", "sliced_w2", "evaluations"],
        [[r["method"], r["scale"], r["sliced_w2"], r["evaluations"]] for r in mixture["rows"]],
    )
    table = format_table(config, results)
    return common.finish(folder, table, results, lambda path: draw(config, results, pictures, path))


def format_table(config: ConfigDict, results: dict[str, Any]) -> str:
    lines = [
        f"Part A: KL(output || p_gamma), p_gamma ∝ p(x|c)^gamma p(x)^(1-gamma), Gaussian in "
        f"{config.gaussian_dim}-D, {config.sde}, {config.num_steps} steps; exact laws (FK: "
        f"weighted-moment fit, {config.fk_steps} steps, mean ± SE over {config.gaussian_systems} "
        "systems, beside the same fit to as many exact draws)",
        f"{'method':22s} {'gamma':>6s} {'evals':>6s} {'KL':>22s} {'exact draws':>22s}",
    ]
    for r in results["gaussian"]["rows"]:
        lines.append(f"{r['method']:22s} {r['scale']:6g} {r['evaluations']:6d} {r['kl']:12.4g}")
    for r in results["gaussian"]["fk_rows"]:
        lines.append(
            f"{r['method']:22s} {r['scale']:6g} {r['evaluations']:6d} "
            f"{r['kl']:10.4g} ± {r['kl_se']:<9.2g} {r['exact_draws_kl']:10.4g} ± "
            f"{r['exact_draws_kl_se']:.2g}   min ESS {r['min_ess']:.1f}, "
            f"{r['mean_resamplings']:.1f} resamplings"
        )
    floors = results["mixture"]["exact_draws_sliced_w2"]
    ses = results["mixture"]["exact_draws_sliced_w2_se"]
    lines += [
        "",
        f"Part B: sliced W2 to exact draws of p_gamma (quadrature), 2-D two-class mixture, "
        f"{config.mixture_samples} samples; exact-vs-exact: "
        + ", ".join(f"gamma={g}: {v:.4f} ± {ses[g]:.4f}" for g, v in floors.items()),
        f"{'method':34s} {'gamma':>6s} {'evals':>6s} {'sliced W2':>10s}",
    ]
    for r in results["mixture"]["rows"]:
        lines.append(
            f"{r['method']:34s} {r['scale']:6g} {r['evaluations']:6d} {r['sliced_w2']:10.4f}"
        )
    return "\n".join(lines)


def draw(
    config: ConfigDict, results: dict[str, Any], pictures: dict[str, np.ndarray], path: Any
) -> None:
    """Six panels: Part A's KL against γ, against PCG's evaluations and against FK's particles;
    Part B's sliced W2 against γ and two scatter plots of samples at ``budget_scale``."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    gaussian, mixture = results["gaussian"], results["mixture"]
    axis = axes[0, 0]
    names = dict.fromkeys(r["method"] for r in gaussian["rows"])
    for name in names:
        mine = [r for r in gaussian["rows"] if r["method"] == name]
        x, y, _, dropped = common.finite_curve([r["scale"] for r in mine], [r["kl"] for r in mine])
        axis.plot(x, y, marker="o", label=common.not_shown(name, dropped))
    largest = max(config.fk_particles)
    mine = [r for r in gaussian["fk_rows"] if r["particles"] == largest]
    x, y, se, dropped = common.finite_curve(
        [r["scale"] for r in mine], [r["kl"] for r in mine], [r["kl_se"] for r in mine]
    )
    axis.errorbar(
        x, y, se, marker="s", capsize=3, label=common.not_shown(f"fk_N{largest}", dropped)
    )
    axis.set(
        yscale="log",
        xlabel="guidance scale γ",
        ylabel="KL(output ‖ p_γ) [nats]",
        title="A: Gaussian class, exact laws",
    )
    axis = axes[0, 1]
    budget = config.budget_scale
    pcg = [r for r in gaussian["rows"] if r["method"].startswith("pcg") and r["scale"] == budget]
    x, y, _, dropped = common.finite_curve([r["evaluations"] for r in pcg], [r["kl"] for r in pcg])
    axis.plot(x, y, marker="o", label=common.not_shown("PCG (K corrector steps)", dropped))
    for r in gaussian["rows"]:
        if r["method"].startswith("cfg") and r["scale"] == budget:
            common.log_level(axis, r["kl"], ls="--", color="C3" if "ddim" in r["method"] else "C4")
            axis.plot(
                [], [], ls="--", color="C3" if "ddim" in r["method"] else "C4", label=r["method"]
            )
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="network evaluations per sample",
        ylabel="KL(output ‖ p_γ) [nats]",
        title=f"A: PCG's budget at γ = {budget:g}",
    )
    axis = axes[0, 2]
    fk = [r for r in gaussian["fk_rows"] if r["scale"] == budget]
    x, y, se, dropped = common.finite_curve(
        [r["particles"] for r in fk], [r["kl"] for r in fk], [r["kl_se"] for r in fk]
    )
    axis.errorbar(x, y, se, marker="s", capsize=3, label=common.not_shown("FK correctors", dropped))
    x, y, se, _ = common.finite_curve(
        [r["particles"] for r in fk],
        [r["exact_draws_kl"] for r in fk],
        [r["exact_draws_kl_se"] for r in fk],
    )
    axis.errorbar(x, y, se, marker="x", ls=":", color="0.4", capsize=3, label="as many exact draws")
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="particles per system N",
        ylabel="KL(moment fit ‖ p_γ) [nats]",
        title=f"A: FK's budget at γ = {budget:g}",
    )
    axis = axes[1, 0]
    for name in dict.fromkeys(r["method"] for r in mixture["rows"]):
        mine = [r for r in mixture["rows"] if r["method"] == name]
        x, y, _, dropped = common.finite_curve(
            [r["scale"] for r in mine], [r["sliced_w2"] for r in mine]
        )
        axis.plot(x, y, marker="o", label=common.not_shown(name, dropped))
    floors = mixture["exact_draws_sliced_w2"]
    axis.plot(
        [float(g) for g in floors],
        list(floors.values()),
        ls=":",
        color="0.4",
        label="exact vs exact",
    )
    axis.set(
        yscale="log",
        xlabel="guidance scale γ",
        ylabel="sliced W2 to exact draws of p_γ",
        title="B: two-class mixture",
    )
    exact = pictures.get("exact")
    for axis, names in zip(
        axes[1, 1:], (("cfg_ddim", "cfg_ddpm"), _budget_names(config)), strict=True
    ):
        if exact is not None:
            axis.scatter(exact[:, 0], exact[:, 1], s=2, color="0.7", label="exact p_γ")
        for name in names:
            if name in pictures:
                axis.scatter(pictures[name][:, 0], pictures[name][:, 1], s=2, label=name)
        axis.set(
            xlabel="x₁",
            ylabel="x₂",
            title=f"B: samples at γ = {budget:g}",
            aspect="equal",
        )
    for axis in axes.flat:
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, markerscale=3 if axis in axes[1, 1:] else 1)
    common.save_figure(fig, path)


def _budget_names(config: ConfigDict) -> tuple[str, str]:
    return f"pcg_K{max(config.pcg_corrector_steps)}", f"fk_N{max(config.fk_particles)}"


if __name__ == "__main__":
    common.main(run, validate)
