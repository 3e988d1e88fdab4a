"""A step that reads the teacher from a teacher-output cache equals the step that runs it."""

import jax
import numpy as np
import pytest
from flax import nnx

from kd_jax import data
from kd_jax.data import teacher_cache
from kd_jax.train import state as state_lib
from kd_jax.train import step as step_lib
from tests.train._toy import ToyNet, toy_batch

LOSS = "ce:0.1,kd:0.9(temperature=4.0),fitnet:0.5(feature=embedding,connector=false)"


def _setup():
  teacher = ToyNet(width=8, batch_norm=True, rngs=nnx.Rngs(1))
  t_graphdef, t_params, t_stats = nnx.split(teacher, nnx.Param, ...)
  t_vars = {"params": t_params, "batch_stats": t_stats}
  student = ToyNet(width=8, rngs=nnx.Rngs(2))
  state = state_lib.TrainState.create(student, state_lib.sgd(0.1, momentum=0.9),
                                      rng=jax.random.key(0))
  return t_graphdef, t_vars, state


def test_cached_step_equals_in_step_teacher(tmp_path):
  t_graphdef, t_vars, state = _setup()
  arrays = toy_batch(n=40, seed=3)

  @jax.jit
  def forward(x):
    out = step_lib.teacher_outputs(t_graphdef, t_vars, x)
    return {"logits": out.logits, "embedding": out.features["embedding"]}

  cache = teacher_cache.build(lambda b: forward(b["image"]), arrays, batch_size=16,
                              path=tmp_path / "cache")
  with_teacher = teacher_cache.attach(arrays, cache)
  assert {"teacher_logits", "teacher_embedding"} <= set(with_teacher)

  live = jax.jit(step_lib.make_train_step(LOSS, teacher_graphdef=t_graphdef, axis_name=None))
  cached = jax.jit(step_lib.make_train_step(LOSS, cached_teacher="teacher_", axis_name=None))
  live_state, cached_state = state, state
  batches = data.batches(with_teacher, batch_size=8, seed=0)
  for _, batch in zip(range(4), batches):
    plain = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    live_state, live_metrics = live(live_state, plain, t_vars)
    cached_state, cached_metrics = cached(cached_state, batch)
    for key in ("loss/kd", "loss/fitnet", "loss/ce"):
      np.testing.assert_allclose(cached_metrics[key], live_metrics[key], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               cached_state.params, live_state.params)
  assert float(live_metrics["loss/kd"]) > 0  # the teacher mattered


def test_cached_teacher_errors():
  t_graphdef, t_vars, state = _setup()
  with pytest.raises(ValueError, match="not both"):
    step_lib.make_train_step("kd", teacher_graphdef=t_graphdef, cached_teacher="teacher_")
  with pytest.raises(ValueError, match="needs a teacher"):
    step_lib.make_train_step("kd", axis_name=None)
  step = step_lib.make_train_step("ce:0.1,kd:0.9", cached_teacher="teacher_", axis_name=None)
  with pytest.raises(ValueError, match="'teacher_logits'"):
    step(state, toy_batch(n=8))
  batch = {**toy_batch(n=8), "teacher_logits": np.zeros((8, 10), np.float32)}
  with pytest.raises(ValueError, match="do not pass teacher_variables"):
    step(state, batch, t_vars)
