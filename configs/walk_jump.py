"""Config for experiments/walk_jump.py.

Variants: ``configs/walk_jump.py`` (both mixtures and the 10-D funnel, every sampler) and
``configs/walk_jump.py:quick`` (the 2-D mixture and the 5-D funnel, fewer chains and a smaller
budget; the test runs it).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    # Tuples, so that --config.samplers='("ula","walk_jump")' overrides them from the command line.
    config.problems = ("mixture_2d", "mixture_high_dim", "funnel")
    config.samplers = (
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
    config.funnel_samplers = ("exact", "mala", "hmc", "walk_jump_mc", "follmer", "ensemble")
    # the mixtures: isotropic components N(mu_k, component_std^2 I), neighbouring means `separation`
    # apart
    config.weights = (0.4, 0.3, 0.2, 0.1)
    config.component_std = 0.5
    config.separation = 8.0  # 16 component standard deviations: no Langevin chain crosses
    config.high_dim = 8  # dimension of the second mixture (means on a regular simplex)
    config.start_mode = 0  # every chain starts at this component's mean
    # equal budget: evaluations per chain (gradients of log p or log p_sigma, or log-density values)
    config.budget = 8192
    config.samples_per_chain = 64  # kept (thinned) samples of ULA, MALA and walk-jump; exact draws
    config.num_chains = 128  # all vmapped in one call per (problem, sampler)
    config.num_groups = 8  # chains pooled in groups for W2 (mean +- SE over groups)
    config.w2_points = 256  # points per group on each side of the exact-assignment W2
    # samplers
    config.ula_step_size = 0.05  # against component variance 0.25: stable, small bias
    config.mala_step_size = 0.05
    config.sigma = 2.0  # walk-jump smoothing; p_sigma's modes are bridged at this scale
    config.walk_step_fraction = (
        0.5  # walk step h = walk_step_fraction * sigma^2 (p_sigma is 1/sigma^2-smooth)
    )
    config.mc_samples = 16  # log-density evaluations per Monte-Carlo score (walk_jump_mc, follmer)
    config.num_measurements = 16  # chain of log-concave chains: m (jump noise sigma/sqrt(m))
    config.steps_per_measurement = 8
    config.follmer_steps = 16  # Euler steps of the Föllmer sampler
    config.follmer_scale = (
        4.0  # reference N(0, follmer_scale^2 I): the sampler runs on u = x / scale
    )
    config.visit_radius = (
        2.0  # a mode is visited by a sample within 2 RMS radii of its mean (and assigned to it)
    )
    # walkers per ensemble, each one of the chains; must divide num_chains / num_groups
    config.ensemble_size = 16
    # Neal's funnel: v ~ N(0, funnel_scale^2), x_i | v ~ N(0, e^v); chains start at the origin
    config.funnel_dim = 10  # Neal's example
    config.funnel_scale = 3.0
    config.funnel_sigma = 0.25  # walk-jump smoothing on the funnel (walk_jump_mc and ensemble)
    config.funnel_mala_step_size = 0.05
    config.funnel_hmc_step_size = 0.1
    config.funnel_leapfrog = 8  # leapfrog steps (gradients) per HMC step
    config.seed = 0
    # Devices the chains are split over (the first k), whole ensembles on one device; None: all
    # of them, or the most of them that the units (num_chains, or num_chains / ensemble_size
    # ensembles when the ensemble runs) split evenly over.
    config.devices = config_dict.placeholder(int)
    config.x64 = True
    config.results_dir = "results"
    if variant == "quick":
        config.problems = ("mixture_2d", "funnel")
        config.funnel_dim = 5
        # MALA, the fresh-draw walk-jump and Föllmer on the funnel only in the full run (each
        # compile costs the test seconds)
        config.funnel_samplers = ("exact", "hmc", "ensemble")
        config.ensemble_size = 8
        config.budget = 4096
        config.samples_per_chain = 32
        config.num_chains = 32
        config.num_groups = 4
        config.w2_points = 128
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
