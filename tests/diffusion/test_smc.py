"""SMC machinery: the effective sample size against its formula, each resampling scheme's
offspring counts against their exactly known laws, the evidence increment against the exact
log-mean, the adaptive trigger on weights of known ESS, non-finite increments, determinism,
vmap over systems and over the threshold, and argument errors.

Compiled programs are shared (one ``step`` on four particles, one ESS on 50 weights, one
program for the offspring counts of every scheme) to keep the file fast."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd.diffusion import smc

WEIGHTS = np.array([0.0, 0.137, 0.0, 0.241, 0.052, 0.3, 0.0, 0.17, 0.1, 0.0])
N = WEIGHTS.size
with np.errstate(divide="ignore"):
    LOG_WEIGHTS = np.log(WEIGHTS).astype(np.float32)
NUM_KEYS = 4000

STEP = jax.jit(smc.step, static_argnames="scheme")
ESS = jax.jit(smc.effective_sample_size)


def _keys(seed, num):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(num))


@jax.jit
def _ancestors(keys, log_w):
    """Ancestors ``[keys, N]`` of every scheme; scheme ``j`` uses the keys folded with ``j``
    (``lax.map`` over the keys: it compiles faster than ``vmap`` here)."""
    return {
        scheme: jax.lax.map(
            lambda k, j=j, s=scheme: smc.resample(jax.random.fold_in(k, j), log_w, s), keys
        )
        for j, scheme in enumerate(smc.RESAMPLING)
    }


def _offspring(keys, log_w):
    """Offspring counts ``[keys, N + 1]`` of every scheme (the last column counts index N)."""
    return {
        scheme: (np.asarray(a)[..., None] == np.arange(N + 1)).sum(axis=1)
        for scheme, a in _ancestors(keys, log_w).items()
    }


@pytest.fixture(scope="module")
def offspring():
    return _offspring(_keys(1, NUM_KEYS), LOG_WEIGHTS)


def test_effective_sample_size_matches_its_formula():
    n = 50
    assert float(ESS(np.zeros(n, np.float32))) == pytest.approx(n, rel=1e-6)
    single = np.full(n, -np.inf, np.float32)
    single[7] = 3.0
    assert float(ESS(single)) == pytest.approx(1.0, rel=1e-6)
    log_w = (3.0 * np.random.default_rng(0).standard_normal(n)).astype(np.float32)
    w = np.exp(np.asarray(log_w, np.float64))
    w /= w.sum()
    direct = 1.0 / np.sum(w**2)
    assert float(ESS(log_w)) == pytest.approx(direct, rel=1e-5)
    # stable in log space: a shift of 1e3 would overflow exp, not the logsumexp form
    assert float(ESS(log_w + 1e3)) == pytest.approx(direct, rel=1e-4)
    assert math.isnan(float(ESS(np.full(n, -np.inf, np.float32))))


def test_systematic_counts_are_floor_or_ceil_and_unbiased(offspring):
    counts = offspring["systematic"]
    expected = N * WEIGHTS
    assert counts[:, N].max() == 0  # no index N
    assert np.all(counts[:, :N] >= np.floor(expected))
    assert np.all(counts[:, :N] <= np.ceil(expected))
    # Var(count) <= 1/4 for a count in {floor, ceil}: the mean within 5 of those errors
    assert np.all(np.abs(counts[:, :N].mean(0) - expected) < 5 * 0.5 / math.sqrt(NUM_KEYS))


@pytest.mark.parametrize("scheme", ["multinomial", "stratified"])
def test_random_scheme_counts_are_unbiased(offspring, scheme):
    """Multinomial counts are Binomial(N, w): standard error sqrt(N w (1-w) / K) of the mean
    over K keys; stratified counts have at most that variance (Douc, Cappé & Moulines 2005)
    and differ from N w by less than 2."""
    counts = offspring[scheme]
    expected = N * WEIGHTS
    assert counts[:, N].max() == 0
    assert np.all(counts[:, :N][:, WEIGHTS == 0] == 0)
    se = np.sqrt(N * WEIGHTS * (1 - WEIGHTS) / NUM_KEYS)
    assert np.all(np.abs(counts[:, :N].mean(0) - expected) <= 5 * se)
    if scheme == "stratified":
        assert np.all(np.abs(counts[:, :N] - expected) < 2)


def test_same_key_same_bits_and_keys_matter(offspring):
    again = _offspring(_keys(1, NUM_KEYS), LOG_WEIGHTS)
    other = _offspring(_keys(2, NUM_KEYS), LOG_WEIGHTS)
    for scheme in smc.RESAMPLING:
        np.testing.assert_array_equal(offspring[scheme], again[scheme])
        if scheme != "systematic":  # systematic counts take only two values per particle
            assert not np.array_equal(offspring[scheme], other[scheme])


def test_resample_never_reaches_n_nor_a_zero_weight():
    """Equal log-weights of 32400 and a last zero weight: in float32 the normalised weights
    exp(log w - logsumexp(log w)) sum to less than 1 by more than 1/N here, so an inverse CDF
    without the guard returns N (systematic and stratified on every key), and one that only set
    the last entry to 1 would draw the zero weight.  The offspring tests cover zero weights
    in between."""
    n = 2**12
    log_w = np.where(np.arange(n) < n - 1, 32400.0, -np.inf).astype(np.float32)
    draw = jax.jit(
        lambda key, lw: [
            smc.resample(jax.random.fold_in(key, j), lw, s) for j, s in enumerate(smc.RESAMPLING)
        ]
    )
    for ancestors in draw(jax.random.key(2), log_w):
        assert ancestors.dtype == jnp.int32
        assert 0 <= int(ancestors.min()) and int(ancestors.max()) <= n - 2


def test_evidence_increment_is_the_exact_log_mean():
    increments = np.log(np.array([0.5, 2.0, 4.0, 1.5], np.float32))
    start = smc.init(np.zeros((4, 1), np.float32))
    state, info = STEP(jax.random.key(0), start, increments, ess_threshold=0.5)
    assert float(info.log_normalizer_increment) == pytest.approx(math.log(2.0), rel=1e-6)
    assert float(state.log_normalizer) == pytest.approx(math.log(2.0), rel=1e-6)
    # second step: the mean of the new increments under the current weights; evidences add
    weights = np.exp(np.asarray(state.log_weights, np.float64))
    more = np.array([0.3, -1.0, 0.7, 2.0], np.float32)
    state2, info2 = STEP(jax.random.key(1), state, more, ess_threshold=0.0)
    exact = math.log(np.sum(weights * np.exp(np.asarray(more, np.float64))))
    assert float(info2.log_normalizer_increment) == pytest.approx(exact, rel=1e-5)
    assert float(state2.log_normalizer) == pytest.approx(math.log(2.0) + exact, rel=1e-5)
    assert np.logaddexp.reduce(np.asarray(state2.log_weights, np.float64)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_resampling_is_triggered_exactly_below_the_threshold():
    """Three equal weights and one zero: ESS = 3 of N = 4."""
    increments = np.array([0.0, 0.0, -np.inf, 0.0], np.float32)
    start = smc.init(np.arange(4.0, dtype=np.float32)[:, None])
    for seed, (threshold, expected) in enumerate(
        ((0.0, False), (0.7, False), (0.8, True), (1.0, True))
    ):
        state, info = STEP(jax.random.key(seed), start, increments, ess_threshold=threshold)
        assert float(info.ess) == pytest.approx(3.0, rel=1e-6)
        assert bool(info.resampled) is expected
        if expected:
            assert 2 not in np.asarray(info.ancestors)
            np.testing.assert_allclose(state.log_weights, -math.log(4), rtol=1e-6)
            np.testing.assert_array_equal(state.particles[:, 0], info.ancestors)
        else:
            np.testing.assert_array_equal(info.ancestors, np.arange(4))
            assert np.exp(np.asarray(state.log_weights)[2]) == 0.0
            np.testing.assert_allclose(np.exp(state.log_weights)[[0, 1, 3]], 1 / 3, rtol=1e-6)


def test_nonfinite_increments_show_in_the_state():
    start = smc.init(np.zeros((4, 1), np.float32))
    all_zero, _ = STEP(jax.random.key(0), start, np.full(4, -np.inf, np.float32), ess_threshold=0.5)
    assert float(all_zero.log_normalizer) == -np.inf
    assert np.all(np.isnan(np.asarray(all_zero.log_weights)))
    nan, info = STEP(
        jax.random.key(1), start, np.array([0.0, np.nan, 1.0, 0.0], np.float32), ess_threshold=0.5
    )
    assert math.isnan(float(nan.log_normalizer)) and not bool(info.resampled)
    one_zero, _ = STEP(
        jax.random.key(2), start, np.array([0.0, -np.inf, 0.0, 0.0], np.float32), ess_threshold=0.0
    )
    assert np.isfinite(float(one_zero.log_normalizer))
    np.testing.assert_allclose(np.exp(one_zero.log_weights), [1 / 3, 0.0, 1 / 3, 1 / 3], rtol=1e-6)


def test_vmap_over_systems_and_thresholds_equals_a_loop():
    rng = np.random.default_rng(4)
    particles = rng.standard_normal((4, 4, 1)).astype(np.float32)
    increments = (2.0 * rng.standard_normal((4, 4))).astype(np.float32)
    thresholds = [0.0, 0.3, 0.9, 1.0]
    step = lambda k, x, inc, th: smc.step(k, smc.init(x), inc, ess_threshold=th)
    batched = jax.jit(jax.vmap(step))(
        _keys(3, 4), particles, increments, np.array(thresholds, np.float32)
    )
    for i in range(4):
        single = STEP(
            _keys(3, 4)[i], smc.init(particles[i]), increments[i], ess_threshold=thresholds[i]
        )
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            np.testing.assert_array_equal(got[i], want)
    assert not bool(batched[1].resampled[0]) and bool(batched[1].resampled[3])


def test_pytree_particles_are_resampled_together():
    particles = {
        "a": np.arange(5.0, dtype=np.float32),
        "b": np.arange(10.0, dtype=np.float32).reshape(5, 2),
    }
    increments = np.array([-np.inf, -np.inf, 0.0, -np.inf, -np.inf], np.float32)
    state, info = STEP(jax.random.key(0), smc.init(particles), increments, ess_threshold=0.5)
    assert bool(info.resampled)
    np.testing.assert_array_equal(state.particles["a"], 2.0)
    np.testing.assert_array_equal(state.particles["b"], np.tile([4.0, 5.0], (5, 1)))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: smc.resample(jax.random.key(0), jnp.zeros(3), "residual"),
            ValueError,
            r"scheme must be one of \['multinomial', 'systematic', 'stratified'\]",
        ),
        (
            lambda: smc.resample(jax.random.key(0), jnp.zeros((3, 2)), "systematic"),
            ValueError,
            "log_weights must be 1-D",
        ),
        (lambda: smc.resample(0, jnp.zeros(3), "systematic"), TypeError, "key must be a PRNG"),
        (
            lambda: smc.resample(jax.random.key(0), np.zeros(3, np.int32), "systematic"),
            TypeError,
            "log_weights must be a float array",
        ),
        (lambda: smc.effective_sample_size(jnp.zeros((2, 2))), ValueError, "log_weights must"),
        (
            lambda: smc.step(
                jax.random.key(0), smc.init(jnp.zeros(3)), jnp.zeros(3), ess_threshold=1.5
            ),
            ValueError,
            "ess_threshold must lie in",
        ),
        (
            lambda: smc.step(
                jax.random.key(0), smc.init(jnp.zeros(3)), jnp.zeros(3), ess_threshold=-0.1
            ),
            ValueError,
            "ess_threshold must lie in",
        ),
        (
            lambda: smc.step(
                jax.random.key(0), smc.init(jnp.zeros(3)), jnp.zeros(3), ess_threshold=math.nan
            ),
            ValueError,
            "ess_threshold",
        ),
        (
            lambda: smc.step(jax.random.key(0), smc.init(jnp.zeros(3)), jnp.zeros(3), scheme="x"),
            ValueError,
            "scheme must be one of",
        ),
        (
            lambda: smc.step(jax.random.key(0), smc.init(jnp.zeros(3)), jnp.zeros(4)),
            ValueError,
            r"log_increments must have shape \(3,\)",
        ),
        (
            lambda: smc.step(jnp.zeros(2), smc.init(jnp.zeros(3)), jnp.zeros(3)),
            TypeError,
            "key must be a PRNG",
        ),
        (
            lambda: smc.init({"a": jnp.zeros(3), "b": jnp.zeros(4)}),
            ValueError,
            "share a leading axis",
        ),
        (lambda: smc.init(jnp.zeros((0, 2))), ValueError, "N >= 1"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
