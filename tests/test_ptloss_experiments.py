"""PTLoss experiments: the digits study's parts by hand formulas; both pipelines end to end."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ptloss_digits
from experiments import ptloss_glue
from experiments.configs import ptloss_digits as digits_config
from experiments.configs import ptloss_glue as glue_config


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_student_loss_family_matches_kd_smoothing_and_ptloss():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(4, 5)).astype(np.float32) * 3
  t = rng.normal(size=(4, 5)).astype(np.float32) * 3
  zero = np.zeros((5, 2), np.float32)
  # KD: T^2 KL(softmax(t/T) || softmax(s/T)), numpy float64.
  T = 3.0
  pt, ps = _softmax(t / T), _softmax(s / T)
  kd = T**2 * (pt * (np.log(pt) - np.log(ps))).sum(-1)
  got = ptloss_digits.student_loss(s, t, temperature=T, smoothing=0.0, epsilon=zero)
  np.testing.assert_allclose(got, kd, rtol=1e-5)
  # Smoothing: KL((1-a) p^t + a/K || p^s), whose gradient is the smoothed-target CE's.
  a = 0.3
  target = (1 - a) * _softmax(t) + a / 5
  kl = (target * (np.log(target) - np.log(_softmax(s)))).sum(-1)
  got = ptloss_digits.student_loss(s, t, temperature=1.0, smoothing=a, epsilon=zero)
  np.testing.assert_allclose(got, kl, rtol=1e-5)
  grad = jax.grad(lambda z: ptloss_digits.student_loss(
      z, t, temperature=1.0, smoothing=a, epsilon=zero).sum())(s)
  np.testing.assert_allclose(grad, _softmax(s) - target, atol=1e-5)
  # PTLoss at T = 1: KL + sum_k p^t_k sum_m eps_km (1 - p^s_k)^m.
  eps = rng.uniform(-0.3, 0.3, size=(5, 2))
  u = 1 - _softmax(s)
  pt = _softmax(t)
  pert = (pt * (eps[:, 0] * u + eps[:, 1] * u**2)).sum(-1)
  kl1 = (pt * (np.log(pt) - np.log(_softmax(s)))).sum(-1)
  got = ptloss_digits.student_loss(s, t, temperature=1.0, smoothing=0.0,
                                   epsilon=eps.astype(np.float32))
  np.testing.assert_allclose(got, kl1 + pert, rtol=1e-5, atol=1e-6)


def test_corrupt_labels_and_ece_by_hand():
  labels = np.arange(1000) % 10
  noisy = ptloss_digits.corrupt_labels(labels, 0.4, 10, seed=0)
  # 400 redrawn uniformly: about 90% of them change.
  assert 300 < np.sum(noisy != labels) <= 400
  np.testing.assert_array_equal(ptloss_digits.corrupt_labels(labels, 0.0, 10, 0), labels)
  with pytest.raises(ValueError, match="noise rate"):
    ptloss_digits.corrupt_labels(labels, 1.5, 10, 0)
  # Two bins used: conf 0.9 (2 right of 2) and conf 0.6 (0 right of 2) -> (0.1 + 0.6) / 2.
  probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
  labels = np.array([0, 0, 1, 0])
  np.testing.assert_allclose(ptloss_digits.expected_calibration_error(probs, labels, 10),
                             0.5 * 0.1 + 0.5 * 0.6)


def test_digits_experiment_tiny_end_to_end():
  c = digits_config.get_config()
  c.num_seeds = 2
  c.progress = False
  c.teacher.num_steps = 30
  c.teacher.options = {"hidden": (32, 32)}
  c.student.num_epochs = 2
  c.student.options = {"hidden": (16, 16)}
  c.kd_temperatures = (1.0,)
  c.smoothing_weights = (0.1, 0.4)
  c.ptloss.num_candidates = 16
  c.ptloss.per_class_row = False
  # 1 + 2 + 7 tuning/correlation students = 5 methods x 2 seeds: one compiled program for both.
  c.correlation.num_candidates = 7
  res = ptloss_digits.run(c)
  m = res["methods"]
  assert set(ptloss_digits.METHODS) >= set(m) >= {"kd_t1", "kd_tuned", "label_smoothing",
                                                  "ptloss_selected", "ptloss_random"}
  # Same seeds, T = 1 is the only grid point: the tuned KD students are the T = 1 ones.
  assert res["methods"]["kd_tuned"]["test_accuracy"] == res["methods"]["kd_t1"]["test_accuracy"]
  for r in m.values():
    assert len(r["test_accuracy"]) == 2 and 0.0 <= r["mean"] <= 1.0
  sel = res["selection"]
  assert sel["score"] <= sel["score_vanilla_teacher"]
  assert 0.0 <= res["teacher"]["test_ece"] <= 1.0
  corr = res["correlation"]
  assert len(corr["score"]) == len(corr["test_accuracy"]) <= 7
  assert -1.0 <= corr["spearman"] <= 1.0
  assert "ptloss_selected" in ptloss_digits.format_table(res)


@pytest.fixture
def mock_tfds(tfds_mock_data):
  tfds_mock_data(16)


def test_glue_experiment_on_mock_data(mock_tfds):
  c = glue_config.get_config()
  c.task = "rte"
  c.progress = False
  c.vocab_size, c.max_len = 64, 16
  c.batch_size, c.eval_batch_size = 4, 8
  c.teacher.options = {"width": 16, "depth": 1, "num_heads": 2}
  c.student.options = {"width": 8, "depth": 1, "num_heads": 2}
  c.teacher.num_steps = c.student.num_steps = 3
  c.ptloss.num_candidates = 4
  c.methods = ("ptloss",)  # "kd" is the same program with epsilon = 0
  res = ptloss_glue.run(c)
  assert res["teacher"]["test"]["count"] == 16
  assert res["selection"]["dev_examples"] == 16
  assert set(res["students"]) == {"ptloss"}
  np.testing.assert_array_equal(res["students"]["ptloss"]["epsilon"], res["selection"]["epsilon"])
  for r in res["students"].values():
    assert r["test"]["count"] == 16 and np.isfinite(r["last_train_metrics"]["loss"])
  assert "ptloss" in ptloss_glue.format_table(res)


TINY_DIGITS = ["--config.num_seeds=2", "--config.progress=false", "--config.teacher.num_steps=30",
               "--config.student.num_epochs=2", "--config.kd_temperatures=(1.0,)",
               "--config.smoothing_weights=(0.1,0.4)", "--config.ptloss.num_candidates=16",
               "--config.ptloss.per_class_row=false", "--config.correlation.num_candidates=7"]


def test_digits_experiment_rerun_after_a_kill_gives_the_same_output(tmp_path):
  from tests import _kill  # pylint: disable=g-import-not-at-top

  def output(path):
    blob = json.load(open(path))
    assert blob.pop("seconds") > 0  # wall-clock: the one field that may differ
    return blob

  ref = tmp_path / "ref.json"
  _kill.assert_ok(_kill.run("experiments.ptloss_digits", f"--out={ref}", *TINY_DIGITS))
  out = tmp_path / "out.json"
  out.write_text('{"previous": "run"}')
  # Killed mid-run (PTLoss's coefficient selection), then inside the write of --out, after the
  # temporary file is complete and before the rename: the previous file is intact both times.
  for kill in (_kill.at_call("kd_jax.ptloss:select_coefficients", 1),
               _kill.at_call("os:fsync", 1, after=True)):
    proc = _kill.run("experiments.ptloss_digits", f"--out={out}", *TINY_DIGITS, kill=kill)
    _kill.assert_killed(proc)
    assert json.load(open(out)) == {"previous": "run"}
  assert json.load(open(str(out) + ".tmp"))["methods"]  # the kill landed inside the write
  _kill.assert_ok(_kill.run("experiments.ptloss_digits", f"--out={out}", *TINY_DIGITS))
  assert output(out) == output(ref)
  assert not os.path.exists(str(out) + ".tmp")
