"""Config for experiments/sampler_nfe.py.

Variants: ``configs/sampler_nfe.py`` (the full study, VP), ``configs/sampler_nfe.py:flow``
(the same on the rectified flow, :class:`shufflesgd.diffusion.RectifiedFlow`) and
``configs/sampler_nfe.py:quick`` (fewer samplers, budgets, seeds and samples; the test runs it).
A sampler entry is a registered name or a name with options, ``"unipc(order=3)"``.
"""

from ml_collections import ConfigDict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    # the forward process of both parts ("vp", "subvp", "ve", "edm", "flow", "trig")
    config.sde = "vp"
    # Tuples, so that --config.nfe_budgets='(5,10,20)' overrides them from the command line.
    config.grids = ("uniform_time", "quadratic_time", "uniform_log_snr", "karras")
    # Part A: exact laws on one anisotropic Gaussian (every sampler affine in its inputs)
    config.gaussian_samplers = (
        "euler_maruyama",
        "reverse_diffusion",
        "ancestral",
        "ddim",
        "pf_ode_euler",
        "pf_ode_heun",
        "dpm_solver_pp_2m",
        "dpm_solver_pp_3m",
        "unipc(corrector=False)",  # UniP-2
        "unipc",  # UniPC-2 (diffusers' default)
        "unipc(order=3)",
        "dpm_solver_v3",  # exact model statistics of the Gaussian (the study computes them)
        "dpm_solver_v3(use_corrector=False)",
        "dpm_solver_pp_hb",
        "ghvb",
        "edm_heun",
        "restart",
    )
    config.ems_num_lambdas = 2001  # DPM-Solver-v3's statistics grid (half log-SNRs)
    # each sampler takes the most steps within each budget
    config.nfe_budgets = (5, 6, 8, 10, 20, 40, 80, 160, 320)
    config.gaussian_dim = 8
    config.gaussian_var_min = 0.01  # covariance eigenvalues, log-spaced, in a random rotation
    config.gaussian_var_max = 4.0
    config.gaussian_mean_norm = 3.0  # |mean|, in a random direction
    config.floor_factor = (
        10.0  # order fits use only points with KL >= floor_factor * KL(prior || p_T)
    )
    config.fit_points = 4  # ... and of those the (at most) fit_points largest budgets
    # Part B: Monte Carlo on mixtures, all seeds in one vmapped call
    config.mixtures = ("mixture_2d", "mixture_high_dim")
    config.high_dim = 64
    config.num_components = 4  # of the high-dimensional mixture
    config.mixture_samplers = (
        "euler_maruyama",
        "ancestral",
        "predictor_corrector",
        "ddim",
        "pf_ode_heun",
        "dpm_solver_pp_2m",
        "unipc",
        "dpm_solver_pp_hb",
        "edm_heun",
        "restart",
    )
    config.mixture_grid = "uniform_log_snr"
    config.mixture_nfe_budgets = (10, 20, 40, 80)
    config.num_seeds = 8
    config.num_samples = 1024  # per seed
    config.num_projections = 128  # sliced W2 directions
    # sampler options (library defaults; Restart's interval is Xu et al. 2023's, in process time)
    config.restart_k = 2
    config.restart_steps = 4
    config.restart_t_min = 0.06
    config.restart_t_max = 0.30
    config.pc_snr = 0.16
    config.data_seed = 0  # the Gaussian and the high-dimensional mixture
    config.seed = 0  # prior draws, sampler noise, reference samples, projections
    config.x64 = True  # KLs are measured down to ~1e-9
    config.results_dir = "results"
    if variant == "quick":
        config.gaussian_samplers = ("euler_maruyama", "pf_ode_euler", "pf_ode_heun")
        config.grids = ("uniform_time", "uniform_log_snr")
        config.nfe_budgets = (10, 20, 40)
        config.gaussian_dim = 4
        config.high_dim = 8
        config.mixture_samplers = ("euler_maruyama", "pf_ode_heun", "restart")
        config.mixture_nfe_budgets = (40,)
        config.num_seeds = 4
        config.num_samples = 256
        config.num_projections = 32
    elif variant == "flow":
        config.sde = "flow"
    elif variant != "full":
        raise ValueError(f"config variant must be 'full', 'flow' or 'quick', got {variant!r}")
    return config
