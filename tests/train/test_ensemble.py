"""Teacher ensembles in the step: an ensemble of one is the single-teacher step, an ensemble of
two equals the hand-written combination, per-teacher terms, and restoring members from Orbax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import models
from kd_jax import teachers
from kd_jax.train.state import TrainState
from kd_jax.train.step import make_train_step, teacher_outputs
from tests.train._toy import ToyNet, toy_batch


def _split(model):
  g, p, r = nnx.split(model, nnx.Param, ...)
  return g, {"params": p, "batch_stats": r}


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_sp(fs, ft):
  def g(f):
    q = f.reshape(f.shape[0], -1).astype(np.float64)
    m = q @ q.T
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
  return np.sum((g(ft) - g(fs)) ** 2) / fs.shape[0] ** 2


TEACHERS = [ToyNet(width=16, rngs=nnx.Rngs(1)), ToyNet(width=12, rngs=nnx.Rngs(5))]


def test_an_ensemble_of_one_is_the_single_teacher_step():
  g, v = _split(TEACHERS[0])
  frozen = teachers.freeze(TEACHERS[0])
  ens = teachers.ensemble([frozen], combine="probs", temperature=4.0)
  student = ToyNet(width=8, rngs=nnx.Rngs(2))
  state = TrainState.create(student, optax.sgd(0.3, momentum=0.9), rng=jax.random.key(0))
  single = jax.jit(make_train_step("ce:0.1,kd:0.9(temperature=4),sp:10", teacher_graphdef=g,
                                   axis_name=None))
  one = jax.jit(make_train_step("ce:0.1,kd:0.9(temperature=4),sp:10(teacher_feature=0/pre_pool)",
                                teacher_graphdef=ens.graphdef, axis_name=None))
  a, b = state, state
  for seed in (0, 1):
    a, ma = single(a, toy_batch(16, seed=seed), v)
    b, mb = one(b, toy_batch(16, seed=seed), ens.variables)
  for k in ("loss/ce", "loss/kd", "loss/sp"):
    np.testing.assert_allclose(mb[k], ma[k], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(b.params), jax.tree.leaves(a.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_an_ensemble_of_two_equals_the_hand_written_combination():
  (g1, v1), (g2, v2) = _split(TEACHERS[0]), _split(TEACHERS[1])
  ens = teachers.Ensemble((g1, g2), weights=(3.0, 7.0), combine="probs", temperature=4.0)
  student = ToyNet(width=8, rngs=nnx.Rngs(2))
  lr = 0.5
  state = TrainState.create(student, optax.sgd(lr), rng=jax.random.key(0))
  step = jax.jit(make_train_step("ce:0.1,kd:0.9(temperature=4)", teacher_graphdef=ens,
                                 axis_name=None))
  batch = toy_batch(16, seed=3)
  new, m = step(state, batch, (v1, v2))

  x = jnp.asarray(batch["image"])
  t1, t2 = (np.float64(t(x, train=False)[0]) for t in TEACHERS)
  p_bar = 0.3 * np.exp(_np_log_softmax(t1 / 4)) + 0.7 * np.exp(_np_log_softmax(t2 / 4))
  s = np.float64(student(x, train=True)[0])
  kd = 16.0 * np.mean(np.sum(p_bar * (np.log(p_bar) - _np_log_softmax(s / 4)), -1))
  np.testing.assert_allclose(m["loss/kd"], kd, rtol=1e-5)

  # The update: -lr * gradient of the hand-written loss with the mixed teacher distribution.
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)
  target = jnp.asarray(p_bar, jnp.float32)

  def hand(p):
    z = nnx.merge(graphdef, p, rest)(x, train=True)[0]
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), batch["label"][:, None], 1))
    ls = jax.nn.log_softmax(z / 4)
    return 0.1 * ce + 0.9 * 16.0 * jnp.mean(jnp.sum(target * (jnp.log(target) - ls), -1))

  grads = jax.grad(hand)(params)
  for got, p0, gr in zip(jax.tree.leaves(new.params), jax.tree.leaves(params),
                         jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, p0 - lr * gr, rtol=1e-4, atol=1e-6)

  # "logits": the weighted mean of the logits, here read back through the teacher outputs.
  lens = teachers.Ensemble((g1, g2), weights=(3.0, 7.0), combine="logits")
  np.testing.assert_allclose(teacher_outputs(lens, (v1, v2), x).logits, 0.3 * t1 + 0.7 * t2,
                             rtol=1e-5, atol=1e-5)


def test_per_teacher_terms_average_each_members_term():
  (g1, v1), (g2, v2) = _split(TEACHERS[0]), _split(TEACHERS[1])
  ens = teachers.Ensemble((g1, g2), weights=(0.25, 0.75), combine="per_teacher")
  student = ToyNet(width=8, rngs=nnx.Rngs(2))
  state = TrainState.create(student, optax.sgd(0.1), rng=jax.random.key(0))
  step = make_train_step("kd:1(temperature=2),sp:10", teacher_graphdef=ens, axis_name=None)
  batch = toy_batch(16, seed=4)
  _, m = jax.jit(step)(state, batch, (v1, v2))
  x = jnp.asarray(batch["image"])
  s, fs = student(x, train=True)
  kd, sp = 0.0, 0.0
  for w, t in zip((0.25, 0.75), TEACHERS):
    tl, tf = t(x, train=False)
    lt, ls = _np_log_softmax(np.float64(tl) / 2), _np_log_softmax(np.float64(s) / 2)
    kd += w * 4.0 * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))
    sp += w * _np_sp(np.asarray(fs["pre_pool"]), np.asarray(tf["pre_pool"]))
  np.testing.assert_allclose(m["loss/kd"], kd, rtol=1e-5)
  np.testing.assert_allclose(m["loss/sp"], sp, rtol=1e-4)
  with pytest.raises(ValueError, match="per teacher"):
    make_train_step("ce:1,fitnet:1", teacher_graphdef=ens, axis_name=None)


def _random_model(name, seed, **options):
  """A registered model with random weights (abstract init, no compiled initialiser)."""
  abstract = nnx.eval_shape(lambda: models.create(name, num_classes=10, rngs=nnx.Rngs(0),
                                                  **options))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  rng = np.random.default_rng(seed)
  fill = lambda lo, hi: (lambda s: jnp.asarray(rng.uniform(lo, hi, size=s.shape), s.dtype))
  return nnx.merge(graphdef, jax.tree.map(fill(-0.5, 0.5), params),
                   jax.tree.map(fill(0.5, 1.5), rest))  # BN variances stay positive


def test_restore_ensemble_of_two_architectures_from_orbax(tmp_path):
  cnn, mlp = _random_model("cnn_digits", 3), _random_model("mlp_digits", 4, hidden=(16, 8))
  teachers.save_teacher(tmp_path / "cnn", cnn)
  teachers.save_teacher(tmp_path / "mlp", mlp)
  ens = teachers.restore_ensemble([(tmp_path / "cnn", "cnn_digits"),
                                   (tmp_path / "mlp", "mlp_digits", {"hidden": (16, 8)})],
                                  num_classes=10, weights=(1, 3), temperature=2.0)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  got = jax.jit(lambda v, x: teacher_outputs(ens.graphdef, v, x))(ens.variables, x)
  z1, z2 = (np.float64(z) for z in jax.jit(
      lambda x: [m(x, train=False)[0] for m in (cnn, mlp)])(x))
  p = 0.25 * np.exp(_np_log_softmax(z1 / 2)) + 0.75 * np.exp(_np_log_softmax(z2 / 2))
  np.testing.assert_allclose(jax.nn.softmax(got.logits / 2), p, rtol=1e-5, atol=1e-7)
  assert set(got.features) >= {"0/pre_pool", "1/embedding"} and len(got.members) == 2
  with pytest.raises(ValueError, match="members but 1"):
    teacher_outputs(ens.graphdef, ens.variables[:1], x)
  other = teachers.FrozenTeacher(ens.members[0].graphdef, ens.members[0].variables, "five", 5)
  with pytest.raises(ValueError, match="different numbers of classes"):
    teachers.ensemble([ens.members[0], other])
  with pytest.raises(ValueError, match="weights"):
    teachers.Ensemble(ens.graphdef.graphdefs, weights=(1.0,))


def test_multi_student_step_over_a_pool_of_teachers():
  from kd_jax.train import make_multi_student_step, stack_states  # pylint: disable=g-import-not-at-top
  (g1, v1), (g2, v2) = _split(TEACHERS[0]), _split(TEACHERS[1])
  spec = "ce:0.1,kd:0.9(temperature=4)"
  methods = {"kd": spec, "kd_b": spec, "kd_one": spec, "kd_two": spec}
  views = {"kd_b": 1, "kd_one": teachers.EnsembleOf((0,), temperature=4.0),
           "kd_two": teachers.EnsembleOf((0, 1), weights=(1, 3), temperature=4.0)}
  multi = jax.jit(make_multi_student_step(methods, teacher_graphdef=(g1, g2), axis_name=None,
                                          method_teachers=views))
  student = ToyNet(width=8, rngs=nnx.Rngs(2))
  state = TrainState.create(student, optax.sgd(0.3, momentum=0.9), rng=jax.random.key(0))
  states = {m: stack_states([state]) for m in methods}
  alone = jax.jit(make_train_step(spec, teacher_graphdef=g2, axis_name=None))
  b_alone = state
  for seed in (0, 1):
    batch = toy_batch(16, seed=seed)
    if seed == 0:
      x = jnp.asarray(batch["image"])
      t1, t2 = (np.float64(t(x, train=False)[0]) for t in TEACHERS)
      s = np.float64(student(x, train=True)[0])
      p = 0.25 * np.exp(_np_log_softmax(t1 / 4)) + 0.75 * np.exp(_np_log_softmax(t2 / 4))
      want = 16.0 * np.mean(np.sum(p * (np.log(p) - _np_log_softmax(s / 4)), -1))
    states, m = multi(states, batch, (v1, v2))
    b_alone, _ = alone(b_alone, batch, v2)
    if seed == 0:
      np.testing.assert_allclose(m["kd_two/loss/kd"][0], want, rtol=1e-5)
    np.testing.assert_allclose(m["kd_one/loss/kd"], m["kd/loss/kd"], atol=1e-6)
  for name, ref in (("kd_one", states["kd"].params), ("kd_b", stack_states([b_alone]).params)):
    for x, y in zip(jax.tree.leaves(states[name].params), jax.tree.leaves(ref), strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="not in the pool of 2 teachers"):
    make_multi_student_step(methods, teacher_graphdef=(g1, g2), axis_name=None,
                            method_teachers={"kd": teachers.EnsembleOf((0, 2))})
  with pytest.raises(ValueError, match="needs a pool of teachers"):
    make_multi_student_step(methods, teacher_graphdef=g1, axis_name=None,
                            method_teachers={"kd": 0})
  with pytest.raises(ValueError, match="pass a tuple of as many"):
    multi(states, toy_batch(16), (v1,))
