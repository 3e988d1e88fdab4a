"""kd_jax.parallel: the mesh, host batches -> global arrays, replication, pmap helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from kd_jax import parallel


def test_mesh_is_one_explicit_batch_axis():
  mesh = parallel.make_mesh(4)
  assert mesh.axis_names == ("batch",) and mesh.devices.shape == (4,)
  assert mesh.axis_types == (AxisType.Explicit,)
  assert parallel.make_mesh().devices.size == jax.device_count()
  with pytest.raises(ValueError, match="num_devices=99 but only 8 devices"):
    parallel.make_mesh(99)


def test_shard_batch_builds_global_arrays_split_over_devices():
  mesh = parallel.make_mesh(4)
  batch = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3),
           "label": np.arange(8, dtype=np.int32)}
  out = parallel.shard_batch(batch, mesh)
  assert out["image"].shape == (8, 3)
  assert out["image"].sharding.spec == P("batch")
  np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
  # Device k holds rows [2k, 2k + 2).
  for shard in out["label"].addressable_shards:
    k = list(mesh.devices.flat).index(shard.device)
    np.testing.assert_array_equal(np.asarray(shard.data), [2 * k, 2 * k + 1])
  with pytest.raises(ValueError, match=r"divisible by the 4 local devices.*\(6, 3\)"):
    parallel.shard_batch({"image": np.zeros((6, 3))}, mesh)


def test_replicate_copies_so_donation_keeps_the_source():
  mesh = parallel.make_mesh(2)
  x = jnp.arange(4.0)
  y = parallel.replicate(x, mesh)
  assert y.sharding.spec == P() and len(y.addressable_shards) == 2
  jax.jit(lambda a: a + 1, donate_argnums=0)(y)
  np.testing.assert_array_equal(x, [0.0, 1.0, 2.0, 3.0])  # still alive


def test_data_parallel_means_over_devices():
  mesh = parallel.make_mesh(4)

  def step(state, batch):
    local = jnp.mean(batch["x"])  # the device's shard mean
    return state + jax.lax.pmean(local, "batch"), {"local_max": jax.lax.pmax(local, "batch")}

  run = parallel.data_parallel(step, mesh)
  x = np.arange(8, dtype=np.float32)
  state, m = run(parallel.replicate(jnp.zeros(()), mesh),
                 parallel.shard_batch({"x": x}, mesh))
  np.testing.assert_allclose(state, x.mean())
  np.testing.assert_allclose(m["local_max"], x[6:].mean())


def test_pmap_helpers_round_trip():
  tree = {"a": jnp.arange(3.0)}
  stacked = parallel.stack_for_pmap(tree, 4)
  assert stacked["a"].shape == (4, 3)
  np.testing.assert_array_equal(parallel.unstack_from_pmap(stacked)["a"], tree["a"])
  split = parallel.split_for_pmap({"x": np.arange(8)}, 4)
  np.testing.assert_array_equal(split["x"], np.arange(8).reshape(4, 2))
  with pytest.raises(ValueError, match="not divisible by 3 devices"):
    parallel.split_for_pmap({"x": np.arange(8)}, 3)


def test_initialize_distributed_disabled_is_a_no_op():
  parallel.initialize_distributed(False)
  assert jax.process_count() == 1
  batch = {"x": np.arange(6)}
  assert parallel.host_block(batch) is batch  # one process: its block is the whole batch
