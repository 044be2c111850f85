"""Worker meshes and shardings, on 8 forced CPU devices (tests/conftest.py).

The sharded distributed run built on them is tested in tests/compression/test_sharded.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

from shufflesgd import parallel


def test_eight_forced_cpu_devices_are_present():
    # tests/conftest.py forces 8 host devices; every mesh below relies on them.
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def test_shard_workers_places_a_worker_stacked_tree():
    mesh = parallel.worker_mesh(4)
    tree = {"g": jnp.arange(8 * 3.0).reshape(8, 3), "s": (jnp.ones((8,)),)}
    placed = parallel.shard_workers(mesh, tree)
    for leaf, orig in zip(jax.tree.leaves(placed), jax.tree.leaves(tree)):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, jax.P("workers")), leaf.ndim)
        assert leaf.addressable_shards[0].data.shape[0] == 2
        np.testing.assert_array_equal(leaf, orig)


def test_worker_mesh():
    mesh = parallel.worker_mesh()
    assert mesh.shape == {"workers": jax.device_count()}
    assert mesh.axis_types == (AxisType.Auto,)
    assert parallel.worker_mesh(2, axis="w").shape == {"w": 2}
    assert list(parallel.worker_mesh(3).devices.flat) == jax.devices()[:3]


@pytest.mark.parametrize("bad", [0, -1, 9, 2.0, True])
def test_worker_mesh_rejects_bad_device_counts(bad):
    with pytest.raises(ValueError, match="num_devices"):
        parallel.worker_mesh(bad)


def test_mismatched_worker_counts_raise_before_compiling():
    mesh = parallel.worker_mesh(4)
    with pytest.raises(ValueError, match="mismatched worker counts"):
        parallel.shard_workers(mesh, jnp.zeros((6, 3)))
    with pytest.raises(ValueError, match="mismatched worker counts"):
        parallel.shard_workers(mesh, (jnp.zeros((8, 3)), jnp.zeros((4, 3))))
    with pytest.raises(ValueError, match="mismatched worker counts"):
        parallel.shard_workers(mesh, jnp.zeros(()))
    with pytest.raises(ValueError, match="axis='model'"):
        parallel.shard_workers(mesh, jnp.zeros((8, 3)), axis="model")
