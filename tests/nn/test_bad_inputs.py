"""Bad inputs to the network family (models, training, data, checkpoints): each a library
``ValueError`` / ``TypeError`` naming the argument, raised from a ``shufflesgd`` frame before
anything is compiled or written.  :data:`CASES` is run in full and sampled with hypothesis."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shufflesgd import diffusion, shuffling
from shufflesgd.nn import checkpoint, data, models, training

SCHEME = shuffling.random_reshuffle(8)
MLP = models.MLP(hidden=(4,), num_classes=3)
X = jnp.ones((2, 5))


def _bad_keys(i: int) -> list[Any]:
    return [1 + i, float(i), jnp.zeros(2, jnp.float32) + i, np.arange(3 + i, dtype=np.uint32)]


def _bad_counts(i: int) -> list[Any]:
    """Not a positive int: zero, negatives, floats, bools, strings."""
    return [0, -1 - i, 2.5 + i, True, "4", math.nan]


def _bad_steps(i: int) -> list[Any]:
    """Not a non-negative int."""
    return [-1 - i, 1.5 + i, "3", None]


def _checkpointer(tmp_path_factory_dir: str, **options: Any) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(tmp_path_factory_dir, "bad-inputs", **options)


def _save(step: Any, directory: str) -> None:
    with _checkpointer(directory) as ckpt:
        ckpt.save(step, {"w": jnp.ones(2)})


#: (label, call taking (bad value, a fresh directory), argument name, bad values of draw i)
CASES: list[tuple[str, Callable[[Any, str], Any], str, Callable[[int], list[Any]]]] = [
    ("init_model key", lambda v, d: models.init_model(MLP, v, X), "key", _bad_keys),
    (
        "init_train_state key",
        lambda v, d: training.init_train_state(v, {"w": X}, {}, optax.sgd(0.1), SCHEME),
        "key",
        _bad_keys,
    ),
    (
        "sinusoidal_embedding dim",
        lambda v, d: models.sinusoidal_embedding(jnp.ones(2), v),
        "dim",
        lambda i: [3 + 2 * i, *_bad_counts(i)],
    ),
    (
        "make_trainer batch_size",
        lambda v, d: training.make_trainer(None, optax.sgd(0.1), SCHEME, batch_size=v),
        "batch_size",
        lambda i: [3 + 2 * i, 16 + i, *_bad_counts(i)],
    ),
    (
        "denoising_score_matching_loss prediction",
        lambda v, d: training.denoising_score_matching_loss(
            MLP, diffusion.make_sde("vp"), prediction=v
        ),
        "prediction",
        lambda i: ["epsilon", "", f"x{i + 1}"],
    ),
    (
        "denoising_score_matching_loss weighting",
        lambda v, d: training.denoising_score_matching_loss(
            MLP, diffusion.make_sde("vp"), weighting=v
        ),
        "weighting",
        lambda i: ["likelihood_weighted", f"w{i}"],
    ),
    (
        "ArraySource arrays",
        lambda v, d: data.ArraySource(v),
        "arrays",
        lambda i: [
            {},
            {"a": np.ones(3 + i), "b": np.ones(4 + i)},
            {"a": np.float32(i)},
        ],
    ),
    (
        "ArraySource indices",
        lambda v, d: data.ArraySource({"a": np.ones(3)})[v],
        "indices",
        lambda i: [
            np.array([0.5 + i]),
            np.array([3 + i]),
            np.array([-1 - i]),
            np.ones((2, 2), int),
        ],
    ),
    (
        "load_source split",
        lambda v, d: data.load_source("digits", v, data_dir=d),
        "split",
        lambda i: ["validation", f"train[{i}]"],
    ),
    ("sklearn_dataset name", lambda v, d: data.sklearn_dataset(v), "name", lambda i: ["iris"]),
    (
        "Checkpointer experiment",
        lambda v, d: checkpoint.Checkpointer(d, v),
        "experiment",
        lambda i: ["", i, None],
    ),
    (
        "Checkpointer max_to_keep",
        lambda v, d: _checkpointer(d, max_to_keep=v),
        "max_to_keep",
        _bad_counts,
    ),
    ("Checkpointer.save step", lambda v, d: _save(v, d), "step", _bad_steps),
]


def _assert_named(call: Callable[[Any, str], Any], name: str, value: Any, directory: str) -> None:
    with pytest.raises((ValueError, TypeError)) as excinfo:
        call(value, directory)
    assert name in str(excinfo.value), (name, str(excinfo.value))
    raised_in = str(excinfo.traceback[-1].path)
    assert "shufflesgd" in raised_in and "/jax/" not in raised_in, raised_in


BAD_CALLS = [
    (label, call, name, value) for label, call, name, values in CASES for value in values(0)
]


@pytest.mark.parametrize(
    ("call", "name", "value"),
    [(call, name, value) for _, call, name, value in BAD_CALLS],
    ids=[f"{label}-{i}" for i, (label, *_) in enumerate(BAD_CALLS)],
)
def test_every_bad_input_is_named(call, name, value, tmp_path):
    _assert_named(call, name, value, str(tmp_path))


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(range(len(CASES))), draw=st.integers(0, 5), pick=st.integers(0, 10))
def test_bad_inputs_property(case, draw, pick, tmp_path_factory):
    _, call, name, values = CASES[case]
    options = values(draw)
    directory = str(tmp_path_factory.mktemp("ckpt"))
    _assert_named(call, name, options[pick % len(options)], directory)


def test_a_bad_save_writes_nothing(tmp_path):
    """A rejected step leaves the directory without checkpoints."""
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        _save(-1, str(tmp_path))
    with _checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.all_steps() == []


def test_good_inputs_still_run(tmp_path):
    params, _ = models.init_model(MLP, jax.random.key(0), X)
    models.init_model(MLP, jax.random.PRNGKey(0), X)
    training.init_train_state(jax.random.key(1), params, {}, optax.sgd(0.1), SCHEME)
    assert models.sinusoidal_embedding(jnp.ones(2), 4).shape == (2, 4)
    _save(np.int64(3), str(tmp_path))
    with _checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
        assert ckpt.all_steps() == [3]
