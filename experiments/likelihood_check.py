r"""The probability-flow ODE log-likelihood equals the exact log-density; the Hutchinson
estimate is unbiased within its error bars; bits/dim reported.

On Gaussian mixtures the score of every marginal :math:`p_t` is closed-form
(:meth:`shufflesgd.problems.GaussianMixture.diffuse`; evaluated here in each component's
eigenbasis, :class:`shufflesgd.problems.EigenMixture`), so the probability-flow ODE maps
:math:`p_{t_{max}}` onto :math:`p_{t_{min}}` exactly and
:func:`shufflesgd.likelihood.log_likelihood` (Song et al. 2021, Sec. 4.3, App. D.2) must
return

.. math:: \log p_{t_{min}}(x) - \bigl[\log p_{t_{max}}(x_T) - \log\pi(x_T)\bigr]

with :math:`\pi` the process's prior and :math:`x_T` the ODE's end point: the bracket, the
*prior mismatch*, is computed exactly too, so what remains, ``solver_error``, is the ODE
solver's error alone.  For each problem (a 2-D mixture and a ``high_dim``-D one with
``num_components`` random anisotropic components) and each process (VP, VE), the test
points are ``num_points`` draws from :math:`p_{t_{min}}`:

* ``exact``: :math:`\log p_{t_{min}}(x)` in closed form;
* ``ode``: the ODE result with the exact divergence (trace of the Jacobian);
* ``hutchinson``: ``num_probes`` independent solves per point, each with one probe held
  fixed over the solve (Grathwohl et al. 2019; the probes vmapped in one jitted call, split
  over ``config.devices`` devices, :func:`probe_devices`), their mean ± standard error, and the
  pooled bias against ``ode`` (mean over points of the per-point bias, with its standard
  error from the per-point standard errors) as a z-score;
* NFE (evaluations of the augmented vector field, Dopri5) and bits/dim
  :math:`-\log p/(d\log 2)` (continuous data: no dequantisation offset).

Checks, written to ``metrics.json`` and printed: ``max |solver_error| <=
config.agreement_tol_nats`` and ``|pooled z| <= config.z_threshold`` for every (problem,
process).  Per-point z-scores are reported too (about 95% should lie within 2).

Run: ``python -m experiments.likelihood_check --config configs/likelihood_check.py``
(``:quick`` for the short variant; override any field with ``--config.<field>=<value>``).
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
from shufflesgd import diffusion, parallel, problems

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAME = "likelihood_check"
PROBLEMS = ("mixture_2d", "mixture_high_dim")
SDES = ("vp", "ve")


def validate(config: ConfigDict) -> None:
    """Check every field before anything is built or compiled."""
    if not list(config.problems):
        raise ValueError("config.problems must name at least one problem")
    for name in config.problems:
        common.check_choice("problems", name, PROBLEMS)
    if not list(config.sdes):
        raise ValueError("config.sdes must name at least one process")
    for name in config.sdes:
        common.check_choice("sdes", name, SDES)
    common.check_choice("probe", config.probe, diffusion.PROBES)
    for field in ("high_dim", "num_components", "num_points", "max_steps"):
        common.check_positive_ints(field, config[field])
    common.check_positive_ints("num_probes", config.num_probes)
    if config.num_probes < 2:
        raise ValueError(
            "config.num_probes must be at least 2 (a standard error needs two), "
            f"got {config.num_probes}"
        )
    for field in ("rtol", "atol", "agreement_tol_nats", "z_threshold"):
        common.check_positive_number(field, config[field])
    probe_devices(config)


def probe_devices(config: ConfigDict) -> int:
    """How many devices the ``config.num_probes`` Hutchinson solves are split over:
    :func:`experiments.common.seed_devices` with the probes as the seeds (``ValueError`` naming
    ``config.devices`` when it is not ``None`` or a positive int, exceeds the devices available,
    or does not divide ``config.num_probes``)."""
    return common.seed_devices(config, config.num_probes, "config.num_probes")


def build_problem(name: str, config: ConfigDict) -> problems.GaussianMixture:
    """The 2-D mixture, or ``num_components`` random anisotropic Gaussians in ``high_dim``
    dimensions."""
    if name == "mixture_2d":
        return problems.gaussian_mixture(
            [0.3, 0.7],
            [[-2.0, 0.0], [2.0, 1.0]],
            [[[0.3, 0.1], [0.1, 0.2]], [[0.4, -0.15], [-0.15, 0.3]]],
        )
    return problems.random_gaussian_mixture(
        config.data_seed, config.num_components, config.high_dim
    )


def hutchinson_solves(
    key: jax.Array, model: diffusion.Model, sde: diffusion.SDE, xs: jax.Array, config: ConfigDict
) -> diffusion.LikelihoodResult:
    """``config.num_probes`` Hutchinson solves of every point of ``xs`` (probe ``j``, point
    ``i``: key ``fold_in(fold_in(key, j), i)``), results ``[num_probes, num_points]``: the
    probes vmapped in one jitted call, split over the devices of :func:`probe_devices`."""
    options = dict(rtol=config.rtol, atol=config.atol, max_steps=config.max_steps)
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(config.num_probes))
    mesh = parallel.worker_mesh(probe_devices(config), axis=common.SEEDS)

    @jax.jit
    def run(keys: jax.Array, xs: jax.Array) -> diffusion.LikelihoodResult:
        return jax.vmap(
            lambda k: diffusion.log_likelihood_batch(
                k, model, sde, xs, divergence="hutchinson", probe=config.probe, **options
            )
        )(keys)

    return run(common.shard_seeds(keys, mesh), xs)


def check_one(
    problem: str, sde_name: str, law: problems.GaussianMixture, config: ConfigDict, key: jax.Array
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Exact, ODE and Hutchinson log-likelihoods of the test points of one (problem, process)."""
    sde = diffusion.make_sde(sde_name)
    eigen = law.eigen()
    model = diffusion.mixture_model(sde, eigen)
    a_min, s_min = sde.alpha(sde.t_min), sde.sigma(sde.t_min)
    a_max, s_max = sde.alpha(sde.t_max), sde.sigma(sde.t_max)
    point_key, probe_key = jax.random.split(key)
    xs = law.diffuse(a_min, s_min).sample(point_key, config.num_points)
    options = dict(rtol=config.rtol, atol=config.atol, max_steps=config.max_steps)

    @jax.jit
    def exact_run(xs):
        return diffusion.log_likelihood_batch(
            probe_key, model, sde, xs, divergence="exact", **options
        )

    ode = exact_run(xs)
    hutch = hutchinson_solves(jax.random.fold_in(probe_key, 1), model, sde, xs, config)
    exact = np.asarray(jax.vmap(lambda x: eigen.log_prob(x, a_min, s_min))(xs))
    ode_lp = np.asarray(ode.log_prob_nats)
    mismatch = np.asarray(
        jax.vmap(lambda x: eigen.log_prob(x, a_max, s_max))(ode.latent) - ode.prior_log_prob
    )
    solver_error = ode_lp + mismatch - exact
    estimates = np.asarray(hutch.log_prob_nats)  # [num_probes, num_points]
    h_mean, h_se = common.mean_and_stderr(estimates)
    bias = h_mean - ode_lp
    pooled_bias = float(bias.mean())
    pooled_se = float(np.sqrt(np.sum(h_se**2)) / config.num_points)
    pooled_z = pooled_bias / pooled_se if pooled_se > 0 else float("nan")
    point_z = np.where(h_se > 0, bias / np.where(h_se > 0, h_se, 1.0), np.nan)
    dim = law.dim
    to_bits = 1.0 / (dim * math.log(2.0))
    result = {
        "dim": dim,
        "num_points": config.num_points,
        "num_probes": config.num_probes,
        "all_solves_succeeded": bool(np.all(ode.success) and np.all(hutch.success)),
        "exact_log_prob_mean": float(exact.mean()),
        "ode_log_prob_mean": float(ode_lp.mean()),
        "max_abs_ode_minus_exact": float(np.max(np.abs(ode_lp - exact))),
        "max_abs_prior_mismatch": float(np.max(np.abs(mismatch))),
        "max_abs_solver_error": float(np.max(np.abs(solver_error))),
        "hutchinson_mean_log_prob": float(h_mean.mean()),
        "hutchinson_bias": pooled_bias,
        "hutchinson_bias_se": pooled_se,
        "hutchinson_z": pooled_z,
        "hutchinson_single_probe_std_mean": float(estimates.std(axis=0, ddof=1).mean()),
        "max_abs_point_z": float(np.nanmax(np.abs(point_z))),
        "fraction_points_within_2se": float(np.mean(np.abs(point_z) <= 2.0)),
        "nfe_exact_mean": float(np.mean(ode.nfe)),
        "nfe_hutchinson_mean": float(np.mean(hutch.nfe)),
        "bits_per_dim_exact_mean": float(-exact.mean() * to_bits),
        "bits_per_dim_ode_mean": float(np.mean(ode.bits_per_dim)),
        "bits_per_dim_hutchinson_mean": float(np.mean(hutch.bits_per_dim)),
    }
    result["checks"] = {
        "ode_within_tolerance": bool(result["max_abs_solver_error"] <= config.agreement_tol_nats),
        "hutchinson_unbiased": bool(abs(pooled_z) <= config.z_threshold),
        "all_solves_succeeded": result["all_solves_succeeded"],
    }
    arrays = {
        "exact": exact,
        "ode": ode_lp,
        "mismatch": mismatch,
        "solver_error": solver_error,
        "h_mean": h_mean,
        "h_se": h_se,
        "point_z": point_z,
        "nfe_exact": np.asarray(ode.nfe),
        "nfe_hutchinson": np.asarray(hutch.nfe).mean(axis=0),
        "single_probe_errors": (estimates - ode_lp[None, :]).ravel(),
        "bits_ode": np.asarray(ode.bits_per_dim),
    }
    return result, arrays


def draw(per_combo: dict[str, dict[str, np.ndarray]], config: ConfigDict, path) -> None:
    fig, (scatter, hist, zs) = plt.subplots(1, 3, figsize=(15, 4.4))
    lo, hi = np.inf, -np.inf
    for label, a in per_combo.items():
        scatter.scatter(a["exact"], a["ode"], s=10, label=label)
        lo, hi = (
            min(lo, a["exact"].min(), a["ode"].min()),
            max(hi, a["exact"].max(), a["ode"].max()),
        )
        errors = a["single_probe_errors"]
        scale = np.std(errors) if np.std(errors) > 0 else 1.0
        hist.hist(
            errors / scale,
            bins=40,
            histtype="step",
            density=True,
            label=f"{label} (sd {scale:.2g})",
        )
        zs.scatter(np.arange(len(a["point_z"])), a["point_z"], s=10, label=label, zorder=3)
    scatter.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    scatter.set(
        xlabel="exact log p_tmin(x) [nats]",
        ylabel="PF-ODE log p (exact divergence)",
        title="ODE vs exact (off by the prior mismatch only)",
    )
    grid = np.linspace(-4, 4, 200)
    hist.plot(grid, np.exp(-(grid**2) / 2) / np.sqrt(2 * np.pi), "k:", lw=0.8, label="N(0, 1)")
    hist.set(
        xlabel="single-probe Hutchinson error / its sd",
        ylabel="density",
        title=f"Hutchinson ({config.probe}) minus exact divergence",
    )
    zs.axhspan(-2, 2, color="0.9", zorder=0)
    zs.axhline(0, color="k", lw=0.8)
    zs.set(
        xlabel="test point",
        ylabel="(Hutchinson mean - ODE) / SE",
        title=f"per-point bias z-scores, {config.num_probes} probes",
    )
    for axis in (scatter, hist, zs):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    common.save_figure(fig, path)


def format_table(metrics: dict[str, Any]) -> str:
    header = (
        "problem/sde",
        "d",
        "exact logp",
        "ODE logp",
        "max|ODE-ex|",
        "max|solver|",
        "Hutch mean",
        "bias ± SE",
        "z",
        "NFE ex",
        "NFE hu",
        "bits/dim",
        "ok",
    )
    lines = [
        (
            "{:22s} {:>3s} {:>10s} {:>10s} {:>11s} {:>11s} {:>10s} {:>21s} "
            "{:>6s} {:>6s} {:>6s} {:>8s} {:>3s}"
        ).format(*header)
    ]
    for label, r in metrics["combos"].items():
        ok = "yes" if all(r["checks"].values()) else "NO"
        lines.append(
            f"{label:22s} {r['dim']:3d} {r['exact_log_prob_mean']:10.4f} "
            f"{r['ode_log_prob_mean']:10.4f} "
            f"{r['max_abs_ode_minus_exact']:11.2e} {r['max_abs_solver_error']:11.2e} "
            f"{r['hutchinson_mean_log_prob']:10.4f} {r['hutchinson_bias']:+10.2e} "
            f"± {r['hutchinson_bias_se']:8.2e} "
            f"{r['hutchinson_z']:+6.2f} {r['nfe_exact_mean']:6.0f} {r['nfe_hutchinson_mean']:6.0f} "
            f"{r['bits_per_dim_ode_mean']:8.4f} {ok:>3s}"
        )
    lines.append(
        "(means over test points; |solver| = |ODE + prior mismatch - exact| <= "
        f"{metrics['tolerances']['agreement_tol_nats']:g}"
        f" nats; |z| <= {metrics['tolerances']['z_threshold']:g}; bits/dim without dequantisation)"
    )
    return "\n".join(lines)


def run(config: ConfigDict) -> dict[str, Any]:
    """Run the check; return the metrics and write them, the table, the CSV and the figure."""
    validate(config)
    jax.config.update("jax_enable_x64", bool(config.x64))
    laws = {name: build_problem(name, config) for name in config.problems}
    folder = common.results_folder(config, NAME)
    metrics: dict[str, Any] = {
        "devices": probe_devices(config),  # the probe axis was split over these
        "tolerances": {
            "agreement_tol_nats": config.agreement_tol_nats,
            "z_threshold": config.z_threshold,
            "rtol": config.rtol,
            "atol": config.atol,
        },
        "combos": {},
    }
    per_combo: dict[str, dict[str, np.ndarray]] = {}
    rows = []
    base = jax.random.key(config.seed)
    combos = [(p, s) for p in config.problems for s in config.sdes]
    for index, (problem, sde_name) in enumerate(tqdm(combos, desc=NAME)):
        label = f"{problem}/{sde_name}"
        result, arrays = check_one(
            problem, sde_name, laws[problem], config, jax.random.fold_in(base, index)
        )
        metrics["combos"][label] = result
        per_combo[label] = arrays
        for i in range(config.num_points):
            rows.append(
                [
                    problem,
                    sde_name,
                    i,
                    arrays["exact"][i],
                    arrays["ode"][i],
                    arrays["mismatch"][i],
                    arrays["solver_error"][i],
                    arrays["h_mean"][i],
                    arrays["h_se"][i],
                    arrays["point_z"][i],
                    arrays["nfe_exact"][i],
                    arrays["nfe_hutchinson"][i],
                    arrays["bits_ode"][i],
                ]
            )
    metrics["all_checks_passed"] = all(
        all(r["checks"].values()) for r in metrics["combos"].values()
    )
    table = format_table(metrics)
    common.write_csv(
        folder / "points.csv",
        [
            "problem",
            "sde",
            "point",
            "exact_log_prob",
            "ode_log_prob",
            "prior_mismatch",
            "solver_error",
            "hutchinson_mean",
            "hutchinson_se",
            "z",
            "nfe_exact",
            "nfe_hutchinson_mean",
            "bits_per_dim_ode",
        ],
        rows,
    )
    print(f"all checks passed: {metrics['all_checks_passed']}")
    return common.finish(folder, table, metrics, lambda path: draw(per_combo, config, path))


if __name__ == "__main__":
    common.main(run, validate)
