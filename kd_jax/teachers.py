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
"""

from __future__ import annotations

import dataclasses
import os
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from kd_jax import checkpoint
from kd_jax import compile_options
from kd_jax import models

_REQUIRED_FILES = ("_CHECKPOINT_METADATA", "_METADATA")


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

  def __call__(self, x):
    variables = jax.lax.stop_gradient(dict(self.variables))
    model = nnx.merge(self.graphdef, variables["params"], variables["batch_stats"])
    logits, features = model(x, train=False)
    return jax.lax.stop_gradient((logits, dict(features)))


def _split(model: nnx.Module):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def save_teacher(path: str | os.PathLike, model: nnx.Module, *, overwrite: bool = False) -> str:
  """Saves a trained model's variables as a teacher checkpoint (Orbax) at `path`.

  Args:
    path: the checkpoint directory to create.
    model: the trained NNX model (not a `FrozenTeacher`: restored teachers are never re-saved).
    overwrite: replace an existing checkpoint at `path`.

  Returns:
    The absolute checkpoint path.
  """
  if isinstance(model, FrozenTeacher):
    raise TypeError("a FrozenTeacher is never re-saved; save the model it was trained as.")
  path = os.path.abspath(os.fspath(path))
  _, params, rest = _split(model)
  tree = {"params": params.to_pure_dict(), "batch_stats": rest.to_pure_dict()}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree, force=overwrite)
  checkpointer.wait_until_finished()
  return path


def _check_against_metadata(path: str, target: Mapping[str, Any], metadata: Mapping[str, Any]):
  checkpoint.check_arrays(f"teacher checkpoint {path}", target, metadata, what="model")


def restore_teacher(path: str | os.PathLike, model_name: str, *, num_classes: int,
                    **model_options) -> FrozenTeacher:
  """Restores a teacher saved by `save_teacher` into the model `model_name`.

  The target is abstract (`nnx.eval_shape` of `kd_jax.models.create(model_name, ...)`), so the
  model is never initialised; every array's key path, shape and dtype is checked against the
  checkpoint's metadata before any data is read.

  Args:
    path: the checkpoint directory.
    model_name: a name from `kd_jax.models.available()`.
    num_classes: the classifier size the teacher was trained with.
    **model_options: further options of `kd_jax.models.create` (e.g. `dtype`).

  Returns:
    A `FrozenTeacher`.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is not a complete Orbax checkpoint (names the path and what is missing),
      or an array is missing, unexpected, or of another shape/dtype (names its key path and both
      shapes), or the model name is unknown.
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
  abstract = nnx.eval_shape(lambda: models.create(model_name, num_classes=num_classes,
                                                  rngs=nnx.Rngs(0), **model_options))
  graphdef, abs_params, abs_rest = _split(abstract)
  target = {"params": abs_params.to_pure_dict(), "batch_stats": abs_rest.to_pure_dict()}
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(path).item_metadata.tree
  except Exception as e:  # noqa: BLE001 - orbax raises several types for a broken directory
    raise ValueError(f"teacher checkpoint {path} cannot be read: {e}") from e
  metadata = {k: metadata.get(k, {}) or {} for k in set(metadata) | set(target)}
  _check_against_metadata(path, target, metadata)
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
  params, rest = abs_params, abs_rest
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.replace_by_pure_dict(rest, restored["batch_stats"])
  variables = jax.lax.stop_gradient({"params": params, "batch_stats": rest})
  return FrozenTeacher(graphdef=graphdef, variables=variables, model_name=model_name,
                       num_classes=num_classes, path=path)


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
  number of classes than the student (mismatched datasets) or if any logit or feature is NaN or
  infinite (a broken or mismatched checkpoint would otherwise poison every step silently).

  Raises:
    ValueError: naming the class counts, or the output and the batch with non-finite values.
  """
  apply = compile_options.jit(lambda v, x: FrozenTeacher(teacher.graphdef, v, teacher.model_name,
                                             teacher.num_classes)(x))
  for i, batch in enumerate(batches):
    if i >= max_batches:
      break
    logits, features = apply(teacher.variables, jnp.asarray(batch[input_key]))
    if student_num_classes is not None and logits.shape[-1] != student_num_classes:
      raise ValueError(
          f"teacher/student class mismatch: the teacher {teacher.model_name or ''} predicts "
          f"{logits.shape[-1]} classes but the student has {student_num_classes} (were they "
          "trained on different datasets?).")
    for name, value in {"logits": logits, **{f"features[{k!r}]": v for k, v in features.items()}
                        }.items():
      bad = int(jnp.sum(~jnp.isfinite(value)))
      if bad:
        raise ValueError(
            f"the teacher {teacher.model_name or ''} ({teacher.path or 'in memory'}) gives "
            f"{bad} non-finite (NaN/inf) values in its {name} of shape {value.shape} on batch "
            f"{i}; refusing to distil from it.")


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
class FrozenEnsemble:
  """Restored or frozen teachers as one teacher: `graphdef` is an `Ensemble`, `variables` the
  members' frozen variables (a tuple), `members` the `FrozenTeacher`s."""

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
