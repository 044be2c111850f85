"""Config for experiments/ef_divergence.py (Beznosikov et al. 2020, Example 1).

Variants: ``configs/ef_divergence.py`` (the full study, well under a minute on 2 CPU cores)
and ``configs/ef_divergence.py:quick`` (two step sizes, fewer steps; the test runs it).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    # a_1 = c (-3, 2, 2) and its cyclic shifts. c > 1 breaks Top-1's three-way tie at
    # x = (t, t, t): |6c^2 - 1| > 4c^2 + 1, so worker i keeps coordinate i whatever the
    # tie-breaking rule of lax.top_k (c = 1 would leave the example at its mercy).
    config.c = 1.1
    config.t0 = 1.0  # x0 = t0 (1, 1, 1), on the ray along which compressed GD grows
    config.methods = ("compressed_gd", "ef14", "ef21")
    # step sizes, as multiples of EF21's theory step size (Richtarik et al. 2021, Thm. 1).
    # Stop at 8x: from about 14x (gamma L ~ 1.4, still below GD's limit 2) EF14 and EF21
    # with Top-1 themselves diverge from some starting points, rounding-sensitively.
    config.step_size_multiples = (0.25, 1.0, 4.0, 8.0)
    config.num_steps = 10_000  # long enough for compressed GD to overflow at 4x and 8x
    config.checkpoints = (10, 100, 1000)  # table columns (the final step T is added)
    config.num_seeds = 1  # Top-1 is deterministic; seeds are kept for other compressors
    config.seed = 0
    # Devices the seed axis is split over (the first k); None: all of them, or the most of them
    # that num_seeds splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.x64 = True  # the growth factor is checked to ~1e-12; float64 overflows at ~1e308
    config.results_dir = "results"
    if variant == "quick":
        config.step_size_multiples = (1.0, 8.0)
        config.num_steps = 5000  # compressed GD at 8x overflows after ~4600 steps
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
