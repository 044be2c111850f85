r"""Training throughput (examples/s) of small classifiers on digits-sized inputs, on CPU.

Models (:mod:`shufflesgd.models`): ``MLP(hidden=(64, 64))`` and ``CNN(channels=(16, 32))``,
each with and without BatchNorm, on scikit-learn's 8×8 digits (``n = 1536`` training
images ``[8, 8, 1]`` scaled to ``[0, 1]``, 10 classes), softmax cross-entropy, plain SGD
(:math:`\eta = 0.05`), minibatches in random-reshuffling order.  For every model and batch
size, one timed call trains ``epochs`` epochs from the same initial state, in four ways:

* ``scan`` -- the in-memory loop of ``experiments/grab_digits.py``: one jitted program,
  ``lax.scan`` over epochs of :func:`shufflesgd.network_training.make_trainer`'s
  ``scan_epoch`` (the scheme's order for the epoch, then a ``lax.scan`` of the step over minibatches
  gathered from device-resident arrays);
* ``trainer`` -- the per-batch Python loop, ``Trainer.run_epoch`` over an in-memory
  :class:`shufflesgd.data.ArraySource` (host gather, transfer, one jitted step per batch);
* ``step`` -- the same jitted step in a Python loop over batches already on the device
  (so ``trainer - step`` is the cost of feeding the data);
* ``torch`` (peer) -- the same network in PyTorch (``nn.Linear``/``nn.Conv2d`` with the
  same widths, padding and pooling, ``BatchNorm1d/2d`` with momentum 0.1 = Flax's 0.9 and
  eps 1e-5; the parameter counts are checked equal), an eager loop of ``zero_grad``,
  forward, ``cross_entropy``, ``backward``, ``SGD.step`` on batches indexed from tensors
  with ``torch.randperm`` each epoch, ``torch.set_num_threads(--torch-threads)``.

Timed: the median over ``repeats`` calls after a warm-up call (which compiles; its time is
reported as ``first_call_seconds``), the ways taking turns within each repeat so that
load from other work falls on all of them alike.  Reported: examples/s = ``epochs * n /
median seconds``, and the ratios ``scan / torch`` and ``trainer / torch`` of examples/s,
each also as the median of the per-repeat (paired) ratios.  PyTorch is optional (the
``bench`` extra); without it the JSON says ``"peer": "not installed"`` and only the JAX
ways run.

    python -m benchmarks.train_throughput [--quick] [--out PATH] [--models mlp,cnn_bn]
                                          [--torch-threads N]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import machine_info, summarize, time_round_robin, write_results
from shufflesgd import drivers, shuffling
from shufflesgd.nn import data, models, training

DEFAULT_OUT = pathlib.Path("results/benchmarks/train_throughput.json")
LEARNING_RATE = 0.05
MODELS: dict[str, Callable[[], models.Model]] = {
    "mlp": lambda: models.MLP(hidden=(64, 64)),
    "mlp_bn": lambda: models.MLP(hidden=(64, 64), batch_norm=True),
    "cnn": lambda: models.CNN(channels=(16, 32)),
    "cnn_bn": lambda: models.CNN(channels=(16, 32), batch_norm=True),
}
FULL = dict(models=tuple(MODELS), batch_sizes=(32, 256), epochs=2, repeats=7, seed=0)
QUICK = dict(models=("mlp_bn",), batch_sizes=(64,), epochs=1, repeats=2, seed=0)
JAX_WAYS = ("scan", "trainer", "step")

Timer = Callable[[], float]


def digits_train() -> dict[str, np.ndarray]:
    """The digits training split in memory: ``image float32[1536, 8, 8, 1]`` in ``[0, 1]``,
    ``label int32``."""
    arrays = data.scale_images(data.digits_arrays("train"), data.DIGITS_MAX_VALUE)
    return {"image": arrays["image"], "label": arrays["label"].astype(np.int32)}


def jax_timers(
    model: models.Model, arrays: dict[str, np.ndarray], batch_size: int, epochs: int, seed: int
) -> tuple[dict[str, Timer], int]:
    """One timer per JAX way (each call trains ``epochs`` epochs from the same initial state,
    waits for the result and returns the seconds), and the model's parameter count."""
    n = len(arrays["label"])
    scheme = shuffling.random_reshuffle(n)
    optimizer = optax.sgd(LEARNING_RATE)
    trainer = training.make_trainer(
        training.cross_entropy_loss(model), optimizer, scheme, batch_size=batch_size
    )
    init_key, state_key = jax.random.split(jax.random.key(seed))
    params, batch_stats = models.init_model(model, init_key, jnp.asarray(arrays["image"][:1]))
    state = training.init_train_state(state_key, params, batch_stats, optimizer, scheme)
    source = data.ArraySource(arrays)
    device = {name: jnp.asarray(value) for name, value in arrays.items()}

    @jax.jit
    def scan_epochs(
        state: training.TrainState, images: jax.Array, labels: jax.Array
    ) -> training.TrainState:
        def epoch(state: training.TrainState, _: None) -> tuple[training.TrainState, None]:
            return trainer.scan_epoch(state, {"image": images, "label": labels})[0], None

        return jax.lax.scan(epoch, state, length=epochs)[0]

    # The step way visits the same batches as the scan way, placed on the device beforehand.
    orders, scheme_state = [], state.scheme_state
    for epoch in range(epochs):
        scheme_state, order = drivers.epoch_order(scheme, state.scheme_key, scheme_state, epoch)
        orders.append(drivers.minibatches(order, batch_size))
    indices = jnp.concatenate(orders)
    batches = [({name: value[i] for name, value in device.items()}, i) for i in indices]

    def time_scan() -> float:
        start = time.perf_counter()
        jax.block_until_ready(scan_epochs(state, device["image"], device["label"]))
        return time.perf_counter() - start

    def time_trainer() -> float:
        start = time.perf_counter()
        current = state
        for _ in range(epochs):
            current, _ = trainer.run_epoch(current, source)
        jax.block_until_ready(current)
        return time.perf_counter() - start

    def time_step() -> float:
        start = time.perf_counter()
        current = state
        for batch, batch_indices in batches:
            current, _ = trainer.step(current, batch, batch_indices)
        jax.block_until_ready(current)
        return time.perf_counter() - start

    return dict(scan=time_scan, trainer=time_trainer, step=time_step), models.count_params(params)


def torch_model(name: str) -> Any:
    """The PyTorch twin of ``MODELS[name]`` (NCHW input for the CNNs)."""
    import torch
    from torch import nn as tnn

    if name.startswith("mlp"):
        bn = name.endswith("_bn")
        layers: list[Any] = [tnn.Flatten()]
        width_in = 64
        for width in (64, 64):
            layers.append(tnn.Linear(width_in, width, bias=not bn))
            if bn:
                layers.append(tnn.BatchNorm1d(width, eps=1e-5, momentum=0.1))
            layers.append(tnn.ReLU())
            width_in = width
        layers.append(tnn.Linear(width_in, 10))
        return tnn.Sequential(*layers)

    class GlobalMean(tnn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    bn = name.endswith("_bn")
    layers, channels_in = [], 1
    for channels in (16, 32):
        layers.append(tnn.Conv2d(channels_in, channels, 3, padding=1, bias=not bn))  # Flax's SAME
        if bn:
            layers.append(tnn.BatchNorm2d(channels, eps=1e-5, momentum=0.1))
        layers += [tnn.ReLU(), tnn.AvgPool2d(2)]
        channels_in = channels
    layers += [GlobalMean(), tnn.Linear(channels_in, 10)]
    return tnn.Sequential(*layers)


def torch_timer(
    name: str, arrays: dict[str, np.ndarray], batch_size: int, epochs: int, seed: int
) -> tuple[Timer, int]:
    """A timer for the PyTorch loop (fresh copies of one initial network each call) and its
    parameter count."""
    import copy

    import torch

    torch.manual_seed(seed)
    initial = torch_model(name)
    images = torch.from_numpy(arrays["image"])
    images = (
        images.reshape(len(images), -1)
        if name.startswith("mlp")
        else images.permute(0, 3, 1, 2).contiguous()
    )
    labels = torch.from_numpy(arrays["label"].astype(np.int64))
    n = len(labels)
    generator = torch.Generator().manual_seed(seed)

    def run() -> float:
        model = copy.deepcopy(initial).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        start = time.perf_counter()
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for first in range(0, n - batch_size + 1, batch_size):
                batch = order[first : first + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
                loss.backward()
                optimizer.step()
        return time.perf_counter() - start

    return run, sum(p.numel() for p in initial.parameters())


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def bench_row(
    name: str, batch_size: int, cfg: dict[str, Any], arrays: dict[str, np.ndarray], peer: bool
) -> dict[str, Any]:
    timers, num_params = jax_timers(MODELS[name](), arrays, batch_size, cfg["epochs"], cfg["seed"])
    row: dict[str, Any] = dict(params=num_params)
    if peer:
        timers["torch"], row["torch_params"] = torch_timer(
            name, arrays, batch_size, cfg["epochs"], cfg["seed"]
        )
    first, times = time_round_robin(timers, cfg["repeats"], self_timed=True)  # the warm-up compiles
    examples = cfg["epochs"] * (len(arrays["label"]) // batch_size) * batch_size
    for way in timers:
        seconds = summarize(times[way])
        row[way] = dict(
            seconds=seconds,
            first_call_seconds=first[way],
            examples_per_second=examples / seconds["median"],
        )
    if peer:
        for way in ("scan", "trainer"):
            row[f"{way}_to_torch"] = (
                row[way]["examples_per_second"] / row["torch"]["examples_per_second"]
            )
            row[f"{way}_to_torch_paired"] = statistics.median(
                t / s for s, t in zip(times[way], times["torch"])
            )
    return row


def table(results: dict[str, Any]) -> str:
    """Examples/s of every way, the ratios to the peer (paired in brackets) and the scan's
    first call (compilation plus one call), one line per model and batch size."""
    lines = [
        f"{'model':7s} {'batch':>5s} {'scan ex/s':>10s} {'trainer':>10s} {'step':>10s} "
        f"{'torch':>10s} {'scan/torch':>13s} {'trainer/torch':>13s} {'scan 1st s':>10s}"
    ]
    for key, row in results["rows"].items():
        model, batch = key.split("/batch_")
        if "torch" in row:
            ratios = f"{row['torch']['examples_per_second']:10.3g} " + " ".join(
                f"{row[f'{way}_to_torch']:5.2f} ({row[f'{way}_to_torch_paired']:4.2f})"
                for way in ("scan", "trainer")
            )
        else:
            ratios = f"{'-':>10s} {'-':>13s} {'-':>13s}"
        lines.append(
            f"{model:7s} {batch:>5s} "
            + " ".join(f"{row[way]['examples_per_second']:10.3g}" for way in JAX_WAYS)
            + f" {ratios} {row['scan']['first_call_seconds']:10.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (seconds)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--models",
        type=lambda s: tuple(s.split(",")),
        default=None,
        help=f"comma-separated subset of {','.join(MODELS)}",
    )
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.models is not None:
        unknown = sorted(set(args.models) - set(MODELS))
        if unknown:
            parser.error(f"--models must be a subset of {sorted(MODELS)}, got {unknown}")
        cfg["models"] = args.models
    wall = time.perf_counter()
    peer_version = torch_version()
    if peer_version is not None:
        import torch

        torch.set_num_threads(args.torch_threads)
    arrays = digits_train()
    results: dict[str, Any] = dict(
        config=dict(
            cfg,
            learning_rate=LEARNING_RATE,
            num_examples=len(arrays["label"]),
            torch_threads=args.torch_threads,
        ),
        machine=machine_info("torch", "flax", "optax"),
        peer=f"torch {peer_version}" if peer_version else "not installed",
        rows={},
    )
    for name in cfg["models"]:
        for batch_size in cfg["batch_sizes"]:
            print(f"{name}, batch {batch_size} ...", file=sys.stderr)
            results["rows"][f"{name}/batch_{batch_size}"] = bench_row(
                name, batch_size, cfg, arrays, peer_version is not None
            )
    results["total_seconds"] = time.perf_counter() - wall
    return write_results(args.out, results, table(results))


if __name__ == "__main__":
    main()
