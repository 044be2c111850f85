"""Network training: losses, the pure step, scheme-driven epochs and data parallelism."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shufflesgd import diffusion, drivers, parallel, shuffling
from shufflesgd.nn import data, models, training

N = 64


@pytest.fixture(scope="module")
def digits():
    arrays = data.digits_arrays("train")
    return data.scale_images({k: v[:N] for k, v in arrays.items()}, data.DIGITS_MAX_VALUE)


@pytest.fixture(scope="module")
def classifier(digits):
    model = models.MLP((16,), 10, batch_norm=True)
    params, stats = models.init_model(model, jax.random.key(0), jnp.asarray(digits["image"][:2]))
    return model, params, stats


def test_cross_entropy_matches_log_softmax(digits, classifier):
    model, params, stats = classifier
    batch = {k: v[:8] for k, v in digits.items()}
    losses, (new_stats, metrics) = training.cross_entropy_loss(model)(
        params, stats, batch, jax.random.key(1), False
    )
    logits, _ = models.apply_model(model, params, stats, batch["image"], train=False)
    expected = -jax.nn.log_softmax(logits)[np.arange(8), batch["label"]]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    np.testing.assert_array_equal(metrics["accuracy"], np.argmax(logits, -1) == batch["label"])
    chex.assert_trees_all_equal(new_stats, stats)


class _OracleNetwork(nnx.Module):
    """For data x0 = 0, x_t = sigma(t) eps exactly: predicts eps + offset (as ``prediction``)."""

    def __init__(self, sde, prediction, offset):
        self.sde, self.prediction, self.offset = sde, prediction, offset

    def __call__(self, x, t, *, train):
        del train
        sigma = self.sde.sigma(t)[:, None]
        eps_hat = x / sigma + self.offset
        return eps_hat if self.prediction == "eps" else -eps_hat / sigma


@dataclasses.dataclass(frozen=True)
class _Oracle:
    """The model of :class:`_OracleNetwork` (no parameters)."""

    sde: object
    prediction: str
    offset: float

    def build(self, x, t, *, rngs):
        del x, t, rngs
        return _OracleNetwork(self.sde, self.prediction, self.offset)


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("prediction", ["eps", "score"])
def test_denoising_score_matching_weightings(name, prediction):
    sde = diffusion.make_sde(name)
    model = _Oracle(sde, prediction, 0.5)
    batch = {"x": jnp.zeros((16, 3))}
    simple = training.denoising_score_matching_loss(
        model, sde, prediction=prediction, input_key="x"
    )
    losses, _ = simple({}, {}, batch, jax.random.key(2), True)
    np.testing.assert_allclose(losses, 3 * 0.25, rtol=1e-3)  # ||eps_hat - eps||^2 = d c^2
    if name == "ve":  # g^2 / sigma^2 = 2 log(sigma_max / sigma_min), constant in t
        weighted = training.denoising_score_matching_loss(
            model, sde, prediction=prediction, weighting="likelihood", input_key="x"
        )
        losses, _ = weighted({}, {}, batch, jax.random.key(3), True)
        np.testing.assert_allclose(losses, 2 * math.log(50.0 / 0.01) * 0.75, rtol=1e-3)
    exact = _Oracle(sde, prediction, 0.0)
    losses, _ = training.denoising_score_matching_loss(
        exact, sde, prediction=prediction, input_key="x"
    )({}, {}, batch, jax.random.key(4), True)
    np.testing.assert_allclose(losses, 0.0, atol=1e-6)


class _VelocityOracleNetwork(nnx.Module):
    """For data x0 = 0 on the rectified flow, x_t = t eps and the velocity target is eps:
    predicts eps + offset."""

    def __init__(self, offset):
        self.offset = offset

    def __call__(self, x, t, *, train):
        del train
        return x / t[:, None] + self.offset


@dataclasses.dataclass(frozen=True)
class _VelocityOracle:
    """The model of :class:`_VelocityOracleNetwork` (no parameters)."""

    offset: float

    def build(self, x, t, *, rngs):
        del x, t, rngs
        return _VelocityOracleNetwork(self.offset)


@pytest.mark.parametrize("t_max", [0.999, 1.0])
def test_flow_matching_loss_is_the_velocity_error(t_max):
    """weighting="velocity": ||u_hat - (alpha' x0 + sigma' eps)||^2, finite up to t = 1."""
    sde = diffusion.make_sde("flow", t_max=t_max)
    batch = {"x": jnp.zeros((16, 3))}
    for offset in (0.5, 0.0):
        loss = training.denoising_score_matching_loss(
            _VelocityOracle(offset), sde, prediction="velocity", weighting="velocity", input_key="x"
        )
        losses, _ = loss({}, {}, batch, jax.random.key(5), True)
        assert np.all(np.isfinite(losses))
        np.testing.assert_allclose(losses, 3 * offset**2, rtol=1e-4, atol=1e-6)


def test_denoising_score_matching_validates():
    sde = diffusion.make_sde("vp")
    with pytest.raises(ValueError, match="prediction must be one of"):
        training.denoising_score_matching_loss(models.ScoreMLP(), sde, prediction="noise")
    with pytest.raises(ValueError, match="weighting must be one of"):
        training.denoising_score_matching_loss(models.ScoreMLP(), sde, weighting="snr")


def test_train_step_is_pure_and_decreases_loss(digits, classifier):
    model, params, stats = classifier
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.3)
    loss, traces = training.cross_entropy_loss(model), []

    def counted(*args):
        traces.append(1)
        return loss(*args)

    step = training.make_train_step(counted, optimizer)
    batch = {k: jnp.asarray(v[:32]) for k, v in digits.items()}
    key = jax.random.key(5)
    state = (params, optimizer.init(params), stats)
    first, first_metrics = step(*state, batch, jax.random.fold_in(key, 0))
    again, _ = step(*state, batch, jax.random.fold_in(key, 0))
    chex.assert_trees_all_equal(first, again)  # a pure function of its arguments
    losses = [float(first_metrics["loss"])]
    for s in range(1, 15):
        state, metrics = step(*(first if s == 1 else state), batch, jax.random.fold_in(key, s))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert set(metrics) == {"loss", "grad_norm", "accuracy"}
    assert len(traces) == 1  # 15 steps, one compiled program


@pytest.mark.parametrize("scheme_name", ["random_reshuffle", "grab_mean_balance"])
def test_epoch_follows_the_scheme(digits, classifier, scheme_name):
    model, params, stats = classifier
    source = data.ArraySource(digits)
    scheme = shuffling.make_scheme(scheme_name, N)
    optimizer = optax.sgd(0.1)
    trainer = training.make_trainer(
        training.cross_entropy_loss(model), optimizer, scheme, batch_size=16
    )
    state = training.init_train_state(jax.random.key(6), params, stats, optimizer, scheme)
    seen = []
    callback = lambda epoch, state, metrics: seen.append(
        (epoch, int(state.step), metrics["loss"].shape)
    )
    state, history = trainer.train(state, source, 2, callback)
    assert seen == [(1, 4, (4,)), (2, 8, (4,))]
    assert trainer.completed_epochs(state) == 2 and len(history) == 2
    chex.assert_tree_all_finite(state.params)
    if scheme.uses_gradients:  # GraB's herded next order is a permutation of the examples
        np.testing.assert_array_equal(
            np.sort(np.asarray(state.scheme_state.next_order)), np.arange(N)
        )
    state, more = trainer.train(state, source, 2)  # already complete: nothing to run
    assert more == []
    result = trainer.evaluate(state, source, jax.random.key(7), batch_size=24)  # 24 + 24 + 16
    assert set(result) == {"loss", "accuracy"} and 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.parametrize("scheme_name", ["random_reshuffle", "grab_pair_balance"])
def test_scan_epoch_equals_run_epoch_and_vmaps_over_seeds(digits, classifier, scheme_name):
    model, params, stats = classifier
    scheme = shuffling.make_scheme(scheme_name, N)
    optimizer = optax.sgd(0.1)
    trainer = training.make_trainer(
        training.cross_entropy_loss(model), optimizer, scheme, batch_size=16
    )
    arrays = {name: jnp.asarray(value) for name, value in digits.items()}

    def two_epochs(key):
        state = training.init_train_state(key, params, stats, optimizer, scheme)
        state, first, _ = trainer.scan_epoch(state, arrays)
        state, second, metrics = trainer.scan_epoch(state, arrays)
        return state, jnp.stack([first, second]), metrics

    keys = lambda: jax.random.split(jax.random.key(8), 2)  # noqa: E731  (fresh keys for each side)
    states, orders, metrics = jax.jit(jax.vmap(two_epochs))(keys())
    assert metrics["loss"].shape == (2, 4) and orders.shape == (2, 2, N)
    for seed in range(2):  # the Python loop of run_epoch, seed by seed
        state = training.init_train_state(keys()[seed], params, stats, optimizer, scheme)
        for _ in range(2):
            state, looped = trainer.run_epoch(state, data.ArraySource(digits))
        np.testing.assert_allclose(looped["loss"], metrics["loss"][seed], rtol=1e-5)
        for a, b in zip(
            jax.tree.leaves((state.params, state.batch_stats)),
            jax.tree.leaves(
                jax.tree.map(lambda x, seed=seed: x[seed], (states.params, states.batch_stats))
            ),
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        assert int(states.step[seed]) == int(state.step) == 8
    assert not np.array_equal(orders[0], orders[1])  # seeds draw different orders
    assert all(np.array_equal(np.sort(np.asarray(o)), np.arange(N)) for o in orders.reshape(-1, N))


def test_sharded_run_equals_single_device(digits, classifier):
    model, params, stats = classifier
    source = data.ArraySource(digits)
    scheme = shuffling.random_reshuffle(N)
    optimizer = optax.adam(1e-2)
    loss = training.cross_entropy_loss(model)
    runs = {}
    for devices in (None, 8):
        mesh = None if devices is None else parallel.data_mesh(devices)
        trainer = training.make_trainer(loss, optimizer, scheme, batch_size=16, mesh=mesh)
        state = training.init_train_state(jax.random.key(8), params, stats, optimizer, scheme)
        runs[devices], _ = trainer.train(state, source, 2)
    sharded = runs[8]
    assert sharded.params["layers"]["0"]["kernel"].sharding.is_fully_replicated
    assert len(sharded.params["layers"]["0"]["kernel"].sharding.device_set) == 8
    plain = lambda state: jax.device_get(
        state._replace(scheme_state=None, scheme_key=None, key=None)
    )
    chex.assert_trees_all_close(plain(sharded), plain(runs[None]), rtol=1e-5, atol=1e-6)
    assert int(sharded.step) == int(runs[None].step) == 8
    np.testing.assert_array_equal(
        jax.random.key_data(sharded.key), jax.random.key_data(runs[None].key)
    )


def test_trainer_validates_before_compiling(classifier):
    model, _, _ = classifier
    loss, scheme, opt = (
        training.cross_entropy_loss(model),
        shuffling.random_reshuffle(N),
        optax.sgd(0.1),
    )
    with pytest.raises(ValueError, match="batch_size=12 does not divide"):
        training.make_trainer(loss, opt, scheme, batch_size=12)
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by the 8 devices"):
        training.make_trainer(loss, opt, scheme, batch_size=4, mesh=parallel.data_mesh(8))
    with pytest.raises(ValueError, match="axis='batch'"):
        training.make_trainer(
            loss, opt, scheme, batch_size=16, mesh=parallel.data_mesh(8), axis="batch"
        )
    with pytest.raises(ValueError, match="prefetch must be a non-negative int"):
        training.make_trainer(loss, opt, scheme, batch_size=16, prefetch=-1)
    trainer = training.make_trainer(loss, opt, scheme, batch_size=16)
    with pytest.raises(ValueError, match="source has 10 examples"):
        trainer.run_epoch(None, data.ArraySource({"x": np.zeros(10)}))


def test_score_network_training_runs(digits):
    sde = diffusion.make_sde("vp")
    model = models.ScoreMLP(hidden=16, num_layers=1, embed_dim=8)
    x = np.asarray(digits["image"]).reshape(N, -1)[:, :2] * 2.0 - 1.0  # a 2-D point cloud
    source = data.ArraySource({"x": x.astype(np.float32)})
    params, stats = models.init_model(model, jax.random.key(9), jnp.zeros((1, 2)), jnp.zeros(1))
    scheme = shuffling.single_shuffle(N)
    optimizer = optax.adam(1e-2)
    loss = training.denoising_score_matching_loss(model, sde, weighting="likelihood", input_key="x")
    trainer = training.make_trainer(loss, optimizer, scheme, batch_size=32)
    state = training.init_train_state(jax.random.key(10), params, stats, optimizer, scheme)
    state, history = trainer.train(state, source, 3)
    chex.assert_tree_all_finite(state.params)
    assert history[-1]["loss"].shape == (2,) and np.all(np.isfinite(history[-1]["loss"]))


@pytest.mark.parametrize("devices, prefetch", [(None, 0), (None, 3), (8, 2)])
def test_run_epoch_reads_through_grain_the_batches_of_the_order(
    digits, classifier, devices, prefetch
):
    """run_epoch (Grain, any prefetch depth, on a mesh or not) is bit for bit the hand-written
    loop: the epoch's order cut into consecutive batches, each read by plain indexing."""
    model, params, stats = classifier
    source = data.ArraySource(digits)
    scheme = shuffling.random_reshuffle(N)
    optimizer = optax.sgd(0.1)
    mesh = None if devices is None else parallel.data_mesh(devices)
    trainer = training.make_trainer(
        training.cross_entropy_loss(model),
        optimizer,
        scheme,
        batch_size=24,
        drop_remainder=True,
        mesh=mesh,
        prefetch=prefetch,
    )
    state = trainer.place(
        training.init_train_state(jax.random.key(11), params, stats, optimizer, scheme)
    )
    epoch, history = trainer.run_epoch(state, source)
    scheme_state, order = drivers.epoch_order(scheme, state.scheme_key, state.scheme_state, 0)
    looped, losses = state._replace(scheme_state=scheme_state), []
    for start in (0, 24):  # 64 = 2 * 24 + 16: the last 16 are dropped
        indices = np.asarray(order)[start : start + 24]
        batch = source[indices]
        if mesh is not None:  # the whole global batch placed from this one process
            batch = parallel.shard_batch({**batch, "indices": indices}, mesh)
            indices = batch.pop("indices")
        looped, metrics = trainer.step(looped, batch, indices)
        losses.append(metrics["loss"])
    np.testing.assert_array_equal(history["loss"], np.asarray(losses))
    chex.assert_trees_all_equal(
        jax.device_get((epoch.params, epoch.opt_state, epoch.batch_stats, epoch.step)),
        jax.device_get((looped.params, looped.opt_state, looped.batch_stats, looped.step)),
    )
