"""Error feedback: exact reductions, a NumPy reference, convergence, bits, and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import compression as C
from shufflesgd import error_feedback as EF
from shufflesgd import problems, training


def quadratic_problem(num_workers=4, spread=30.0, d=6, l2=0.1):
    a, b = problems.heterogeneous_regression(0, num_workers, 8, d, spread=spread)
    return problems.distributed_least_squares(a, b, num_workers, l2=l2)


def run(problem, method, step_size, num_steps=200, key=0, **options):
    runner = jax.jit(training.make_distributed_run(problem, method, num_steps=num_steps, **options))
    return runner(jax.random.key(key), jnp.zeros_like(problem.x_star), step_size)


def test_identity_compression_reduces_every_method_to_gradient_descent(x64):
    p = quadratic_problem()
    gamma = 1.0 / float(p.smoothness)
    weights = EF.smoothness_weights(p.worker_smoothness)
    gd = run(p, EF.compressed_gd(C.identity()), gamma)
    x, path = np.zeros(6), []
    for _ in range(200):
        x = x - gamma * np.asarray(p.gradient(jnp.asarray(x)))
        path.append(x)
    np.testing.assert_allclose(gd.params, x, rtol=1e-10)
    np.testing.assert_allclose(gd.distance_sq, [np.sum((xs - np.asarray(p.x_star)) ** 2) for xs in path], rtol=1e-6, atol=1e-20)
    for method in [EF.ef14(C.identity()), EF.ef21(C.identity()), EF.ef21_w(C.identity(), weights),
                   EF.ef21_pp(C.identity(), 1.0), EF.ef21_bc(C.identity(), C.identity())]:
        np.testing.assert_allclose(run(p, method, gamma).params, x, rtol=1e-9, err_msg=method.name)


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

    gamma = EF.ef21_step_size(float(p.smoothness), p.worker_smoothness, 2 / 6)
    ours = run(p, EF.ef21(C.top_k(2)), gamma, num_steps=50)
    np.testing.assert_allclose(ours.params, numpy_ef21_top_k(worker_grad, 4, 6, 2, gamma, 50), rtol=1e-9)


@pytest.mark.parametrize("name, reduction", [("ef14", 1e-6), ("ef21", 1e-8), ("ef21_w", 1e-8), ("ef21_bc", 1e-8)])
def test_error_feedback_converges_linearly_with_top_k(name, reduction, x64):
    """Strongly convex quadratic: ||grad f||^2 falls geometrically with EF21's theory step size."""
    p = quadratic_problem()
    top = C.top_k(1)
    alpha = C.tree_contraction(top, p.x_star)
    gamma = EF.ef21_step_size(float(p.smoothness), p.worker_smoothness, alpha, mean="arithmetic")
    weights = EF.smoothness_weights(p.worker_smoothness)
    method = {"ef14": EF.ef14(top), "ef21": EF.ef21(top), "ef21_w": EF.ef21_w(top, weights),
              "ef21_bc": EF.ef21_bc(top, C.top_k(3))}[name]
    result = run(p, method, gamma, num_steps=6000)
    assert int(result.diverged_step) == -1
    assert float(result.grad_norm_sq[-1]) < reduction * float(result.grad_norm_sq[0])


def test_ef21_w_equals_ef21_for_scale_equivariant_compressors(x64):
    """Top-k commutes with scaling, so EF21-W's g_i is EF21's g_i / (n w_i) and the weighted
    average is EF21's: the observation behind "Error Feedback Reloaded"."""
    p = quadratic_problem()
    weights = EF.smoothness_weights(p.worker_smoothness)
    gamma = 1e-3
    a = run(p, EF.ef21(C.top_k(2)), gamma)
    b = run(p, EF.ef21_w(C.top_k(2), weights), gamma)
    np.testing.assert_allclose(a.params, b.params, rtol=1e-8)
    c = run(p, EF.ef21_w(C.natural_compression(), weights), gamma)  # not scale-equivariant
    d = run(p, EF.ef21(C.natural_compression()), gamma)
    assert np.all(np.isfinite(c.params)) and not np.allclose(c.params, d.params)


def test_partial_participation_sends_p_of_the_messages():
    p = quadratic_problem(num_workers=8)
    top = C.top_k(2)
    result = run(p, EF.ef21_pp(top, 0.25), 1e-3, num_steps=400)
    per_message = C.tree_bits(top, p.x_star)
    fraction = float(result.bits_up[-1]) / (400 * per_message)
    # participation ~ Binomial(8 * 400, 0.25) / 3200: standard error 0.0077
    assert abs(fraction - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 3200)


def test_bits_are_counted_per_step():
    p = quadratic_problem()
    result = run(p, EF.ef21_bc(C.top_k(2), C.rand_k(3)), 1e-3, num_steps=10)
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
    gamma = EF.ef21_step_size(float(p.smoothness), p.worker_smoothness, 1 / 3)
    diverging = training.make_distributed_run(p, EF.compressed_gd(C.top_k(1)), num_steps=300)(
        jax.random.key(0), x0, gamma
    )
    growth = (1 + gamma * (6 * c**2 - 1) / 3) ** 300
    np.testing.assert_allclose(diverging.params, growth * np.ones(3), rtol=1e-8)
    for method in (EF.ef14(C.top_k(1)), EF.ef21(C.top_k(1))):
        converging = training.make_distributed_run(p, method, num_steps=3000)(jax.random.key(0), x0, gamma)
        assert float(converging.grad_norm_sq[-1]) < 1e-8 * float(converging.grad_norm_sq[0]), method.name


def test_divergence_is_reported_with_its_step():
    p = quadratic_problem()
    result = run(p, EF.ef21(C.top_k(2)), 1e3, num_steps=300)
    step = int(result.diverged_step)
    assert 0 <= step < 300
    assert np.all(np.isfinite(result.grad_norm_sq[:step])) and not np.isfinite(result.grad_norm_sq[step])


def test_ef21_sgd_with_shuffled_minibatches_reaches_a_neighbourhood(x64):
    p = quadratic_problem()
    gamma = 0.2 / float(p.smoothness)
    result = run(p, EF.ef21(C.top_k(3)), gamma, num_steps=2000, batch_size=2, scheme="random_reshuffle")
    assert float(result.grad_norm_sq[-1]) < 1e-2 * float(result.grad_norm_sq[0])
    with pytest.raises(ValueError, match="herds gradients"):
        training.make_distributed_run(p, EF.ef21(C.top_k(3)), num_steps=8, batch_size=2, scheme="grab_pair_balance")
    with pytest.raises(ValueError, match="multiple of the 4 steps"):
        training.make_distributed_run(p, EF.ef21(C.top_k(3)), num_steps=6, batch_size=2)


def test_same_key_same_bits_and_seeds_vmap():
    p = quadratic_problem()
    method = EF.ef21_pp(C.rand_k(2), 0.5)
    runner = training.make_distributed_run(p, method, num_steps=20)
    a = jax.jit(runner)(jax.random.key(3), jnp.zeros(6), 0.01)
    b = jax.jit(runner)(jax.random.key(3), jnp.zeros(6), 0.01)
    np.testing.assert_array_equal(a.params, b.params)
    sweep = jax.jit(jax.vmap(runner, in_axes=(0, None, 0)))
    batched = sweep(jax.random.split(jax.random.key(4), 3), jnp.zeros(6), jnp.array([0.01, 0.02, 0.03]))
    chex.assert_shape(batched.grad_norm_sq, (3, 20))


def test_participation_can_be_swept_as_a_traced_argument():
    p = quadratic_problem()

    def by_participation(key, probability):
        method = EF.ef21_pp(C.top_k(2), probability)
        return training.make_distributed_run(p, method, num_steps=50)(key, jnp.zeros(6), 0.01).bits_up[-1]

    probabilities = jnp.array([0.25, 0.5, 1.0])
    bits = jax.jit(jax.vmap(by_participation))(jax.random.split(jax.random.key(0), 3), probabilities)
    assert bits[0] < bits[1] < bits[2] and float(bits[2]) == 50 * 2 * (32 + 3)


def test_step_compiles_once():
    p = quadratic_problem()
    method = EF.ef21(C.top_k(2))
    state = method.init(jax.random.key(0), jnp.zeros(6), 4)
    step = jax.jit(chex.assert_max_traces(method.step, n=1))
    for t in range(3):
        grads = p.worker_gradients(state.x)
        state, info = step(state, grads, jax.random.key(t), jnp.float32(0.01 * (t + 1)))
    assert int(state.step) == 3


def test_ef21_step_size_formula():
    alpha = 0.1
    root = np.sqrt(0.9)
    theta, beta = 1 - root, 0.9 / (1 - root)
    worker = np.array([1.0, 10.0, 100.0])
    quadratic = EF.ef21_step_size(50.0, worker, alpha)
    arithmetic = EF.ef21_step_size(50.0, worker, alpha, mean="arithmetic")
    np.testing.assert_allclose(quadratic, 1 / (50 + np.sqrt(np.mean(worker**2)) * np.sqrt(beta / theta)))
    np.testing.assert_allclose(arithmetic, 1 / (50 + np.mean(worker) * np.sqrt(beta / theta)))
    assert arithmetic > quadratic
    assert EF.ef21_step_size(50.0, worker, 1.0) == 1 / 50


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: EF.ef21(C.top_k(2)).init(jax.random.key(0), jnp.zeros(3), 0), "num_workers must be a positive int"),
        (lambda: EF.ef21_w(C.top_k(2), jnp.array([0.5, 0.5])).init(jax.random.key(0), jnp.zeros(3), 3),
         r"weights must have shape \(3,\)"),
        (lambda: EF.ef21_w(C.top_k(2), jnp.array([0.2, 0.2])), "weights must sum to 1"),
        (lambda: EF.ef21_pp(C.top_k(2), 0.0), "participation must lie in"),
        (lambda: EF.ef21_pp(C.top_k(2), 1.5), "participation must lie in"),
        (lambda: EF.ef21_step_size(1.0, [1.0], 0.0), "alpha must lie in"),
        (lambda: EF.ef21_step_size(1.0, [1.0], 0.5, mean="geometric"), "mean must be"),
        (lambda: training.make_distributed_run(quadratic_problem(), EF.ef21(C.top_k(2)), num_steps=0), "num_steps"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("step_size", [-0.1, 0.0, float("nan")])
def test_non_positive_step_size_is_rejected_before_running(step_size):
    p = quadratic_problem()
    runner = training.make_distributed_run(p, EF.ef21(C.top_k(2)), num_steps=5)
    with pytest.raises(ValueError, match="learning_rate must be positive and finite"):
        runner(jax.random.key(0), jnp.zeros(6), step_size)
