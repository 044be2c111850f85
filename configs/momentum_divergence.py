"""Config for experiments/momentum_divergence.py.

Variants: ``configs/momentum_divergence.py`` (the full study, a few minutes on 2 CPU cores) and
``configs/momentum_divergence.py:quick`` (the 2-D mixture, two guidance scales, the
DPM-Solver++(2M) / heavy-ball pair and the beta = 1 twins at two budgets; the test runs it).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    config.problems = ("mixture_2d", "mixture_high_dim")
    config.high_dim = 16  # dimension of the random mixture
    config.num_components = 4  # of the random mixture
    config.component = 2  # the class c guided towards (0.2-weight mode of the 2-D mixture)
    config.guidance_scales = (1.0, 3.0, 7.5)  # w in s_w = (1 + w) s_c - w s
    # Tuples of sampler labels: a registered deterministic sampler, with options in brackets.
    config.samplers = (
        "dpm_solver_pp_2m",
        "dpm_solver_pp_3m",
        "unipc",
        "ghvb(order=4, beta=1.0)",  # PLMS4 (Adams-Bashforth 4)
        "dpm_solver_pp_hb(beta=0.8)",  # DPM-Solver++(2M) with heavy ball 0.8
        "plms_hb(beta=0.8)",  # PLMS4 with heavy ball 0.8
        "ghvb(order=2, beta=0.8)",  # GHVB 1.8
        "ghvb(order=4, beta=0.8)",  # GHVB 3.8
    )
    config.nfe_budgets = (6, 8, 10, 12, 16, 20)  # each sampler takes the most steps that fit
    config.grid = "uniform_log_snr"
    config.reference_sampler = "dpm_solver_pp_2m"  # the same guided ODE, solved finely
    config.reference_grid = "uniform_log_snr"
    config.reference_steps = 500  # also run with half as many, to bound its own error
    config.blowup_factor = 2.0  # blown up: |x|_inf > blowup_factor * max |x_ref|, or non-finite
    config.num_samples = 1024  # per seed
    config.num_seeds = 8
    config.data_seed = 0  # the random mixture
    config.seed = 0  # the prior draws
    # Devices the seed axis is split over (the first k); None: all of them, or the most of them
    # that num_seeds splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.x64 = True
    config.results_dir = "results"
    if variant == "quick":
        config.problems = ("mixture_2d",)
        config.guidance_scales = (1.0, 7.5)
        config.samplers = (
            "dpm_solver_pp_2m",
            "dpm_solver_pp_hb(beta=0.8)",
            "dpm_solver_pp_hb(beta=1.0)",
            "ghvb(order=4, beta=1.0)",
            "plms_hb(order=4, beta=1.0)",
        )
        config.nfe_budgets = (6, 8)
        config.reference_steps = 200
        config.num_samples = 256
        config.num_seeds = 4
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
