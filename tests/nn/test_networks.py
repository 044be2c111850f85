"""The NNX networks: the functional surface of ``models`` is the module itself, split and merged;
the initialisers are those of the Linen networks they replace."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shufflesgd.nn import models, networks


def test_apply_model_is_the_nnx_module_split_and_merged():
    """init_model's pytrees are the module's Param and BatchStat states (same key, same draws);
    apply_model's output and updated statistics are the module's own call and in-place update."""
    key, data_key = jax.random.split(jax.random.key(0))
    model = models.MLP((16, 8), 10, batch_norm=True)
    x = jax.random.normal(data_key, (6, 4, 4, 1)) + 1.0
    params, stats = models.init_model(model, key, x)
    module = model.build(x, rngs=nnx.Rngs(key))
    assert isinstance(module, networks.MLP)
    chex.assert_trees_all_equal(
        jax.tree.leaves(params), jax.tree.leaves(nnx.state(module, nnx.Param))
    )
    out, new_stats = jax.jit(lambda p, s, x: models.apply_model(model, p, s, x, train=True))(
        params, stats, x
    )
    np.testing.assert_allclose(out, module(x, train=True), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        jax.tree.leaves(new_stats), jax.tree.leaves(nnx.state(module, nnx.BatchStat)), rtol=1e-6
    )
    assert not np.allclose(new_stats["norms"]["0"]["mean"], stats["norms"]["0"]["mean"])


def test_init_model_vmaps_over_keys():
    model = models.LinearBatchNorm((3,), 2)
    keys = jax.random.split(jax.random.key(1), 4)
    params, stats = jax.vmap(lambda k: models.init_model(model, k, jnp.zeros((1, 5))))(keys)
    chex.assert_shape(params["layers"]["0"]["kernel"], (4, 5, 3))
    chex.assert_shape(stats["input_norm"]["var"], (4, 5))
    kernels = np.asarray(params["output"]["kernel"])
    assert not np.allclose(kernels[0], kernels[1])


def test_initialisers_are_lecun_normal_and_zero():
    """Kernels: LeCun normal (a truncated normal rescaled to variance 1 / fan_in), so the sample
    variance of n entries is 1 / fan_in within 5 standard errors sqrt(2 / n) (relative; the
    truncated normal's kurtosis is below the normal's).  Biases and BatchNorm shifts and means
    start at 0, BatchNorm scales and variances at 1."""
    params, stats = models.init_model(
        models.MLP((512,), 256, batch_norm=True), jax.random.key(2), jnp.zeros((1, 256))
    )
    for kernel, fan_in in (
        (params["layers"]["0"]["kernel"], 256),
        (params["output"]["kernel"], 512),
    ):
        n = kernel.size
        variance = float(np.var(np.asarray(kernel, np.float64))) * fan_in
        assert abs(variance - 1.0) < 5 * np.sqrt(2.0 / n), variance
        assert abs(float(np.mean(kernel))) * np.sqrt(fan_in) < 5 / np.sqrt(n)
    np.testing.assert_array_equal(params["output"]["bias"], 0.0)
    np.testing.assert_array_equal(params["norms"]["0"]["bias"], 0.0)
    np.testing.assert_array_equal(params["norms"]["0"]["scale"], 1.0)
    np.testing.assert_array_equal(stats["norms"]["0"]["mean"], 0.0)
    np.testing.assert_array_equal(stats["norms"]["0"]["var"], 1.0)
    assert "bias" not in params["layers"]["0"]  # BatchNorm's shift replaces it
