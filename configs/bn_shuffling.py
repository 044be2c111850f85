"""Config for experiments/bn_shuffling.py.

Variants: ``configs/bn_shuffling.py`` (the full study: 8 seeds, 4 learning rates, 4000 epochs;
a few minutes on 2 CPU cores) and ``configs/bn_shuffling.py:quick`` (fewer seeds and epochs;
the test runs it).  Lists are tuples.
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    config.seed = 0  # data, initialisations and shuffles all derive from it
    config.num_seeds = (
        8  # runs per (scheme, learning rate); each seed: one init and one shuffle key
    )
    # Devices the runs are split over (the first k, the rate-major run axis in equal blocks);
    # None: all of them, or the most of them that config.num_seeds splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.results_dir = "results"

    # Regression (Wu, Yun & Sra 2023, Sec. 3): y = <w*, x> + noise, x log-normal (skewed, so that
    # minibatch moments vary), LinearBatchNorm with one output, squared loss.
    config.regression = ConfigDict()
    config.regression.num_examples = 64
    config.regression.dim = 4
    config.regression.hidden = (8,)  # widths of W_1..W_{L-1}
    config.regression.feature_log_std = 0.75  # x_ij = exp(feature_log_std * g_ij), g ~ N(0, 1)
    config.regression.noise = 0.5  # standard deviation of the label noise
    config.regression.batch_size = 4  # SS and RR; GD uses the whole set
    config.regression.learning_rates = (
        0.02,
        0.01,
        0.005,
        0.0025,
    )  # SGD step sizes; GD uses the same
    config.regression.num_epochs = 4000  # SS/RR epochs; GD takes as many (full-batch) steps
    config.regression.epochs_per_chunk = 100  # epochs per compiled chunk (one tqdm tick)
    config.regression.rr_reference_permutations = (
        20_000  # Monte Carlo permutations for RR's optimum
    )

    # Classification (Sec. 4): Gaussian inputs, alternating labels, pairs (B = 2): every
    # single-shuffle partition's batch-normalised data are separable, the union over all pairs (RR)
    # is not.
    config.classification = ConfigDict()
    config.classification.num_examples = 32
    config.classification.dim = 16
    config.classification.class_shift = (
        0.0  # class means at +-shift e_1 (0: labels independent of x)
    )
    config.classification.hidden = (8,)
    config.classification.batch_size = 2
    config.classification.learning_rate = 0.1
    config.classification.num_epochs = 4000
    config.classification.epochs_per_chunk = 100
    config.classification.divergence_loss = (
        1.0  # full-batch risk above this (or non-finite) = diverged;
    )
    # the zero predictor has risk log 2 = 0.693

    if variant == "quick":
        config.num_seeds = 3
        config.regression.learning_rates = (0.02, 0.005)
        config.regression.num_epochs = 300
        config.regression.rr_reference_permutations = 4000
        config.classification.num_epochs = 800
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
