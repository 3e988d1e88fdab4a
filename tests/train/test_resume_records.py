"""Resuming never duplicates metric records and keeps the whole run's history (so the best
validation accuracy survives a restart); metrics.jsonl is strict JSON."""

import collections
import json

import jax
import optax
import pytest
from flax import nnx

from kd_jax import data
from kd_jax.train import loop
from kd_jax.train.state import TrainState
from kd_jax.train.step import make_train_step
from tests.train._toy import ToyNet, toy_batch

ARRAYS = toy_batch(32, seed=5)
_EVALS = iter(range(1000))


STEP = make_train_step("ce:1", axis_name=None)  # one compiled program for every run here


def _fit(workdir, hooks=()):
  state = TrainState.create(ToyNet(width=4, rngs=nnx.Rngs(0)), optax.sgd(0.1),
                            rng=jax.random.key(0))
  # A fake evaluation whose value falls over time: the best one is the first.
  eval_fn = lambda s: {"split": "val", "accuracy": 1.0 / (2 + next(_EVALS))}  # noqa: E731
  return loop.fit(state, STEP,
                  lambda s: data.batches(ARRAYS, batch_size=8, seed=0, start_step=s),
                  num_steps=8, mode="none", workdir=str(workdir), checkpoint_every=3,
                  log_every=1, eval_every=2, eval_fn=eval_fn, progress=False, hooks=hooks)


def _records(workdir):
  return [json.loads(l, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
          for l in open(workdir / "metrics.jsonl")]


def test_resume_drops_replayed_records_and_keeps_the_history(tmp_path):
  with pytest.raises(loop.StopTraining):
    _fit(tmp_path, hooks=[loop.stop_after(5)])  # checkpoint at 3; steps 4, 5 and eval 4 written
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"run": "train", "split": "train", "st')  # a line torn by a kill
  _, history = _fit(tmp_path)
  records = _records(tmp_path)
  count = collections.Counter((r["split"], r["step"]) for r in records)
  assert all(n == 1 for n in count.values()), count
  assert sorted(s for sp, s in count if sp == "train") == list(range(1, 9))
  assert sorted(s for sp, s in count if sp == "val") == [2, 4, 6, 8]
  # The history is the whole run's, the first (best) evaluation included.
  vals = [h for h in history if h["split"] == "val"]
  assert [h["step"] for h in vals] == [2, 4, 6, 8]
  assert vals[0]["accuracy"] == max(h["accuracy"] for h in vals)
  # A finished run restarted writes nothing and returns the same history.
  _, again = _fit(tmp_path)
  assert _records(tmp_path) == records
  assert [h for h in again if h["split"] == "val"] == vals


def test_corrupt_metrics_file_is_named(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"run": "train"}\nnot json\n{"run": "train"}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON record"):
    _fit(tmp_path)
