"""ReFilled's two-stage pipeline killed and restarted writes the results.json of an
uninterrupted run: killed right after the first stage-1 best model is saved (before its
best.json is written), then during stage 2 (after step 5; checkpoint 4), then finished."""

import json
import os

import pytest

from tests import _kill

REFILLED = "experiments.refilled"
TINY = ("--config=experiments/configs/refilled_digits.py:few", "--config.settings=('disjoint',)",
        "--config.seeds=(0,)", "--config.parallel=none", "--config.eval_batch_size=128",
        "--config.checkpoint_every=2", "--config.log_every=1",
        "--config.teacher.num_steps=4", "--config.teacher.options.width=4",
        "--config.student.options.width=2", "--config.stage1.num_steps=8",
        "--config.stage1.eval_every_steps=2", "--config.stage2.num_steps=8")


def _records(path):
  return [{k: v for k, v in json.loads(l).items() if k != "steps_per_sec"} for l in open(path)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("refilled_full")
  _kill.assert_ok(_kill.run(REFILLED, *TINY, f"--workdir={workdir}"))
  return workdir


@pytest.mark.slow  # ~50 s of CPU time: four runs of the experiment
def test_killed_after_the_stage1_save_and_in_stage2_restarts_to_the_same_results(
    uninterrupted, tmp_path):
  args = (*TINY, f"--workdir={tmp_path}")
  run = tmp_path / "disjoint" / "seed_0"
  # save_teacher's first call saves the teacher, its second the first stage-1 best model.
  proc = _kill.run(REFILLED, *args, kill=_kill.at_call("kd_jax.teachers:save_teacher", 2,
                                                       after=True))
  _kill.assert_killed(proc)
  assert (run / "stage1" / "best").is_dir() and not (run / "stage1" / "best.json").exists()
  assert not (run / "stage2").exists()
  proc = _kill.run(REFILLED, *args, kill=_kill.at_step("stage2", 5))
  _kill.assert_killed(proc)
  assert sorted(os.listdir(run / "stage2" / "checkpoints")) == ["2", "4"]
  assert not (run / "results.json").exists()
  _kill.assert_ok(_kill.run(REFILLED, *args))
  got, want = (json.load(open(w / "results.json")) for w in (tmp_path, uninterrupted))
  for r in (got, want):  # False here: the last start restored the teacher the first one saved
    assert r["runs"][0]["teacher"].pop("trained_here") is (r is want)
  assert got == want
  ref = uninterrupted / "disjoint" / "seed_0"
  for part in ("stage1/train", "stage2"):
    assert _records(run / part / "metrics.jsonl") == _records(ref / part / "metrics.jsonl"), part
