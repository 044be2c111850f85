"""The mean-reverting SDE (IR-SDE): the closed-form integral of each theta schedule against
quadrature, drift and diffusion against alpha and sigma, log-SNR inverses, marginals against the
moment ODEs and a Euler-Maruyama simulation, the prior, output conversions, the centred
variable on which the house samplers run, traced fields and option errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from shufflesgd import diffusion

MU = np.array([0.5, -1.0])
VARIANTS = [
    dict(schedule="cosine"),
    dict(schedule="cosine", cosine_s=0.05, terminal_alpha=0.01, t_max=2.0),
    dict(schedule="linear"),
    dict(schedule="linear", linear_start=0.3, t_min=0.0),
    dict(schedule="constant", terminal_alpha=0.1),
]
IDS = ["cosine", "cosine-s", "linear", "linear-r", "constant"]


def make(**options):
    return diffusion.mean_reverting(jnp.asarray(MU), 0.7, **options)


def times(sde):
    return np.array([1e-3, 0.01, 0.2, 0.5, 0.9]) * sde.t_max


@pytest.mark.parametrize("options", VARIANTS, ids=IDS)
def test_theta_bar_is_the_integral_of_theta(options, x64):
    """theta_bar(t) against adaptive quadrature of theta; e^{-theta_bar(t_max)} = terminal_alpha;
    the cosine theta is proportional to IR-SDE's 1 - cos^2(phi(u)) / cos^2(phi(0)) in its naive
    form, and starts at 0."""
    sde = make(**options)
    theta = lambda s: float(sde.theta(s))  # noqa: E731
    for t in times(sde):
        exact = integrate.quad(theta, 0.0, t, epsabs=0.0, epsrel=1e-13, limit=200)[0]
        np.testing.assert_allclose(float(sde.theta_bar(t)), exact, rtol=1e-10)
    np.testing.assert_allclose(float(sde.alpha(sde.t_max)), sde.terminal_alpha, rtol=1e-13)
    if sde.schedule == "cosine":
        s = sde.cosine_s
        phi = lambda u: math.pi / 2 * (u + s) / (1 + s)  # noqa: E731
        naive = lambda t: 1 - math.cos(phi(t / sde.t_max)) ** 2 / math.cos(phi(0)) ** 2  # noqa: E731
        for t in times(sde):
            np.testing.assert_allclose(
                theta(t) / theta(sde.t_max), naive(t) / naive(sde.t_max), rtol=1e-9
            )
        assert theta(0.0) == 0.0


@pytest.mark.parametrize("options", VARIANTS, ids=IDS)
def test_drift_and_diffusion_follow_from_alpha_and_sigma(options, x64):
    """f = d log(alpha)/dt, g^2 = d sigma^2/dt - 2 f sigma^2 (the linear-process identities of
    the centred variable), g^2 / theta = 2 lambda^2 (IR-SDE's tie), alpha_dot and sigma_dot."""
    sde = make(**options)
    t = jnp.asarray(times(sde)[1:])
    f = jax.vmap(jax.grad(sde.log_alpha))(t)
    g2 = jax.vmap(jax.grad(lambda s: sde.sigma(s) ** 2))(t) - 2 * f * sde.sigma(t) ** 2
    np.testing.assert_allclose(sde.drift_coefficient(t), f, rtol=1e-10)
    np.testing.assert_allclose(sde.diffusion_squared(t), g2, rtol=1e-8)
    np.testing.assert_allclose(sde.diffusion_squared(t) / sde.theta(t), 2 * 0.7**2, rtol=1e-13)
    np.testing.assert_allclose(sde.alpha_dot(t), jax.vmap(jax.grad(sde.alpha))(t), rtol=1e-10)
    np.testing.assert_allclose(sde.sigma_dot(t), jax.vmap(jax.grad(sde.sigma))(t), rtol=1e-9)


@pytest.mark.parametrize("options", VARIANTS, ids=IDS)
def test_log_snr_and_theta_bar_invert(options, x64):
    sde = make(**options)
    t = jnp.asarray(times(sde))
    np.testing.assert_allclose(sde.time_of_log_snr(sde.log_snr(t)), t, rtol=1e-9)
    np.testing.assert_allclose(sde.time_of_theta_bar(sde.theta_bar(t)), t, rtol=1e-9)
    a, s = sde.alpha(t), sde.sigma(t)
    np.testing.assert_allclose(sde.log_snr(t), 2 * np.log(a / s), rtol=1e-12)
    np.testing.assert_allclose(s**2, 0.7**2 * (1 - a**2), rtol=1e-9)  # 1 - a^2 cancels near 0
    # the inverses are differentiable (the cosine one is a bisection, differentiated implicitly):
    # dt/dlog_snr = 1 / (dlog_snr/dt), and the derivative in the schedule's fields by finite
    # differences
    lam = sde.log_snr(t)
    np.testing.assert_allclose(
        jax.vmap(jax.grad(sde.time_of_log_snr))(lam),
        1 / jax.vmap(jax.grad(sde.log_snr))(t),
        rtol=1e-6,
    )
    inverse_in = lambda field, v: make(**{**options, field: v}).time_of_log_snr(lam[1])
    for field in ("cosine_s", "terminal_alpha"):
        v = options.get(field, {"cosine_s": 0.008, "terminal_alpha": 0.005}[field])
        fd = (inverse_in(field, v * (1 + 1e-6)) - inverse_in(field, v * (1 - 1e-6))) / (2e-6 * v)
        np.testing.assert_allclose(jax.grad(inverse_in, argnums=1)(field, v), fd, rtol=1e-5)


@pytest.mark.parametrize("options", VARIANTS[::2], ids=IDS[::2])
def test_marginals_solve_the_moment_odes(options, x64):
    """The mean and variance of x_t | x_0 solve dm/dt = theta (mu - m), dv/dt = -2 theta v + g^2
    from (x_0, 0): RK4 in NumPy on 4000 steps against marginal(x_0, t)."""
    sde = make(**options)
    x0, steps = np.array([2.0, 0.3]), 4000
    h = sde.t_max / steps
    nodes = np.linspace(0.0, sde.t_max, 2 * steps + 1)  # t, t + h/2, t + h for every step
    theta = np.asarray(sde.theta(jnp.asarray(nodes)))
    g2 = np.asarray(sde.diffusion_squared(jnp.asarray(nodes)))

    def rhs(k, state):
        m, v = state
        return np.array([theta[k] * (MU - m), -2 * theta[k] * v + g2[k]])

    state, checks = np.array([x0, np.zeros(2)]), {steps // 4: None, steps: None}
    for i in range(steps):
        k = 2 * i
        k1 = rhs(k, state)
        k2 = rhs(k + 1, state + h / 2 * k1)
        k3 = rhs(k + 1, state + h / 2 * k2)
        k4 = rhs(k + 2, state + h * k3)
        state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if i + 1 in checks:
            checks[i + 1] = state
    for i, (m, v) in checks.items():
        mean, std = sde.marginal(jnp.asarray(x0), nodes[2 * i])
        np.testing.assert_allclose(mean, m, rtol=1e-10)
        np.testing.assert_allclose(std**2, v, rtol=1e-9)


def test_forward_sde_by_euler_maruyama():
    """Euler-Maruyama on dx = theta (mu - x) dt + g dw from x_0 (2000 steps, 20000 paths)
    reproduces the marginal mean mu + alpha (x_0 - mu) and variance sigma^2 at t = 0.3 and
    t = t_max within 4 Monte Carlo standard errors (plus the O(dt) bias)."""
    sde = make()
    x0, steps, paths = jnp.array([2.0, 0.3]), 2000, 20000
    dt = sde.t_max / steps

    def step(x, inputs):
        t, key = inputs
        z = jax.random.normal(key, x.shape)
        return x + sde.drift(x, t) * dt + jnp.sqrt(sde.diffusion_squared(t) * dt) * z, x

    keys = jax.random.split(jax.random.key(0), steps)
    ts = jnp.arange(steps) * dt
    final, path = jax.jit(lambda x: jax.lax.scan(step, x, (ts, keys)))(
        jnp.broadcast_to(x0, (paths, 2))
    )
    for t, x in ((0.3, path[600]), (sde.t_max, final)):
        mean, std = sde.marginal(x0, t)
        var = float(std) ** 2
        assert np.all(np.abs(np.mean(x, 0) - mean) < 4 * math.sqrt(var / paths) + 1e-3)
        assert np.all(np.abs(np.var(x, 0) - var) < 4 * var * math.sqrt(2 / paths) + 5e-3 * var)


def test_prior():
    """prior_sample is N(mu, lambda^2 I) (mean and variance within 4 standard errors);
    prior_log_prob is that law's density."""
    sde = make()
    n = 40000
    x = np.asarray(sde.prior_sample(jax.random.key(1), (n, 2)))
    assert np.all(np.abs(x.mean(0) - MU) < 4 * 0.7 / math.sqrt(n))
    assert np.all(np.abs(x.var(0) - 0.49) < 4 * 0.49 * math.sqrt(2 / n))
    points = np.array([[0.1, 0.2], [2.0, -3.0]])
    expected = stats.multivariate_normal(MU, 0.49 * np.eye(2)).logpdf(points)
    np.testing.assert_allclose(sde.prior_log_prob(jnp.asarray(points)), expected, rtol=1e-5)


def test_conversions(x64):
    """From x = mu + alpha (x0 - mu) + sigma eps: every output converts to every other and back,
    x0 and the score are the closed forms, v = alpha eps - sigma (x0 - mu); a velocity (where the
    house has it) is the probability-flow drift theta (mu - x) - g^2 s / 2."""
    sde = make()
    t = 0.37
    x0, eps = np.array([1.3, 0.2]), np.array([-0.4, 0.9])
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    x = MU + a * (x0 - MU) + s * eps
    outputs = {"eps": eps, "x0": x0, "score": -eps / s, "v": a * eps - s * (x0 - MU)}
    if "velocity" in diffusion.MODEL_OUTPUTS:
        outputs["velocity"] = np.asarray(sde.reverse_drift(x, t, -eps / s, probability_flow=True))
    for source, value in outputs.items():
        for target, expected in outputs.items():
            got = diffusion.convert_mean_reverting(jnp.asarray(value), source, target, x, t, sde)
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_the_centred_variable_is_a_zero_mean_linear_process(x64):
    """centred() is the process at mu = 0, whose reverse drift is the house's f x - g^2 s;
    centred_model shifts the input by mu and an x0 output by -mu; and a house sampler run through
    sample_centred (Heun on the PF-ODE) converges to the exact flow's law at second order."""
    sde = make()
    zero = sde.centred()
    y, t, score = jnp.array([0.4, -0.2]), 0.3, jnp.array([1.0, 2.0])
    np.testing.assert_allclose(
        zero.reverse_drift(y, t, score),
        zero.drift_coefficient(t) * y - zero.diffusion_squared(t) * score,
        rtol=1e-13,
    )
    np.testing.assert_allclose(sde.reverse_drift(y + MU, t, score), zero.reverse_drift(y, t, score))
    model = diffusion.Model(lambda x, t: 2.0 * x + t, "x0")
    np.testing.assert_allclose(
        diffusion.centred_model(model, sde).fn(y, t), 2.0 * (y + MU) + t - MU
    )

    mean, cov = np.array([1.0, -0.5]), np.array([[2.0, 0.3], [0.3, 0.5]])
    w, u = np.linalg.eigh(cov)

    def exact(x, t):
        a, s = sde.alpha(t), sde.sigma(t)
        return -(u @ ((u.T @ (x - MU - a * (mean - MU))) / (a**2 * w + s**2)))

    def parts(t):
        a, s = float(sde.alpha(t)), float(sde.sigma(t))
        return a, a * a * w + s * s

    (a_hi, c_hi), (a_lo, c_lo) = parts(sde.t_max), parts(sde.t_min)
    m = u @ np.diag(np.sqrt(c_lo / c_hi)) @ u.T
    flow = (MU + a_lo * (mean - MU) - m @ (a_hi * (mean - MU)), 0.49 * m @ m.T)
    points = jnp.concatenate([jnp.zeros((1, 2)), jnp.eye(2)])
    kls = []
    for n in (8, 16):
        grid = jnp.asarray(diffusion.time_grid(sde, "uniform_log_snr", n))
        out = jax.jit(
            jax.vmap(
                lambda x, grid=grid: diffusion.sample_centred(
                    diffusion.pf_ode_heun,
                    None,
                    diffusion.Model(exact, "score"),
                    sde,
                    x,
                    grid,
                    final="none",
                )[0]
            )
        )(points)
        out = np.asarray(out)
        a = (out[1:] - out[0]).T
        kls.append(float(diffusion_kl(a @ MU + out[0], 0.49 * a @ a.T, *flow)))
    assert kls[1] < 1e-3 and abs(np.log2(kls[0] / kls[1]) - 4.0) < 0.6, kls


def diffusion_kl(mean_p, cov_p, mean_q, cov_q):
    inv = np.linalg.inv(np.linalg.cholesky(cov_q))
    e = np.linalg.eigvalsh(inv @ (cov_p - cov_q) @ inv.T)
    d = inv @ (mean_q - mean_p)
    return 0.5 * (np.sum(e - np.log1p(e)) + d @ d)


def test_fields_are_traced(x64):
    """mu, the stationary std and the schedule's parameters are pytree fields: one compiled
    program serves every value, and vmap over mu gives the per-mu marginals."""
    sde = make()
    marginal = jax.jit(chex.assert_max_traces(lambda p, x0: p.marginal(x0, 0.4), n=1))
    for lam, alpha, s in ((0.7, 0.005, 0.008), (0.2, 0.01, 0.02), (1.5, 0.3, 0.0)):
        p = sde.replace(stationary_std=lam, terminal_alpha=alpha, cosine_s=s)
        mean, std = marginal(p, jnp.ones(2))
        np.testing.assert_allclose(std, p.sigma(0.4), rtol=1e-13)
    mus = jnp.array([[0.0, 0.0], [1.0, 2.0]])
    means = jax.vmap(lambda mu: sde.replace(mu=mu).marginal(jnp.ones(2), 0.4)[0])(mus)
    alpha = float(sde.alpha(0.4))
    np.testing.assert_allclose(means, mus + alpha * (1.0 - mus), rtol=1e-13)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(stationary_std=0.0), "stationary_std must be positive"),
        (dict(stationary_std=float("nan")), "stationary_std must be positive"),
        (dict(schedule="sigmoid"), "schedule must be one of"),
        (dict(terminal_alpha=0.0), "terminal_alpha must lie in"),
        (dict(terminal_alpha=1.0), "terminal_alpha must lie in"),
        (dict(cosine_s=-0.1), "cosine_s must be non-negative"),
        (dict(cosine_s=float("inf")), "cosine_s must be finite"),
        (dict(linear_start=-1.0), "linear_start must be non-negative"),
        (dict(t_min=1.0), "t_min must be below t_max"),
        (dict(t_min=-0.1), "t_min must be below t_max"),
        (dict(t_max=float("nan")), "t_max must be finite"),
        (dict(mu=[0.0, float("nan")]), "mu must be finite"),
    ],
)
def test_bad_options_are_named(options, match):
    options = {"mu": MU, "stationary_std": 0.7, **options}
    with pytest.raises(ValueError, match=match):
        diffusion.mean_reverting(**options)


def test_bad_arguments():
    sde = make()
    with pytest.raises(TypeError, match="sde must be a MeanReverting"):
        diffusion.check_mean_reverting(diffusion.make_sde("vp"))
    with pytest.raises(TypeError, match="sde must be a MeanReverting"):
        diffusion.sample_centred(
            diffusion.ddim, None, None, diffusion.make_sde("vp"), jnp.ones(2), jnp.ones(2)
        )
    with pytest.raises(ValueError, match="model output must be one of"):
        diffusion.convert_mean_reverting(jnp.ones(2), "logits", "x0", jnp.ones(2), 0.5, sde)
