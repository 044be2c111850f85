"""A stochastic-gradient chain driven by a shuffling scheme: the chain approaches the exact
posterior mean and its epochs follow the scheme's orders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc, shuffling


def test_minibatch_chain_follows_a_shuffling_scheme(x64):
    """Bayesian linear regression y = a x + noise with a N(0, 1) prior: the chain's mean
    approaches the exact posterior mean; epochs follow the scheme's order."""

    rng = np.random.default_rng(0)
    n_data = 64
    a = jnp.asarray(rng.standard_normal(n_data))
    y = 0.7 * a + 0.5 * jnp.asarray(rng.standard_normal(n_data))
    noise_var = 0.25
    posterior_var = 1.0 / (1.0 + jnp.sum(a**2) / noise_var)
    posterior_mean = posterior_var * jnp.sum(a * y) / noise_var

    def grad_estimator(x, batch):
        return (
            -x + n_data / batch.shape[0] * jnp.sum(a[batch] * (y[batch] - a[batch] * x)) / noise_var
        )

    kernel = mcmc.sgld(grad_estimator)
    scheme = shuffling.random_reshuffle(n_data)
    state, positions, infos = jax.jit(
        lambda k: mcmc.run_minibatch_chain(
            kernel, k, kernel.init(jnp.asarray(0.0)), scheme, 200, 8, 1e-4
        )
    )(jax.random.key(0))
    assert positions.shape == (200 * 8,) and int(jnp.sum(infos.num_grad_evals)) == 1600
    burned = np.asarray(positions[400:])
    se = float(np.sqrt(posterior_var / mcmc.effective_sample_size(burned[None, :])))
    assert abs(burned.mean() - float(posterior_mean)) < 4 * se + 0.01 * float(
        jnp.sqrt(posterior_var)
    )
    end_state, ends, end_infos = jax.jit(
        lambda k: mcmc.run_minibatch_chain(
            kernel, k, kernel.init(jnp.asarray(0.0)), scheme, 200, 8, 1e-4, record="epoch"
        )
    )(jax.random.key(0))
    np.testing.assert_array_equal(ends, positions[7::8])  # the same chain, kept at epoch ends
    np.testing.assert_array_equal(end_state.position, state.position)
    assert end_infos.num_grad_evals.shape == (200,)
    with pytest.raises(ValueError, match="record must be"):
        mcmc.run_minibatch_chain(
            kernel,
            jax.random.key(0),
            kernel.init(jnp.asarray(0.0)),
            scheme,
            2,
            8,
            1e-4,
            record="every",
        )
    with pytest.raises(ValueError, match="scheme herds gradients"):
        mcmc.run_minibatch_chain(
            kernel,
            jax.random.key(0),
            kernel.init(jnp.asarray(0.0)),
            shuffling.grab_pair_balance(n_data),
            2,
            8,
            1e-4,
        )
