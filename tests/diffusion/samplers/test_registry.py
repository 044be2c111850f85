"""The sampler registry: every entry's NFE and noise draws per step against what the sampler does
(model calls counted on the host, normal draws counted), its budget rule, and name errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion
from support.samplers import MIXTURE, exact_model

STEPS = 5
FIXED_GRID = [name for name, spec in diffusion.SAMPLERS.items() if spec.nfe_per_step is not None]
# every fixed-grid sampler with its defaults, and the options that change a count
CASES = [(name, {}) for name in FIXED_GRID] + [
    ("ddim", dict(eta=0.5)),
    ("predictor_corrector", dict(corrector_steps=0)),
    ("predictor_corrector", dict(corrector_steps=3)),
    ("edm_heun", dict(S_churn=5.0)),
    ("restart", dict(restart_k=3, restart_steps=2)),
]
IDS = [
    f"{name}-{'-'.join(f'{k}={v}' for k, v in options.items()) or 'defaults'}"
    for name, options in CASES
]


def setting():
    """EDM (Restart's default interval is in its times), a Karras grid ending at sigma > 0,
    one x_T."""
    sde = diffusion.make_sde("edm")
    return sde, jnp.asarray(diffusion.time_grid(sde, "karras", STEPS)), jnp.array([30.0, -50.0])


def counted(sde, calls):
    """The exact mixture score, counting every evaluation on the host as it runs."""
    exact = exact_model(sde, MIXTURE)

    def fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return exact.fn(x, t)

    return diffusion.Model(fn, "score")


# the final denoising step is the same code for every sampler (base.finish_at_zero): counted
# with one sampler per family of update
DENOISED = ("ddim", "predictor_corrector", "dpm_solver_pp_2m", "edm_heun", "restart", "unipc")
NFE_CASES = [(*case, "none") for case in CASES] + [
    (*case, "denoise") for case in CASES if case[0] in DENOISED
]
NFE_IDS = [f"{i}-none" for i in IDS] + [
    f"{i}-denoise" for i, case in zip(IDS, CASES) if case[0] in DENOISED
]


@pytest.mark.parametrize("name, options, final", NFE_CASES, ids=NFE_IDS)
def test_nfe_per_step_is_what_the_sampler_evaluates(name, options, final):
    """Model calls counted on the host = info.nfe = N nfe_per_step + nfe_fixed (+ 1 final step)."""
    spec = diffusion.SAMPLERS[name]
    sde, grid, x_T = setting()
    calls = []
    model = counted(sde, calls)
    x, info = jax.jit(
        lambda x: spec.sampler(jax.random.key(0), model, sde, x, grid, final=final, **options)
    )(x_T)
    x.block_until_ready()
    jax.effects_barrier()
    cost, nfe = spec.cost(**options), spec.nfe(STEPS, final=final, **options)
    assert len(calls) == int(info.nfe) == nfe, (len(calls), info.nfe, cost)
    assert nfe == STEPS * cost.nfe_per_step + cost.nfe_fixed + (final != "none")


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_noise_draws_per_step_are_the_slots_the_sampler_reads(name, options):
    """With draws_per_step + 1 noise slots a step, a NaN in slot j reaches the output iff
    j < draws_per_step (0 * NaN is NaN, so a draw scaled by zero counts as read); the key path
    reads the same draws, normal(fold_in(fold_in(key, i), j))."""
    spec = diffusion.SAMPLERS[name]
    draws = spec.cost(**options).noise_draws_per_step
    sde, grid, x_T = setting()
    model = exact_model(sde, MIXTURE)
    key = jax.random.key(1)

    def normal(i, j):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), j), (2,))

    steps, slots = jnp.arange(STEPS), jnp.arange(draws + 1)
    noise = jax.vmap(lambda i: jax.vmap(lambda j: normal(i, j))(slots))(steps)
    run = jax.jit(
        lambda z: spec.sampler(None, model, sde, x_T, grid, final="none", noise=z, **options)[0]
    )
    if draws:  # a deterministic sampler reads neither: the poisoned slot 0 below shows it
        by_key = jax.jit(
            lambda k: spec.sampler(k, model, sde, x_T, grid, final="none", **options)[0]
        )(jax.random.key(1))
        np.testing.assert_allclose(run(noise), by_key, rtol=1e-5, atol=1e-5)
    for j in range(draws + 1):
        poisoned = run(noise.at[:, j].set(jnp.nan))
        assert bool(np.all(np.isfinite(poisoned))) == (j >= draws), (j, draws, poisoned)


@pytest.mark.parametrize(
    "name, options",
    [case for case in CASES if case[0] != "restart"],
    ids=[i for i, case in zip(IDS, CASES) if case[0] != "restart"],
)
def test_every_step_makes_its_normal_draws(name, options, monkeypatch):
    """Calls of jax.random.normal counted as they run: draws_per_step of them at each of the N steps
    (Restart draws only at the step that reaches its interval: the slot test above covers it)."""
    spec = diffusion.SAMPLERS[name]
    sde, grid, x_T = setting()
    model = exact_model(sde, MIXTURE)
    calls, normal = [], jax.random.normal

    def counting(key, shape=(), dtype=float):
        jax.debug.callback(lambda: calls.append(1))
        return normal(key, shape, dtype)

    monkeypatch.setattr(jax.random, "normal", counting)
    x, _ = jax.jit(lambda k: spec.sampler(k, model, sde, x_T, grid, final="none", **options))(
        jax.random.key(2)
    )
    x.block_until_ready()
    jax.effects_barrier()
    assert len(calls) == STEPS * spec.cost(**options).noise_draws_per_step


@pytest.mark.parametrize("name, options", CASES, ids=IDS)
def test_steps_within_a_budget_is_the_most_that_fit(name, options):
    spec = diffusion.SAMPLERS[name]
    for final in ("none", "denoise"):
        for budget in range(1, 60):
            steps = spec.steps_within(budget, final=final, **options)
            if steps is None:
                assert spec.nfe(1, final=final, **options) > budget
            else:
                fits, next_one = (spec.nfe(n, final=final, **options) for n in (steps, steps + 1))
                assert fits <= budget < next_one


def test_every_entry_names_its_sampler_and_paper():
    for name, spec in diffusion.SAMPLERS.items():
        assert spec.name == name and diffusion.make_sampler(name) is spec.sampler
        assert diffusion.sampler_spec(name) is spec and spec.paper
    assert not diffusion.SAMPLERS["pf_ode_adaptive"].affine
    assert not diffusion.SAMPLERS["predictor_corrector"].affine


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: diffusion.sampler_spec("bogus"), ValueError, "sampler must be one of"),
        (lambda: diffusion.SAMPLERS["pf_ode_adaptive"].cost(), ValueError, "step-size controller"),
        (
            lambda: diffusion.SAMPLERS["restart"].cost(restart_kk=3),
            TypeError,
            "restart has no option restart_kk",
        ),
        (lambda: diffusion.SAMPLERS["ddim"].nfe(0), ValueError, "num_steps must be a positive int"),
        (
            lambda: diffusion.SAMPLERS["ddim"].steps_within(2.5),
            ValueError,
            "budget must be a positive int",
        ),
    ],
)
def test_bad_names_and_options(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: diffusion.make_sampler("bogus"), "sampler must be one of"),
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
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
