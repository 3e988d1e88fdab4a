"""The step builder: loss composition, per-term warm-up, parsing errors, SP per-device vs global."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import parallel
from kd_jax.train import terms as terms_lib
from kd_jax.train.state import TrainState
from kd_jax.train.step import make_train_step
from tests import _numpy_reference
from tests._numpy_reference import log_softmax as _np_log_softmax
from tests.train._toy import ToyNet, toy_batch


def _models():
  teacher = ToyNet(width=16, rngs=nnx.Rngs(1))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  student = ToyNet(width=8, rngs=nnx.Rngs(2))
  return teacher, t_graph, {"params": t_params, "batch_stats": t_rest}, student


# ----------------------------------------------------------------- independent float64 formulas

def _np_ce(logits, labels):
  return -np.mean(_np_log_softmax(logits)[np.arange(len(labels)), labels])


def _np_kd(s, t, temp):
  return np.mean(_numpy_reference.kd(s, t, temp))


def _np_sp(fs, ft):
  def g(f):
    q = f.reshape(f.shape[0], -1).astype(np.float64)
    m = q @ q.T
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
  b = fs.shape[0]
  return np.sum((g(ft) - g(fs)) ** 2) / b**2


def _f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# ----------------------------------------------------------------- tests

def test_composition_equals_hand_weighted_sum_and_gradient():
  teacher, t_graph, t_vars, student = _models()
  batch = toy_batch(16)
  lr = 0.5
  state = TrainState.create(student, optax.sgd(lr), rng=jax.random.key(0))
  loss = "ce:0.3,kd:0.7(temperature=2),sp:50"
  step = jax.jit(make_train_step(loss, teacher_graphdef=t_graph, axis_name=None))
  new_state, m = step(state, batch, t_vars)

  s_logits, s_feat = student(jnp.asarray(batch["image"]), train=True)
  t_logits, t_feat = teacher(jnp.asarray(batch["image"]), train=False)
  s_logits, t_logits = np.float64(s_logits), np.float64(t_logits)
  ce = _np_ce(s_logits, batch["label"])
  kd = _np_kd(s_logits, t_logits, 2.0)
  sp = _np_sp(np.asarray(s_feat["pre_pool"]), np.asarray(t_feat["pre_pool"]))
  np.testing.assert_allclose(m["loss/ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(m["loss/kd"], kd, rtol=1e-4)
  np.testing.assert_allclose(m["loss/sp"], sp, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(m["loss"], 0.3 * ce + 0.7 * kd + 50 * sp, rtol=1e-5)
  for k, w in (("ce", 0.3), ("kd", 0.7), ("sp", 50.0)):
    np.testing.assert_allclose(m[f"weight/{k}"], w, rtol=1e-6)

  # The update is -lr * grad of the hand-written sum, w.r.t. the student only.
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)

  def hand_loss(p):
    logits, feats = nnx.merge(graphdef, p, rest)(batch["image"], train=True)
    ls = jax.nn.log_softmax(logits)
    ce = -jnp.mean(ls[jnp.arange(16), batch["label"]])
    lt = jax.nn.log_softmax(t_logits.astype(np.float32) / 2.0)
    ls2 = jax.nn.log_softmax(logits / 2.0)
    kd = jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls2), -1)) * 4.0
    def g(f):
      q = f.reshape(16, -1)
      mm = q @ q.T
      return mm / jnp.maximum(jnp.linalg.norm(mm, axis=1, keepdims=True), 1e-12)
    sp = jnp.sum((g(jnp.asarray(t_feat["pre_pool"])) - g(feats["pre_pool"])) ** 2) / 256.0
    return 0.3 * ce + 0.7 * kd + 50 * sp

  grads = jax.grad(hand_loss)(params)
  expected = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_weight_warmup_is_linear():
  term, = terms_lib.parse_terms("kd:2(warmup_steps=4)")
  got = [float(term.weight_at(s)) for s in range(7)]
  np.testing.assert_allclose(got, [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0], rtol=1e-6)

  # Inside the step: the logged weight and the total follow the same line.
  _, t_graph, t_vars, student = _models()
  state = TrainState.create(student, optax.sgd(0.0), rng=jax.random.key(0))
  step = jax.jit(make_train_step("ce:1,kd:2", loss_options={"kd": {"warmup_steps": 4}},
                                 teacher_graphdef=t_graph, axis_name=None))
  batch = toy_batch(8)
  weights = []
  for _ in range(6):
    state, m = step(state, batch, t_vars)
    weights.append(float(m["weight/kd"]))
    np.testing.assert_allclose(m["loss"], m["loss/ce"] + m["weight/kd"] * m["loss/kd"], rtol=1e-5)
  np.testing.assert_allclose(weights, [0.5, 1.0, 1.5, 2.0, 2.0, 2.0], rtol=1e-6)


def test_parse_terms_and_errors():
  ts = terms_lib.parse_terms("ce:0.1, kd:0.9(temperature=4)", {"kd": {"warmup_steps": 10}})
  assert [(t.name, t.weight, t.warmup_steps, t.options) for t in ts] == [
      ("ce", 0.1, 0, ()), ("kd", 0.9, 10, (("temperature", 4),))]
  sp, = terms_lib.parse_terms("sp:3000(feature=stage1|pre_pool,all_gather=true)")
  assert dict(sp.options) == {"feature": ("stage1", "pre_pool"), "all_gather": True}
  with pytest.raises(ValueError, match=r"unknown loss term 'kdd'.*known terms: .*ce.*kd"):
    terms_lib.parse_terms("ce:1,kdd:1")
  with pytest.raises(ValueError, match=r"'kd' does not take option\(s\) \['temp'\]"):
    terms_lib.parse_terms("kd:1(temp=4)")
  with pytest.raises(ValueError, match="weight 'x' is not a number"):
    terms_lib.parse_terms("kd:x")
  with pytest.raises(ValueError, match="appears twice"):
    terms_lib.parse_terms("kd:1,kd:2")
  with pytest.raises(ValueError, match="needs a teacher"):
    make_train_step("ce:1,kd:1", teacher_graphdef=None)


def test_sp_per_device_vs_all_gather():
  n_dev = 4
  _, t_graph, t_vars, student = _models()
  batch = toy_batch(16, seed=3)
  mesh = parallel.make_mesh(n_dev)
  results = {}
  for all_gather in (False, True):
    loss = f"ce:1,sp:1(all_gather={str(all_gather).lower()})"
    state = TrainState.create(student, optax.sgd(0.0), rng=jax.random.key(0))
    step = parallel.data_parallel(make_train_step(loss, teacher_graphdef=t_graph), mesh)
    st, tv = parallel.replicate((state, t_vars), mesh)
    _, m = step(st, parallel.shard_batch(batch, mesh), tv)
    results[all_gather] = float(m["loss/sp"])

  _, s_feat = student(jnp.asarray(batch["image"]), train=True)
  teacher = nnx.merge(t_graph, t_vars["params"], t_vars["batch_stats"])
  _, t_feat = teacher(jnp.asarray(batch["image"]), train=False)
  fs, ft = np.asarray(s_feat["pre_pool"]), np.asarray(t_feat["pre_pool"])
  global_sp = _np_sp(fs, ft)
  per_device = np.mean([_np_sp(fs[i * 4:(i + 1) * 4], ft[i * 4:(i + 1) * 4]) for i in range(n_dev)])
  np.testing.assert_allclose(results[True], global_sp, rtol=1e-4)
  np.testing.assert_allclose(results[False], per_device, rtol=1e-4)
  assert abs(global_sp - per_device) > 1e-3 * abs(global_sp)


def test_all_gather_gradient_matches_single_device_global_loss():
  """With all_gather the data-parallel update equals the one-device update on the global batch."""
  n_dev = 4
  _, t_graph, t_vars, student = _models()
  batch = toy_batch(16, seed=5)
  loss = "ce:1,sp:100(all_gather=true)"
  state = TrainState.create(student, optax.sgd(0.5), rng=jax.random.key(0))
  single, _ = jax.jit(make_train_step(loss, teacher_graphdef=t_graph, axis_name=None))(
      state, batch, t_vars)
  mesh = parallel.make_mesh(n_dev)
  step = parallel.data_parallel(make_train_step(loss, teacher_graphdef=t_graph), mesh)
  st, tv = parallel.replicate((state, t_vars), mesh)
  sharded, _ = step(st, parallel.shard_batch(batch, mesh), tv)
  for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
