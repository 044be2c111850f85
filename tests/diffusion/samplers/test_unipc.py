"""UniPC: the multistep UniP/UniC loop of the authors and diffusers transcribed in NumPy (matrix
solves by numpy.linalg.solve), local errors O(h^(p+1)) (UniP-p) and O(h^(p+2)) (UniC-p) from
exact histories, global orders against the exact flow's law, order 1 without corrector is DDIM, and
option errors raised before tracing."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion, problems
from shufflesgd.diffusion.samplers.unipc import _uni_bh_update
from support.samplers import MIXTURE, TARGET, exact_model, kl, slope


def _phi_system(h, predict_x0, variant, order, rks):
    """The Vandermonde matrix R (rows r^0 .. r^(order-1)) and right-hand side b of one UniPC
    step, built by the recursion of the reference implementations."""
    hh = -h if predict_x0 else h
    h_phi = np.expm1(hh) / hh - 1.0
    b_h = hh if variant == "bh1" else np.expm1(hh)
    rows, rhs, factorial = [], [], 1.0
    for k in range(1, order + 1):
        rows.append(np.power(rks, k - 1))
        rhs.append(h_phi * factorial / b_h)
        factorial *= k + 1
        h_phi = h_phi / hh - 1.0 / factorial
    return np.array(rows), np.array(rhs), b_h


def reference_unipc(
    predict, x, grid, alphas, sigmas, order, variant, prediction, corrector, lower_order_final
):
    """The multistep loop of diffusers' UniPCMultistepScheduler.step (the authors'
    ``multistep_uni_pc_bh_update`` split into ``multistep_uni_p_bh_update`` and
    ``multistep_uni_c_bh_update``) in NumPy: each model output first corrects the state just
    predicted (UniC with the previous step's order), then a UniP step is taken from the
    corrected state; no corrector after the last step.  A step to sigma = 0 returns alpha x0.
    ``predict[prediction](x, t)`` is the model's output in the parameterisation UniPC uses;
    ``alphas``, ``sigmas`` are the process's coefficients on the grid."""
    alphas, sigmas = np.asarray(alphas, np.float64), np.asarray(sigmas, np.float64)
    with np.errstate(divide="ignore"):
        lams = np.log(alphas) - np.log(sigmas)
    data = prediction == "x0"
    n, x = len(grid) - 1, np.asarray(x, np.float64)
    outputs, points = [], []  # model outputs and the grid indices they were taken at

    def base(x_s, s, j, m0):
        h = lams[j] - lams[s]
        if data:
            x_t = sigmas[j] / sigmas[s] * x_s - alphas[j] * np.expm1(-h) * m0
            return x_t, alphas[j], h
        return alphas[j] / alphas[s] * x_s - sigmas[j] * np.expm1(h) * m0, sigmas[j], h

    def differences(step_order, h):
        m0, lam0 = outputs[-1], lams[points[-1]]
        rks = [(lams[points[-(k + 1)]] - lam0) / h for k in range(1, step_order)]
        d1s = [(outputs[-(k + 1)] - m0) / rk for k, rk in zip(range(1, step_order), rks)]
        return np.array(rks + [1.0]), d1s

    def uni_p(x_s, j, step_order):
        x_t, c, h = base(x_s, points[-1], j, outputs[-1])
        if step_order == 1:
            return x_t
        rks, d1s = differences(step_order, h)
        r, b, b_h = _phi_system(h, data, variant, step_order, rks)
        rhos = np.array([0.5]) if step_order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1])
        return x_t - c * b_h * sum(rho * d for rho, d in zip(rhos, d1s))

    def uni_c(x_s, j, m_t, step_order):
        x_t, c, h = base(x_s, points[-1], j, outputs[-1])
        rks, d1s = differences(step_order, h)
        r, b, b_h = _phi_system(h, data, variant, step_order, rks)
        rhos = np.array([0.5]) if step_order == 1 else np.linalg.solve(r, b)
        residual = sum(rho * d for rho, d in zip(rhos[:-1], d1s)) + rhos[-1] * (m_t - outputs[-1])
        return x_t - c * b_h * residual

    last_sample, this_order = None, None
    for i in range(n):
        m = np.asarray(predict[prediction](jnp.asarray(x), grid[i]))
        if corrector and i > 0:
            x = uni_c(last_sample, i, m, this_order)
        outputs.append(m)
        points.append(i)
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)  # warm-up
        last_sample = x
        if sigmas[i + 1] == 0.0:
            x0 = m if data else (x - sigmas[i] * m) / alphas[i]
            x = alphas[i + 1] * x0
        else:
            x = uni_p(x, i + 1, this_order)
    return x


# every (order, variant, prediction, corrector), in two halves that each hold every order with
# and without corrector, every variant and every prediction
OPTIONS = list(itertools.product((1, 2, 3), ("bh1", "bh2"), ("x0", "eps"), (True, False)))
HALF = [case for case in OPTIONS if (case[1] == "bh1") == (case[2] == "x0")]
OTHER_HALF = [case for case in OPTIONS if case not in HALF]


def batched(model, sde, cases, **common):
    """``(x_T, grid) -> [x for each case]``: UniPC under every option tuple in ``cases`` (order,
    variant, prediction, corrector), compiled once as one program (one compilation instead of
    one per case)."""

    def run(x, grid):
        return [
            diffusion.unipc(
                None,
                model,
                sde,
                x,
                grid,
                order=order,
                variant=variant,
                prediction=prediction,
                corrector=corrector,
                **common,
            )
            for order, variant, prediction, corrector in cases
        ]

    return jax.jit(run)


@pytest.mark.parametrize(
    "sde_name, grids, lower_order_final, cases",
    [
        ("vp", [("karras", False)], True, HALF),
        ("edm", [("uniform_log_snr", False), ("karras", True)], False, OTHER_HALF),
    ],
    ids=["vp-karras", "edm-log-snr-and-to-zero"],
)
def test_unipc_matches_the_reference_loop(sde_name, grids, lower_order_final, cases, x64):
    """Six steps, the mixture's exact model: every option tuple agrees with the NumPy loop at
    rtol 1e-12, with exactly one evaluation a step; on EDM without lower_order_final (the last
    step of order 3) and also on a grid that ends at sigma = 0 (the last step first order,
    x = alpha x0)."""
    num_steps = 6
    sde = diffusion.make_sde(sde_name)
    model = exact_model(sde, MIXTURE)
    x_T = sde.prior_sample(jax.random.key(0), (2,))
    run = batched(model, sde, cases, lower_order_final=lower_order_final, final="none")
    predict = {
        output: jax.jit(lambda x, t, output=output: model.predict(sde, x, t, output))
        for output in ("x0", "eps")
    }
    coefficients = jax.jit(lambda grid: (sde.alpha(grid), sde.sigma(grid)))
    for grid_kind, to_zero in grids:
        grid = diffusion.time_grid(sde, grid_kind, num_steps)
        if to_zero:
            grid = np.append(grid[:-1], 0.0)
        alphas, sigmas = coefficients(jnp.asarray(grid))
        results = run(x_T, jnp.asarray(grid))
        for (order, variant, prediction, corrector), (ours, info) in zip(cases, results):
            options = dict(order=order, variant=variant, prediction=prediction, corrector=corrector)
            ref = reference_unipc(
                predict, x_T, grid, alphas, sigmas, lower_order_final=lower_order_final, **options
            )
            np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12, err_msg=str(options))
            assert int(info.nfe) == num_steps and int(info.nonfinite_step) == -1


def test_unipc_order_1_without_corrector_is_ddim(x64):
    """UniP-1 is DDIM (eta = 0) in either parameterisation, whatever B(h), on a grid that ends
    at sigma > 0 and on one that ends at sigma = 0."""
    sde = diffusion.make_sde("vp")
    model = exact_model(sde, MIXTURE)
    x_T = jnp.array([0.7, -1.3])
    cases = [
        (1, variant, prediction, False)
        for variant in ("bh1", "bh2")
        for prediction in ("x0", "eps")
    ]
    unipc = batched(model, sde, cases, final="none")
    ddim = jax.jit(
        lambda x, grid: diffusion.ddim(jax.random.key(0), model, sde, x, grid, final="none")[0]
    )
    for grid in (
        diffusion.time_grid(sde, "uniform_log_snr", 6),
        np.append(diffusion.time_grid(sde, "karras", 6)[:-1], 0.0),
    ):
        reference = ddim(x_T, jnp.asarray(grid))
        for case, (ours, _) in zip(cases, unipc(x_T, jnp.asarray(grid))):
            np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-14, err_msg=str(case))


def _target_x64():
    """TARGET rebuilt in float64 (TARGET itself was built, in float32, at import): the same
    numbers, so support.samplers.flow_law still is its exact flow's law."""
    return problems.gaussian_mixture(
        [1.0], np.asarray(TARGET.means, np.float64), np.asarray(TARGET.covariances, np.float64)
    )


def _exact_flow(sde, x, t_from, t_to):
    """The exact probability-flow map on TARGET (one Gaussian, commuting covariances), in
    float64."""
    mu, cov = (np.asarray(a[0], np.float64) for a in (TARGET.means, TARGET.covariances))
    w, u = np.linalg.eigh(cov)

    def var(t):
        return float(sde.alpha(t)) ** 2 * w + float(sde.sigma(t)) ** 2

    m = u @ np.diag(np.sqrt(var(t_to) / var(t_from))) @ u.T
    return float(sde.alpha(t_to)) * mu + m @ (x - float(sde.alpha(t_from)) * mu)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_unipc_local_orders_from_exact_histories(prediction, variant, x64):
    """One step from the exact flow's state with exact model outputs at the p - 1 previous
    points (uniform steps h in lambda around lambda = 0, VP): the UniP-p error is O(h^(p+1)) and,
    once the output at the predicted point corrects it, the UniC-p error O(h^(p+2)): orders p and
    p + 1.  This is the paper's claim free of the warm-up, whose lower orders cap the global
    order (test_unipc_global_orders)."""
    sde = diffusion.make_sde("vp")
    model = exact_model(sde, _target_x64())
    data = prediction == "x0"
    lam0 = 0.0
    time_of = lambda lam: float(sde.time_of_log_snr(2.0 * lam))  # noqa: E731
    x_s0 = np.array([0.8, -1.1])

    @jax.jit
    def step(x, m0, m1, m2, m_t, lam, coefficients, order):
        return _uni_bh_update(
            x, m0, m1, m2, m_t, lam, coefficients, order, data=data, bh1=variant == "bh1"
        )

    @jax.jit
    def step_p(x, m0, m1, m2, lam, coefficients, order):
        return _uni_bh_update(
            x, m0, m1, m2, None, lam, coefficients, order, data=data, bh1=variant == "bh1"
        )

    predict = jax.jit(lambda x, t: model.predict(sde, x, t, prediction))
    hs = np.array([0.1, 0.05, 0.025, 0.0125])
    errors = {}
    for h in hs:
        lams = [lam0, lam0 - h, lam0 - 2 * h, lam0 + h]
        times = [time_of(lam) for lam in lams]
        lams = [float(0.5 * sde.log_snr(t)) for t in times]  # those of the times used
        states = [_exact_flow(sde, x_s0, times[0], t) for t in times]
        m0, m1, m2 = (np.asarray(predict(jnp.asarray(s), t)) for s, t in zip(states[:3], times[:3]))
        coefficients = tuple(
            float(f(t)) for t in (times[0], times[3]) for f in (sde.alpha, sde.sigma)
        )
        for order in (1, 2, 3):
            predicted = step_p(x_s0, m0, m1, m2, tuple(lams), coefficients, order)
            m_t = predict(predicted, times[3])
            corrected = step(x_s0, m0, m1, m2, m_t, tuple(lams), coefficients, order)
            errors.setdefault(("p", order), []).append(np.linalg.norm(predicted - states[3]))
            errors.setdefault(("c", order), []).append(np.linalg.norm(corrected - states[3]))
    for (kind, order), errs in errors.items():
        expected = order + 1 if kind == "p" else order + 2
        measured = np.polyfit(np.log(hs), np.log(errs), 1)[0]
        assert abs(measured - expected) < 0.3, (kind, order, measured, errs)


def test_unipc_global_orders(x64):
    """KL to the exact flow's law (EDM, sigma in [0.1, 10], uniform log-SNR grids of 32 and 64
    steps, data prediction, B(h) = e^h - 1, lower_order_final off): KL ~ N^(-2 order).  UniP-1 and
    UniP-2 are first and second order, UniPC-1 and UniPC-2 second and third.  The warm-up steps
    (orders 1, 2, ...) cap the rest: UniP-3 converges at second order (its first, first-order
    step costs O(h^2)), UniPC-3 at third order or better (its first step is UniC-1, O(h^3))."""
    sde = diffusion.make_sde("edm", sigma_min=0.1, sigma_max=10.0)
    model = exact_model(sde, _target_x64())
    cases = [(order, "bh2", "x0", corrector) for order in (1, 2, 3) for corrector in (False, True)]
    steps = [32, 64]
    # the exact flow's law, in float64: the affine map t_max -> t_min applied to the prior
    flow = [
        _exact_flow(sde, x, sde.t_max, sde.t_min)
        for x in np.concatenate([np.zeros((1, 2)), np.eye(2)])
    ]
    a = (np.array(flow[1:]) - flow[0]).T
    reference = flow[0], sde.prior_std**2 * a @ a.T
    points = jnp.concatenate([jnp.zeros((1, 2)), jnp.eye(2)])
    kls = {case: [] for case in cases}
    run = batched(model, sde, cases, lower_order_final=False, final="none")
    for n in steps:
        grid = jnp.asarray(diffusion.time_grid(sde, "uniform_log_snr", n))
        outputs = jax.jit(jax.vmap(lambda x, g: [x for x, _ in run(x, g)], in_axes=(0, None)))(
            points, grid
        )
        for case, out in zip(cases, outputs):
            out = np.asarray(out)  # x(0), x(e_1), x(e_2): the affine map of x_T
            a = (out[1:] - out[0]).T
            kls[case].append(kl(out[0], sde.prior_std**2 * a @ a.T, *reference))
    slopes = {case[::3]: slope(steps, value) for case, value in kls.items()}
    for (order, corrector), expected in {
        (1, False): 1,
        (1, True): 2,
        (2, False): 2,
        (2, True): 3,
    }.items():
        assert abs(slopes[order, corrector] + 2 * expected) < 0.35, slopes
    assert abs(slopes[3, False] + 4.0) < 0.6, slopes  # capped at second order by the warm-up
    assert slopes[3, True] < -6.0 + 0.35, slopes
    assert kls[3, "bh2", "x0", True][-1] < kls[2, "bh2", "x0", True][-1] / 100, kls


def test_unipc_never_evaluates_at_sigma_zero():
    """On a grid that ends at sigma = 0 the model (NaN there) is never called: every final step
    is the identity and costs nothing (nfe = N); near sigma = 0 (VP, t_min = 1e-5, an eps model)
    the output stays finite."""
    sde = diffusion.make_sde("vp")
    exact = exact_model(sde, MIXTURE)
    model = diffusion.Model(
        lambda x, t: jnp.where(sde.sigma(t) > 0, exact.fn(x, t), jnp.nan), exact.output
    )
    grid = jnp.asarray(np.append(diffusion.time_grid(sde, "karras", 8)[:-1], 0.0))
    near = diffusion.make_sde("vp", t_min=1e-5)
    near_grid = jnp.asarray(diffusion.time_grid(near, "uniform_log_snr", 10))
    near_model = exact_model(near, MIXTURE, "eps")

    @jax.jit
    def run(x):
        return [
            diffusion.unipc(None, model, sde, x, grid, order=3, final=final)
            for final in diffusion.FINALS
        ] + [
            diffusion.unipc(
                None,
                near_model,
                near,
                x,
                near_grid,
                order=3,
                prediction=prediction,
                final="euler_to_zero",
            )
            for prediction in ("x0", "eps")
        ]

    results = run(sde.prior_sample(jax.random.key(1), (2,)))
    for x, info in results[:3]:
        assert np.all(np.isfinite(x)) and int(info.nonfinite_step) == -1, x
        assert int(info.nfe) == 8
    for x, info in results[3:]:
        assert np.all(np.isfinite(x)) and int(info.nonfinite_step) == -1, x
        assert int(info.nfe) == 11


def _refuses_to_trace():
    def fn(x, t):
        raise AssertionError("the model was traced before the options were checked")

    return diffusion.Model(fn, "score")


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(order=0), "order must be 1, 2 or 3"),
        (dict(order=4), "order must be 1, 2 or 3"),
        (dict(order=2.0), "order must be 1, 2 or 3"),
        (dict(order=True), "order must be 1, 2 or 3"),
        (dict(variant="bh3"), "variant must be one of"),
        (dict(prediction="v"), "prediction must be one of"),
        (dict(corrector=1), "corrector must be a bool"),
        (dict(lower_order_final="yes"), "lower_order_final must be a bool"),
        (dict(final="bogus"), "final must be one of"),
    ],
)
def test_bad_options(options, match):
    sde = diffusion.make_sde("edm")
    grid = jnp.asarray(diffusion.time_grid(sde, "karras", 4))
    with pytest.raises(ValueError, match=match):
        diffusion.unipc(jax.random.key(0), _refuses_to_trace(), sde, jnp.ones(2), grid, **options)
