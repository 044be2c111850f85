"""Config for experiments/thin_wire.py.

Variants: ``configs/thin_wire.py`` (the full study on the MLP, a few minutes on 2 CPU cores),
``configs/thin_wire.py:cnn`` (the same on the small CNN) and ``configs/thin_wire.py:quick``
(a few dozen steps; the test runs it, and with ``--config.model=cnn`` the CNN).
"""

from ml_collections import ConfigDict, config_dict


def get_config(variant: str = "full") -> ConfigDict:
    config = ConfigDict()
    # Tuples, so that --config.methods='("dp","demo")' overrides them; "dp" is the reference.
    config.methods = ("dp", "ef21_sgdm_topk", "powersgd_ef14", "demo", "zeroth_order")
    config.model = "mlp"  # or "cnn" (the :cnn variant)
    config.hidden = (64, 64)  # MLP widths
    config.channels = (16, 32)  # CNN widths (3x3 convolutions, 2x2 average pooling)
    config.num_workers = 8  # must divide the 1536 training examples
    config.batch_size = 16  # per worker and step; must divide the worker's shard (1536 / n)
    config.num_steps = 1200  # every method except zeroth_order
    config.eval_every = 100  # test loss/accuracy every this many steps (divides the budgets)
    config.num_seeds = 8  # vmapped in one call per method
    config.seed = 0  # network initialisation, data orders, compressor randomness
    # Step sizes, one per method (traced arguments).
    config.learning_rate = ConfigDict(
        {
            "dp": 0.05,  # optax.sgd with momentum config.momentum
            "ef21_sgdm_topk": 0.5,  # gamma; the v_i are averages, so ~ dp / (1 - momentum)
            "powersgd_ef14": 0.2,  # EF14 (no momentum)
            "demo": 0.2,  # optax.scale(-lr) after DeMo
            "zeroth_order": 2e-3,
        }
    )
    config.momentum = 0.9  # dp's heavy ball; DeMo's beta
    config.ef21_momentum = 0.1  # EF21-SGDM's eta in (0, 1] (weight of the new gradient)
    config.topk_fraction = 0.01  # EF21-SGDM's Top-k, of all d parameters
    config.powersgd_rank = 2  # PowerSGD rank, leaf by leaf
    config.demo_chunk = 64  # every leaf larger than a chunk must be a whole number of chunks
    config.demo_topk = 4
    config.demo_sign = False
    config.zo_num_steps = 24000  # zeroth_order's own budget (cheap steps, far smaller moves)
    config.zo_bits = 8
    config.zo_num_directions = 1
    config.zo_epsilon = 1e-3
    config.zo_radius = 2.0  # clipping range of the projected gradient
    # Devices the worker axis is laid over; None: the most available that divide num_workers.
    config.num_devices = config_dict.placeholder(int)
    # Devices the seed axis is laid over, each with num_devices for the workers; None: the most
    # of the remaining ones (available // num_devices) that divide num_seeds.
    config.devices = config_dict.placeholder(int)
    config.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None: TFDS default
    config.results_dir = "results"
    if variant == "cnn":
        config.model = "cnn"
        # the 3x3 kernels hold 9 x channels entries: chunks of 16, the same 1/16 sent
        config.demo_chunk = 16
        config.demo_topk = 1
    elif variant == "quick":
        config.hidden = (32,)
        config.num_steps = 48
        config.eval_every = 12
        config.num_seeds = 2
        config.zo_num_steps = 96
    elif variant != "full":
        raise ValueError(f"config variant must be 'full', 'quick' or 'cnn', got {variant!r}")
    return config
