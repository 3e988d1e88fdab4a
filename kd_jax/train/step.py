"""The distillation train step: teacher and student in one function, gradients for the student.

`make_train_step` builds a per-device `step(state, batch[, teacher_variables]) -> (state,
metrics)`, as big_vision's `proj/distill` update: the frozen teacher runs inside the same
(jitted) step in inference mode under `stop_gradient`, so it sees exactly the student's view of
the batch; the student runs in train mode; the loss is the weighted sum of the configured terms
(`kd_jax.train.terms`), differentiated with respect to the student's parameters (and the loss
terms' own heads, below). Under data parallelism (`axis_name="batch"`, see `kd_jax.parallel`)
gradients, batch statistics and metrics are averaged with `jax.lax.pmean` (batch norm
normalises with each device's statistics unless `sync_batch_norm`; dropout draws per device);
with `axis_name=None`
the same step runs on one device. With `cached_teacher` the teacher's outputs come with the batch
(`kd_jax.data.teacher_cache`) and the step runs no teacher at all.

The teacher's outputs are put under `jax.lax.stop_gradient` here, once; no loss stops
gradients itself. Loss terms own their parameters and state (`kd_jax.train.terms.LossTerm`):
`step.init(state, batch, teacher_variables, num_data=N)` runs every term's `init` on the
models' output shapes and stores the results in `TrainState.term_params` (differentiated and
updated together with the student, `TrainState.trainable()`) and `TrainState.term_state`
(replaced by what the term returns, after the optimizer update). Stateful terms combine their
state over the data-parallel axis themselves, so every replica holds the same state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_jax.data import mixing as mixing_lib
from kd_jax.data.mixing import Mixing
from kd_jax.parallel import BATCH_AXIS
from kd_jax.teachers import Ensemble, EnsembleOf
from kd_jax.train import dot_optim as dot_lib
from kd_jax.train.state import TrainState, split_trainable
from kd_jax.train.terms import Outputs, TermContext, init_terms, needs_teacher, owns_variables
from kd_jax.train.terms import parse_terms
from kd_jax.train.terms import run_terms
from kd_jax.train.terms import ensemble as ensemble_terms


def apply_model(graphdef: nnx.GraphDef, params, model_state, x, *, train: bool,
                axis_name: str | None = None, sync_batch_norm: bool = False):
  """Runs an NNX classifier given as pytrees; returns (Outputs, updated non-param state).

  In train mode over a data-parallel `axis_name`, every RNG stream key (dropout) is folded with
  the device's `jax.lax.axis_index`, so devices draw different masks (the returned state keeps
  the shared keys), and with `sync_batch_norm` every `nnx.BatchNorm` normalises with the
  statistics of the whole mapped batch (`pmean` of E[x], E[x^2] over `axis_name`) instead of
  its device's shard.
  """
  # Fresh Variable objects owned by the current trace (BatchNorm mutates its statistics).
  params, model_state = jax.tree.map(lambda v: v, (params, model_state))
  mapped = train and axis_name is not None
  run_state = model_state
  if mapped:
    index = jax.lax.axis_index(axis_name)
    run_state = jax.tree.map(lambda v: jax.random.fold_in(v, index) if _is_key(v) else v,
                             model_state)
  model = nnx.merge(graphdef, params, run_state)
  if mapped and sync_batch_norm:
    for _, module in model.iter_modules():
      if isinstance(module, nnx.BatchNorm):
        module.axis_name = axis_name
  logits, features = model(x, train=train)
  new_state = nnx.state(model, nnx.Not(nnx.Param))
  if mapped:
    new_state = jax.tree.map(lambda new, old: old if _is_key(old) else new, new_state,
                             model_state)
  return Outputs(logits, dict(features)), new_state


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def teacher_outputs(teacher_graphdef: nnx.GraphDef, teacher_variables: Mapping[str, Any],
                    x) -> Outputs:
  """The frozen teacher's outputs: inference mode (BN running statistics), no gradient. For a
  `kd_jax.teachers.Ensemble` (and a tuple of the members' variables), every member's outputs
  combined as `kd_jax.train.terms.ensemble.combine_outputs`."""
  if isinstance(teacher_graphdef, Ensemble):
    if len(teacher_variables) != len(teacher_graphdef.graphdefs):
      raise ValueError(f"the teacher ensemble has {len(teacher_graphdef.graphdefs)} members but "
                       f"{len(teacher_variables)} sets of teacher variables were given.")
    members = [teacher_outputs(g, v, x)
               for g, v in zip(teacher_graphdef.graphdefs, teacher_variables)]
    return ensemble_terms.combine_outputs(members, weights=teacher_graphdef.weights,
                                          combine=teacher_graphdef.combine,
                                          temperature=teacher_graphdef.temperature)
  variables = jax.lax.stop_gradient(dict(teacher_variables))
  out, _ = apply_model(teacher_graphdef, variables["params"], variables["batch_stats"], x,
                       train=False)
  return out


def cached_teacher_outputs(batch: Mapping[str, jax.Array], prefix: str = "teacher_") -> Outputs:
  """The teacher's outputs carried by a batch: `batch[prefix + "logits"]` and every other
  `batch[prefix + name]` as feature `name` (the layout of `kd_jax.data.teacher_cache.attach`)."""
  logits_key = prefix + "logits"
  if logits_key not in batch:
    raise ValueError(
        f"cached_teacher={prefix!r}: the batch has no {logits_key!r} entry (keys: "
        f"{sorted(batch)}); attach the cache to the dataset with "
        "kd_jax.data.teacher_cache.attach.")
  features = {k[len(prefix):]: v for k, v in batch.items()
              if k.startswith(prefix) and k != logits_key}
  return Outputs(batch[logits_key], features)


def _pmean_floats(tree, axis_name):
  return jax.tree.map(
      lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def make_train_step(loss, *,
                    teacher_graphdef: nnx.GraphDef | None = None,
                    loss_options: Mapping[str, Mapping[str, Any]] | None = None,
                    axis_name: str | None = BATCH_AXIS,
                    input_key: str = "image",
                    cached_teacher: str | None = None,
                    sync_batch_norm: bool = False,
                    teacher_input_key: str | None = None,
                    mixing: Mixing | None = None,
                    nonfinite: str = "stop") -> Callable[..., tuple[TrainState, dict]]:
  """Builds the per-device step for the weighted sum of loss terms `loss`.

  total(step) = sum_k w_k(step) * L_k(student(x), teacher(x), batch), with w_k the term's weight
  after its linear warm-up (`Term.weight_at`).

  Args:
    loss: a loss spec such as "ce:0.1,kd:0.9", parsed `Term`s, a `LossTerm`, or a plain callable
      `fn(ctx: TermContext) -> scalar` (see `terms.parse_terms`).
    teacher_graphdef: the teacher's graph definition (its variables are a step argument, so large
      teachers are not baked into the program as constants); None for training without a teacher
      (only terms such as "ce" are then allowed); or a `kd_jax.teachers.Ensemble` (then
      `teacher_variables` is the tuple of the members' variables, `FrozenEnsemble.variables`).
    loss_options: per-term options, e.g. {"kd": {"temperature": 4.0}}.
    axis_name: the data-parallel axis to `pmean` over; None for a plain single-device step.
    input_key: the batch entry fed to the student (and to the teacher, unless
      `teacher_input_key`).
    cached_teacher: read the teacher's outputs from the batch instead of running a teacher: the
      prefix of the batch keys that hold them, e.g. `"teacher_"` for the columns that
      `kd_jax.data.teacher_cache.attach` adds ("teacher_logits" and one "teacher_<feature>"
      per cached feature). The step then costs a student step; use it only for inputs without
      random augmentation (the cache holds the teacher's view of the un-augmented example).
      Excludes `teacher_graphdef`.
    sync_batch_norm: the student's batch norms take their statistics over the global batch
      (reduced over `axis_name`) instead of each device's shard (the default, RepDistiller's
      per-GPU statistics); a no-op without `axis_name`.
    teacher_input_key: the batch entry fed to the teacher when it differs from the student's
      (e.g. a higher-resolution view of the same examples); None: `input_key`.
    mixing: a `kd_jax.data.mixing.Mixing` (mixup or CutMix): the step mixes the student's and
      the teacher's inputs with the same draw, keyed by `(mixing.seed, state.step)`, before
      either model runs (function matching; the "ce" term then mixes the labels).
    nonfinite: the guard against NaN/inf. "stop" (default): metrics["finite"] is 1.0 when the
      loss and every gradient are finite, else 0.0 (one reduction over the gradients, after
      their `pmean`), and `kd_jax.train.fit` stops there naming the step and the term;
      "skip": in addition a non-finite step leaves the state unchanged (the step counter and
      the rng advance) and `fit` counts it; "off": no check (for timing the check itself).

  Returns:
    `step(state, batch, teacher_variables=None) -> (new_state, metrics)`, where metrics hold
    "loss" (the weighted total), "loss/<term>" (each unweighted term), "weight/<term>" (its
    current weight) and "accuracy" (student top-1 on the batch), all averaged over devices.
    `step.terms` holds the parsed terms; `step.init(state, batch, teacher_variables=None, *,
    num_data=None)` returns `state` with every term's parameters and state initialised (call it
    once before training when `step.owns_variables`: fitnet, cc, crd); `step.batch_keys` names
    the batch entries the terms read besides the input and labels.

    When the state's optimizer is `kd_jax.train.dot(...)` (DOT), the step differentiates the task
    loss (the terms that read no teacher, "ce") and the distillation loss (the others)
    separately, from one forward pass, and passes `{"task": g, "kd": g}` to it.

  Raises:
    ValueError: an unknown term, or a term that needs a teacher when none is given.
  """
  terms = parse_terms(loss, loss_options)
  if isinstance(teacher_graphdef, Ensemble) and teacher_graphdef.combine == "per_teacher":
    terms = ensemble_terms.per_teacher_terms(terms, teacher_graphdef.weights)
  if nonfinite not in NONFINITE_MODES:
    raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}.")
  if cached_teacher is not None and teacher_graphdef is not None:
    raise ValueError("pass either teacher_graphdef (run the teacher in the step) or "
                     "cached_teacher (read its outputs from the batch), not both.")
  if mixing is not None and cached_teacher is not None:
    raise ValueError("mixing needs the teacher in the step: cached teacher outputs belong to the "
                     "unmixed inputs (function matching gives both models the same mixed batch).")
  if needs_teacher(terms) and teacher_graphdef is None and cached_teacher is None:
    raise ValueError(f"the loss {', '.join(map(str, terms))} needs a teacher "
                     "(teacher_graphdef is None and no cached_teacher).")

  def teacher_of(batch, teacher_variables):
    if teacher_graphdef is not None:
      if teacher_variables is None:
        raise ValueError("this step was built with a teacher: pass teacher_variables.")
      return teacher_outputs(teacher_graphdef, teacher_variables,
                             batch[teacher_input_key or input_key])
    if cached_teacher is not None:
      if teacher_variables is not None:
        raise ValueError("this step reads the teacher from the batch (cached_teacher); "
                         "do not pass teacher_variables.")
      return cached_teacher_outputs(batch, cached_teacher)
    return None

  def prepare(batch: Mapping[str, jax.Array], step_count) -> Mapping[str, jax.Array]:
    """The batch both models read at `step_count`: mixed when `mixing` is set."""
    if mixing is None:
      return batch
    keys = [input_key] + ([teacher_input_key] if teacher_input_key else [])
    return mixing_lib.mix_batch(batch, mixing, step=step_count, keys=keys)

  def step(state: TrainState, batch: Mapping[str, jax.Array], teacher_variables=None):
    batch = prepare(batch, state.step)
    # The one place where the teacher is frozen: no loss stops gradients itself.
    teacher = jax.lax.stop_gradient(teacher_of(batch, teacher_variables))
    return update(state, batch, teacher)

  def update(state: TrainState, batch: Mapping[str, jax.Array], teacher: Outputs | None):
    """The student's update given the (frozen) teacher outputs of this batch."""
    x = batch[input_key]
    rng, step_rng = jax.random.split(state.rng)
    dot = dot_lib.is_dot(state.tx)

    def loss_fn(trainable):
      params, term_params = split_trainable(trainable, state.term_params)
      student, new_model_state = apply_model(state.graphdef, params, state.batch_stats, x,
                                             train=True, axis_name=axis_name,
                                             sync_batch_norm=sync_batch_norm)
      ctx = TermContext(student=student, teacher=teacher, batch=batch, student_params=params,
                        axis_name=axis_name, step=state.step, rng=step_rng)
      values, new_term_state = run_terms(terms, ctx, term_params, state.term_state)
      weights = {t.name: t.weight_at(state.step) for t in terms}
      if dot:  # DOT: the task and the distillation loss, differentiated separately
        total = dot_lib.group_totals(terms, values, weights)
      else:
        total = sum(weights[t.name] * values[t.name] for t in terms)
      return total, (values, weights, new_model_state, student.logits, new_term_state)

    if dot:  # {"task": g, "kd": g} from one forward (`kd_jax.train.dot_optim`)
      grads, aux = dot_lib.two_gradients(loss_fn, state.trainable())
    else:
      grads, aux = jax.grad(loss_fn, has_aux=True)(state.trainable())
    values, weights, new_model_state, logits, new_term_state = aux
    total = sum(weights[k] * values[k] for k in values)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    where = batch.get("mask")
    if where is not None:
      correct = jnp.where(where, correct, 0.0)
    accuracy = jnp.sum(correct) / jnp.maximum(
        jnp.sum(jnp.ones_like(correct) if where is None else where.astype(jnp.float32)), 1.0)
    metrics = {"loss": total, "accuracy": accuracy,
               **{f"loss/{k}": v for k, v in values.items()},
               **{f"weight/{k}": jnp.asarray(w, jnp.float32) for k, w in weights.items()}}
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      new_model_state = _pmean_floats(new_model_state, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    trainable = state.trainable()
    updates, opt_state = state.tx.update(grads, state.opt_state, trainable)
    params, term_params = split_trainable(
        jax.tree.map(lambda p, u: p + u, trainable, updates), state.term_params)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_model_state,
                              opt_state=opt_state, rng=rng, term_params=term_params,
                              term_state={**state.term_state, **new_term_state})
    if nonfinite != "off":
      finite = jnp.isfinite(metrics["loss"]) & all_finite(grads)
      metrics["finite"] = finite.astype(jnp.float32)
      if nonfinite == "skip":  # the step counter and the rng advance; nothing else changes
        new_state = new_state.replace(**{f: keep_if(finite, getattr(new_state, f),
                                                    getattr(state, f)) for f in _UPDATED})
    return new_state, metrics

  def init(state: TrainState, batch: Mapping[str, Any], teacher_variables=None, *,
           num_data: int | None = None) -> TrainState:
    """`state` with every term's `init(rng, student, teacher, num_data=...)` stored in
    `term_params` / `term_state` and the optimizer state re-initialised on the joint tree. The
    outputs are abstract (shapes of the models' outputs on `batch`); no model runs."""
    def outputs(batch, teacher_variables):
      x = batch[input_key]
      student, _ = apply_model(state.graphdef, state.params, state.batch_stats, x, train=False)
      return student, teacher_of(batch, teacher_variables)

    student, teacher = jax.eval_shape(outputs, dict(batch), teacher_variables)
    params, term_state = init_terms(terms, state.rng, student, teacher, num_data=num_data)
    if not params and not term_state:
      return state
    return state.with_terms(params=params, state=term_state)

  step.terms = terms
  step.init = init
  # Whether `init` has anything to do, and the batch entries the terms read (CRD: "index").
  step.owns_variables = any(owns_variables(t.term) for t in terms)
  step.batch_keys = frozenset(k for t in terms for k in t.term.batch_keys)
  step.update = update
  step.teacher_of = teacher_of
  step.prepare = prepare
  step.nonfinite = nonfinite
  return step


NONFINITE_MODES = ("stop", "skip", "off")
_UPDATED = ("params", "batch_stats", "opt_state", "term_params", "term_state")


def all_finite(tree) -> jax.Array:
  """True when every float leaf of `tree` is finite: one sum per leaf, added up (a NaN or inf
  anywhere, or finite values so large that they overflow, make the total non-finite)."""
  sums = [jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.isfinite(sum(sums)) if sums else jnp.asarray(True)


def keep_if(ok, new, old):
  """`new` where the scalar `ok` holds, else `old`, leaf by leaf (the skip of a bad step)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def stack_states(states: Sequence[TrainState]) -> TrainState:
  """One `TrainState` whose every leaf has a leading axis of `len(states)` (for
  `make_multi_student_step`); the states must share the model structure and the optimizer."""
  states = list(states)
  if not states:
    raise ValueError("stack_states needs at least one state.")
  # The first state's graph definition and optimizer are used for all (equal optimizers built
  # separately are different objects, so tree structures are compared by their leaves).
  leaves = [jax.tree.leaves(s) for s in states]
  shapes = [[(jnp.shape(x), x.dtype) for x in ls] for ls in leaves]
  for i, sh in enumerate(shapes[1:], 1):
    if sh != shapes[0]:
      raise ValueError(f"state {i} differs from state 0 in its arrays (another model, optimizer "
                       "or loss terms); only equal students can be stacked.")
  return jax.tree.unflatten(jax.tree.structure(states[0]),
                            [jnp.stack(xs) for xs in zip(*leaves)])


def unstack_state(stacked: TrainState, index: int) -> TrainState:
  """Student `index` of a stacked state (the inverse of `stack_states`)."""
  return jax.tree.map(lambda x: x[index], stacked)


def make_multi_student_step(methods: Mapping[str, Any], *,
                            teacher_graphdef: nnx.GraphDef | None = None,
                            loss_options: Mapping[str, Mapping[str, Mapping[str, Any]]] | None
                            = None, axis_name: str | None = BATCH_AXIS, input_key: str = "image",
                            cached_teacher: str | None = None,
                            sync_batch_norm: bool = False,
                            teacher_input_key: str | None = None,
                            mixing: Mixing | None = None, student_map: str = "vmap",
                            nonfinite: str = "stop",
                            method_teachers: Mapping[str, int | EnsembleOf] | None = None
                            ) -> Callable[..., tuple[dict, dict]]:
  """Many students per teacher forward: every method's students trained in one program.

  A KD table is many students (methods x seeds) distilled from one teacher on the same data.
  This step runs the teacher once per batch and updates, for each method, a stack of students
  (`stack_states`: one per seed or hyperparameter draw, vmapped) with that method's loss; the
  methods are a static list, so they may use different terms. Each student's update is exactly
  `make_train_step(spec, ...)`'s on the same batch (tests/train/test_multi_student.py).

  Args:
    methods: {method name: loss spec} (as `make_train_step`'s `loss`).
    teacher_graphdef, axis_name, input_key, cached_teacher: as `make_train_step`;
      `teacher_graphdef` may also be a tuple of teachers' graph definitions (a pool, see
      `method_teachers`).
    sync_batch_norm, teacher_input_key, mixing, nonfinite: as `make_train_step` (every student
      sees the same mixed batch, keyed by the step count; each student's "<method>/finite"
      metric, and skipping, are per student).
    loss_options: {method name: per-term options} (optional).
    method_teachers: with a pool of teachers (`teacher_graphdef` a tuple of graph definitions,
      `teacher_variables` the tuple of their variables): {method: which teacher it distils},
      either a pool index or a `kd_jax.teachers.EnsembleOf` (several members combined as
      `kd_jax.teachers.Ensemble`, e.g. the mean of their softmaxes at temperature T); methods
      not named read teacher 0. Every teacher some method reads runs once per batch, inside
      the same program, and each combination is formed from those outputs.
    student_map: how a method's stacked students are run: "vmap" (one vectorised program) or
      "unroll" (each student traced in turn, the same program as a single run, repeated). On
      XLA:CPU a vmapped convolution with per-student kernels becomes a grouped convolution,
      2-3x slower than the separate ones (benchmarks/README.md, `study.py`), so use "unroll" for
      convolutional students on CPU; compilation then grows with the number of students.

  Returns:
    `step(states, batch, teacher_variables=None) -> (states, metrics)` with `states` a dict
    {method: stacked TrainState} and metrics {"<method>/<metric>": [num_students]}.
    `step.steps` holds each method's `make_train_step` (its `.terms` and `.init`).
  """
  loss_options = dict(loss_options or {})
  if student_map not in ("vmap", "unroll"):
    raise ValueError(f"student_map must be 'vmap' or 'unroll', got {student_map!r}.")
  unknown = sorted(set(loss_options) - set(methods))
  if unknown:
    raise ValueError(f"loss_options for unknown method(s) {unknown}; methods: {sorted(methods)}.")
  pool = tuple(teacher_graphdef) if isinstance(teacher_graphdef, (tuple, list)) else None
  views = _method_teachers(methods, pool, method_teachers, cached_teacher)
  graphdefs = {name: teacher_graphdef if pool is None else
               (pool[v] if isinstance(v, int) else v.resolve(pool)) for name, v in views.items()}
  steps = {name: make_train_step(spec, teacher_graphdef=graphdefs[name],
                                 loss_options=loss_options.get(name), axis_name=axis_name,
                                 input_key=input_key, cached_teacher=cached_teacher,
                                 sync_batch_norm=sync_batch_norm,
                                 teacher_input_key=teacher_input_key, mixing=mixing,
                                 nonfinite=nonfinite)
           for name, spec in methods.items()}
  if not steps:
    raise ValueError("make_multi_student_step needs at least one method.")
  any_step = next(iter(steps.values()))

  def step(states: Mapping[str, TrainState], batch, teacher_variables=None):
    if set(states) != set(steps):
      raise ValueError(f"states hold methods {sorted(states)}, the step {sorted(steps)}.")
    if mixing is not None:  # one draw for all students: the step count of the first one
      batch = any_step.prepare(batch, states[next(iter(steps))].step[0])
    teacher_of = jax.lax.stop_gradient(method_teacher_outputs(batch, teacher_variables))
    new_states, metrics = {}, {}
    for name, sub in steps.items():
      teacher = teacher_of[name]
      if student_map == "vmap":
        new_states[name], m = jax.vmap(sub.update, in_axes=(0, None, None))(
            states[name], batch, teacher)
      else:
        count = jax.tree.leaves(states[name])[0].shape[0]
        outs = [sub.update(jax.tree.map(lambda x, i=i: x[i], states[name]), batch, teacher)
                for i in range(count)]
        new_states[name], m = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
      metrics.update({f"{name}/{k}": v for k, v in m.items()})
    return new_states, metrics

  def method_teacher_outputs(batch, teacher_variables):
    """{method: its teacher's outputs}; every pool teacher that some method reads runs once."""
    if pool is None:
      teacher = any_step.teacher_of(batch, teacher_variables)
      return {name: teacher for name in steps}
    if teacher_variables is None or len(teacher_variables) != len(pool):
      got = None if teacher_variables is None else len(teacher_variables)
      raise ValueError(f"the step has a pool of {len(pool)} teachers; pass a tuple of as many "
                       f"teacher variables (got {got}).")
    x = batch[teacher_input_key or input_key]
    used = sorted({i for v in views.values() for i in ((v,) if isinstance(v, int) else v.members)})
    outs = {i: teacher_outputs(pool[i], teacher_variables[i], x) for i in used}
    result = {}
    for name, v in views.items():
      if isinstance(v, int):
        result[name] = outs[v]
      else:
        ens = graphdefs[name]
        result[name] = ensemble_terms.combine_outputs(
            [outs[i] for i in v.members], weights=ens.weights, combine=ens.combine,
            temperature=ens.temperature)
    return result

  def method_teacher_variables(name, teacher_variables):
    """The teacher variables `step.steps[name]` takes (e.g. for its `init`)."""
    if pool is None:
      return teacher_variables
    v = views[name]
    if isinstance(v, int):
      return teacher_variables[v]
    return tuple(teacher_variables[i] for i in v.members)

  step.steps = steps
  step.nonfinite = nonfinite
  step.method_teacher_variables = method_teacher_variables
  step.method_teacher_outputs = method_teacher_outputs
  return step


def _method_teachers(methods, pool, method_teachers, cached_teacher):
  """{method: pool index or EnsembleOf} (validated); {method: None} without a pool."""
  method_teachers = dict(method_teachers or {})
  if pool is None:
    if method_teachers:
      raise ValueError("method_teachers needs a pool of teachers: pass teacher_graphdef as a "
                       "tuple of graph definitions.")
    return {name: None for name in methods}
  if not pool:
    raise ValueError("the pool of teachers (teacher_graphdef) is empty.")
  if cached_teacher is not None:
    raise ValueError("pass either a pool of teachers (teacher_graphdef) or cached_teacher.")
  unknown = sorted(set(method_teachers) - set(methods))
  if unknown:
    raise ValueError(f"method_teachers for unknown method(s) {unknown}; methods: "
                     f"{sorted(methods)}.")
  views = {}
  for name in methods:
    v = method_teachers.get(name, 0)
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
      if not 0 <= int(v) < len(pool):
        raise ValueError(f"method {name!r} reads teacher {int(v)}, but the pool has "
                         f"{len(pool)}.")
      v = int(v)
    elif not isinstance(v, EnsembleOf):
      raise ValueError(f"method_teachers[{name!r}] must be a pool index or a "
                       f"kd_jax.teachers.EnsembleOf, got {v!r}.")
    views[name] = v
  return views
