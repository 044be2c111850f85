"""Gaussian mixtures: the eigenbasis form against the diffused mixture, densities, scores and
responsibilities against SciPy on both sides of SHORT_AXIS, the unrolled short-axis reductions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import problems
from shufflesgd.problems import mixtures


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
