"""Config for experiments/ef_sweep.py.

Variants: ``configs/ef_sweep.py`` (the full sweep) and ``configs/ef_sweep.py:quick``
(fewer seeds, multipliers and steps, < 30 s on 2 CPU cores).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    config.num_workers = 20
    config.examples_per_worker = 50
    config.dim = 40
    config.spread = 1000.0  # L_max / L_min, log-spaced L_i
    config.l2 = 0.0
    config.noise = 0.1
    config.data_seed = 0
    config.compressors = ("top_k", "rand_k", "scaled_sign", "natural", "qsgd")
    config.top_k_fraction = 0.1  # k = ceil(fraction * d)
    config.rand_k_fraction = 0.1  # unscaled Rand-k (contractive, alpha = k / d)
    config.qsgd_levels = 8  # omega = min(d / s^2, sqrt(d) / s) must be < 1
    config.step_multipliers = (1.0, 2.0, 4.0, 8.0, 16.0)  # x each compressor's EF21 theory step
    config.step_size_mean = "quadratic"  # EF21's L_QM ("arithmetic": L_AM)
    config.epsilon = 1e-6  # bits until ||grad f(x_t)||^2 <= epsilon ||grad f(x_0)||^2
    config.num_steps = 1000
    config.num_seeds = 6
    config.seed = 0
    # Devices the seed axis is split over (the first k); None: all of them, or the most of them
    # that num_seeds splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.curve_points = 200
    config.x64 = True
    config.results_dir = "results"
    if variant == "quick":
        config.step_multipliers = (1.0, 4.0, 16.0)
        config.num_steps = 500
        config.num_seeds = 3
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
