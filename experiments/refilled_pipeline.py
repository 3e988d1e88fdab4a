"""ReFilled's two-stage pipeline: teacher on classes A, student on classes B, stage 1 + stage 2
vs the student alone (run it with `python -m experiments.refilled`).

The commands are in `experiments/refilled.py`; results go to `<workdir>/results.json` (summary
and every run) and, per run, `<workdir>/<setting>/seed_<seed>/` (results.json, metrics,
TensorBoard events, Orbax checkpoints); a restart resumes. See docs/refilled.md.

In order, for one class split and one seed (`run_setting`):

1. Teacher: restored frozen from its Orbax checkpoint if present, else trained with CE on A.
2. Stage 1 (`"refilled_relationship:1"`): the student's backbone matches the teacher's triplet
   comparisons; the classifier gets no loss gradient (it only decays). Every
   `stage1.eval_every_epochs` the student's nearest-class-mean (NCM) accuracy is measured on the
   held-out **validation** split with centres built on the training split; the best model is
   saved (`<workdir>/stage1/best`) and initialises stage 2.
3. Stage 2 (`stage2_specs`): for every lambda of `stage2.lambdas`, CE plus lambda x the KL
   between the teacher's embedding-induced classifier over the batch's classes and the student's
   restricted logits, from the selected stage-1 model (lambda = 0, CE only, is the control); the
   teacher's global class centres are computed once over the student's training data and travel,
   replicated, inside the teacher's variables (`kd_jax.refilled.with_class_centers`).
4. Baseline: stage 1's random initialisation, CE only, stage 2's optimizer, length and data
   order; step 3's students and this one train in one program (`make_multi_student_step`).
5. Final evaluation (the only reads of the test split): teacher on A, stage-1 NCM, every stage-2
   student and the baseline on B; ReFilled is the lambda with the best validation accuracy.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from experiments import precision
from kd_jax import data as data_lib
from kd_jax import parallel
from kd_jax import teachers
from kd_jax import workdir as workdir_lib
from kd_jax.data import class_splits
from kd_jax.models import create_compiled as create_model
from kd_jax.refilled import embedding_class_centers, ncm_evaluate, with_class_centers
from kd_jax.train import loop
from kd_jax.train import terms as terms_lib
from kd_jax.train.evaluate import evaluate, make_eval_step
from kd_jax.train.state import TrainState, sgd, step_decay_schedule
from kd_jax.train.step import make_multi_student_step, make_train_step, stack_states
from kd_jax.train.step import unstack_state

# ------------------------------------------------------------------------------------ data


class _Subset:
  """Examples `indices` of a random-access source, labels relabelled by `table`."""

  def __init__(self, source, indices, table):
    self.source, self.indices, self.table = source, np.asarray(indices), np.asarray(table)

  def __len__(self):
    return len(self.indices)

  def _fix(self, ex):
    ex = dict(ex)
    ex["label"] = np.int32(self.table[int(ex["label"])])
    return ex

  def __getitem__(self, i):
    return self._fix(self.source[int(self.indices[i])])

  def __getitems__(self, idx):
    getitems = getattr(self.source, "__getitems__", None)
    real = [int(self.indices[i]) for i in idx]
    exs = getitems(real) if getitems else [self.source[i] for i in real]
    return [self._fix(e) for e in exs]


def _source_labels(source) -> np.ndarray:
  return np.asarray([int(source[i]["label"]) for i in range(len(source))], np.int32)


class TaskData:
  """The teacher's task (classes A) and the student's (classes B), each with train/val/test.

  Built from one dataset and a `class_splits.Setting`. "digits" is offline
  (`data.load_digits`, whose validation split is held out of training); TFDS datasets
  ("cifar100", "caltech_birds2011") hold `config.val_fraction` of the training split out as
  validation (seeded), and the test split is only opened when first read.

  Streams: `train(role, start_step)` (shuffled, augmented, resumable), `eval(role, split)` (each
  example once, padded, "mask"; split in "train", "val", "test"). `reads` logs every
  (role, split) opened, in order.
  """

  def __init__(self, config: ml_collections.ConfigDict, setting: class_splits.Setting, *,
               seed: int):
    self.name = config.dataset
    self.setting = setting
    self.seed = int(seed)
    self.batch_size = int(config.batch_size)
    self.eval_batch_size = int(config.get("eval_batch_size", 256))
    self.reads: list[tuple[str, str]] = []
    self.num_classes = {"teacher": len(setting.teacher_classes),
                        "student": len(setting.student_classes)}
    self._config = config
    if self.name == "digits":
      splits = data_lib.load_digits(seed=self.seed)
      self._splits = {}
      for split in ("train", "val", "test"):
        arrays = getattr(splits, split)
        cs = class_splits.class_split(arrays["label"], setting.teacher_classes,
                                      setting.student_classes, allow_missing=True)
        for role in ("teacher", "student"):
          self._splits[(role, split)] = class_splits.apply_split(arrays, cs, role)
          data_lib.check_split(self._splits[(role, split)], split=f"{role} {split}",
                               num_classes=self.num_classes[role])
      per_class = int(config.get("student_labels_per_class", 0) or 0)
      if per_class:  # few labels for the student: a class-balanced subset of its training split
        train = self._splits[("student", "train")]
        keep = class_splits.balanced_subset(train["label"], per_class, seed=self.seed)
        self._splits[("student", "train")] = {k: v[keep] for k, v in train.items()}
      self._train_augment = self._eval_transform = None
    else:
      self._tfds_init(config)
    self.num_train = {r: len(data_lib.ArraySource(src) if isinstance(src, Mapping) else src)
                      for r in self.num_classes
                      for src in [self._source(r, "train", log=False)]}

  def _tfds_init(self, config):
    from kd_jax.data import cub  # pylint: disable=g-import-not-at-top
    data_dir = config.get("data_dir") or None
    if self.name in data_lib.CIFAR_NUM_CLASSES:
      self._train_augment = data_lib.cifar_train_augment(self.name)
      self._eval_transform = data_lib.cifar_eval_transform(self.name)
      fix = lambda ex: {"image": np.asarray(ex["image"]),  # noqa: E731
                        "label": np.asarray(ex["label"], np.int32)}
    elif self.name == cub.NAME:
      self._train_augment = cub.train_augment(int(config.get("image_size", 224)))
      self._eval_transform = cub.eval_transform(int(config.get("image_size", 224)),
                                                int(config.get("resize_size", 256)))
      fix = cub.image_and_label
    else:
      raise ValueError(f"unknown dataset {self.name!r}; expected 'digits', "
                       f"'{cub.NAME}' or one of {sorted(data_lib.CIFAR_NUM_CLASSES)}.")
    from kd_jax.data.sources import MappedSource  # pylint: disable=g-import-not-at-top
    open_ = lambda split: MappedSource(  # noqa: E731
        data_lib.tfds_source(self.name, split, data_dir=data_dir), fix)
    train = open_(config.get("train_split", "train"))
    labels = _source_labels(train)
    order = np.random.default_rng(self.seed).permutation(len(labels))
    n_val = int(round(float(config.get("val_fraction", 0.1)) * len(labels)))
    held = {"val": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}
    self._lazy = {"test": lambda: open_(config.get("test_split", "test"))}
    self._train_source, self._labels = train, labels
    self._held = held
    self._sources = {}

  def _source(self, role: str, split: str, *, log: bool = True):
    if log:
      self.reads.append((role, split))
    if self.name == "digits":
      return self._splits[(role, split)]
    key = (role, split)
    if key not in self._sources:
      classes = (self.setting.teacher_classes if role == "teacher"
                 else self.setting.student_classes)
      if split == "test":
        base = self._lazy["test"]()
        labels, candidates = _source_labels(base), None
      else:
        base, labels, candidates = self._train_source, self._labels, self._held[split]
      table = class_splits.label_map(classes, max(int(labels.max()) + 1, max(classes) + 1))
      idx = np.flatnonzero(table[labels] >= 0)
      if candidates is not None:
        idx = np.intersect1d(idx, candidates)
      self._sources[key] = _Subset(base, idx, table)
    return self._sources[key]

  def steps_per_epoch(self, role: str) -> int:
    return data_lib.steps_per_epoch(self.num_train[role], self.batch_size)

  def train(self, role: str, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    return data_lib.batches(self._source(role, "train"), batch_size=self.batch_size,
                            seed=self.seed, start_step=start_step,
                            augment=self._train_augment,
                            num_shards=jax.process_count(), shard_index=jax.process_index())

  def eval(self, role: str, split: str) -> Iterator[dict[str, np.ndarray]]:
    return data_lib.eval_batches(self._source(role, split), batch_size=self.eval_batch_size,
                                 transform=self._eval_transform)


# ------------------------------------------------------------------------------------ pieces


def optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int, num_steps: int
              ) -> optax.GradientTransformation:
  """SGD (Nesterov by default) with weight decay under a cosine or step schedule.

  schedule="cosine": lr * (alpha + (1 - alpha) (1 + cos(pi t / T)) / 2), alpha =
  `final_lr_factor` (ReFilled stage 1: 0.1 -> 0.01); schedule="step": lr x `decay_rate` at each
  of `decay_epochs` (stage 2 and the teacher: x0.2 at 100, 140, 180).
  """
  lr = float(cfg.learning_rate)
  kind = cfg.get("schedule", "step")
  if kind == "cosine":
    schedule = optax.cosine_decay_schedule(lr, max(num_steps, 1),
                                           alpha=float(cfg.get("final_lr_factor", 0.1)))
  elif kind == "step":
    schedule = step_decay_schedule(lr, steps_per_epoch=steps_per_epoch,
                                   decay_epochs=tuple(cfg.get("decay_epochs", ()) or ()),
                                   decay_rate=float(cfg.get("decay_rate", 0.2)))
  else:
    raise ValueError(f"schedule must be 'cosine' or 'step', got {kind!r}.")
  return sgd(schedule, momentum=float(cfg.get("momentum", 0.9)),
             weight_decay=float(cfg.get("weight_decay", 5e-4)),
             nesterov=bool(cfg.get("nesterov", True)))


def _num_steps(cfg, steps_per_epoch: int) -> int:
  steps = int(cfg.get("num_steps", 0) or 0)
  return steps if steps > 0 else int(cfg.num_epochs) * steps_per_epoch


def _options(cfg) -> dict[str, Any]:
  """The model's options with its compute dtype (`cfg.dtype`, experiments/precision.py)."""
  return precision.model_options(cfg)


def _loss_options(cfg) -> dict[str, dict[str, Any]]:
  return {k: dict(v) for k, v in dict(cfg.get("loss_options", {}) or {}).items()}


class _Runner:
  """Mesh, evaluation and fitting shared by the stages of one run."""

  def __init__(self, config, workdir, data: TaskData):
    self.config, self.workdir, self.data = config, workdir, data
    self.mode = config.get("parallel", "shard_map")
    n = int(config.get("num_devices") or 0) or None
    self.mesh = parallel.make_mesh(n) if self.mode == "shard_map" else None

  def accuracy(self, graphdef, variables, role, split) -> float:
    step = make_eval_step(graphdef, self.mesh)
    variables = dict(variables)
    if self.mesh is not None:
      variables = parallel.replicate(variables, self.mesh)
    return evaluate(step, variables, self.data.eval(role, split), mesh=self.mesh)["accuracy"]

  def fit(self, name, model, cfg, loss, role, *, teacher=None, loss_options=None, eval_fn=None,
          eval_every=0, seed=0):
    spe = self.data.steps_per_epoch(role)
    num_steps = _num_steps(cfg, spe)
    state = TrainState.create(model, optimizer(cfg, spe, num_steps), rng=jax.random.key(seed))
    axis = None if self.mode == "none" else parallel.BATCH_AXIS
    step = make_train_step(loss, teacher_graphdef=None if teacher is None else teacher.graphdef,
                           loss_options=loss_options, axis_name=axis,
                           sync_batch_norm=bool(self.config.get("sync_batch_norm", False)),
                           nonfinite=self.config.get("nonfinite", "stop"))
    if step.owns_variables:
      example = jax.tree.map(lambda x: x[:1], next(iter(self.data.train(role))))
      state = step.init(state, example, None if teacher is None else teacher.variables,
                        num_data=self.data.num_train[role])
    return loop.fit(
        state, step, functools.partial(self.data.train, role), num_steps=num_steps,
        teacher_variables=None if teacher is None else teacher.variables, mode=self.mode,
        mesh=self.mesh, workdir=os.path.join(self.workdir, name), name=name,
        checkpoint_every=int(self.config.get("checkpoint_every", 0) or 0),
        log_every=int(self.config.get("log_every", 50)), eval_every=eval_every,
        eval_fn=eval_fn, progress=bool(self.config.get("progress", True)))


  def fit_stage2(self, specs, inits, cfg, teacher, loss_options, *, seed=0):
    """Stage 2's students ({method: loss spec}, each from `inits[method]` = (graphdef, state))
    trained at once on the same batches (`make_multi_student_step`, one teacher forward per
    batch). Returns ({method: TrainState}, history)."""
    spe = self.data.steps_per_epoch("student")
    num_steps = _num_steps(cfg, spe)
    tx = optimizer(cfg, spe, num_steps)
    axis = None if self.mode == "none" else parallel.BATCH_AXIS
    present = lambda spec: {t.name for t in terms_lib.parse_terms(spec)}  # noqa: E731
    step = make_multi_student_step(
        specs, teacher_graphdef=teacher.graphdef, axis_name=axis,
        loss_options={m: {k: v for k, v in loss_options.items() if k in present(spec)}
                      for m, spec in specs.items()})
    states = {m: stack_states([TrainState.create(nnx.merge(g, jax.tree.map(jnp.array, init)), tx,
                                                 rng=jax.random.key(seed))])
              for m, (g, init) in inits.items()}
    stacked, history = loop.fit(
        states, step, functools.partial(self.data.train, "student"), num_steps=num_steps,
        teacher_variables=teacher.variables, mode=self.mode, mesh=self.mesh,
        workdir=os.path.join(self.workdir, "stage2"), name="stage2",
        checkpoint_every=int(self.config.get("checkpoint_every", 0) or 0),
        log_every=int(self.config.get("log_every", 50)),
        progress=bool(self.config.get("progress", True)),
        run_info={"methods": dict(specs), "num_steps": num_steps, "seed": seed})
    return {m: unstack_state(st, 0) for m, st in stacked.items()}, history


def _teacher(runner: _Runner, config, seed: int) -> tuple[teachers.FrozenTeacher, bool]:
  tcfg = config.teacher
  n = runner.data.num_classes["teacher"]
  path = tcfg.get("checkpoint") or ""
  if path:
    path = path.format(setting=runner.data.setting.name, seed=seed)
  path = os.path.abspath(path or os.path.join(runner.workdir, "teacher", "checkpoint"))
  if os.path.exists(path):
    return teachers.restore_teacher(path, tcfg.model, num_classes=n, **_options(tcfg)), False
  if tcfg.get("checkpoint"):
    raise FileNotFoundError(f"teacher checkpoint {path} (config.teacher.checkpoint) does not "
                            "exist; leave it empty to train a teacher in the workdir.")
  model = create_model(tcfg.model, num_classes=n, seed=seed + 1000, **_options(tcfg))
  state, _ = runner.fit("teacher", model, tcfg, "ce:1", "teacher", seed=seed + 1000)
  teachers.save_teacher(path, state.model(), overwrite=True, model_name=tcfg.model,
                        num_classes=n, model_options=_options(tcfg))
  return teachers.restore_teacher(path, tcfg.model, num_classes=n, **_options(tcfg)), True


def _as_model(frozen: teachers.FrozenTeacher) -> nnx.Module:
  """A trainable copy of a restored model."""
  variables = jax.tree.map(jnp.array, dict(frozen.variables))
  return nnx.merge(frozen.graphdef, variables["params"], variables["batch_stats"])


def _stage1(runner: _Runner, config, init_state, graphdef, teacher, seed: int) -> dict[str, Any]:
  """Relationship matching with NCM selection on the validation split; returns the selection."""
  cfg = config.stage1
  scfg = config.student
  n = runner.data.num_classes["student"]
  best_path = os.path.join(runner.workdir, "stage1", "best")
  info_path = os.path.join(runner.workdir, "stage1", "best.json")
  best = {"step": -1, "val_ncm_accuracy": -1.0}
  if os.path.exists(info_path):
    best = loop.read_json(info_path, what="the selected stage-1 step")

  def eval_fn(state: TrainState):
    variables = state.variables()
    centers = embedding_class_centers(state.graphdef, variables,
                                      runner.data.eval("student", "train"), n)
    acc = ncm_evaluate(state.graphdef, variables, centers, runner.data.eval("student", "val"))
    step = int(jax.device_get(state.step))
    if acc > best["val_ncm_accuracy"]:
      best.update(step=step, val_ncm_accuracy=acc)
      teachers.save_teacher(best_path, state.model(), overwrite=True, model_name=scfg.model,
                            num_classes=n, model_options=_options(scfg))
      if jax.process_index() == 0:
        with open(info_path + ".tmp", "w") as f:  # written whole or not at all
          json.dump(best, f)
        os.replace(info_path + ".tmp", info_path)
    return {"split": "val", "ncm_accuracy": acc}

  spe = runner.data.steps_per_epoch("student")
  model = nnx.merge(graphdef, jax.tree.map(jnp.array, init_state))
  runner.fit(os.path.join("stage1", "train"), model, cfg, cfg.loss, "student", teacher=teacher,
             loss_options=_loss_options(cfg), eval_fn=eval_fn,
             eval_every=int(cfg.get("eval_every_steps", 0) or 0) or
             int(cfg.get("eval_every_epochs", 10) or 0) * spe, seed=seed)
  selected = teachers.restore_teacher(best_path, scfg.model, num_classes=n, **_options(scfg))
  return {"model": selected, **best}


def _lambda_methods(cfg) -> dict[str, float]:
  """{method name: lambda} of the stage-2 grid `cfg.lambdas` ("lambda_<value>")."""
  lambdas = [float(x) for x in (cfg.get("lambdas") or (100.0,))]
  bad = [x for x in lambdas if not (np.isfinite(x) and x >= 0)]
  if bad:
    raise ValueError(f"stage2.lambdas must be finite and >= 0, got {bad}.")
  return {f"lambda_{x:g}": x for x in lambdas}


def _control(cfg) -> str:
  names = [m for m, lam in _lambda_methods(cfg).items() if lam == 0]
  if not names:
    raise ValueError("stage2.lambdas must include 0 (the control: CE from the same stage-1 "
                     "start).")
  return names[0]


def stage2_specs(cfg) -> dict[str, str]:
  """Stage 2's students: "lambda_<x>" -> `ce:1,refilled_classifier:x` ("ce:1" at 0) for every
  lambda of `cfg.lambdas`, and "student_alone" -> "ce:1"."""
  out = {m: "ce:1" if lam == 0 else f"ce:1,refilled_classifier:{lam:g}"
         for m, lam in _lambda_methods(cfg).items()}
  _control(cfg)
  return {**out, "student_alone": "ce:1"}


def _split(frozen: teachers.FrozenTeacher):
  """(graphdef, state) of a trainable copy of a restored model."""
  return nnx.split(_as_model(frozen))


def run_setting(config: ml_collections.ConfigDict, setting: str | class_splits.Setting,
                workdir: str, *, seed: int | None = None, data: TaskData | None = None
                ) -> dict[str, Any]:
  """Teacher, ReFilled stage 1 and 2, and the student-alone baseline for one split and seed.

  Args:
    config: a ReFilled config (experiments/configs/refilled_*.py).
    setting: a name of `config.class_settings` presets ("same", "overlap", "disjoint", ...) or
      a `class_splits.Setting`.
    workdir: this run's directory (checkpoints, metrics, results.json); resumed if present.
    seed: the run's seed (data split and order, initialisations); default `config.seed`.
    data: the task data (default `TaskData(config, setting, seed=seed)`).

  Returns:
    The dict written to `<workdir>/results.json`: teacher accuracy on A's test split, the
    selected stage-1 step with its validation and test NCM accuracy, and the test (and
    validation) accuracy of ReFilled and of the student alone on B.
  """
  seed = int(config.seed if seed is None else seed)
  if isinstance(setting, str):
    setting = settings(config)[setting]
  data = data or TaskData(config, setting, seed=seed)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  runner = _Runner(config, workdir, data)
  scfg, n = config.student, data.num_classes["student"]

  teacher, trained = _teacher(runner, config, seed)
  graphdef, init_state = nnx.split(create_model(scfg.model, num_classes=n, seed=seed,
                                                **_options(scfg)))
  # Stage 1.
  sel = _stage1(runner, config, init_state, graphdef, teacher, seed)
  # Stage 2 from the selected stage-1 model, one student per lambda of the grid (lambda = 0 is
  # the control: CE only from the same stage-1 start), and the student alone (CE from the random
  # initialisation), all in one program over the same batches, the teacher's global centres
  # attached (`with_class_centers`).
  s2 = config.stage2
  centers = embedding_class_centers(teacher.graphdef, teacher.variables,
                                    data.eval("student", "train"), n)
  teacher2 = with_class_centers(teacher, centers)
  specs = stage2_specs(s2)
  states, _ = runner.fit_stage2(
      specs, {m: (graphdef, init_state) if m == "student_alone" else _split(sel["model"])
              for m in specs},
      s2, teacher2, _loss_options(s2), seed=seed)

  # The teacher-induced classifier (argmax over the student's classes of <phi_T(x), c / |c|>, the
  # stage-2 target) on the validation split: a diagnostic of what stage 2 distils.
  induced_val = ncm_evaluate(teacher.graphdef, teacher.variables, centers,
                             data.eval("student", "val"))
  # Final evaluation: the only place that reads the test splits.
  val = {m: runner.accuracy(st.graphdef, st.variables(), "student", "val")
         for m, st in states.items()}
  lambdas = _lambda_methods(s2)
  chosen = max(lambdas, key=lambda m: (val[m], -lambdas[m]))  # ties: the smaller lambda
  smodel = sel["model"]
  s1_centers = embedding_class_centers(smodel.graphdef, smodel.variables,
                                       data.eval("student", "train"), n)
  stage2 = {m: {"loss": specs[m], "lambda": lambdas.get(m), "val_accuracy": val[m],
                "test_accuracy": runner.accuracy(st.graphdef, st.variables(), "student", "test")}
            for m, st in states.items()}
  results = {
      "dataset": config.dataset, "setting": setting.name, "seed": seed,
      "teacher_classes": list(setting.teacher_classes),
      "student_classes": list(setting.student_classes),
      "teacher": {"model": config.teacher.model, "trained_here": trained,
                  "test_accuracy": runner.accuracy(teacher.graphdef, teacher.variables,
                                                   "teacher", "test"),
                  "induced_classifier_val_accuracy": induced_val},
      "student_model": scfg.model,
      "stage1": {"selected_step": sel["step"], "val_ncm_accuracy": sel["val_ncm_accuracy"],
                 "test_ncm_accuracy": ncm_evaluate(smodel.graphdef, smodel.variables,
                                                   s1_centers, data.eval("student", "test"))},
      "stage2": stage2,
      # lambda chosen on validation accuracy; "lambda_0" is the control (same stage-1 start).
      "refilled": {**stage2[chosen], "selected": chosen},
      "control": stage2[_control(s2)],
      "student_alone": stage2["student_alone"],
  }
  if induced_val < val["student_alone"]:
    logging.warning(
        "ReFilled (%s, seed %d): the teacher-induced classifier that stage 2 distils is worse on "
        "validation (%.4f) than the student alone (%.4f); a large lambda copies it.",
        setting.name, seed, induced_val, val["student_alone"])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results


def _cub_settings() -> dict[str, class_splits.Setting]:
  """CUB-200: "full" (both on all 200 classes) and 100/100 splits with the student on 100-199."""
  out = {"full": class_splits.Setting("full", tuple(range(200)), tuple(range(200)))}
  out.update(class_splits.generalized_settings(200, 100, num_shared=50))
  return out


def settings(config: ml_collections.ConfigDict) -> dict[str, class_splits.Setting]:
  """The class-split presets named by `config.class_settings` ("digits", "cifar100", "cub"), or
  explicit `config.custom_settings` {name: (teacher_classes, student_classes)}."""
  custom = dict(config.get("custom_settings", {}) or {})
  if custom:
    return {k: class_splits.Setting(k, tuple(v[0]), tuple(v[1])) for k, v in custom.items()}
  presets = {"digits": class_splits.digits_settings, "cifar100": class_splits.cifar100_settings,
             "cub": _cub_settings}
  name = config.get("class_settings", config.dataset)
  if name not in presets:
    raise ValueError(f"unknown class_settings {name!r}; expected one of {sorted(presets)} or "
                     "config.custom_settings.")
  return presets[name]()


# ------------------------------------------------------------------------------------ sweep


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per setting: mean and sample standard deviation over seeds of every accuracy, the selected
  lambdas, and the paired (by seed) differences of ReFilled from the student alone and from the
  lambda = 0 control, with 95 % t-intervals."""
  from experiments.runner import paired_difference  # pylint: disable=g-import-not-at-top
  out = {}
  for name in dict.fromkeys(r["setting"] for r in runs):
    rs = [r for r in runs if r["setting"] == name]
    cols = {"teacher": [r["teacher"]["test_accuracy"] for r in rs],
            "induced_classifier_val": [r["teacher"]["induced_classifier_val_accuracy"]
                                       for r in rs],
            "student_alone": [r["student_alone"]["test_accuracy"] for r in rs],
            "control": [r["control"]["test_accuracy"] for r in rs],
            "refilled": [r["refilled"]["test_accuracy"] for r in rs],
            "stage1_ncm": [r["stage1"]["test_ncm_accuracy"] for r in rs]}
    for m in rs[0]["stage2"]:
      if m.startswith("lambda_") and all(m in r["stage2"] for r in rs):
        cols[m] = [r["stage2"][m]["test_accuracy"] for r in rs]
    out[name] = {"seeds": [r["seed"] for r in rs],
                 "selected": [r["refilled"]["selected"] for r in rs],
                 **{k: {"mean": float(np.mean(v)),
                        "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
                    for k, v in cols.items()},
                 "paired": {"refilled - student_alone": paired_difference(
                                cols["refilled"], cols["student_alone"]),
                            "refilled - control": paired_difference(
                                cols["refilled"], cols["control"]),
                            "control - student_alone": paired_difference(
                                cols["control"], cols["student_alone"])}}
  return out


def table(summary: Mapping[str, Mapping[str, Any]]) -> str:
  """A text table per setting: test accuracy % (mean ± std over seeds) and ReFilled's paired
  differences (95 % t-interval) from the student alone and from the lambda = 0 control."""
  fmt = lambda d: f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"  # noqa: E731

  def diff(d):
    ci = "" if d["ci95"] is None else f" [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"
    return f"{100 * d['mean']:+.2f}{ci}"

  head = ("setting", "seeds", "teacher (A)", "induced clf (val)", "student alone",
          "lambda=0 control", "ReFilled (lambda on val)", "vs alone", "vs control",
          "stage-1 NCM")
  rows = [head]
  for name, s in summary.items():
    rows.append((name, str(len(s["seeds"])), fmt(s["teacher"]), fmt(s["induced_classifier_val"]),
                 fmt(s["student_alone"]), fmt(s["control"]), fmt(s["refilled"]),
                 diff(s["paired"]["refilled - student_alone"]),
                 diff(s["paired"]["refilled - control"]), fmt(s["stage1_ncm"])))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
  lines = [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]
  for name, s in summary.items():
    grid = ", ".join(f"{k[len('lambda_'):]}: {fmt(v)}" for k, v in s.items()
                     if k.startswith("lambda_"))
    lines.append(f"{name}: lambda selected per seed {s['selected']}; test by lambda {grid}")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str, *,
        overwrite: bool = False) -> dict[str, Any]:
  """Every setting in `config.settings` x every seed in `config.seeds`; prints the table.

  Each run goes to `<workdir>/<setting>/seed_<seed>` (resumable); the summary and every run's
  results are written to `<workdir>/results.json`. The workdir is locked for the run and must
  hold a run of the same configuration (`kd_jax.workdir`; `overwrite=True` empties it first).
  """
  if config.get("distributed", False):
    from experiments.runner import distributed_options  # pylint: disable=g-import-not-at-top
    parallel.initialize_distributed(**distributed_options(config))
  for who in ("teacher", "student"):
    precision.check(config[who], who)
  _check_settings(config)  # before the workdir is touched
  with workdir_lib.open_workdir(os.path.abspath(workdir), config, overwrite=overwrite,
                                primary=jax.process_index() == 0):
    return _run(config, workdir)


def _check_settings(config) -> None:
  presets = settings(config)
  unknown = [s for s in config.settings if s not in presets]
  if unknown:
    raise ValueError(f"unknown setting(s) {unknown}; this config knows {sorted(presets)}.")


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  presets = settings(config)
  names = list(config.settings)
  seeds = [int(s) for s in (config.get("seeds") or (config.seed,))]
  runs = [run_setting(config, presets[name], os.path.join(workdir, name, f"seed_{seed}"),
                      seed=seed)
          for name in names for seed in seeds]
  summary = summarize(runs)
  out = {"dataset": config.dataset, "teacher_model": config.teacher.model,
         "student_model": config.student.model, "summary": summary, "runs": runs}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(out, f, indent=2)
    print(table(summary), flush=True)
  return out

