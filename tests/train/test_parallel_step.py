"""Data-parallel equivalence: shard_map == pmap == one device on the same global batch."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import parallel
from kd_jax.train.state import TrainState
from kd_jax.train.step import make_train_step
from tests.train._toy import ToyNet, toy_batch

N_DEV = 8
STEPS = 3


def _setup(loss):
  teacher = ToyNet(width=16, rngs=nnx.Rngs(1))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  t_vars = {"params": t_params, "batch_stats": t_rest}
  student = ToyNet(width=8, rngs=nnx.Rngs(2))
  state = TrainState.create(student, optax.sgd(0.1, momentum=0.9), rng=jax.random.key(0))
  batches = [toy_batch(32, seed=s) for s in range(STEPS)]
  return t_graph, t_vars, state, batches


def _run_single(loss, t_graph, t_vars, state, batches):
  step = jax.jit(make_train_step(loss, teacher_graphdef=t_graph, axis_name=None))
  for b in batches:
    state, metrics = step(state, b, t_vars)
  return state, metrics


def _run_shard_map(loss, t_graph, t_vars, state, batches):
  mesh = parallel.make_mesh(N_DEV)
  step = parallel.data_parallel(make_train_step(loss, teacher_graphdef=t_graph), mesh)
  state, t_vars = parallel.replicate((state, t_vars), mesh)
  for b in batches:
    state, metrics = step(state, parallel.shard_batch(b, mesh), t_vars)
  return state, metrics


def _run_pmap(loss, t_graph, t_vars, state, batches):
  step = parallel.pmap_parallel(make_train_step(loss, teacher_graphdef=t_graph),
                                devices=jax.devices()[:N_DEV])
  state = parallel.stack_for_pmap(state, N_DEV)
  t_vars = parallel.stack_for_pmap(t_vars, N_DEV)
  for b in batches:
    state, metrics = step(state, parallel.split_for_pmap(b, N_DEV), t_vars)
  return parallel.unstack_from_pmap(state), parallel.unstack_from_pmap(metrics)


def _assert_close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_shard_map_pmap_and_single_device_agree():
  assert jax.device_count() >= N_DEV
  loss = "ce:0.1,kd:0.9"
  setup = _setup(loss)
  single, m1 = _run_single(loss, *setup)
  sharded, m2 = _run_shard_map(loss, *_setup(loss))
  pmapped, m3 = _run_pmap(loss, *_setup(loss))
  # The run moved the parameters (otherwise agreement would be vacuous).
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(setup[2].params)))
  assert moved > 1e-3
  _assert_close(sharded.params, pmapped.params, 1e-5)
  _assert_close(sharded.params, single.params, 1e-5)
  _assert_close(sharded.opt_state, single.opt_state, 1e-5)
  assert int(sharded.step) == int(pmapped.step) == int(single.step) == STEPS
  for k in ("loss", "loss/ce", "loss/kd", "accuracy"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5)
    np.testing.assert_allclose(m3[k], m1[k], rtol=1e-5)
