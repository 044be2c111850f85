"""Config for experiments/guidance_targets.py.

Variants: ``configs/guidance_targets.py`` (the full study) and
``configs/guidance_targets.py:quick`` (fewer scales, budgets and samples; the test runs it).
A correction entry is a guidance method of :data:`shufflesgd.diffusion.GUIDANCE` other than
``"cfg"``, with its options: ``"rescaled(rescale=0.7)"``.
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    config.sde = "vp"  # the forward process ("vp", "subvp", "ve", "edm", "flow", "trig")
    config.num_steps = 50  # grid steps of every sampler (uniform in time)
    config.scales = (1.0, 2.0, 4.0, 8.0)  # guidance scales gamma (1 = conditional)
    config.budget_scale = 4.0  # the scale at which budgets are swept (one of scales)
    # CFG as predictor-corrector: Langevin steps per grid step, and the step
    # kappa * sigma_t^2 with kappa = pcg_step_scale / max(gamma, 1)
    config.pcg_corrector_steps = (1, 2, 4, 8)
    config.pcg_step_scale = 0.5
    # Feynman-Kac correctors: particles per system, the ESS fraction that triggers
    # resampling, and the resampling scheme
    config.fk_particles = (64, 512, 4096)
    config.fk_steps = 200  # Euler-Maruyama steps of FK (it needs a finer grid than DDIM)
    config.fk_ess_threshold = 0.5
    config.fk_resampling = "systematic"
    # Part A: one anisotropic Gaussian class law and a wider Gaussian unconditional law
    config.gaussian_dim = 2
    config.gaussian_systems = 64  # FK: independent particle systems (standard errors)
    # Part B: a 2-D class-conditional mixture; the target by quadrature on a grid
    config.mixture_samples = 8192  # samples per method and scale
    config.mixture_corrections = (
        "rescaled(rescale=0.7)",
        "apg(parallel_weight=0.0)",
        "adaptive(threshold=0.95)",
    )  # may be empty
    config.quadrature_cells = 512  # per axis, on [-quadrature_half_width, +]^2
    config.quadrature_half_width = 6.0
    config.num_directions = 256  # sliced W2
    config.floor_pairs = 8  # pairs of exact sample sets for the Monte Carlo floor
    config.seed = 0
    # Devices the FK systems and Part B's samples are split over (the first k); None: all of
    # them, or the most of them that gcd(gaussian_systems, mixture_samples, mixture_samples // N
    # for N in fk_particles) splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.x64 = True
    config.results_dir = "results"
    if variant == "quick":
        config.num_steps = 20
        config.scales = (1.0, 4.0)
        config.pcg_corrector_steps = (1, 4)
        config.fk_particles = (64, 1024)
        config.fk_steps = 60
        config.gaussian_systems = 8
        config.mixture_samples = 1024
        config.mixture_corrections = ()
        config.x64 = False
        config.quadrature_cells = 256
        config.num_directions = 64
        config.floor_pairs = 4
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
