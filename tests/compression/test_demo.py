"""DeMo: SGD when everything is sent, a NumPy reference, energy and sparsity, one compiled
program for a sweep, convergence inside an optax chain, bits, and errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.fft

from shufflesgd.compression.demo import (
    DeMoState,
    _top_k_mask,
    demo,
    demo_bits,
    extract_fast_components,
)

# Leaf sizes 12, 3 and 1: with chunk 4, three chunks, and two leaves smaller than a chunk,
# each one chunk of its own length.
SHAPES = {"w": (3, 4), "b": (3,), "s": ()}


def random_grads(rng, num_workers, steps):
    return [
        {name: rng.standard_normal((num_workers, *shape)) for name, shape in SHAPES.items()}
        for _ in range(steps)
    ]


def numpy_fast_components(m, chunk, topk):
    """ExtractFastComponents (Alg. 1) written directly: per chunk of the flattened array,
    keep the topk largest orthonormal DCT-II coefficients (all of a leaf smaller than a chunk
    if it has fewer)."""
    flat = m.ravel()
    out = np.zeros_like(flat)
    for start in range(0, flat.size, chunk):
        block = flat[start : start + chunk]
        coefficients = scipy.fft.dct(block, norm="ortho")
        keep = np.argsort(-np.abs(coefficients), kind="stable")[: min(topk, block.size)]
        kept = np.zeros_like(coefficients)
        kept[keep] = coefficients[keep]
        out[start : start + block.size] = scipy.fft.idct(kept, norm="ortho")
    return out.reshape(m.shape)


def numpy_demo(grads, beta, chunk, topk, sign):
    """DeMo (Peng, Quesnelle, Kingma 2024, Alg. 1) with a mean over workers, in NumPy."""
    momentum = {name: np.zeros_like(g) for name, g in grads[0].items()}
    outputs = []
    for step_grads in grads:
        out = {}
        for name, g in step_grads.items():
            m = beta * momentum[name] + g
            q = np.stack([numpy_fast_components(mi, chunk, topk) for mi in m])
            momentum[name] = m - q
            out[name] = np.sign(q.mean(axis=0)) if sign else q.mean(axis=0)
        outputs.append(out)
    return outputs, momentum


def run_demo(transform, grads):
    params = {name: jnp.zeros(shape) for name, shape in SHAPES.items()}
    state = transform.init(params)
    update = jax.jit(transform.update)
    outputs = []
    for step_grads in grads:
        out, state = update(jax.tree.map(jnp.asarray, step_grads), state)
        outputs.append(out)
    return outputs, state


def test_sending_every_component_is_sgd_on_the_mean_gradient(x64):
    rng = np.random.default_rng(0)
    grads = random_grads(rng, 3, 4)
    outputs, state = run_demo(demo(3, beta=0.9, chunk=4, topk=4), grads)
    for out, g in zip(outputs, grads):
        for name in SHAPES:
            np.testing.assert_allclose(out[name], g[name].mean(axis=0), rtol=1e-12, atol=1e-14)
    for m in jax.tree.leaves(state.momentum):
        np.testing.assert_allclose(m, 0.0, atol=1e-14)
    assert int(state.count) == 4

    # The same in a chain with the step size: SGD on the averaged gradient.
    lr = 0.3
    chain = optax.chain(demo(3, beta=0.9, chunk=4, topk=4), optax.scale(-lr))
    params = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    expected = {name: p.copy() for name, p in params.items()}
    params = jax.tree.map(jnp.asarray, params)
    opt_state = chain.init(params)
    chain_update = jax.jit(chain.update)
    for g in grads:
        updates, opt_state = chain_update(jax.tree.map(jnp.asarray, g), opt_state, params)
        params = optax.apply_updates(params, updates)
        expected = {name: expected[name] - lr * g[name].mean(axis=0) for name in SHAPES}
    for name in SHAPES:
        np.testing.assert_allclose(params[name], expected[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sign", [False, True])
def test_matches_numpy_reference(sign, x64):
    grads = random_grads(np.random.default_rng(1), 3, 3)
    outputs, state = run_demo(demo(3, beta=0.8, chunk=4, topk=3, sign=sign), grads)
    expected, momentum = numpy_demo(grads, 0.8, 4, 3, sign)
    for out, ref in zip(outputs, expected):
        for name in SHAPES:
            assert out[name].shape == SHAPES[name]
            np.testing.assert_allclose(out[name], ref[name], rtol=1e-10, atol=1e-12)
    for name in SHAPES:
        np.testing.assert_allclose(state.momentum[name], momentum[name], rtol=1e-10, atol=1e-12)
    if sign:
        assert all(set(np.unique(np.asarray(out["w"]))) <= {-1.0, 1.0} for out in outputs)


def test_sent_part_has_topk_coefficients_per_chunk_and_removes_its_energy(x64):
    beta, chunk, topk = 0.7, 4, 2
    transform = demo(2, beta=beta, chunk=chunk, topk=topk)
    rng = np.random.default_rng(2)
    state = transform.init({"w": jnp.zeros(8)})
    update = jax.jit(transform.update)
    for _ in range(3):
        g = rng.standard_normal((2, 8))
        before = beta * np.asarray(state.momentum["w"]) + g
        _, state = update({"w": jnp.asarray(g)}, state)
        after = np.asarray(state.momentum["w"])
        q = before - after
        np.testing.assert_allclose(
            np.sum(after**2, axis=1), np.sum(before**2, axis=1) - np.sum(q**2, axis=1), rtol=1e-12
        )
        for qi, mi in zip(q, before):
            for block, kept in [(slice(0, 4), 2), (slice(4, 8), 2)]:
                cq = scipy.fft.dct(qi[block], norm="ortho")
                cm = scipy.fft.dct(mi[block], norm="ortho")
                sent = np.abs(cq) > 1e-9 * np.abs(cm).max()
                assert sent.sum() == kept
                np.testing.assert_allclose(cq[sent], cm[sent], rtol=1e-10)
                if (~sent).any():
                    assert np.abs(cm[sent]).min() >= np.abs(cm[~sent]).max()
    # The public projection on its own: chunks of 5, and an array smaller than a chunk.
    for shape in [(3, 5), (2,)]:
        x = jnp.asarray(rng.standard_normal(shape))
        np.testing.assert_allclose(
            extract_fast_components(x, 5, 3), numpy_fast_components(np.asarray(x), 5, 3), rtol=1e-12
        )


def _demo_run(beta, key):
    transform = demo(3, beta=beta, chunk=4, topk=2, sign=False)
    state = transform.init({"w": jnp.zeros(8)})

    def body(state, step):
        grads = jax.random.normal(jax.random.fold_in(key, step), (3, 8))
        out, state = transform.update({"w": grads}, state)
        return state, out["w"]

    return jax.lax.scan(body, state, jnp.arange(4))[1]


def test_one_compiled_program_serves_a_sweep_over_beta_and_seeds():
    counted = chex.assert_max_traces(_demo_run, n=1)
    sweep = jax.jit(jax.vmap(counted))
    betas = jnp.array([0.0, 0.5, 0.9])
    swept = sweep(betas, jax.random.split(jax.random.key(0), 3))
    sweep(jnp.array([0.1, 0.2, 0.3]), jax.random.split(jax.random.key(1), 3))
    single = jax.jit(_demo_run)
    for i, key in enumerate(jax.random.split(jax.random.key(0), 3)):
        np.testing.assert_allclose(swept[i], single(betas[i], key), rtol=1e-5, atol=1e-6)
    # beta as an optax hyper-parameter in the state gives the same run.
    injected = optax.inject_hyperparams(demo, static_args=("num_workers", "chunk", "topk", "sign"))
    transform = injected(num_workers=3, beta=0.5, chunk=4, topk=2, sign=False)
    state = transform.init({"w": jnp.zeros(8)})
    update = jax.jit(transform.update)
    key = jax.random.split(jax.random.key(0), 3)[1]
    for step, expected in enumerate(swept[1]):
        grads = jax.random.normal(jax.random.fold_in(key, step), (3, 8))
        out, state = update({"w": grads}, state)
        np.testing.assert_allclose(out["w"], expected, rtol=1e-5, atol=1e-6)


def test_chain_with_weight_decay_converges_on_least_squares_in_a_scan(x64):
    num_workers, rows, d = 4, 12, 10
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.standard_normal((num_workers, rows, d)))
    b = jnp.asarray(rng.standard_normal((num_workers, rows)))

    def worker_loss(params, a_i, b_i):
        return 0.5 * jnp.mean((a_i @ params["w"].ravel() + params["c"] - b_i) ** 2)

    def loss(params):
        return jnp.mean(jax.vmap(worker_loss, (None, 0, 0))(params, a, b))

    design = np.concatenate([np.asarray(a).reshape(-1, d), np.ones((num_workers * rows, 1))], 1)
    solution = np.linalg.lstsq(design, np.asarray(b).ravel(), rcond=None)[0]
    best = float(loss({"w": jnp.asarray(solution[:d]).reshape(2, 5), "c": solution[d]}))

    # The workers' optima differ, so with a constant step DeMo (like EF14, which it is at
    # beta = 0) stalls in a small neighbourhood of the optimum rather than reaching it.
    chain = optax.chain(
        demo(num_workers, beta=0.9, chunk=5, topk=2),
        optax.add_decayed_weights(1e-4),
        optax.scale(-0.05),
    )
    params = {"w": jnp.zeros((2, 5)), "c": jnp.zeros(())}

    def body(carry, _):
        params, opt_state = carry
        grads = jax.vmap(jax.grad(worker_loss), (None, 0, 0))(params, a, b)
        updates, opt_state = chain.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), loss(params)

    _, losses = jax.jit(lambda p: jax.lax.scan(body, (p, chain.init(p)), length=400))(params)
    gap0, gap = float(loss(params)) - best, float(losses[-1]) - best
    assert np.all(np.isfinite(losses))
    assert gap < 2e-3 * gap0, (gap0, gap)


def test_bits_are_counted_per_chunk():
    params = {"w": jnp.zeros((2, 4)), "b": jnp.zeros(3), "c": jnp.zeros(2), "s": jnp.zeros(())}
    # w: 2 chunks of 4 (2 values, 2-bit indices); b: 1 chunk of 3 (2 values, 2-bit indices);
    # c: 1 chunk of 2 (2 values, 1-bit indices); s: 1 value, no index.
    assert demo_bits(params, 4, 2) == 2 * 2 * 34 + 2 * 34 + 2 * 33 + 32
    assert demo_bits(params, 1, 1) == 14 * 32
    assert demo_bits({"w": jnp.zeros((64, 64))}, 64, 32) == 64 * 32 * (32 + 6)


def test_bad_input_raises_naming_the_argument():
    for kwargs, name in [
        ({"num_workers": 0}, "num_workers"),
        ({"num_workers": 2, "chunk": 0}, "chunk"),
        ({"num_workers": 2, "chunk": 4.0}, "chunk"),
        ({"num_workers": 2, "topk": 0}, "topk"),
        ({"num_workers": 2, "chunk": 4, "topk": 5}, "topk"),
        ({"num_workers": 2, "beta": 1.0}, "beta"),
        ({"num_workers": 2, "beta": -0.1}, "beta"),
        ({"num_workers": 2, "beta": np.full(2, 0.5)}, "beta"),
    ]:
        with pytest.raises(ValueError, match=name):
            demo(**kwargs)
    with pytest.raises(TypeError, match="sign"):
        demo(2, sign=1)
    with pytest.raises(ValueError, match="topk"):
        demo_bits({"w": jnp.zeros(8)}, 4, 5)
    with pytest.raises(ValueError, match="topk"):
        extract_fast_components(jnp.zeros(8), 4, 5)
    # A leaf larger than a chunk and not a whole number of chunks: named, with divisors.
    with pytest.raises(ValueError, match=r"chunk=4 does not divide the 10 entries.*\[2, 5\]"):
        extract_fast_components(jnp.zeros(10), 4, 2)
    with pytest.raises(ValueError, match=r"chunk=4 does not divide.*\['w'\]"):
        demo_bits({"w": jnp.zeros((2, 5))}, 4, 2)
    with pytest.raises(ValueError, match=r"chunk=64 does not divide the 144 entries.*'k'"):
        demo(2, chunk=64).init({"k": jnp.zeros((3, 3, 1, 16))})

    transform = demo(2, beta=0.5, chunk=4, topk=2)
    state = transform.init({"w": jnp.zeros(8)})
    assert isinstance(state, DeMoState)
    with pytest.raises(ValueError, match="updates"):
        transform.update({"w": jnp.zeros((3, 8))}, state)  # three workers, not two
    with pytest.raises(ValueError, match="updates"):
        transform.update({"v": jnp.zeros((2, 8))}, state)
    with pytest.raises(TypeError, match="updates"):
        transform.update({"w": jnp.zeros((2, 8), jnp.int32)}, state)
    with pytest.raises(TypeError, match="params"):
        transform.init({"w": jnp.zeros(8, jnp.int32)})


@pytest.mark.parametrize("k", [1, 5, 8, 15, 16])
def test_short_row_selection_is_lax_top_k_set_ties_included(k):
    rows = jnp.round(jax.random.normal(jax.random.key(3), (400, 16)) * 2) / 2  # many ties
    rows = rows.at[0].set(0.0).at[1].set(-1.0).at[2, 3].set(jnp.inf)
    mask = jax.jit(_top_k_mask, static_argnums=1)(rows, k)
    _, indices = jax.lax.top_k(jnp.abs(rows), k)
    expected = jnp.zeros(rows.shape, bool).at[jnp.arange(400)[:, None], indices].set(True)
    np.testing.assert_array_equal(mask, expected)


def test_worker_axis_sharded_over_eight_devices_gives_the_same_steps():
    """The worker axis laid over 8 devices (each holds one worker's momentum): the same
    program partitioned by XLA, with the mean over workers its one collective."""
    from shufflesgd import parallel

    num_workers, shapes = 8, {"w": (16, 8), "b": (8,)}
    transform = demo(num_workers, beta=0.9, chunk=16, topk=3)
    params = {name: jnp.zeros(shape) for name, shape in shapes.items()}
    key = jax.random.key(4)

    def run(state, grads):
        def body(state, g):
            out, state = transform.update(g, state)
            return state, out

        return jax.lax.scan(body, state, grads)

    grads = {
        name: jax.random.normal(jax.random.fold_in(key, i), (5, num_workers, *shape))
        for i, (name, shape) in enumerate(shapes.items())
    }
    state = transform.init(params)
    single_state, single_out = jax.jit(run)(state, grads)

    mesh = parallel.worker_mesh(8)
    by_worker = parallel.worker_sharding(mesh)
    stepwise = jax.sharding.NamedSharding(by_worker.mesh, jax.P(None, parallel.WORKERS))
    sharded_state = state._replace(momentum=parallel.shard_workers(mesh, state.momentum))
    sharded_grads = jax.device_put(grads, stepwise)
    out_state, out = jax.jit(run)(sharded_state, sharded_grads)
    assert out_state.momentum["w"].sharding.spec[0] == parallel.WORKERS
    chex.assert_trees_all_close(out, single_out, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(out_state.momentum, single_state.momentum, rtol=1e-5, atol=1e-6)
