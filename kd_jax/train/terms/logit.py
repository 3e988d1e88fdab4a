"""Logit terms: cross-entropy with the labels, Hinton KD, decoupled KD and PTLoss.

Each is a mean over the batch's valid rows of the per-example loss of `kd_jax.losses`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from kd_jax import losses
from kd_jax.train.terms._base import LossTerm, masked_mean, register_term


def _positive(term: str, name: str, value) -> None:
  if not value > 0:
    raise ValueError(f"loss term {term!r}: {name} must be > 0, got {value}.")


@register_term("ce")
@dataclasses.dataclass(frozen=True)
class CrossEntropy(LossTerm):
  """Cross-entropy with the labels (optionally label-smoothed, `optax.smooth_labels`), mean over
  the valid rows that carry a label: a batch entry "labeled" (bool [b]) marks the rows of a
  transfer set, which only the distillation terms use. On a mixed batch (in the step:
  `make_train_step(..., mixing=...)`; on the host: `kd_jax.data.augment.mix`), batch entries
  "mix_label" and "mix_lambda" mix the labels as the inputs: `lam CE(y) + (1 - lam)
  CE(y_partner)`, over the rows whose two sources both carry a label."""

  label_smoothing: float = 0.0
  needs_teacher = False

  def __call__(self, ctx):
    logits = jnp.asarray(ctx.student.logits, jnp.float32)
    onehot = jax.nn.one_hot(ctx.labels, logits.shape[-1])
    if self.label_smoothing:
      onehot = optax.smooth_labels(onehot, self.label_smoothing)
    where = ctx.labeled_where
    loss = optax.softmax_cross_entropy(logits, onehot)
    if "mix_lambda" in ctx.batch:  # mixup / CutMix inside the step (kd_jax.data.mixing)
      partner = jax.nn.one_hot(ctx.batch["mix_label"], logits.shape[-1])
      if self.label_smoothing:
        partner = optax.smooth_labels(partner, self.label_smoothing)
      lam = jnp.asarray(ctx.batch["mix_lambda"], jnp.float32)
      loss = lam * loss + (1.0 - lam) * optax.softmax_cross_entropy(logits, partner)
      if "mix_labeled" in ctx.batch:
        mixed = jnp.asarray(ctx.batch["mix_labeled"], bool) | (lam >= 1.0)
        where = mixed if where is None else where & mixed
    return masked_mean(loss, where)


@register_term("kd")
@dataclasses.dataclass(frozen=True)
class KD(LossTerm):
  """Hinton KD, `losses.kd`: T^2 KL(softmax(t / T) || softmax(s / T)) per example."""

  temperature: float = 4.0

  def __post_init__(self):
    _positive("kd", "temperature", self.temperature)

  def __call__(self, ctx):
    return masked_mean(losses.kd(ctx.student.logits, ctx.teacher.logits,
                                 temperature=self.temperature, where=ctx.where), ctx.where)


@register_term("dkd")
@dataclasses.dataclass(frozen=True)
class DKD(LossTerm):
  """Decoupled KD, `losses.dkd` (alpha TCKD + beta NCKD); warm it up with `warmup_steps`."""

  alpha: float = 1.0
  beta: float = 8.0
  temperature: float = 4.0

  def __post_init__(self):
    _positive("dkd", "temperature", self.temperature)

  def __call__(self, ctx):
    return masked_mean(losses.dkd(ctx.student.logits, ctx.teacher.logits, ctx.labels,
                                  alpha=self.alpha, beta=self.beta,
                                  temperature=self.temperature, where=ctx.where), ctx.where)


@register_term("ptloss")
@dataclasses.dataclass(frozen=True)
class PTLoss(LossTerm):
  """PTLoss, `losses.ptloss`, with coefficients `epsilon` ([M] or [K, M]; a scalar is [1]).

  Choose epsilon with `kd_jax.ptloss.select_coefficients`; epsilon = 0 is KD at `temperature`.
  """

  epsilon: tuple = (0.0,)
  temperature: float = 1.0

  def __post_init__(self):
    _positive("ptloss", "temperature", self.temperature)

  def __call__(self, ctx):
    eps = jnp.atleast_1d(jnp.asarray(self.epsilon, jnp.float32))
    return masked_mean(losses.ptloss(ctx.student.logits, ctx.teacher.logits, eps,
                                     temperature=self.temperature, where=ctx.where), ctx.where)
