"""Logit terms after DKD: logit-standardised KD (`ls_kd`) and DIST (`dist`).

`ls_kd` is a mean over the batch's valid rows of `losses.kd(..., standardize=True)`; `dist` is
batch-relational (its intra-class relation correlates each class across the batch), so it sees
the per-device batch, as torchdistill's `DISTLoss` does, or the global batch with
`all_gather=true`.
"""

from __future__ import annotations

import dataclasses

from kd_jax import losses
from kd_jax.train.terms._base import LossTerm, gather_axis, masked_mean, register_term
from kd_jax.train.terms.logit import _positive  # the one temperature check of the logit terms


@register_term("ls_kd")
@dataclasses.dataclass(frozen=True)
class LogitStandardizedKD(LossTerm):
  """KD on z-scored logits (Sun et al., CVPR 2024), `losses.kd(..., standardize=True)`:
  T^2 KL(softmax(Z(t) / T) || softmax(Z(s) / T)). The authors' CIFAR-100 recipe is
  `"ce:0.1,ls_kd:9(temperature=2)"`."""

  temperature: float = 2.0

  def __post_init__(self):
    _positive("ls_kd", "temperature", self.temperature)

  def __call__(self, ctx):
    return masked_mean(losses.kd(ctx.student.logits, ctx.teacher.logits,
                                 temperature=self.temperature, standardize=True,
                                 where=ctx.where), ctx.where)


@register_term("dist")
@dataclasses.dataclass(frozen=True)
class DIST(LossTerm):
  """DIST (Huang et al., NeurIPS 2022), `losses.dist`: beta x inter-class + gamma x intra-class
  Pearson relation of softmax(z / T). The authors' CIFAR-100 recipe is
  `"ce:1,dist:2(temperature=4)"`."""

  beta: float = 1.0
  gamma: float = 1.0
  temperature: float = 4.0
  all_gather: bool = False

  def __post_init__(self):
    _positive("dist", "temperature", self.temperature)

  def __call__(self, ctx):
    return losses.dist(ctx.student.logits, ctx.teacher.logits, beta=self.beta, gamma=self.gamma,
                       temperature=self.temperature, where=ctx.where,
                       axis_name=gather_axis(ctx, self.all_gather))
