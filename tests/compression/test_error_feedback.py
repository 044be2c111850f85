"""Error feedback: exact reductions, a NumPy reference, convergence, bits, and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import compression, parallel, problems, shuffling
from shufflesgd.compression import error_feedback
from support.top_k import numpy_top_k


def quadratic_problem(num_workers=4, spread=30.0, d=6, l2=0.1):
    a, b = problems.heterogeneous_regression(0, num_workers, 8, d, spread=spread)
    return problems.distributed_least_squares(a, b, num_workers, l2=l2)


def run(problem, method, step_size, *hyper, num_steps=200, key=0, **options):
    runner = jax.jit(
        compression.make_distributed_run(problem, method, num_steps=num_steps, **options)
    )
    return runner(jax.random.key(key), jnp.zeros_like(problem.x_star), step_size, *hyper)


def test_identity_compression_reduces_every_method_to_gradient_descent(x64):
    p = quadratic_problem()
    gamma = 1.0 / float(p.smoothness)
    weights = compression.smoothness_weights(p.worker_smoothness)
    gd = run(p, compression.compressed_gd(compression.identity()), gamma)
    x, path = np.zeros(6), []
    for _ in range(200):
        x = x - gamma * np.asarray(p.gradient(jnp.asarray(x)))
        path.append(x)
    np.testing.assert_allclose(gd.params, x, rtol=1e-10)
    np.testing.assert_allclose(
        gd.distance_sq,
        [np.sum((xs - np.asarray(p.x_star)) ** 2) for xs in path],
        rtol=1e-6,
        atol=1e-20,
    )
    for method, hyper in [
        (compression.ef14(compression.identity()), ()),
        (compression.ef21(compression.identity()), ()),
        (compression.ef21_w(compression.identity()), (weights,)),
        (compression.ef21_pp(compression.identity()), (1.0,)),
        (compression.ef21_bc(compression.identity(), compression.identity()), ()),
    ]:
        np.testing.assert_allclose(
            run(p, method, gamma, *hyper).params, x, rtol=1e-9, err_msg=method.name
        )


def numpy_ef21_top_k(worker_grad, n, d, k, gamma, steps):
    """EF21 (Richtárik et al. 2021, Alg. 1) with Top-k, written directly."""

    def top_k(v):
        out = np.zeros_like(v)
        keep = np.argsort(-np.abs(v), kind="stable")[:k]
        out[keep] = v[keep]
        return out

    x, g = np.zeros(d), np.zeros((n, d))
    for _ in range(steps):
        for i in range(n):
            g[i] = g[i] + top_k(worker_grad(i, x) - g[i])
        x = x - gamma * g.mean(axis=0)
    return x


def test_ef21_matches_numpy_reference(x64):
    p = quadratic_problem()
    a, b = (np.asarray(t) for t in p.data[:2])

    def worker_grad(i, x):
        return a[i].T @ (a[i] @ x - b[i]) / a.shape[1] + 0.1 * x

    gamma = compression.ef21_step_size(float(p.smoothness), p.worker_smoothness, 2 / 6)
    ours = run(p, compression.ef21(compression.top_k(2)), gamma, num_steps=50)
    np.testing.assert_allclose(
        ours.params, numpy_ef21_top_k(worker_grad, 4, 6, 2, gamma, 50), rtol=1e-9
    )


@pytest.mark.parametrize(
    "name, reduction", [("ef14", 1e-6), ("ef21", 1e-8), ("ef21_w", 1e-8), ("ef21_bc", 1e-8)]
)
def test_error_feedback_converges_linearly_with_top_k(name, reduction, x64):
    """Strongly convex quadratic: ||grad f||^2 falls geometrically with EF21's theory step size."""
    p = quadratic_problem()
    top = compression.top_k(1)
    alpha = compression.tree_contraction(top, p.x_star)
    gamma = compression.ef21_step_size(
        float(p.smoothness), p.worker_smoothness, alpha, mean="arithmetic"
    )
    weights = compression.smoothness_weights(p.worker_smoothness)
    method = {
        "ef14": compression.ef14(top),
        "ef21": compression.ef21(top),
        "ef21_w": compression.ef21_w(top),
        "ef21_bc": compression.ef21_bc(top, compression.top_k(3)),
    }[name]
    hyper = (weights,) if name == "ef21_w" else ()
    result = run(p, method, gamma, *hyper, num_steps=6000)
    assert int(result.diverged_step) == -1
    assert float(result.grad_norm_sq[-1]) < reduction * float(result.grad_norm_sq[0])


def test_ef21_w_equals_ef21_for_scale_equivariant_compressors(x64):
    """Top-k commutes with scaling, so EF21-W's g_i is EF21's g_i / (n w_i) and the weighted
    average is EF21's: the observation behind "Error Feedback Reloaded"."""
    p = quadratic_problem()
    weights = compression.smoothness_weights(p.worker_smoothness)
    gamma = 1e-3
    a = run(p, compression.ef21(compression.top_k(2)), gamma)
    b = run(p, compression.ef21_w(compression.top_k(2)), gamma, weights)
    np.testing.assert_allclose(a.params, b.params, rtol=1e-8)
    c = run(
        p, compression.ef21_w(compression.natural_compression()), gamma, weights
    )  # not scale-equivariant
    d = run(p, compression.ef21(compression.natural_compression()), gamma)
    assert np.all(np.isfinite(c.params)) and not np.allclose(c.params, d.params)


def test_partial_participation_sends_p_of_the_messages():
    p = quadratic_problem(num_workers=8)
    top = compression.top_k(2)
    result = run(p, compression.ef21_pp(top), 1e-3, 0.25, num_steps=400)
    per_message = compression.tree_bits(top, p.x_star)
    fraction = float(result.bits_up[-1]) / (400 * per_message)
    # participation ~ Binomial(8 * 400, 0.25) / 3200: standard error 0.0077
    assert abs(fraction - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 3200)


def test_bits_are_counted_per_step():
    p = quadratic_problem()
    result = run(
        p, compression.ef21_bc(compression.top_k(2), compression.rand_k(3)), 1e-3, num_steps=10
    )
    np.testing.assert_allclose(result.bits_up, np.arange(1, 11) * 2 * (32 + 3))
    np.testing.assert_allclose(result.bits_down, np.arange(1, 11) * 3 * 32)


def test_compressed_gd_without_feedback_can_fail_where_ef21_converges(x64):
    """Beznosikov et al. (2020), Example 1: n = d = 3, f_i(x) = <a_i, x>^2 + |x|^2 / 2 with
    a_1 = c (-3, 2, 2) and its cyclic shifts. From x = (t, t, t), worker i's gradient is
    largest in coordinate i when c > 1 (c = 1 is a three-way tie), so Top-1 GD steps
    x <- (1 + gamma (6c^2 - 1) / 3) x and grows geometrically for every gamma > 0."""
    c = 1.1
    a = c * np.array([[-3.0, 2, 2], [2, -3, 2], [2, 2, -3]])
    # <a_i, x>^2 + |x|^2 / 2 = 1/2 (sqrt2 a_i^T x)^2 + 1/2 |x|^2: one-row least squares plus ridge 1
    p = problems.distributed_least_squares(np.sqrt(2) * a, np.zeros(3), 3, l2=1.0)
    x0 = jnp.ones(3)
    gamma = compression.ef21_step_size(float(p.smoothness), p.worker_smoothness, 1 / 3)
    diverging = compression.make_distributed_run(
        p, compression.compressed_gd(compression.top_k(1)), num_steps=300
    )(jax.random.key(0), x0, gamma)
    growth = (1 + gamma * (6 * c**2 - 1) / 3) ** 300
    np.testing.assert_allclose(diverging.params, growth * np.ones(3), rtol=1e-8)
    for method in (compression.ef14(compression.top_k(1)), compression.ef21(compression.top_k(1))):
        converging = compression.make_distributed_run(p, method, num_steps=3000)(
            jax.random.key(0), x0, gamma
        )
        assert float(converging.grad_norm_sq[-1]) < 1e-8 * float(converging.grad_norm_sq[0]), (
            method.name
        )


def test_divergence_is_reported_with_its_step():
    p = quadratic_problem()
    result = run(p, compression.ef21(compression.top_k(2)), 1e3, num_steps=300)
    step = int(result.diverged_step)
    assert 0 <= step < 300
    assert np.all(np.isfinite(result.grad_norm_sq[:step])) and not np.isfinite(
        result.grad_norm_sq[step]
    )


def test_ef21_sgd_with_shuffled_minibatches_reaches_a_neighbourhood(x64):
    p = quadratic_problem()
    gamma = 0.2 / float(p.smoothness)
    result = run(
        p,
        compression.ef21(compression.top_k(3)),
        gamma,
        num_steps=2000,
        batch_size=2,
        scheme=shuffling.random_reshuffle(8),
    )
    assert float(result.grad_norm_sq[-1]) < 1e-2 * float(result.grad_norm_sq[0])
    with pytest.raises(ValueError, match="herds gradients"):
        compression.make_distributed_run(
            p,
            compression.ef21(compression.top_k(3)),
            num_steps=8,
            batch_size=2,
            scheme=shuffling.grab_pair_balance(8),
        )
    with pytest.raises(ValueError, match="multiple of the 4 steps"):
        compression.make_distributed_run(
            p, compression.ef21(compression.top_k(3)), num_steps=6, batch_size=2
        )
    with pytest.raises(ValueError, match="scheme is over 9 examples but each worker holds m=8"):
        compression.make_distributed_run(
            p,
            compression.ef21(compression.top_k(3)),
            num_steps=8,
            batch_size=2,
            scheme=shuffling.random_reshuffle(9),
        )
    with pytest.raises(ValueError, match="scheme needs a batch_size"):
        compression.make_distributed_run(
            p,
            compression.ef21(compression.top_k(3)),
            num_steps=8,
            scheme=shuffling.random_reshuffle(8),
        )


def test_same_key_same_bits_and_seeds_vmap():
    p = quadratic_problem()
    method = compression.ef21_pp(compression.rand_k(2))
    runner = compression.make_distributed_run(p, method, num_steps=20)
    a = jax.jit(runner)(jax.random.key(3), jnp.zeros(6), 0.01, 0.5)
    b = jax.jit(runner)(jax.random.key(3), jnp.zeros(6), 0.01, 0.5)
    np.testing.assert_array_equal(a.params, b.params)
    sweep = jax.jit(jax.vmap(runner, in_axes=(0, None, 0, None)))
    batched = sweep(
        jax.random.split(jax.random.key(4), 3), jnp.zeros(6), jnp.array([0.01, 0.02, 0.03]), 0.5
    )
    chex.assert_shape(batched.grad_norm_sq, (3, 20))


def test_participation_can_be_swept_as_a_traced_argument():
    p = quadratic_problem()
    runner = compression.make_distributed_run(
        p, compression.ef21_pp(compression.top_k(2)), num_steps=50
    )

    def by_participation(key, probability):
        return runner(key, jnp.zeros(6), 0.01, probability).bits_up[-1]

    probabilities = jnp.array([0.25, 0.5, 1.0])
    bits = jax.jit(jax.vmap(by_participation))(
        jax.random.split(jax.random.key(0), 3), probabilities
    )
    assert bits[0] < bits[1] < bits[2] and float(bits[2]) == 50 * 2 * (32 + 3)


def test_step_compiles_once():
    p = quadratic_problem()
    method = compression.ef21(compression.top_k(2))
    state = method.init(jax.random.key(0), jnp.zeros(6), 4)
    step = jax.jit(chex.assert_max_traces(method.step, n=1))
    for t in range(3):
        grads = p.worker_gradients(state.x)
        state, info = step(jax.random.key(t), state, grads, jnp.float32(0.01 * (t + 1)))
    assert int(state.step) == 3


def test_ef21_step_size_formula():
    alpha = 0.1
    root = np.sqrt(0.9)
    theta, beta = 1 - root, 0.9 / (1 - root)
    worker = np.array([1.0, 10.0, 100.0])
    quadratic = compression.ef21_step_size(50.0, worker, alpha)
    arithmetic = compression.ef21_step_size(50.0, worker, alpha, mean="arithmetic")
    np.testing.assert_allclose(
        quadratic, 1 / (50 + np.sqrt(np.mean(worker**2)) * np.sqrt(beta / theta))
    )
    np.testing.assert_allclose(arithmetic, 1 / (50 + np.mean(worker) * np.sqrt(beta / theta)))
    assert arithmetic > quadratic
    assert compression.ef21_step_size(50.0, worker, 1.0) == 1 / 50


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: compression.ef21(compression.top_k(2)).init(jax.random.key(0), jnp.zeros(3), 0),
            "num_workers must be a positive int",
        ),
        (
            lambda: compression.ef21_w(compression.top_k(2)).init(
                jax.random.key(0), jnp.zeros(3), 3, None, jnp.array([0.5, 0.5])
            ),
            r"weights must have shape \(3,\)",
        ),
        (lambda: compression.check_weights(jnp.array([0.2, 0.2]), 2), "weights must sum to 1"),
        (lambda: compression.check_participation(0.0), "participation must lie in"),
        (lambda: compression.check_participation(1.5), "participation must lie in"),
        (lambda: compression.ef21_step_size(1.0, [1.0], 0.0), "alpha must lie in"),
        (lambda: compression.ef21_step_size(1.0, [1.0], 0.5, mean="geometric"), "mean must be"),
        (
            lambda: compression.make_distributed_run(
                quadratic_problem(), compression.ef21(compression.top_k(2)), num_steps=0
            ),
            "num_steps",
        ),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("step_size", [-0.1, 0.0, float("nan")])
def test_non_positive_step_size_is_rejected_before_running(step_size):
    p = quadratic_problem()
    runner = compression.make_distributed_run(
        p, compression.ef21(compression.top_k(2)), num_steps=5
    )
    with pytest.raises(ValueError, match="learning_rate must be positive and finite"):
        runner(jax.random.key(0), jnp.zeros(6), step_size)


def dirichlet_weights(num_workers, seed):
    return np.random.default_rng(seed).dirichlet(np.ones(num_workers))


def test_ef21_w_weights_are_traced_one_program_serves_a_vmapped_sweep(x64):
    """House rule 8: the weights are a step argument, so new values reuse the compiled run,
    and a vmap over weight vectors equals the runs one by one."""
    p = quadratic_problem()
    weights = np.stack(
        [
            compression.smoothness_weights(p.worker_smoothness),
            np.full(4, 0.25),
            dirichlet_weights(4, 0),
            dirichlet_weights(4, 1),
        ]
    )
    compression.check_weights(weights, 4)  # a sweep's stack is checked before vmapping
    # Natural compression is not scale-equivariant, so the weights change the iterates.
    runner = compression.make_distributed_run(
        p, compression.ef21_w(compression.natural_compression()), num_steps=30
    )
    once = jax.jit(chex.assert_max_traces(runner, n=1))
    x0 = jnp.zeros(6)
    separate = [once(jax.random.key(2), x0, 1e-3, w) for w in weights]  # the same key each time
    swept = jax.jit(jax.vmap(runner, in_axes=(None, None, None, 0)))(
        jax.random.key(2), x0, 1e-3, weights
    )
    for i, result in enumerate(separate):
        np.testing.assert_allclose(
            swept.params[i], result.params, rtol=1e-10, atol=1e-12, err_msg=str(i)
        )
        np.testing.assert_allclose(
            swept.grad_norm_sq[i], result.grad_norm_sq, rtol=1e-9, err_msg=str(i)
        )
    assert not np.allclose(separate[0].params, separate[1].params)


def test_ef21_pp_participation_is_traced_one_program_serves_a_vmapped_sweep(x64):
    p = quadratic_problem(num_workers=8)
    runner = compression.make_distributed_run(
        p, compression.ef21_pp(compression.rand_k(2)), num_steps=40
    )
    once = jax.jit(chex.assert_max_traces(runner, n=1))
    x0 = jnp.zeros(6)
    probabilities = np.array([0.2, 0.5, 0.9, 1.0])
    separate = [once(jax.random.key(5), x0, 1e-3, q) for q in probabilities]
    swept = jax.jit(jax.vmap(runner, in_axes=(None, None, None, 0)))(
        jax.random.key(5), x0, 1e-3, probabilities
    )
    for i, result in enumerate(separate):
        np.testing.assert_array_equal(swept.bits_up[i], result.bits_up, err_msg=str(i))
        np.testing.assert_allclose(
            swept.params[i], result.params, rtol=1e-10, atol=1e-12, err_msg=str(i)
        )
    assert float(separate[-1].bits_up[-1]) == 40 * 2 * 32  # p = 1: every worker every step


@pytest.mark.parametrize(
    "method, hyper, error, match",
    [
        (
            compression.ef21_w(compression.top_k(2)),
            (np.array([0.5, 0.5, 0.0, 0.0]),),
            ValueError,
            "weights must be positive",
        ),
        (
            compression.ef21_w(compression.top_k(2)),
            (np.full(4, 0.3),),
            ValueError,
            "weights must sum to 1",
        ),
        (
            compression.ef21_w(compression.top_k(2)),
            (np.full(3, 1 / 3),),
            ValueError,
            r"weights must have shape \(4,\)",
        ),
        (
            compression.ef21_w(compression.top_k(2)),
            (np.full((2, 4), 0.25),),
            ValueError,
            r"weights must have shape \(4,\)",
        ),
        (
            compression.ef21_w(compression.top_k(2)),
            (),
            TypeError,
            r"ef21_w takes the hyper-parameters \('weights',\)",
        ),
        (
            compression.ef21_pp(compression.top_k(2)),
            (0.0,),
            ValueError,
            "participation must lie in",
        ),
        (
            compression.ef21_pp(compression.top_k(2)),
            (np.array([0.5, 0.5]),),
            ValueError,
            "participation must be a scalar",
        ),
        (
            compression.ef21(compression.top_k(2)),
            (0.5,),
            TypeError,
            r"ef21 takes the hyper-parameters \(\)",
        ),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_bad_hyper_parameters_are_rejected_before_compiling(method, hyper, error, match):
    # A step traced at all would fail: the check must come before anything is traced.
    untraced = method._replace(step=chex.assert_max_traces(method.step, n=0))
    runner = compression.make_distributed_run(quadratic_problem(), untraced, num_steps=5)
    with pytest.raises(error, match=match):
        runner(jax.random.key(0), jnp.zeros(6), 0.01, *hyper)
    mesh = jax.make_mesh((1,), ("workers",))
    sharded = compression.make_sharded_distributed_run(
        quadratic_problem(), untraced, mesh, num_steps=5
    )
    with pytest.raises(error, match=match):
        sharded(jax.random.key(0), jnp.zeros(6), 0.01, *hyper)


@pytest.mark.parametrize("initial_memory", ["zero", "gradient", "compressed_gradient"])
def test_initial_memory_against_a_hand_computed_first_step(initial_memory, x64):
    """g_i^0 = 0, grad f_i(x0) or C(grad f_i(x0)) (Richtárik, Sokolov, Fatkhullin 2021, Alg. 1),
    then one step g_i <- g_i + C(grad f_i(x0) - g_i), x1 = x0 - gamma mean_i g_i, with Top-2."""
    p = quadratic_problem()
    x0 = jnp.asarray(np.random.default_rng(3).standard_normal(6))
    grads = np.asarray(p.worker_gradients(x0))
    gamma, k = 0.05, 2
    start = {
        "zero": np.zeros_like(grads),
        "gradient": grads,
        "compressed_gradient": np.stack([numpy_top_k(g, k) for g in grads]),
    }[initial_memory]
    memory = start + np.stack([numpy_top_k(g, k) for g in grads - start])
    x1 = np.asarray(x0) - gamma * memory.mean(axis=0)

    method = compression.ef21(compression.top_k(k), initial_memory=initial_memory)
    state = method.init(jax.random.key(0), x0, 4, p.worker_gradients(x0))
    np.testing.assert_allclose(state.memory, start, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(state.estimate, start.mean(axis=0), rtol=1e-12, atol=1e-15)
    state, info = method.step(jax.random.key(1), state, p.worker_gradients(x0), gamma)
    np.testing.assert_allclose(state.memory, memory, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(state.x, x1, rtol=1e-12)
    if initial_memory == "gradient":  # nothing left to send: a plain gradient step
        np.testing.assert_allclose(
            state.x, np.asarray(x0) - gamma * np.asarray(p.gradient(x0)), rtol=1e-12
        )

    per_message = 2 * (32 + 3)
    initial = {"zero": 0, "gradient": 32 * 6, "compressed_gradient": per_message}[initial_memory]
    assert method.initial_bits(x0) == initial and float(info.bits_up) == per_message
    result = compression.make_distributed_run(p, method, num_steps=3)(jax.random.key(0), x0, gamma)
    np.testing.assert_array_equal(result.bits_up, initial + per_message * np.arange(1, 4))


def test_ef21_w_initial_memory_is_the_scaled_gradient(x64):
    p = quadratic_problem()
    x0 = jnp.ones(6)
    grads = np.asarray(p.worker_gradients(x0))
    weights = compression.smoothness_weights(p.worker_smoothness)
    method = compression.ef21_w(compression.top_k(2), initial_memory="gradient")
    state = method.init(jax.random.key(0), x0, 4, p.worker_gradients(x0), weights)
    np.testing.assert_allclose(state.memory, grads / (4 * weights[:, None]), rtol=1e-12)
    np.testing.assert_allclose(
        state.estimate, np.asarray(p.gradient(x0)), rtol=1e-10
    )  # sum_i w_i g_i = grad f
    with pytest.raises(ValueError, match="pass them to init"):
        method.init(jax.random.key(0), x0, 4, p.worker_gradients(x0))


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda p: compression.ef21(compression.top_k(2), initial_memory="gradient").init(
                jax.random.key(0), jnp.zeros(6), 4
            ),
            "pass worker_grads",
        ),
        (
            lambda p: compression.ef21_bc(
                compression.top_k(2), compression.top_k(2), initial_memory="compressed_gradient"
            ).init(jax.random.key(0), jnp.zeros(6), 4),
            "pass worker_grads",
        ),
        (
            lambda p: compression.ef21(compression.top_k(2), initial_memory="gradient").init(
                jax.random.key(0), jnp.zeros(6), 4, jnp.zeros((3, 6))
            ),
            "worker_grads must be shaped like x0",
        ),
        (
            lambda p: compression.ef21(compression.top_k(2), initial_memory="full"),
            "initial_memory must be one of",
        ),
    ],
)
def test_initial_memory_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(quadratic_problem())


def minibatch_run(problem, method, step_size, *hyper, num_steps=40, key=0):
    """A jitted run on local random-reshuffling minibatches of 2 (EF21-SGD's gradients)."""
    runner = compression.make_distributed_run(
        problem,
        method,
        num_steps=num_steps,
        batch_size=2,
        scheme=shuffling.random_reshuffle(problem.examples_per_worker),
    )
    return jax.jit(runner)(jax.random.key(key), jnp.zeros_like(problem.x_star), step_size, *hyper)


def test_ef21_sgdm_at_momentum_one_and_ef21_hb_at_momentum_zero_are_ef21(x64):
    """eta = 1 makes v_i the stochastic gradient, eta = 0 makes v the estimate g: EF21-SGD."""
    p = quadratic_problem()
    gamma = 0.2 / float(p.smoothness)
    top = compression.top_k(2)
    want = minibatch_run(p, compression.ef21(top), gamma)
    for method, eta in [(error_feedback.ef21_sgdm(top), 1.0), (error_feedback.ef21_hb(top), 0.0)]:
        got = minibatch_run(p, method, gamma, eta)
        np.testing.assert_allclose(got.params, want.params, rtol=1e-12, err_msg=method.name)
        np.testing.assert_allclose(
            got.grad_norm_sq, want.grad_norm_sq, rtol=1e-12, err_msg=method.name
        )
        np.testing.assert_array_equal(got.bits_up, want.bits_up)
        # and a momentum that matters moves the iterates elsewhere
        other = minibatch_run(p, method, gamma, 0.5)
        assert not np.allclose(other.params, want.params, rtol=1e-6), method.name


def numpy_momentum_ef21_top_k(worker_grad, n, d, k, gamma, eta, steps, variant):
    """EF21-SGDM (Alg. 1 of Fatkhullin, Tyurin, Richtárik 2023, v_i^0 = the first gradient)
    or EF21-HB (Alg. 6 of Fatkhullin et al. 2021, v^0 = g^0) with Top-k and g_i^0 = 0,
    written directly; returns the iterates."""
    x, g, path = np.zeros(d), np.zeros((n, d)), []
    v = np.zeros((n, d)) if variant == "sgdm" else np.zeros(d)
    for t in range(steps):
        grads = np.stack([worker_grad(i, x) for i in range(n)])
        if variant == "sgdm":
            v = grads if t == 0 else (1 - eta) * v + eta * grads
            g = g + np.stack([numpy_top_k(v[i] - g[i], k) for i in range(n)])
            x = x - gamma * g.mean(axis=0)
        else:
            g = g + np.stack([numpy_top_k(grads[i] - g[i], k) for i in range(n)])
            v = eta * v + g.mean(axis=0)
            x = x - gamma * v
        path.append(x)
    return np.array(path)


@pytest.mark.parametrize("variant, eta", [("sgdm", 0.3), ("hb", 0.7)])
def test_momentum_methods_match_numpy_reference(variant, eta, x64):
    p = quadratic_problem(num_workers=3)
    a, b = (np.asarray(t) for t in p.data[:2])

    def worker_grad(i, x):
        return a[i].T @ (a[i] @ x - b[i]) / a.shape[1] + 0.1 * x

    gamma, steps = 0.3 / float(p.smoothness), 30
    method = {"sgdm": error_feedback.ef21_sgdm, "hb": error_feedback.ef21_hb}[variant](
        compression.top_k(2)
    )
    want = numpy_momentum_ef21_top_k(worker_grad, 3, 6, 2, gamma, eta, steps, variant)
    ours = run(p, method, gamma, eta, num_steps=steps)
    np.testing.assert_allclose(ours.params, want[-1], rtol=1e-10)
    x_star = np.asarray(p.x_star)
    np.testing.assert_allclose(
        ours.distance_sq, np.sum((want - x_star) ** 2, axis=1), rtol=1e-9, atol=1e-20
    )
    # the state: per-worker averages for EF21-SGDM, one direction for EF21-HB, None elsewhere
    state = method.init(jax.random.key(0), jnp.zeros(6), 3)
    chex.assert_shape(state.momentum, (3, 6) if variant == "sgdm" else (6,))
    plain = compression.ef21(compression.top_k(2)).init(jax.random.key(0), jnp.zeros(6), 3)
    assert plain.momentum is None


def test_identity_compression_reduces_momentum_methods_to_momentum_gd(x64):
    """C = identity: EF21-SGDM is GD along an exponential average of the gradients started at
    the first one, EF21-HB is Polyak's heavy ball x+ = x - gamma grad + eta (x - x_prev)."""
    p = quadratic_problem()
    gamma, steps = 0.5 / float(p.smoothness), 60

    def grad(x):
        return np.asarray(p.gradient(jnp.asarray(x)))

    x, v = np.zeros(6), None
    for _ in range(steps):
        v = grad(x) if v is None else 0.2 * v + 0.8 * grad(x)  # eta = 0.8
        x = x - gamma * v
    sgdm = run(p, error_feedback.ef21_sgdm(compression.identity()), gamma, 0.8, num_steps=steps)
    np.testing.assert_allclose(sgdm.params, x, rtol=1e-9)

    x, x_prev = np.zeros(6), np.zeros(6)
    for _ in range(steps):
        x, x_prev = x - gamma * grad(x) + 0.6 * (x - x_prev), x  # eta = 0.6
    hb = run(p, error_feedback.ef21_hb(compression.identity()), gamma, 0.6, num_steps=steps)
    np.testing.assert_allclose(hb.params, x, rtol=1e-9)


def test_momentum_removes_ef21_sgd_noise_floor_with_shuffled_minibatches(x64):
    """Fatkhullin, Tyurin, Richtárik (2023): EF21-SGD's g_i chase the noise of single-sample
    gradients through Top-1, and their error does not shrink with the step size; averaging
    first (EF21-SGDM, eta = 0.1) leaves far less. Both start at x* with exact g_i, so
    E||grad f(x)||^2 over the last half of the run is their noise floor (EF21-SGD's is still
    rising there, which only favours it). Margin: 4 standard errors over 8 seeds."""
    p = quadratic_problem()
    gamma, steps, seeds = 0.1 / float(p.smoothness), 400, 8

    def floor(method, *hyper):
        runner = compression.make_distributed_run(
            p, method, num_steps=steps, batch_size=1, scheme=shuffling.random_reshuffle(8)
        )
        per_seed = jax.jit(
            jax.vmap(lambda k: runner(k, p.x_star, gamma, *hyper).grad_norm_sq[steps // 2 :])
        )(jax.random.split(jax.random.key(11), seeds)).mean(axis=1)  # the same seeds each
        return float(per_seed.mean()), float(per_seed.std(ddof=1) / np.sqrt(seeds))

    top = compression.top_k(1)
    sgd, sgd_se = floor(compression.ef21(top, initial_memory="gradient"))
    sgdm, sgdm_se = floor(error_feedback.ef21_sgdm(top, initial_memory="gradient"), 0.1)
    print(f"EF21-SGD {sgd:.4g} +- {sgd_se:.2g}, EF21-SGDM {sgdm:.4g} +- {sgdm_se:.2g}")
    assert 10 * (sgdm + 4 * sgdm_se) < sgd - 4 * sgd_se


@pytest.mark.parametrize(
    "factory, hyper, match",
    [
        (error_feedback.ef21_sgdm, (0.0,), r"momentum must lie in \(0, 1\]"),
        (error_feedback.ef21_sgdm, (1.5,), r"momentum must lie in \(0, 1\]"),
        (error_feedback.ef21_sgdm, (-0.1,), r"momentum must lie in \(0, 1\]"),
        (error_feedback.ef21_hb, (1.0,), r"momentum must lie in \[0, 1\)"),
        (error_feedback.ef21_hb, (1.5,), r"momentum must lie in \[0, 1\)"),
        (error_feedback.ef21_hb, (-0.1,), r"momentum must lie in \[0, 1\)"),
        (error_feedback.ef21_sgdm, (np.array([0.5, 0.5]),), "momentum must be a scalar"),
    ],
)
def test_bad_momentum_is_rejected_before_compiling(factory, hyper, match):
    method = factory(compression.top_k(2))
    untraced = method._replace(step=chex.assert_max_traces(method.step, n=0))
    runner = compression.make_distributed_run(quadratic_problem(), untraced, num_steps=5)
    with pytest.raises(ValueError, match=match):
        runner(jax.random.key(0), jnp.zeros(6), 0.01, *hyper)
    sharded = compression.make_sharded_distributed_run(
        quadratic_problem(), untraced, jax.make_mesh((1,), ("workers",)), num_steps=5
    )
    with pytest.raises(ValueError, match=match):
        sharded(jax.random.key(0), jnp.zeros(6), 0.01, *hyper)
    with pytest.raises(TypeError, match=r"takes the hyper-parameters \('momentum',\)"):
        runner(jax.random.key(0), jnp.zeros(6), 0.01)


@pytest.mark.parametrize(
    "factory, etas",
    [(error_feedback.ef21_sgdm, [0.05, 0.3, 1.0]), (error_feedback.ef21_hb, [0.0, 0.5, 0.9])],
)
def test_momentum_is_traced_one_program_serves_a_vmapped_sweep(factory, etas, x64):
    chex.clear_trace_counter()  # the parametrised cases trace the same `run`
    p = quadratic_problem()
    runner = compression.make_distributed_run(
        p, factory(compression.top_k(2)), num_steps=16, batch_size=2
    )
    once = jax.jit(chex.assert_max_traces(runner, n=1))
    x0, gamma = jnp.zeros(6), 0.1 / float(p.smoothness)
    separate = [once(jax.random.key(5), x0, gamma, eta) for eta in etas]
    swept = jax.jit(jax.vmap(runner, in_axes=(None, None, None, 0)))(
        jax.random.key(5), x0, gamma, np.array(etas)
    )
    for i, result in enumerate(separate):
        np.testing.assert_allclose(
            swept.params[i], result.params, rtol=1e-10, atol=1e-12, err_msg=str(i)
        )
    assert not np.allclose(separate[0].params, separate[1].params)


@pytest.mark.parametrize(
    "factory, eta", [(error_feedback.ef21_sgdm, 0.2), (error_feedback.ef21_hb, 0.6)]
)
def test_momentum_methods_run_sharded_like_the_single_device_run(factory, eta, x64):
    p = quadratic_problem()
    method, gamma = factory(compression.top_k(2)), 0.1 / float(p.smoothness)
    options = dict(num_steps=8, batch_size=2)
    want = jax.jit(compression.make_distributed_run(p, method, **options))(
        jax.random.key(7), jnp.zeros(6), gamma, eta
    )
    mesh = parallel.worker_mesh(2)
    got = compression.make_sharded_distributed_run(p, method, mesh, **options)(
        jax.random.key(7), jnp.zeros(6), gamma, eta
    )
    np.testing.assert_allclose(got.params, want.params, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(got.bits_up, want.bits_up)
