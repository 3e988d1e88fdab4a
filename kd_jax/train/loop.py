"""The training loop: steps, progress bar, metrics, periodic evaluation, checkpoints and resume.

`fit` drives a per-device step (`kd_jax.train.step.make_train_step`) over the devices of a mesh
(`jax.shard_map` under `jax.jit`, the default), under `jax.pmap`, or on one device; the jitted
paths compile with `kd_jax.compile_options`. It writes to
`workdir`::

    metrics.jsonl         one JSON object per logged step or evaluation
    tensorboard/          TensorBoard event files (tensorboardX)
    checkpoints/<step>/   Orbax checkpoints of the full student state every `checkpoint_every`
                          steps and at the end

and, when restarted with the same workdir, resumes from the last checkpoint: the state (params,
batch statistics, optimizer state, step, rng, extra) is restored and the data iterator restarts
at that step (`train_batches(start_step)`), so an interrupted and resumed run ends with the same
parameters as an uninterrupted one (tests/train/test_loop.py). The resumed run's records beyond
its checkpoint are dropped from metrics.jsonl (and TensorBoard) before the replayed steps are
written again, so no record is duplicated, and its history covers the whole run. metrics.jsonl
is strict JSON: a non-finite value is written as null.

A step built with `nonfinite="stop"` (the default of `make_train_step`) reports whether its loss
and gradients are finite; `fit` checks that flag one step late (no wait) and always before a
checkpoint, an evaluation or a log, and stops with `NonFiniteError` naming the step, the batch
index and the term, so the last checkpoint on disk is the last good state.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from kd_jax import checkpoint
from kd_jax import compile_options
from kd_jax import parallel
from kd_jax.train.state import TrainState

Batch = Mapping[str, Any]
Hook = Callable[[int, TrainState, Mapping[str, float]], None]
MODES = ("shard_map", "pmap", "none")


class StopTraining(Exception):
  """Raised by a hook to interrupt `fit` (as a pre-emption would); the last checkpoint stays."""


class NonFiniteError(ValueError):
  """A step's loss or gradient went NaN/inf (`make_train_step(..., nonfinite="stop")`): `fit`
  stops before that state reaches a checkpoint; the message names the step, the batch and the
  term. `step`, `batch_index` and `terms` hold the same as attributes."""

  def __init__(self, message: str, *, step: int, batch_index: int, terms: Sequence[str]):
    super().__init__(message)
    self.step, self.batch_index, self.terms = step, batch_index, list(terms)


def _finite_flags(metrics) -> dict[str, Any]:
  """The step's "finite" metrics ({"finite": x} or {"<method>/finite": [students]})."""
  return {k: v for k, v in metrics.items() if k == "finite" or k.endswith("/finite")}


def _check_finite(step: int, metrics, *, ckpt, writer) -> None:
  """Raises `NonFiniteError` if a "finite" metric of this step is not 1 (one small fetch)."""
  flags = jax.device_get(_finite_flags(metrics))
  if all(np.all(np.asarray(v) == 1.0) for v in flags.values()):
    return
  raw = {k: np.asarray(v) for k, v in jax.device_get(dict(metrics)).items()}
  writer.write(step, "train", scalar_metrics(raw))  # the failing step, non-finite as null
  parts, bad_terms = [], []
  for key, flag in flags.items():
    flag = np.ravel(np.asarray(flag))
    if np.all(flag == 1.0):
      continue
    prefix = key[:-len("finite")]  # "" or "<method>/"
    students = np.flatnonzero(flag != 1.0)
    who = f"method {prefix[:-1]!r}, student(s) {students.tolist()}: " if prefix else ""
    pick = lambda v: np.ravel(v)[students] if v.size > 1 else np.ravel(v)  # noqa: E731
    terms = {k[len(prefix) + 5:]: pick(v) for k, v in raw.items()
             if k.startswith(prefix + "loss/")}
    bad = [t for t, v in terms.items() if not np.all(np.isfinite(v))]
    bad_terms += [prefix + t for t in bad]
    show = lambda v: v[0] if v.size == 1 else v.tolist()  # noqa: E731
    if bad:
      detail = "the loss of term(s) " + ", ".join(
          f"{t!r} (loss/{t} = {show(terms[t])})" for t in bad) + " went non-finite"
    else:
      detail = (f"every term's loss is finite (total {show(pick(raw[prefix + 'loss']))}) but "
                "the gradient is not")
    parts.append(who + detail)
  last = None if ckpt is None else ckpt.latest_step()
  kept = ("no checkpoint was written yet" if last is None else
          f"the last good checkpoint, step {last}, is kept in {ckpt.directory}")
  raise NonFiniteError(
      f"non-finite loss or gradient at step {step} (batch index {step - 1} of the training "
      f"stream): {'; '.join(parts)}. Training stopped; {kept}. (Lower the learning rate or the "
      "term's weight, check the inputs and the teacher, or build the step with "
      "nonfinite='skip' to skip such steps.)", step=step, batch_index=step - 1,
      terms=bad_terms)


def stop_after(num_steps: int) -> Hook:
  """A hook that raises `StopTraining` once the state reaches step `num_steps`."""

  def hook(step, state, metrics):
    del state, metrics
    if step >= num_steps:
      raise StopTraining(f"stopped at step {step}")

  return hook


CHECKSUM_FILE = "kd_jax_checksums.json"


ORBAX_TMP = ".orbax-checkpoint-tmp"


def remove_partial_saves(directory: str) -> list[str]:
  """Deletes the temporary directories (`<step>.orbax-checkpoint-tmp...`) that a save killed
  before Orbax's final rename leaves in `directory`; returns their names. Such a directory is
  never a step, so the previous checkpoint stays the latest (process 0 only)."""
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return []
  removed = sorted(e for e in os.listdir(directory) if ORBAX_TMP in e)
  for entry in removed:
    shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)
  return removed


class Checkpointer:
  """Orbax `CheckpointManager` of the student state under `<workdir>/checkpoints`, every array
  under its key path in the state (`kd_jax.checkpoint`, the codec teachers use too)."""

  def __init__(self, directory: str, *, every: int, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    remove_partial_saves(self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=ocp.StandardCheckpointHandler())
    self.every = every

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def save(self, step: int, state: TrainState) -> None:
    """Writes `state` (whose step is `step`) unless that step is already saved."""
    if step not in self.manager.all_steps():
      saveable = checkpoint.to_saveable(state)
      self.manager.save(step, args=ocp.args.StandardSave(saveable), force=True)
      self.manager.wait_until_finished()
      if jax.process_index() == 0:  # the arrays' CRC-32, verified by `restore`
        path = os.path.join(self.directory, str(step), CHECKSUM_FILE)
        with open(path + ".tmp", "w") as f:
          json.dump(checkpoint.array_checksums(saveable), f)
        os.replace(path + ".tmp", path)

  def restore(self, template: TrainState, sharding=None) -> TrainState:
    """Restores the latest checkpoint into the structure (and sharding) of `template`.

    Raises:
      ValueError: the checkpoint's arrays differ in key path, shape or dtype from the
        template's (a workdir written by another config), naming the checkpoint and the first
        differing arrays by their path in the state.
    """
    step = self.manager.latest_step()
    where = f"checkpoint {self.directory}/{step}"
    target = checkpoint.abstract_saveable(template, sharding)
    broken = (f"{where} is truncated or corrupt ({{}}); delete that step's directory to resume "
              "from the previous checkpoint, or start the run afresh with --overwrite.")
    try:
      meta = self.manager.item_metadata(step)
      saved = dict(getattr(meta, "tree", meta) or {})
    except Exception as e:  # noqa: BLE001 - orbax raises several types for a broken directory
      raise ValueError(broken.format(f"its metadata cannot be read: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                       ) from None
    checkpoint.check_arrays(where, target, saved, what="state of this run",
                            hint=" (was the workdir written with another model, loss or "
                            "optimizer? use a fresh workdir)")
    try:
      restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # noqa: BLE001
      raise ValueError(broken.format(f"reading its arrays failed: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                       ) from None
    sums = os.path.join(self.directory, str(step), CHECKSUM_FILE)
    if os.path.exists(sums):  # checkpoints written before checksums were recorded have none
      checkpoint.verify_checksums(
          where, read_json(sums, what="the checkpoint's checksums"), restored,
          hint=" Delete that step's directory to resume from the previous checkpoint.")
    return checkpoint.from_saveable(template, restored)

  def close(self):
    self.manager.close()


# ---------------------------------------------------------------------- metric writers

class MetricWriter:
  """JSON lines + TensorBoard scalars, written by process 0 only."""

  def __init__(self, workdir: str | None, name: str, *, start_step: int = 0):
    """Opens `workdir/metrics.jsonl` for appending after dropping this run's records beyond
    `start_step` (a resumed run replays those steps, so they are never duplicated); they are
    also purged from TensorBoard. `self.previous` holds the kept records of this run (as
    `fit`'s history entries)."""
    self.active = workdir is not None and jax.process_index() == 0
    self.name = name
    self.previous: list[dict] = []
    if workdir is not None:
      self.previous = _kept_records(os.path.join(workdir, "metrics.jsonl"), name, start_step,
                                    rewrite=self.active)
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tensorboard", name),
                              purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    if not self.active:
      return
    values = {k: float(v) for k, v in metrics.items()}
    # Strict JSON: a non-finite value is written as null (never a bare NaN or Infinity).
    record = {"run": self.name, "split": split, "step": int(step),
              **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
    self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self.jsonl.flush()
    for k, v in values.items():
      if math.isfinite(v):
        self.tb.add_scalar(f"{split}/{k}", v, int(step))

  def close(self) -> None:
    if self.active:
      self.jsonl.close()
      self.tb.close()


def _kept_records(path: str, name: str, start_step: int, *, rewrite: bool) -> list[dict]:
  """The records of run `name` in the metrics file `path` up to `start_step` (history entries,
  without "run"); with `rewrite`, the file is rewritten without this run's later records. A
  torn last line (a kill mid-write) is dropped."""
  if not os.path.exists(path):
    return []
  keep_lines, kept = [], []
  with open(path) as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    try:
      record = json.loads(line)
    except ValueError:
      if i == len(lines) - 1:
        continue  # the line being written when the run was killed
      raise ValueError(f"{path}, line {i + 1}: not a JSON record ({line[:80]!r}); the metrics "
                       "file is corrupt.") from None
    if record.get("run") == name:
      if record.get("step", 0) > start_step:
        continue
      kept.append({k: v for k, v in record.items() if k != "run"})
    keep_lines.append(line)
  if rewrite and len(keep_lines) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write("".join(l + "\n" for l in keep_lines))
    os.replace(tmp, path)
  return kept


# ---------------------------------------------------------------------- the loop

def fit(state: TrainState, step_fn: Callable[..., tuple[TrainState, dict]],
        train_batches: Callable[[int], Iterator[Batch]], *, num_steps: int,
        teacher_variables: Any = None, mode: str = "shard_map",
        mesh: jax.sharding.Mesh | None = None, workdir: str | None = None,
        name: str = "train", checkpoint_every: int = 0, log_every: int = 50,
        eval_every: int = 0, eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
        hooks: Sequence[Hook] = (), progress: bool = True,
        run_info: Mapping[str, Any] | None = None) -> tuple[TrainState, list[dict]]:
  """Trains `state` for `num_steps` steps (resuming from `workdir/checkpoints` if present).

  Args:
    state: the initial train state (host or single-device arrays); replaced by the last
      checkpoint when one exists.
    step_fn: the per-device step `step(state, batch[, teacher_variables])`, built with
      `axis_name="batch"` for "shard_map"/"pmap" and `axis_name=None` for "none".
    train_batches: `train_batches(start_step)` -> iterator of host-local batches from that step
      on (e.g. `functools.partial(kd_jax.data.batches, arrays, batch_size=..., seed=...)` as
      `lambda s: batches(..., start_step=s)`).
    num_steps: total number of steps (the run ends when the state's step reaches it).
    teacher_variables: the frozen teacher's variables, passed to every step (None: no teacher).
    mode: "shard_map" (default: `jax.shard_map` under `jax.jit`), "pmap" or "none" (one device).
    mesh: the device mesh for "shard_map" (default: all devices).
    workdir: where metrics, TensorBoard events and checkpoints go (None: nothing is written and
      there is no resume).
    name: the run's name in the metrics and TensorBoard.
    checkpoint_every: save every this many steps (0: only at the end); needs `workdir`.
    log_every: write training metrics every this many steps.
    eval_every: call `eval_fn(state)` every this many steps and at the end (0: only at the end).
    eval_fn: evaluation `eval_fn(state) -> {metric: value}` (e.g. val accuracy), or None.
    hooks: `hook(step, state, metrics)` called after every step (e.g. `stop_after(n)`).
    progress: show a tqdm progress bar.
    run_info: a JSON-able description of the run (loss spec, model, steps...) stored as
      `workdir/run.json`; resuming a workdir whose run.json differs raises instead of silently
      continuing another experiment.

  Returns:
    (final state as host-addressable single-copy arrays, history: a list of metric records).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  history: list[dict] = []
  if workdir is not None and run_info is not None:
    _check_run_info(workdir, run_info)
  ckpt = (Checkpointer(os.path.join(workdir, "checkpoints"), every=checkpoint_every)
          if workdir is not None else None)
  args = () if teacher_variables is None else (teacher_variables,)

  if mode == "shard_map":
    mesh = mesh or parallel.make_mesh()
    sharding = parallel.replicated_sharding(mesh)
    run = parallel.data_parallel(step_fn, mesh)
    put_state = lambda s: parallel.replicate(s, mesh)  # noqa: E731
    put_batch = lambda b: parallel.shard_batch(b, mesh)  # noqa: E731
    args = parallel.replicate(args, mesh)
    host_state = lambda s: s  # noqa: E731
  elif mode == "pmap":
    n = jax.local_device_count()
    sharding = None
    run = parallel.pmap_parallel(step_fn)
    put_state = lambda s: parallel.stack_for_pmap(s, n)  # noqa: E731
    put_batch = lambda b: parallel.split_for_pmap(b, n)  # noqa: E731
    args = parallel.stack_for_pmap(args, n)
    host_state = parallel.unstack_from_pmap
  else:
    sharding = None
    run = compile_options.jit(step_fn, donate_argnums=(0,))
    put_state = lambda s: jax.tree.map(lambda x: jnp.array(x, copy=True), s)  # noqa: E731
    put_batch = lambda b: b  # noqa: E731
    host_state = lambda s: s  # noqa: E731

  if ckpt is not None and ckpt.latest_step() is not None:
    state = ckpt.restore(state, sharding)
  start = step_count(state)
  if start and progress and jax.process_index() == 0:
    print(f"{name}: {'complete, reused' if start >= num_steps else 'resumed'} from its "
          f"checkpoint at step {start} of {num_steps}", file=sys.stderr, flush=True)
  writer = MetricWriter(workdir, name, start_step=start)
  history.extend(writer.previous)  # a resumed run's history covers the whole run
  dev_state = put_state(state)
  bar = tqdm.tqdm(total=num_steps, initial=start, desc=name, disable=not progress,
                  dynamic_ncols=True, leave=False)
  t0, last_log = time.perf_counter(), start
  guard = getattr(step_fn, "nonfinite", "off")
  pending = None  # (step, metrics) of a step whose finiteness is not checked yet
  skip_flags, skipped = [], {}
  check = functools.partial(_check_finite, ckpt=ckpt, writer=writer)
  try:
    if start < num_steps:
      for step, batch in zip(range(start + 1, num_steps + 1), train_batches(start)):
        dev_state, metrics = run(dev_state, put_batch(batch), *args)
        if mode == "pmap":
          metrics = parallel.unstack_from_pmap(metrics)
        if guard == "stop":
          # The previous step's flag: it has finished while this one was dispatched, so the
          # check costs no wait; this step is checked next time or before it is saved or logged.
          if pending is not None:
            check(*pending)
          pending = (step, metrics)
        elif guard == "skip":
          skip_flags.append(_finite_flags(metrics))
        logged = None
        due = (step % max(log_every, 1) == 0 or step == num_steps or
               (eval_fn is not None and eval_every and step % eval_every == 0) or
               (ckpt is not None and ckpt.due(step)))
        if due and pending is not None:
          check(*pending)
          pending = None
        if due and skip_flags:
          for flags in jax.device_get(skip_flags):
            for k, v in flags.items():
              skipped[k] = skipped.get(k, 0) + int(np.sum(np.asarray(v) != 1.0))
          skip_flags = []
        if step % max(log_every, 1) == 0 or step == num_steps:
          logged = scalar_metrics(jax.device_get(metrics))
          logged.update({k[:-len("finite")] + "skipped_steps": float(n)
                         for k, n in skipped.items()})
          dt = time.perf_counter() - t0
          logged["steps_per_sec"] = (step - last_log) / max(dt, 1e-9)
          t0, last_log = time.perf_counter(), step
          writer.write(step, "train", logged)
          history.append({"step": step, "split": "train", **logged})
          if "loss" in logged and "accuracy" in logged:
            bar.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged['accuracy']:.3f}")
        if eval_fn is not None and eval_every and step % eval_every == 0 and step != num_steps:
          _evaluate(eval_fn, host_state(dev_state), step, writer, history)
        if ckpt is not None and (ckpt.due(step) or step == num_steps):
          ckpt.save(step, host_state(dev_state))
        bar.update(1)
        for hook in hooks:
          hook(step, dev_state, logged or {})
      if step_count(host_state(dev_state)) < num_steps:
        raise ValueError(f"train_batches ran out before step {num_steps}.")
    if any(skipped.values()):
      warnings.warn(f"{name}: non-finite steps skipped (nonfinite='skip'): "
                    f"{ {k[:-len('finite')] + 'skipped_steps': n for k, n in skipped.items()} }.",
                    stacklevel=2)
    final = host_state(dev_state)
    done = any(h["step"] == num_steps and h["split"] != "train" for h in history)
    if eval_fn is not None and not done:  # a finished run restarted keeps its final evaluation
      _evaluate(eval_fn, final, num_steps, writer, history)
    return final, history
  finally:
    bar.close()
    writer.close()
    if ckpt is not None:
      ckpt.close()


def step_count(state) -> int:
  """The step of a `TrainState`, or of a {method: stacked TrainState} dict (all equal)."""
  states = state.values() if isinstance(state, Mapping) else [state]
  steps = {int(s) for st in states for s in np.ravel(jax.device_get(st.step))}
  if len(steps) != 1:
    raise ValueError(f"the states are at different steps {sorted(steps)}.")
  return steps.pop()


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Metrics as floats: a vector metric (one value per stacked student) becomes its mean under
  its own name and one entry per student, "<name>/<i>"."""
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = float(v)
    else:
      out[k] = float(np.mean(v))
      out.update({f"{k}/{i}": float(x) for i, x in enumerate(v.ravel())})
  return out


def _check_run_info(workdir: str, run_info: Mapping[str, Any]) -> None:
  info = json.loads(json.dumps(run_info))  # normalise tuples to lists
  path = os.path.join(workdir, "run.json")
  if os.path.exists(path):
    old = read_json(path, what="the run description")
    if old != info:
      diff = sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k))
      raise ValueError(
          f"{workdir} holds a run with another configuration (differs in {diff}: "
          f"{ {k: old.get(k) for k in diff} } vs now { {k: info.get(k) for k in diff} }); use "
          "another workdir, or start afresh in this one (--overwrite on the command line).")
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:  # written whole or not at all
      json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)


def read_json(path: str, *, what: str = "file") -> Any:
  """The JSON content of `path`; a truncated or corrupt file is a ValueError naming it."""
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"{path} ({what}) is not valid JSON ({e}); it was probably cut short by a "
                     "kill: delete it (it is rewritten) or start afresh with --overwrite.") from None


def _evaluate(eval_fn, state, step, writer, history):
  results = dict(eval_fn(state))
  split = str(results.pop("split", "eval"))
  writer.write(step, split, results)
  history.append({"step": step, "split": split, **results})
