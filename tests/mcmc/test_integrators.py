"""BAOAB (Leimkuhler & Matthews 2013): without friction it is velocity Verlet, written out by
hand; with friction it samples the positions of a harmonic oscillator exactly (unit variance)
at any stable step size, within Monte Carlo error."""

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd import mcmc


def force(x):
    return -x  # N(0, I): grad log density


def test_without_friction_baoab_is_velocity_verlet(x64):
    x, v, h = jnp.array([0.7, -1.2]), jnp.array([0.4, 0.9]), 0.3
    noise = jnp.array([5.0, -3.0])  # ignored: exp(-0 h) = 1 leaves no room for noise
    got_x, got_v = mcmc.baoab(force, force, x, v, noise, h, 0.0)
    half_v = v + 0.5 * h * force(x)
    want_x = x + h * half_v
    want_v = half_v + 0.5 * h * force(want_x)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-14)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-14)


def test_positions_of_a_harmonic_oscillator_have_unit_variance(x64):
    num_chains, num_steps, h, friction = 4000, 200, 0.8, 1.0

    def chain(key):
        def body(carry, t):
            x, v = carry
            z = jax.random.normal(jax.random.fold_in(key, t), (1,), jnp.float64)
            return mcmc.baoab(force, force, x, v, z, h, friction), None

        (x, _), _ = jax.lax.scan(body, (jnp.zeros(1), jnp.zeros(1)), jnp.arange(num_steps))
        return x[0]

    xs = np.asarray(jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(0), num_chains)))
    variance = xs.var()
    se = np.sqrt(2.0 / num_chains)  # standard error of a Gaussian sample variance
    assert abs(variance - 1.0) < 4 * se, (variance, se)
