"""Batch norm and dropout under data parallelism, on a zoo model (resnet8) over 8 devices.

- Per-device statistics (the default, RepDistiller's per-GPU batch norm): the sharded step equals
  the mean of eight one-device steps, each on its device's shard (SGD with momentum is linear in
  the gradient, so averaging the states after the step is averaging the gradients before it).
- `sync_batch_norm=True`: the sharded step equals one device's step on the global batch,
  running variance (unbiased over all 16 x 8 x 8 positions per channel) included.
- Dropout: every device draws its own mask (the stream key folded with the device index).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax import compile_options
from kd_jax import models
from kd_jax import parallel
from kd_jax.train.state import TrainState, sgd
from kd_jax.train.step import make_train_step
from tests.train._toy import ToyNet, toy_batch

N_DEV = 8
PER_DEVICE = 2
STEPS = 2
LOSS = "ce:1"


def _batches():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    x = rng.normal(size=(N_DEV * PER_DEVICE, 8, 8, 3)).astype(np.float32)
    # Device k's rows are shifted by k / 2: per-device and global statistics differ clearly.
    x += np.repeat(np.arange(N_DEV, dtype=np.float32) / 2, PER_DEVICE)[:, None, None, None]
    out.append({"image": x, "label": rng.integers(0, 10, size=len(x)).astype(np.int32)})
  return out


@pytest.fixture(scope="module")
def setup():
  # An rbg key: its initialisers compile in a fraction of threefry's time.
  student = nnx.jit(lambda: models.create("resnet8", num_classes=10,
                                          rngs=nnx.Rngs(jax.random.key(2, impl="unsafe_rbg"))))()
  state = TrainState.create(student, sgd(0.1, momentum=0.9), rng=jax.random.key(0))
  single = compile_options.jit(make_train_step(LOSS, axis_name=None))
  return state, single, _batches()


_RUNS = {}


def _sharded(state, batches, *, sync):
  """The 8-device run from `state` (computed once per mode for the module)."""
  if sync not in _RUNS:
    mesh = parallel.make_mesh(N_DEV)
    step = parallel.data_parallel(make_train_step(LOSS, sync_batch_norm=sync), mesh)
    dev = parallel.replicate(state, mesh)
    for b in batches:
      dev, metrics = step(dev, parallel.shard_batch(b, mesh))
    _RUNS[sync] = jax.device_get(dev), jax.device_get(metrics)
  return _RUNS[sync]


def _mean_state(states):
  """The leaf-wise mean of float leaves; other leaves (step, key, counts) must agree."""
  def mean(*xs):
    if jnp.issubdtype(xs[0].dtype, jnp.inexact):
      return np.mean(np.stack([np.asarray(x, np.float64) for x in xs]), 0).astype(xs[0].dtype)
    return xs[0]
  return jax.tree.map(mean, *states)


def _close(a, b, tol=2e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                          strict=True):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol,
                                 err_msg=jax.tree_util.keystr(path))


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sync_batch_norm_equals_one_device_on_the_global_batch(setup):
  state, single, batches = setup
  ref = state
  for b in batches:
    ref, ref_metrics = single(ref, b)
  synced, metrics = _sharded(state, batches, sync=True)
  _close(synced.params, ref.params)
  _close(synced.batch_stats, ref.batch_stats)
  _close(synced.opt_state, ref.opt_state)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  # The comparison has teeth: per-device statistics give another update.
  per_device, _ = _sharded(state, batches, sync=False)
  assert _max_diff(per_device.params, ref.params) > 1e-3
  assert _max_diff(per_device.batch_stats, ref.batch_stats) > 1e-2


def test_per_device_batch_norm_is_the_mean_of_one_device_steps(setup):
  state, single, batches = setup
  ref = state
  for b in batches:
    shards = [jax.tree.map(lambda x: x[k * PER_DEVICE:(k + 1) * PER_DEVICE], b)
              for k in range(N_DEV)]
    outs = [single(ref, s) for s in shards]
    ref = _mean_state([o[0] for o in outs])
    ref_loss = np.mean([float(o[1]["loss"]) for o in outs])
  sharded, metrics = _sharded(state, batches, sync=False)
  _close(sharded.params, ref.params)
  _close(sharded.batch_stats, ref.batch_stats)
  _close(sharded.opt_state, ref.opt_state)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  assert int(sharded.step) == STEPS


def test_dropout_masks_differ_per_device():
  model = nnx.jit(lambda: ToyNet(width=8, dropout_rate=0.5,
                                 rngs=nnx.Rngs(jax.random.key(3, impl="unsafe_rbg"))))()
  state = TrainState.create(model, sgd(0.1, momentum=0.0), rng=jax.random.key(1))
  # Every device gets the same two rows: only dropout can make their gradients differ.
  rows = toy_batch(PER_DEVICE, seed=5)
  batch = jax.tree.map(lambda v: np.tile(v, (N_DEV,) + (1,) * (v.ndim - 1)), rows)
  mesh = parallel.make_mesh(N_DEV)
  step = parallel.data_parallel(make_train_step(LOSS), mesh)
  sharded, metrics = jax.device_get(step(parallel.replicate(state, mesh),
                                         parallel.shard_batch(batch, mesh)))

  # Reference: device k's step is the one-device step with every stream key folded with k;
  # plain SGD is linear, so the data-parallel state is the mean of the eight.
  single = jax.jit(make_train_step(LOSS, axis_name=None))

  def fold(k):
    return jax.tree.map(lambda v: jax.random.fold_in(v, k) if jax.dtypes.issubdtype(
        v.dtype, jax.dtypes.prng_key) else v, state.batch_stats)

  outs = [single(state.replace(batch_stats=fold(k)), rows) for k in range(N_DEV)]
  losses = [float(m["loss"]) for _, m in outs]
  assert len(set(losses)) == N_DEV, losses  # eight different masks
  ref = _mean_state([o.params for o, _ in outs])
  _close(sharded.params, ref)
  np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-5)
  # One mask replicated on every device would have given exactly device 0's step.
  assert _max_diff(sharded.params, outs[0][0].params) > 1e-4
  # The carried state keeps the shared key (replicas stay identical) and advances the count.
  for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(sharded.batch_stats),
                  strict=True):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    else:
      assert int(b) == int(a) + 1
