"""Batch-relational and feature-map terms without parameters: SP, RKD, PKT, AT, NST.

Batch-relational terms (SP, RKD, PKT) see the per-device batch, as the PyTorch references do,
or the global batch with `all_gather=true` (the loss all-gathers over the data-parallel axis).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from kd_jax import losses
from kd_jax.train.terms._base import LossTerm, feature_pair, gather_axis, masked_mean
from kd_jax.train.terms._base import register_term


@register_term("sp")
@dataclasses.dataclass(frozen=True)
class SP(LossTerm):
  """Similarity-preserving KD, `losses.sp`, on `feature` (a name or a tuple of names)."""

  feature: Any = "pre_pool"
  teacher_feature: Any = None
  all_gather: bool = False

  def __call__(self, ctx):
    s, t = feature_pair(ctx, self.feature, self.teacher_feature)
    return losses.sp(s, t, where=ctx.where, axis_name=gather_axis(ctx, self.all_gather))


@register_term("rkd")
@dataclasses.dataclass(frozen=True)
class RKD(LossTerm):
  """Relational KD, `losses.rkd`, on the pooled embeddings."""

  feature: Any = "embedding"
  teacher_feature: Any = None
  all_gather: bool = False
  distance_weight: float = 25.0
  angle_weight: float = 50.0

  def __call__(self, ctx):
    s, t = feature_pair(ctx, self.feature, self.teacher_feature)
    return losses.rkd(s, t, distance_weight=self.distance_weight, angle_weight=self.angle_weight,
                      where=ctx.where, axis_name=gather_axis(ctx, self.all_gather))


@register_term("pkt")
@dataclasses.dataclass(frozen=True)
class PKT(LossTerm):
  """Probabilistic knowledge transfer, `losses.pkt`, on the pooled embeddings."""

  feature: Any = "embedding"
  teacher_feature: Any = None
  all_gather: bool = False

  def __call__(self, ctx):
    s, t = feature_pair(ctx, self.feature, self.teacher_feature)
    return losses.pkt(s, t, where=ctx.where, axis_name=gather_axis(ctx, self.all_gather))


@register_term("at")
@dataclasses.dataclass(frozen=True)
class AttentionTransfer(LossTerm):
  """Attention transfer, `losses.attention_transfer`, summed over the listed stages."""

  feature: Any = ("stage1", "stage2", "stage3")
  teacher_feature: Any = None
  p: int = 2

  def __call__(self, ctx):
    s, t = feature_pair(ctx, self.feature, self.teacher_feature)
    if not isinstance(s, list):
      s, t = [s], [t]
    return sum(masked_mean(losses.attention_transfer(a, b, p=self.p, where=ctx.where), ctx.where)
               for a, b in zip(s, t))


@register_term("nst")
@dataclasses.dataclass(frozen=True)
class NST(LossTerm):
  """Neuron selectivity transfer, `losses.nst`."""

  feature: Any = "pre_pool"
  teacher_feature: Any = None

  def __call__(self, ctx):
    s, t = feature_pair(ctx, self.feature, self.teacher_feature)
    value = losses.nst(s, t, where=ctx.where)
    return masked_mean(value, ctx.where) if jnp.ndim(value) else value
