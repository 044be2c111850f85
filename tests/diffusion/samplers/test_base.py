"""The calling convention every sampler shares: a sample is the same alone and in a batch, and
the same again; outputs finite near and at sigma = 0 under every final step, with exact NFE; the
first non-finite step reported; argument errors raised before tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion
from support.samplers import MIXTURE, exact_model, jitted

NEW = ["dpm_solver_pp_2m", "dpm_solver_pp_3m", "edm_heun", "restart", "pf_ode_adaptive"]


OPTIONS = {
    "dpm_solver_pp_2m": dict(thresholding=True, threshold_quantile=0.9, threshold_max=2.0),
    "dpm_solver_pp_3m": dict(),
    "edm_heun": dict(S_churn=5.0, S_tmin=0.05, S_tmax=20.0),
    "restart": dict(restart_t_min=0.5, restart_t_max=3.0, restart_k=2, restart_steps=3),
    "pf_ode_adaptive": dict(rtol=1e-4, atol=1e-4),
}


@pytest.mark.parametrize("name", sorted(diffusion.SAMPLERS))
def test_a_sample_is_the_same_alone_and_in_a_batch(name):
    sde = diffusion.make_sde("vp")
    grid = jnp.asarray(diffusion.time_grid(sde, "karras", 8))
    model = exact_model(sde, MIXTURE)
    x_T = sde.prior_sample(jax.random.key(0), (16, 2))
    sampler = diffusion.make_sampler(name)
    batched = jax.jit(lambda k, x: diffusion.sample_batch(sampler, k, model, sde, x, grid)[0])
    batch = batched(jax.random.key(3), x_T)
    alone, _ = jitted(name, model, sde, grid)(jax.random.fold_in(jax.random.key(3), 5), x_T[5])
    np.testing.assert_allclose(batch[5], alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batch, batched(jax.random.key(3), x_T))


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve", "edm"])
def test_outputs_are_finite_near_sigma_zero(sde_name):
    """DDIM (eta = 0.5) with an x0 model on every grid kind (traced: one program per final step)
    and every final step."""
    sde = diffusion.make_sde(sde_name)
    model = exact_model(sde, MIXTURE, "x0")
    x_T = sde.prior_sample(jax.random.key(1), (2,))
    for final in diffusion.FINALS:
        run = jax.jit(
            lambda grid, final=final: diffusion.ddim(
                jax.random.key(0), model, sde, x_T, grid, eta=0.5, final=final
            )
        )
        for grid_kind in diffusion.GRIDS:
            x, info = run(jnp.asarray(diffusion.time_grid(sde, grid_kind, 10)))
            assert np.all(np.isfinite(x)) and int(info.nonfinite_step) == -1, (final, grid_kind)
            assert int(info.nfe) == 10 + (final != "none")


def test_nan_mid_trajectory_is_reported_with_its_step():
    sde = diffusion.make_sde("vp")
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_time", 10))
    good = exact_model(sde, MIXTURE)
    broken = diffusion.Model(
        lambda x, t: jnp.where(t < 0.45, jnp.nan, 1.0) * good.fn(x, t), "score"
    )
    x, info = diffusion.pf_ode_euler(jax.random.key(0), broken, sde, jnp.ones(2), grid)
    first_bad = int(np.argmax(np.asarray(grid)[:-1] < 0.45))
    assert int(info.nonfinite_step) == first_bad


@pytest.mark.parametrize("name", NEW)
def test_a_sample_in_a_batch_of_one_and_of_sixteen(name):
    sde = diffusion.make_sde("edm")
    grid = jnp.asarray(diffusion.time_grid(sde, "karras", 8))
    model = exact_model(sde, MIXTURE)
    x_T = sde.prior_sample(jax.random.key(0), (16, 2))

    def keys():  # fresh key arrays for every call: a consumed key is never reused
        return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(16))

    sampler = diffusion.make_sampler(name)
    batched = jax.jit(jax.vmap(lambda k, x: sampler(k, model, sde, x, grid, **OPTIONS[name])))
    batch, info = batched(keys(), x_T)
    # unbatched runs: test_a_sample_is_the_same_alone_and_in_a_batch
    one, one_info = batched(keys()[5:6], x_T[5:6])
    np.testing.assert_allclose(one[0], batch[5], rtol=1e-5, atol=1e-5)
    assert int(one_info.nfe[0]) == int(info.nfe[5])
    again, _ = batched(keys(), x_T)
    np.testing.assert_array_equal(batch, again)
    assert np.all(np.isfinite(batch)) and np.all(np.asarray(info.nonfinite_step) == -1)


def _never_at_sigma_zero(sde, model):
    """A model that answers NaN at sigma = 0: any evaluation there would poison the output."""
    return diffusion.Model(
        lambda x, t: jnp.where(sde.sigma(t) > 0, model.fn(x, t), jnp.nan), model.output
    )


@pytest.mark.parametrize(
    "name, sde_name, final, expected_nfe",
    [
        ("dpm_solver_pp_2m", "vp", "denoise", lambda n: n),
        ("dpm_solver_pp_3m", "edm", "denoise", lambda n: n),
        ("edm_heun", "vp", "denoise", lambda n: 2 * n - 1),
        ("edm_heun", "edm", "none", lambda n: 2 * n - 1),
        ("edm_heun", "edm", "denoise", lambda n: 2 * n - 1),
        ("edm_heun", "edm", "euler_to_zero", lambda n: 2 * n - 1),
        ("restart", "edm", "denoise", lambda n: 2 * (n + 2 * 3) - 1),
    ],
)
def test_finite_on_grids_that_end_at_sigma_zero(name, sde_name, final, expected_nfe):
    """At sigma = 0 every final is the identity and costs nothing; the model is never called
    there."""
    sde = diffusion.make_sde(sde_name)
    grid = np.append(diffusion.time_grid(sde, "karras", 8)[:-1], 0.0)  # last point sigma = 0
    model = _never_at_sigma_zero(sde, exact_model(sde, MIXTURE))
    x_T = sde.prior_sample(jax.random.key(1), (2,))
    x, info = jitted(name, model, sde, grid, final=final, **OPTIONS[name])(jax.random.key(0), x_T)
    assert np.all(np.isfinite(x)) and int(info.nonfinite_step) == -1, x
    assert int(info.nfe) == expected_nfe(8)


@pytest.mark.parametrize("name", NEW)
def test_finite_near_sigma_zero(name):
    sde = diffusion.make_sde("vp", t_min=1e-5)
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_log_snr", 10))
    # VP times: Restart's default interval
    options = {k: v for k, v in OPTIONS[name].items() if not k.startswith("restart_t")}
    run = jitted(
        name, exact_model(sde, MIXTURE, "eps"), sde, grid, final="euler_to_zero", **options
    )
    x, info = run(jax.random.key(0), sde.prior_sample(jax.random.key(1), (2,)))
    assert np.all(np.isfinite(x)) and int(info.nonfinite_step) == -1


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: diffusion.ddim(
                jax.random.key(0),
                exact_model(diffusion.make_sde("vp")),
                diffusion.make_sde("vp"),
                jnp.ones(2),
                jnp.array([1.0]),
            ),
            "at least two times",
        ),
        (
            lambda: diffusion.ddim(
                jax.random.key(0),
                exact_model(diffusion.make_sde("vp")),
                diffusion.make_sde("vp"),
                jnp.ones(2),
                jnp.array([0.5, 1.0]),
            ),
            "strictly decreasing",
        ),
        (
            lambda: diffusion.pf_ode_euler(
                jax.random.key(0),
                exact_model(diffusion.make_sde("vp")),
                diffusion.make_sde("vp"),
                jnp.ones(2),
                jnp.array([1.0, 0.5]),
                final="bogus",
            ),
            "final must be one of",
        ),
        (lambda: diffusion.check_model_output("logits"), "model output must be one of"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
