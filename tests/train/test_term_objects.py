"""The loss-term contract: a toy stateful term is one class, terms register on import, names can
be re-registered, a plain callable is a term, and the step freezes the teacher once."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import parallel
from kd_jax.train import LossTerm, TermContext, TrainState, make_train_step, register_term
from kd_jax.train import terms as terms_lib
from tests.train._toy import ToyNet, toy_batch


@dataclasses.dataclass(frozen=True)
class RunningMeanMatch(LossTerm):
  """A toy stateful term with its own parameter: a learned scale `a` on the student logits
  matched to the teacher's, and a (non-trained) running mean of the loss, momentum `m`.

      L = mean((a * s - t)^2),   state <- m * state + (1 - m) * L
  """

  momentum: float = 0.5

  def init(self, rng, student, teacher, *, num_data=None):
    del rng, teacher, num_data
    assert isinstance(student.logits, jax.ShapeDtypeStruct)  # shapes only
    return {"a": jnp.ones((), jnp.float32)}, {"mean": jnp.zeros((), jnp.float32)}

  def __call__(self, ctx: TermContext):
    value = jnp.mean(jnp.square(ctx.params["a"] * ctx.student.logits - ctx.teacher.logits))
    # State must agree on every replica: combine over the data-parallel axis.
    v = value if ctx.axis_name is None else jax.lax.pmean(value, ctx.axis_name)
    return value, {"mean": self.momentum * ctx.state["mean"] + (1 - self.momentum) * v}


register_term("running_mean_match")(RunningMeanMatch)


def _setup(seed=0):
  teacher = ToyNet(width=16, rngs=nnx.Rngs(1))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  student = ToyNet(width=8, rngs=nnx.Rngs(2))
  return teacher, t_graph, {"params": t_params, "batch_stats": t_rest}, student, toy_batch(
      16, seed=seed)


def test_stateful_toy_term_trains_its_parameter_and_updates_its_state():
  teacher, t_graph, t_vars, student, batch = _setup()
  lr = 0.1
  step = make_train_step("ce:1,running_mean_match:2(momentum=0.25)", teacher_graphdef=t_graph,
                         axis_name=None)
  state = TrainState.create(student, optax.sgd(lr), rng=jax.random.key(0))
  state = step.init(state, batch, t_vars)
  assert set(state.term_params) == {"running_mean_match"}
  new, metrics = jax.jit(step)(state, batch, t_vars)

  # Independent computation of the term's value, of d/da and of the state update.
  s, _ = student(batch["image"], train=True)
  t, _ = teacher(batch["image"], train=False)
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  want = np.mean((s - t) ** 2)
  np.testing.assert_allclose(metrics["loss/running_mean_match"], want, rtol=1e-5)
  grad_a = 2 * np.mean(2 * (s - t) * s)  # weight 2 times d/da mean((a s - t)^2) at a = 1
  np.testing.assert_allclose(new.term_params["running_mean_match"]["a"], 1 - lr * grad_a,
                             rtol=1e-4)
  np.testing.assert_allclose(new.term_state["running_mean_match"]["mean"], 0.75 * want,
                             rtol=1e-5)


def test_a_plain_callable_and_a_term_instance_are_losses():
  teacher, t_graph, t_vars, student, batch = _setup(1)

  def logit_mse(ctx):
    return jnp.mean(jnp.square(ctx.student.logits - ctx.teacher.logits))

  state = TrainState.create(student, optax.sgd(0.1), rng=jax.random.key(0))
  for loss in (logit_mse, [logit_mse, "ce:0.5"]):
    step = make_train_step(loss, teacher_graphdef=t_graph, axis_name=None)
    _, metrics = jax.jit(step)(state, batch, t_vars)
    s, _ = student(batch["image"], train=True)
    t, _ = teacher(batch["image"], train=False)
    np.testing.assert_allclose(metrics["loss/logit_mse"], np.mean((np.asarray(s) - np.asarray(t))
                                                                  ** 2), rtol=1e-5)
  step = make_train_step(terms_lib.build_term("kd", temperature=2.0), teacher_graphdef=t_graph,
                         axis_name=None)
  assert [t.name for t in step.terms] == ["kd"]


def test_reregistering_a_name_replaces_it_with_a_warning():
  @register_term("notebook_cell_loss", needs_teacher=False)
  def first(ctx):
    return jnp.zeros(())

  with pytest.warns(UserWarning, match="registered again"):
    @register_term("notebook_cell_loss", needs_teacher=False)
    def second(ctx, scale: float = 1.0):
      return scale * jnp.ones(())

  term, = terms_lib.parse_terms("notebook_cell_loss:1(scale=3)")
  ctx = TermContext(student=None, teacher=None, batch={}, student_params=None, axis_name=None,
                    step=jnp.zeros((), jnp.int32))
  assert float(term.term(ctx)) == 3.0


def test_every_builtin_term_is_known_right_after_importing_kd_jax_train():
  code = ("import kd_jax.train as t; "
          "t.parse_terms('ce:1,refilled_classifier:100,crd:0.8,fitnet:100,cc:0.02'); "
          "print(','.join(t.known_terms()))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": ""})
  assert {"refilled_relationship", "refilled_classifier", "crd", "fitnet", "cc", "kd", "sp",
          "dkd", "ptloss"} <= set(out.stdout.strip().split(","))


def test_bad_weights_and_options_are_refused_up_front():
  for spec, match in (("kd:-0.9", "finite and >= 0"), ("ce:nan", "finite"), ("kd:inf", "finite"),
                      ("kd:1(temperature=-1)", "temperature must be > 0"),
                      ("kd:1(temp=4)", "does not take")):
    with pytest.raises(ValueError, match=match):
      terms_lib.parse_terms(spec)
  # An inline option wins over the options mapping: the spec printed is the spec run.
  kd, = terms_lib.parse_terms("kd:0.9(temperature=1)", {"kd": {"temperature": 4.0}})
  assert kd.term.temperature == 1 and str(kd) == "kd:0.9(temperature=1)"


def test_the_step_freezes_the_teacher_once_and_losses_do_not():
  # A term that would move the teacher if its gradient were not stopped by the step.
  teacher, t_graph, t_vars, student, batch = _setup(2)
  seen = {}

  def probe(ctx):
    seen["teacher"] = ctx.teacher
    return jnp.sum(ctx.teacher.logits) + jnp.sum(ctx.teacher.features["embedding"])

  step = make_train_step(probe, teacher_graphdef=t_graph, axis_name=None)
  state = TrainState.create(student, optax.sgd(1.0), rng=jax.random.key(0))
  new, _ = jax.jit(step)(state, batch, t_vars)
  # The loss depends only on the (frozen) teacher: the student gets exactly zero gradient.
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)


def test_data_parallel_toy_stateful_term_equals_one_device():
  _, t_graph, t_vars, student, _ = _setup()
  batch = toy_batch(32, seed=5)
  spec = "ce:1,running_mean_match:1"
  state = TrainState.create(student, optax.sgd(0.1, momentum=0.9), rng=jax.random.key(0))
  state = make_train_step(spec, teacher_graphdef=t_graph, axis_name=None).init(state, batch,
                                                                               t_vars)
  single, m1 = jax.jit(make_train_step(spec, teacher_graphdef=t_graph, axis_name=None))(
      state, batch, t_vars)
  mesh = parallel.make_mesh(8)
  mapped = parallel.data_parallel(make_train_step(spec, teacher_graphdef=t_graph), mesh)
  rep_state, rep_t = parallel.replicate((state, t_vars), mesh)
  sharded, m2 = mapped(rep_state, parallel.shard_batch(batch, mesh), rep_t)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(sharded.term_params["running_mean_match"]["a"],
                             single.term_params["running_mean_match"]["a"], rtol=1e-5)
  np.testing.assert_allclose(sharded.term_state["running_mean_match"]["mean"],
                             single.term_state["running_mean_match"]["mean"], rtol=1e-5)


def test_ce_skips_transfer_rows_and_distillation_terms_use_them():
  rng = np.random.default_rng(3)
  s = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  labels = jnp.array([0, 1, 2, 3, 0, 1])
  labeled = jnp.array([True, True, True, False, False, False])
  from kd_jax.train.terms import Outputs  # pylint: disable=g-import-not-at-top
  ctx = TermContext(student=Outputs(s, {}), teacher=Outputs(t, {}),
                    batch={"label": labels, "labeled": labeled}, student_params=None,
                    axis_name=None, step=jnp.zeros((), jnp.int32))
  logp = np.asarray(jax.nn.log_softmax(s.astype(jnp.float64)))
  want_ce = -np.mean(logp[np.arange(3), np.asarray(labels)[:3]])
  np.testing.assert_allclose(terms_lib.build_term("ce")(ctx), want_ce, rtol=1e-6)
  # KD reads every row, the transfer rows included.
  pt, ps = jax.nn.softmax(t / 2.0), jax.nn.log_softmax(s / 2.0)
  want_kd = 4.0 * np.mean(np.sum(np.asarray(pt) * (np.log(np.asarray(pt)) - np.asarray(ps)), -1))
  np.testing.assert_allclose(terms_lib.build_term("kd", temperature=2.0)(ctx), want_kd,
                             rtol=1e-5)


def test_parsed_terms_take_further_options_and_term_objects_refuse_them():
  kd, = terms_lib.parse_terms(terms_lib.parse_terms("kd:0.9"), {"kd": {"temperature": 2.0}})
  assert kd.term.temperature == 2.0 and kd.weight == 0.9

  def logit_mse(ctx):
    return jnp.mean(jnp.square(ctx.student.logits - ctx.teacher.logits))

  with pytest.raises(ValueError, match="term object"):
    terms_lib.parse_terms([logit_mse], {"logit_mse": {"scale": 2.0}})
  warm, = terms_lib.parse_terms([logit_mse], {"logit_mse": {"warmup_steps": 10}})
  assert warm.warmup_steps == 10
