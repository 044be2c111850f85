"""Finite sums: optima checked against independent solvers and first-order conditions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import metrics, problems
from shufflesgd.problems import mixtures


def test_least_squares_optimum_matches_numpy_lstsq(x64):
    a, b = problems.synthetic_regression(0, 40, 5, noise=0.5, condition=10.0)
    p = problems.least_squares(a, b)
    x_lstsq = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(p.x_star, x_lstsq, rtol=1e-10)
    assert float(jnp.linalg.norm(p.gradient(p.x_star))) < 1e-12
    np.testing.assert_allclose(p.loss(p.x_star), p.f_star, rtol=1e-12)
    eigs = np.linalg.eigvalsh(a.T @ a / 40)
    np.testing.assert_allclose(p.mu, eigs[0], rtol=1e-10)
    np.testing.assert_allclose(p.smoothness, np.max(np.sum(a**2, axis=1)), rtol=1e-12)


def test_ridge_first_order_condition_and_suboptimality_is_quadratic(x64):
    a, b = problems.synthetic_regression(1, 10, 20, noise=1.0)  # d > n: needs l2
    p = problems.least_squares(a, b, l2=0.3)
    assert float(jnp.linalg.norm(p.gradient(p.x_star))) < 1e-12
    delta = jnp.asarray(np.random.default_rng(0).standard_normal(20)) * 1e-2
    hessian = a.T @ a / 10 + 0.3 * np.eye(20)
    expected = 0.5 * delta @ hessian @ delta
    np.testing.assert_allclose(p.suboptimality(p.x_star + delta), expected, rtol=1e-6)


def test_logistic_regression_newton_optimum(x64):
    a, y = problems.synthetic_classification(2, 200, 6, margin=3.0)
    p = problems.logistic_regression(a, y, l2=1e-2)
    assert float(jnp.linalg.norm(p.gradient(p.x_star))) < 1e-11
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert float(p.suboptimality(p.x_star + 1e-3 * rng.standard_normal(6))) > 0
    # smoothness bound: max_i ||a_i||^2 / 4 + l2 dominates every component Hessian
    assert float(p.smoothness) >= float(jnp.max(jnp.sum(p.data[0] ** 2, axis=1))) / 4


def test_component_losses_vectorise_and_jit():
    a, b = problems.synthetic_regression(0, 8, 3)
    p = problems.least_squares(a, b)
    x = jnp.ones(3)
    per_example = jax.jit(lambda q, x: q.component_losses(x, jnp.array([0, 3])))(p, x)
    expected = 0.5 * (a[[0, 3]] @ np.ones(3) - b[[0, 3]]) ** 2
    np.testing.assert_allclose(per_example, expected, rtol=1e-5)
    batched = jax.vmap(p.loss)(jnp.stack([x, 2 * x]))
    assert batched.shape == (2,)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: problems.least_squares(np.ones(3), np.ones(3)), "features must be a matrix"),
        (lambda: problems.least_squares(np.ones((3, 2)), np.ones(4)), "targets must have shape"),
        (
            lambda: problems.least_squares(np.ones((3, 2)), np.ones(3), l2=-1.0),
            "l2 must be non-negative",
        ),
        (lambda: problems.least_squares(np.ones((3, 2)), np.ones(3)), "not strongly convex"),
        (
            lambda: problems.logistic_regression(np.ones((3, 2)), np.ones(3), l2=0.0),
            "l2 must be positive",
        ),
        (
            lambda: problems.logistic_regression(np.ones((3, 2)), np.array([0.0, 1, 1]), l2=1.0),
            "labels",
        ),
        (lambda: problems.synthetic_regression(0, 0, 3), "n and d must be positive"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_synthetic_instances_are_nested_in_n():
    a_small, b_small = problems.synthetic_regression(3, 10, 4)
    a_big, b_big = problems.synthetic_regression(3, 25, 4)
    np.testing.assert_array_equal(a_small, a_big[:10])
    np.testing.assert_array_equal(b_small, b_big[:10])
    f_small, y_small = problems.synthetic_classification(3, 10, 4)
    f_big, y_big = problems.synthetic_classification(3, 25, 4)
    np.testing.assert_array_equal(f_small, f_big[:10])
    np.testing.assert_array_equal(y_small, y_big[:10])


def test_eigenbasis_mixture_matches_the_diffused_mixture(x64):
    law = problems.random_gaussian_mixture(0, 3, 5)
    eigen = law.eigen()
    xs = law.sample(jax.random.key(0), 5)
    for alpha, sigma in ((1.0, 0.01), (0.3, 0.9), (1.0, 50.0)):
        diffused = law.diffuse(jnp.asarray(alpha), jnp.asarray(sigma))
        for x in xs:
            np.testing.assert_allclose(
                eigen.log_prob(x, alpha, sigma), diffused.log_prob(x), rtol=1e-11
            )
            np.testing.assert_allclose(
                eigen.score(x, alpha, sigma), diffused.score(x), rtol=1e-9, atol=1e-12
            )
            np.testing.assert_allclose(
                diffused.score(x), jax.grad(diffused.log_prob)(x), rtol=1e-9, atol=1e-12
            )


@pytest.mark.parametrize("num_components, dim", [(3, 2), (12, 2), (3, 10), (12, 10)])
def test_mixture_density_score_and_responsibilities_match_scipy(num_components, dim, x64):
    """Both sides of SHORT_AXIS (unrolled and XLA reductions over K and over d) against
    scipy's multivariate normal densities, mixed in float64 NumPy; batched under vmap."""
    stats = pytest.importorskip("scipy.stats")
    law = problems.random_gaussian_mixture(1, num_components, dim)
    diffused = law.diffuse(jnp.asarray(0.8), jnp.asarray(0.5))
    xs = np.asarray(diffused.sample(jax.random.key(2), 7))
    weights = np.exp(np.asarray(diffused.log_weights))
    densities = np.stack(
        [
            stats.multivariate_normal(m, c).pdf(xs)
            for m, c in zip(np.asarray(diffused.means), np.asarray(diffused.covariances))
        ],
        axis=-1,
    )
    mixed = densities @ weights
    responsibilities = weights * densities / mixed[:, None]
    precision_offsets = np.einsum(
        "kij,nkj->nki",
        np.linalg.inv(np.asarray(diffused.covariances)),
        xs[:, None] - np.asarray(diffused.means),
    )
    scores = -np.einsum("nk,nki->ni", responsibilities, precision_offsets)
    np.testing.assert_allclose(jax.vmap(diffused.log_prob)(xs), np.log(mixed), rtol=1e-10)
    np.testing.assert_allclose(
        jax.vmap(diffused.responsibilities)(xs), responsibilities, rtol=1e-8, atol=1e-14
    )
    np.testing.assert_allclose(jax.vmap(diffused.score)(xs), scores, rtol=1e-8, atol=1e-10)
    eigen_scores = jax.vmap(lambda x: law.eigen().score(x, 0.8, 0.5))(xs)
    np.testing.assert_allclose(eigen_scores, scores, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("length", [1, 3, problems.SHORT_AXIS, problems.SHORT_AXIS + 1])
def test_short_axis_reductions_equal_xla_reductions_with_their_gradients(length, x64):
    logits = 300.0 * jax.random.normal(
        jax.random.key(length), (5, length)
    )  # exp overflows unshifted
    np.testing.assert_allclose(mixtures._sum(logits, -1), jnp.sum(logits, -1), rtol=1e-12)
    np.testing.assert_allclose(mixtures._sum(logits, 0), jnp.sum(logits, 0), rtol=1e-12)
    np.testing.assert_array_equal(mixtures._fold(jnp.maximum, logits, -1), jnp.max(logits, -1))
    log_normaliser, probs = mixtures._log_normaliser_and_probs(logits)
    np.testing.assert_allclose(log_normaliser, jax.nn.logsumexp(logits, -1), rtol=1e-12)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits, -1), rtol=1e-10, atol=1e-300)
    gradient = jax.grad(lambda z: mixtures._log_normaliser_and_probs(z)[0].sum())(logits)
    np.testing.assert_allclose(gradient, jax.nn.softmax(logits, -1), rtol=1e-10, atol=1e-300)


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
