"""Teacher ensembles in the main job: `config.teachers` trained or restored like the teacher, and
methods of `config.method_teachers` distilling their ensembles in the students' program. An
ensemble of one is the single-teacher KD run; an ensemble of two is the weighted mean of the two
softmaxes at T, checked in numpy; bad ensemble configs are refused in one line."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import runner as experiment
from experiments.configs import digits
from kd_jax import teachers
from tests._numpy_reference import log_softmax as _np_log_softmax

T = 4.0


def _config(teacher_checkpoint=""):
  c = digits.get_config()
  c.num_devices = 1
  c.teacher.checkpoint = str(teacher_checkpoint)  # restored (an untrained CNN: fast)
  c.teacher.num_steps = 10
  c.student.num_steps = 3
  c.student.model, c.student.options = "mlp_digits", {"hidden": (16, 8)}  # compiles fast
  c.seeds, c.checkpoint_every, c.eval_every_epochs, c.progress, c.log_every = 2, 0, 0, False, 1
  c.methods = {"kd": "ce:0.1,kd:0.9", "kd_one": "ce:0.1,kd:0.9", "kd_two": "ce:0.1,kd:0.9"}
  c.method_order = ("kd", "kd_one", "kd_two")
  c.compare = ()
  mlp = c.teacher.to_dict()
  mlp.update(model="mlp_digits", options={"hidden": (32, 16)}, learning_rate=0.1, checkpoint="")
  # "same" is config.teacher itself (equal config: one checkpoint, one forward per batch).
  c.teachers = {"same": c.teacher.to_dict(), "mlp": mlp}
  c.method_teachers = {"kd_one": {"members": ("same",)},
                       "kd_two": {"members": ("same", "mlp"), "weights": (1.0, 3.0)}}
  return c


def test_ensembles_in_the_main_job(tmp_path):
  cnn_path = teachers.save_teacher(
      tmp_path / "cnn", experiment.create_model("cnn_digits", num_classes=10, seed=7, width=16),
      model_name="cnn_digits", num_classes=10, model_options={"width": 16})
  c = _config(cnn_path)
  wd = str(tmp_path / "wd")
  results = experiment.run(c, wd)
  tmp_path = tmp_path / "wd"
  assert results["teachers"]["same"]["same_as"] == "teacher"
  assert results["teachers"]["mlp"]["trained_here"] is True
  assert os.path.isdir(tmp_path / "teachers" / "mlp" / "checkpoint")
  assert not os.path.exists(tmp_path / "teachers" / "same")  # config.teacher's checkpoint
  assert results["teacher"]["trained_here"] is False
  assert results["method_teachers"]["kd_two"]["temperature"] == T  # the kd term's
  assert 0 <= results["method_teachers"]["kd_two"]["test_accuracy"] <= 1

  # An ensemble of one: the single-teacher KD students, loss by loss and parameter by parameter.
  records = [json.loads(l) for l in open(tmp_path / "students" / "metrics.jsonl")]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3]
  for r in train:
    for i in (0, 1):
      np.testing.assert_allclose(r[f"kd_one/loss/kd/{i}"], r[f"kd/loss/kd/{i}"], atol=1e-6)
      np.testing.assert_allclose(r[f"kd_one/loss/{i}"], r[f"kd/loss/{i}"], atol=1e-6)
  assert results["methods"]["kd_one"]["test_accuracy"] == results["methods"]["kd"]["test_accuracy"]
  # The finished run resumed (teachers restored and checked, students from their checkpoint).
  runner = experiment.Runner(c, wd)
  teacher, trained = experiment._teacher(runner, c)
  assert not trained
  pool, views, _ = experiment._ensemble_teachers(runner, c, teacher)
  assert len(pool) == 2 and views["kd_one"].members == (0,) and views["kd_two"].members == (0, 1)
  specs = dict(c.methods)
  states, _ = experiment.fit_students(runner, c, specs, {"kd": {"temperature": T}}, teacher,
                                      [0, 1], pool=pool, views=views)
  for a, b in zip(jax.tree.leaves(states["kd_one"].params), jax.tree.leaves(states["kd"].params),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(states["kd_two"].params)[0],
                         jax.tree.leaves(states["kd"].params)[0])

  # An ensemble of two at step 1: T^2 KL(0.25 softmax(t1 / T) + 0.75 softmax(t2 / T) || the
  # initial student at T), in float64 numpy from the restored teachers' and student's logits.
  batch = next(iter(runner.data.train(0)))
  x = jax.numpy.asarray(batch["image"])
  cnn = teachers.restore_teacher(cnn_path, "cnn_digits", num_classes=10, width=16)
  mlp = teachers.restore_teacher(tmp_path / results["teachers"]["mlp"]["checkpoint"],
                                 "mlp_digits", num_classes=10, hidden=(32, 16))
  t1, t2 = (np.float64(t(x)[0]) for t in (cnn, mlp))
  for i, seed in enumerate((0, 1)):
    student = experiment.create_model("mlp_digits", num_classes=10, seed=seed, hidden=(16, 8))
    s = np.float64(student(x, train=True)[0])
    p = 0.25 * np.exp(_np_log_softmax(t1 / T)) + 0.75 * np.exp(_np_log_softmax(t2 / T))
    kd = T**2 * np.mean(np.sum(p * (np.log(p) - _np_log_softmax(s / T)), -1))
    np.testing.assert_allclose(train[0][f"kd_two/loss/kd/{i}"], kd, rtol=1e-5, atol=1e-6)
    single = T**2 * np.mean(np.sum(np.exp(_np_log_softmax(t1 / T)) * (
        _np_log_softmax(t1 / T) - _np_log_softmax(s / T)), -1))
    np.testing.assert_allclose(train[0][f"kd/loss/kd/{i}"], single, rtol=1e-5, atol=1e-6)
  assert "kd_two distils same + mlp (probs, T = 4, weights 1/3)" in experiment._table(results)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.teachers.mlp.update(num_classes=5),
     r"config.teachers predict different numbers of classes: mlp \(mlp_digits\) 5, same "
     r"\(cnn_digits\) 10\.$"),
    (lambda c: setattr(c, "teachers", {}), "config.teachers is empty"),
    (lambda c: (c.__delitem__("teachers"), setattr(c, "teachers", ())),
     "config.teachers is empty"),
    (lambda c: c.method_teachers.kd_two.update(members=("same", "big")),
     r"members: \['big'\] not in config.teachers \(mlp, same\)"),
    (lambda c: c.method_teachers.kd_two.update(temperature=2.0),
     "temperature 2 differs from the kd term's 4"),
    (lambda c: c.method_teachers.kd_two.update(weights=(1.0,)), "one finite weight >= 0 per"),
    (lambda c: c.teachers.mlp.update(model="mlp9000"),
     r"unknown model name 'mlp9000' in config.teachers\['mlp'\]"),
])
def test_bad_ensemble_configs_are_one_line_errors(change, message):
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(_config().to_dict())
  change(c)
  with pytest.raises(experiment.ConfigError, match=message) as e:
    experiment.validate(c, num_classes=10)
  assert "\n" not in str(e.value)


def test_method_teachers_without_teachers_is_refused():
  c = _config()
  del c["teachers"]
  with pytest.raises(experiment.ConfigError, match="needs config.teachers"):
    experiment.validate(c)


def test_teachers_as_a_list_are_named_by_position():
  c = _config()
  same, mlp = c.teachers.same.to_dict(), c.teachers.mlp.to_dict()
  del c["teachers"]
  c.teachers = (same, mlp)
  c.method_teachers = {"kd_two": {"members": (0, 1)}}
  experiment.validate(c, num_classes=10)
  assert list(experiment.teacher_configs(c)) == ["0", "1"]
  assert experiment.method_teachers(c)["kd_two"]["members"] == ["0", "1"]
