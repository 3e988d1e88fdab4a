"""The HetComp experiment killed and restarted writes the results.json of an uninterrupted run:
a kill inside a teacher's Orbax save (that teacher is retrained from its seed, the finished one
reused) and a kill during a distillation (the finished teachers and the finished distillation
reused). A workdir of another split is refused in one line. Data: a generated 60 users x 150
items interaction file with quick settings."""

import json
import os

import numpy as np
import pytest

from tests import _kill

HETCOMP = "experiments.hetcomp"
# RRD is distilled first, then HetComp: killed at HetComp's 4th batch chunk (of 20 steps).
KILL_IN_HETCOMP = _kill.at_call("kd_jax.recsys.distill:BatchStream.take", 4,
                                within="kd_jax.recsys.distill:distill", within_call=2)
# The 6th Orbax save: BPR-MF's four trajectory epochs, then CML's second (epochs 1, 2, 3, 5).
KILL_IN_CML_SAVE = _kill.in_save(6)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A GroupLens u.data of 60 users in 5 taste groups over 150 items (deterministic)."""
  rng = np.random.default_rng(0)
  users, items, groups = 60, 150, 5
  group, block = rng.integers(0, groups, users), np.arange(items) % groups
  lines = []
  for u in range(users):
    p = np.where(block == group[u], 8.0, 1.0) / (1 + np.arange(items)) ** 0.3
    for i in rng.choice(items, size=rng.integers(20, 36), replace=False, p=p / p.sum()):
      lines.append(f"{u + 1}\t{i + 1}\t{rng.integers(1, 6)}\t{880000000 + len(lines)}")
  path = tmp_path_factory.mktemp("ml")
  (path / "u.data").write_text("\n".join(lines) + "\n")
  return path


def _args(data_dir, workdir, out):
  return (f"--config.data_dir={data_dir}", "--config.quick=True", "--config.trajectory=epochs",
          "--config.debias=False", "--config.methods=hetcomp,rrd", f"--workdir={workdir}",
          f"--config.out={out}")


def _results(out):
  blob = json.load(open(os.path.join(out, "results.json")))
  assert blob.pop("seconds") > 0  # wall-clock: the one field that may differ
  return blob


@pytest.mark.slow  # ~50 s of CPU time: five starts of the experiment
def test_killed_in_a_teacher_save_and_in_a_distillation_restarts_to_the_same_results(
    data_dir, tmp_path):
  full = tmp_path / "full_out"
  _kill.assert_ok(_kill.run(HETCOMP, *_args(data_dir, tmp_path / "full", full)))
  want = _results(full)
  assert {r["method"] for r in want["records"]} >= {"HetComp", "RRD on the converged ensemble"}

  work, out = tmp_path / "work", tmp_path / "out"
  args = _args(data_dir, work, out)
  seed0 = work / "seed0"
  proc = _kill.run(HETCOMP, *args, kill=KILL_IN_CML_SAVE)
  _kill.assert_killed(proc)
  assert (seed0 / "mf" / "trajectory.json").exists()
  assert not (seed0 / "cml" / "trajectory.json").exists()
  assert any("orbax-checkpoint-tmp" in e for e in os.listdir(seed0 / "cml"))  # mid-save

  proc = _kill.run(HETCOMP, *args, kill=KILL_IN_HETCOMP)
  _kill.assert_killed(proc)
  assert "seed 0: mf epoch 1/4 " not in proc.stderr  # reused (the student alone is 1/8)
  assert "seed 0: cml epoch 1/5 " in proc.stderr  # retrained
  assert not [e for e in os.listdir(seed0 / "cml") if "tmp" in e]
  for name in ("mf", "cml", "neumf", "lightgcn", "uae", "iae", "student"):
    assert (seed0 / name / "trajectory.json").exists(), name
  done = sorted(os.listdir(seed0 / "distill"))
  assert len(done) == 1 and done[0].startswith("rrd-"), done  # HetComp was cut short
  assert not (out / "results.json").exists()

  proc = _kill.run(HETCOMP, *args)
  _kill.assert_ok(proc)
  assert "epoch" not in proc.stderr and "RRD on the converged ensemble: step" not in proc.stderr
  assert _results(out) == want

  # Another split in the same workdir: refused in one line naming the teacher and the field.
  proc = _kill.run(HETCOMP, *args[:-1], f"--config.out={tmp_path / 'other'}",
                   "--config.split_seed=1")
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: workdir holds teacher 'mf'") and "split:" in last, last
  assert "Traceback" not in proc.stderr
