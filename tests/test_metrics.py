"""Sample-quality metrics against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import metrics, problems


def test_sliced_w2_of_a_shift_is_the_rms_projected_shift(x64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    directions = np.asarray(metrics.random_directions(jax.random.key(0), 7, 3))
    np.testing.assert_allclose(np.linalg.norm(directions, axis=1), 1.0, rtol=1e-12)
    shift = np.array([1.0, -2.0, 0.5])  # the projections shift by theta . c
    expected = np.sqrt(np.mean((directions @ shift) ** 2))
    assert float(
        metrics.sliced_w2(jnp.asarray(x), jnp.asarray(x + shift), jnp.asarray(directions))
    ) == pytest.approx(expected, rel=1e-10)


def test_mmd_squared_equals_the_unbiased_double_loop(x64):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((40, 3)), rng.standard_normal((40, 3)) + 0.5
    h2 = 1.7

    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * h2))

    n = len(x)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / n**2
    assert float(metrics.mmd_squared(jnp.asarray(x), jnp.asarray(y), h2)) == pytest.approx(
        kxx + kyy - 2 * kxy, rel=1e-10
    )


def test_mode_weight_error_counts_the_most_responsible_component(x64):
    law = problems.gaussian_mixture(
        [0.5, 0.3, 0.2], [[0.0, 3.0], [-3.0, -2.0], [3.0, -2.0]], [np.eye(2) * 0.2] * 3
    )
    points = jnp.asarray(np.repeat(np.asarray(law.means), [6, 3, 1], axis=0))  # 0.6 / 0.3 / 0.1
    assert float(metrics.mode_weight_error(points, law)) == pytest.approx(0.1, abs=1e-12)


def test_gaussian_w2_closed_forms(x64):
    """Squared W2: (m_p - m_q)^2 + (s_p - s_q)^2 in 1-D; with commuting covariances,
    |m_p - m_q|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 over the shared eigenvalues."""
    w2 = metrics.gaussian_w2(
        jnp.array([1.0]), jnp.array([[4.0]]), jnp.array([-0.5]), jnp.array([[0.25]])
    )
    np.testing.assert_allclose(w2, 1.5**2 + (2.0 - 0.5) ** 2, rtol=1e-12)
    rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
    a, b = np.array([0.5, 2.0, 3.0]), np.array([1.0, 0.1, 3.0])
    cov_p, cov_q = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
    m_p, m_q = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    expected = np.sum((m_p - m_q) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    np.testing.assert_allclose(
        metrics.gaussian_w2(*map(jnp.asarray, (m_p, cov_p, m_q, cov_q))), expected, rtol=1e-10
    )
