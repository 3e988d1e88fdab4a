"""ReFilled's two terms: stage-1 relationship matching and the stage-2 embedding-induced
classifier (`kd_jax.losses.refilled_relationship`, `refilled_classifier`).

Stage 2's official form reads the teacher's class centres from its feature "class_centers":
attach them with `kd_jax.refilled.with_class_centers`, so they travel with the teacher's
variables. The two-stage pipeline is `experiments/refilled.py` (docs/refilled.md).

Paper: H.-J. Ye, S. Lu, D.-C. Zhan, "Generalized Knowledge Distillation via Relationship
Matching", TPAMI 2022 (CVPR 2020: "Distilling Cross-Task Knowledge via Relationship Matching").
Official code: njulus/REFILLED.
"""

from __future__ import annotations

import dataclasses

from kd_jax import losses
from kd_jax.train.terms._base import LossTerm, feature, gather_axis, masked_mean, register_term

CENTERS_FEATURE = "class_centers"


@register_term("refilled_relationship")
@dataclasses.dataclass(frozen=True)
class RefilledRelationship(LossTerm):
  """ReFilled stage 1 on the pooled embeddings (a scalar). Triplets are mined in the per-device
  batch, or in the global batch with `all_gather=true`."""

  feature: str = "embedding"
  teacher_feature: str | None = None
  margin: float = 0.2
  temperature: float = 4.0
  tuples: bool = False
  mode: str = "official"
  all_gather: bool = False

  def __call__(self, ctx):
    s = feature(ctx.student, self.feature, "the student")
    t = feature(ctx.teacher, self.teacher_feature or self.feature, "the teacher")
    return losses.refilled_relationship(
        s, t, ctx.labels, margin=self.margin, temperature=self.temperature, tuples=self.tuples,
        mode=self.mode, where=ctx.where, axis_name=gather_axis(ctx, self.all_gather))


@register_term("refilled_classifier")
@dataclasses.dataclass(frozen=True)
class RefilledClassifier(LossTerm):
  """ReFilled stage 2, mean over valid rows. centers="global" (official code): the teacher's
  dataset-level centres from its feature "class_centers"; centers="local" (CVPR paper): in-batch
  centres with the `distance` ("squared" or "euclidean"). Rows whose batch["labeled"] is False
  are left out (the term reads the labels)."""

  feature: str = "embedding"
  temperature: float = 2.0
  centers: str = "global"
  distance: str = "squared"

  def __post_init__(self):
    if self.centers not in ("global", "local"):
      raise ValueError(f"refilled_classifier: centers must be 'global' or 'local', got "
                       f"{self.centers!r}.")

  def __call__(self, ctx):
    t = feature(ctx.teacher, self.feature, "the teacher")
    c = None
    if self.centers == "global":
      if CENTERS_FEATURE not in ctx.teacher.features:
        raise ValueError("refilled_classifier(centers='global') needs the teacher's feature "
                         f"{CENTERS_FEATURE!r}: wrap the teacher with "
                         "kd_jax.refilled.with_class_centers, or use centers='local'.")
      c = ctx.teacher.features[CENTERS_FEATURE]
    # The classes present are read from the labels, so rows without one (a transfer set's,
    # batch["labeled"] False) are left out, as the cross-entropy leaves them out.
    where = ctx.labeled_where
    values = losses.refilled_classifier(ctx.student.logits, t, ctx.labels, centers=c,
                                        temperature=self.temperature, distance=self.distance,
                                        where=where)
    return masked_mean(values, where)
