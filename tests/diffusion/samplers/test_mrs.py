"""MRS on the mean-reverting SDE: the authors' x-form updates transcribed in NumPy (every order,
ODE and SDE, data and noise prediction), the first-order ODE = DDIM run on x - mu, measured
orders of the ODE solvers against the exact flow's law, exact laws of the SDE solvers (an affine
map of x_T and the noise) converging to the target, the key path's law by Monte Carlo, info and
option errors."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion
from support.samplers import MIXTURE, kl, slope

MU = np.array([0.5, -1.0])  # the mean the process reverts to (the "degraded observation")
MEAN = np.array([1.0, -0.5])  # the data law N(MEAN, COV)
COV = np.array([[2.0, 0.3], [0.3, 0.5]])
LAM = 0.7


def process(schedule="cosine"):
    return diffusion.mean_reverting(jnp.asarray(MU), LAM, schedule=schedule)


def gaussian_model(sde, output="score"):
    """The exact model of x0 ~ N(MEAN, COV): x_t ~ N(mu + a (MEAN - mu), a^2 COV + s^2 I)."""
    w, u = np.linalg.eigh(COV)

    def fn(x, t):
        a, s = sde.alpha(t), sde.sigma(t)
        score = -(u @ ((u.T @ (x - MU - a * (MEAN - MU))) / (a**2 * w + s**2)))
        return diffusion.convert_mean_reverting(score, "score", output, x, t, sde)

    return diffusion.Model(fn, output)


def mixture_model(sde, output="score"):
    """The exact model of x0 = mu + y0, y0 from a two-component mixture (not affine in x)."""

    def fn(x, t):
        score = MIXTURE.diffuse(sde.alpha(t), sde.sigma(t)).score(x - MU)
        return diffusion.convert_mean_reverting(score, "score", output, x, t, sde)

    return diffusion.Model(fn, output)


def marginal(sde, t):
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    return MU + a * (MEAN - MU), a * a * COV + s * s * np.eye(2)


def grid(sde, n):
    return jnp.asarray(diffusion.time_grid(sde, "uniform_log_snr", n))


def reference_mrs(sde, score, x, grid, solver, prediction, order, noise=None, c3=1.0):
    """The MRS update as the paper writes it in x (mu terms explicit), from the authors'
    ``MRSampler`` steps, with lower_order_final (< 10 steps) and an independent conversion of the
    model's ``score(x, t)``: eps = -sigma s, x0 = mu + (x - mu - sigma eps) / alpha."""
    mu, g = MU, np.asarray(grid, np.float64)
    alphas, sigmas = np.asarray(sde.alpha(jnp.asarray(g))), np.asarray(sde.sigma(jnp.asarray(g)))
    lams = np.log(alphas / sigmas)
    n, x, qs = len(g) - 1, np.asarray(x, np.float64), []
    for i in range(n):
        eps = -sigmas[i] * np.asarray(score(jnp.asarray(x), g[i]))
        qs.append(mu + (x - mu - sigmas[i] * eps) / alphas[i] if prediction == "data" else eps)
        k = min(order, i + 1, n - i) if n < 10 else min(order, i + 1)
        h = lams[i + 1] - lams[i]
        q0, d1, d2 = qs[-1], 0.0, 0.0
        if k >= 2:
            r0 = (lams[i] - lams[i - 1]) / h
            d1 = (qs[-1] - qs[-2]) / r0
        if k == 3:
            r1 = (lams[i - 1] - lams[i - 2]) / h
            d11 = (qs[-2] - qs[-3]) / r1
            d10 = d1
            d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
            d2 = (d10 - d11) / (r0 + r1)
        a_s, a_t, s_s, s_t = alphas[i], alphas[i + 1], sigmas[i], sigmas[i + 1]
        if solver == "ode" and prediction == "data":
            p1 = math.exp(-h) - 1
            p2 = p1 / h + 1
            p3 = p2 / h - 0.5
            x = (
                s_t / s_s * x
                - a_t * (p1 * q0 - p2 * d1 + c3 * p3 * d2)
                + mu * (1 - s_t / s_s + s_t / s_s * a_s - a_t)
            )
        elif solver == "ode":
            p1 = math.exp(h) - 1
            p2 = p1 / h - 1
            p3 = p2 / h - 0.5
            x = a_t / a_s * x - s_t * (p1 * q0 + p2 * d1 + c3 * p3 * d2) + mu * (1 - a_t / a_s)
        elif prediction == "data":
            p1 = 1 - math.exp(-2 * h)
            p2 = 1 - p1 / (2 * h)
            x = (
                s_t / s_s * math.exp(-h) * x
                + a_t * p1 * q0
                + a_t * p2 * d1
                + s_t * math.sqrt(p1) * noise[i, 0]
                + mu * (1 - a_t / a_s * math.exp(-2 * h) - a_t * p1)
            )
        else:
            p1 = math.exp(h) - 1
            p2 = p1 / h - 1
            x = (
                a_t / a_s * x
                - 2 * s_t * p1 * q0
                - 2 * s_t * p2 * d1
                + s_t * math.sqrt(math.exp(2 * h) - 1) * noise[i, 0]
                + mu * (1 - a_t / a_s)
            )
    return x


def test_mrs_matches_the_reference_updates(x64):
    """Six steps with lower_order_final: orders 1, 2, 3, 3, 2, 1 (ODE, order 3) and 1, 2, 2, 2,
    2, 1 (SDE, order 2), so every coefficient of every variant is exercised, on a mixture
    (non-affine model), to 1e-12."""
    sde = process()
    model = mixture_model(sde)
    g = grid(sde, 6)
    x_T = sde.prior_sample(jax.random.key(0), (2,))
    noise = jax.random.normal(jax.random.key(1), (6, 1, 2))
    cases = [
        ("ode", "data", 3, 1.0),
        ("ode", "noise", 3, 2.0),
        ("sde", "data", 2, 1.0),
        ("sde", "noise", 2, 1.0),
    ]

    @jax.jit
    def run(x, z):
        return [
            diffusion.mrs(
                None,
                model,
                sde,
                x,
                g,
                solver=solver,
                prediction=prediction,
                order=order,
                consistent_third_order=c3 == 2.0,
                final="none",
                noise=z,
            )
            for solver, prediction, order, c3 in cases
        ]

    score = jax.jit(model.fn)
    for (solver, prediction, order, c3), (ours, info) in zip(cases, run(x_T, noise)):
        ref = reference_mrs(sde, score, x_T, g, solver, prediction, order, np.asarray(noise), c3)
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)
        assert int(info.nfe) == 6 and int(info.nonfinite_step) == -1


def test_first_order_ode_is_ddim_on_the_centred_process(x64):
    """MRS-ODE-1 with data and with noise prediction are one update (DDIM), and the house's DDIM
    run on x - mu through sample_centred gives it too: the existing samplers apply to the
    mean-reverting process on the centred variable."""
    sde = process()
    model = mixture_model(sde, "eps")
    g = grid(sde, 8)
    x_T = sde.prior_sample(jax.random.key(2), (2,))

    @jax.jit
    def run(x):
        data = diffusion.mrs(None, model, sde, x, g, order=1, final="denoise")
        noise = diffusion.mrs(None, model, sde, x, g, order=1, prediction="noise", final="denoise")
        ddim = diffusion.sample_centred(
            diffusion.ddim, jax.random.key(0), model, sde, x, g, final="denoise"
        )
        return data, noise, ddim

    (data, info), (noise, _), (ddim, ddim_info) = run(x_T)
    np.testing.assert_allclose(noise, data, rtol=1e-12)
    np.testing.assert_allclose(ddim, data, rtol=1e-12)
    assert int(info.nfe) == int(ddim_info.nfe) == 9


def flow_law(sde):
    """The exact probability-flow map from t_max to t_min applied to the prior N(mu, LAM^2 I):
    with C_t = a_t^2 COV + s_t^2 I (commuting), x_s = mu + a_s m + C_s^1/2 C_t^-1/2 (x_t - mu -
    a_t m), m = MEAN - mu."""
    w, u = np.linalg.eigh(COV)

    def parts(t):
        a, s = float(sde.alpha(t)), float(sde.sigma(t))
        return a, a * a * w + s * s

    a_hi, c_hi = parts(sde.t_max)
    a_lo, c_lo = parts(sde.t_min)
    m = u @ np.diag(np.sqrt(c_lo / c_hi)) @ u.T
    mean = MU + a_lo * (MEAN - MU) - m @ (a_hi * (MEAN - MU))
    return mean, LAM**2 * m @ m.T


ODE_CASES = [
    dict(order=1),
    dict(order=2),
    dict(order=3),
    dict(order=3, consistent_third_order=True),
    dict(order=2, prediction="noise"),
    dict(order=3, prediction="noise", consistent_third_order=True),
]


def ode_laws(sde, n):
    """Exact output laws of the ODE solvers from N(mu, LAM^2 I): x = A x_T + c, so three runs
    (x_T = 0, e_1, e_2) give N(A mu + c, LAM^2 A A^T)."""
    model, g = gaussian_model(sde), grid(sde, n)
    points = jnp.concatenate([jnp.zeros((1, 2)), jnp.eye(2)])

    @jax.jit
    @jax.vmap
    def run(x):
        return [
            diffusion.mrs(None, model, sde, x, g, lower_order_final=False, final="none", **o)[0]
            for o in ODE_CASES
        ]

    laws = []
    for out in run(points):
        out = np.asarray(out)
        a = (out[1:] - out[0]).T
        laws.append((a @ MU + out[0], LAM**2 * a @ a.T))
    return laws


def test_ode_orders_against_the_exact_flow(x64):
    """KL to the exact flow's law on the uniform-log-SNR grid, N = 16 -> 32 (cosine schedule).
    Measured slopes: order 1 -1.91 (first order, KL ~ N^-2), order 2 -3.95, the authors' order 3
    -5.35 (its D2 term carries half the Taylor coefficient: globally second order, as
    DPM-Solver++(3M); local slopes -4.6, -4.2, -4.07 from N = 32 to 256), consistent order 3
    -7.75; noise prediction: order 2 -3.69, consistent order 3 -6.93."""
    sde = process()
    ref = flow_law(sde)
    steps = [16, 32]
    kls = np.array([[kl(*law, *ref) for law in ode_laws(sde, n)] for n in steps]).T
    slopes = [slope(steps, k) for k in kls]
    o1, o2, o3, o3c, n2, n3c = slopes
    assert abs(o1 + 2.0) < 0.25, slopes
    assert abs(o2 + 4.0) < 0.4 and abs(n2 + 4.0) < 0.5, slopes
    assert o3 < -4.5 and o3c < -5.8 and n3c < -5.5, slopes
    assert kls[3][-1] < kls[2][-1] / 3 < kls[1][-1] / 30, kls  # 3c < 3 < 2 at N = 32


SDE_CASES = [
    dict(order=1),
    dict(order=2),
    dict(order=1, prediction="noise"),
    dict(order=2, prediction="noise"),
]


@functools.cache
def sde_maps(n):
    """x = A x_T + B z + c for each SDE case (z the explicit noise, N x 1 x 2), from runs on the
    zero input and on each basis vector of (x_T, z); x64, cached for the tests that share it."""
    sde = process()
    model, g = gaussian_model(sde), grid(sde, n)
    basis = jnp.eye(2 + 2 * n)
    inputs = jnp.concatenate([jnp.zeros((1, 2 + 2 * n)), basis])

    @jax.jit
    @jax.vmap
    def run(v):
        x, z = v[:2], v[2:].reshape(n, 1, 2)
        return [
            diffusion.mrs(
                None,
                model,
                sde,
                x,
                g,
                solver="sde",
                lower_order_final=False,
                final="none",
                noise=z,
                **o,
            )[0]
            for o in SDE_CASES
        ]

    maps = []
    for out in run(inputs):
        out = np.asarray(out)
        ab = (out[1:] - out[0]).T
        maps.append((ab[:, :2], ab[:, 2:], out[0]))
    return maps


def test_sde_solvers_converge_to_the_target(x64):
    """Exact output laws of the SDE solvers.  From x_T ~ p_T exactly (pure discretisation
    error), KL to p_{t_min} at N = 20 -> 40; measured slopes: data prediction order 1 -1.72
    (weak order 1), order 2 -4.01; noise prediction order 1 -4.31, order 2 -2.78 (-3.7 from 40
    to 80; noise prediction is far off at N = 10: KL 2.7 and 2.7e3, where data prediction has
    0.38 and 0.34: the paper's point that data prediction is the stable one).  From the prior
    N(mu, LAM^2 I) with final="none", data prediction order 2 reaches the data law N(MEAN, COV):
    KL 0.043 at N = 20, 0.0026 at N = 40 (the prior mismatch and sigma(t_min) add less than
    1e-7: these are the discretisation errors above)."""
    sde = process()
    m_T, c_T = marginal(sde, sde.t_max)
    target = marginal(sde, sde.t_min)
    steps = [20, 40]
    kls, data_kls = [], []
    for n in steps:
        maps = sde_maps(n)
        kls.append([kl(a @ m_T + c, a @ c_T @ a.T + b @ b.T, *target) for a, b, c in maps])
        a, b, c = maps[1]
        data_kls.append(kl(a @ MU + c, LAM**2 * a @ a.T + b @ b.T, MEAN, COV))
    slopes = [slope(steps, k) for k in np.array(kls).T]
    d1, d2, n1, n2 = slopes
    assert -2.2 < d1 < -1.3 and d2 < -3.5 and n1 < -3.5 and n2 < -2.3, (slopes, kls)
    assert kls[-1][1] < kls[-1][0] / 10, kls  # order 2 beats order 1 (data prediction)
    assert data_kls[1] < data_kls[0] / 10 and data_kls[1] < 5e-3, data_kls


def test_the_key_path_has_the_exact_law(x64):
    """4000 samples drawn from keys (order 2, data prediction, N = 20) match the exact law of the
    explicit-noise map x = A x_T + B z + c: the mean within 4 standard errors, each covariance
    entry within 4 standard errors of its sample estimate; and noise=None draws
    normal(fold_in(fold_in(key, i), 0)) at step i (sample 0 is the map at its x_T and those
    draws, to round-off)."""
    sde = process()
    n, num = 20, 4000
    model, g = gaussian_model(sde), grid(sde, n)
    a, b, c = sde_maps(n)[1]

    def sample(key, x_T):
        return diffusion.mrs(
            key, model, sde, x_T, g, solver="sde", lower_order_final=False, final="none"
        )[0]

    keys = jax.random.split(jax.random.key(4), num)
    first = jax.random.clone(keys[0])  # the key sample 0 draws from, as a fresh copy
    starts = sde.prior_sample(jax.random.key(5), (num, 2))
    x = np.asarray(jax.jit(jax.vmap(sample))(keys, starts))
    z0 = [
        jax.random.normal(jax.random.fold_in(jax.random.fold_in(first, i), 0), (2,))
        for i in range(n)
    ]
    np.testing.assert_allclose(a @ starts[0] + b @ np.ravel(z0) + c, x[0], rtol=1e-10)
    mean, cov = a @ MU + c, LAM**2 * a @ a.T + b @ b.T
    se_mean = np.sqrt(np.diag(cov) / num)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * se_mean), (x.mean(0), mean)
    # Var of a sample covariance entry of a Gaussian: (C_ij^2 + C_ii C_jj) / n
    se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / num)
    assert np.all(np.abs(np.cov(x.T) - cov) < 4 * se_cov), (np.cov(x.T), cov)


def test_info_counts_evaluations_and_finds_the_first_nonfinite_step():
    """nfe = N (+1 for a final step at sigma > 0, +0 on a grid ending at t = 0); a model that
    turns NaN below t = 0.2 makes the first step evaluated there the first non-finite one."""
    sde = process()
    exact = gaussian_model(sde)
    poisoned = diffusion.Model(lambda x, t: jnp.where(t < 0.2, jnp.nan, exact.fn(x, t)), "score")
    g = jnp.linspace(1.0, 0.01, 9)
    first_bad = int(np.argmax(np.asarray(g) < 0.2))
    to_zero = jnp.linspace(1.0, 0.0, 6)
    x_T = jnp.asarray(MU)
    key = jax.random.key(0)

    @jax.jit
    def run():
        return (
            diffusion.mrs(key, poisoned, sde, x_T, g, final="none")[1],
            diffusion.mrs(key, poisoned, sde, x_T, g, solver="sde", order=1, final="none")[1],
            diffusion.mrs(key, exact, sde, x_T, g, solver="sde", final="denoise"),
            diffusion.mrs(key, exact, sde, x_T, to_zero, final="denoise"),
        )

    ode_bad, sde_bad, (x, denoised), (x0, zero) = run()
    assert int(ode_bad.nonfinite_step) == int(sde_bad.nonfinite_step) == first_bad == 7
    assert int(ode_bad.nfe) == 8 and int(denoised.nfe) == 9 and int(zero.nfe) == 5
    assert int(denoised.nonfinite_step) == int(zero.nonfinite_step) == -1
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(x0))


def test_hyper_parameters_are_traced(x64):
    """mu and the stationary std are pytree fields: one compiled program serves every value, and a
    vmap over them gives the per-value runs."""
    sde = process()
    g = grid(sde, 5)
    mus = jnp.array([[0.5, -1.0], [0.0, 0.0], [2.0, 1.0]])
    lams = jnp.array([0.7, 0.3, 1.5])

    def run(mu, lam):
        p = sde.replace(mu=mu, stationary_std=lam)
        return diffusion.mrs(None, gaussian_model(p, "x0"), p, mu, g, final="none")[0]

    traced = jax.jit(jax.vmap(run))(mus, lams)
    compiled = jax.jit(chex.assert_max_traces(run, n=1))
    single = [compiled(m, s) for m, s in zip(mus, lams)]
    np.testing.assert_allclose(traced, np.stack(single), rtol=1e-12)


def call(**options):
    sde = options.pop("sde", process())
    x = options.pop("x", jnp.ones(2))
    key = options.pop("key", jax.random.key(0))
    g = options.pop("grid", jnp.linspace(1.0, 0.01, 5))
    model = options.pop("model", gaussian_model(process()))
    return lambda: diffusion.mrs(key, model, sde, x, g, **options)


@pytest.mark.parametrize(
    "fn, error, match",
    [
        (call(solver="pf"), ValueError, "solver must be one of"),
        (call(prediction="v"), ValueError, "prediction must be one of"),
        (call(order=4), ValueError, "order must be one of"),
        (call(order=3, solver="sde"), ValueError, "order must be one of"),
        (call(order=True), ValueError, "order must be one of"),
        (call(lower_order_final=1), ValueError, "lower_order_final must be a bool"),
        (call(consistent_third_order="no"), ValueError, "consistent_third_order must be a bool"),
        (call(final="bogus"), ValueError, "final must be one of"),
        (call(grid=jnp.array([0.1, 0.5])), ValueError, "strictly decreasing"),
        (call(sde=diffusion.make_sde("vp")), TypeError, "sde must be a MeanReverting"),
        (call(sde=process().replace(stationary_std=-1.0)), ValueError, "stationary_std"),
        (call(x=jnp.ones(2, jnp.int32)), TypeError, "x must be a float array"),
        (call(x=jnp.ones(3)), ValueError, "mu must be a scalar or broadcast"),
        (call(solver="sde", key=0), TypeError, "key must be a PRNG key"),
        (call(solver="sde", noise=jnp.zeros((3, 1, 2))), ValueError, "noise must have shape"),
        (call(model=diffusion.Model(lambda x, t: x, "logits")), ValueError, "model output"),
    ],
)
def test_bad_options_are_named_before_tracing(fn, error, match):
    with pytest.raises(error, match=match):
        fn()
