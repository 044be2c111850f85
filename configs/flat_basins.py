"""Config for experiments/flat_basins.py.

Variants: ``configs/flat_basins.py`` (the full study, a few minutes on 2 CPU cores) and
``configs/flat_basins.py:quick`` (a few epochs and a short toy; the test runs it).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    # Part A: the Bayesian MLP on the digits.  Tuples, so that overrides work; "sgld" is the
    # reference of the paired differences.
    config.methods = ("sgld", "csgld", "sghmc", "entropy_mcmc")
    config.hidden = (32,)  # MLP widths (tanh), 64 pixels in, 10 logits out
    config.prior_std = 1.0  # Gaussian prior N(0, prior_std^2 I) on every weight and bias
    config.batch_size = 64  # must divide the 1536 training examples; random reshuffling
    config.num_epochs = 240  # the same for every method: equal gradient evaluations
    config.burn_in_epochs = 80  # draws (one per epoch end) before this are discarded
    config.thin = 4  # keep every thin-th epoch-end draw after the burn-in
    # Step sizes h of x' = x + h g + sqrt(2h) z (log-posterior scale), one per method
    # (traced arguments); csgld's is the h_0 of its cosine cycles, sghmc's the Euler step.
    config.step_size = ConfigDict(
        {"sgld": 1e-4, "csgld": 2e-4, "sghmc": 2e-3, "entropy_mcmc": 1e-4}
    )
    config.friction = 20.0  # SGHMC's gamma (unit mass); overdamped, it is SGLD with h/gamma
    config.csgld_cycles = 4  # cyclical SGLD: cycles M, each a whole number of epochs
    config.csgld_exploration = 0.5  # beta: the first half of each cycle is noiseless
    config.coupling = 5e-3  # Entropy-MCMC's eta (variance of theta_a around theta); h < eta
    config.perturbation_std = 0.05  # flatness: per-weight std of the Gaussian perturbations
    config.num_perturbations = 8  # perturbations per kept draw (keys fold_in(draw, p))
    config.num_seeds = 8  # vmapped in one call per method; seed s: same init and data order
    config.seed = 0
    config.devices = config_dict.placeholder(int)  # seed axis over devices; None: automatic
    # Part B: the 1-D toy pi = w N(sharp) + (1 - w) N(flat), exact gradients.
    config.toy_flat_weight = 0.4  # weight of the flat component
    config.toy_means = (-0.6, 0.6)  # (sharp, flat)
    config.toy_stds = (0.25, 1.0)  # (sharp, flat)
    config.toy_coupling = 1.0  # Entropy-MCMC's eta on the toy
    config.toy_step_size = 2e-3
    config.toy_num_chains = 2048
    config.toy_num_steps = 40000
    config.toy_burn_in = 8000  # steps discarded per chain
    config.toy_init_std = 2.0  # chains start at N(midpoint of the means, toy_init_std^2)
    # XLA backend optimisation level 0: ~3x faster compiles, slower runs (short runs only)
    config.fast_compile = False
    config.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None: TFDS default
    config.results_dir = "results"
    if variant == "quick":
        config.hidden = (16,)
        config.batch_size = 128
        config.num_epochs = 8
        config.burn_in_epochs = 4
        config.thin = 1
        config.csgld_cycles = 2
        config.num_perturbations = 2
        config.num_seeds = 2
        config.toy_num_chains = 512
        config.toy_num_steps = 8000
        config.toy_burn_in = 2000
        config.fast_compile = True
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
