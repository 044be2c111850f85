"""Config for experiments/score_model.py.

Variants: ``configs/score_model.py`` (the full study: every sampler, and a second digits network
trained by flow matching) and ``configs/score_model.py:quick`` (short training, three samplers,
one budget; the test runs it).
"""

from ml_collections import ConfigDict, config_dict

from shufflesgd import diffusion

ALL_SAMPLERS = tuple(diffusion.SAMPLERS)  # every sampler of the library


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    # Tuples, so that --config.nfe_budgets='(10,20)' overrides them from the command line.
    config.parts = ("mixture_2d", "digits")
    config.sde = "vp"  # forward process of both parts
    config.grid = "uniform_log_snr"  # time grid of every fixed-grid sampler
    # sampling: each fixed-grid sampler takes the most steps whose NFE (with the final denoise) fits
    # a budget; pf_ode_adaptive runs once per tolerance instead (rtol = atol)
    config.samplers = ALL_SAMPLERS  # for the 2-D mixture
    config.nfe_budgets = (10, 20, 50, 100)
    config.adaptive_tolerances = (1e-2, 1e-3)
    config.num_seeds = 4  # sampling seeds: prior draws, noise, held-out draws, projections
    config.num_samples = 2048  # 2-D samples (and held-out draws) per seed
    config.num_projections = 128  # sliced-W2 directions per seed
    # sampler options (library defaults; Restart's interval is Xu et al. 2023's, in process time)
    config.restart_k = 2
    config.restart_steps = 4
    config.restart_t_min = 0.06
    config.restart_t_max = 0.30
    config.pc_snr = 0.16
    # part 1: 2-D mixture, ScoreMLP predicting eps
    config.mixture_num_train = 16384
    config.mixture_batch_size = 512
    config.mixture_epochs = 60
    config.mixture_hidden = 128
    config.mixture_num_layers = 3
    config.mixture_learning_rate = 2e-3  # Adam, cosine decay to 0 over the run
    # part 2: 8x8 digits (17 levels, uniformly dequantised to [-1, 1])
    config.digits_model = "mlp"  # "mlp" (flattened 64-D ScoreMLP) or "unet"
    # "edm": Karras et al. (2022) input/output scalings around the network
    # (models.EDMPreconditioned); "none"
    config.digits_preconditioning = "edm"
    config.digits_sigma_data = 0.5  # EDM's sigma_data for data in [-1, 1]
    config.digits_hidden = 256
    config.digits_num_layers = 3
    config.digits_channels = (32, 64)  # UNet widths per level (digits_model = "unet")
    config.digits_batch_size = 128
    config.digits_passes = 10  # passes over the training images per epoch (one checkpoint each)
    config.digits_epochs = 40
    config.digits_learning_rate = 2e-3
    config.digits_samplers = ALL_SAMPLERS
    config.digits_nfe_budgets = (20, 50)
    config.png_samplers = ("euler_maruyama", "dpm_solver_pp_2m")  # digit grids in digits.png
    config.png_digits = 64
    # one digits network per process, same architecture and training settings: "vp" predicts eps
    # (eps-MSE), "flow" (rectified flow) a velocity (flow-matching loss); bits/dim and the SW2
    # of these samplers at digits_nfe_budgets side by side (the "sde" network is reused)
    config.digits_processes = ("vp", "flow")
    config.digits_process_samplers = ("pf_ode_euler", "pf_ode_heun", "dpm_solver_pp_2m", "unipc")
    # exposure bias on the digits network, at equal NFE with paired seeds: each base sampler
    # ("ddim", "ancestral") with Epsilon Scaling (eps / b, Ning et al. 2024's uniform schedule)
    # and its Time-Shift version (Li et al. 2024; the data variance comes from the training set)
    config.exposure_samplers = ("ddim", "ancestral")
    config.exposure_nfe_budgets = (10, 20, 50)
    config.epsilon_scaling_b = (1.005, 1.01, 1.02)
    # bits/dim of the eps-scaled networks (b = 1 too) on the first of the likelihood images
    config.exposure_likelihood_points = 64
    config.time_shift_window = 5  # candidate times per step (odd)
    config.time_shift_window_width = 0.5  # fraction of the way to each neighbouring grid time
    config.time_shift_cutoff = 0.0  # no shifting once the scheduled time is below this
    config.likelihood_points = 64  # first test images
    config.likelihood_tolerances = (1e-2, 1e-3, 1e-4)  # Dopri5 rtol = atol: NFE vs bits/dim
    config.likelihood_divergence = "exact"  # 64 JVPs an evaluation; "hutchinson" for one
    config.likelihood_max_steps = 4096
    config.seed = 0
    # Devices the sampling seeds are split over (the first k); None: all of them, or the most
    # of them that num_seeds splits evenly over.
    config.devices = config_dict.placeholder(int)
    config.data_dir = config_dict.placeholder(
        str
    )  # TFDS data; None: <results_dir>/score_model/tfds
    # checkpoints and metrics.jsonl; None: <results folder>/training.  Set it to resume a killed run
    config.checkpoint_dir = config_dict.placeholder(str)
    config.results_dir = "results"
    if variant == "quick":
        config.samplers = ("euler_maruyama", "dpm_solver_pp_2m", "pf_ode_adaptive")
        config.nfe_budgets = (20,)
        config.adaptive_tolerances = (1e-2,)
        config.num_samples = 512
        config.num_projections = 32
        config.mixture_num_train = 4096
        config.mixture_epochs = 8
        config.digits_hidden = 128
        config.digits_batch_size = 64
        config.digits_passes = 8
        config.digits_epochs = 8
        config.digits_samplers = ("dpm_solver_pp_2m",)
        config.digits_nfe_budgets = (20,)
        config.png_samplers = ("dpm_solver_pp_2m",)
        config.exposure_samplers = ("ddim",)
        config.exposure_nfe_budgets = (20,)
        config.epsilon_scaling_b = (1.01,)
        config.exposure_likelihood_points = 4
        config.digits_process_samplers = ("dpm_solver_pp_2m",)
        config.png_digits = 16
        config.likelihood_points = 16
        config.likelihood_tolerances = (1e-2,)
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
