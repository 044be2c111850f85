"""Time grids: decreasing with exact ends, Karras et al. Eq. 5, uniform log-SNR, the discrete
spacings and zero-terminal-SNR rescale of Lin et al. 2024."""

import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion

NAMES = ["vp", "subvp", "ve", "edm"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", diffusion.GRIDS)
def test_time_grids_are_decreasing_with_exact_ends(name, kind):
    sde = diffusion.make_sde(name)
    grid = diffusion.time_grid(sde, kind, 12)
    assert grid.shape == (13,) and grid[0] == sde.t_max and grid[-1] == sde.t_min
    assert np.all(np.diff(grid) < 0)


def test_karras_grid_is_eq5_on_edm_and_log_snr_grid_is_uniform(x64):
    sde = diffusion.make_sde("edm")
    grid = diffusion.time_grid(sde, "karras", 4)
    i = np.arange(5)
    expected = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(grid, expected, rtol=1e-9)
    vp = diffusion.make_sde("vp")
    lam = np.asarray(vp.log_snr(jnp.asarray(diffusion.time_grid(vp, "uniform_log_snr", 6))))
    np.testing.assert_allclose(np.diff(lam), np.full(6, (lam[-1] - lam[0]) / 6), rtol=1e-8)


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_karras_grid_spaces_sigma_over_alpha_on_variance_preserving_processes(x64, name):
    """Karras et al. 2022, Table 1: on VP the rho-spacing is in sigma/alpha (up to ~157 at t = 1
    for beta in [0.1, 20]), not in sigma <= 1."""
    sde = diffusion.make_sde(name)
    grid = diffusion.time_grid(sde, "karras", 10)
    scaled = np.asarray(sde.sigma(jnp.asarray(grid)) / sde.alpha(jnp.asarray(grid)))
    hi, lo = scaled[0], scaled[-1]
    i = np.arange(11)
    expected = (hi ** (1 / 7) + i / 10 * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    np.testing.assert_allclose(scaled, expected, rtol=1e-7)
    assert hi > 10  # sigma/alpha, not sigma


def test_discrete_spacings_of_lin_et_al():
    np.testing.assert_array_equal(
        diffusion.discrete_timesteps(1000, 10, "trailing"),
        [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    )
    np.testing.assert_array_equal(
        diffusion.discrete_timesteps(1000, 10, "leading"),
        [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
    )
    linspace = diffusion.discrete_timesteps(1000, 10, "linspace")
    assert linspace[0] == 999 and linspace[-1] == 0 and len(linspace) == 10


def test_zero_terminal_snr_rescale():
    betas = np.linspace(1e-4, 0.02, 1000)
    cumprod = np.cumprod(1 - betas)
    rescaled = diffusion.rescale_zero_terminal_snr(cumprod)
    assert rescaled[-1] == 0.0
    np.testing.assert_allclose(rescaled[0], cumprod[0], rtol=1e-12)
    assert np.all(np.diff(rescaled) < 0)
