"""Token-level terms for language models: the student's and teacher's logits are
`[b, tokens, vocab]` and the losses are `kd_jax.losses`' token divergences.

The tokens that count are those of the batch entry named by `token_mask` (bool `[b, tokens]`;
False for padding and prompt tokens; all tokens count when the batch has no such entry) in the
valid rows of the batch (`ctx.where`, the row mask "mask"). A term is their mean over the
(per-device) batch's valid tokens (`reduction="mean"`, TRL's "batchmean") or the mean over
sequences of each sequence's token mean (`reduction="sequence"`).

    "token_ce:1"                    next-token cross-entropy with batch["label"] [b, tokens]
    "forward_kl:1(temperature=2)"   KL(p_t || p_s)          (losses.forward_kl)
    "reverse_kl:1"                  KL(p_s || p_t)          (losses.reverse_kl)
    "jsd:1(beta=0.5)"               GKD's generalized JSD   (losses.generalized_jsd)
    "tv:1"                          total variation         (losses.total_variation)
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

from kd_jax import losses
from kd_jax.train.terms._base import LossTerm, register_term

_REDUCTIONS = ("mean", "sequence")


def token_where(ctx, key: str, *, labeled_only: bool = False):
  """The tokens a term averages over: `batch[key]` (bool [b, tokens]) and the row mask, combined;
  None when neither is in the batch. `labeled_only`: only rows that carry a label
  (`ctx.labeled_where`, for terms that read the labels)."""
  tokens = ctx.batch.get(key)
  rows = ctx.labeled_where if labeled_only else ctx.where
  if tokens is not None:
    tokens = jnp.asarray(tokens, bool)
  if rows is None:
    return tokens
  rows = jnp.asarray(rows, bool)[:, None]
  if tokens is None:
    return jnp.broadcast_to(rows, ctx.student.logits.shape[:2])
  return tokens & rows


def _reduce(per_token, where, reduction: str):
  """Token mean, or the mean over the sequences that have a valid token of their token means."""
  if reduction == "mean":
    return losses.reduce_tokens(per_token, where, "mean")
  per_seq = losses.reduce_tokens(per_token, where, "sequence")
  if where is None:
    return jnp.mean(per_seq)
  has_tokens = jnp.any(where, axis=-1)
  return jnp.sum(jnp.where(has_tokens, per_seq, 0.0)) / jnp.maximum(
      jnp.sum(has_tokens.astype(jnp.float32)), 1.0)


@dataclasses.dataclass(frozen=True)
class _TokenTerm(LossTerm):
  temperature: float = 1.0
  token_mask: str = "token_mask"
  reduction: str = "mean"

  def __post_init__(self):
    name = type(self).term_name
    if not self.temperature > 0:
      raise ValueError(f"loss term {name!r}: temperature must be > 0, got {self.temperature}.")
    if self.reduction not in _REDUCTIONS:
      raise ValueError(f"loss term {name!r}: reduction must be one of {_REDUCTIONS}, got "
                       f"{self.reduction!r}.")

  def per_token(self, ctx, where):
    raise NotImplementedError

  def __call__(self, ctx):
    where = token_where(ctx, self.token_mask)
    return _reduce(self.per_token(ctx, where), where, self.reduction)


@register_term("forward_kl")
@dataclasses.dataclass(frozen=True)
class ForwardKL(_TokenTerm):
  """Forward KL per token, `losses.forward_kl` (no T^2 factor), averaged over valid tokens."""

  term_name = "forward_kl"

  def per_token(self, ctx, where):
    return losses.forward_kl(ctx.student.logits, ctx.teacher.logits,
                             temperature=self.temperature, where=where)


@register_term("reverse_kl")
@dataclasses.dataclass(frozen=True)
class ReverseKL(_TokenTerm):
  """Reverse KL per token, `losses.reverse_kl`, averaged over valid tokens."""

  term_name = "reverse_kl"

  def per_token(self, ctx, where):
    return losses.reverse_kl(ctx.student.logits, ctx.teacher.logits,
                             temperature=self.temperature, where=where)


@register_term("jsd")
@dataclasses.dataclass(frozen=True)
class GeneralizedJSD(_TokenTerm):
  """GKD's generalized JSD with skew `beta`, `losses.generalized_jsd` (beta = 0: forward KL,
  beta = 1: reverse KL, as TRL's `GKDTrainer`), averaged over valid tokens."""

  beta: float = 0.5
  term_name = "jsd"

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"loss term 'jsd': beta must lie in [0, 1], got {self.beta}.")

  def per_token(self, ctx, where):
    return losses.generalized_jsd(ctx.student.logits, ctx.teacher.logits, beta=float(self.beta),
                                  temperature=self.temperature, where=where)


@register_term("tv")
@dataclasses.dataclass(frozen=True)
class TotalVariation(_TokenTerm):
  """Total variation distance per token, `losses.total_variation`, averaged over valid tokens."""

  term_name = "tv"

  def per_token(self, ctx, where):
    return losses.total_variation(ctx.student.logits, ctx.teacher.logits,
                                  temperature=self.temperature, where=where)


@register_term("token_ce")
@dataclasses.dataclass(frozen=True)
class TokenCrossEntropy(LossTerm):
  """Next-token cross-entropy with the integer targets `batch["label"]` [b, tokens], averaged
  over the valid tokens (`token_mask` and the row mask, as the distillation terms) of the rows
  that carry a label (a batch entry "labeled", bool [b], marks transfer-set rows False)."""

  token_mask: str = "token_mask"
  reduction: str = "mean"
  needs_teacher = False

  def __post_init__(self):
    if self.reduction not in _REDUCTIONS:
      raise ValueError(f"loss term 'token_ce': reduction must be one of {_REDUCTIONS}, got "
                       f"{self.reduction!r}.")

  def __call__(self, ctx):
    logits = jnp.asarray(ctx.student.logits, jnp.float32)
    labels = ctx.labels
    if jnp.shape(labels) != logits.shape[:-1]:
      raise ValueError(f"loss term 'token_ce': labels must have the logits' token shape "
                       f"{logits.shape[:-1]}, got labels.shape={jnp.shape(labels)}.")
    where = token_where(ctx, self.token_mask, labeled_only=True)
    if where is not None:
      logits = jnp.where(where[..., None], logits, 0.0)
      labels = jnp.where(where, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return _reduce(ce, where, self.reduction)
