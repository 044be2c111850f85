"""Config for experiments/grab_digits.py.

Variants: ``configs/grab_digits.py`` (the full study) and ``configs/grab_digits.py:quick``
(a few epochs; the test runs it, under a minute on 2 CPU cores).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    # Tuples, so that --config.schemes='("random_reshuffle","grab_pair_balance")' overrides them.
    config.schemes = (
        "random_reshuffle",
        "single_shuffle",
        "grab_mean_balance",
        "grab_pair_balance",
    )
    config.hidden = (64, 64)  # MLP widths
    config.batch_norm = False
    config.learning_rate = 0.05  # plain SGD
    config.batch_size = 16  # must divide the 1536 training examples
    config.num_epochs = 30
    config.num_seeds = 8  # vmapped in one call per scheme
    config.seed = 0  # network initialisation and shuffling randomness
    # Devices the seed axis is split over (the first k); None: all of them, or the most of them
    # that num_seeds splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.data_dir = config_dict.placeholder(
        str
    )  # TFDS data_dir for the digits build; None: TFDS default
    config.results_dir = "results"
    if variant == "quick":
        config.schemes = ("random_reshuffle", "single_shuffle", "grab_mean_balance")
        config.num_epochs = 4
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
