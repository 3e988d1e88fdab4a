"""The loop: metrics files, and an interrupted + resumed run ends where an uninterrupted one does."""

import json
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import data
from kd_jax import parallel
from kd_jax.train import loop
from kd_jax.train.evaluate import evaluate, make_eval_step
from kd_jax.train.state import TrainState
from kd_jax.train.step import make_train_step
from tests.train._toy import ToyNet, toy_batch

STEPS = 7


def _run(workdir, hooks=()):
  arrays = toy_batch(40, seed=1)
  teacher = ToyNet(width=8, rngs=nnx.Rngs(1))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  student = ToyNet(width=4, batch_norm=True, rngs=nnx.Rngs(2))
  state = TrainState.create(student, optax.sgd(0.1, momentum=0.9), rng=jax.random.key(0))
  mesh = parallel.make_mesh(2)
  eval_step = make_eval_step(state.graphdef, mesh)

  def eval_fn(s):
    return {"split": "val", **evaluate(eval_step, parallel.replicate(s.variables(), mesh),
                                       data.eval_batches(arrays, batch_size=16), mesh=mesh)}

  return loop.fit(
      state, make_train_step("ce:1,kd:1", teacher_graphdef=t_graph),
      lambda start: data.batches(arrays, batch_size=8, seed=0, start_step=start),
      num_steps=STEPS, teacher_variables={"params": t_params, "batch_stats": t_rest},
      mesh=mesh, workdir=str(workdir), checkpoint_every=3, log_every=2, eval_every=4,
      eval_fn=eval_fn, hooks=hooks, progress=False)


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path):
  full, history = _run(tmp_path / "full")
  with pytest.raises(loop.StopTraining):
    _run(tmp_path / "cut", hooks=[loop.stop_after(5)])
  # Step 5 was reached but only step 3 was checkpointed: the restart redoes steps 4..7.
  assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["3"]
  resumed, _ = _run(tmp_path / "cut")
  assert int(resumed.step) == int(full.step) == STEPS
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  # The BN statistics and the momentum moved (so the comparison covers them).
  assert any(float(np.abs(np.asarray(x)).max()) > 0 for x in jax.tree.leaves(full.opt_state))

  # Metrics: JSON lines for train steps 2, 4, 6, 7 and evals at 4 and 7; TensorBoard events.
  records = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == [2, 4, 6, 7]
  assert [r["step"] for r in records if r["split"] == "val"] == [4, 7]
  assert {"loss", "loss/ce", "loss/kd", "weight/kd", "accuracy"} <= set(records[0])
  assert history[-1]["split"] == "val" and 0.0 <= history[-1]["accuracy"] <= 1.0
  assert history[-1]["count"] == 40
  tb = tmp_path / "full" / "tensorboard" / "train"
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))
  # A finished run restarted is a no-op that returns the final checkpoint.
  again, _ = _run(tmp_path / "full")
  for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(full.params)):
    np.testing.assert_array_equal(a, b)
