"""The empirical model statistics of DPM-Solver-v3: estimate_ems against the exact gaussian_ems
on a Gaussian target (tolerances from the Monte Carlo standard error, the n^-1/2 rate), the
closed-form limits of gaussian_ems, and bad arguments named before anything is traced."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd import diffusion
from shufflesgd.diffusion.samplers.model_statistics import ems_lambdas, estimate_ems, gaussian_ems
from support.samplers import TARGET, exact_model

MEAN, COV = (np.asarray(v, np.float64) for v in (TARGET.means[0], TARGET.covariances[0]))


def test_estimated_statistics_converge_to_the_exact_ones(x64):
    """Gaussian data with its exact model: R = 16 independent estimates with n = 256 and
    n = 4096 samples.  Their mean lies within 5 standard errors (spread of the replications
    / sqrt(R)) of gaussian_ems at both sizes, and the RMS error shrinks like n^-1/2 (ratio
    sqrt(16) = 4; measured 3.66 to 4.03; largest |mean error| / standard error 2.96)."""
    sde = diffusion.make_sde("vp")
    lams = ems_lambdas(sde, 6)
    exact = gaussian_ems(sde, MEAN, COV, lams)
    model = diffusion.mixture_model(sde, TARGET.eigen())
    replications = 16
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(replications))
    data = jax.jit(jax.vmap(lambda k: TARGET.sample(k, 4096).astype(jnp.float64)))(keys)
    estimate = jax.vmap(  # in batches of 256: the same two programs serve both sizes
        lambda k, x0: estimate_ems(jax.random.fold_in(k, 1), model, sde, x0, lams, batch_size=256)
    )
    rms = {}
    for n in (256, 4096):
        estimates = estimate(keys, data[:, :n])
        for field in ("l", "s", "b"):
            values, target = (
                np.asarray(getattr(estimates, field)),
                np.asarray(getattr(exact, field)),
            )
            stderr = values.std(axis=0, ddof=1) / np.sqrt(replications)
            assert np.all(np.abs(values.mean(axis=0) - target) <= 5 * stderr + 1e-12), (field, n)
            rms.setdefault(field, []).append(np.sqrt(np.mean((values - target) ** 2)))
    for field, (coarse, fine) in rms.items():
        assert 2.5 < coarse / fine < 6.5, (field, coarse, fine)


def test_exact_gaussian_statistics_limits(x64):
    """Closed-form checks of gaussian_ems: l = sigma^2 diag(C^-1) in (0, 1), tending to 1 at
    high noise; on an axis-aligned Gaussian f does not depend on x, so s = 0 (the pseudo-inverse
    cut-off) and b = df/dlambda = d/dlambda(-sigma^2 mu / C) exactly (finite differences)."""
    sde = diffusion.make_sde("vp")
    lams = np.linspace(-4.0, 4.0, 9)
    stats = gaussian_ems(sde, MEAN, COV, lams)
    assert np.all((np.asarray(stats.l) > 0) & (np.asarray(stats.l) < 1))
    assert np.all(np.asarray(stats.l)[0] > 0.99)
    diagonal = np.array([1.5, 0.3])
    axis = gaussian_ems(sde, MEAN, np.diag(diagonal), lams)
    np.testing.assert_array_equal(axis.s, 0.0)

    def f(lam):  # (sigma eps - l x) / alpha = -sigma^2 mu / C for a diagonal covariance
        t = sde.time_of_log_snr(2.0 * lam)
        a, s = float(sde.alpha(t)), float(sde.sigma(t))
        return -(s**2) * MEAN / (a**2 * diagonal + s**2)

    step = 1e-5
    derivative = np.stack([(f(u + step) - f(u - step)) / (2 * step) for u in lams])
    np.testing.assert_allclose(axis.b, derivative, rtol=1e-6, atol=1e-9)


def _estimate(**replace):
    sde = diffusion.make_sde("vp")
    arguments = dict(
        key=jax.random.key(0),
        model=exact_model(sde),
        sde=sde,
        data=jnp.ones((8, 2)),
        lambdas=np.linspace(-1.0, 1.0, 3),
    )
    arguments.update(replace)
    return lambda: estimate_ems(**arguments)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (_estimate(key=1), TypeError, "key must be a PRNG key"),
        (_estimate(data=jnp.ones(8)), ValueError, r"data must be a batch \[n, \*shape\]"),
        (_estimate(data=jnp.ones((8, 2), jnp.int32)), TypeError, "data must be a float array"),
        (_estimate(batch_size=3), ValueError, "batch_size must divide the number of samples 8"),
        (_estimate(batch_size=0), ValueError, "batch_size must be a positive int"),
        (_estimate(lambdas=np.ones((3, 1))), ValueError, r"lambdas must be a vector"),
        (_estimate(lambdas=np.array([0.0, 2.0, 1.0])), ValueError, "lambdas must be finite and"),
        (
            lambda: gaussian_ems(diffusion.make_sde("vp"), MEAN, COV[:1], np.zeros(2)),
            ValueError,
            r"mean must be \[d\] and covariance \[d, d\]",
        ),
        (
            lambda: gaussian_ems(diffusion.make_sde("vp"), MEAN, COV, np.array([0.0, np.nan])),
            ValueError,
            "lambdas must be finite and strictly increasing",
        ),
        (lambda: ems_lambdas(diffusion.make_sde("vp"), 1), ValueError, "num_lambdas must be"),
    ],
)
def test_bad_statistics_arguments_are_named(call, error, match, monkeypatch):
    monkeypatch.setattr(jax.lax, "map", lambda *a, **k: pytest.fail("traced"))
    with pytest.raises(error, match=match):
        call()
