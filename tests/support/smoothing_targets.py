"""The targets the walk-jump, smoothing and Follmer tests share: N(MEAN, S2 I) with its exact
smoothed score, and a three-component 2-D mixture."""

import jax.numpy as jnp

from shufflesgd import problems

MEAN = jnp.array([1.0, -0.5])

S2 = 0.5  # target N(MEAN, S2 I)


def gaussian_logdensity(x):
    return -0.5 * jnp.sum((x - MEAN) ** 2) / S2


def gaussian_smoothed_score(key, y, sigma):
    del key
    return -(y - MEAN) / (S2 + sigma**2)


def mixture():
    return problems.gaussian_mixture(
        [0.3, 0.5, 0.2],
        [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]],
        [[[0.5, 0.1], [0.1, 0.3]], [[0.4, 0.0], [0.0, 0.8]], [[0.3, -0.1], [-0.1, 0.3]]],
    )
