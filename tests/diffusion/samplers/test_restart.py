"""Restart sampling: it contracts the prior mismatch below an ODE and an SDE sampler at equal NFE
(exact laws), its restart position and interval are traced data, and option errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion
from support.samplers import MIXTURE, TARGET, call_sampler, exact_model, kl


def test_restart_beats_ode_and_sde_at_equal_nfe(x64):
    """EDM with sigma_max = 2: the prior N(0, 4 I) misses p_T = N(mu, Sigma + 4 I) (KL floor 0.157).
    An exact ODE flow preserves that KL; the reverse SDE contracts it once; each restart (noise up
    to t_max, Heun back down) contracts it again (Xu et al. 2023, Thm. 2). Exact laws at 40
    evaluations each: Heun 20 steps, Euler-Maruyama 40 steps, Restart 8 main steps + 3 x 4."""
    sde = diffusion.make_sde("edm", sigma_max=2.0)
    target = TARGET.diffuse(1.0, sde.t_min)
    model = exact_model(sde)

    def exact(name, grid, draws, **options):
        sampler = diffusion.make_sampler(name)

        @jax.jit
        def law_and_nfe(g):
            nfe = sampler(jax.random.key(0), model, sde, jnp.zeros(2), g, final="none", **options)[
                1
            ].nfe
            return diffusion.exact_gaussian_law(
                sampler, model, sde, g, 2, draws, final="none", **options
            ), nfe

        (mean, cov), nfe = law_and_nfe(jnp.asarray(grid))
        return kl(mean, cov, target.means[0], target.covariances[0]), int(nfe)

    heun, nfe_heun = exact("pf_ode_heun", diffusion.time_grid(sde, "karras", 20), 1)
    em, nfe_em = exact("euler_maruyama", diffusion.time_grid(sde, "karras", 40), 1)
    grid = diffusion.time_grid(sde, "karras", 8)
    t_min = float(grid[np.argmin(np.abs(grid - 0.3))])  # restart from a grid point
    ours, nfe = exact(
        "restart", grid, 3, restart_t_min=t_min, restart_t_max=2.0, restart_k=3, restart_steps=4
    )
    assert nfe_heun == nfe_em == nfe == 40
    assert ours < 0.5 * min(heun, em), (ours, heun, em)


def test_restart_structure_is_data():
    """The restart position and interval may be traced and vmapped: one program, the same
    results as separate runs; only the draws (m - 1, k < K) are read; NFE is exact, with an Euler
    last step on a grid ending at sigma = 0."""
    sde = diffusion.make_sde("edm")
    grid = jnp.asarray(
        np.append(diffusion.time_grid(sde, "karras", 10)[:-1], 0.0)
    )  # ends at sigma = 0
    model = exact_model(sde, MIXTURE)
    x_T = sde.prior_sample(jax.random.key(0), (2,))
    t_mins = grid[jnp.array([6, 8])]  # 0.965 and 0.085

    def run(t_min, noise):
        return diffusion.restart(
            None,
            model,
            sde,
            x_T,
            grid,
            restart_t_min=t_min,
            restart_t_max=5.0,
            restart_k=2,
            restart_steps=3,
            final="denoise",
            noise=noise,
        )

    noise = jax.random.normal(jax.random.key(3), (10, 2, 2))
    swept, infos = jax.jit(jax.vmap(run, in_axes=(0, None)))(t_mins, noise)
    one = jax.jit(run)
    for row, t_min in zip(swept, t_mins):
        np.testing.assert_allclose(row, one(t_min, noise)[0], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(infos.nfe) == 2 * (10 + 2 * 3) - 1)
    m = 6  # restart_t_min = grid[6]: the jumps are draws (5, 0) and (5, 1)
    x, info = one(grid[m], jnp.full_like(noise, jnp.nan).at[m - 1].set(noise[m - 1]))
    assert np.all(np.isfinite(x)) and int(info.nonfinite_step) == -1


@pytest.mark.parametrize(
    "call, match",
    [
        (call_sampler("restart", restart_k=0), "restart_k must be a positive int"),
        (call_sampler("restart", restart_steps=2.5), "restart_steps must be a positive int"),
        (
            call_sampler("restart", restart_t_min=1.0, restart_t_max=0.5),
            "restart_t_min must be below restart_t_max",
        ),
        (
            call_sampler("restart", restart_t_min=1e-4),
            "restart_t_min must not lie below the grid's end",
        ),
    ],
)
def test_bad_options(call, match):
    with pytest.raises(ValueError, match=match):
        call()
