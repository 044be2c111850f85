"""The correlated 2-D Gaussian target N(MEAN, COV) of the MCMC kernel and adaptation tests."""

import jax.numpy as jnp

MEAN = jnp.array([1.0, -2.0])

COV = jnp.array([[1.0, 0.6], [0.6, 2.0]])

PRECISION = jnp.linalg.inv(COV)


def gaussian_logdensity(x):
    diff = x - MEAN
    return -0.5 * diff @ PRECISION @ diff
