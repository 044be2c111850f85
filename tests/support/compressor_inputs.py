"""Inputs and Monte Carlo draws the compressor tests share."""

import jax
import jax.numpy as jnp
import numpy as np

D = 200


def inputs(num=6, d=D, seed=0):
    """Gaussian, heavy-tailed and sparse-ish vectors: the cases where bounds are tight or loose."""
    rng = np.random.default_rng(seed)
    xs = [
        rng.standard_normal(d),
        rng.standard_cauchy(d),
        rng.standard_normal(d) * (rng.uniform(size=d) < 0.1),
    ]
    xs += [rng.standard_normal(d) * np.geomspace(1, 1e-3, d) for _ in range(num - 3)]
    return [jnp.asarray(x, jnp.float32) for x in xs]


def draws(compressor, x, num=4000, seed=1):
    """``num`` independent compressions of ``x`` (vmapped over keys)."""
    keys = jax.random.split(jax.random.key(seed), num)
    state = compressor.init(jax.random.key(0), x.shape)
    return jax.jit(jax.vmap(lambda k: compressor.step(k, state, x)[1]))(keys)
