"""The NaN guard: a non-finite loss or gradient stops `fit` naming the step, the batch and the
term, before that state reaches a checkpoint; `nonfinite="skip"` skips such steps and counts
them."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import data
from kd_jax.train import loop
from kd_jax.train.terms import register_term
from kd_jax.train.state import TrainState
from kd_jax.train.step import make_multi_student_step, make_train_step, stack_states
from tests.train._toy import ToyNet, toy_batch

ARRAYS = toy_batch(32, seed=3)
BAD_STEP = 5  # the 5th step (state.step == 4 inside it), batch index 4


@register_term("nan_at_4", needs_teacher=False)
def nan_at_4(ctx):
  """A term that is 0 except at state step 4, where its value is NaN."""
  return jnp.where(ctx.step == 4, jnp.nan, 0.0) * jnp.mean(ctx.student.logits)


@register_term("nan_grad_at_4", needs_teacher=False)
def nan_grad_at_4(ctx):
  """A finite value (0) whose gradient is NaN at state step 4: d sqrt(u)/du at u = 0."""
  u = jnp.where(ctx.step == 4, 0.0, 1.0) * jnp.mean(jnp.square(ctx.student.logits))
  return jnp.sqrt(u) * 0.0


def _fit(workdir, loss, *, nonfinite="stop", hooks=()):
  state = TrainState.create(ToyNet(width=4, rngs=nnx.Rngs(0)), optax.sgd(0.1),
                            rng=jax.random.key(0))
  step = make_train_step(loss, axis_name=None, nonfinite=nonfinite)
  return loop.fit(state, step,
                  lambda s: data.batches(ARRAYS, batch_size=8, seed=0, start_step=s),
                  num_steps=7, mode="none", workdir=str(workdir), checkpoint_every=2,
                  log_every=1, progress=False, hooks=hooks)


@pytest.mark.parametrize("term,detail", [
    ("nan_at_4", r"the loss of term\(s\) 'nan_at_4' \(loss/nan_at_4 = nan\) went non-finite"),
    ("nan_grad_at_4", r"every term's loss is finite .* but the gradient is not")])
def test_nonfinite_step_stops_naming_step_batch_and_term_and_keeps_the_last_checkpoint(
    tmp_path, term, detail):
  with pytest.raises(loop.NonFiniteError, match=(
      rf"at step {BAD_STEP} \(batch index {BAD_STEP - 1} of the training stream\): {detail}.*"
      r"last good checkpoint, step 4, is kept")) as e:
    _fit(tmp_path, f"ce:1,{term}:1")
  assert e.value.step == BAD_STEP and e.value.batch_index == BAD_STEP - 1
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # step 6 never saved
  # The failing step is in metrics.jsonl as strict JSON, its NaN as null.
  lines = open(tmp_path / "metrics.jsonl").read().splitlines()
  records = [json.loads(l, parse_constant=lambda c: pytest.fail(f"bare {c}")) for l in lines]
  assert records[-1]["step"] == BAD_STEP and records[-1]["finite"] == 0.0
  if term == "nan_at_4":
    assert records[-1]["loss"] is None and records[-1]["loss/nan_at_4"] is None


def test_skip_mode_leaves_the_state_unchanged_and_counts(tmp_path):
  seen = {}

  def record(step, state, metrics):
    seen[step] = (jax.device_get(state.params), float(jax.device_get(state.step)), metrics)

  with pytest.warns(UserWarning, match="non-finite steps skipped.*'skipped_steps': 1"):
    final, history = _fit(tmp_path, "ce:1,nan_at_4:1", nonfinite="skip", hooks=[record])
  for a, b in zip(jax.tree.leaves(seen[BAD_STEP - 1][0]), jax.tree.leaves(seen[BAD_STEP][0])):
    np.testing.assert_array_equal(a, b)  # the skipped step changed no parameter
  for a, b in zip(jax.tree.leaves(seen[BAD_STEP][0]), jax.tree.leaves(seen[BAD_STEP + 1][0])):
    assert not np.array_equal(a, b)  # and training went on
  assert seen[BAD_STEP][1] == BAD_STEP  # the step counter advanced (the data stay aligned)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(final.params))
  train = [h for h in history if h["split"] == "train"]
  assert [h["skipped_steps"] for h in train] == [0, 0, 0, 0, 1, 1, 1]
  assert [h["finite"] for h in train] == [1, 1, 1, 1, 0, 1, 1]


def test_multi_student_guard_names_the_method_and_student():
  arrays = toy_batch(8, seed=4)

  # The second student of method "odd" has NaN parameters.
  step = make_multi_student_step({"ce": "ce:1", "odd": "ce:1"}, axis_name=None)
  states = {}
  for m in ("ce", "odd"):
    per = [TrainState.create(ToyNet(width=4, rngs=nnx.Rngs(i)), optax.sgd(0.1),
                             rng=jax.random.key(i)) for i in range(2)]
    if m == "odd":
      per[1] = per[1].replace(params=jax.tree.map(lambda p: p * jnp.nan, per[1].params))
    states[m] = stack_states(per)
  with pytest.raises(loop.NonFiniteError, match=r"at step 1 .*method 'odd', student\(s\) \[1\]: "
                     r"the loss of term\(s\) 'ce'.*went non-finite") as e:
    loop.fit(states, step, lambda s: data.batches(arrays, batch_size=8, seed=0, start_step=s),
             num_steps=2, mode="none", log_every=5, progress=False)
  assert e.value.terms[0] == "odd/ce"


def test_bad_mode_is_refused():
  with pytest.raises(ValueError, match="nonfinite must be one of"):
    make_train_step("ce:1", axis_name=None, nonfinite="ignore")
