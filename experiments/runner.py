"""The shared experiment runner: teacher, then the same student under each method, from a config.

`run(config, workdir)` is what `python -m experiments.main` executes (configs in
`experiments/configs/`); `Runner` (mesh, dataset, evaluation, fitting with resumable
checkpoints) is shared with the other entry points. In order:

1. Validate everything that can be checked without training: model names, every method's loss
   spec, the teacher/student class counts, the global batch versus the device count.
2. Teacher: restore it from its Orbax checkpoint (`config.teacher.checkpoint`, default
   `<workdir>/teacher/checkpoint`) if present, otherwise train it with cross-entropy and save it.
   Its outputs are checked (finite, right class count) before any student step. The same for
   every teacher of `config.teachers` (named teacher configs, default checkpoint
   `<workdir>/teachers/<name>/checkpoint`), which the methods of `config.method_teachers`
   distil as an ensemble (`kd_jax.teachers.EnsembleOf`: the weighted mean of the members'
   softmaxes at temperature T); all teachers run in the students' program.
3. PTLoss coefficients: selected on the validation split with `kd_jax.ptloss.select_coefficients`
   (or a fixed `config.ptloss.epsilon`).
4. Students: for every method in `config.methods` (name -> loss spec) and every seed in
   `config.seeds`, the student initialised from that seed, all trained in one program with one
   teacher forward per batch (`kd_jax.train.make_multi_student_step`), resumable from
   `<workdir>/students/checkpoints`. Every student sees the same batches.
5. Test accuracy per method and seed, the mean +- std, and each method's paired difference from
   `config.baseline` ("student") with its 95 % t-interval over seeds are printed as a table and
   written to `<workdir>/results.json`, with each student's distillation diagnostics against
   the teacher (`config.diagnostics`; top-1 agreement, KL at T = 1, ECE of student and teacher,
   linear CKA of two feature maps), which the validation evaluations during training also
   write to the metrics.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from experiments import _cli
from experiments import precision
from kd_jax import data as data_lib
from kd_jax import models
from kd_jax import parallel
from kd_jax import teachers
from kd_jax.data.mixing import Mixing
from kd_jax.teachers import ENSEMBLE_COMBINE, EnsembleOf
from kd_jax import workdir as workdir_lib
from kd_jax.models import create_compiled as create_model
from kd_jax.train import loop
from kd_jax.train import terms as terms_lib
from kd_jax.train.dot_optim import dot
from kd_jax.train.evaluate import evaluate, evaluate_distillation, make_distill_eval_step
from kd_jax.train.evaluate import make_eval_step, predict_logits
from kd_jax.train.state import TrainState, sgd, step_decay_schedule
from kd_jax.train.step import make_multi_student_step, make_train_step, stack_states
from kd_jax.train.step import unstack_state


# ---------------------------------------------------------------------------- data

class Dataset:
  """Train / val / test streams of the configured dataset (digits or MNIST-1D offline, or CIFAR
  via TFDS). MNIST-1D reads `config.data.num_samples`, `.seed` (generation) and `.split_seed`."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.name = config.dataset
    self.batch_size = int(config.batch_size)
    self.eval_batch_size = int(config.get("eval_batch_size", 256))
    self.seed = int(config.seed)
    self._transfer = None
    if self.name in ("digits", "mnist1d"):
      dcfg = config.get("data", None) or ml_collections.ConfigDict()
      if self.name == "digits":
        splits = data_lib.load_digits(seed=self.seed)
      else:
        splits = data_lib.load_mnist1d(num_samples=int(dcfg.get("num_samples", 5000)),
                                       seed=int(dcfg.get("seed", 0)),
                                       split_seed=int(dcfg.get("split_seed", 0)))
        transfer = int(dcfg.get("transfer_samples", 0) or 0)
        if transfer:  # unlabelled inputs for the distillation terms (a transfer set)
          self._transfer = data_lib.mnist1d_transfer_set(
              splits, num_samples=transfer, seed=int(dcfg.get("transfer_seed", 1)))
          self._transfer_batch = int(dcfg.get("transfer_batch_size", self.batch_size))
      self.num_classes = splits.num_classes
      self.normalization = {"dataset": self.name, "mean": np.asarray(splits.mean).tolist(),
                            "std": np.asarray(splits.std).tolist()}
      self._splits = {"train": splits.train, "val": splits.val, "test": splits.test}
      self._teacher_train = splits.train
      per_class = int(dcfg.get("labels_per_class", 0) or 0)
      if per_class:  # few labels: the students' labelled set is a class-balanced subset
        keep = data_lib.balanced_subset(splits.train["label"], per_class,
                               seed=int(dcfg.get("subset_seed", 0)))
        rest = np.setdiff1d(np.arange(len(splits.train["label"])), keep)
        self._splits["train"] = {k: v[keep] for k, v in splits.train.items()}
        if dcfg.get("transfer_rest", False):  # the other training inputs, without labels
          if self._transfer is not None:
            raise ValueError("config.data: transfer_rest and transfer_samples are exclusive.")
          self._transfer = {"image": splits.train["image"][rest],
                            "label": splits.train["label"][rest],
                            "labeled": np.zeros(rest.shape, bool)}
          self._transfer_batch = int(dcfg.get("transfer_batch_size", self.batch_size))
      for split, arrays in self._splits.items():  # empty splits, NaN inputs, bad labels
        data_lib.check_split(arrays, split=split, num_classes=self.num_classes)
      if self._transfer is not None:
        data_lib.check_split(self._transfer, split="transfer", label_key=None)
      self.num_train = len(self._splits["train"]["label"])
      self.num_teacher_train = len(splits.train["label"])
      self.image_shape = tuple(splits.train["image"].shape[1:])
    elif self.name in data_lib.CIFAR_NUM_CLASSES:
      self.num_classes = data_lib.CIFAR_NUM_CLASSES[self.name]
      from kd_jax.data import augment  # pylint: disable=g-import-not-at-top
      mean, std = augment.CIFAR_STATS[self.name]
      self.normalization = {"dataset": self.name, "mean": list(mean), "std": list(std)}
      self.data_dir = config.get("data_dir") or None
      self._sources = {
          "train": data_lib.tfds_source(self.name, config.get("train_split", "train"),
                                        data_dir=self.data_dir),
          "val": data_lib.tfds_source(self.name, config.get("val_split", "test"),
                                      data_dir=self.data_dir),
          "test": data_lib.tfds_source(self.name, "test", data_dir=self.data_dir)}
      self.num_train = self.num_teacher_train = len(self._sources["train"])
      self.image_shape = (32, 32, 3)  # the CIFAR pipeline's output (kd_jax.data.cifar)
    else:
      raise ValueError(f"unknown dataset {self.name!r}; expected 'digits', 'mnist1d' or one of "
                       f"{sorted(data_lib.CIFAR_NUM_CLASSES)}.")
    self.steps_per_epoch = data_lib.steps_per_epoch(self.num_train, self.batch_size)
    self.teacher_steps_per_epoch = data_lib.steps_per_epoch(self.num_teacher_train,
                                                            self.batch_size)

  def train(self, start_step: int = 0, *, with_index: bool = False, transfer: bool = False,
            teacher: bool = False):
    """The training stream from `start_step`; `with_index` adds each example's "index" (CRD).

    `teacher`: the teacher's training split (all of it; the students' labelled split is a subset
    of it when `config.data.labels_per_class` > 0).

    `transfer`: with a transfer set (`config.data.transfer_samples`), every batch is the same
    labelled batch as without it, followed by `transfer_batch_size` transfer rows; "labeled"
    tells them apart (CE reads only the labelled rows, so CE-only students train exactly as
    without the transfer set).
    """
    shards = dict(num_shards=jax.process_count(), shard_index=jax.process_index())
    if self.name in ("digits", "mnist1d"):
      arrays = self._teacher_train if teacher else self._splits["train"]
      if with_index:
        arrays = {**arrays, "index": np.arange(self.num_train, dtype=np.int32)}
      stream = data_lib.batches(arrays, batch_size=self.batch_size, seed=self.seed,
                                start_step=start_step, **shards)
      if not transfer or self._transfer is None:
        return stream
      if with_index:
        raise ValueError("a transfer set cannot be combined with terms that read dataset "
                         "indices (crd).")
      extra = data_lib.batches(self._transfer, batch_size=self._transfer_batch,
                               seed=self.seed + 1, start_step=start_step, **shards)
      return ({k: np.concatenate([dict(a, labeled=np.ones(a["label"].shape, bool))[k], b[k]])
               for k in ("image", "label", "labeled")} for a, b in zip(stream, extra))
    return data_lib.cifar(self.name, batch_size=self.batch_size, seed=self.seed, train=True,
                          start_step=start_step, source=self._sources["train"],
                          with_index=with_index, **shards)

  def eval(self, split: str):
    if self.name in ("digits", "mnist1d"):
      return data_lib.eval_batches(self._splits[split], batch_size=self.eval_batch_size)
    return data_lib.cifar(self.name, batch_size=self.eval_batch_size, train=False,
                          source=self._sources[split])


# ---------------------------------------------------------------------------- validation

class ConfigError(ValueError):
  """A config that cannot run, found before anything trains (one line, naming the key)."""


def _term_options(spec: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """The entries of `config.loss_options` (shared by all methods) for the terms `spec` has."""
  present = {t.name for t in terms_lib.parse_terms(spec)}
  return {k: v for k, v in options.items() if k in present}


def teacher_configs(config) -> dict[str, ml_collections.ConfigDict] | None:
  """`config.teachers` as {name: teacher config}; None when the config has no such key.

  `config.teachers` is a mapping name -> teacher config (the keys of `config.teacher`) or a
  tuple / list of teacher configs, named "0", "1", ... by position.
  """
  raw = config.get("teachers", None)
  if raw is None:
    return None
  if isinstance(raw, (tuple, list)):
    items = [(str(i), t) for i, t in enumerate(raw)]
  elif isinstance(raw, Mapping) or hasattr(raw, "items"):
    items = [(str(k), t) for k, t in raw.items()]
  else:
    raise ConfigError(f"config.teachers must be a mapping name -> teacher config or a list of "
                      f"teacher configs, got {type(raw).__name__}.")
  if not items:
    raise ConfigError("config.teachers is empty: an ensemble needs at least one teacher config.")
  out = {}
  for name, t in items:
    if not (isinstance(t, Mapping) or hasattr(t, "items")) or "model" not in t:
      raise ConfigError(f"config.teachers[{name!r}] must be a teacher config with a 'model' "
                        "key (the keys of config.teacher).")
    out[name] = ml_collections.ConfigDict(t.to_dict() if hasattr(t, "to_dict") else dict(t))
  return out


def method_teachers(config) -> dict[str, dict[str, Any]]:
  """`config.method_teachers` checked: {method: {"members", "weights", "combine",
  "temperature"}}, members named as in `config.teachers`; the temperature defaults to the
  method's `kd` term's (1 without one) and, with combine "probs", must equal it."""
  raw = dict(config.get("method_teachers", None) or {})
  if not raw:
    return {}
  named = teacher_configs(config)
  if named is None:
    raise ConfigError(f"config.method_teachers ({', '.join(sorted(raw))}) needs config.teachers "
                      "(the ensemble's teacher configs).")
  options = dict(config.get("loss_options", {}) or {})
  out = {}
  for method, entry in raw.items():
    where = f"config.method_teachers[{method!r}]"
    if method not in config.methods:
      raise ConfigError(f"{where}: no such method in config.methods "
                        f"({', '.join(sorted(config.methods))}).")
    entry = dict(entry)
    unknown = sorted(set(entry) - {"members", "weights", "combine", "temperature"})
    if unknown:
      raise ConfigError(f"{where}: unknown key(s) {unknown}; expected members, weights, combine, "
                        "temperature.")
    members = entry.get("members", ())
    members = [str(m) for m in ([members] if isinstance(members, (str, int)) else members)]
    if not members:
      raise ConfigError(f"{where}.members is empty: name at least one of config.teachers "
                        f"({', '.join(named)}).")
    missing = [m for m in members if m not in named]
    if missing:
      raise ConfigError(f"{where}.members: {missing} not in config.teachers "
                        f"({', '.join(named)}).")
    if len(set(members)) != len(members):
      raise ConfigError(f"{where}.members names a teacher twice: {members}.")
    weights = tuple(float(w) for w in (entry.get("weights") or ()))
    if weights and (len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0
                    or not all(np.isfinite(weights))):
      raise ConfigError(f"{where}.weights must be one finite weight >= 0 per member "
                        f"({len(members)}), not all 0; got {weights}.")
    combine = entry.get("combine") or "probs"
    if combine not in ENSEMBLE_COMBINE:
      raise ConfigError(f"{where}.combine must be one of {ENSEMBLE_COMBINE}, got {combine!r}.")
    spec = config.methods[method]
    parsed = {t.name: t for t in terms_lib.parse_terms(spec, _term_options(spec, options))}
    kd_t = float(parsed["kd"].term.temperature) if "kd" in parsed else None
    temperature = float(entry.get("temperature") or 0.0) or (kd_t or 1.0)
    if not temperature > 0:
      raise ConfigError(f"{where}.temperature must be > 0, got {temperature}.")
    if combine == "probs" and kd_t is not None and temperature != kd_t:
      raise ConfigError(f"{where}.temperature {temperature:g} differs from the kd term's "
                        f"{kd_t:g}: the members' softmaxes are averaged at the KD temperature.")
    out[method] = {"members": members, "weights": weights or None, "combine": combine,
                   "temperature": temperature}
  return out


def _validate_teachers(config, num_classes: int | None) -> None:
  """The configs of `config.teachers`: known models, precision, one class count for all."""
  named = teacher_configs(config)
  if named is None:
    method_teachers(config)  # refuses method_teachers without teachers
    return
  known = models.available()
  classes = {}
  for name, tcfg in named.items():
    if tcfg.model not in known:
      raise ConfigError(f"unknown model name {tcfg.model!r} in config.teachers[{name!r}]; known "
                        f"names: {', '.join(known)}")
    try:
      precision.check(tcfg, f"teachers[{name!r}]")
    except ValueError as e:
      raise ConfigError(str(e)) from None
    k = tcfg.get("num_classes") or num_classes
    if k is not None:
      classes[name] = int(k)
  if len(set(classes.values())) > 1:
    raise ConfigError("config.teachers predict different numbers of classes: "
                      + ", ".join(f"{n} ({named[n].model}) {k}" for n, k in classes.items())
                      + ".")
  s_classes = config.student.get("num_classes") or num_classes
  if classes and s_classes is not None and next(iter(classes.values())) != s_classes:
    raise ConfigError(f"config.teachers predict {next(iter(classes.values()))} classes but the "
                      f"student has {s_classes}.")
  method_teachers(config)


def validate(config: ml_collections.ConfigDict, *, num_classes: int | None = None) -> None:
  """Checks a config before anything trains; raises ValueError with a clear message.

  Unknown model names, unknown loss terms or options (every method), a teacher whose class count
  differs from the student's or the dataset's, or a global batch that does not split evenly over
  the devices.
  """
  known = models.available()
  for who in ("teacher", "student"):
    name = config[who].model
    if name not in known:
      raise ValueError(f"unknown {who} model name {name!r} in the config; known names: "
                       f"{', '.join(known)}")
    precision.check(config[who], who)
  options = dict(config.get("loss_options", {}) or {})
  for method, spec in dict(config.methods).items():
    try:
      terms_lib.parse_terms(spec, _term_options(spec, options))
    except ValueError as e:
      raise ValueError(f"method {method!r}: {e}") from None
  t_classes = config.teacher.get("num_classes") or num_classes
  s_classes = config.student.get("num_classes") or num_classes
  if t_classes is not None and s_classes is not None and t_classes != s_classes:
    raise ValueError(f"teacher/student class mismatch: the teacher has {t_classes} classes and "
                     f"the student {s_classes} (different datasets?).")
  if num_classes is not None and s_classes != num_classes:
    raise ValueError(f"the student has {s_classes} classes but the dataset "
                     f"{config.dataset!r} has {num_classes}.")
  _validate_teachers(config, num_classes)
  n = int(config.get("num_devices") or 0) or jax.device_count()
  if int(config.batch_size) % n:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the {n} devices "
                     "(the global batch is split evenly over them).")


# ---------------------------------------------------------------------------- pieces

def _optimizer(cfg, steps_per_epoch: int):
  """`cfg.optimizer`: "sgd" (torch.optim.SGD: momentum, L2 weight decay; RepDistiller's),
  "dot" (DOT, `kd_jax.train.dot`: SGD with task/distillation momenta `momentum -+ cfg.delta`)
  or "adamw"; `cfg.schedule`: "step" (x decay_rate at each of decay_epochs) or "cosine" (to 0)."""
  lr = float(cfg.learning_rate)
  kind = cfg.get("schedule", "step")
  if kind == "step":
    schedule = step_decay_schedule(lr, steps_per_epoch=steps_per_epoch,
                                   decay_epochs=tuple(cfg.get("decay_epochs", ()) or ()),
                                   decay_rate=float(cfg.get("decay_rate", 0.1)))
  elif kind == "cosine":
    schedule = optax.cosine_decay_schedule(lr, max(_num_steps(cfg, steps_per_epoch), 1))
  else:
    raise ValueError(f"schedule must be 'step' or 'cosine', got {kind!r}.")
  name = cfg.get("optimizer", "sgd")
  if name == "sgd":
    return sgd(schedule, momentum=float(cfg.get("momentum", 0.9)),
               weight_decay=float(cfg.get("weight_decay", 0.0)))
  if name == "dot":
    return dot(schedule, momentum=float(cfg.get("momentum", 0.9)),
               delta=float(cfg.get("delta", 0.075)),
               weight_decay=float(cfg.get("weight_decay", 0.0)))
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=float(cfg.get("weight_decay", 0.0)))
  raise ValueError(f"optimizer must be 'sgd', 'dot' or 'adamw', got {name!r}.")


def _num_steps(cfg, steps_per_epoch: int) -> int:
  steps = int(cfg.get("num_steps", 0) or 0)
  return steps if steps > 0 else int(cfg.num_epochs) * steps_per_epoch


def _model_options(cfg) -> dict[str, Any]:
  """The model's options with its compute dtype (`cfg.dtype`, experiments/precision.py)."""
  return precision.model_options(cfg)


class Runner:
  """Shared machinery of one experiment: mesh, dataset, evaluation, fitting."""

  def __init__(self, config, workdir):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    n = int(config.get("num_devices") or 0) or None
    self.mode = config.get("parallel", "shard_map")
    self.mesh = parallel.make_mesh(n) if self.mode == "shard_map" else None
    self.data = Dataset(config)
    self.progress = bool(config.get("progress", True))

  def evaluate(self, eval_step, variables, split: str) -> dict[str, float]:
    """`kd_jax.train.evaluate` of `variables` ({"params", "batch_stats"}) on `split`."""
    variables = dict(variables)
    if self.mesh is not None:
      variables = parallel.replicate(variables, self.mesh)
    return evaluate(eval_step, variables, self.data.eval(split), mesh=self.mesh)

  def accuracy(self, eval_step, variables, split: str) -> float:
    """Top-1 accuracy of `variables` on `split`."""
    return self.evaluate(eval_step, variables, split)["accuracy"]

  def distill_step(self, graphdef, teacher):
    """`make_distill_eval_step` of a student `graphdef` against `teacher`, from
    `config.diagnostics` (student_feature, teacher_feature, num_bins)."""
    d = self.config.get("diagnostics", None) or {}
    return make_distill_eval_step(
        graphdef, teacher.graphdef, self.mesh,
        student_feature=d.get("student_feature", "pre_pool") or None,
        teacher_feature=d.get("teacher_feature", "pre_pool") or None,
        num_bins=int(d.get("num_bins", 15)))

  def diagnose(self, step, variables, teacher, split: str) -> dict[str, float]:
    """`kd_jax.train.evaluate_distillation` of the student `variables` against `teacher`."""
    variables, t_vars = dict(variables), dict(teacher.variables)
    if self.mesh is not None:
      variables = parallel.replicate(variables, self.mesh)
      cached = getattr(self, "_replicated_teacher", None)
      if cached is None or cached[0] is not teacher:
        self._replicated_teacher = (teacher, parallel.replicate(t_vars, self.mesh))
      t_vars = self._replicated_teacher[1]
    return evaluate_distillation(step, variables, t_vars, self.data.eval(split), mesh=self.mesh)

  def eval_fn(self, graphdef, split):
    """`fn(state or variables) -> {"split": split, metric: value}` (the loop's `eval_fn`)."""
    step = make_eval_step(graphdef, self.mesh)

    def fn(state_or_vars):
      variables = (state_or_vars.variables() if isinstance(state_or_vars, TrainState)
                   else state_or_vars)
      return {"split": split, **self.evaluate(step, variables, split)}

    return fn

  def fit_teacher(self, name, model, cfg, loss):
    """Trains the teacher (on its whole training split) with `loss`; returns (state, history)."""
    spe = self.data.teacher_steps_per_epoch
    tx = _optimizer(cfg, spe)
    state = TrainState.create(model, tx, rng=jax.random.key(int(self.config.seed)))
    axis = None if self.mode == "none" else parallel.BATCH_AXIS
    step = make_train_step(loss, axis_name=axis,  # a teacher's loss reads no teacher
                           sync_batch_norm=bool(self.config.get("sync_batch_norm", False)),
                           nonfinite=self.config.get("nonfinite", "stop"))
    num_steps = _num_steps(cfg, spe)
    run_info = {"loss": [str(t) for t in step.terms], "model": cfg.model,
                "model_options": precision.describe(cfg),
                "num_steps": num_steps, "batch_size": self.data.batch_size,
                "optimizer": {k: cfg.get(k) for k in ("learning_rate", "momentum", "weight_decay",
                                                      "decay_epochs", "decay_rate")},
                "dataset": self.data.name, "seed": int(self.config.seed),
                **({"sync_batch_norm": True} if self.config.get("sync_batch_norm") else {})}
    eval_every = int(self.config.get("eval_every_epochs", 0) or 0) * spe
    return loop.fit(
        state, step, functools.partial(self.data.train, teacher=True), num_steps=num_steps,
        mode=self.mode, mesh=self.mesh, workdir=os.path.join(self.workdir, name), name=name,
        checkpoint_every=int(self.config.get("checkpoint_every", 0) or 0),
        log_every=int(self.config.get("log_every", 50)), eval_every=eval_every,
        eval_fn=self.eval_fn(state.graphdef, "val"), progress=self.progress, run_info=run_info)


def _teacher(runner: Runner, config, tcfg=None, *, name: str = "teacher",
             key: str = "config.teacher",
             seed_offset: int = 1000) -> tuple[teachers.FrozenTeacher, bool]:
  """Restores a teacher (`config.teacher` by default) from its checkpoint, or trains it in
  `<workdir>/<name>` and saves it there. Returns (teacher, trained)."""
  tcfg = config.teacher if tcfg is None else tcfg
  num_classes = int(tcfg.get("num_classes") or runner.data.num_classes)
  path = tcfg.get("checkpoint") or os.path.join(runner.workdir, name, "checkpoint")
  path = os.path.abspath(path)
  if os.path.exists(path):
    return teachers.restore_teacher(path, tcfg.model, num_classes=num_classes,
                                    normalization=runner.data.normalization,
                                    **_model_options(tcfg)), False
  if tcfg.get("checkpoint"):
    raise FileNotFoundError(f"teacher checkpoint {path} ({key}.checkpoint) does not "
                            "exist; leave it empty to train a teacher in the workdir.")
  model = create_model(tcfg.model, num_classes=num_classes, seed=int(config.seed) + seed_offset,
                       **_model_options(tcfg))
  state, history = runner.fit_teacher(name, model, tcfg, "ce:1")
  trained = state.model()
  val = [h["accuracy"] for h in history if h.get("split") == "val" and "accuracy" in h]
  # Every process calls it (Orbax syncs); the fingerprint records what the restore checks.
  teachers.save_teacher(path, trained, overwrite=True, model_name=tcfg.model,
                        num_classes=num_classes, model_options=_model_options(tcfg),
                        normalization=runner.data.normalization,
                        val_accuracy=val[-1] if val else None)
  return teachers.restore_teacher(path, tcfg.model, num_classes=num_classes,
                                  normalization=runner.data.normalization,
                                  **_model_options(tcfg)), True


def _check_teacher(runner: Runner, config, teacher, trained: bool, tcfg) -> None:
  """The checks every teacher gets before distillation: finite outputs with the student's class
  count and, restored, the validation accuracy its fingerprint records."""
  teachers.check_teacher_outputs(
      teacher, runner.data.eval("val"),
      student_num_classes=int(config.student.get("num_classes") or runner.data.num_classes))
  if not trained and (teacher.fingerprint or {}).get("val_accuracy") is not None:
    # A restored teacher must reproduce its recorded validation accuracy on this run's data.
    t_val = runner.eval_fn(teacher.graphdef, "val")(teacher.variables)["accuracy"]
    teachers.check_teacher_accuracy(
        teacher, t_val, tolerance=float(tcfg.get("accuracy_tolerance", 0.02)))


def _ensemble_teachers(runner: Runner, config, teacher):
  """The teachers of `config.teachers` (each trained or restored and checked as the teacher) and
  the methods' ensembles over them. Returns (pool, views, info): `pool[0]` is `teacher`, then
  one entry per distinct checkpoint (a member whose config equals `config.teacher` is that
  teacher); views {method: EnsembleOf over pool indices}; info {name: what results.json says}.
  """
  named = teacher_configs(config)
  mt = method_teachers(config)
  if named is None or not mt:
    return None, None, None
  pool, index, info = [teacher], {}, {}
  main = config.teacher.to_dict()
  used = sorted({m for v in mt.values() for m in v["members"]})
  for pos, (name, tcfg) in enumerate(named.items()):
    if name not in used:
      continue
    if tcfg.to_dict() == main:
      index[name] = 0
      info[name] = {"model": tcfg.model, "same_as": "teacher",
                    "checkpoint": workdir_lib.relative_path(teacher.path, runner.workdir)}
      continue
    member, trained = _teacher(runner, config, tcfg, name=os.path.join("teachers", name),
                               key=f"config.teachers[{name!r}]", seed_offset=1001 + pos)
    _check_teacher(runner, config, member, trained, tcfg)
    paths = [p.path for p in pool]
    if member.path in paths:
      index[name] = paths.index(member.path)
    else:
      index[name] = len(pool)
      pool.append(member)
    t_test = runner.eval_fn(member.graphdef, "test")(member.variables)["accuracy"]
    info[name] = {"model": tcfg.model, "test_accuracy": t_test, "trained_here": trained,
                  "checkpoint": workdir_lib.relative_path(member.path, runner.workdir)}
  views = {m: EnsembleOf(tuple(index[n] for n in v["members"]), v["weights"], v["combine"],
                         v["temperature"]) for m, v in mt.items()}
  return tuple(pool), views, info


def _ensemble_accuracies(runner: Runner, pool, views, split: str) -> dict[str, float]:
  """{method: top-1 accuracy on `split` of the combined teacher it distils (its argmax)}; each
  pool teacher's logits computed once."""
  from kd_jax.train.terms import ensemble as ensemble_terms  # pylint: disable=g-import-not-at-top
  from kd_jax.train.terms import Outputs  # pylint: disable=g-import-not-at-top
  labels = np.concatenate([b["label"][b["mask"]] for b in runner.data.eval(split)])
  logits = {i: jnp.asarray(predict_logits(pool[i].graphdef, jax.device_get(pool[i].variables),
                                          runner.data.eval(split)))
            for i in sorted({i for v in views.values() for i in v.members})}
  out = {}
  for method, view in views.items():
    ens = view.resolve([p.graphdef for p in pool])
    combined = ensemble_terms.combine_outputs(
        [Outputs(logits[i], {}) for i in view.members], weights=ens.weights,
        combine=ens.combine, temperature=ens.temperature).logits
    out[method] = float(np.mean(np.argmax(np.asarray(combined), -1) == labels))
  return out


def _ptloss_epsilon(runner: Runner, config, teacher) -> tuple[list, dict]:
  pcfg = config.get("ptloss", ml_collections.ConfigDict())
  if not pcfg.get("select", False):
    eps = np.atleast_1d(np.asarray(pcfg.get("epsilon", [0.0]), np.float32))
    return eps.tolist(), {"selected": False}
  temperature = float((config.get("loss_options", {}) or {}).get("ptloss", {}).get(
      "temperature", 1.0))
  settings = {"teacher": workdir_lib.relative_path(teacher.path, runner.workdir),
              "seed": int(config.seed), "temperature": temperature,
              "distance": pcfg.get("distance", "l2"),
              **{k: pcfg.get(k) for k in ("order", "num_candidates", "scale")}}
  # The selection depends only on the teacher and these settings: reuse it when resuming.
  cache = os.path.join(runner.workdir, "ptloss_selection.json")
  if os.path.exists(cache):
    cached = loop.read_json(cache, what="the cached PTLoss selection")
    if not isinstance(cached, dict) or not {"settings", "epsilon", "info"} <= set(cached):
      raise ValueError(f"{cache} (the cached PTLoss selection) lacks its 'settings', 'epsilon' "
                       "or 'info' entry; delete it to select again.")
    if cached.get("settings") == json.loads(json.dumps(settings)):
      return cached["epsilon"], cached["info"]
  from kd_jax import ptloss as ptloss_lib  # pylint: disable=g-import-not-at-top
  t_vars = jax.device_get(teacher.variables)
  logits = predict_logits(teacher.graphdef, t_vars, runner.data.eval("val"))
  labels = np.concatenate([b["label"][b["mask"]] for b in runner.data.eval("val")])
  sel = ptloss_lib.select_coefficients(
      jnp.asarray(logits), jnp.asarray(labels), key=jax.random.key(int(config.seed)),
      order=int(pcfg.get("order", 5)), num_candidates=int(pcfg.get("num_candidates", 64)),
      scale=float(pcfg.get("scale", 1.0)), temperature=temperature,
      distance=settings["distance"])
  from kd_jax import losses  # pylint: disable=g-import-not-at-top
  t_probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
  proxy = losses.proxy_teacher(t_probs, jnp.asarray(sel.epsilon), strict=False).probs
  calib = {}
  for who, p in (("teacher", t_probs), ("proxy", proxy)):
    calib[who] = {"confidence": float(jnp.mean(jnp.max(p, -1))),
                  "ece": float(ptloss_lib.expected_calibration_error(p, jnp.asarray(labels))),
                  "accuracy": float(jnp.mean(jnp.argmax(p, -1) == jnp.asarray(labels)))}
  info = {"selected": True, "distance": settings["distance"], "index": int(sel.index),
          "score": float(sel.scores[sel.index]), "vanilla_score": float(sel.scores[0]),
          "num_invalid": int(sel.num_invalid),
          "validation": calib}  # at the PTLoss temperature, on the validation split
  epsilon = np.asarray(sel.epsilon).tolist()
  if jax.process_index() == 0:
    with open(cache + ".tmp", "w") as f:  # written whole or not at all
      json.dump({"settings": settings, "epsilon": epsilon, "info": info}, f, indent=2)
    os.replace(cache + ".tmp", cache)
  return epsilon, info


def _uses_global_centers(spec: str, options: Mapping[str, Mapping[str, Any]]) -> bool:
  """Whether a loss spec has ReFilled's stage-2 term with the teacher's global class centres."""
  parsed = terms_lib.parse_terms(spec, _term_options(spec, options))
  return any(t.name == "refilled_classifier" and t.term.centers == "global" for t in parsed)


def seeds_of(config) -> list[int]:
  """The students' seeds: `config.seeds` (a count N: seed, seed + 1, ..., or a list), default 1."""
  seeds = config.get("seeds", 1)
  if isinstance(seeds, int):
    if seeds < 1:
      raise ValueError(f"config.seeds must be >= 1, got {seeds}.")
    return [int(config.seed) + i for i in range(seeds)]
  return [int(x) for x in seeds]


def paired_difference(values, baseline, *, confidence: float = 0.95) -> dict[str, Any]:
  """Mean and t-interval of the per-seed differences `values - baseline` (paired by seed)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  d = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
  n = d.size
  out = {"mean": float(d.mean()), "n": int(n), "std": float(d.std(ddof=1)) if n > 1 else None,
         "ci95": None}
  if n > 1:
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
    out["ci95"] = [out["mean"] - half, out["mean"] + half]
  return out


def _pm(values) -> str:
  v = 100 * np.asarray(values, np.float64)
  return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if v.size > 1 else f"{v.mean():.2f}"


def _table(results: Mapping[str, Any]) -> str:
  n = len(results["seeds"])
  base = results.get("baseline")
  head = ("method", "loss", f"test acc % ({n} seed{'s' * (n > 1)})",
          f"vs {base} (paired, 95% CI)" if base else "")
  rows = [head]
  t = results["teacher"]
  rows.append((f"teacher ({t['model']})", "ce:1", f"{100 * t['test_accuracy']:.2f}", ""))
  for name, m in (results.get("teachers") or {}).items():
    if "test_accuracy" in m:
      rows.append((f"teachers.{name} ({m['model']})", "ce:1", f"{100 * m['test_accuracy']:.2f}",
                   ""))
  for name, r in results["methods"].items():
    diff = results.get("paired", {}).get(name)
    cell = ""
    if diff is not None:
      cell = f"{100 * diff['mean']:+.2f}"
      if diff["ci95"] is not None:
        cell += f" [{100 * diff['ci95'][0]:+.2f}, {100 * diff['ci95'][1]:+.2f}]"
    rows.append((f"{name} ({results['student_model']})", r["loss"], _pm(r["test_accuracy"]),
                 cell))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
  extra = []
  for name, v in (results.get("method_teachers") or {}).items():
    w = "equal weights" if not v["weights"] else "weights " + "/".join(f"{x:g}" for x in
                                                                         v["weights"])
    extra.append(f"{name} distils {' + '.join(v['members'])} ({v['combine']}, T = "
                 f"{v['temperature']:g}, {w}); that teacher's test accuracy "
                 f"{100 * v['test_accuracy']:.2f}")
  for name, d in results.get("compare", {}).items():
    ci = ("" if d["ci95"] is None else
          f" [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]")
    extra.append(f"{name} (paired over seeds, 95% CI): {100 * d['mean']:+.2f}{ci}")
  table = [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]
  return "\n".join(table + extra + _diagnostics_table(results))


def _diagnostics_table(results: Mapping[str, Any]) -> list[str]:
  """Mean over seeds of every method's test diagnostics against the teacher."""
  if not any("diagnostics" in r for r in results["methods"].values()):
    return []
  head = ("method", "agreement %", "KL (T=1)", "ECE", "CKA")
  rows = [head]
  for name, r in results["methods"].items():
    d = r.get("diagnostics", {})
    cell = lambda k, f: f.format(np.mean(d[k])) if k in d else "-"  # noqa: E731
    rows.append((name, cell("agreement", "{:.2%}").rstrip("%"), cell("kl", "{:.4f}"),
                 cell("ece", "{:.4f}"), cell("cka", "{:.4f}")))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
  teacher_ece = results["teacher"].get("ece")
  title = "student vs teacher on test (mean over seeds)"
  if teacher_ece is not None:
    title += f"; teacher ECE {teacher_ece:.4f}"
  return ["", title, line(rows[0]), "  ".join("-" * w for w in widths)] + [
      line(r) for r in rows[1:]]


# The per-student diagnostics of `evaluate_distillation` reported by the main job.
STUDENT_DIAGNOSTICS = ("agreement", "kl", "ece", "cka")


def fit_students(runner: Runner, config, specs: Mapping[str, str],
                 options: Mapping[str, Mapping[str, Any]], teacher, seeds: list[int], *,
                 pool=None, views=None):
  """Every method's students, one per seed, trained in one program (one teacher forward per
  batch, `make_multi_student_step`). Seed s initialises the same student for every method;
  all students see the same batches. With `pool` (teachers, `pool[0]` = `teacher`) and `views`
  ({method: EnsembleOf}), those methods distil their ensembles and the others `teacher`; every
  teacher of the pool runs once per batch. Returns ({method: stacked state}, history)."""
  if pool is None:
    t_graphdef, t_variables, t_views = teacher.graphdef, teacher.variables, None
  else:
    t_graphdef = tuple(t.graphdef for t in pool)
    t_variables = tuple(t.variables for t in pool)
    t_views = dict(views)
  scfg = config.student
  spe = runner.data.steps_per_epoch
  # `config.method_optimizer`: {method: optimizer settings over config.student's} (DOT).
  overrides = dict(config.get("method_optimizer", {}) or {})
  unknown = sorted(set(overrides) - set(specs))
  if unknown:
    raise ValueError(f"config.method_optimizer names unknown method(s) {unknown}; methods: "
                     f"{sorted(specs)}.")
  txs = {m: _optimizer(ml_collections.ConfigDict({**scfg.to_dict(), **dict(overrides[m])})
                       if m in overrides else scfg, spe) for m in specs}
  axis = None if runner.mode == "none" else parallel.BATCH_AXIS
  per_method = {m: _term_options(spec, options) for m, spec in specs.items()}
  sync_bn = bool(config.get("sync_batch_norm", False))
  mixing = dict(config.get("mixing", {}) or {})
  step = make_multi_student_step(
      specs, teacher_graphdef=t_graphdef, loss_options=per_method, axis_name=axis,
      sync_batch_norm=sync_bn, teacher_input_key=config.get("teacher_input_key") or None,
      mixing=Mixing(**{"seed": int(config.seed), **mixing}) if mixing else None,
      nonfinite=config.get("nonfinite", "stop"), method_teachers=t_views)
  with_index = any("index" in sub.batch_keys for sub in step.steps.values())
  example = None
  inits = []
  for seed in seeds:  # one initialisation per seed, copied for every method
    inits.append(nnx.split(create_model(scfg.model, num_classes=runner.data.num_classes,
                                        seed=seed, **_model_options(scfg))))
  states = {}
  for m, sub in step.steps.items():
    per_seed = []
    for seed, (graphdef, init) in zip(seeds, inits):
      st = TrainState.create(nnx.merge(graphdef, jax.tree.map(jnp.array, init)), txs[m],
                             rng=jax.random.key(seed))
      if sub.owns_variables:
        if example is None:
          example = jax.tree.map(lambda x: x[:1],
                                 next(iter(runner.data.train(0, with_index=with_index))))
        st = sub.init(st, example, step.method_teacher_variables(m, t_variables),
                      num_data=runner.data.num_train)
      per_seed.append(st)
    states[m] = stack_states(per_seed)

  graphdef = inits[0][0]
  val_step = runner.distill_step(graphdef, teacher)

  def eval_fn(all_states):
    out = {"split": "val"}
    for m, st in all_states.items():
      per_seed = [runner.diagnose(val_step, unstack_state(st, i).variables(), teacher, "val")
                  for i in range(len(seeds))]
      for key in ("accuracy",) + STUDENT_DIAGNOSTICS:
        if key in per_seed[0]:
          out[f"{m}/{key}"] = float(np.mean([d[key] for d in per_seed]))
          out.update({f"{m}/{key}/{i}": d[key] for i, d in enumerate(per_seed)})
      out["teacher/accuracy"] = per_seed[0]["teacher_accuracy"]
      out["teacher/ece"] = per_seed[0]["teacher_ece"]
    return out

  num_steps = _num_steps(scfg, spe)
  run_info = {"methods": {m: [str(t) for t in sub.terms] for m, sub in step.steps.items()},
              "seeds": seeds, "model": scfg.model,
              "model_options": precision.describe(scfg), "num_steps": num_steps,
              "batch_size": runner.data.batch_size,
              "optimizer": {k: scfg.get(k) for k in ("learning_rate", "momentum", "weight_decay",
                                                     "decay_epochs", "decay_rate")},
              "teacher": workdir_lib.relative_path(teacher.path, runner.workdir),
              "dataset": runner.data.name,
              "data_seed": int(config.seed),
              "data": dict(config.get("data", {}) or {}),
              **({"sync_batch_norm": True} if sync_bn else {})}
  # Only when used, so that the workdirs of runs without them still resume.
  extras = {"method_optimizer": {m: dict(v) for m, v in overrides.items()}, "mixing": mixing,
            "teacher_input_key": config.get("teacher_input_key") or None,
            "teachers": None if pool is None else [
                workdir_lib.relative_path(t.path, runner.workdir) for t in pool],
            "method_teachers": None if pool is None else {
                m: {"members": list(v.members), "weights": v.weights, "combine": v.combine,
                    "temperature": v.temperature} for m, v in t_views.items()}}
  run_info.update({k: v for k, v in extras.items() if v})
  eval_every = int(config.get("eval_every_epochs", 0) or 0) * spe
  return loop.fit(
      states, step, functools.partial(runner.data.train, with_index=with_index, transfer=True),
      num_steps=num_steps, teacher_variables=t_variables, mode=runner.mode,
      mesh=runner.mesh, workdir=os.path.join(runner.workdir, "students"), name="students",
      checkpoint_every=int(config.get("checkpoint_every", 0) or 0),
      log_every=int(config.get("log_every", 50)), eval_every=eval_every, eval_fn=eval_fn,
      progress=runner.progress, run_info=run_info)


# ---------------------------------------------------------------------------- run

def distributed_options(config) -> dict[str, Any]:
  """`jax.distributed.initialize` arguments set in the config (`coordinator_address`,
  `num_processes`, `process_id`); none on Cloud TPU, SLURM or Open MPI, where JAX finds them."""
  options = {}
  if config.get("coordinator_address"):
    options["coordinator_address"] = str(config.coordinator_address)
  for key in ("num_processes", "process_id"):
    value = config.get(key)
    if value is not None and int(value) >= 0:
      options[key] = int(value)
  return options


def run(config: ml_collections.ConfigDict, workdir: str, *,
        overwrite: bool = False) -> dict[str, Any]:
  """Runs the experiment described by `config` in `workdir` (resuming what is there).

  The workdir is locked for the run and must hold a run of the same configuration, teacher
  included (`kd_jax.workdir`); `overwrite=True` empties a workdir of another configuration
  first.

  Returns:
    The results dict also written to `<workdir>/results.json`: the teacher's test accuracy and,
    per method, its loss spec and test / validation accuracy.
  """
  if config.get("distributed", False):
    parallel.initialize_distributed(**distributed_options(config))
  validate(config)
  runner = Runner(config, workdir)
  validate(config, num_classes=runner.data.num_classes)
  with workdir_lib.open_workdir(runner.workdir, config, overwrite=overwrite,
                                primary=jax.process_index() == 0) as resumed:
    if resumed and runner.progress:
      print(f"{runner.workdir}: resuming a run of this configuration (finished parts are "
            "reused)", flush=True)
    return _run(config, runner)


def _run(config, runner: Runner) -> dict[str, Any]:
  teacher, trained = _teacher(runner, config)
  _check_teacher(runner, config, teacher, trained, config.teacher)
  t_test = runner.eval_fn(teacher.graphdef, "test")(teacher.variables)

  options = {k: dict(v) for k, v in dict(config.get("loss_options", {}) or {}).items()}
  specs = dict(config.methods)
  order = [m for m in (config.get("method_order") or ()) if m in specs]
  specs = {m: specs[m] for m in order + sorted(set(specs) - set(order))}
  eps_info = None
  if any("ptloss" in {t.name for t in terms_lib.parse_terms(s)} for s in specs.values()):
    eps, eps_info = _ptloss_epsilon(runner, config, teacher)
    options.setdefault("ptloss", {})["epsilon"] = eps
    eps_info["epsilon"] = eps

  induced = None
  if any(_uses_global_centers(s, options) for s in specs.values()):
    # ReFilled's stage-2 target: the teacher's embedding-induced classifier, from class centres
    # of the teacher's embedding over the students' labelled training split.
    from kd_jax import refilled  # pylint: disable=g-import-not-at-top
    centers = refilled.embedding_class_centers(teacher.graphdef, teacher.variables,
                                               runner.data.eval("train"),
                                               runner.data.num_classes)
    induced = refilled.ncm_evaluate(teacher.graphdef, teacher.variables, centers,
                                    runner.data.eval("val"))
    teacher = refilled.with_class_centers(teacher, centers)

  pool, views, members_info = _ensemble_teachers(runner, config, teacher)
  seeds = seeds_of(config)
  results = {"dataset": config.dataset, "seed": int(config.seed), "seeds": seeds,
             "teacher": {"model": config.teacher.model, "test_accuracy": t_test["accuracy"],
                         "trained_here": trained,
                         "checkpoint": workdir_lib.relative_path(teacher.path, runner.workdir)},
             "student_model": config.student.model, "methods": {}}
  if eps_info is not None:
    results["ptloss"] = eps_info
  if induced is not None:
    results["teacher"]["induced_classifier_val_accuracy"] = induced
  if pool is not None:
    results["teachers"] = members_info
    mt = method_teachers(config)
    accuracy = _ensemble_accuracies(runner, pool, views, "test")
    results["method_teachers"] = {m: {**mt[m], "test_accuracy": accuracy[m]} for m in views}
  states, history = fit_students(runner, config, specs, options, teacher, seeds, pool=pool,
                                 views=views)
  test_step = runner.distill_step(states[next(iter(states))].graphdef, teacher)
  diag = dict(config.get("diagnostics", None) or {})
  results["diagnostics"] = {"split": "test", "kl_temperature": 1.0,
                            "num_bins": int(diag.get("num_bins", 15)),
                            "cka_features": {"student": diag.get("student_feature", "pre_pool"),
                                             "teacher": diag.get("teacher_feature", "pre_pool")},
                            "cka": "minibatch linear CKA, unbiased HSIC, eval_batch_size "
                                   f"{runner.data.eval_batch_size}"}
  for name, spec in specs.items():
    st = states[name]
    per_seed = [runner.diagnose(test_step, unstack_state(st, i).variables(), teacher, "test")
                for i in range(len(seeds))]
    test = [d["accuracy"] for d in per_seed]
    results["teacher"]["ece"] = per_seed[0]["teacher_ece"]
    vals = [[h[f"{name}/accuracy/{i}"] for h in history if h["split"] == "val"]
            for i in range(len(seeds))]
    results["methods"][name] = {
        "loss": spec, "test_accuracy": test,
        "val_accuracy": [v[-1] for v in vals] if vals[0] else None,
        "best_val_accuracy": [max(v) for v in vals] if vals[0] else None,
        "steps": loop.step_count(st),
        "diagnostics": {k: [d[k] for d in per_seed] for k in STUDENT_DIAGNOSTICS
                        if k in per_seed[0]}}
  # Hyperparameters chosen on validation data only: {reported name: (candidate methods)}.
  for name, candidates in dict(config.get("select_on_val", {}) or {}).items():
    candidates = [c for c in candidates if c in results["methods"]]
    if not candidates:
      continue
    if any(results["methods"][c]["val_accuracy"] is None for c in candidates):
      raise ValueError(f"select_on_val[{name!r}] needs validation accuracy: set "
                       "config.eval_every_epochs > 0.")
    best = max(candidates, key=lambda c: np.mean(results["methods"][c]["val_accuracy"]))
    results["methods"][name] = {**results["methods"][best], "selected": best,
                                "candidates": {c: float(np.mean(results["methods"][c][
                                    "val_accuracy"])) for c in candidates}}
  base = config.get("baseline", "student")
  if base in results["methods"]:
    results["baseline"] = base
    ref = results["methods"][base]["test_accuracy"]
    results["paired"] = {name: paired_difference(r["test_accuracy"], ref)
                         for name, r in results["methods"].items() if name != base}
  # Further paired comparisons, e.g. PTLoss against KD at the same temperature.
  for a_name, b_name in (config.get("compare") or ()):
    if a_name in results["methods"] and b_name in results["methods"]:
      results.setdefault("compare", {})[f"{a_name} - {b_name}"] = paired_difference(
          results["methods"][a_name]["test_accuracy"], results["methods"][b_name]["test_accuracy"])
  if jax.process_index() == 0:
    _cli.write_json(os.path.join(runner.workdir, "results.json"), results)
    print(_table(results), flush=True)
  return results
