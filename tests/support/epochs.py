"""Epoch helpers the shuffling-scheme tests share."""

import jax
import jax.numpy as jnp
import numpy as np


def epoch_key(key, k):
    return jax.random.fold_in(key, k)


def epochs(scheme, key, num_epochs, params=None):
    """The orders of ``num_epochs`` epochs, drawn inside one lax.scan."""
    params = jnp.zeros(3) if params is None else params

    def body(state, k):
        return scheme.step(epoch_key(key, k), state)

    _, orders = jax.lax.scan(body, scheme.init(key, params), jnp.arange(num_epochs))
    return np.asarray(orders)


def is_permutation(order, n):
    return np.array_equal(np.sort(order), np.arange(n))
