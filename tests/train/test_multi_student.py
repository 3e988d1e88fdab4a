"""Many students per teacher forward: each student of a multi-student step equals the same
student trained alone (same seed, batches and spec), on one device and under shard_map."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import parallel
from kd_jax.train import TrainState, make_multi_student_step, make_train_step, stack_states
from kd_jax.train import unstack_state
from tests.train._toy import ToyNet, toy_batch

METHODS = {"kd": "ce:0.1,kd:0.9(temperature=2)", "sp": "ce:1,sp:30",
           "crd": "ce:1,crd:0.8(num_negatives=8,feat_dim=4)"}
SEEDS, STEPS, B, NUM_DATA = (0, 1), 2, 16, 48


def _setup(batch_norm=True):
  teacher = ToyNet(width=16, batch_norm=batch_norm, rngs=nnx.Rngs(100))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  t_vars = {"params": t_params, "batch_stats": t_rest}
  batches = []
  for s in range(STEPS):
    b = toy_batch(B, seed=10 + s)
    b["index"] = np.arange(s * B, (s + 1) * B, dtype=np.int32) % NUM_DATA
    batches.append(b)
  return t_graph, t_vars, batches


def _initial(method, seed, t_graph, t_vars, batch, methods=METHODS, batch_norm=True):
  student = ToyNet(width=8, batch_norm=batch_norm, rngs=nnx.Rngs(seed))
  state = TrainState.create(student, optax.sgd(0.1, momentum=0.9), rng=jax.random.key(seed))
  return make_train_step(methods[method], teacher_graphdef=t_graph, axis_name=None).init(
      state, batch, t_vars, num_data=NUM_DATA)


def _close(a, b, tol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_each_student_equals_the_same_student_trained_alone():
  t_graph, t_vars, batches = _setup()
  states = {m: stack_states([_initial(m, s, t_graph, t_vars, batches[0]) for s in SEEDS])
            for m in METHODS}
  multi = jax.jit(make_multi_student_step(METHODS, teacher_graphdef=t_graph, axis_name=None))
  for b in batches:
    states, metrics = multi(states, b, t_vars)
  assert metrics["kd/loss"].shape == (len(SEEDS),)
  for m, spec in METHODS.items():
    alone = jax.jit(make_train_step(spec, teacher_graphdef=t_graph, axis_name=None))
    for i, seed in enumerate(SEEDS):
      state = _initial(m, seed, t_graph, t_vars, batches[0])
      for b in batches:
        state, m_alone = alone(state, b, t_vars)
      _close(unstack_state(states[m], i), state)
      np.testing.assert_allclose(metrics[f"{m}/loss"][i], m_alone["loss"], rtol=2e-5)
  # Different seeds are different students.
  kd = states["kd"].params
  assert np.max(np.abs(np.asarray(jax.tree.leaves(kd)[0][0] - jax.tree.leaves(kd)[0][1]))) > 0


def test_multi_student_step_under_shard_map_equals_one_device():
  # Without batch norm and with SP over the global batch, the sharded step is the one-device
  # step on the global batch (per-device statistics would differ by design).
  methods = {**METHODS, "sp": "ce:1,sp:30(all_gather=true)"}
  t_graph, t_vars, batches = _setup(batch_norm=False)
  init = {m: stack_states([_initial(m, s, t_graph, t_vars, batches[0], methods, False)
                           for s in SEEDS]) for m in methods}
  single = jax.jit(make_multi_student_step(methods, teacher_graphdef=t_graph, axis_name=None))
  mesh = parallel.make_mesh(8)
  mapped = parallel.data_parallel(make_multi_student_step(methods, teacher_graphdef=t_graph),
                                  mesh)
  a, b_states = init, parallel.replicate(init, mesh)
  rep_t = parallel.replicate(t_vars, mesh)
  for b in batches:
    a, ma = single(a, b, t_vars)
    b_states, mb = mapped(b_states, parallel.shard_batch(b, mesh), rep_t)
  _close(jax.device_get(b_states), a, 5e-5)
  for k in ("kd/loss", "sp/loss", "crd/loss/crd"):
    np.testing.assert_allclose(mb[k], ma[k], rtol=5e-5)


def test_unrolled_students_equal_vmapped_students():
  # student_map="unroll" (each student traced in turn, for convolutional students on CPU)
  # computes the same update as the vmapped step.
  methods = {"kd": METHODS["kd"]}
  t_graph, t_vars, batches = _setup()
  init = {m: stack_states([_initial(m, s, t_graph, t_vars, batches[0]) for s in SEEDS])
          for m in methods}
  vm = jax.jit(make_multi_student_step(methods, teacher_graphdef=t_graph, axis_name=None))
  un = jax.jit(make_multi_student_step(methods, teacher_graphdef=t_graph, axis_name=None,
                                       student_map="unroll"))
  a = b = init
  for batch in batches:
    a, ma = vm(a, batch, t_vars)
    b, mb = un(b, batch, t_vars)
  _close(b, a)
  for k in ma:
    np.testing.assert_allclose(mb[k], ma[k], rtol=2e-5, atol=1e-6)
  with pytest.raises(ValueError, match="student_map"):
    make_multi_student_step(methods, teacher_graphdef=t_graph, student_map="scan")
