"""Divergence is reported, not hidden: every kernel's ``info.is_finite`` and
``mcmc.first_nonfinite_step`` give the exact first step whose state is not finite, checked
against a hand loop over ``kernel.step`` with a step size far beyond stability; the
Metropolis-adjusted kernels reject the overflowing proposals and stay finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc, shuffling
from support.smoothing_targets import gaussian_smoothed_score


def standard_normal(x):
    return -0.5 * jnp.sum(x**2)


def grad_estimator(x, batch):
    """An unbiased-looking minibatch gradient of N(0, I): -x, scaled by the batch."""
    return -x * (1.0 + 0.01 * jnp.sum(batch))


def truncated_normal(x):
    """N(0, I) cut to the unit disc (log-density -inf outside): when all of the Föllmer
    drift's few importance samples fall outside, their weights are all zero and the
    self-normalised drift is 0/0."""
    return jnp.where(jnp.sum(x**2) < 1.0, -0.5 * jnp.sum(x**2), -jnp.inf)


def all_finite(state):
    return all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(state))


def hand_first_nonfinite(kernel, key, state, num_steps, *hyper):
    """The first ``t`` whose state after ``kernel.step(fold_in(key, t), ...)`` is not finite,
    by a plain Python loop (no driver), or -1."""
    step = jax.jit(kernel.step)
    for t in range(num_steps):
        state, _ = step(jax.random.fold_in(key, t), state, *hyper)
        if not all_finite(state):
            return t
    return -1


# (name, kernel, initial position, num_steps, hyper-parameters): every one diverges.
DIVERGING = [
    ("ula", mcmc.ula(standard_normal), jnp.ones(2), 100, (5.0,)),
    ("walk_jump", mcmc.walk_jump(gaussian_smoothed_score), jnp.ones(2), 60, (50.0, 0.5)),
    (
        "underdamped_walk_jump",
        mcmc.underdamped_walk_jump(gaussian_smoothed_score),
        jnp.ones(2),
        60,
        (50.0, 0.5, 1.0),
    ),
    (
        "chain_of_log_concave_chains",
        mcmc.chain_of_log_concave_chains(gaussian_smoothed_score, 5),
        jnp.ones(2),
        60,
        (50.0, 0.5),
    ),
    ("follmer", mcmc.follmer(truncated_normal, 10, 4), jnp.zeros(2), 12, ()),
]


@pytest.mark.parametrize("name, kernel, x0, num_steps, hyper", DIVERGING, ids=lambda v: v)
def test_run_chain_reports_the_first_nonfinite_step(name, kernel, x0, num_steps, hyper):
    key = jax.random.key(3)
    expected = hand_first_nonfinite(kernel, key, kernel.init(x0), num_steps, *hyper)
    assert expected > 0, f"{name} did not diverge after a finite step; retune the test"
    _, positions, infos = jax.jit(
        lambda k: mcmc.run_chain(kernel, k, kernel.init(x0), num_steps, *hyper)
    )(key)
    assert int(mcmc.first_nonfinite_step(infos)) == expected
    assert bool(np.all(infos.is_finite[:expected])) and not bool(infos.is_finite[expected])
    # the flag agrees with the positions the driver kept
    assert bool(np.all(np.isfinite(positions[:expected])))


@pytest.mark.parametrize("kind", ["sgld", "sghmc_euler", "sghmc_baoab"])
@pytest.mark.parametrize("record", ["step", "epoch"])
def test_minibatch_chain_reports_the_first_nonfinite_step(kind, record):
    """SGLD/SGHMC through run_minibatch_chain: the step where the chain overflows is exact in
    both records (the epoch record keeps every step's flag), and matches a hand loop over the
    scheme's batches."""
    n, batch_size, num_epochs = 8, 2, 40
    kernel, hyper = {
        "sgld": (mcmc.sgld(grad_estimator), (50.0,)),
        "sghmc_euler": (mcmc.sghmc(grad_estimator), (50.0, 1.0)),
        "sghmc_baoab": (mcmc.sghmc(grad_estimator, "baoab"), (50.0, 0.1)),
    }[kind]
    scheme = shuffling.random_reshuffle(n)
    key, x0 = jax.random.key(5), jnp.ones(2)
    _, _, infos = jax.jit(
        lambda k: mcmc.run_minibatch_chain(
            kernel, k, kernel.init(x0), scheme, num_epochs, batch_size, *hyper, record=record
        )
    )(key)

    order_key, step_key = jax.random.split(jax.random.key(5))  # the driver's split, by hand
    step = jax.jit(kernel.step)
    state, scheme_state, expected, t = kernel.init(x0), scheme.init(order_key, None), -1, 0
    for epoch in range(num_epochs):
        scheme_state, order = scheme.step(jax.random.fold_in(order_key, epoch), scheme_state)
        for batch in np.asarray(order).reshape(-1, batch_size):
            state, _ = step(jax.random.fold_in(step_key, t), state, jnp.asarray(batch), *hyper)
            if expected < 0 and not all_finite(state):
                expected = t
            t += 1
    assert expected >= 0, f"{kind} did not diverge; the test needs a larger step"
    assert int(mcmc.first_nonfinite_step(infos)) == expected
    if record == "epoch":
        assert infos.is_finite.shape == (num_epochs, n // batch_size)
        assert infos.num_grad_evals.shape == (num_epochs,)


def test_first_nonfinite_step_is_per_chain_under_vmap_and_minus_one_when_finite():
    kernel = mcmc.ula(standard_normal)
    run = jax.vmap(lambda k, h: mcmc.run_chain(kernel, k, kernel.init(jnp.ones(2)), 100, h)[2])
    infos = run(jax.random.split(jax.random.key(0), 3), jnp.array([0.1, 5.0, 0.5]))
    first = np.asarray(mcmc.first_nonfinite_step(infos))
    assert first.shape == (3,)
    assert first[0] == -1 and first[2] == -1 and first[1] > 0
    assert bool(np.all(infos.is_finite[0]))


@pytest.mark.parametrize(
    "kernel, hyper",
    [(mcmc.mala(standard_normal), (5.0,)), (mcmc.hmc(standard_normal, 3), (5.0,))],
    ids=["mala", "hmc"],
)
def test_adjusted_kernels_reject_overflow_and_stay_finite(kernel, hyper):
    """At a step far beyond stability MALA and HMC reject (almost) everything, and what they
    keep is finite: is_finite stays True and first_nonfinite_step is -1."""
    x0 = jnp.full(2, 1e18)  # proposals overflow float32 at once
    _, positions, infos = mcmc.run_chain(kernel, jax.random.key(1), kernel.init(x0), 30, *hyper)
    assert bool(np.all(np.isfinite(positions)))
    assert bool(np.all(infos.is_finite)) and int(mcmc.first_nonfinite_step(infos)) == -1
