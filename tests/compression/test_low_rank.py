"""Low-rank compression: the truncated SVD, and PowerSGD converging to it."""

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd import compression


def test_low_rank_is_the_truncated_svd_and_power_sgd_converges_to_it():
    rng = np.random.default_rng(0)
    m = jnp.asarray(
        rng.standard_normal((12, 8))
        @ np.diag(np.geomspace(1, 0.01, 8))
        @ rng.standard_normal((8, 8))
    )
    best = compression.low_rank(2).step(jax.random.key(0), None, m)[1]
    u, s, vt = np.linalg.svd(np.asarray(m, np.float64))
    np.testing.assert_allclose(best, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-4)
    power = compression.power_sgd(2)
    state = power.init(jax.random.key(1), m.shape)
    step = jax.jit(power.step)
    for _ in range(30):  # warm-started power steps on a fixed matrix: subspace iteration
        state, approx = step(jax.random.key(0), state, m)
    np.testing.assert_allclose(approx, best, atol=1e-3)
    assert compression.matrix_shape((12,)) == (3, 4) and compression.matrix_shape((4, 3, 5)) == (
        4,
        15,
    )
