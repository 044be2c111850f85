"""Theoretical step sizes of EF21-PP and EF21-BC: formulas, limits, and the Lyapunov decrease
that justifies them, checked along real trajectories of the library's methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import compression, problems
from support.top_k import numpy_top_k

D = 6


def quadratic_problem(num_workers=4, spread=100.0):
    a, b = problems.heterogeneous_regression(3, num_workers, 8, D, spread=spread)
    return problems.distributed_least_squares(a, b, num_workers, l2=0.1)


def compiled_oracles(p):
    """``(worker_gradients, suboptimality, gradient)`` of ``p``, each one compiled program (the
    Lyapunov checks call them at every step of a trajectory)."""
    return jax.jit(p.worker_gradients), jax.jit(p.suboptimality), jax.jit(p.gradient)


def constants(p):
    return float(p.smoothness), np.asarray(p.worker_smoothness, np.float64)


def test_pp_step_size_reduces_to_ef21_and_shrinks_with_participation():
    worker = np.array([1.0, 10.0, 100.0])
    full = compression.ef21_pp_step_size(50.0, worker, 0.1, 1.0)
    assert full == pytest.approx(compression.ef21_step_size(50.0, worker, 0.1), rel=1e-12)
    steps = [
        compression.ef21_pp_step_size(50.0, worker, 0.1, p) for p in (1.0, 0.999, 0.5, 0.1, 0.01)
    ]
    assert all(a > b for a, b in zip(steps, steps[1:]))
    # continuity at p = 1 (the optimal rho vanishes smoothly)
    assert steps[1] == pytest.approx(steps[0], rel=1e-2)


@pytest.mark.parametrize("alpha, p", [(0.1, 0.5), (1 / 3, 0.1), (0.9, 0.9), (1.0, 0.3)])
def test_pp_rho_is_the_best_young_parameter(alpha, p):
    theta, beta = compression.ef21_theta_beta(alpha)
    theta_p, beta_p = compression.ef21_pp_constants(alpha, p)
    rho = np.linspace(1e-6, p * theta / (1 - p), 200001)[1:-1]
    ratio = (p * beta + (1 - p) * (1 + 1 / rho)) / (p * theta - (1 - p) * rho)
    assert theta_p > 0
    assert beta_p / theta_p <= ratio.min() * (1 + 1e-9)
    assert beta_p / theta_p == pytest.approx(ratio.min(), rel=1e-6)


def test_bc_step_size_limits():
    worker = np.array([1.0, 10.0, 100.0])
    ef21 = compression.ef21_step_size(50.0, worker, 0.2)
    assert compression.ef21_bc_step_size(50.0, worker, 0.2, 1.0) == ef21
    bc = [compression.ef21_bc_step_size(50.0, worker, 0.2, a) for a in (0.999, 0.5, 0.1)]
    assert all(s < ef21 for s in bc) and bc[0] > bc[1] > bc[2]
    # no uplink compression: the downlink alone still asks for a smaller step than GD
    assert compression.ef21_bc_step_size(50.0, worker, 1.0, 0.5) < 1 / 50


def lyapunov_bc(oracles, state_before, state_after, gamma, alpha_w, alpha_m):
    """Phi^t = f(x^t) - f* + A G^t + B P^t from the state around step t (see ef21_bc_step_size)."""
    theta_w, _ = compression.ef21_theta_beta(alpha_w)
    theta_m, beta_m = compression.ef21_theta_beta(alpha_m)
    x = state_before.x
    worker_gradients, suboptimality, _ = oracles
    g = np.asarray(state_after.memory) - np.asarray(worker_gradients(x))
    big_g = np.mean(np.sum(g**2, axis=1))
    big_p = np.sum((np.asarray(state_after.broadcast) - np.asarray(state_after.estimate)) ** 2)
    b = gamma / theta_m
    a = gamma / theta_w * (1 + 3 * beta_m * (2 - theta_w) / theta_m)
    return float(suboptimality(x)) + a * big_g + b * big_p


@pytest.mark.parametrize("k_up, k_down", [(1, 1), (2, 3), (6, 2)])
def test_bc_lyapunov_decreases_every_step_at_the_theoretical_step_size(x64, k_up, k_down):
    """Top-k is deterministic, so the bound behind ef21_bc_step_size holds path by path:
    Phi^{t+1} <= Phi^t - gamma/2 ||grad f(x^t)||^2 for every t."""
    p = quadratic_problem()
    alpha_w, alpha_m = k_up / D, k_down / D
    gamma = compression.ef21_bc_step_size(*constants(p), alpha_w, alpha_m)
    method = compression.ef21_bc(compression.top_k(k_up), compression.top_k(k_down))
    step = jax.jit(method.step)
    state = method.init(jax.random.key(0), jnp.ones(D), p.num_workers)
    oracles = compiled_oracles(p)
    worker_gradients, _, gradient = oracles
    states = [state]
    for t in range(150):
        state, _ = step(jax.random.key(t + 1), state, worker_gradients(state.x), gamma)
        states.append(state)
    phi = [
        lyapunov_bc(oracles, states[t], states[t + 1], gamma, alpha_w, alpha_m) for t in range(150)
    ]
    grad_sq = [float(jnp.sum(gradient(states[t].x) ** 2)) for t in range(150)]
    for t in range(149):
        assert phi[t + 1] <= phi[t] - gamma / 2 * grad_sq[t] + 1e-12 * abs(phi[t]), t
    assert grad_sq[-1] < grad_sq[0]


@pytest.mark.parametrize("participation, k", [(0.5, 2), (0.2, 1), (0.9, 3)])
def test_pp_lyapunov_decreases_in_expectation_at_the_theoretical_step_size(x64, participation, k):
    """Given the state, E[Phi^{t+1}] over who participates is a finite sum (each worker either
    updates or keeps g_i): compute it exactly and check the decrease along a trajectory."""
    p = quadratic_problem()
    alpha = k / D
    gamma = compression.ef21_pp_step_size(*constants(p), alpha, participation)
    theta_p, _ = compression.ef21_pp_constants(alpha, participation)
    method = compression.ef21_pp(compression.top_k(k))
    step = jax.jit(method.step)
    state = method.init(jax.random.key(0), jnp.ones(D), p.num_workers)
    worker_gradients, suboptimality, gradient = compiled_oracles(p)
    # the first step starts from g_i = 0 (not an EF21 iterate); check from the second on
    state, _ = step(jax.random.key(1), state, worker_gradients(state.x), gamma, participation)
    seen_partial = False
    for t in range(2, 120):
        x = state.x  # x^t; state.memory is g^{t-1}, built at x^{t-1}
        next_state, info = step(jax.random.key(t), state, worker_gradients(x), gamma, participation)
        seen_partial |= 0 < int(info.participants) < p.num_workers
        # Phi^t uses g^t, the memory after this step's compression at x^t
        grads_t = np.asarray(worker_gradients(x))
        g_t = np.asarray(next_state.memory)
        phi_t = float(suboptimality(x)) + gamma / (2 * theta_p) * np.mean(
            np.sum((g_t - grads_t) ** 2, axis=1)
        )
        x_next = next_state.x
        grads_next = np.asarray(worker_gradients(x_next))
        joined = np.stack(
            [g_t[i] + numpy_top_k(grads_next[i] - g_t[i], k) for i in range(p.num_workers)]
        )
        expected_g = participation * np.sum((joined - grads_next) ** 2, axis=1) + (
            1 - participation
        ) * np.sum((g_t - grads_next) ** 2, axis=1)
        expected_phi_next = float(suboptimality(x_next)) + gamma / (2 * theta_p) * np.mean(
            expected_g
        )
        decrease = gamma / 2 * float(jnp.sum(gradient(x) ** 2))
        assert expected_phi_next <= phi_t - decrease + 1e-12 * abs(phi_t), t
        state = next_state
    assert seen_partial


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: compression.ef21_pp_step_size(1.0, [1.0], 0.5, 0.0), "participation must lie in"),
        (lambda: compression.ef21_pp_step_size(1.0, [1.0], 0.5, 1.2), "participation must lie in"),
        (lambda: compression.ef21_pp_step_size(1.0, [1.0], -0.1, 0.5), "alpha must lie in"),
        (lambda: compression.ef21_bc_step_size(1.0, [1.0], 0.5, 0.0), "server_alpha must lie in"),
        (lambda: compression.ef21_bc_step_size(1.0, [1.0], 2.0, 0.5), "alpha must lie in"),
        (
            lambda: compression.ef21_bc_step_size(0.0, [1.0], 0.5, 0.5),
            "smoothness must be positive",
        ),
        (lambda: compression.ef21_pp_step_size(1.0, [1.0, -2.0], 0.5, 0.5), "worker_smoothness"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
