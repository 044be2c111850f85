"""Networks: Flax models (:mod:`~shufflesgd.nn.models`), training steps and loops fed by any
shuffling scheme (:mod:`~shufflesgd.nn.training`), data sources (:mod:`~shufflesgd.nn.data`)
and Orbax checkpoints (:mod:`~shufflesgd.nn.checkpoint`).

The modules are imported one by one (``from shufflesgd.nn import models``), so that loading
the models does not load TensorFlow Datasets or Orbax.
"""
