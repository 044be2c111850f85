"""Config for experiments/guided_digits.py.

Variants: ``configs/guided_digits.py`` (the full study: six guidance scales, 200 samples per
class, longer training) and ``configs/guided_digits.py:quick`` (three scales, short training;
the test runs it, under a minute on 2 CPU cores).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    # Tuples, so that --config.scales='(1, 2)' overrides them from the command line.
    config.sde = "vp"  # forward process of the network
    # the class-conditional network: ConditionalScoreMLP on the flattened 64-D digits, in EDM's
    # input/output scalings, predicting eps; label dropout trains the null token
    config.hidden = 256
    config.num_layers = 3
    config.embed_dim = 32  # width of the time and label embeddings (even)
    config.sigma_data = 0.5  # EDM's sigma_data for data in [-1, 1]
    config.label_dropout = 0.15  # probability that a training label becomes the null token
    config.batch_size = 128  # must divide the 1536 training images
    config.passes = 10  # passes over the training images per epoch (one checkpoint each)
    config.epochs = 60
    config.learning_rate = 2e-3  # Adam, cosine decay to 0 over the run
    # the classifier that scores the samples: an MLP on dequantised digits, cross-entropy
    config.classifier_hidden = (128, 128)
    config.classifier_batch_size = 64
    config.classifier_passes = 5
    config.classifier_epochs = 8
    config.classifier_learning_rate = 2e-3
    # sampling: every method on the same grid from the same prior draws (paired)
    config.methods = ("conditional", "cfg", "rescaled", "adaptive", "apg", "pcg")
    config.scales = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # gamma (1: unguided, 0: unconditional)
    config.sampler = "dpm_solver_pp_2m"  # the sampler of the model-transform methods
    config.grid = "uniform_log_snr"
    config.num_steps = 20  # grid steps of every method (PCG's predictor too)
    config.samples_per_class = 200
    config.rescale = 0.7  # guidance rescale phi (Lin et al. 2024)
    config.adaptive_threshold = 0.99  # cosine similarity above which guidance is off
    config.apg_parallel_weight = 0.0  # eta of APG (Sadat et al. 2024)
    config.apg_radius = 4.0  # r of APG: the norm bound of the guidance update
    config.pcg_corrector_steps = 1  # Langevin steps of PCG per grid time
    config.pcg_step_scale = 0.1  # kappa: Langevin step kappa * sigma(t)^2
    config.grid_scale = 3.0  # the scale of the per-class sample grids (one of scales)
    config.grid_samples = 8  # columns of the sample grids
    config.seed = 0
    # Devices the samples of each class are split over (the first k); None: all of them, or the
    # most of them that divide samples_per_class.
    config.devices = config_dict.placeholder(int)
    config.data_dir = config_dict.placeholder(str)  # TFDS data; None: <results_dir>/<name>/tfds
    # checkpoints and metrics.jsonl; None: <results folder>/training.  Set it to resume a killed run
    config.checkpoint_dir = config_dict.placeholder(str)
    config.results_dir = "results"
    if variant == "quick":
        config.hidden = 128
        config.batch_size = 64
        config.passes = 8
        config.epochs = 8
        config.scales = (1.0, 2.0, 4.0)
        config.grid_scale = 2.0
        config.samples_per_class = 32
    elif variant != "full":
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}")
    return config
