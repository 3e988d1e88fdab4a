"""Distillation diagnostics of `kd_jax.train.evaluate`: agreement, KL at T = 1, ECE of both models
and minibatch linear CKA, each against a float64 numpy restatement or a hand-computed value."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax import models
from kd_jax import parallel
from kd_jax.train.evaluate import (_centred_gram, _confidence_bins, _ece,
                                   evaluate_distillation, hsic_unbiased,
                                   make_distill_eval_step)

BATCH, BINS = 64, 15


def _variables(model):
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return {"params": params, "batch_stats": rest}


def _numpy_model(name, seed, kernel_scale, **options):
  """`name` with deterministic numpy weights (no random initialiser to compile): kernels
  ~ N(0, kernel_scale^2 / fan_in), biases ~ N(0, 0.1^2), batch-norm scale/var 1, mean 0."""
  model = nnx.eval_shape(lambda: models.create(name, num_classes=10, **options))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    shape, leaf = var.shape, str(path[-1])
    if leaf == "kernel":
      value = kernel_scale * rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif leaf in ("scale", "var"):
      value = np.ones(shape)
    elif leaf == "mean":
      value = np.zeros(shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    var.value = jnp.asarray(value, var.dtype)
  return model


@pytest.fixture(scope="module")
def setting():
  rng = np.random.default_rng(0)
  n = 200
  images = rng.standard_normal((n, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, n).astype(np.int32)
  batches = []
  for start in range(0, n, BATCH):  # fixed-size batches, the last one padded (as eval_batches)
    idx = np.arange(start, min(start + BATCH, n))
    pad = BATCH - len(idx)
    batches.append({"image": np.concatenate([images[idx], np.zeros((pad, 8, 8, 1), np.float32)]),
                    "label": np.concatenate([labels[idx], np.zeros(pad, np.int32)]),
                    "mask": np.arange(BATCH) < len(idx)})
  assert batches[-1]["mask"].sum() == 8  # padding is exercised
  # Scaled kernels give logits sharp enough for the confidences to spread over the bins.
  teacher = _numpy_model("cnn_digits", 1, 2.0, width=4)
  student = _numpy_model("mlp_digits", 2, 2.0)
  return teacher, student, batches


def _outputs(model, batches, feature):
  fwd = jax.jit(lambda m, x: m(x, train=False))
  out = [jax.device_get(fwd(model, jnp.asarray(b["image"]))) for b in batches]
  return [np.asarray(o[0], np.float64) for o in out], [np.asarray(o[1][feature], np.float64)
                                                       for o in out]


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _ece_reference(probs, labels, num_bins):
  conf, pred = probs.max(-1), probs.argmax(-1)
  total = 0.0
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
    if inside.any():
      total += inside.sum() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
  return total / len(conf)


def _hsic_brute(k, l):
  """The U-statistic HSIC_1 is: the mean over ordered distinct (i, j, q, r) of
  k_ij l_ij + k_ij l_qr - 2 k_ij l_iq (Song et al. 2012)."""
  n = len(k)
  terms = [k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
           for i, j, q, r in itertools.permutations(range(n), 4)]
  return float(np.mean(terms))


def _hsic_reference(x, y):
  """float64 HSIC_1 by Song et al.'s closed form on uncentred linear Grams."""
  n = len(x)
  k, l = x @ x.T, y @ y.T
  np.fill_diagonal(k, 0.0)
  np.fill_diagonal(l, 0.0)
  one = np.ones(n)
  return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
          - 2.0 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))


def test_hsic_is_the_u_statistic_with_padding_and_centring():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((7, 5)) + 3.0  # far from centred: the estimator ignores the mean
  y = 0.5 * x[:, :4] + rng.standard_normal((7, 4)) - 2.0
  want = _hsic_brute(x @ x.T, y @ y.T)
  np.testing.assert_allclose(_hsic_reference(x, y), want, rtol=1e-10)
  # Two padding rows (zero in the Gram) and n = 7 valid: the same value.
  valid = jnp.asarray([1, 1, 0, 1, 1, 1, 1, 0, 1], jnp.float32)
  xp, yp = (np.insert(a, [2, 6], 99.0, axis=0) for a in (x, y))  # rows 2 and 7 of 9
  k = _centred_gram(jnp.asarray(xp, jnp.float32), valid)
  l = _centred_gram(jnp.asarray(yp, jnp.float32), valid)
  np.testing.assert_allclose(float(hsic_unbiased(k, l, jnp.sum(valid))), want, rtol=1e-4)
  # Fewer than 4 examples: undefined, contributes 0.
  assert float(hsic_unbiased(k[:3, :3], l[:3, :3], 3.0)) == 0.0


def test_ece_hand_computed():
  # Four examples, 2 bins: confidences 0.9 (right) and 0.8 (wrong) in (0.5, 1], 0.5 (wrong) and
  # 0.4 (right) in (0, 0.5]. ECE = (|1 - (0.9 + 0.8)| + |1 - (0.5 + 0.4)|) / 4 = 0.8 / 4 = 0.2.
  probs = jnp.asarray([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])
  correct = jnp.asarray([1.0, 0.0, 0.0, 1.0])
  bins = jax.device_get(_confidence_bins(probs, correct, jnp.ones(4), 2))
  np.testing.assert_allclose(bins["count"], [2, 2])
  assert _ece(bins, 4.0) == pytest.approx(0.2, abs=1e-7)


def _reference(teacher, student, batches):
  s_logits, s_feats = _outputs(student, batches, "pre_pool")
  t_logits, t_feats = _outputs(teacher, batches, "pre_pool")
  masks = [b["mask"] for b in batches]
  labels = np.concatenate([b["label"][m] for b, m in zip(batches, masks)])
  s = np.concatenate([a[m] for a, m in zip(s_logits, masks)])
  t = np.concatenate([a[m] for a, m in zip(t_logits, masks)])
  ps, pt = _softmax(s), _softmax(t)
  hsic = np.zeros(3)
  for fs, ft, m in zip(s_feats, t_feats, masks):
    x, y = fs[m].reshape(m.sum(), -1), ft[m].reshape(m.sum(), -1)
    hsic += [_hsic_reference(x, y), _hsic_reference(x, x), _hsic_reference(y, y)]
  return {"accuracy": np.mean(s.argmax(-1) == labels),
          "teacher_accuracy": np.mean(t.argmax(-1) == labels),
          "agreement": np.mean(s.argmax(-1) == t.argmax(-1)),
          "kl": np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1)),
          "ece": _ece_reference(ps, labels, BINS), "teacher_ece": _ece_reference(pt, labels, BINS),
          "cka": hsic[0] / np.sqrt(hsic[1] * hsic[2]), "count": len(labels)}


def test_diagnostics_match_float64_on_one_device_and_on_a_mesh(setting):
  teacher, student, batches = setting
  want = _reference(teacher, student, batches)
  s_vars, t_vars = _variables(student), _variables(teacher)
  got = evaluate_distillation(
      make_distill_eval_step(nnx.graphdef(student), nnx.graphdef(teacher), num_bins=BINS),
      s_vars, t_vars, batches)
  assert got["count"] == want["count"]
  assert 0.02 < want["ece"] and 0.02 < want["teacher_ece"] and 0.05 < want["kl"]  # non-trivial
  assert 0.05 < want["cka"] < 0.99
  for key in ("accuracy", "teacher_accuracy", "agreement"):
    assert got[key] == pytest.approx(want[key], abs=1e-12), key
  for key in ("kl", "ece", "teacher_ece", "cka"):
    assert got[key] == pytest.approx(want[key], rel=2e-4, abs=1e-6), key
  # 8 devices: sums are psum-med and the CKA's Grams span the all-gathered global batch.
  mesh = parallel.make_mesh(8)
  on_mesh = evaluate_distillation(
      make_distill_eval_step(nnx.graphdef(student), nnx.graphdef(teacher), mesh,
                                num_bins=BINS),
      parallel.replicate(s_vars, mesh), parallel.replicate(t_vars, mesh), batches, mesh=mesh)
  for key, value in got.items():
    assert on_mesh[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_student_equal_to_its_teacher(setting):
  teacher, _, batches = setting
  t_vars = _variables(teacher)
  got = evaluate_distillation(
      make_distill_eval_step(nnx.graphdef(teacher), nnx.graphdef(teacher), num_bins=BINS),
      t_vars, t_vars, batches)
  assert got["agreement"] == 1.0 and got["accuracy"] == got["teacher_accuracy"]
  assert abs(got["kl"]) < 1e-6 and got["ece"] == got["teacher_ece"]
  assert got["cka"] == pytest.approx(1.0, abs=1e-5)


def test_unknown_feature_is_named(setting):
  teacher, student, batches = setting
  step = make_distill_eval_step(nnx.graphdef(student), nnx.graphdef(teacher),
                                   student_feature="stage9")
  with pytest.raises(ValueError, match=r"the student has no feature 'stage9'.*'pre_pool'"):
    evaluate_distillation(step, _variables(student), _variables(teacher), batches[:1])
  no_cka = evaluate_distillation(
      make_distill_eval_step(nnx.graphdef(student), nnx.graphdef(teacher),
                                student_feature=None),
      _variables(student), _variables(teacher), batches[:1])
  assert "cka" not in no_cka and "agreement" in no_cka
