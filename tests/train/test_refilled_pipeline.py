"""ReFilled's two-stage pipeline end to end on a tiny digits setting, and its stage-2 objective."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax import models
from kd_jax import teachers
from kd_jax.data import class_splits
from experiments import refilled_pipeline as refilled
from kd_jax.train import terms as terms_lib
from kd_jax.models import create_compiled as create_model
from kd_jax.train.state import TrainState, sgd
from kd_jax.train.step import apply_model, make_train_step


def _tiny_config():
  config = importlib.import_module("experiments.configs.refilled_digits").get_config()
  config.parallel = "none"
  config.batch_size = 32
  config.eval_batch_size = 128
  config.log_every = 1000
  for cfg in (config.teacher, config.stage1, config.stage2):
    cfg.num_steps = 4
  config.teacher.options = {"width": 4}
  config.student.options = {"width": 2}
  config.stage1.eval_every_steps = 2
  return config


class _SpyData(refilled.TaskData):
  """Records, in order, every stream the pipeline opens."""

  def __init__(self, *args, **kwargs):
    self.log = []
    super().__init__(*args, **kwargs)

  def train(self, role, start_step=0):
    self.log.append(("train", role, "train"))
    return super().train(role, start_step)

  def eval(self, role, split):
    self.log.append(("eval", role, split))
    return super().eval(role, split)


def test_pipeline_selects_on_val_and_reads_test_last(tmp_path):
  config = _tiny_config()
  setting = class_splits.digits_settings()["disjoint"]
  data = _SpyData(config, setting, seed=0)
  out = refilled.run_setting(config, setting, str(tmp_path), seed=0, data=data)

  log = data.log
  test_reads = [i for i, e in enumerate(log) if e[2] == "test"]
  train_reads = [i for i, e in enumerate(log) if e[0] == "train"]
  assert test_reads and min(test_reads) > max(train_reads)  # test only in the final evaluation
  # Teacher, stage 1, and stage 2 (every lambda and the baseline in one program) streamed their
  # training data.
  assert [e[1] for e in log if e[0] == "train"] == ["teacher", "student", "student"]
  # Stage-1 selection: NCM evaluations on val (centres from train) at steps 2 and 4, before any
  # test read; the selected step is the best of them.
  first_test = min(test_reads)
  ncm_vals = [i for i, e in enumerate(log) if e == ("eval", "student", "val") and i < first_test]
  assert len(ncm_vals) >= 2
  with open(tmp_path / "stage1" / "train" / "metrics.jsonl") as f:
    vals = [json.loads(l) for l in f if '"val"' in l]
  assert [v["step"] for v in vals] == [2, 4]
  best = max(vals, key=lambda v: v["ncm_accuracy"])
  assert out["stage1"]["selected_step"] == best["step"]
  assert out["stage1"]["val_ncm_accuracy"] == pytest.approx(best["ncm_accuracy"])

  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved["setting"] == "disjoint" and saved["student_classes"] == [5, 6, 7, 8, 9]
  for key in ("refilled", "student_alone"):
    assert 0.0 <= saved[key]["test_accuracy"] <= 1.0
  # One stage-2 student per lambda; lambda is chosen on validation accuracy (ties: the smaller),
  # the control is lambda = 0 (CE from the stage-1 start).
  stage2 = saved["stage2"]
  assert set(stage2) == {"lambda_0", "lambda_1", "lambda_10", "lambda_100", "student_alone"}
  assert stage2["lambda_100"]["loss"] == "ce:1,refilled_classifier:100"
  assert stage2["lambda_0"]["loss"] == "ce:1" and saved["control"] == stage2["lambda_0"]
  grid = [m for m in stage2 if m.startswith("lambda_")]
  best = max(grid, key=lambda m: (stage2[m]["val_accuracy"], -stage2[m]["lambda"]))
  assert saved["refilled"]["selected"] == best
  assert saved["refilled"]["test_accuracy"] == stage2[best]["test_accuracy"]
  assert 0.0 <= saved["teacher"]["induced_classifier_val_accuracy"] <= 1.0
  summary = refilled.summarize([saved, {**saved, "seed": 1}])
  assert summary["disjoint"]["refilled"]["std"] == 0.0
  assert summary["disjoint"]["paired"]["refilled - control"]["n"] == 2
  assert "disjoint" in refilled.table(summary)


def test_stage2_grid_needs_the_control_and_valid_lambdas():
  config = _tiny_config()
  config.stage2.lambdas = (1.0, 100.0)
  with pytest.raises(ValueError, match="must include 0"):
    refilled.stage2_specs(config.stage2)
  config.stage2.lambdas = (0.0, -1.0)
  with pytest.raises(ValueError, match="finite and >= 0"):
    refilled.stage2_specs(config.stage2)
  config.stage2.lambdas = (0.0, 2.5)
  assert refilled.stage2_specs(config.stage2) == {
      "lambda_0": "ce:1", "lambda_2.5": "ce:1,refilled_classifier:2.5", "student_alone": "ce:1"}


def _np_stage2(s_logits, t_embed, labels, centers, lam, tau):
  """CE + lam * mean KL(softmax_{C_B}(<t, c>/tau) || softmax_{C_B}(z_S/tau)), float64."""
  z = s_logits.astype(np.float64)
  lse = np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1)) + z.max(1)
  ce = np.mean(lse - z[np.arange(len(labels)), labels])
  present = sorted(set(labels.tolist()))
  zt = t_embed.astype(np.float64) @ centers.astype(np.float64).T
  kls = []
  for i in range(len(labels)):
    a = zt[i, present] / tau
    b = z[i, present] / tau
    p = np.exp(a - a.max()); p /= p.sum()
    q = np.exp(b - b.max()); q /= q.sum()
    kls.append(np.sum(p * (np.log(p) - np.log(q))))
  return ce + lam * np.mean(kls)


def test_stage2_loss_is_ce_plus_lambda_classifier():
  rng = np.random.default_rng(0)
  n, classes = 24, 4
  x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  labels = np.array([0, 1, 3] * 8, np.int32)  # class 2 absent from the batch
  teacher_model = create_model("cnn_digits", num_classes=7, seed=1, width=4)
  frozen = teachers.freeze(teacher_model, model_name="cnn_digits", num_classes=7)
  t_embed = jax.jit(lambda v, x: teachers.FrozenTeacher(frozen.graphdef, v, "", 7)(x)[1][
      "embedding"])
  # Global centres over a "training set": numpy sums of the teacher's eval embeddings, normalised.
  train_x = rng.normal(size=(40, 8, 8, 1)).astype(np.float32)
  train_y = np.arange(40, dtype=np.int32) % classes
  emb = np.asarray(t_embed(frozen.variables, train_x), np.float64)
  sums = np.stack([emb[train_y == c].sum(0) for c in range(classes)])
  centers_np = sums / np.linalg.norm(sums, axis=1, keepdims=True)
  batches = [{"image": train_x[:32], "label": train_y[:32], "mask": np.ones(32, bool)},
             {"image": np.concatenate([train_x[32:], np.zeros_like(train_x[:24])]),
              "label": np.concatenate([train_y[32:], np.zeros(24, np.int32)]),
              "mask": np.arange(32) < 8}]
  centers = refilled.embedding_class_centers(frozen.graphdef, frozen.variables, batches, classes)
  np.testing.assert_allclose(np.asarray(centers), centers_np, rtol=1e-5, atol=1e-6)

  teacher = refilled.with_class_centers(frozen, centers)
  student = create_model("cnn_digits", num_classes=classes, seed=2, width=2)
  state = TrainState.create(student, sgd(0.0), rng=jax.random.key(0))
  step = make_train_step("ce:1,refilled_classifier:100", teacher_graphdef=teacher.graphdef,
                         loss_options={"refilled_classifier": {"temperature": 2.0}},
                         axis_name=None)
  batch = {"image": jnp.asarray(x), "label": jnp.asarray(labels)}
  _, metrics = jax.jit(step)(state, batch, teacher.variables)

  s_logits = jax.jit(lambda p, b, x: apply_model(state.graphdef, p, b, x, train=True)[0].logits)(
      state.params, state.batch_stats, x)
  t_emb = np.asarray(t_embed(frozen.variables, x))
  want = _np_stage2(np.asarray(s_logits), t_emb, labels, centers_np, 100.0, 2.0)
  assert float(metrics["loss"]) == pytest.approx(want, rel=1e-4, abs=1e-5)
  assert float(metrics["loss/refilled_classifier"]) > 0.0


def test_classifier_term_needs_centres_and_validates():
  student = models.create("cnn_digits", num_classes=3, rngs=nnx.Rngs(0), width=2)
  teacher = teachers.freeze(models.create("cnn_digits", num_classes=5, rngs=nnx.Rngs(1),
                                          width=2))
  state = TrainState.create(student, sgd(0.1), rng=jax.random.key(0))
  step = make_train_step("ce:1,refilled_classifier:100", teacher_graphdef=teacher.graphdef,
                         axis_name=None)
  batch = {"image": jnp.zeros((4, 8, 8, 1)), "label": jnp.array([0, 1, 2, 0])}
  with pytest.raises(ValueError, match="with_class_centers"):
    step(state, batch, teacher.variables)
  # A bad option is refused when the spec is parsed, before anything runs.
  with pytest.raises(ValueError, match="centers must be 'global' or 'local'"):
    make_train_step("refilled_classifier:1(centers=nearby)", teacher_graphdef=teacher.graphdef,
                    axis_name=None)
  with pytest.raises(ValueError, match=r"\[num_classes, d\]"):
    refilled.with_class_centers(teacher, jnp.zeros((3,)))


def test_settings_and_bad_names():
  config = _tiny_config()
  assert set(refilled.settings(config)) == {"same", "overlap", "disjoint"}
  config.settings = ("sideways",)
  with pytest.raises(ValueError, match="sideways"):
    refilled.run(config, os.devnull)


@pytest.mark.parametrize("name,arg", [("refilled_digits", None), ("refilled_cifar100", None),
                                      ("refilled_cifar100", "wrn_16_1"),
                                      ("refilled_cifar100", "wrn_40_1"),
                                      ("refilled_cub", None), ("refilled_cub", "0.25")])
def test_configs_parse_and_name_known_models_terms_and_settings(name, arg):
  module = importlib.import_module(f"experiments.configs.{name}")
  config = module.get_config(arg) if arg else module.get_config()
  known = models.available()
  assert config.teacher.model in known and config.student.model in known
  specs = [config.stage1.loss] + list(refilled.stage2_specs(config.stage2).values())
  for spec in specs:
    present = {t.name for t in terms_lib.parse_terms(spec)}
    parsed = terms_lib.parse_terms(spec, {k: v for k, v in dict(config.stage2.loss_options).items()
                                          if k in present})
    assert {t.name for t in parsed} <= set(terms_lib.known_terms())
  assert 0.0 in config.stage2.lambdas and 100.0 in config.stage2.lambdas  # control, official
  presets = refilled.settings(config)
  assert set(config.settings) <= set(presets)
  # The generalized settings keep the student's task fixed and vary the teacher's.
  assert (presets["same"].student_classes == presets["overlap"].student_classes ==
          presets["disjoint"].student_classes)
  assert not set(presets["disjoint"].teacher_classes) & set(presets["disjoint"].student_classes)
  if name != "refilled_digits":  # the published recipe
    assert config.batch_size == 128
    for stage in (config.teacher, config.stage1, config.stage2):
      assert stage.num_epochs == 200 and stage.learning_rate == 0.1 and stage.nesterov
      assert stage.weight_decay == 5e-4 and stage.momentum == 0.9
    assert config.stage1.schedule == "cosine" and config.stage1.final_lr_factor == 0.1
    assert tuple(config.stage2.decay_epochs) == (100, 140, 180)
    assert config.stage2.decay_rate == 0.2
    assert config.stage2.loss_options.refilled_classifier.temperature == 2.0


def test_mobilenet_v1_parameter_count():
  # Keras `MobileNet(alpha=1.0, weights=None)` summary: 4,231,976 trainable parameters
  # (conv/BN scale-bias/classifier, BN running statistics excluded).
  model = nnx.eval_shape(lambda: models.create("mobilenet_v1", num_classes=1000,
                                               rngs=nnx.Rngs(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 4_231_976
  out = nnx.eval_shape(lambda m: m(jnp.zeros((1, 224, 224, 3)), train=False),
                       models.create("mobilenet_v1", num_classes=200, rngs=nnx.Rngs(0),
                                     width_multiplier=0.25))
  assert out[0].shape == (1, 200) and out[1]["embedding"].shape == (1, 256)
  assert out[1]["pre_pool"].shape == (1, 7, 7, 256)


def test_classifier_term_leaves_out_rows_without_a_label():
  # Transfer-set rows (batch["labeled"] False) carry no label: the term reads only the labelled
  # rows, so its value equals the value on the labelled rows alone (a BN-free MLP, so the other
  # rows cannot reach the logits of these).
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 40, 1)).astype(np.float32)
  labels = np.array([0, 1, 2, 1, 0, 2, 1, 1, 0, 2, 2, 0], np.int32)
  labeled = np.arange(12) < 6
  frozen = teachers.freeze(create_model("mlp_mnist1d", num_classes=3, seed=1, hidden=8),
                           model_name="mlp_mnist1d", num_classes=3)
  teacher = refilled.with_class_centers(frozen, rng.normal(size=(3, 8)).astype(np.float32))
  state = TrainState.create(create_model("mlp_mnist1d", num_classes=3, seed=2, hidden=8),
                            sgd(0.0), rng=jax.random.key(0))
  step = jax.jit(make_train_step("refilled_classifier:1", teacher_graphdef=teacher.graphdef,
                                 axis_name=None))
  _, with_rest = step(state, {"image": x, "label": labels, "labeled": labeled}, teacher.variables)
  _, alone = step(state, {"image": x[:6], "label": labels[:6]}, teacher.variables)
  assert float(with_rest["loss"]) == pytest.approx(float(alone["loss"]), rel=1e-4)
  flipped = labels.copy()
  flipped[6:] = 0  # what the unlabelled rows' labels say cannot matter
  _, other = step(state, {"image": x, "label": flipped, "labeled": labeled}, teacher.variables)
  assert float(other["loss"]) == float(with_rest["loss"])
