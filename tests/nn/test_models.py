"""Flax networks: shapes, BatchNorm train/eval behaviour, time conditioning, sizes, jit."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflesgd import diffusion
from shufflesgd.nn import models


@pytest.mark.parametrize(
    "model, image_shape",
    [
        (models.MLP((32,), 10, batch_norm=False), (8, 8, 1)),
        (models.MLP((32,), 10, batch_norm=True), (8, 8, 1)),
        (models.CNN((8, 16), 10, batch_norm=False), (8, 8, 1)),
        (models.CNN((8, 16), 10, batch_norm=True), (28, 28, 1)),
        (models.LinearBatchNorm((16,), 10), (8, 8, 1)),
    ],
)
def test_classifier_shapes(model, image_shape):
    init_key, data_key = jax.random.split(jax.random.key(0))
    x = jax.random.normal(data_key, (4, *image_shape))
    params, batch_stats = models.init_model(model, init_key, x)
    for train in (True, False):
        apply = jax.jit(functools.partial(models.apply_model, model, train=train))
        logits, new_stats = apply(params, batch_stats, x)
        chex.assert_shape(logits, (4, 10))
        chex.assert_tree_all_finite(logits)
        chex.assert_trees_all_equal_shapes(new_stats, batch_stats)


def _shapes(model, *inputs):
    """``(params, batch_stats)`` as shapes only: no compile, no random numbers."""
    return jax.eval_shape(lambda: models.init_model(model, jax.random.key(0), *inputs))


def test_mlp_param_count_is_exact():
    params, batch_stats = _shapes(models.MLP((32, 16), 10), jnp.zeros((1, 8, 8, 1)))
    assert models.count_params(params) == (64 * 32 + 32) + (32 * 16 + 16) + (16 * 10 + 10)
    assert batch_stats == {}
    params, batch_stats = _shapes(models.MLP((32, 16), 10, batch_norm=True), jnp.zeros((1, 64)))
    # biases move into BatchNorm's shift; BatchNorm adds scale and shift per unit
    assert models.count_params(params) == 64 * 32 + 2 * 32 + 32 * 16 + 2 * 16 + 16 * 10 + 10
    assert models.count_params(batch_stats) == 2 * (32 + 16)
    params, batch_stats = _shapes(models.LinearBatchNorm((8,), 3), jnp.zeros((1, 5)))
    assert models.count_params(params) == 2 * 5 + 5 * 8 + 8 * 3  # no biases
    assert models.count_params(batch_stats) == 2 * 5


def test_network_sizes_are_small():
    cnn, _ = _shapes(models.CNN(), jnp.zeros((1, 8, 8, 1)))
    score, _ = _shapes(models.ScoreMLP(), jnp.zeros((1, 2)), jnp.zeros(1))
    unet, _ = _shapes(models.UNet(), jnp.zeros((1, 28, 28, 1)), jnp.zeros(1))
    assert 1_000 < models.count_params(cnn) < 20_000
    assert 10_000 < models.count_params(score) < 100_000
    assert 50_000 < models.count_params(unet) < 1_000_000


@pytest.fixture(scope="module")
def linear_bn():
    init_key, data_key = jax.random.split(jax.random.key(1))
    model = models.LinearBatchNorm((4,), 3, every_layer=True)
    x = jax.random.normal(data_key, (6, 5)) + 2.0
    params, stats = models.init_model(model, init_key, x)
    train = jax.jit(functools.partial(models.apply_model, model, train=True))
    evaluate = jax.jit(functools.partial(models.apply_model, model, train=False))
    return x, params, stats, train, evaluate


def test_batch_norm_couples_examples_in_training_only(linear_bn):
    x, params, stats, train, evaluate = linear_bn
    x_changed = x.at[1:].multiply(2.0)  # same first example, different batch-mates
    train_a, stats_a = train(params, stats, x)
    train_b, _ = train(params, stats, x_changed)
    assert not np.allclose(train_a[0], train_b[0], atol=1e-4)
    eval_a, stats_eval = evaluate(params, stats, x)
    eval_b, _ = evaluate(params, stats, x_changed)
    np.testing.assert_allclose(eval_a[0], eval_b[0], rtol=1e-6)
    chex.assert_trees_all_equal(stats_eval, stats)
    # running averages: m <- 0.9 m + 0.1 mean_batch, v <- 0.9 v + 0.1 var_batch (m=0, v=1 at init)
    np.testing.assert_allclose(
        stats_a["input_norm"]["mean"], 0.1 * np.asarray(x).mean(0), rtol=1e-5
    )
    np.testing.assert_allclose(
        stats_a["input_norm"]["var"], 0.9 + 0.1 * np.asarray(x).var(0), rtol=1e-5
    )
    assert not np.allclose(stats_a["norms"]["0"]["mean"], 0.0)


def test_linear_batch_norm_is_affine_at_evaluation(linear_bn):
    x, params, stats, _, evaluate = linear_bn
    y = x[::-1] * 0.5 - 1.0
    f = lambda z: evaluate(params, stats, z)[0]
    np.testing.assert_allclose(f(0.5 * (x + y)), 0.5 * (f(x) + f(y)), rtol=1e-5, atol=1e-5)


def test_sinusoidal_embedding():
    e = models.sinusoidal_embedding(jnp.array([0.0, 0.5]), 8)
    chex.assert_shape(e, (2, 8))
    np.testing.assert_array_equal(e[0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(jnp.sum(e**2, -1), 4.0, rtol=1e-6)
    with pytest.raises(ValueError, match="dim must be even"):
        models.sinusoidal_embedding(jnp.zeros(2), 7)


@pytest.mark.parametrize(
    "model, x_shape",
    [
        (models.ScoreMLP(hidden=32, num_layers=2, embed_dim=16), (5, 2)),
        (models.UNet(channels=(4, 8), embed_dim=8, groups=4), (2, 8, 8, 1)),
    ],
)
def test_score_networks_depend_on_time(model, x_shape):
    init_key, data_key = jax.random.split(jax.random.key(3))
    x = jax.random.normal(data_key, x_shape)
    t = jnp.full(x_shape[:1], 0.3)
    if isinstance(model, models.UNet):
        # random parameters drawn by NumPy into the initialiser's shapes: compiling the
        # U-Net's ~20 truncated-normal initialisers costs several seconds of CPU
        params, stats = _shapes(model, x, t)
        rng = np.random.default_rng(0)
        params = jax.tree.map(
            lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), params
        )
    else:
        params, stats = models.init_model(model, init_key, x, t)
    assert stats == {}
    apply = jax.jit(lambda p, x, t: models.apply_model(model, p, {}, x, t, train=True)[0])
    out = apply(params, x, t)
    chex.assert_shape(out, x_shape)
    chex.assert_tree_all_finite(out)
    assert not np.allclose(out, apply(params, x, t + 0.2), atol=1e-4)
    # one example's output depends on its own time only
    later = apply(params, x, t.at[0].add(0.2))
    assert not np.allclose(out[0], later[0], atol=1e-4)
    np.testing.assert_allclose(out[1:], later[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_shape", [(3, 8, 8, 1), (3, 28, 28, 1), (3, 28, 28, 3)])
def test_unet_output_shape(x_shape):
    model = models.UNet(channels=(8, 16), embed_dim=16)

    def forward(key, x, t):
        params, stats = models.init_model(model, key, x, t)
        return models.apply_model(model, params, stats, x, t, train=False)[0]

    out = jax.eval_shape(forward, jax.random.key(0), jnp.zeros(x_shape), jnp.zeros(x_shape[:1]))
    chex.assert_shape(out, x_shape)


def test_unet_rejects_indivisible_resolution():
    with pytest.raises(ValueError, match="divisible by 4"):
        models.init_model(
            models.UNet(channels=(8, 8, 8)),
            jax.random.key(0),
            jnp.zeros((1, 6, 6, 1)),
            jnp.zeros(1),
        )


def test_apply_model_jits_and_traces_once():
    init_key, data_key, other_key = jax.random.split(jax.random.key(4), 3)
    model = models.CNN((8,), 10, batch_norm=True)
    x = jax.random.normal(data_key, (4, 8, 8, 1))
    params, stats = models.init_model(model, init_key, x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, stats, x):
        return models.apply_model(model, params, stats, x, train=True)

    eager = models.apply_model(model, params, stats, x, train=True)
    jitted = step(params, stats, x)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-6)
    step(params, stats, jax.random.normal(other_key, (4, 8, 8, 1)))


class _ProbeNetwork(nnx.Module):
    """A stand-in network that returns ``w * x`` (``w`` a learned scalar, 0 or 1 below)."""

    def __init__(self):
        self.w = nnx.Param(jnp.zeros(()))

    def __call__(self, x, t, *, train=False):
        del t, train
        return self.w[...] * x


@dataclasses.dataclass(frozen=True)
class _Probe:
    """The model of :class:`_ProbeNetwork`."""

    def build(self, x, t, *, rngs):
        del x, t, rngs
        return _ProbeNetwork()


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_edm_preconditioning_is_the_gaussian_eps_plus_a_scaled_network(sde_name):
    from shufflesgd.nn import models

    sde = diffusion.make_sde(sde_name)
    sigma_data = 0.7
    model = models.EDMPreconditioned(_Probe(), sde, sigma_data)
    x = jax.random.normal(jax.random.key(5), (4, 3)) * 2.0
    t = jnp.array([sde.t_min, 0.05, 0.4, 1.0]) * sde.t_max
    params, stats = models.init_model(model, jax.random.key(0), x, t)
    assert stats == {}
    alpha, sigma = (np.asarray(f(t), np.float64)[:, None] for f in (sde.alpha, sde.sigma))
    var = sigma**2 + alpha**2 * sigma_data**2
    # F = 0: the exact eps = -sigma * score of data N(0, sigma_d^2 I), whose p_t is N(0, var I)
    out = models.apply_model(model, params, stats, x, t, train=False)[0]
    np.testing.assert_allclose(out, sigma * (np.asarray(x) / var), rtol=2e-5, atol=1e-6)
    # F(y) = y: the network sees x / sqrt(var) and its output is scaled by alpha sigma_d / sqrt(var)
    ones = jax.tree.map(jnp.ones_like, params)
    out = models.apply_model(model, ones, stats, x, t, train=False)[0]
    np.testing.assert_allclose(
        out, (sigma - alpha * sigma_data) / var * np.asarray(x), rtol=2e-5, atol=1e-6
    )


@pytest.mark.parametrize("sde_name, t_max", [("flow", 1.0), ("trig", None)])
def test_velocity_preconditioning_is_the_gaussian_velocity_plus_a_unit_variance_residual(
    sde_name, t_max
):
    from shufflesgd import problems
    from shufflesgd.nn import models

    sde = diffusion.make_sde(sde_name, **({} if t_max is None else {"t_max": t_max}))
    sigma_data, dim, n = 0.7, 3, 20_000
    model = models.EDMPreconditioned(_Probe(), sde, sigma_data, output="velocity")
    t = jnp.array([sde.t_min, 0.05, 0.4, 0.9, sde.t_max])
    keys = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(keys[0], (len(t), dim)) * 2.0
    params, stats = models.init_model(model, jax.random.key(0), x, t)
    # F = 0: the exact velocity E[alpha_dot x0 + sigma_dot eps | x_t] of data N(0, sigma_d^2 I),
    # the mixture's closed form (one component), finite at alpha = 0 (rectified flow's t = 1)
    gaussian = problems.gaussian_mixture([1.0], np.zeros((1, dim)), [sigma_data**2 * np.eye(dim)])
    exact = jax.vmap(
        lambda xi, ti: gaussian.eigen().velocity(
            xi, sde.alpha(ti), sde.sigma(ti), sde.alpha_dot(ti), sde.sigma_dot(ti)
        )
    )(x, t)
    out = models.apply_model(model, params, stats, x, t, train=False)[0]
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, exact, rtol=2e-5, atol=1e-6)
    # F(y) = y: the network's input x_t / sqrt(var) has unit variance for Gaussian data at every
    # t, and so has its regression target (u - c_skip x_t) / c_out, the residual's scale being
    # sigma_d |alpha sigma_dot - alpha_dot sigma| / sqrt(var) (Monte Carlo, n draws per time)
    ones = jax.tree.map(jnp.ones_like, params)
    x0 = sigma_data * jax.random.normal(keys[1], (n, len(t), dim))
    eps = jax.random.normal(keys[2], (n, len(t), dim))
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    alpha_dot, sigma_dot = sde.alpha_dot(t)[:, None], sde.sigma_dot(t)[:, None]
    x_t = alpha * x0 + sigma * eps
    flat = x_t.reshape(-1, dim)
    times = jnp.tile(t, n)
    zero_out = models.apply_model(model, params, stats, flat, times, train=False)[0]
    network_in = models.apply_model(model, ones, stats, flat, times, train=False)[0] - zero_out
    c_out = (
        sigma_data
        * jnp.abs(alpha * sigma_dot - alpha_dot * sigma)
        / jnp.sqrt(alpha**2 * sigma_data**2 + sigma**2)
    )
    network_in = network_in.reshape(n, len(t), dim) / c_out
    target = (alpha_dot * x0 + sigma_dot * eps - zero_out.reshape(n, len(t), dim)) / c_out
    # the sample variance of m = n * dim standard normals has SE sqrt(2 / m): 5 SE
    m = n * dim
    for values in (network_in, target):
        variance = np.var(np.asarray(values), axis=(0, 2))
        np.testing.assert_allclose(variance, 1.0, atol=5 * np.sqrt(2.0 / m))
    # and the target is uncorrelated with the input (c_skip x_t is the best linear predictor):
    # the mean product of m independent pairs of standard normals has SE 1 / sqrt(m): 5 SE
    correlation = np.mean(np.asarray(network_in * target), axis=(0, 2))
    np.testing.assert_allclose(correlation, 0.0, atol=5 / np.sqrt(m))


def test_preconditioning_rejects_an_unknown_output():
    from shufflesgd.nn import models

    model = models.EDMPreconditioned(_Probe(), diffusion.make_sde("vp"), output="x0")
    with pytest.raises(ValueError, match="output must be one of"):
        models.init_model(model, jax.random.key(0), jnp.zeros((2, 3)), jnp.zeros(2))


def test_edm_preconditioned_unet_keeps_image_shapes():
    from shufflesgd.nn import models

    model = models.EDMPreconditioned(
        models.UNet(channels=(8, 16), embed_dim=16), diffusion.make_sde("vp")
    )

    def forward(key, x, t):
        params, stats = models.init_model(model, key, x, t)
        return models.apply_model(model, params, stats, x, t, train=False)[0]

    out = jax.eval_shape(forward, jax.random.key(0), jnp.zeros((3, 8, 8, 1)), jnp.zeros(3))
    chex.assert_shape(out, (3, 8, 8, 1))


def test_conditional_score_mlp_depends_on_each_example_label_and_has_a_null_token():
    model = models.ConditionalScoreMLP(num_classes=3, hidden=16, num_layers=2, embed_dim=8)
    x = jax.random.normal(jax.random.key(4), (4, 5))
    t = jnp.full(4, 0.3)
    labels = jnp.array([0, 1, 2, -1])
    params, stats = models.init_model(model, jax.random.key(0), x, t, labels)
    assert stats == {}
    # ScoreMLP's parameters plus a (classes + null) x embed_dim label embedding
    plain, _ = _shapes(models.ScoreMLP(hidden=16, num_layers=2, embed_dim=8), x, t)
    assert models.count_params(params) == models.count_params(plain) + 4 * 8
    apply = jax.jit(lambda p, x, t, c: models.apply_model(model, p, {}, x, t, c, train=False)[0])
    out = apply(params, x, t, labels)
    chex.assert_shape(out, (4, 5))
    chex.assert_tree_all_finite(out)
    # one example's output depends on its own label only; any negative label is the null token
    # (row num_classes), a scalar label is broadcast over the batch
    changed = apply(params, x, t, labels.at[0].set(2))
    assert not np.allclose(out[0], changed[0], atol=1e-4)
    np.testing.assert_allclose(out[1:], changed[1:], rtol=1e-6)
    np.testing.assert_allclose(apply(params, x, t, labels.at[3].set(3)), out, rtol=1e-6)
    np.testing.assert_allclose(apply(params, x, t, labels.at[3].set(-5)), out, rtol=1e-6)
    np.testing.assert_allclose(apply(params, x, t, jnp.asarray(1))[1], out[1], rtol=1e-6)
    # EDMPreconditioned passes the label on to the network
    wrapped = models.EDMPreconditioned(model, diffusion.make_sde("vp"))
    wrapped_params, _ = models.init_model(wrapped, jax.random.key(0), x, t, labels)
    first = models.apply_model(wrapped, wrapped_params, {}, x, t, labels, train=False)[0]
    second = models.apply_model(wrapped, wrapped_params, {}, x, t, labels[::-1], train=False)[0]
    chex.assert_shape(first, (4, 5))
    assert not np.allclose(first, second, atol=1e-4)
