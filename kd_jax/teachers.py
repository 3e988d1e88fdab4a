"""Teachers: saved with Orbax, restored against the model's abstract shapes, returned frozen.

A teacher checkpoint is one Orbax `StandardCheckpointer` directory holding
`{"params": ..., "batch_stats": ...}` as nested dicts of arrays (the model's `nnx.Param` state
and the rest, BatchNorm running statistics). `restore_teacher` builds the abstract target from the
model itself (`nnx.eval_shape`, no parameter is initialised), compares every array's key path,
shape and dtype with the checkpoint's metadata before reading anything, and returns a
`FrozenTeacher`: variables under `stop_gradient`, applied only in inference mode (BatchNorm uses
its running statistics), and refused by `save_teacher` (teachers are never re-saved).

A teacher ensemble (`ensemble`, `restore_ensemble`) is a `FrozenEnsemble`: its `graphdef` is an
`Ensemble` (the members' graph definitions, weights and how to combine them) and its
`variables` the members' variables, so it goes wherever one teacher goes
(`make_train_step(..., teacher_graphdef=ens.graphdef)`, `step(state, batch, ens.variables)`);
the members may be different architectures, and all of them run inside the same jitted step.

Beside the arrays, `save_teacher` writes a fingerprint, `kd_jax_teacher.json` in the checkpoint
directory: the CRC-32 of every array's bytes (Orbax and TensorStore do not checksum what they
read back, so a flipped byte would restore silently), the architecture (model name, class and
options), the number of classes, the input normalisation and, when known, the teacher's
validation accuracy. `restore_teacher` verifies it: a corrupted array, another architecture,
class count, option or normalisation is refused with an error naming the array or the field and
both values. Checkpoints written without a fingerprint restore with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from kd_jax import checkpoint
from kd_jax import compile_options
from kd_jax import models

_REQUIRED_FILES = ("_CHECKPOINT_METADATA", "_METADATA")
FINGERPRINT_FILE = "kd_jax_teacher.json"
_FINGERPRINT_FORMAT = 1
# Model options that change the computation but not the trained function (restoring a float32
# teacher to run in bfloat16 is legitimate).
_COMPUTE_ONLY_OPTIONS = frozenset({"dtype"})


@dataclasses.dataclass(frozen=True)
class FrozenTeacher:
  """A restored teacher: graph definition plus frozen variables {"params", "batch_stats"}.

  Call it as `logits, features = teacher(x)`: always inference mode, always under
  `stop_gradient`. Inside a jitted step pass `teacher.variables` as an argument and use
  `teacher.graphdef` (see `kd_jax.train.step.make_train_step`), so the weights are not baked into
  the program as constants.
  """

  graphdef: nnx.GraphDef
  variables: Mapping[str, nnx.State]
  model_name: str
  num_classes: int
  path: str | None = None
  # The verified fingerprint of the checkpoint (`save_teacher`), None when it has none.
  fingerprint: Mapping[str, Any] | None = None

  def __call__(self, x):
    variables = jax.lax.stop_gradient(dict(self.variables))
    model = nnx.merge(self.graphdef, variables["params"], variables["batch_stats"])
    logits, features = model(x, train=False)
    return jax.lax.stop_gradient((logits, dict(features)))


def _split(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def _jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray) or hasattr(value, "tolist"):
    return _jsonable(np.asarray(value).tolist())
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return str(value)  # a dtype, a class


def save_teacher(path: str | os.PathLike, model: nnx.Module, *, overwrite: bool = False,
                 model_name: str | None = None, num_classes: int | None = None,
                 model_options: Mapping[str, Any] | None = None,
                 normalization: Mapping[str, Any] | None = None,
                 val_accuracy: float | None = None) -> str:
  """Saves a trained model's variables as a teacher checkpoint (Orbax) at `path`, with its
  fingerprint (`kd_jax_teacher.json`: per-array CRC-32 and the fields below).

  Args:
    path: the checkpoint directory to create.
    model: the trained NNX model (not a `FrozenTeacher`: restored teachers are never re-saved).
    overwrite: replace an existing checkpoint at `path`.
    model_name: its name in `kd_jax.models.available()` (recorded and checked on restore).
    num_classes: its number of classes (recorded and checked on restore).
    model_options: the options it was created with (`kd_jax.models.create`'s keywords).
    normalization: how its inputs were normalised, e.g. {"dataset": "digits", "mean": [...],
      "std": [...]}; a restore that states another normalisation is refused.
    val_accuracy: its validation accuracy, when known (checked before distillation,
      `check_teacher_outputs`).

  Returns:
    The absolute checkpoint path.
  """
  if isinstance(model, FrozenTeacher):
    raise TypeError("a FrozenTeacher is never re-saved; save the model it was trained as.")
  path = os.path.abspath(os.fspath(path))
  _, params, rest = _split(model)
  tree = {"params": params.to_pure_dict(), "batch_stats": rest.to_pure_dict()}
  if val_accuracy is not None and not math.isfinite(float(val_accuracy)):
    raise ValueError(f"val_accuracy must be a finite number, got {val_accuracy}.")
  fingerprint = {
      "format": _FINGERPRINT_FORMAT, "model_name": model_name,
      "model_class": type(model).__name__, "num_classes": num_classes,
      # None: not stated (then not checked); {} states the model's defaults.
      "model_options": None if model_options is None else _jsonable(dict(model_options)),
      "normalization": None if normalization is None else _jsonable(dict(normalization)),
      "val_accuracy": None if val_accuracy is None else float(val_accuracy),
      "checksum": "crc32", "arrays": checkpoint.array_checksums(tree)}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree, force=overwrite)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    tmp = os.path.join(path, FINGERPRINT_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(fingerprint, f, indent=1)
    os.replace(tmp, os.path.join(path, FINGERPRINT_FILE))  # never a half-written fingerprint
  return path


def read_fingerprint(path: str | os.PathLike) -> dict[str, Any] | None:
  """The fingerprint `save_teacher` wrote in the checkpoint `path`, or None when it has none.

  Raises:
    ValueError: the fingerprint file exists but is not valid JSON of the expected form.
  """
  file = os.path.join(os.fspath(path), FINGERPRINT_FILE)
  if not os.path.exists(file):
    return None
  try:
    with open(file) as f:
      fp = json.load(f)
    if not isinstance(fp, dict) or not isinstance(fp.get("arrays"), dict):
      raise ValueError("no 'arrays' entry")
  except (ValueError, OSError) as e:
    raise ValueError(f"teacher checkpoint {path}: its fingerprint {FINGERPRINT_FILE} is "
                     f"corrupt ({e}); re-save the teacher or delete the file to restore "
                     "without verification.") from None
  return fp


def _same(a, b) -> bool:
  """Equality of JSON-like values, floats to a relative 1e-6 (normalisation constants)."""
  if isinstance(a, Mapping) and isinstance(b, Mapping):
    return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
  return a == b


def _fingerprint_mismatches(fp: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
  """'field: checkpoint has X, restoring as Y' for every recorded field that differs."""
  out = []
  for field, value in want.items():
    have = fp.get(field)
    if have is None or value is None:
      continue  # not recorded at save time, or not stated now
    if field == "model_options":
      have = {k: v for k, v in have.items() if k not in _COMPUTE_ONLY_OPTIONS}
      value = {k: v for k, v in value.items() if k not in _COMPUTE_ONLY_OPTIONS}
    if not _same(have, value):
      out.append(f"{field}: the checkpoint was saved with {have!r}, it is restored as {value!r}")
  return out


def _check_against_metadata(path: str, target: Mapping[str, Any], metadata: Mapping[str, Any]):
  checkpoint.check_arrays(f"teacher checkpoint {path}", target, metadata, what="model")


def restore_teacher(path: str | os.PathLike, model_name: str, *, num_classes: int,
                    normalization: Mapping[str, Any] | None = None,
                    **model_options) -> FrozenTeacher:
  """Restores a teacher saved by `save_teacher` into the model `model_name` and verifies it.

  The target is abstract (`nnx.eval_shape` of `kd_jax.models.create(model_name, ...)`), so the
  model is never initialised; every array's key path, shape and dtype is checked against the
  checkpoint's metadata before any data is read, the fingerprint's architecture, class count,
  options and normalisation against the arguments, and every restored array's CRC-32 against
  the one recorded at save time.

  Args:
    path: the checkpoint directory.
    model_name: a name from `kd_jax.models.available()`.
    num_classes: the classifier size the teacher was trained with.
    normalization: the input normalisation this run uses (as given to `save_teacher`), or None
      to skip that check.
    **model_options: further options of `kd_jax.models.create` (e.g. `dtype`).

  Returns:
    A `FrozenTeacher` (its `fingerprint` holds the verified fingerprint, or None).

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is not a complete Orbax checkpoint (names the path and what is missing),
      an array is missing, unexpected, or of another shape/dtype (names its key path and both
      shapes), the checkpoint was saved from another architecture, class count, options or
      normalisation (names the field and both values), an array's bytes differ from those saved
      (names the array), or the model name is unknown.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"teacher checkpoint {path} does not exist.")
  if not os.path.isdir(path):
    raise ValueError(f"teacher checkpoint {path} is not a directory (an Orbax checkpoint is).")
  absent = [f for f in _REQUIRED_FILES if not os.path.exists(os.path.join(path, f))]
  if absent:
    raise ValueError(f"teacher checkpoint {path} is incomplete (partial or interrupted save?): "
                     f"missing {absent}.")
  fingerprint = read_fingerprint(path)
  abstract = nnx.eval_shape(lambda: models.create(model_name, num_classes=num_classes,
                                                  rngs=nnx.Rngs(0), **model_options))
  mismatches = [] if fingerprint is None else _fingerprint_mismatches(fingerprint, {
      "model_name": model_name, "model_class": type(abstract).__name__,
      "num_classes": num_classes, "model_options": _jsonable(dict(model_options)),
      "normalization": None if normalization is None else _jsonable(dict(normalization))})
  graphdef, abs_params, abs_rest = _split(abstract)
  target = {"params": abs_params.to_pure_dict(), "batch_stats": abs_rest.to_pure_dict()}
  checkpointer = ocp.StandardCheckpointer()
  try:
    item = checkpointer.metadata(path).item_metadata
    if item is None or getattr(item, "tree", None) is None:
      raise ValueError("no array metadata could be read")
    metadata = item.tree
  except Exception as e:  # noqa: BLE001 - orbax raises several types for a broken directory
    raise ValueError(f"teacher checkpoint {path} cannot be read: its _METADATA file is missing "
                     f"its array entries or corrupt ({type(e).__name__}: {e}).") from None
  metadata = {k: metadata.get(k, {}) or {} for k in set(metadata) | set(target)}
  try:
    _check_against_metadata(path, target, metadata)
  except ValueError as e:
    if not mismatches:
      raise
    raise ValueError(_mismatch_message(path, mismatches) + f"\n{e}") from None
  if mismatches:
    raise ValueError(_mismatch_message(path, mismatches))
  # Every process reads the whole teacher onto its first local device, whatever the topology it
  # was saved from (another host count, a single-device run); `kd_jax.parallel.replicate` then
  # places it on the mesh.
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local), target)
  try:
    restored = checkpointer.restore(path, abstract_target)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"teacher checkpoint {path} is corrupt or partial: reading it failed with "
                     f"{type(e).__name__}: {e}") from e
  if fingerprint is None:
    warnings.warn(f"teacher checkpoint {path} has no fingerprint ({FINGERPRINT_FILE}, written "
                  "by save_teacher since it records checksums): its arrays cannot be verified.",
                  stacklevel=2)
  else:
    checkpoint.verify_checksums(f"teacher checkpoint {path}", fingerprint["arrays"], restored,
                                hint=" Re-train or re-copy the teacher.")
  params, rest = abs_params, abs_rest
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.replace_by_pure_dict(rest, restored["batch_stats"])
  variables = jax.lax.stop_gradient({"params": params, "batch_stats": rest})
  return FrozenTeacher(graphdef=graphdef, variables=variables, model_name=model_name,
                       num_classes=num_classes, path=path, fingerprint=fingerprint)


def _mismatch_message(path: str, mismatches: list[str]) -> str:
  return (f"teacher checkpoint {path} is not the teacher this run asks for (another "
          "architecture, class count, options or normalisation):\n  " + "\n  ".join(mismatches))


def freeze(model: nnx.Module, *, model_name: str = "", num_classes: int | None = None
           ) -> FrozenTeacher:
  """Wraps an in-memory trained model as a `FrozenTeacher` (copies its variables)."""
  graphdef, params, rest = _split(model)
  variables = jax.tree.map(jnp.array, {"params": params, "batch_stats": rest})
  if num_classes is None:
    num_classes = -1
  return FrozenTeacher(graphdef=graphdef, variables=jax.lax.stop_gradient(variables),
                       model_name=model_name, num_classes=num_classes)


def check_teacher_outputs(teacher: FrozenTeacher, batches: Iterable[Mapping[str, Any]], *,
                          student_num_classes: int | None = None, input_key: str = "image",
                          max_batches: int = 2) -> None:
  """Checks, before training, that the teacher fits the student and gives finite outputs.

  Runs the teacher on up to `max_batches` batches and raises if its logits have a different
  number of classes than the student (mismatched datasets), if any logit is NaN or +inf or a
  row of logits is entirely -inf, or if any feature is non-finite (a broken or mismatched
  checkpoint would otherwise poison every step silently). A -inf logit alone is a masked class
  (its probability is 0), which every logit loss handles exactly.

  Raises:
    ValueError: naming the class counts, or the output and the batch with non-finite values.
  """
  apply = compile_options.jit(lambda v, x: FrozenTeacher(teacher.graphdef, v, teacher.model_name,
                                             teacher.num_classes)(x))
  where = f"the teacher {teacher.model_name or ''} ({teacher.path or 'in memory'})"
  for i, batch in enumerate(batches):
    if i >= max_batches:
      break
    logits, features = apply(teacher.variables, jnp.asarray(batch[input_key]))
    if student_num_classes is not None and logits.shape[-1] != student_num_classes:
      raise ValueError(
          f"teacher/student class mismatch: the teacher {teacher.model_name or ''} predicts "
          f"{logits.shape[-1]} classes but the student has {student_num_classes} (were they "
          "trained on different datasets?).")
    logits = np.asarray(jax.device_get(logits))
    rows = np.ones(logits.shape[:-1], bool) if "mask" not in batch else np.asarray(batch["mask"])
    bad = int(np.sum((np.isnan(logits) | (logits == np.inf)) & rows[..., None]))
    dead = int(np.sum(np.all(logits == -np.inf, axis=-1) & rows))
    if bad or dead:
      what = (f"{bad} non-finite (NaN/+inf) values" if bad
              else f"{dead} non-finite rows (entirely -inf)")
      raise ValueError(
          f"{where} gives {what} in its logits of shape {logits.shape} on batch {i}; refusing "
          "to distil from it (a corrupt checkpoint, or inputs it was not trained on?).")
    for name, value in features.items():
      bad = int(jnp.sum(~jnp.isfinite(value)))
      if bad:
        raise ValueError(
            f"{where} gives {bad} non-finite (NaN/inf) values in its features[{name!r}] of "
            f"shape {value.shape} on batch {i}; refusing to distil from it.")


def check_teacher_accuracy(teacher: FrozenTeacher, accuracy: float, *, tolerance: float = 0.02,
                           split: str = "validation") -> None:
  """Checks the teacher's accuracy measured now against the one recorded when it was saved.

  A teacher whose fingerprint records a validation accuracy must reproduce it within
  `tolerance` (absolute) on this run's validation data: a wrong input normalisation, another
  dataset or class order, or another teacher would otherwise distil garbage into the students
  with nothing looking wrong. Without a recorded accuracy nothing is checked.

  Raises:
    ValueError: naming both accuracies, the tolerance and the checkpoint.
  """
  recorded = (teacher.fingerprint or {}).get("val_accuracy")
  if recorded is None:
    return
  if not (math.isfinite(accuracy) and abs(accuracy - recorded) <= tolerance):
    raise ValueError(
        f"the teacher {teacher.model_name or ''} ({teacher.path}) scores {accuracy:.4f} on the "
        f"{split} split but {recorded:.4f} when it was saved (tolerance {tolerance}); wrong "
        "input normalisation, data or class order, or another teacher? Refusing to distil.")


# ------------------------------------------------------------------------------------ ensembles

ENSEMBLE_COMBINE = ("probs", "logits", "per_teacher")


@dataclasses.dataclass(frozen=True, eq=False)
class Ensemble:
  """How a teacher ensemble runs in the step: its members' graph definitions and their combination.

  Passed as `teacher_graphdef` to `kd_jax.train.make_train_step` (with the members' variables,
  a tuple, as `teacher_variables`). The combined teacher the terms see
  (`kd_jax.train.terms.ensemble.combine_outputs`):

  - `combine="probs"` (default): logits `T log(sum_i w_i softmax(z_i / T))`, so that
    `softmax(logits / T)` is the weighted mean of the members' softmaxes at temperature `T`
    (`temperature`; give it the KD term's temperature);
  - `combine="logits"`: the weighted mean of the members' logits;
  - `combine="per_teacher"`: every term that reads the teacher is evaluated once per member
    and the values are averaged with the weights (terms with their own parameters or state
    cannot be used this way).

  Features: member i's feature `name` is `"<i>/<name>"` (e.g. `"0/pre_pool"`), since the members
  may be different architectures; in the per-teacher mode each evaluation sees its member's own
  feature names. The members' outputs are also in `teacher.members`.

  Attributes:
    graphdefs: one `nnx.GraphDef` per member.
    weights: one non-negative weight per member (normalised to sum 1); default equal.
    combine: "probs", "logits" or "per_teacher".
    temperature: the temperature of the "probs" combination.
  """

  graphdefs: tuple
  weights: tuple[float, ...] | None = None
  combine: str = "probs"
  temperature: float = 1.0

  def __post_init__(self):
    graphdefs = tuple(self.graphdefs)
    if not graphdefs:
      raise ValueError("a teacher ensemble needs at least one member.")
    weights = (1.0,) * len(graphdefs) if self.weights is None else tuple(map(float, self.weights))
    if len(weights) != len(graphdefs):
      raise ValueError(f"a teacher ensemble of {len(graphdefs)} members needs as many weights, "
                       f"got {len(weights)}: {weights}.")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
      raise ValueError(f"ensemble weights must be finite, >= 0 and not all 0, got {weights}.")
    if self.combine not in ENSEMBLE_COMBINE:
      raise ValueError(f"ensemble combine must be one of {ENSEMBLE_COMBINE}, got "
                       f"{self.combine!r}.")
    if not self.temperature > 0:
      raise ValueError(f"ensemble temperature must be > 0, got {self.temperature}.")
    total = sum(weights)
    object.__setattr__(self, "graphdefs", graphdefs)
    object.__setattr__(self, "weights", tuple(w / total for w in weights))
    object.__setattr__(self, "temperature", float(self.temperature))


@dataclasses.dataclass(frozen=True)
class EnsembleOf:
  """An ensemble of some teachers of a pool, for `kd_jax.train.make_multi_student_step`.

  Where the step's `teacher_graphdef` is a tuple of teachers (a pool, each run once per batch),
  `EnsembleOf((0, 2), weights=(1, 3), temperature=4.0)` gives a method the combination of
  members 0 and 2 as `Ensemble` defines it (`combine`, `temperature`, weights normalised to sum
  1): with `combine="probs"`, `softmax(logits / T) = sum_i w_i softmax(z_i / T)`.
  """

  members: tuple[int, ...]
  weights: tuple[float, ...] | None = None
  combine: str = "probs"
  temperature: float = 1.0

  def __post_init__(self):
    members = tuple(self.members)
    if not members:
      raise ValueError("an ensemble of pool teachers needs at least one member.")
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in members):
      raise ValueError(f"ensemble members are indices into the pool of teachers, got {members}.")
    if len(set(members)) != len(members):
      raise ValueError(f"ensemble members must be distinct, got {members}.")
    object.__setattr__(self, "members", tuple(int(i) for i in members))
    if self.weights is not None:
      object.__setattr__(self, "weights", tuple(map(float, self.weights)))

  def resolve(self, pool: Sequence[Any]) -> Ensemble:
    """The `Ensemble` of these members of `pool` (the pool's graph definitions)."""
    bad = [i for i in self.members if not 0 <= i < len(pool)]
    if bad:
      raise ValueError(f"ensemble members {bad} are not in the pool of {len(pool)} teachers.")
    return Ensemble(tuple(pool[i] for i in self.members), self.weights, self.combine,
                    self.temperature)


@dataclasses.dataclass(frozen=True)
class FrozenEnsemble:
  """Restored or frozen teachers as one teacher: `graphdef` is an `Ensemble`, `variables` the
  members' frozen variables (a tuple), `members` the `FrozenTeacher` objects."""

  graphdef: Ensemble
  variables: tuple
  members: tuple

  @property
  def num_classes(self) -> int:
    return self.members[0].num_classes

  @property
  def model_name(self) -> str:
    return "+".join(m.model_name or "?" for m in self.members)

  @property
  def path(self):
    return tuple(m.path for m in self.members)


def ensemble(members: Sequence[FrozenTeacher], *, weights: Sequence[float] | None = None,
             combine: str = "probs", temperature: float = 1.0) -> FrozenEnsemble:
  """Frozen teachers (e.g. from `restore_teacher` or `freeze`) as one `FrozenEnsemble`.

  Raises:
    ValueError: no member, members with different (known) class counts, or bad weights,
      `combine` or `temperature` (see `Ensemble`).
  """
  members = tuple(members)
  if not members:
    raise ValueError("a teacher ensemble needs at least one member.")
  for m in members:
    if not isinstance(m, FrozenTeacher):
      raise TypeError(f"ensemble members are FrozenTeachers (restore_teacher or freeze), got "
                      f"{type(m).__name__}.")
  known = {m.num_classes for m in members if m.num_classes is not None and m.num_classes >= 0}
  if len(known) > 1:
    raise ValueError("teacher ensemble members predict different numbers of classes: "
                     + ", ".join(f"{m.model_name or i}: {m.num_classes}"
                                 for i, m in enumerate(members)) + ".")
  spec = Ensemble(tuple(m.graphdef for m in members), None if weights is None else tuple(weights),
                  combine, temperature)
  return FrozenEnsemble(graphdef=spec, variables=tuple(m.variables for m in members),
                        members=members)


def restore_ensemble(members: Sequence[tuple], *, num_classes: int,
                     weights: Sequence[float] | None = None, combine: str = "probs",
                     temperature: float = 1.0) -> FrozenEnsemble:
  """Restores every member with `restore_teacher` and returns them as a `FrozenEnsemble`.

  Args:
    members: `(path, model_name)` or `(path, model_name, model_options)` per member; the
      architectures may differ.
    num_classes: the classifier size every member was trained with.
    weights, combine, temperature: see `Ensemble`.
  """
  restored = []
  for entry in members:
    if len(entry) not in (2, 3):
      raise ValueError(f"an ensemble member is (path, model_name[, model_options]), got "
                       f"{entry!r}.")
    path, name, *opts = entry
    restored.append(restore_teacher(path, name, num_classes=num_classes,
                                    **(dict(opts[0]) if opts else {})))
  return ensemble(restored, weights=weights, combine=combine, temperature=temperature)
