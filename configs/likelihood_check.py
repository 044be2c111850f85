"""Config for experiments/likelihood_check.py.

Variants: ``configs/likelihood_check.py`` (the full check, under 2 min on 2 CPU cores) and
``configs/likelihood_check.py:quick`` (fewer points and probes; the test runs it).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    config.problems = ("mixture_2d", "mixture_high_dim")
    config.sdes = ("vp", "ve")
    config.high_dim = 16  # dimension of the second mixture
    config.num_components = 4  # its components (random means and anisotropic covariances)
    config.data_seed = 0  # the high-dimensional mixture instance
    config.num_points = 32  # test points per (problem, sde), drawn from p_{t_min}
    config.num_probes = 128  # Hutchinson solves per point
    config.probe = "rademacher"  # or "gaussian"
    config.rtol = 1e-6  # Dopri5 step-size controller
    config.atol = 1e-6
    config.max_steps = 4096
    # checks: |ODE + prior mismatch - exact| (the solver's own error) and the pooled z-score
    config.agreement_tol_nats = 1e-3
    config.z_threshold = 4.0
    config.seed = 0  # test points and probes
    # Devices the probes are split over (the first k); None: all of them, or the most of them
    # that num_probes splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.x64 = True
    config.results_dir = "results"
    if variant == "quick":
        config.num_points = 8
        config.num_probes = 32
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
