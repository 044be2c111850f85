"""Config for experiments/shuffling_rates.py.

Variants: ``configs/shuffling_rates.py`` (the full study) and
``configs/shuffling_rates.py:quick`` (the `make demo` quick-start, < 3 min on 2 CPU cores).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    config.problem = "piecewise_quadratic"  # or "least_squares", "logistic_regression"
    config.n = 16  # components in the K sweep
    config.mu = 1.0  # piecewise quadratic: curvature right of the optimum
    config.smoothness = 8.0  # piecewise quadratic: curvature left of the optimum
    config.noise = 1.0  # piecewise quadratic: G; least squares: target noise
    config.dim = 4  # least squares / logistic regression
    config.l2 = 0.05  # ridge / logistic regularisation (mu for logistic regression)
    config.margin = 2.0  # logistic regression weight norm
    config.data_seed = 0  # the problem instance
    # Tuples, so that --config.epochs='(16,32,64)' overrides them from the command line.
    config.schemes = (
        "with_replacement",
        "random_reshuffle",
        "single_shuffle",
        "incremental",
        "flipflop",
        "grab_mean_balance",
        "grab_pair_balance",
    )
    config.epochs = (32, 64, 128, 256, 512, 1024)
    config.n_values = (8, 16, 32, 64, 128)
    config.n_sweep_epochs = 128
    config.num_seeds = 64
    config.step_size_c = 3.0  # eta = c log(nK) / (mu n K)
    config.batch_size = 1
    config.init_offset = 1.0  # x0 = x* + init_offset
    config.seed = 0  # shuffling randomness
    # Devices the seed axis is split over (the first k); None: all of them, or the most of them
    # that num_seeds splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.x64 = True  # rates are measured down to ~1e-10
    config.results_dir = "results"
    if variant == "quick":
        config.epochs = (32, 64, 128, 256, 512)
        config.n_values = (8, 16, 32, 64)
        config.n_sweep_epochs = 128
        config.num_seeds = 32
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
