"""Config for experiments/sampler_nfe.py.

Variants: ``configs/sampler_nfe.py`` (the full study, VP), ``configs/sampler_nfe.py:flow``
(the same on the rectified flow, :class:`shufflesgd.diffusion.RectifiedFlow`) and
``configs/sampler_nfe.py:quick`` (fewer samplers, budgets, seeds and samples, one mixture; the test
runs it).
A sampler entry is a registered name or a name with options, ``"unipc(order=3)"``.
DPM-Solver-v3's ``statistics`` option is the study's choice of its empirical model statistics:
``dpm_solver_v3(statistics="exact")`` (computed for the Gaussian, Part A only; Part A's default),
``dpm_solver_v3(statistics="estimated")`` (estimated from ``ems_num_draws`` draws of the data,
Part B's default) or ``dpm_solver_v3(statistics=None)`` (the library's default, DPM-Solver++ in
Taylor form).  Part C's entries are MRS, ``mrs(solver="sde", prediction="data", order=2)``, or
house samplers run on the centred variable.
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    # the forward process of Parts A and B ("vp", "subvp", "ve", "edm", "flow", "trig"); Part C
    # runs on its own mean-reverting process
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
        'dpm_solver_v3(statistics="exact")',  # the Gaussian's model statistics, exact
        'dpm_solver_v3(statistics="estimated")',  # ... estimated from draws (the paper's way)
        "dpm_solver_v3(use_corrector=False)",  # exact statistics
        "dpm_solver_pp_hb",
        "ghvb",
        "edm_heun",
        "restart",
    )
    config.ems_num_lambdas = 2001  # DPM-Solver-v3's exact statistics grid (half log-SNRs)
    # DPM-Solver-v3's estimated statistics (Parts A and B): data draws and half log-SNRs
    config.ems_num_draws = 4096
    config.ems_estimate_num_lambdas = 201
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
        'dpm_solver_v3(statistics="estimated")',
        "dpm_solver_v3(statistics=None)",  # DPM-Solver++ in Taylor form, for comparison
        "dpm_solver_pp_hb",
        "edm_heun",
        "restart",
    )
    config.mixture_grid = "uniform_log_snr"
    config.mixture_nfe_budgets = (10, 20, 40, 80)
    config.num_seeds = 8
    config.num_samples = 1024  # per seed
    config.num_projections = 128  # sliced W2 directions
    # Devices Part B's seeds are split over (the first k); None: all of them, or the most of
    # them that num_seeds splits evenly over.
    config.devices = config_dict.placeholder(int)
    # sampler options (library defaults; Restart's interval is Xu et al. 2023's, in process time)
    config.restart_k = 2
    config.restart_steps = 4
    config.restart_t_min = 0.06
    config.restart_t_max = 0.30
    config.pc_snr = 0.16
    # Part C: exact laws on IR-SDE's mean-reverting process from Part A's Gaussian, MRS against
    # the house samplers on x - mu (Li et al. 2025's ODE / SDE, data / noise prediction solvers)
    config.mean_reverting_samplers = (
        'mrs(solver="ode", prediction="data", order=1)',  # = DDIM on x - mu
        'mrs(solver="ode", prediction="data", order=2)',  # the authors' default
        'mrs(solver="ode", prediction="data", order=3)',
        'mrs(solver="ode", prediction="data", order=3, consistent_third_order=True)',
        'mrs(solver="ode", prediction="noise", order=2)',
        'mrs(solver="sde", prediction="data", order=1)',
        'mrs(solver="sde", prediction="data", order=2)',
        'mrs(solver="sde", prediction="noise", order=2)',  # unstable at low NFE (the paper)
        "euler_maruyama",
        "pf_ode_euler",
        "pf_ode_heun",
        "dpm_solver_pp_2m",
        "dpm_solver_pp_3m",
        "unipc",
    )
    config.mean_reverting_nfe_budgets = (5, 8, 10, 16, 20, 24, 32, 40, 64, 80, 160, 320)
    config.mean_reverting_grid = "uniform_log_snr"
    config.mean_reverting_schedule = "cosine"  # theta schedule ("cosine", "linear", "constant")
    config.mean_reverting_std = 1.0  # lambda: the prior is N(mu, lambda^2 I)
    config.mean_reverting_terminal_alpha = 0.005  # exp(-theta_bar(T)), the MRS authors' value
    config.mean_reverting_offset = 1.0  # |mu - mean of the Gaussian|, in a random direction
    # Part D: DC-Solver on the Part A Gaussian (empty dc_grids: no Part D)
    config.dc_grids = ("uniform_time", "uniform_log_snr")
    config.dc_steps = (5, 6, 7, 8, 10)  # final="none": NFE = steps
    config.dc_order = 2  # UniPC's order
    config.dc_interpolation_order = 2  # the compensation's Lagrange order (the authors' default)
    config.dc_search_steps = 40  # AdamW steps per grid step (the authors' search)
    config.dc_reference_draws = 10  # prior draws whose exact PF-ODE trajectories are matched
    config.dc_cpr_nfe_degree = 2  # CPR's polynomial degree in the NFE
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
        config.mixtures = ("mixture_2d",)
        config.mixture_samplers = ("euler_maruyama", "dpm_solver_v3", "restart")
        config.mixture_nfe_budgets = (40,)
        config.ems_num_draws = 64  # DPM-Solver-v3's statistics estimated from tiny samples
        config.ems_estimate_num_lambdas = 21
        config.mean_reverting_samplers = ('mrs(solver="sde")', "euler_maruyama")
        config.mean_reverting_nfe_budgets = (20, 40)
        config.dc_grids = ("uniform_time",)
        config.dc_steps = (5, 6, 8)
        config.dc_search_steps = 20
        config.dc_reference_draws = 4
        config.dc_cpr_nfe_degree = 1
        config.num_seeds = 4
        config.num_samples = 256
        config.num_projections = 32
    elif variant == "flow":
        config.sde = "flow"
    elif variant != "full":
        raise ValueError(f"config variant must be 'full', 'flow' or 'quick', got {variant!r}")
    return config
