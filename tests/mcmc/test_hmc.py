"""HMC's leapfrog: the energy error over a trajectory of fixed length falls as h^2 (Neal 2011,
Sec. 5.2.3.3), measured as a slope on a Gaussian target."""

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd import mcmc
from support.gaussian_target import gaussian_logdensity


def test_leapfrog_energy_error_is_second_order(x64):
    """One step of L leapfrog steps of size h = 1/L from the same point and momentum key: the
    energy error |dH| is O(h^2) for a fixed trajectory length, so its log-log slope is 2."""
    step_sizes, errors = [0.2, 0.1, 0.05, 0.025], []
    for h in step_sizes:
        kernel = mcmc.hmc(gaussian_logdensity, num_leapfrog=round(1.0 / h))
        state = kernel.init(jnp.array([0.3, 1.1]))
        _, info = jax.jit(kernel.step)(jax.random.key(3), state, h)
        errors.append(abs(float(info.energy_error)))
    slope = np.polyfit(np.log(step_sizes), np.log(errors), 1)[0]
    assert abs(slope - 2.0) < 0.15, (slope, errors)
