"""Config for experiments/composition.py.

Variants: ``configs/composition.py`` (the full study) and ``configs/composition.py:quick``
(fewer particle counts, temperatures, step counts and samples; the test runs it).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    config.grid = "uniform_time"  # time grid of every sampler (VP), one of diffusion.GRIDS
    config.num_steps = 100  # grid steps of the FK correctors and of SuperDiff
    # Feynman-Kac correctors (Parts A and B): particles per system, independent systems pooled
    # per particle count, the ESS fraction that triggers resampling and the resampling scheme
    config.fk_particles = (64, 256, 1024, 4096)
    config.fk_systems = 8
    config.fk_ess_threshold = 0.5
    config.fk_resampling = "systematic"
    config.betas = (0.5, 2.0, 4.0)  # Part B: temperatures of the annealed target p^beta
    config.num_seeds = 4  # repetitions of every sample-based distance (standard errors)
    # Part C: the Ito density estimator against the exact log-density
    config.ito_steps = (25, 50, 100, 200, 400)
    config.ito_paths = 1024
    config.likelihood_points = 128  # PF-ODE log-likelihoods beside it (0: none)
    # Part D: SuperDiff OR and AND
    config.superdiff_samples = 4096  # per seed
    # exact draws of the annealed target by quadrature on [-half_width, half_width]^2
    config.quadrature_cells = 512  # per axis
    config.quadrature_half_width = 7.0
    config.num_directions = 256  # sliced W2
    config.seed = 0
    # Devices the independent units (FK systems, Ito paths, SuperDiff samples) are split over
    # (the first k); None: all of them, or the most of them that gcd(2 * num_seeds * fk_systems,
    # ito_paths, superdiff_samples) splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.x64 = False
    config.results_dir = "results"
    if variant == "quick":
        config.fk_particles = (512,)  # one compiled FK program per particle count
        config.fk_systems = 8
        config.betas = (0.5, 4.0)
        config.ito_steps = (25, 50, 100)
        config.ito_paths = 512
        config.likelihood_points = 0
        config.superdiff_samples = 1024
        config.quadrature_cells = 256
        config.num_directions = 128
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
