"""Distributed sums: worker smoothness constants, and quadratics with chosen L_i."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import problems


def test_heterogeneous_regression_profiles_set_the_spread_of_worker_smoothness():
    means = {}
    for profile in ("geometric", "outlier"):
        a, b = problems.heterogeneous_regression(0, 10, 30, 4, spread=1e4, profile=profile)
        worker = np.asarray(
            problems.distributed_least_squares(a, b, 10).worker_smoothness, np.float64
        )
        assert 5e3 < worker.max() / worker.min() < 2e4  # the spread, up to sampling of the rows
        means[profile] = np.sqrt(np.mean(worker**2)) / np.mean(worker)  # L_QM / L_AM
    assert means["geometric"] < 2.5 < means["outlier"]  # sqrt(10) = 3.16 is the outlier limit
    with pytest.raises(ValueError, match="profile must be"):
        problems.heterogeneous_regression(0, 2, 2, 2, spread=10.0, profile="bogus")


def worker_hessians(problem):
    """Each worker's Hessian F_i^T F_i / m from its least-squares rows, in float64."""
    features = np.asarray(problem.data[0], np.float64)
    return np.einsum("imd,ime->ide", features, features) / features.shape[1]


@pytest.mark.parametrize("examples_per_worker", [None, 9])
def test_distributed_quadratic_has_exactly_the_requested_worker_smoothness(
    x64, examples_per_worker
):
    smoothness = np.array([1.0, 4.0, 50.0, 1000.0])
    p = problems.distributed_quadratic(
        smoothness, 5, seed=3, condition=20.0, examples_per_worker=examples_per_worker
    )
    assert p.num_workers == 4 and p.examples_per_worker == (examples_per_worker or 5)
    hessians = worker_hessians(p)
    for h, l_i in zip(hessians, smoothness):
        eigenvalues = np.linalg.eigvalsh(h)
        np.testing.assert_allclose(eigenvalues[-1], l_i, rtol=1e-12)  # lambda_max(H_i) = L_i
        np.testing.assert_allclose(eigenvalues[0], l_i / 20.0, rtol=1e-12)  # the worker's condition
    np.testing.assert_array_equal(p.worker_smoothness, smoothness)


def test_distributed_quadratic_optimum_matches_numpy(x64):
    p = problems.distributed_quadratic([2.0, 3.0, 7.0], 6, seed=0)
    features, targets = (np.asarray(t, np.float64) for t in p.data[:2])
    # The whole sum as one least-squares problem, solved by NumPy.
    x_star, *_ = np.linalg.lstsq(features.reshape(-1, 6), targets.reshape(-1), rcond=None)
    np.testing.assert_allclose(p.x_star, x_star, rtol=1e-10)
    f_star = 0.5 * np.mean((features.reshape(-1, 6) @ x_star - targets.reshape(-1)) ** 2)
    np.testing.assert_allclose(p.f_star, f_star, rtol=1e-10)
    hessian = worker_hessians(p).mean(axis=0)
    eigenvalues = np.linalg.eigvalsh(hessian)
    np.testing.assert_allclose([p.mu, p.smoothness], [eigenvalues[0], eigenvalues[-1]], rtol=1e-12)
    # The library's own loss and gradient agree: grad f(x*) = 0, f(x*) = f*.
    assert float(jnp.linalg.norm(p.gradient(p.x_star))) < 1e-12
    np.testing.assert_allclose(p.loss(p.x_star), f_star, rtol=1e-12)
    assert float(p.f_star) > 0  # the workers' minimisers differ


def test_distributed_quadratic_is_reproducible_and_jits():
    a = problems.distributed_quadratic([1.0, 10.0], 4, seed=7)
    b = problems.distributed_quadratic([1.0, 10.0], 4, seed=7)
    np.testing.assert_array_equal(a.data[0], b.data[0])
    grads = jax.jit(lambda p, x: p.worker_gradients(x))(a, jnp.ones(4))
    assert grads.shape == (2, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(worker_smoothness=[1.0, -2.0]), "worker_smoothness must be a vector of positive"),
        (dict(worker_smoothness=[[1.0]]), "worker_smoothness must be a vector of positive"),
        (dict(worker_smoothness=[]), "worker_smoothness must be a vector of positive"),
        (dict(dim=0), "dim must be a positive int"),
        (dict(seed=-1), "seed must be a non-negative int"),
        (dict(condition=0.5), "condition must be a finite number >= 1"),
        (dict(examples_per_worker=2), "examples_per_worker=2 must be at least dim=3"),
    ],
)
def test_distributed_quadratic_bad_input(kwargs, match):
    arguments = dict(worker_smoothness=[1.0, 2.0], dim=3, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        problems.distributed_quadratic(**arguments)
