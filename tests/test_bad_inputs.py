"""Bad inputs to the shuffling, compression, diffusion and problems families.

Every bad call must raise a library ``ValueError`` / ``TypeError`` whose message names the
argument, from a Python frame of ``shufflesgd`` (not from inside JAX), before anything is
compiled.  The explicit tests pin the cases of issue 12; :data:`CASES` is a table of
(call, argument name, bad values) that :func:`test_every_bad_input_is_named` runs in full
and :func:`test_bad_inputs_property` samples with hypothesis (random sizes, NaN positions,
integer dtypes and key forms).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shufflesgd import compression, diffusion, problems, shuffling
from shufflesgd._checks import check_key

D = 3  # the dimension of every small problem below
N = 4  # examples of the finite sum, workers of the distributed sum


def _finite_sum() -> problems.FiniteSum:
    a, b = problems.synthetic_regression(0, N, D)
    return problems.least_squares(a, b, l2=0.1)


def _distributed_sum() -> problems.DistributedSum:
    a, b = problems.heterogeneous_regression(0, N, 2, D, spread=2.0)
    return problems.distributed_least_squares(a, b, N, l2=0.1)


FINITE_SUM = _finite_sum()
DISTRIBUTED_SUM = _distributed_sum()
X = jnp.ones(D)
GRADS = jnp.ones((N, D))
X0 = jnp.zeros(D)
X_2D = jnp.zeros(2)
SDE = diffusion.make_sde("vp")
GRID = diffusion.time_grid(SDE, "uniform_time", 4)
MODEL = diffusion.mixture_model(SDE, problems.three_mode_mixture_2d().eigen())


def _fresh(key):
    """A fresh key for a default argument (the key-reuse checker rejects a consumed one)."""
    return jax.random.key(0) if key is None else key


def _sgd_run(key=None, x0=X0, learning_rate=0.01):
    key = _fresh(key)
    run = shuffling.make_sgd_run(FINITE_SUM, shuffling.random_reshuffle(N), num_epochs=1)
    return run(key, x0, learning_rate)


def _distributed_run(key=None, x0=X0, step_size=0.01):
    key = _fresh(key)
    method = compression.ef21(compression.top_k(1))
    run = compression.make_distributed_run(DISTRIBUTED_SUM, method, num_steps=2)
    return run(key, x0, step_size)


def _ef_step(factory, key=None, grads=GRADS, step_size=0.1):
    key = _fresh(key)
    method = factory(compression.top_k(1))
    state = method.init(jax.random.key(1), X, N, GRADS)
    return method.step(key, state, grads, step_size)


def _ef_init(factory, key=None, x0=X):
    key = _fresh(key)
    return factory(compression.top_k(1)).init(key, x0, N, GRADS)


def _compress(compressor, key=None, x=X):
    key = _fresh(key)
    state = compressor.init(jax.random.key(1), np.shape(x))
    return compressor.step(key, state, x)


def _sample(sampler, key=None, x=X_2D):
    key = _fresh(key)
    return sampler(key, MODEL, SDE, x, GRID)


def _mixture(weights=(0.5, 0.5), means=((0.0, 0.0), (1.0, 1.0)), covariances=None):
    if covariances is None:
        covariances = np.stack([np.eye(2), np.eye(2)])
    return problems.gaussian_mixture(weights, means, covariances)


EF_METHODS = {"compressed_gd": compression.compressed_gd, "ef14": compression.ef14}
EF_METHODS["ef21"] = compression.ef21


# bad values, by kind; each a function of a hypothesis draw (an int) so that the property test
# varies them and the table test takes draw 0
def _bad_keys(i: int) -> list[Any]:
    return [
        1 + i,
        float(i),
        jnp.zeros(2, jnp.float32) + i,
        np.arange(3 + i, dtype=np.uint32),
        jnp.zeros((2,), jnp.int32),
    ]


def _bad_vectors(i: int) -> list[Any]:
    """Wrong lengths, wrong rank and integer dtypes for a float vector of length D."""
    return [
        jnp.zeros(D + 1 + i),
        jnp.zeros(max(D - 1 - i, 0)),
        jnp.zeros((D, 1 + i)),
        jnp.arange(D),
        np.arange(D, dtype=np.int64 if i % 2 else np.int8),
    ]


def _bad_grads(i: int) -> list[Any]:
    return [
        jnp.ones((N + 1 + i, D)),
        jnp.ones((N, D + 1 + i)),
        jnp.ones(D),
        jnp.ones((N, D), jnp.int32),
    ]


def _bad_positive(i: int) -> list[Any]:
    return [math.nan, -1.0 - i, 0.0, math.inf]


def _with_nan(i: int, shape: tuple[int, ...]) -> np.ndarray:
    a = np.ones(shape)
    a.flat[i % a.size] = np.nan
    return a


A, B = problems.synthetic_regression(0, 6, D)

#: (label, call taking the bad value, argument name, bad values of draw i)
CASES: list[tuple[str, Callable[[Any], Any], str, Callable[[int], list[Any]]]] = [
    ("make_sgd_run run key", lambda v: _sgd_run(key=v), "key", _bad_keys),
    ("make_sgd_run run x0", lambda v: _sgd_run(x0=v), "x0", _bad_vectors),
    ("make_distributed_run run key", lambda v: _distributed_run(key=v), "key", _bad_keys),
    ("make_distributed_run run x0", lambda v: _distributed_run(x0=v), "x0", _bad_vectors),
    (
        "make_distributed_run run step_size",
        lambda v: _distributed_run(step_size=v),
        "step_size",
        _bad_positive,
    ),
    *[
        (f"{name}.step key", lambda v, f=f: _ef_step(f, key=v), "key", _bad_keys)
        for name, f in EF_METHODS.items()
    ],
    *[
        (f"{name}.step grads", lambda v, f=f: _ef_step(f, grads=v), "grads", bad)
        for name, f in EF_METHODS.items()
        # compressed GD keeps no per-worker state: any number of workers is a good call
        for bad in [(lambda i: _bad_grads(i)[1:]) if name == "compressed_gd" else _bad_grads]
    ],
    *[
        (
            f"{name}.step step_size",
            lambda v, f=f: _ef_step(f, step_size=v),
            "step_size",
            _bad_positive,
        )
        for name, f in EF_METHODS.items()
    ],
    *[
        (f"{name}.init key", lambda v, f=f: _ef_init(f, key=v), "key", _bad_keys)
        for name, f in EF_METHODS.items()
    ],
    *[
        (f"{name}.step key", lambda v, c=c: _compress(c, key=v), "key", _bad_keys)
        for name, c in {
            "top_k": compression.top_k(1),
            "rand_k": compression.rand_k(1),
            "qsgd": compression.qsgd(2),
            "power_sgd": compression.power_sgd(1),
        }.items()
    ],
    *[
        (
            f"{name}.step x",
            lambda v, c=c: _compress(c, x=v),
            "x",
            lambda i: [jnp.arange(D + i), np.arange(D, dtype=np.int8), [1, 2, 3]],
        )
        for name, c in {
            "identity": compression.identity(),
            "top_k": compression.top_k(1),
            "rand_k": compression.rand_k(1),
            "sign": compression.sign(),
            "natural_compression": compression.natural_compression(),
        }.items()
    ],
    *[
        (f"{name}.{method} key", call, "key", _bad_keys)
        for name, scheme in {
            "random_reshuffle": shuffling.random_reshuffle(N),
            "incremental": shuffling.incremental(N),
            "flipflop": shuffling.flipflop(N),
            "grab_mean_balance": shuffling.grab_mean_balance(N),
        }.items()
        for method, call in [
            ("init", lambda v, s=scheme: s.init(v, X)),
            ("step", lambda v, s=scheme: s.step(v, s.init(jax.random.key(2), X))),
        ]
    ],
    *[
        (
            f"{name}.init params",
            lambda v, s=scheme: s.init(jax.random.key(2), v),
            "params",
            lambda i: [jnp.zeros(D + i, jnp.int32), {}, {"w": np.arange(D + i)}, []],
        )
        for name, scheme in {
            "grab_mean_balance": shuffling.grab_mean_balance(N),
            "grab_pair_balance": shuffling.grab_pair_balance(N),
        }.items()
    ],
    (
        "top_k(k > d).step",
        lambda v: _compress(compression.top_k(D + 1 + v), x=X),
        "k",
        lambda i: [i],
    ),
    (
        "rand_k(k > d).step",
        lambda v: _compress(compression.rand_k(D + 1 + v), x=X),
        "k",
        lambda i: [i],
    ),
    *[
        (f"{name} key", lambda v, s=s: _sample(s, key=v), "key", _bad_keys)
        for name, s in {
            "euler_maruyama": diffusion.euler_maruyama,
            "ddim": diffusion.ddim,
            "predictor_corrector": diffusion.predictor_corrector,
            "edm_heun": diffusion.edm_heun,
            "restart": diffusion.restart,
        }.items()
    ],
    (
        "euler_maruyama x",
        lambda v: _sample(diffusion.euler_maruyama, x=v),
        "x",
        lambda i: [jnp.arange(2 + i)],
    ),
    (
        "pf_ode_euler x",
        lambda v: _sample(diffusion.pf_ode_euler, x=v),
        "x",
        lambda i: [jnp.arange(2 + i)],
    ),
    (
        "least_squares features",
        lambda v: problems.least_squares(v, np.ones(len(v))),
        "features",
        lambda i: [_with_nan(i, (6, D)), np.full((5, D), np.inf), np.ones((0, D)), np.ones((6, 0))],
    ),
    (
        "least_squares targets",
        lambda v: problems.least_squares(A, v),
        "targets",
        lambda i: [_with_nan(i, (6,)), np.ones(6 + 1 + i)],
    ),
    (
        "least_squares l2",
        lambda v: problems.least_squares(A, B, l2=v),
        "l2",
        lambda i: [math.nan, -1.0 - i],
    ),
    (
        "logistic_regression features",
        lambda v: problems.logistic_regression(v, np.ones(len(v)), 0.1),
        "features",
        lambda i: [_with_nan(i, (6, D)), np.ones((0, D))],
    ),
    (
        "logistic_regression l2",
        lambda v: problems.logistic_regression(A, np.sign(B) + (B == 0), v),
        "l2",
        lambda i: [math.nan, 0.0, -1.0 - i],
    ),
    (
        "gaussian_mixture weights",
        lambda v: _mixture(weights=v),
        "weights",
        lambda i: [(math.nan, 0.5), (0.5, -i), (1.0,), (0.5, math.inf)],
    ),
    (
        "gaussian_mixture means",
        lambda v: _mixture(means=v),
        "means",
        lambda i: [np.ones(2 + i), _with_nan(i, (2, 2)), np.ones((0, 2))],
    ),
    (
        "gaussian_mixture covariances",
        lambda v: _mixture(covariances=v),
        "covariances",
        lambda i: [
            np.stack([np.eye(2), -np.eye(2)]),
            np.stack([np.eye(2), np.array([[1.0, 2.0], [0.0, 1.0]])]),
            np.stack([np.eye(2 + 1 + i)] * 2),
            np.eye(2),
            _with_nan(i, (2, 2, 2)),
        ],
    ),
    *[
        (
            f"make_sde({name!r}, {option}=...)",
            lambda v, n=name, o=option: diffusion.make_sde(n, **{o: v}),
            option,
            lambda i: [math.nan, -5.0 - i, math.inf, 0.0],
        )
        for name, option in [
            ("vp", "beta_min"),
            ("vp", "beta_max"),
            ("subvp", "beta_min"),
            ("ve", "sigma_min"),
            ("ve", "sigma_max"),
            ("edm", "sigma_min"),
            ("edm", "sigma_max"),
        ]
    ],
    (
        "make_sde('vp', beta_min > beta_max)",
        lambda v: diffusion.make_sde("vp", beta_min=v, beta_max=1.0),
        "beta_min",
        lambda i: [1.0, 2.0 + i],
    ),
    (
        "make_sde('ve', sigma_min > sigma_max)",
        lambda v: diffusion.make_sde("ve", sigma_min=v, sigma_max=1.0),
        "sigma_min",
        lambda i: [1.0, 2.0 + i],
    ),
    (
        "make_sde('vp', t_min=...)",
        lambda v: diffusion.make_sde("vp", t_min=v),
        "t_min",
        lambda i: [math.nan, -0.5 - i, 1.0 + i],
    ),
    (
        "time_grid t_min",
        lambda v: diffusion.time_grid(SDE, "uniform_time", 4, t_min=v),
        "t_min",
        lambda i: [-0.5 - i, math.nan, 1.0 + i],
    ),
    (
        "time_grid t_max",
        lambda v: diffusion.time_grid(SDE, "uniform_time", 4, t_max=v),
        "t_max",
        lambda i: [math.nan, math.inf],
    ),
]


def _bad_calls(draw: int) -> list[tuple[str, Callable[[Any], Any], str, Any]]:
    return [
        (label, call, name, value) for label, call, name, values in CASES for value in values(draw)
    ]


def _assert_named(call: Callable[[Any], Any], name: str, value: Any) -> None:
    """``call(value)`` raises a library error naming ``name`` from a ``shufflesgd`` frame."""
    with pytest.raises((ValueError, TypeError)) as excinfo:
        call(value)
    assert name in str(excinfo.value), (name, str(excinfo.value))
    raised_in = str(excinfo.traceback[-1].path)
    assert "shufflesgd" in raised_in and "/jax/" not in raised_in, raised_in


BAD_CALLS = _bad_calls(0)


@pytest.mark.parametrize(
    ("call", "name", "value"),
    [(call, name, value) for _, call, name, value in BAD_CALLS],
    ids=[f"{label}-{i}" for i, (label, *_) in enumerate(BAD_CALLS)],
)
def test_every_bad_input_is_named(call, name, value):
    _assert_named(call, name, value)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=st.sampled_from(range(len(CASES))), draw=st.integers(0, 5), pick=st.integers(0, 10))
def test_bad_inputs_property(case, draw, pick):
    _, call, name, values = CASES[case]
    options = values(draw)
    _assert_named(call, name, options[pick % len(options)])


def test_good_inputs_still_run():
    """The checks let good calls through (the runs' and samplers' own tests run them too)."""
    for factory in EF_METHODS.values():
        _ef_step(factory)
        _ef_step(factory, key=jax.random.PRNGKey(0))
    for compressor in (compression.top_k(D), compression.rand_k(1), compression.power_sgd(1)):
        _compress(compressor)
        _compress(compressor, key=jax.random.PRNGKey(1))
    _mixture()
    diffusion.time_grid(SDE, "uniform_time", 4, t_min=0.0)


def test_traced_keys_and_values_pass():
    """A traced key of the right kind passes, as does a traced step size."""
    top_k = compression.top_k(1)
    jax.jit(lambda k, x: top_k.step(k, None, x))(jax.random.key(1), X)
    method = compression.ef21(top_k)
    state = method.init(jax.random.key(1), X, N, GRADS)
    jax.jit(method.step)(jax.random.key(1), state, GRADS, 0.1)
    jax.vmap(lambda k: check_key("key", k))(jax.random.split(jax.random.key(1), 3))
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        jax.jit(lambda k, x: top_k.step(k, None, x))(jnp.zeros(2), X)


def _counting_model(traced: list[int]) -> diffusion.Model:
    def fn(x, t):
        traced.append(1)
        return MODEL.fn(x, t)

    return diffusion.Model(fn, "score")


@pytest.mark.parametrize("name", sorted(diffusion.SAMPLERS))
def test_sampler_errors_come_before_the_model_is_traced(name):
    """A bad key (for a sampler that draws noise), a bad grid, a bad final step or an integer
    x_T is named before the sampler traces its model, so nothing was compiled: the model
    records every trace (a good call traces it: see the test below)."""
    traced = []
    model = _counting_model(traced)
    spec = diffusion.SAMPLERS[name]
    bad_calls = [
        lambda: spec.sampler(jax.random.key(0), model, SDE, jnp.zeros(2, jnp.int32), GRID),
        lambda: spec.sampler(jax.random.key(0), model, SDE, X_2D, GRID[::-1]),
        lambda: spec.sampler(jax.random.key(0), model, SDE, X_2D, GRID, final="denoised"),
    ]
    if spec.nfe_per_step is not None and spec.cost().noise_draws_per_step > 0:
        bad_calls.append(lambda: spec.sampler(jnp.zeros(2), model, SDE, X_2D, GRID))
    for call in bad_calls:
        with pytest.raises((ValueError, TypeError)):
            call()
    assert traced == []


def test_a_good_sampler_call_traces_the_counting_model():
    traced = []
    diffusion.euler_maruyama(jax.random.key(0), _counting_model(traced), SDE, X_2D, GRID)
    assert traced


def test_rand_k_rejects_integer_input_that_would_truncate_its_scale():
    with pytest.raises(TypeError, match="x must be a float array"):
        compression.rand_k(1).step(jax.random.key(1), None, jnp.arange(4))


def test_top_k_with_k_above_d_is_the_library_check():
    with pytest.raises(ValueError, match=r"k=5 exceeds the dimension d=3"):
        compression.top_k(5).step(jax.random.key(1), None, X)


def test_ef21_step_rejects_mismatched_gradients_and_nan_step_size():
    method = compression.ef21(compression.top_k(1))
    state = method.init(jax.random.key(1), X, N)
    with pytest.raises(ValueError, match=r"grads must be .*\[num_workers, \*x.shape\]"):
        method.step(jax.random.key(1), state, jnp.ones((N, D + 1)), 0.1)
    with pytest.raises(ValueError, match="step_size must be positive and finite"):
        method.step(jax.random.key(1), state, GRADS, math.nan)


def test_time_grid_rejects_negative_times():
    with pytest.raises(ValueError, match="t_min must be non-negative"):
        diffusion.time_grid(SDE, "uniform_time", 4, t_min=-0.5)
    with pytest.raises(ValueError, match="t_min must be below t_max"):
        diffusion.time_grid(SDE, "uniform_time", 4, t_min=0.5, t_max=0.5)


def test_bad_input_counts():
    """The numbers for the README: every bad call of the table is named."""
    named = 0
    for _, call, name, value in BAD_CALLS:
        try:
            call(value)
        except (ValueError, TypeError) as error:
            named += name in str(error)
    print(f"bad inputs tried {len(BAD_CALLS)}, named {named}")
    assert named == len(BAD_CALLS)
