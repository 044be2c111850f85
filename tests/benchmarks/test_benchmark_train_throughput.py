"""Smoke test of benchmarks/train_throughput.py in --quick mode: it runs and writes sane JSON.

No wall-clock threshold is asserted (timings live in benchmarks/).  Passes with or without
PyTorch installed (the peer is optional, in the ``bench`` extra, and absent in CI); when it is
installed the PyTorch twins must have exactly the parameters of the Flax models.
"""

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from benchmarks import train_throughput
from shufflesgd.nn import models
from support.benchmark_results import positive_finite

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.parametrize("block_peer", [False, True], ids=["as_installed", "torch_blocked"])
def test_quick_benchmark_writes_json(quick_benchmark, block_peer):
    results = quick_benchmark("benchmarks.train_throughput", "torch" if block_peer else None)
    peer = not block_peer and HAS_TORCH
    assert results["peer"].startswith("torch") if peer else results["peer"] == "not installed"
    quick = train_throughput.QUICK
    assert set(results["rows"]) == {
        f"{m}/batch_{b}" for m in quick["models"] for b in quick["batch_sizes"]
    }
    for row in results["rows"].values():
        ways = (*train_throughput.JAX_WAYS, "torch") if peer else train_throughput.JAX_WAYS
        assert ("torch" in row) == peer
        for way in ways:
            stats = row[way]
            assert len(stats["seconds"]["repeats"]) == quick["repeats"]
            assert all(positive_finite(t) for t in stats["seconds"]["repeats"])
            assert positive_finite(stats["examples_per_second"]) and positive_finite(
                stats["first_call_seconds"]
            )
        if peer:
            assert row["torch_params"] == row["params"]
            for way in ("scan", "trainer"):
                assert positive_finite(row[f"{way}_to_torch"]) and positive_finite(
                    row[f"{way}_to_torch_paired"]
                )


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch (the optional peer) is not installed")
@pytest.mark.parametrize("name", sorted(train_throughput.MODELS))
def test_torch_twins_have_the_flax_parameter_count(name):
    model = train_throughput.MODELS[name]()
    params, _ = models.init_model(model, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    twin = train_throughput.torch_model(name)
    assert sum(p.numel() for p in twin.parameters()) == models.count_params(params)
