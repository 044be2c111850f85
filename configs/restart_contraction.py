"""Config for experiments/restart_contraction.py.

Variants: ``configs/restart_contraction.py`` (full, about a minute on 2 CPU cores) and
``configs/restart_contraction.py:quick`` (the test runs it).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    config.weights = (0.6, 0.3, 0.1)  # the data's mode weights; the wrong score uses equal weights
    config.radius = 3.0  # modes on a circle of this radius, 120 degrees apart
    config.mode_variance = 0.1  # isotropic component variance
    config.error_above = (
        0.6  # the score is the equal-weight mixture's for t > error_above (VP time)
    )
    config.nfe_budgets = (30, 60, 120)
    config.restart_t_min = 0.1
    config.restart_t_max = 0.5
    config.restart_ks = (2, 4)  # restarts K
    config.restart_steps = 3  # Heun steps per restart
    config.num_samples = 4096  # per seed
    config.num_seeds = 8
    config.seed = 0
    # Devices the seed axis is split over (the first k); None: all of them, or the most of them
    # that num_seeds splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.x64 = True
    config.results_dir = "results"
    if variant == "quick":
        config.nfe_budgets = (30, 60)
        config.restart_ks = (4,)
        config.num_samples = 8192
        config.num_seeds = 6
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
