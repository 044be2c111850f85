"""Diagnostics: ESS against the closed-form AR(1) value, ESS and split-R-hat equal to the
NumPy estimators they replaced, jit and vmap, shapes and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import mcmc


def ar1_chains(phi, num_chains, n, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((num_chains, n))
    x[:, 0] = rng.standard_normal(num_chains) / np.sqrt(1 - phi**2)
    noise = rng.standard_normal((num_chains, n))
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    return x


def reference_ess(chains):
    """The library's former NumPy estimator (one entry, ``[m, n]``): Geyer's initial monotone
    sequence over the pooled autocorrelations, truncated before the first negative pair.
    Returns the ESS and the even autocorrelation of that first negative pair."""
    x = np.asarray(chains, np.float64)
    m, n = x.shape
    size = 1 << (2 * n - 1).bit_length()
    centred = x - x.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(centred, n=size, axis=1)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=1)[:, :n] / n
    within = (acov[:, 0] * n / (n - 1.0)).mean()
    between = x.mean(axis=1).var(ddof=1) if m > 1 else 0.0
    var_plus = within * (n - 1.0) / n + between
    rho = 1.0 - (within - acov.mean(axis=0)) / var_plus
    rho[0] = 1.0
    pairs = rho[: 2 * (n // 2)].reshape(-1, 2).sum(axis=1)
    first_negative = int(np.argmax(pairs < 0))
    tau = -1.0 + 2.0 * np.minimum.accumulate(pairs[:first_negative]).sum()
    return m * n / max(tau, 1.0 / np.log10(m * n)), rho[2 * first_negative]


def reference_split_rhat(chains):
    """The library's former NumPy split-R-hat (Gelman et al. 2013, Eq. 11.4)."""
    x = np.asarray(chains, np.float64)
    n = x.shape[1]
    half = n // 2
    x = np.concatenate([x[:, :half], x[:, n - half :]], axis=0)
    within = x.var(axis=1, ddof=1).mean(axis=0)
    between = half * x.mean(axis=1).var(axis=0, ddof=1)
    return np.sqrt(((half - 1.0) / half * within + between / half) / within)


@pytest.mark.parametrize("phi, tolerance", [(0.0, 0.05), (0.5, 0.1), (0.9, 0.25)])
def test_effective_sample_size_on_ar1(phi, tolerance):
    """AR(1) with coefficient phi: integrated autocorrelation time (1 + phi) / (1 - phi).
    The estimate scatters by about 3% (phi = 0.5) and 6% (phi = 0.9) over seeds with
    4 x 20000 draws; the tolerances are 4 of those standard deviations."""
    chains = ar1_chains(phi, 4, 20000)
    expected = 4 * 20000 * (1 - phi) / (1 + phi)
    ess = float(mcmc.effective_sample_size(chains))
    assert abs(ess / expected - 1) < tolerance, (ess, expected)


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_effective_sample_size_equals_the_former_estimator_on_ar1(phi, precision):
    """On the AR(1) checks the first negative pair's even autocorrelation is negative, so
    BlackJAX's estimator (which would add it when positive) gives the former value: to
    float64 rounding, and to float32 rounding of 4 x 20000 draws (relative 1e-5)."""
    chains = ar1_chains(phi, 4, 20000)
    expected, rho_2k = reference_ess(chains)
    assert rho_2k < 0
    with jax.enable_x64(precision == "float64"):
        ess = float(mcmc.effective_sample_size(jnp.asarray(chains)))
    np.testing.assert_allclose(ess, expected, rtol=1e-12 if precision == "float64" else 1e-5)


def test_effective_sample_size_adds_stans_antithetic_term(x64):
    """Where the even autocorrelation rho_2K of the first negative pair is positive, BlackJAX
    (like Stan and ArviZ) adds it to the autocorrelation time: tau = tau_former + rho_2K.
    On one AR(1) chain of 2000 draws (phi = 0.5) that lowers the ESS by half a percent."""
    chains = ar1_chains(0.5, 1, 2000)
    former, rho_2k = reference_ess(chains)
    ess = float(mcmc.effective_sample_size(chains))
    assert rho_2k > 0
    np.testing.assert_allclose(2000 / ess - 2000 / former, rho_2k, rtol=1e-9)
    assert -0.01 < ess / former - 1 < -0.001


def test_split_rhat_flags_chains_that_disagree():
    good = ar1_chains(0.5, 4, 2000)
    assert abs(float(mcmc.split_rhat(good)) - 1) < 0.01
    bad = good + np.arange(4)[:, None]
    assert float(mcmc.split_rhat(bad)) > 1.1
    both = np.stack([good, bad], axis=-1)
    assert mcmc.split_rhat(both).shape == (2,) and mcmc.effective_sample_size(both).shape == (2,)


@pytest.mark.parametrize("num_draws", [2000, 2001])
def test_split_rhat_equals_the_former_estimator(num_draws, x64):
    """Same halves (the middle draw dropped for odd lengths), same formula: to rounding."""
    good = ar1_chains(0.5, 4, num_draws)
    both = np.stack([good, good + np.arange(4)[:, None], good[::-1] ** 2], axis=-1)
    np.testing.assert_allclose(mcmc.split_rhat(both), reference_split_rhat(both), rtol=1e-12)


def test_diagnostics_jit_vmap_and_shapes(x64):
    """Under jit, and vmapped over a sweep of runs, the values equal the one-run calls; the
    trailing shape is kept, a unit axis included; the estimators compile once per shape."""
    runs = np.stack(
        [  # [3 runs, 4 chains, 1000 draws, 2]
            np.stack([ar1_chains(phi, 4, 1000, seed), ar1_chains(-phi, 4, 1000, seed + 9)], axis=-1)
            for seed, phi in enumerate([0.0, 0.5, 0.9])
        ]
    )
    for fn in (mcmc.effective_sample_size, mcmc.split_rhat):
        one_by_one = np.stack([fn(run) for run in runs])
        chex.assert_shape(one_by_one, (3, 2))
        np.testing.assert_allclose(jax.jit(jax.vmap(fn))(jnp.asarray(runs)), one_by_one, rtol=1e-10)
        jitted = jax.jit(chex.assert_max_traces(fn, n=1))
        for run in runs:
            np.testing.assert_allclose(jitted(jnp.asarray(run)), fn(run), rtol=1e-10)
        chex.assert_shape(fn(runs[0][..., :1]), (1,))
        chex.assert_shape(fn(runs[0][..., 0]), ())
    # a constant entry carries no information
    assert float(mcmc.effective_sample_size(np.ones((2, 50)))) == 0.0


@pytest.mark.parametrize(
    "call",
    [
        lambda: mcmc.effective_sample_size(np.zeros(10)),
        lambda: mcmc.effective_sample_size(np.zeros((4, 1))),
        lambda: mcmc.split_rhat(np.zeros((4, 3))),
    ],
)
def test_bad_shapes_raise(call):
    with pytest.raises(ValueError, match=r"chains must be shaped \[num_chains, num_draws"):
        call()
