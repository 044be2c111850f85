"""Time grids: decreasing with exact ends, Karras et al. Eq. 5, uniform log-SNR, the shifted grid
of flow models (SD3, Eq. 23), the discrete spacings and zero-terminal-SNR rescale of Lin et al.
2024."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion
from shufflesgd.diffusion.time_grids import shift_time

NAMES = ["vp", "subvp", "ve", "edm", "flow", "trig"]


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


@pytest.mark.parametrize("name", ["vp", "subvp", "flow", "trig"])
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


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_shifted_grid_is_sd3_eq23_on_the_rectified_flow(shift, x64):
    """On [0, 1]: t_i = s u / (1 + (s - 1) u) with u = 1 - i/N (Esser et al. 2024, Eq. 23);
    on [t_min, t_max]: the same map of a uniform grid between the pre-images of the ends, which
    are then exact.  Decreasing; shift = 1 is the uniform grid to the last bit."""
    sde = diffusion.make_sde("flow", t_min=0.0, t_max=1.0)
    grid = diffusion.time_grid(sde, "shifted", 8, shift=shift)
    u = np.linspace(1.0, 0.0, 9)
    np.testing.assert_allclose(grid, shift * u / (1 + (shift - 1) * u), rtol=1e-14, atol=0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and np.all(np.diff(grid) < 0)
    sde = diffusion.make_sde("flow")
    grid = diffusion.time_grid(sde, "shifted", 8, shift=shift)
    inverse = lambda t: t / (shift - (shift - 1) * t)  # noqa: E731
    tau = np.linspace(inverse(sde.t_max), inverse(sde.t_min), 9)
    np.testing.assert_allclose(grid, shift * tau / (1 + (shift - 1) * tau), rtol=1e-13)
    assert grid[0] == sde.t_max and grid[-1] == sde.t_min and np.all(np.diff(grid) < 0)
    if shift == 1.0:
        np.testing.assert_array_equal(grid, diffusion.time_grid(sde, "uniform_time", 8))
    elif shift > 1.0:  # more of the steps at high noise
        assert np.median(grid) > np.median(diffusion.time_grid(sde, "uniform_time", 8))


@pytest.mark.parametrize("name", NAMES)
def test_shifted_grid_multiplies_sigma_over_alpha_by_the_shift(name, x64):
    """On every process the shifted grid is a uniform grid tau whose sigma/alpha is multiplied
    by the shift: lambda(t_i) = lambda(tau_i) - 2 log s, with tau uniform; shift = 1 is
    uniform_time."""
    sde = diffusion.make_sde(name)
    shift = 2.5
    grid = diffusion.time_grid(sde, "shifted", 10, shift=shift)
    tau = np.asarray(shift_time(sde, jnp.asarray(grid), 1.0 / shift))
    np.testing.assert_allclose(np.diff(tau), np.full(10, (tau[-1] - tau[0]) / 10), rtol=1e-7)
    lam, lam_tau = (np.asarray(sde.log_snr(jnp.asarray(g))) for g in (grid, tau))
    np.testing.assert_allclose(lam, lam_tau - 2 * math.log(shift), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        diffusion.time_grid(sde, "shifted", 10, shift=1.0),
        diffusion.time_grid(sde, "uniform_time", 10),
        rtol=1e-9,
    )


@pytest.mark.parametrize("shift", [0.0, -1.0, math.inf, math.nan])
def test_shift_must_be_positive_and_finite(shift):
    with pytest.raises(ValueError, match="shift must be positive and finite"):
        diffusion.time_grid(diffusion.make_sde("flow"), "shifted", 4, shift=shift)


@pytest.mark.parametrize("kind", ["uniform_log_snr", "karras"])
def test_log_snr_grids_refuse_an_infinite_log_snr(kind):
    """At t = 1 of an interpolant (alpha = 0) or at sigma = 0 the log-SNR is infinite: these two
    spacings cannot reach it, and say so; the time spacings can."""
    flow = diffusion.make_sde("flow", t_min=0.0, t_max=1.0)
    with pytest.raises(ValueError, match="needs a finite log-SNR"):
        diffusion.time_grid(flow, kind, 4)
    with pytest.raises(ValueError, match="needs a finite log-SNR"):
        diffusion.time_grid(diffusion.make_sde("vp"), kind, 4, t_min=0.0)
    for other in ("uniform_time", "quadratic_time", "shifted"):
        grid = diffusion.time_grid(flow, other, 4)
        assert grid[0] == 1.0 and grid[-1] == 0.0 and np.all(np.diff(grid) < 0)


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
