"""The main job end to end on digits (tiny settings), its resume, and its bad-input messages."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import digits as default
from kd_jax import models
from kd_jax import teachers
from experiments import runner as experiment
from tests import _kill

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.teacher.num_steps=40", "--config.student.num_steps=12", "--config.seeds=2",
        "--config.checkpoint_every=5", "--config.eval_every_epochs=0", "--config.progress=false",
        "--config.ptloss.num_candidates=8", "--config.log_every=5"]


def _tiny_config():
  c = default.get_config()
  c.teacher.num_steps, c.student.num_steps = 40, 12
  c.checkpoint_every, c.eval_every_epochs, c.progress = 5, 0, False
  c.ptloss.num_candidates, c.log_every = 8, 5
  c.seeds = 2
  return c


def _main(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.main",
                         "--config=experiments/configs/digits.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One uninterrupted run of the tiny main job: (its workdir, the process, results.json and
  the students' metric records as written)."""
  workdir = tmp_path_factory.mktemp("main") / "wd"
  proc = _main(f"--workdir={workdir}", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in open(workdir / "students" / "metrics.jsonl")]
  return workdir, proc, json.load(open(workdir / "results.json")), records


def test_main_job_end_to_end_and_resume(tiny_run, tmp_path):
  workdir, proc, results, _ = tiny_run
  assert list(results["methods"]) == ["student", "kd", "ptloss", "sp"]
  assert results["teacher"]["trained_here"] is True
  # 40 steps of SGD on digits: far above chance (0.1) for the teacher.
  assert results["teacher"]["test_accuracy"] > 0.5
  seeds = results["seeds"]
  assert seeds == [0, 1]
  for name, r in results["methods"].items():
    assert len(r["test_accuracy"]) == 2 and r["steps"] == 12, name
    assert all(0.0 <= a <= 1.0 for a in r["test_accuracy"]), name
  assert results["ptloss"]["selected"] and len(results["ptloss"]["epsilon"]) == 5
  # Paired differences against the student alone, recomputed by hand (t quantile, 1 dof).
  base = np.asarray(results["methods"]["student"]["test_accuracy"])
  for name in ("kd", "ptloss", "sp"):
    d = np.asarray(results["methods"][name]["test_accuracy"]) - base
    p = results["paired"][name]
    np.testing.assert_allclose(p["mean"], d.mean(), atol=1e-12)
    half = 12.706204736174707 * d.std(ddof=1) / np.sqrt(2)
    np.testing.assert_allclose(p["ci95"], [d.mean() - half, d.mean() + half], atol=1e-9)
  # The table: the teacher and every method with its mean accuracy in percent.
  for name, r in results["methods"].items():
    assert f"{100 * np.mean(r['test_accuracy']):.2f} ±" in proc.stdout
  assert f"{100 * results['teacher']['test_accuracy']:.2f}" in proc.stdout
  # Metrics and checkpoints: the teacher's run and the one run of every student.
  for run in ("teacher", "students"):
    assert os.path.exists(workdir / run / "metrics.jsonl")
    assert os.listdir(workdir / run / "tensorboard")
  assert "12" in os.listdir(workdir / "students" / "checkpoints")
  assert os.path.isdir(workdir / "teacher" / "checkpoint")
  records = [json.loads(l) for l in open(workdir / "students" / "metrics.jsonl")]
  assert {"kd/loss/ce", "kd/loss/kd", "kd/weight/kd", "kd/loss/kd/0", "kd/loss/kd/1",
          "sp/loss/sp"} <= set(records[0])

  # The whole workdir moved elsewhere, then restarted there (in-process, on the 8 simulated
  # devices): it stores relative paths, so the teacher is restored (its fingerprint and val
  # accuracy verified), every run resumes at its last checkpoint (already final), no metric
  # record is repeated, and the results agree.
  moved = tmp_path / "moved"
  shutil.copytree(workdir, moved)
  shutil.rmtree(workdir)  # nothing left at the old path to resolve to
  workdir = moved
  # A changed teacher config is refused (before anything trains), unless overwritten.
  changed = _tiny_config()
  changed.teacher.num_steps = 41
  with pytest.raises(ValueError, match=r"another configuration \(teacher.num_steps: 40 -> 41\)"):
    experiment.run(changed, str(workdir))
  again = experiment.run(_tiny_config(), str(workdir))
  assert [json.loads(l) for l in open(workdir / "students" / "metrics.jsonl")] == records
  assert results["teacher"]["checkpoint"] == "teacher/checkpoint"
  assert os.path.exists(workdir / "ptloss_selection.json")  # reused, not recomputed
  assert again["teacher"]["trained_here"] is False
  assert again["teacher"]["test_accuracy"] == results["teacher"]["test_accuracy"]
  for name, r in results["methods"].items():
    assert again["methods"][name]["test_accuracy"] == r["test_accuracy"], name


def _without_timing(records):
  return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in records]


def test_main_job_killed_twice_restarts_to_the_same_results(tiny_run, tmp_path):
  # Killed inside the teacher's save (the 9th Orbax save: teacher checkpoints at steps 5..40,
  # then teacher/checkpoint), then after student step 8 (student checkpoint 5), then finished:
  # the same results and metric records as the uninterrupted run.
  _, _, want, want_records = tiny_run
  workdir = tmp_path / "wd"
  args = ("--config=experiments/configs/digits.py", f"--workdir={workdir}", *TINY)
  proc = _kill.run("experiments.main", *args, kill=_kill.in_save(9))
  _kill.assert_killed(proc)
  assert "40" in os.listdir(workdir / "teacher" / "checkpoints")
  assert not (workdir / "teacher" / "checkpoint").exists()
  assert any(e.startswith("checkpoint.orbax-checkpoint-tmp")
             for e in os.listdir(workdir / "teacher"))
  proc = _kill.run("experiments.main", *args, kill=_kill.at_step("students", 8))
  _kill.assert_killed(proc)
  assert os.listdir(workdir / "students" / "checkpoints") == ["5"]
  assert not (workdir / "results.json").exists()
  proc = _kill.run("experiments.main", *args)
  _kill.assert_ok(proc)
  got, want = json.load(open(workdir / "results.json")), json.loads(json.dumps(want))
  for r in (got, want):  # the last start restored the teacher that the second one saved
    r["teacher"].pop("trained_here")
  assert got == want  # bit for bit: the same compiled programs on the same batches
  records = [json.loads(l) for l in open(workdir / "students" / "metrics.jsonl")]
  assert _without_timing(records) == _without_timing(want_records)
  assert not [e for e in os.listdir(workdir / "teacher") if "tmp" in e]


def test_bad_input_stops_before_training(tmp_path):
  proc = _main(f"--workdir={tmp_path / 'a'}", "--config.student.model=resnet9000")
  assert proc.returncode == 1
  assert "unknown student model name 'resnet9000'" in proc.stderr
  assert not os.path.exists(tmp_path / "a" / "teacher")

  c = _tiny_config()
  c.methods.kd = "ce:0.1,kdd:0.9"
  with pytest.raises(ValueError, match=r"method 'kd': unknown loss term 'kdd'.*known terms"):
    experiment.run(c, str(tmp_path / "b"))
  c = _tiny_config()
  c.teacher.num_classes = 5
  with pytest.raises(ValueError, match="teacher/student class mismatch.*5 classes.*10"):
    experiment.run(c, str(tmp_path / "c"))
  assert not os.path.exists(tmp_path / "b" / "teacher")
  assert not os.path.exists(tmp_path / "c" / "teacher")


def test_nan_teacher_is_refused(tmp_path):
  model = experiment.create_model("cnn_digits", num_classes=10, seed=0, width=16)
  model.fc.kernel.value = model.fc.kernel.value * np.nan
  path = teachers.save_teacher(tmp_path / "nan_teacher", model)
  c = _tiny_config()
  c.teacher.checkpoint = path
  with pytest.raises(ValueError, match="non-finite.*logits"):
    experiment.run(c, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd" / "students")


def test_default_main_job_on_mnist1d_prints_the_multi_seed_table(tmp_path, capsys):
  # The main job's default config at a tiny size: every method's seeds, the SP weight chosen on
  # validation, PTLoss's proxy calibration next to the teacher's, paired intervals.
  from experiments.configs import mnist1d  # pylint: disable=g-import-not-at-top
  c = mnist1d.get_config()
  c.data.num_samples = 600
  c.teacher.num_steps, c.student.num_steps = 30, 10
  c.seeds, c.eval_every_epochs, c.progress, c.log_every = 3, 1, False, 5
  c.checkpoint_every, c.ptloss.num_candidates = 0, 8
  results = experiment.run(c, str(tmp_path))
  assert results["seeds"] == [0, 1, 2]
  assert set(results["methods"]) == {"student", "kd", "ptloss", "sp_300", "sp_3000", "sp_30000",
                                     "sp", "refilled_1", "refilled_10", "refilled_100", "refilled"}
  refilled = results["methods"]["refilled"]
  assert refilled["selected"] == max(refilled["candidates"], key=refilled["candidates"].get)
  assert 0 <= results["teacher"]["induced_classifier_val_accuracy"] <= 1
  for r in results["methods"].values():
    assert len(r["test_accuracy"]) == 3 and len(r["val_accuracy"]) == 3
  sp = results["methods"]["sp"]
  cands = sp["candidates"]
  assert sp["selected"] == max(cands, key=cands.get)  # on validation, never test
  assert results["methods"][sp["selected"]]["test_accuracy"] == sp["test_accuracy"]
  cal = results["ptloss"]["validation"]
  assert results["ptloss"]["distance"] == "sq_l2"
  assert {"teacher", "proxy"} == set(cal) and 0 <= cal["proxy"]["ece"] <= 1
  assert set(results["paired"]) == set(results["methods"]) - {"student"}
  out = capsys.readouterr().out
  assert "(3 seeds)" in out and "vs student (paired, 95% CI)" in out
  # Distillation diagnostics (tested against float64 in tests/train/test_diagnostics.py): in
  # results.json per method and seed, printed, and in the validation metrics (JSONL and
  # TensorBoard).
  assert results["diagnostics"]["cka_features"] == {"student": "pre_pool", "teacher": "pre_pool"}
  assert 0.0 <= results["teacher"]["ece"] <= 1.0
  for name, r in results["methods"].items():
    d = r["diagnostics"]
    assert set(d) == {"agreement", "kl", "ece", "cka"}, name
    assert all(len(v) == 3 for v in d.values()), name
    assert all(0 <= a <= 1 for a in d["agreement"]) and all(k >= 0 for k in d["kl"]), name
    assert all(-1 <= c <= 1 for c in d["cka"]), name
  assert json.load(open(tmp_path / "results.json"))["methods"]["kd"]["diagnostics"] == (
      results["methods"]["kd"]["diagnostics"])
  assert "student vs teacher on test" in out and "agreement %" in out
  records = [json.loads(l) for l in open(tmp_path / "students" / "metrics.jsonl")]
  val = [r for r in records if r["split"] == "val"]
  assert val and {"kd/agreement", "kd/agreement/2", "kd/kl/0", "sp_300/cka/1", "ptloss/ece/0",
                  "teacher/ece"} <= set(val[-1])
  events = b"".join(open(os.path.join(root, f), "rb").read()
                    for root, _, files in os.walk(tmp_path / "students" / "tensorboard")
                    for f in files)
  assert b"kd/agreement" in events and b"kd/cka" in events
