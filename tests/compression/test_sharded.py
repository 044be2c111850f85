"""The sharded distributed run, on 8 forced CPU devices (tests/conftest.py).

The sharded run must equal the single-device vmapped run, keep the worker data and the
worker-stacked state on the mesh, communicate by all-reduce, and take the method's traced
hyper-parameters like the single-device run.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

from shufflesgd import compression, parallel, problems

M, D, NUM_STEPS = 4, 6, 12

# The suite compiles at XLA's backend optimisation level 0 (tests/conftest.py).  At that level
# XLA:CPU computes EF21-W with natural compression and gradient-initialised memories
# differently in the partitioned program than in the single-device one (1e-2 apart after two
# steps, where the default level agrees to 1e-16), so the runs compared here are compiled at
# the default level, as users run them: the outer jit's options cover the inner programs.
DEFAULT_LEVEL = {"xla_backend_optimization_level": 3}


def at_default_level(fn):
    return jax.jit(lambda *args: fn(*args), compiler_options=DEFAULT_LEVEL)


def make_problem(num_workers: int) -> problems.DistributedSum:
    a, b = problems.heterogeneous_regression(0, num_workers, M, D, spread=4.0)
    return problems.distributed_least_squares(a, b, num_workers)


def step_size(problem):
    return 0.2 / float(problem.smoothness)


def no_hyper(problem):
    return ()


METHODS = {
    # name: (method, batch_size, problem -> the method's hyper-parameters)
    "ef21+top_k": (
        lambda: compression.ef21(compression.top_k(2)),
        2,
        no_hyper,
    ),  # EF21-SGD: local shuffled minibatches
    "ef21_pp+rand_k": (
        lambda: compression.ef21_pp(compression.rand_k(2)),
        None,
        lambda problem: (0.5,),
    ),
    "ef21_bc": (
        lambda: compression.ef21_bc(compression.top_k(2), compression.top_k(3)),
        None,
        no_hyper,
    ),
    "ef21_w+natural": (
        lambda: compression.ef21_w(compression.natural_compression(), initial_memory="gradient"),
        None,
        lambda problem: (compression.smoothness_weights(problem.worker_smoothness),),
    ),
}


@functools.cache
def vmapped_run(name: str, num_workers: int) -> compression.DistributedResult:
    """The single-device reference (float64), computed once per method and worker count."""
    make_method, batch_size, hyper = METHODS[name]
    problem = make_problem(num_workers)
    run = compression.make_distributed_run(
        problem, make_method(), num_steps=NUM_STEPS, batch_size=batch_size
    )
    return jax.device_get(
        at_default_level(run)(jax.random.key(7), jnp.zeros(D), step_size(problem), *hyper(problem))
    )


LAYOUTS = [(8, 8), (4, 16), (2, 8)]  # (devices, workers)


@pytest.mark.parametrize("num_devices,num_workers", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("name", METHODS)
def test_sharded_run_equals_vmapped_run(x64, name, num_devices, num_workers):
    make_method, batch_size, hyper = METHODS[name]
    problem = make_problem(num_workers)
    options = dict(num_steps=NUM_STEPS, batch_size=batch_size)
    mesh = parallel.worker_mesh(num_devices)
    sharded = compression.make_sharded_distributed_run(problem, make_method(), mesh, **options)
    x0, gamma = jnp.zeros(D), step_size(problem)
    got = at_default_level(sharded)(jax.random.key(7), x0, gamma, *hyper(problem))
    want = vmapped_run(name, num_workers)
    for field in ("params", "grad_norm_sq", "suboptimality"):
        np.testing.assert_allclose(
            getattr(got, field), getattr(want, field), rtol=1e-9, atol=1e-12, err_msg=field
        )
    np.testing.assert_array_equal(got.bits_up, want.bits_up)
    np.testing.assert_array_equal(got.bits_down, want.bits_down)
    assert int(got.diverged_step) == -1
    assert got.params.sharding.is_fully_replicated


def test_problem_data_is_split_over_the_mesh():
    problem = make_problem(16)
    mesh = parallel.worker_mesh(4)
    run = compression.make_sharded_distributed_run(
        problem, compression.ef21(compression.rand_k(2)), mesh, num_steps=3
    )
    features = run.problem.data[0]
    assert features.sharding.is_equivalent_to(NamedSharding(mesh, jax.P("workers")), features.ndim)
    shards = features.addressable_shards
    assert len(shards) == 4 and {s.data.shape for s in shards} == {(4, M, D)}
    assert {s.device for s in shards} == set(mesh.devices.flat)
    assert run.problem.x_star.sharding.is_fully_replicated
    compiled = run.lower(jax.random.key(0), jnp.zeros(D), 0.01).compile()
    problem_in, *_ = compiled.input_shardings[0]
    assert problem_in.data[0].is_equivalent_to(NamedSharding(mesh, jax.P("workers")), 3)


@pytest.mark.parametrize(
    "compressor", [compression.scaled_sign(), compression.rand_k(2), compression.top_k(2)]
)
def test_messages_are_averaged_by_all_reduce_and_selection_stays_local(compressor):
    problem = make_problem(8)
    mesh = parallel.worker_mesh(8)
    run = compression.make_sharded_distributed_run(
        problem, compression.ef21(compressor), mesh, num_steps=3
    )
    hlo = run.lower(jax.random.key(0), jnp.zeros(D), 0.01).compile().as_text()
    assert "all-reduce" in hlo
    # Each device's parameters are its workers' block: [n/k, m, d] = [1, 4, 6].
    assert f"f32[1,{M},{D}]" in hlo
    # Top-k and Rand-k select through compression.top_k_indices, partitioned along the
    # worker axis: no device gathers the other workers' values (plain lax.top_k would).
    assert "all-gather" not in hlo


def test_worker_state_stays_sharded():
    problem = make_problem(8)
    mesh = parallel.worker_mesh(4)
    method = compression.ef21_pp(compression.rand_k(2))
    sharded_problem = compression.shard_problem(mesh, problem)

    @jax.jit
    def two_steps(p, key):
        init_key, *step_keys = jax.random.split(key, 3)
        state = method.init(init_key, jnp.zeros(D), p.num_workers)
        for k in step_keys:
            state, _ = method.step(k, state, p.worker_gradients(state.x), 0.01, 0.5)
        return state

    state = two_steps(sharded_problem, jax.random.key(1))
    workers = NamedSharding(mesh, jax.P("workers"))
    assert state.memory.sharding.is_equivalent_to(workers, 2)
    assert {s.data.shape for s in state.memory.addressable_shards} == {(2, D)}
    assert state.x.sharding.is_fully_replicated


def test_explicit_mesh_from_make_mesh_is_accepted():  # and float32 agrees too
    problem = make_problem(8)
    mesh = jax.make_mesh((2,), ("workers",), devices=jax.devices()[:2])
    assert mesh.axis_types == (AxisType.Explicit,)
    method = compression.ef21(compression.rand_k(2))
    got = compression.make_sharded_distributed_run(problem, method, mesh, num_steps=5)(
        jax.random.key(3), jnp.zeros(D), 0.01
    )
    want = jax.jit(compression.make_distributed_run(problem, method, num_steps=5))(
        jax.random.key(3), jnp.zeros(D), 0.01
    )
    np.testing.assert_allclose(got.params, want.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.suboptimality, want.suboptimality, rtol=1e-5, atol=1e-6)


def test_keys_are_not_reused_and_the_checker_is_on():
    assert jax.config.jax_debug_key_reuse
    mesh = parallel.worker_mesh(8)
    rep = parallel.replicated(mesh)
    # Positive control: the checker sees through a sharded jit.
    reuse = jax.jit(lambda k: jax.random.normal(k) + jax.random.normal(k), in_shardings=rep)
    with pytest.raises(jax.errors.KeyReuseError):
        reuse(jax.random.key(0))
    # The sharded runs (every method above) pass the checker; and one key gives one result.
    problem = make_problem(16)
    run = compression.make_sharded_distributed_run(
        problem, compression.ef21_pp(compression.rand_k(2)), mesh, num_steps=4
    )
    a = run(jax.random.key(5), jnp.zeros(D), 0.01, 0.5)
    b = run(jax.random.key(5), jnp.zeros(D), 0.01, 0.5)
    np.testing.assert_array_equal(a.params, b.params)


def test_sharded_run_rejects_bad_options_before_compiling():
    mesh = parallel.worker_mesh(4)
    with pytest.raises(ValueError, match="mismatched worker counts"):
        compression.make_sharded_distributed_run(
            make_problem(6), compression.ef21(compression.top_k(2)), mesh, num_steps=3
        )
    with pytest.raises(ValueError, match="num_steps"):
        compression.make_sharded_distributed_run(
            make_problem(8), compression.ef21(compression.top_k(2)), mesh, num_steps=0
        )
    run = compression.make_sharded_distributed_run(
        make_problem(8), compression.ef21(compression.top_k(2)), mesh, num_steps=2
    )
    with pytest.raises(ValueError, match="learning_rate"):
        run(jax.random.key(0), jnp.zeros(D), -0.1)


def test_sharded_run_takes_new_weights_without_recompiling(x64):
    """EF21-W's weights are an argument of the one jitted program: three weight vectors,
    one trace, each result equal to the single-device run's."""
    problem = make_problem(8)
    method = compression.ef21_w(compression.natural_compression())
    once = method._replace(step=chex.assert_max_traces(method.step, n=1))
    sharded = at_default_level(
        compression.make_sharded_distributed_run(
            problem, once, parallel.worker_mesh(4), num_steps=NUM_STEPS
        )
    )
    single = at_default_level(
        compression.make_distributed_run(problem, method, num_steps=NUM_STEPS)
    )
    rng = np.random.default_rng(0)
    for weights in (
        compression.smoothness_weights(problem.worker_smoothness),
        np.full(8, 1 / 8),
        rng.dirichlet(np.ones(8)),
    ):
        got = sharded(jax.random.key(1), jnp.zeros(D), 0.01, weights)
        want = single(jax.random.key(1), jnp.zeros(D), 0.01, weights)
        np.testing.assert_allclose(got.params, want.params, rtol=1e-9, atol=1e-12)
