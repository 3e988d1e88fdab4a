"""Data parallelism: one per-device step, mapped over a 1-D device mesh.

A train step is written once as per-device code over a named batch axis ("batch"): it sees its
shard of the global batch and averages gradients and metrics with `jax.lax.pmean(x, "batch")`.
`data_parallel` maps it over every device with `jax.shard_map` inside `jax.jit` (the default,
state donated); `pmap_parallel` runs the very same function under `jax.pmap`. Since JAX 0.8 `pmap`
is itself `jit(shard_map)`, so the two agree to float tolerance (tests/train/test_parallel_step.py).

Host batches become global arrays with `jax.make_array_from_process_local_data`: on one host this
is a plain sharded `device_put`; on a multi-host slice each process passes its host-local rows
and the global array spans every process (call `initialize_distributed()` first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from kd_jax import compile_options

BATCH_AXIS = "batch"


def initialize_distributed(enabled: bool = True, **kwargs) -> None:
  """Calls `jax.distributed.initialize(**kwargs)` when `enabled` (one process per host).

  On Cloud TPU and under SLURM / Open MPI JAX discovers the coordinator by itself, so no
  arguments are needed; elsewhere pass `coordinator_address`, `num_processes`, `process_id`.
  Must run before any JAX computation. A no-op when `enabled` is False.
  """
  if enabled:
    jax.distributed.initialize(**kwargs)


def make_mesh(num_devices: int | None = None, *,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over `num_devices` devices (default: all, across hosts) with axis "batch".

  The axis is `AxisType.Explicit`, so inputs must carry a `NamedSharding` (see `shard_batch`,
  `replicate`) before they enter the mapped step.
  """
  if devices is None:
    devices = jax.devices()
  devices = list(devices)
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices are visible.")
  return jax.make_mesh((n,), (BATCH_AXIS,), axis_types=(AxisType.Explicit,),
                       devices=devices[:n])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading axis split over the mesh's batch axis."""
  return NamedSharding(mesh, P(BATCH_AXIS))


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places a copy of every array of `tree` on all devices of `mesh` (replicated).

  The copy never aliases the input buffers, so donating the result to a step leaves the caller's
  arrays (e.g. a module's parameters) alive.
  """
  sharding = replicated_sharding(mesh)
  if sharding.is_fully_addressable:
    # device_put may reuse the source buffer for the replica on its own device (even with
    # may_alias=False on CPU), so copy first.
    copied = jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
    return jax.device_put(copied, sharding)
  # A mesh over several processes: device_put cannot reach the other hosts' devices, so every
  # process places its own (identical) copy on its local devices of the global array.
  return jax.tree.map(lambda x: _replicate_across_hosts(x, sharding), tree)


def _replicate_across_hosts(x, sharding: NamedSharding) -> jax.Array:
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _replicate_across_hosts(jax.random.key_data(x), sharding)
    impl = jax.random.key_impl(x)
    return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sharding)(data)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError(f"cannot replicate a global array sharded as {x.sharding} (shape "
                       f"{x.shape}); gather it first.")
    x = x.addressable_data(0)
  local = np.asarray(x)
  shards = [jax.device_put(local, d) for d in sharding.addressable_devices]
  return jax.make_array_from_single_device_arrays(local.shape, sharding, shards)


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
  """Turns host-local batch arrays into global arrays sharded along the batch axis.

  Each process passes its own rows (its host-local batch of size global_batch / num_processes);
  the result is a global array of the global batch. The host-local batch size must divide evenly
  over this process's devices in the mesh.
  """
  sharding = batch_sharding(mesh)
  num_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % num_local:
      raise ValueError(
          f"host-local batch leading size {x.shape[:1]} must be divisible by the "
          f"{num_local} local devices of the mesh (array shape {x.shape}).")
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(put, batch)


def host_block(batch: Any) -> Any:
  """This process's contiguous block of rows of a global batch every host holds in full.

  For inputs that every host reads entirely (e.g. evaluation batches): process p of P keeps rows
  [p * B / P, (p + 1) * B / P), which `shard_batch` reassembles into the global batch. The
  identity on a single process.
  """
  count, index = jax.process_count(), jax.process_index()
  if count == 1:
    return batch

  def block(x):
    x = np.asarray(x)
    if x.shape[0] % count:
      raise ValueError(f"global batch of {x.shape[0]} rows cannot be split over {count} hosts.")
    size = x.shape[0] // count
    return x[index * size:(index + 1) * size]

  return jax.tree.map(block, batch)


def data_parallel(step_fn: Callable[..., tuple[Any, Any]], mesh: jax.sharding.Mesh, *,
                  donate_state: bool = True) -> Callable[..., tuple[Any, Any]]:
  """Maps a per-device `step_fn(state, batch, *replicated) -> (state, metrics)` over `mesh`.

  `state` and the trailing arguments (e.g. frozen teacher variables) are replicated, `batch` is
  split along its leading axis over "batch", and the returned state and metrics must be
  replicated (the step `pmean`s them over "batch"). The mapping is `jax.shard_map` inside
  `jax.jit` (with `kd_jax.compile_options`), with the state's buffers donated. Inputs must
  already be placed with `replicate` / `shard_batch` (the mesh's axis is Explicit).

  `check_vma=False` gives the per-device (pmap) semantics the step is written for: the gradient
  of the local loss is the local gradient, which the step then averages with `pmean` itself.
  """

  def mapped(state, batch, *replicated):
    in_specs = (P(), P(BATCH_AXIS)) + (P(),) * len(replicated)
    fn = jax.shard_map(step_fn, mesh=mesh, in_specs=in_specs, out_specs=(P(), P()),
                       check_vma=False)
    return fn(state, batch, *replicated)

  return compile_options.jit(mapped, donate_argnums=(0,) if donate_state else ())


def pmap_parallel(step_fn: Callable[..., tuple[Any, Any]], *,
                  devices: Sequence[jax.Device] | None = None,
                  donate_state: bool = True) -> Callable[..., tuple[Any, Any]]:
  """Runs the same per-device `step_fn(state, batch, *replicated)` under `jax.pmap`.

  `jax.pmap` takes no compiler options, so on CPU this path keeps jaxlib's default
  convolutions (see `kd_jax.compile_options`; `data_parallel` is faster there). Arguments carry a
  leading device axis: use `stack_for_pmap` for the state and the replicated
  arguments and `split_for_pmap` for the global batch; `unstack_from_pmap` takes device 0's copy
  of the (identical) outputs.
  """
  return jax.pmap(step_fn, axis_name=BATCH_AXIS, devices=devices,
                  donate_argnums=(0,) if donate_state else ())


def stack_for_pmap(tree: Any, num_devices: int) -> Any:
  """Adds a leading device axis holding `num_devices` copies of every array."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_devices,) + jnp.shape(x)), tree)


def split_for_pmap(batch: Any, num_devices: int) -> Any:
  """Reshapes a global batch [B, ...] into [num_devices, B / num_devices, ...]."""

  def split(x):
    x = jnp.asarray(x)
    if x.shape[0] % num_devices:
      raise ValueError(f"batch leading size {x.shape[0]} is not divisible by {num_devices} devices.")
    return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

  return jax.tree.map(split, batch)


def unstack_from_pmap(tree: Any) -> Any:
  """Device 0's copy of a tree with a leading device axis."""
  return jax.tree.map(lambda x: x[0], tree)
