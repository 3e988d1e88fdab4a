"""The multi-student fit loop killed (SIGKILL) and restarted ends exactly where an uninterrupted
run ends: every leaf of every stacked state and every metric record. Two kill points: after step
7 (the last checkpoint is step 6), and inside the save of step 6 before Orbax's final rename
(the half-written step is ignored and removed, and the run resumes from step 3)."""

import json
import os

import numpy as np
import pytest

from tests import _kill
from tests.train import _multi_fit_job as job

JOB = "tests.train._multi_fit_job"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  _kill.assert_ok(_kill.run(JOB, str(workdir)))
  return workdir


def _records(workdir):
  out = []
  for line in open(workdir / "metrics.jsonl"):
    r = json.loads(line)
    r.pop("steps_per_sec", None)  # wall-clock
    out.append(r)
  return out


def _assert_same_run(workdir, reference):
  final, ref = np.load(workdir / "final.npz"), np.load(reference / "final.npz")
  assert sorted(final.files) == sorted(ref.files)
  for k in ref.files:
    np.testing.assert_allclose(final[k], ref[k], rtol=1e-6, atol=1e-6, err_msg=k)
  for m in job.METHODS:
    assert final[f"['{m}'].step"].tolist() == [job.STEPS] * len(job.SEEDS)
  # Every step logged once, with the uninterrupted run's values.
  got, want = _records(workdir), _records(reference)
  assert [r["step"] for r in got] == list(range(1, job.STEPS + 1))
  for a, b in zip(got, want, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], float):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)
      else:
        assert a[k] == b[k], k


def test_killed_after_a_step_resumes_to_the_same_students(uninterrupted, tmp_path):
  proc = _kill.run(JOB, str(tmp_path), kill=_kill.at_step("students", 7))
  _kill.assert_killed(proc)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]  # killed mid-run
  assert not (tmp_path / "final.npz").exists()
  _kill.assert_ok(_kill.run(JOB, str(tmp_path)))
  _assert_same_run(tmp_path, uninterrupted)


def test_killed_inside_a_checkpoint_save_resumes_from_the_previous_one(uninterrupted, tmp_path):
  proc = _kill.run(JOB, str(tmp_path), kill=_kill.in_save(2))  # the save of step 6
  _kill.assert_killed(proc)
  ckpts = tmp_path / "checkpoints"
  partial = [e for e in os.listdir(ckpts) if e != "3"]
  assert len(partial) == 1 and partial[0].startswith("6.orbax-checkpoint-tmp"), partial
  assert (ckpts / "3" / "kd_jax_checksums.json").exists()  # the previous one is whole
  proc = _kill.run(JOB, str(tmp_path))
  _kill.assert_ok(proc)
  assert "resumed from its checkpoint at step 3" in proc.stderr
  assert not [e for e in os.listdir(ckpts) if "tmp" in e]
  _assert_same_run(tmp_path, uninterrupted)
