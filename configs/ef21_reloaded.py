"""Config for experiments/ef21_reloaded.py.

Variants: ``configs/ef21_reloaded.py`` (the full study, < 3 min on 2 CPU cores) and
``configs/ef21_reloaded.py:quick`` (Top-k only, three spreads, < 30 s).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    config.num_workers = 20
    config.examples_per_worker = 50
    config.dim = 40
    config.l2 = 0.0  # ridge on top of least squares
    config.noise = 0.1  # target noise
    config.data_seed = 0  # the problem instance (one per spread)
    config.spreads = (1.0, 10.0, 100.0, 1e3, 1e4)  # L_max / L_min
    config.profile = (
        "geometric"  # log-spaced L_i; "outlier": one worker at the spread, the rest at 1
    )
    config.compressors = ("top_k", "rand_k", "natural")  # rand_k: unscaled, alpha = k / d
    config.top_k_fraction = 0.1  # k = ceil(fraction * d)
    config.rand_k_fraction = 0.1
    config.epsilon = 1e-6  # target ||grad f(x_t)||^2 <= epsilon ||grad f(x_0)||^2
    config.num_steps = 2500
    config.num_seeds = 4  # compressor randomness (Top-k is deterministic)
    config.seed = 0
    # Devices the seed axis is split over (the first k); None: all of them, or the most of them
    # that num_seeds splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.curve_points = 250  # points per curve kept in metrics.json / curves.csv
    config.x64 = True
    config.results_dir = "results"
    if variant == "quick":
        config.spreads = (1.0, 100.0, 1e4)
        config.compressors = ("top_k",)
        config.num_steps = 2000
        config.num_seeds = 2
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
