"""Entropy-MCMC: the stationary law of the discretised joint chain on a Gaussian (exact, from
the discrete Lyapunov equation), the guide's mass in the flat mode of a flat/sharp mixture
(closed-form smoothed density), the exact moments on a Bayesian linear-regression posterior
with minibatches, minibatch runs, tracing, divergence and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.scipy.stats import norm

from shufflesgd import mcmc, problems, shuffling
from shufflesgd.mcmc.entropy_mcmc import EntropyMCMCState, entropy_mcmc
from support.gaussian_target import COV, MEAN, PRECISION


def gaussian_grad(x, batch):
    del batch
    return -PRECISION @ (x - MEAN)


def final_states(kernel, keys, state, steps, *hyper):
    """The states after ``steps`` steps of independent chains (step t draws fold_in(key, t))."""

    def chain(key, state):
        def body(s, t):
            return kernel.step(jax.random.fold_in(key, t), s, jnp.zeros(1, jnp.int32), *hyper)

        return jax.lax.scan(body, state, jnp.arange(steps))

    return jax.jit(jax.vmap(chain))(keys, state)


def test_gaussian_joint_law_of_the_discretised_chain(x64):
    """pi = N(mu, Sigma): the pair X = (theta, theta_a) follows X' = A X + b + sqrt(2h) Z with
    A = I - h J, J the joint precision [[P + I/eta, -I/eta], [-I/eta, I/eta]], whose inverse is
    [[Sigma, Sigma], [Sigma, Sigma + eta I]] (theta ~ pi, theta_a ~ pi * N(0, eta I)).  The
    chain's stationary covariance solves C = A C A^T + 2h I; 10000 chains from a point, 300
    steps (contraction below 1e-5): every entry of the sample mean and covariance within
    4 standard errors (Var of a sample covariance entry (C_ii C_jj + C_ij^2) / n)."""
    h, eta, n, steps = 0.2, 0.5, 10_000, 300
    d = MEAN.shape[0]
    eye = np.eye(d)
    precision = np.asarray(PRECISION)
    joint = np.block([[precision + eye / eta, -eye / eta], [-eye / eta, eye / eta]])
    sigma = np.asarray(COV)
    np.testing.assert_allclose(
        np.linalg.inv(joint), np.block([[sigma, sigma], [sigma, sigma + eta * eye]]), atol=1e-12
    )
    a = np.eye(2 * d) - h * joint
    cov = scipy.linalg.solve_discrete_lyapunov(a, 2 * h * np.eye(2 * d))
    assert np.max(np.abs(np.linalg.eigvals(a))) ** steps < 1e-5
    kernel = entropy_mcmc(gaussian_grad)
    start = jax.vmap(lambda _: kernel.init(jnp.zeros(d)))(jnp.arange(n))
    keys = jax.random.split(jax.random.key(0), n)
    final, infos = final_states(kernel, keys, start, steps, h, eta)
    assert bool(jnp.all(infos.is_finite)) and int(infos.num_grad_evals.sum()) == n * steps
    x = np.concatenate([np.asarray(final.position), np.asarray(final.guide)], axis=1)
    mean = np.concatenate([np.asarray(MEAN)] * 2)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 4 * np.sqrt(np.diag(cov) / n))
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    np.testing.assert_array_less(np.abs(np.cov(x.T) - cov), 4 * se)
    # the discretisation shift of the guide's covariance is resolved by this test
    assert np.max(np.abs(cov - np.linalg.inv(joint)) / se) > 4


WEIGHTS = np.array([0.5, 0.5])
MEANS = np.array([-2.0, 1.5])
SCALES = np.array([1.0, 0.3])  # flat mode left, sharp mode right


def mixture_logdensity(x):
    return jax.scipy.special.logsumexp(jnp.log(WEIGHTS) + norm.logpdf(x[0], MEANS, SCALES))


def test_flat_mode_mass_of_theta_and_of_the_guide(x64):
    """pi = 0.5 N(-2, 1) + 0.5 N(1.5, 0.3^2), flat mode left, sharp mode right: the guide's
    marginal is the mixture with variances s_k^2 + eta, so its mass left of c is the
    deterministic integral sum_k w_k Phi((c - m_k) / sqrt(s_k^2 + eta)) (0.625 here, against
    theta's 0.523 with eta = 0).  2000 chains started from the joint law (theta ~ pi, theta_a =
    theta + sqrt(eta) eps), 800 steps of h = 0.01 with exact gradients (time 8, over three
    relaxation times of the slowest within-mode direction): both fractions of final states left
    of c within 4 binomial standard errors."""
    h, eta, n, steps, split = 0.01, 0.5, 2000, 800, 1.0
    component_key, theta_key, guide_key, chain_key = jax.random.split(jax.random.key(1), 4)
    component = jax.random.bernoulli(component_key, WEIGHTS[1], (n,)).astype(jnp.int32)
    theta = jnp.asarray(MEANS)[component] + jnp.asarray(SCALES)[component] * jax.random.normal(
        theta_key, (n,)
    )
    kernel = entropy_mcmc(lambda x, batch: jax.grad(mixture_logdensity)(x))
    start = jax.vmap(kernel.init)(
        theta[:, None], theta[:, None] + math.sqrt(eta) * jax.random.normal(guide_key, (n, 1))
    )
    final, infos = final_states(kernel, jax.random.split(chain_key, n), start, steps, h, eta)
    assert bool(jnp.all(infos.is_finite))
    masses = []
    for samples, smoothing in ((final.position, 0.0), (final.guide, eta)):
        mass = float(np.sum(WEIGHTS * norm.cdf((split - MEANS) / np.sqrt(SCALES**2 + smoothing))))
        fraction = float(jnp.mean(samples[:, 0] < split))
        assert abs(fraction - mass) < 4 * math.sqrt(mass * (1 - mass) / n), (fraction, mass)
        masses.append(mass)
    assert masses[1] - masses[0] > 8 * math.sqrt(0.25 / n)  # the guide's law is resolved


def test_minibatch_chain_in_a_shuffling_order():
    """Bayesian linear regression y_i = a_i x + noise, minibatches of 8 in random-reshuffling
    order through run_minibatch_chain: theta is recorded, one gradient estimate a step, both
    positions stay finite and the guide follows theta (it is theta plus N(0, eta) noise)."""
    n_data, epochs, batch = 64, 50, 8
    a = jax.random.normal(jax.random.key(0), (n_data,))
    y = 0.7 * a + 0.5 * jax.random.normal(jax.random.key(1), (n_data,))

    def grad_estimator(x, idx):
        return -x + n_data / idx.shape[0] * jnp.sum(a[idx] * (y[idx] - a[idx] * x)) / 0.25

    kernel = entropy_mcmc(grad_estimator)
    final, thetas, infos = jax.jit(
        lambda k: mcmc.run_minibatch_chain(
            kernel,
            k,
            kernel.init(jnp.asarray(0.0)),
            shuffling.random_reshuffle(n_data),
            epochs,
            batch,
            1e-3,
            0.05,
        )
    )(jax.random.key(2))
    steps = epochs * n_data // batch
    assert thetas.shape == (steps,) and int(infos.num_grad_evals.sum()) == steps
    assert int(mcmc.first_nonfinite_step(infos)) == -1
    assert isinstance(final, EntropyMCMCState) and final.guide.shape == ()
    assert abs(float(final.guide - final.position)) < 6 * math.sqrt(0.05)


def test_one_program_for_every_step_size_and_coupling_and_vmap_over_them():
    kernel = entropy_mcmc(gaussian_grad)
    traces = []

    @jax.jit
    def step(key, state, h, eta):
        traces.append(None)
        return kernel.step(key, state, jnp.zeros(1, jnp.int32), h, eta)

    state = kernel.init(jnp.zeros(2))
    for i, (h, eta) in enumerate([(0.1, 0.5), (0.05, 2.0)]):
        new, info = step(jax.random.key(i), state, h, eta)
        assert bool(info.is_finite)
    assert len(traces) == 1
    sweep = jax.jit(
        jax.vmap(lambda k, h, eta: kernel.step(k, state, jnp.zeros(1, jnp.int32), h, eta)[0])
    )
    out = sweep(jax.random.split(jax.random.key(3), 3), jnp.array([0.1, 0.2, 0.3]), jnp.ones(3))
    assert out.position.shape == (3, 2) and out.guide.shape == (3, 2)
    again = sweep(jax.random.split(jax.random.key(3), 3), jnp.array([0.1, 0.2, 0.3]), jnp.ones(3))
    np.testing.assert_array_equal(out.guide, again.guide)


def test_a_step_beyond_the_coupling_bound_diverges_and_is_reported():
    """The coupling has curvature 2/eta: at h = 3 eta the difference theta - theta_a is
    multiplied by 1 - 2h/eta = -5 each step and overflows float32 within ~60 steps."""
    kernel = entropy_mcmc(gaussian_grad)
    start = jax.vmap(kernel.init)(jnp.zeros((1, 2)))
    _, infos = final_states(kernel, jax.random.split(jax.random.key(0), 1), start, 200, 0.3, 0.1)
    first = int(mcmc.first_nonfinite_step(infos)[0])
    assert 0 < first < 200 and not bool(infos.is_finite[0, -1])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda k: k.init(jnp.zeros(2, jnp.int32)), TypeError, "position must be a float"),
        (lambda k: k.init(jnp.zeros(2), jnp.zeros(3)), ValueError, "guide must be shaped like"),
        (
            lambda k: k.step(jax.random.key(0), k.init(jnp.zeros(2)), jnp.zeros(1), 0.0, 1.0),
            ValueError,
            "step_size must be positive",
        ),
        (
            lambda k: k.step(jax.random.key(0), k.init(jnp.zeros(2)), jnp.zeros(1), 0.1, -1.0),
            ValueError,
            "coupling must be positive",
        ),
        (
            lambda k: k.step(0, k.init(jnp.zeros(2)), jnp.zeros(1), 0.1, 1.0),
            TypeError,
            "key must be a PRNG key",
        ),
    ],
)
def test_bad_arguments_raise_before_compiling(call, error, match):
    with pytest.raises(error, match=match):
        call(entropy_mcmc(gaussian_grad))


def _joint_regression_moments(model, mean, h, eta, steps, batch_size):
    """Exact mean and covariance of the joint (theta, theta_a) after ``steps`` Entropy-MCMC
    steps from zero on a Bayesian linear regression, with minibatches of ``batch_size``
    indices drawn with replacement.  The gradient estimate is P(m - theta) plus a batch noise
    whose conditional covariance (n^2/b) Cov_i[u_i(theta)], u_i the per-example gradients
    c_i - M_i theta, has expectation (n/b) sum_i [(dc_i - dM_i mu)(.)^T + dM_i C dM_i^T]
    over theta ~ (mu, C) (dc, dM centred over i); the recursion is linear otherwise."""
    a, y, noise_var = (np.asarray(leaf, np.float64) for leaf in model.data)
    n, d = a.shape
    c = a * (y / noise_var)[:, None]
    big_m = a[:, :, None] * a[:, None, :] / noise_var[:, None, None]
    dc, dm = c - c.mean(0), big_m - big_m.mean(0)
    precision = big_m.sum(0) + np.eye(d) / float(model.prior_variance)
    k, eye = h / eta, np.eye(d)
    transition = np.block([[eye - h * precision - k * eye, k * eye], [k * eye, eye - k * eye]])
    shift = np.concatenate([h * precision @ mean, np.zeros(d)])
    mu, cov = np.zeros(2 * d), np.zeros((2 * d, 2 * d))
    for _ in range(steps):
        r = dc - dm @ mu[:d]
        noise = np.zeros((2 * d, 2 * d))
        noise[:d, :d] = (n / batch_size) * (
            r.T @ r + np.einsum("iab,bc,idc->ad", dm, cov[:d, :d], dm)
        )
        mu = transition @ mu + shift
        cov = transition @ cov @ transition.T + h * h * noise + 2 * h * np.eye(2 * d)
    return mu, cov


def test_bayesian_linear_regression_with_minibatches_matches_the_exact_moments():
    """On a Bayesian linear-regression posterior with batches of one drawn with replacement
    (run through run_minibatch_chain's shuffling scheme), the mean and second moments of
    theta and of the guide after 240 steps match the exact recursion of the joint chain (its
    minibatch noise included) within 4.5 standard errors; leaving the minibatch noise out of
    the recursion would be far outside them."""
    rng = np.random.default_rng(0)
    n, d, chains, steps = 16, 2, 2000, 240
    features = rng.standard_normal((n, d))
    targets = features @ np.array([0.5, -1.0]) + rng.standard_normal(n)
    model, posterior = problems.bayesian_linear_regression(features, targets, 1.0, 1.0)
    mean = np.asarray(posterior.mean, np.float64)
    largest = float(np.linalg.eigvalsh(np.linalg.inv(np.asarray(posterior.covariance)))[-1])
    h, eta = 0.5 / largest, 0.5
    kernel = entropy_mcmc(model.grad_estimator)
    scheme = shuffling.with_replacement(n)

    def chain(key):
        state, _, _ = mcmc.run_minibatch_chain(
            kernel, key, kernel.init(jnp.zeros(d)), scheme, steps // n, 1, h, eta, record="epoch"
        )
        return jnp.concatenate([state.position, state.guide])

    final = np.asarray(
        jax.jit(jax.vmap(chain))(jax.random.split(jax.random.key(5), chains)), np.float64
    )
    mu, cov = _joint_regression_moments(model, mean, h, eta, steps, 1)
    second = final**2
    expected_second = np.diag(cov) + mu**2
    se_first = final.std(0) / math.sqrt(chains)
    se_second = second.std(0) / math.sqrt(chains)
    np.testing.assert_array_less(np.abs(final.mean(0) - mu), 4.5 * se_first)
    np.testing.assert_array_less(np.abs(second.mean(0) - expected_second), 4.5 * se_second)
    _, cov_exact_gradient = _joint_regression_moments(model, mean, h, eta, steps, math.inf)
    assert np.all(np.abs(np.diag(cov - cov_exact_gradient))[:d] > 6 * se_second[:d])
