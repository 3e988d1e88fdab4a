"""ReFilled's class centres: a teacher carrying its centres, centres over a dataset, NCM accuracy.

ReFilled's stage 2 (official form) compares the student with the teacher's embedding-induced
nearest-centre classifier, whose centres are computed once over the student's training data
(`embedding_class_centers`) and attached to the frozen teacher (`with_class_centers`), so they
travel with the teacher's variables and reach the "refilled_classifier" term as the teacher's
feature "class_centers". Stage 1 selects its checkpoint by nearest-class-mean accuracy on a
held-out split (`ncm_evaluate`). The terms are in `kd_jax.train.terms.refilled`; the two-stage
pipeline is `experiments/refilled.py`; docs/refilled.md has the math.

Paper: H.-J. Ye, S. Lu, D.-C. Zhan, "Generalized Knowledge Distillation via Relationship
Matching", TPAMI 2022. Official code: njulus/REFILLED.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_jax import compile_options
from kd_jax import losses
from kd_jax import teachers
from kd_jax.losses._numerics import l2_normalize
from kd_jax.train.terms.refilled import CENTERS_FEATURE

__all__ = ["CENTERS_FEATURE", "ClassCenters", "TeacherWithCenters", "embedding_class_centers",
           "ncm_evaluate", "with_class_centers"]


class ClassCenters(nnx.Variable):
  """A teacher's class centres [C, d]: frozen state carried with its variables, never trained."""


class TeacherWithCenters(nnx.Module):
  """A teacher whose outputs also hold its class centres: features["class_centers"] = [C, d]."""

  def __init__(self, teacher: nnx.Module, centers):
    self.teacher = teacher
    self.class_centers = ClassCenters(jnp.asarray(centers, jnp.float32))

  def __call__(self, x, *, train: bool):
    logits, features = self.teacher(x, train=train)
    return logits, {**dict(features), CENTERS_FEATURE: self.class_centers.get_value()}


def with_class_centers(teacher: teachers.FrozenTeacher, centers) -> teachers.FrozenTeacher:
  """The frozen teacher with `centers` [C, d] attached to its non-parameter variables.

  The centres then travel exactly as the teacher's weights do (an argument of the jitted step,
  replicated over the devices) and reach the loss terms as the teacher's feature
  "class_centers", so the train step needs no special case.
  """
  centers = jnp.asarray(centers, jnp.float32)
  if centers.ndim != 2:
    raise ValueError(f"centers must be [num_classes, d], got shape {centers.shape}.")
  inner = nnx.merge(teacher.graphdef, teacher.variables["params"],
                    teacher.variables["batch_stats"])
  graphdef, params, rest = nnx.split(TeacherWithCenters(inner, centers), nnx.Param, ...)
  return teachers.FrozenTeacher(
      graphdef=graphdef, variables=jax.lax.stop_gradient({"params": params, "batch_stats": rest}),
      model_name=teacher.model_name, num_classes=teacher.num_classes, path=teacher.path,
      fingerprint=teacher.fingerprint)


@functools.lru_cache(maxsize=32)
def _embed_fn(graphdef, input_key: str, feature: str):
  def embed(variables, x):
    model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
    return model(x, train=False)[1][feature]

  return compile_options.jit(embed)


def embedding_class_centers(graphdef, variables, batches: Iterable[Mapping[str, Any]],
                            num_classes: int, *, feature: str = "embedding",
                            input_key: str = "image") -> jax.Array:
  """Class centres of a model's embedding over a dataset: normalise(sum_batches class_sums).

  `losses.class_sums` of the inference-mode embedding is accumulated batch by batch (rows with
  a False "mask" left out), then L2-normalised (`losses.class_centers` over the whole set).
  """
  embed = _embed_fn(graphdef, input_key, feature)
  total = None
  for batch in batches:
    e = embed(variables, jnp.asarray(batch[input_key]))
    s = losses.class_sums(e, jnp.asarray(batch["label"]), num_classes, where=batch.get("mask"))
    total = s if total is None else total + s
  if total is None:
    raise ValueError("embedding_class_centers got no batch.")
  return l2_normalize(total)


def ncm_evaluate(graphdef, variables, centers, batches: Iterable[Mapping[str, Any]], *,
                 feature: str = "embedding", input_key: str = "image") -> float:
  """NCM accuracy (`losses.ncm_predict` against `centers`) over the valid rows of `batches`."""
  embed = _embed_fn(graphdef, input_key, feature)
  correct = count = 0.0
  for batch in batches:
    pred = np.asarray(losses.ncm_predict(embed(variables, jnp.asarray(batch[input_key])),
                                         centers))
    valid = np.ones(pred.shape, bool) if batch.get("mask") is None else np.asarray(batch["mask"])
    correct += float(np.sum((pred == np.asarray(batch["label"])) & valid))
    count += float(np.sum(valid))
  return correct / max(count, 1.0)
