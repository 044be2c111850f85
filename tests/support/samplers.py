"""What the sampler tests share: the Gaussian and mixture targets with their exact models, and
independent references for a sampler's output law (an affine map of x_T on a Gaussian target), the
exact flow's law and a cancellation-free Gaussian KL."""

import jax
import jax.numpy as jnp
import numpy as np

from shufflesgd import diffusion, metrics, problems

TARGET = problems.gaussian_mixture([1.0], [[1.0, -0.5]], [[[2.0, 0.3], [0.3, 0.5]]])

MIXTURE = problems.gaussian_mixture(
    [0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [np.eye(2) * 0.2, np.eye(2) * 0.4]
)


def exact_model(sde, mixture=TARGET, output="score"):
    def fn(x, t):
        score = mixture.diffuse(sde.alpha(t), sde.sigma(t)).score(x)
        return diffusion.convert(score, "score", output, x, t, sde)

    return diffusion.Model(fn, output)


def kl(mean_p, cov_p, mean_q, cov_q):
    """KL(N_p || N_q) without the cancellation of tr - d - log det: through the eigenvalues e of
    L^-1 (C_p - C_q) L^-T, KL = (sum(e - log1p(e)) + |L^-1 (m_q - m_p)|^2) / 2."""
    mean_p, cov_p, mean_q, cov_q = (
        np.asarray(a, np.float64) for a in (mean_p, cov_p, mean_q, cov_q)
    )
    inv = np.linalg.inv(np.linalg.cholesky(cov_q))
    e = np.linalg.eigvalsh(inv @ (cov_p - cov_q) @ inv.T)
    d = inv @ (mean_q - mean_p)
    return 0.5 * (np.sum(e - np.log1p(e)) + d @ d)


def call_sampler(name, **options):
    sde = diffusion.make_sde("edm")
    grid = options.pop("grid", jnp.asarray(diffusion.time_grid(sde, "karras", 4)))
    return lambda: diffusion.make_sampler(name)(
        jax.random.key(0), exact_model(sde), sde, jnp.ones(2), grid, **options
    )


def jitted(name, model, sde, grid, **options):
    """``(key, x_T) -> (x, info)`` for one sample, compiled once."""
    return jax.jit(
        lambda key, x: diffusion.make_sampler(name)(
            key, model, sde, x, jnp.asarray(grid), **options
        )
    )


def flow_law(sde):
    """Law of the exact probability-flow map from t_max to t_min applied to the prior. For
    p_t = N(alpha_t mu, C_t), C_t = alpha_t^2 Sigma + sigma_t^2 I (all commuting), the flow is
    x_s = alpha_s mu + C_s^(1/2) C_t^(-1/2) (x_t - alpha_t mu). Measuring KL to this law removes
    the prior-mismatch floor, leaving the discretisation error alone."""
    mu, cov = np.asarray(TARGET.means[0]), np.asarray(TARGET.covariances[0])
    w, u = np.linalg.eigh(cov)

    def marginal(t):
        a, s = float(sde.alpha(t)), float(sde.sigma(t))
        return a, a * a * w + s * s

    a_hi, c_hi = marginal(sde.t_max)
    a_lo, c_lo = marginal(sde.t_min)
    m = u @ np.diag(np.sqrt(c_lo / c_hi)) @ u.T
    return a_lo * mu - m @ (a_hi * mu), sde.prior_std**2 * m @ m.T


def affine_law(name, sde, grid, **options):
    """Exact output law of a deterministic sampler (affine in x_T on a Gaussian target) from
    three forward runs: x(0), x(e_1), x(e_2)."""
    model = exact_model(sde)
    points = jnp.concatenate([jnp.zeros((1, 2)), jnp.eye(2)])
    run = jax.jit(
        jax.vmap(
            lambda x: diffusion.make_sampler(name)(
                jax.random.key(0), model, sde, x, jnp.asarray(grid), final="none", **options
            )[0]
        )
    )
    out = np.asarray(run(points))
    a = (out[1:] - out[0]).T
    return out[0], sde.prior_std**2 * a @ a.T


def flow_kls(name, sde, grid_kind, steps, **options):
    ref = flow_law(sde)
    return [
        kl(*affine_law(name, sde, diffusion.time_grid(sde, grid_kind, n), **options), *ref)
        for n in steps
    ]


def slope(steps, kls):
    return np.polyfit(np.log(steps), np.log(kls), 1)[0]


def exact_kl(name, sde, num_steps, grid_kind="uniform_log_snr", draws=1, **options):
    grid = jnp.asarray(diffusion.time_grid(sde, grid_kind, num_steps))
    mean, cov = jax.jit(
        lambda g: diffusion.exact_gaussian_law(
            diffusion.make_sampler(name),
            exact_model(sde),
            sde,
            g,
            2,
            draws,
            final="none",
            **options,
        )
    )(grid)
    target = TARGET.diffuse(sde.alpha(sde.t_min), sde.sigma(sde.t_min))
    return float(metrics.gaussian_kl(mean, cov, target.means[0], target.covariances[0]))


def order(name, sde, steps, **options):
    kls = [exact_kl(name, sde, n, **options) for n in steps]
    return np.polyfit(np.log(steps), np.log(kls), 1)[0], kls


def exact_velocity_model(sde, mixture=TARGET):
    """The exact flow-matching velocity u(x, t) = E[alpha' x0 + sigma' eps | x_t = x] of a Gaussian
    mixture in closed form, finite at t = 1 (alpha = 0) and t = 0 (sigma = 0), unlike a
    conversion from the score: with C_k = alpha^2 S_k + sigma^2 I, component k contributes
    E[x0 | x, k] = m_k + alpha S_k C_k^-1 (x - alpha m_k) and E[eps | x, k] = sigma C_k^-1
    (x - alpha m_k), weighted by the posterior component probabilities; every C_k is diagonal in
    the eigenbasis of S_k (decomposed once, in NumPy)."""
    vals, vecs = np.linalg.eigh(np.asarray(mixture.covariances, np.float64))
    means = np.asarray(mixture.means, np.float64)
    log_weights = np.asarray(mixture.log_weights, np.float64)

    def fn(x, t):
        dtype = x.dtype
        u, lam = jnp.asarray(vecs, dtype), jnp.asarray(vals, dtype)
        m, logw = jnp.asarray(means, dtype), jnp.asarray(log_weights, dtype)
        a, s = sde.alpha(t), sde.sigma(t)
        a_dot, s_dot = sde.alpha_dot(t), sde.sigma_dot(t)
        scales = a**2 * lam + s**2  # [K, d]
        coords = jnp.einsum("kji,kj->ki", u, x - a * m)  # U_k^T (x - alpha m_k)
        log_joint = logw - 0.5 * jnp.sum(coords**2 / scales + jnp.log(scales), axis=-1)
        gains = (a * a_dot * lam + s * s_dot) / scales
        per_component = a_dot * m + jnp.einsum("kij,kj->ki", u, gains * coords)
        return jax.nn.softmax(log_joint) @ per_component

    return diffusion.Model(fn, "velocity")
