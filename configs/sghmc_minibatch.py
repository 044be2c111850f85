"""Config for experiments/sghmc_minibatch.py.

Variants: ``configs/sghmc_minibatch.py`` (the full sweep: 3 kernels x 4 schemes x 5 step sizes)
and ``configs/sghmc_minibatch.py:quick`` (two kernels, two schemes, three step sizes, fewer chains;
the test runs it).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    # Tuples, so that --config.step_fractions='(0.2,0.1)' overrides them from the command line.
    config.kernels = ("sgld", "sghmc_euler", "sghmc_baoab")
    config.schemes = ("with_replacement", "random_reshuffle", "single_shuffle", "flipflop")
    # step = c * 2/L (SGLD) or c * 2/sqrt(L) (SGHMC): c is the fraction of the full-gradient
    # stability limit
    config.step_fractions = (0.2, 0.1, 0.05, 0.025, 0.0125)
    config.batch_size = 34  # divides n = 442: 13 minibatches an epoch
    config.relative_friction = 1.0  # SGHMC friction gamma = relative_friction * sqrt(L)
    config.prior_variance = 1.0  # tau^2; the noise variance is the least-squares residual variance
    config.whiten_features = True  # A <- A V Lambda^{-1/2} sqrt(n): a well-conditioned posterior
    config.num_chains = 512  # per (kernel, scheme, step size), all in one vmapped call
    config.burn_in_epochs = 20  # chains start at exact posterior draws
    config.sample_epochs = 120  # positions kept at epoch ends
    config.chain_batch = (
        64  # chains vmapped at a time inside lax.map (memory; small is faster on CPU)
    )
    config.fit_min_snr = 4.0  # orders fitted only over step sizes with bias >= fit_min_snr * SE
    config.fit_points_small = 3  # ... and again over the smallest fit_points_small of those
    config.seed = 0  # starts, minibatch orders and injected noise
    # Devices each chain_batch of chains is split over (the first k); None: all of them, or the
    # most of them that chain_batch splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.x64 = True
    config.results_dir = "results"
    if variant == "quick":  # the SGHMC pair, with replacement (solved exactly for Euler) vs RR
        config.kernels = ("sghmc_euler", "sghmc_baoab")
        config.schemes = ("with_replacement", "random_reshuffle")
        config.step_fractions = (0.2, 0.1, 0.05)
        config.num_chains = 128
        config.burn_in_epochs = 10
        config.sample_epochs = 40
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
