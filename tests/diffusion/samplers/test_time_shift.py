"""The Time-Shift sampler: plain DDIM / ancestral sampling bit for bit when nothing can shift; an
independent NumPy transcription of the authors' loop (Alg. 1 in our continuous window) at 1e-12;
on a model with an emulated exposure bias (eps too large by 10%), the variance drift of DDIM and
DDPM at equal NFE is cut by Time-Shift (Monte Carlo against the exact laws); traced options, image
shaped states, grids ending at sigma = 0; option errors named before compiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion, problems
from support.samplers import MIXTURE, call_sampler, exact_model


def _state(sde, dim, seed=0):
    return sde.prior_sample(jax.random.key(seed), (dim,))


@pytest.mark.parametrize("sde_name, output", [("vp", "eps"), ("edm", "x0")])
def test_nothing_to_shift_is_ddim_and_ancestral_bit_for_bit(sde_name, output, x64):
    """With window = 1 TS-DDIM is DDIM (eta = 0 and 0.6) and TS-DDPM is ancestral sampling, bit for
    bit, under both final steps; window_width = 0 or a cutoff at the start keep every coupled time
    on the grid, the same steps in another program (equal to round-off: measured within 1 ulp);
    with the defaults the output moves."""
    sde = diffusion.make_sde(sde_name)
    grid = jnp.asarray(diffusion.time_grid(sde, "karras", 6))
    model = exact_model(sde, problems.random_gaussian_mixture(0, 2, 8), output)
    x_T, key = _state(sde, 8), jax.random.key(5)

    def compiled(sampler, final, traced=(), **static):
        """The sampler's output, compiled once, as a function of the options named in traced."""
        return jax.jit(
            lambda *values: sampler(
                key, model, sde, x_T, grid, final=final, **static, **dict(zip(traced, values))
            )[0]
        )

    for final in ("none", "denoise"):
        ddim = compiled(diffusion.ddim, final, ("eta",))
        one = compiled(diffusion.time_shift_ddim, final, ("eta",), window=1, data_variance=0.4)
        shifted = compiled(
            diffusion.time_shift_ddim, final, ("eta", "window_width", "cutoff"), data_variance=0.4
        )
        for eta in (0.0, 0.6):
            want = ddim(eta)
            np.testing.assert_array_equal(one(eta), want)
            for width, cutoff in ((0.0, 0.0), (0.5, float(grid[0]))):
                np.testing.assert_allclose(
                    shifted(eta, width, cutoff), want, rtol=1e-14, atol=1e-14
                )
            assert np.max(np.abs(shifted(eta, 0.5, 0.0) - want)) > 1e-3
    want = compiled(diffusion.ancestral, "none")()
    ts_ddpm = compiled(diffusion.time_shift_ddpm, "none", window=1, data_variance=0.4)
    np.testing.assert_array_equal(ts_ddpm(), want)


def reference_time_shift(sde, model, x, grid, window, width, cutoff, data_variance, eta, noise):
    """The authors' Time-Shift loop (Li et al. 2024, Alg. 1) transcribed in NumPy for a
    continuous grid: evaluate at the coupled time t_s, take the DDIM / DDPM step (Song et al.
    2021, Eq. 12 and 16) from t_s to the scheduled next time, then, above the cutoff, couple the
    new state with the window candidate whose variance alpha^2 sigma_d^2 + sigma^2 is nearest
    to the state's unbiased sample variance.  Returns the sample and the coupled times."""
    a = lambda t: float(sde.alpha(t))  # noqa: E731
    s = lambda t: float(sde.sigma(t))  # noqa: E731
    predict = jax.jit(lambda x, t: model.predict(sde, x, t, "x0"))
    x, t_s, coupled = np.asarray(x, np.float64), float(grid[0]), []
    m = (window - 1) // 2
    for i in range(len(grid) - 1):
        t_next = float(grid[i + 1])
        x0 = np.asarray(predict(jnp.asarray(x), t_s))
        eps = (x - a(t_s) * x0) / s(t_s)
        c = (
            eta
            * s(t_next)
            / s(t_s)
            * np.sqrt(s(t_s) ** 2 - (a(t_s) / a(t_next)) ** 2 * s(t_next) ** 2)
        )
        x = a(t_next) * x0 + np.sqrt(s(t_next) ** 2 - c**2) * eps + c * noise[i, 0]
        t_s = t_next
        if i < len(grid) - 2 and t_next > cutoff:
            above, below = float(grid[i]) - t_next, t_next - float(grid[i + 2])
            candidates = [
                t_next + (j / max(m, 1)) * width * (above if j > 0 else below)
                for j in range(-m, m + 1)
            ]
            variance = np.var(x, ddof=1)
            gaps = [abs(variance - (a(c) ** 2 * data_variance + s(c) ** 2)) for c in candidates]
            t_s = candidates[int(np.argmin(gaps))]
        coupled.append(t_s)
    return x, np.array(coupled)


@pytest.mark.parametrize(
    "sde_name, grid_kind, options",
    [
        ("vp", "uniform_time", dict(window=7, window_width=0.6, cutoff=0.15, data_variance=0.8)),
        ("edm", "karras", dict(window=9, window_width=0.8, cutoff=0.5, data_variance=0.0)),
    ],
)
def test_matches_the_reference_loop(sde_name, grid_kind, options, x64):
    """TS-DDIM and TS-DDPM (explicit noise) on an 8-d two-component mixture with its exact
    score, against the NumPy loop at 1e-12; the loop's coupled times did leave the grid."""
    sde = diffusion.make_sde(sde_name)
    mixture = problems.random_gaussian_mixture(3, 2, 8)
    model = exact_model(sde, mixture, "score")
    grid = diffusion.time_grid(sde, grid_kind, 10)
    x_T = _state(sde, 8, seed=1)
    noise = np.asarray(jax.random.normal(jax.random.key(2), (10, 1, 8)), np.float64)
    for name, eta in (("time_shift_ddim", 0.0), ("time_shift_ddpm", 1.0)):
        sampler = diffusion.make_sampler(name)
        ours, info = jax.jit(
            lambda x, z, s=sampler: s(
                None, model, sde, x, jnp.asarray(grid), final="none", noise=z, **options
            )
        )(x_T, jnp.asarray(noise))
        ref, coupled = reference_time_shift(
            sde,
            model,
            x_T,
            grid,
            options["window"],
            options["window_width"],
            options["cutoff"],
            options["data_variance"],
            eta,
            noise,
        )
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
        assert int(info.nfe) == 10 and int(info.nonfinite_step) == -1
        shifted = np.sum(np.abs(coupled - grid[1:]) > 1e-9 * np.abs(grid[1:]))
        assert shifted >= 3, (name, coupled, grid)


def _second_moment_error(samples, v0):
    """Monte Carlo E|x|^2 / (d v0) - 1 and its standard error, from per-sample values."""
    per_sample = np.sum(np.asarray(samples, np.float64) ** 2, axis=-1) / (samples.shape[-1] * v0)
    return per_sample.mean() - 1.0, per_sample.std(ddof=1) / np.sqrt(per_sample.size)


def test_time_shift_corrects_an_emulated_exposure_bias(x64):
    """Data N(0, v0 I) in d = 32, VP, 20 uniform steps (21 evaluations each with the final
    denoise).  The biased model predicts 1.1 eps (epsilon_scaling with b = 1/1.1), so DDIM and
    ancestral samples come out too narrow: E|x|^2 / (d v0) - 1 = -0.788 and -0.475 (exact laws).
    Time-Shift with the data variance (window 11, width 0.9) measured -0.026 and -0.113 (Monte
    Carlo, 400 samples, standard errors 0.003 and 0.005); assert a cut to below a third, with 4
    standard errors of slack.  Not asserted: the released rule (data_variance = 0, same window)
    measured -0.767 for TS-DDIM (barely better than DDIM) and -0.765 for TS-DDPM (worse than
    ancestral); on the exact model DDIM's -0.199 became -0.012 with the data variance and -0.68
    without."""
    d, v0, n = 32, 0.5, 400
    data = problems.gaussian_mixture([1.0], np.zeros((1, d)), v0 * np.eye(d)[None])
    sde = diffusion.make_sde("vp")
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_time", 20))
    biased = diffusion.epsilon_scaling(
        diffusion.mixture_model(sde, data.eigen()), sde, 0.0, 1 / 1.1
    )
    options = dict(window=11, window_width=0.9, data_variance=v0)
    x_T = sde.prior_sample(jax.random.key(0), (n, d))
    for plain, shifted in (("ddim", "time_shift_ddim"), ("ancestral", "time_shift_ddpm")):
        mean, cov = diffusion.exact_gaussian_law(
            diffusion.make_sampler(plain), biased, sde, grid, d, 1
        )
        exact_error = (np.trace(cov) + mean @ mean) / (d * v0) - 1.0
        samples, info = jax.jit(
            lambda k, x, s=shifted: diffusion.sample_batch(
                diffusion.make_sampler(s), k, biased, sde, x, grid, **options
            )
        )(jax.random.key(1), x_T)
        error, stderr = _second_moment_error(samples, v0)
        assert exact_error < -0.4, (plain, exact_error)
        assert abs(error) + 4 * stderr < abs(exact_error) / 3, (shifted, error, stderr, exact_error)
        assert np.all(np.asarray(info.nfe) == diffusion.SAMPLERS[plain].nfe(20))


def test_traced_options_and_image_shaped_states(x64):
    """window_width, cutoff, data_variance and eta may be traced (a vmapped sweep equals separate
    runs); a [4, 4] state is matched on the variance of all its entries (= the flat run)."""
    sde = diffusion.make_sde("vp")
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_time", 8))
    model = exact_model(sde, problems.random_gaussian_mixture(1, 1, 16), "eps")
    x_T = _state(sde, 16, seed=4)

    def run(width, cutoff, dv, eta, x=x_T):
        return diffusion.time_shift_ddim(
            jax.random.key(3),
            model,
            sde,
            x,
            grid,
            window=5,
            window_width=width,
            cutoff=cutoff,
            data_variance=dv,
            eta=eta,
        )[0]

    sweep = (jnp.array([0.0, 0.5, 0.9]), jnp.array([0.0, 0.3, 0.0]), jnp.array([0.0, 1.0, 2.0]))
    etas = jnp.array([0.0, 0.5, 1.0])
    swept = jax.jit(jax.vmap(run))(*sweep, etas)
    one = jax.jit(run)
    for row, *args in zip(swept, *sweep, etas):
        np.testing.assert_allclose(row, one(*args), rtol=1e-12, atol=1e-12)
    assert np.max(np.abs(swept[1] - swept[0])) > 1e-3

    image_model = diffusion.Model(lambda x, t: model.fn(x.reshape(16), t).reshape(4, 4), "eps")
    image = diffusion.time_shift_ddim(
        jax.random.key(3), image_model, sde, x_T.reshape(4, 4), grid, data_variance=1.0
    )[0]
    flat = diffusion.time_shift_ddim(jax.random.key(3), model, sde, x_T, grid, data_variance=1.0)[0]
    np.testing.assert_allclose(image.reshape(16), flat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["time_shift_ddim", "time_shift_ddpm"])
def test_grid_ending_at_sigma_zero(name):
    """No candidate time reaches the lower neighbour: the model is never evaluated at sigma = 0
    on the way down a grid that ends there."""
    sde = diffusion.make_sde("edm")
    grid = np.append(diffusion.time_grid(sde, "karras", 8)[:-1], 0.0)
    good = exact_model(sde, MIXTURE)
    model = diffusion.Model(
        lambda x, t: jnp.where(sde.sigma(t) > 0, good.fn(x, t), jnp.nan), "score"
    )
    x, info = jax.jit(
        lambda k, x: diffusion.make_sampler(name)(
            k, model, sde, x, jnp.asarray(grid), final="none", window_width=0.99
        )
    )(jax.random.key(0), _state(sde, 2))
    assert np.all(np.isfinite(x)) and int(info.nonfinite_step) == -1
    assert int(info.nfe) == 8


@pytest.mark.parametrize(
    "call, match",
    [
        (call_sampler("time_shift_ddim", window=4), "window must be odd"),
        (call_sampler("time_shift_ddim", window=0), "window must be a positive int"),
        (call_sampler("time_shift_ddpm", window=3.0), "window must be a positive int"),
        (call_sampler("time_shift_ddim", window_width=1.0), "window_width must lie in"),
        (call_sampler("time_shift_ddpm", window_width=-0.1), "window_width must lie in"),
        (call_sampler("time_shift_ddim", cutoff=float("nan")), "cutoff must be finite"),
        (call_sampler("time_shift_ddim", data_variance=-1.0), "data_variance must be"),
        (call_sampler("time_shift_ddim", data_variance=[1.0, 2.0]), "data_variance must be a"),
        (call_sampler("time_shift_ddim", eta=1.5), "eta must lie in"),
        (call_sampler("time_shift_ddpm", final="bogus"), "final must be one of"),
    ],
)
def test_bad_options(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_single_entry_state_is_refused():
    sde = diffusion.make_sde("vp")
    grid = jnp.asarray(diffusion.time_grid(sde, "uniform_time", 4))
    with pytest.raises(ValueError, match="x must have at least two entries"):
        diffusion.time_shift_ddim(jax.random.key(0), exact_model(sde), sde, jnp.ones(1), grid)
