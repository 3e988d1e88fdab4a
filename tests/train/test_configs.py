"""Every experiment config parses, names known models and loss terms, and keeps its recipe."""

import importlib
import os

import ml_collections
import pytest

from experiments.configs import cifar100
from experiments.configs import digits as default
from kd_jax import models
from experiments import runner as experiment
from kd_jax.train import terms

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "experiments", "configs")


def _config_files():
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith("_"))


def _is_main_job_config(c):
  return all(k in c for k in ("teacher", "student", "methods", "dataset"))


def _all_configs():
  """Every config file of the main job's schema (other entry points keep their own configs)."""
  for f in _config_files():
    if f == "cifar100":
      for pair in cifar100.PAIRS:
        yield f"cifar100:{pair}", cifar100.get_config(pair)
      yield "cifar100:vgg13-vgg8:logit", cifar100.get_config("vgg13-vgg8:logit")
      yield "cifar100:ensemble", cifar100.get_config("ensemble")
      continue
    if f == "mnist1d":
      yield "mnist1d:modern", importlib.import_module(f"experiments.configs.{f}").get_config(
          "modern")
    c = importlib.import_module(f"experiments.configs.{f}").get_config()
    if _is_main_job_config(c):
      yield f, c


def test_every_config_file_parses():
  files = _config_files()
  assert {"cifar100", "digits", "mnist1d"} <= set(files)
  for f in files:
    module = importlib.import_module(f"experiments.configs.{f}")
    assert module.get_config() is not None, f


@pytest.mark.parametrize("name,config", list(_all_configs()), ids=lambda x: x
                         if isinstance(x, str) else "")
def test_config_is_valid(name, config):
  known = models.available()
  assert config.teacher.model in known and config.student.model in known, name
  for method, spec in config.methods.items():
    for term in terms.parse_terms(spec):
      assert term.name in terms.known_terms(), (name, method)
  experiment.validate(config)  # the same checks the main job runs before training
  for tname, tcfg in (experiment.teacher_configs(config) or {}).items():
    assert tcfg.model in known, (name, tname)
  for m in config.method_order:
    assert m in config.methods


@pytest.mark.parametrize("pair", list(cifar100.PAIRS))
def test_cifar100_configs_follow_the_repdistiller_recipe(pair):
  c = cifar100.get_config(pair)
  teacher, student = pair.split("-")
  assert (c.teacher.model, c.student.model) == (teacher, student)
  assert c.dataset == "cifar100" and c.batch_size == 64
  for run in (c.teacher, c.student):
    assert run.num_epochs == 240 and tuple(run.decay_epochs) == (150, 180, 210)
    assert run.decay_rate == 0.1 and run.momentum == 0.9 and run.weight_decay == 5e-4
  assert c.teacher.learning_rate == 0.05
  small = student in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
  assert c.student.learning_rate == (0.01 if small else 0.05)
  kd = {t.name: t for t in terms.parse_terms(c.methods.kd, {"kd": c.loss_options.kd})}
  assert kd["ce"].weight == 0.1 and kd["kd"].weight == 0.9
  assert dict(kd["kd"].options)["temperature"] == 4.0
  sp = {t.name: t for t in terms.parse_terms(c.methods.sp, {"sp": c.loss_options.sp})}
  assert sp["ce"].weight == 1 and sp["sp"].weight == 3000
  assert dict(sp["sp"].options)["feature"] == "pre_pool"
  assert c.loss_options.dkd.warmup_steps == 20 * (50_000 // 64)


def test_unknown_pair():
  with pytest.raises(ValueError, match="unknown pair 'resnet1-resnet2'"):
    cifar100.get_config("resnet1-resnet2")


def test_cifar100_logit_variant_follows_the_published_recipes():
  from kd_jax.train.dot_optim import is_dot  # pylint: disable=g-import-not-at-top
  c = cifar100.get_config("resnet32x4-ShuffleV2:logit")
  opts = dict(c.loss_options)
  names = lambda m: {t.name for t in terms.parse_terms(c.methods[m])}
  parse = lambda m: {t.name: t for t in terms.parse_terms(c.methods[m], {
      k: v for k, v in opts.items() if k in names(m)})}
  ls = parse("ls_kd")
  assert ls["ce"].weight == 0.1 and ls["ls_kd"].weight == 9.0
  assert dict(ls["ls_kd"].options)["temperature"] == 2.0
  dist = parse("dist")
  assert dist["ce"].weight == 1 and dist["dist"].weight == 2.0
  assert dict(dist["dist"].options) == {"beta": 1.0, "gamma": 1.0, "temperature": 4.0}
  assert c.methods.kd_dot == c.methods.kd and c.methods.dkd_dot == c.methods.dkd
  for m in ("kd_dot", "dkd_dot"):
    cfg = ml_collections.ConfigDict({**c.student.to_dict(), **dict(c.method_optimizer[m])})
    assert cfg.learning_rate == 0.01 and cfg.momentum == 0.9 and cfg.delta == 0.075
    assert is_dot(experiment._optimizer(cfg, 781))
  assert not is_dot(experiment._optimizer(c.student, 781))
  assert dict(cifar100.get_config("vgg13-vgg8:logit").loss_options.ls_kd) == {"temperature": 3.0}
  with pytest.raises(ValueError, match="unknown variant"):
    cifar100.get_config("vgg13-vgg8:new")


def test_cifar100_ensemble_variant_builds():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from kd_jax import teachers  # pylint: disable=g-import-not-at-top
  from kd_jax.train import make_multi_student_step  # pylint: disable=g-import-not-at-top
  c = cifar100.get_config("ensemble")
  assert c.to_dict() == cifar100.get_config("resnet32x4-resnet8x4:ensemble").to_dict()
  experiment.validate(c, num_classes=100)
  named = experiment.teacher_configs(c)
  assert list(named) == ["resnet32x4", "wrn_40_2"]
  assert named["resnet32x4"].to_dict() == c.teacher.to_dict()  # the pair's teacher itself
  for tcfg in named.values():  # every teacher on RepDistiller's recipe
    assert tcfg.num_epochs == 240 and tuple(tcfg.decay_epochs) == (150, 180, 210)
    assert tcfg.learning_rate == 0.05 and tcfg.weight_decay == 5e-4
  mt = experiment.method_teachers(c)
  assert mt["kd_ensemble"]["members"] == ["resnet32x4", "wrn_40_2"]
  assert mt["kd_ensemble"]["temperature"] == 4.0 and mt["kd_wrn_40_2"]["members"] == ["wrn_40_2"]
  kd = {t.name: t for t in terms.parse_terms(c.methods.kd_ensemble, {"kd": c.loss_options.kd})}
  assert kd["ce"].weight == 0.1 and kd["kd"].weight == 0.9
  # The students' program with both teachers in it, traced on abstract models and a batch of 2.
  graph = lambda name: nnx.split(nnx.eval_shape(lambda: models.create(
      name, num_classes=100, rngs=nnx.Rngs(0))), nnx.Param, ...)
  (g1, p1, r1), (g2, p2, r2) = graph("resnet32x4"), graph("wrn_40_2")
  index = {"resnet32x4": 0, "wrn_40_2": 1}
  views = {m: teachers.EnsembleOf(tuple(index[n] for n in v["members"]), v["weights"],
                                  v["combine"], v["temperature"]) for m, v in mt.items()}
  specs = dict(c.methods)
  step = make_multi_student_step(specs, teacher_graphdef=(g1, g2), method_teachers=views,
                                 axis_name=None, loss_options={m: {"kd": {"temperature": 4.0}}
                                                               for m in specs if m != "student"})
  batch = {"image": jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32),
           "label": jax.ShapeDtypeStruct((2,), np.int32)}
  out = jax.eval_shape(lambda b, v: step.method_teacher_outputs(b, v), batch,
                       ({"params": p1, "batch_stats": r1}, {"params": p2, "batch_stats": r2}))
  assert out["kd_ensemble"].logits.shape == (2, 100) and len(out["kd_ensemble"].members) == 2
  assert out["kd"].logits.shape == (2, 100) and not hasattr(out["kd"], "members")
  assert len(out["kd_wrn_40_2"].members) == 1 and set(out) == set(specs)
