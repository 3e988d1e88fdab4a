"""Token-level distillation of language models: divergences over `[batch, tokens, vocab]` logits.

Each loss compares, at every token, the student's and the teacher's next-token distributions
:math:`p^s = softmax(s/T)` and :math:`p^t = softmax(t/T)` (the temperature divides both sides'
logits, and no `T**2` factor is applied: TRL's `GKDTrainer.generalized_jsd_loss` convention).

* `forward_kl`: :math:`KL(p^t \\| p^s)`, mean-seeking (the student covers every teacher mode);
* `reverse_kl`: :math:`KL(p^s \\| p^t)`, mode-seeking (MiniLLM, Gu et al., ICLR 2024);
* `generalized_jsd`: the skew-:math:`\\beta` Jensen-Shannon divergence of GKD (Agarwal et al.,
  ICLR 2024, "On-Policy Distillation of Language Models", Eq. 1), as TRL computes it;
* `total_variation`: :math:`\\frac12 \\sum_v |p^s_v - p^t_v|` (Wen et al., ACL 2023, "f-Divergence
  Minimization for Sequence-Level Knowledge Distillation", the TVD objective at token level).

Masks and reductions. `where` is a boolean `[batch, tokens]` mask of the tokens that count (False
for padding and for prompt tokens); masked tokens give exactly 0 with zero gradient, whatever
their logits hold. `reduction` picks the output:

* `"none"` (default): the per-token loss, `[batch, tokens]`;
* `"sequence"`: each sequence's mean over its valid tokens, `[batch]` (0 for a sequence with
  none);
* `"mean"`: the mean over every valid token of the batch, a scalar: `sum / max(#valid, 1)`, which
  is TRL's `reduction="batchmean"` with `labels` (the completion-token mean).

`reduce_tokens` applies the same reductions to any per-token loss. More generally the logits may
be `[..., tokens, vocab]`: "sequence" reduces the tokens axis, "mean" every axis.

Vocabulary sharding. With `vocab_axis` (a mesh axis name; inside `jax.shard_map` with the vocab
axis of both logits sharded over it) the log-softmax normaliser is computed from per-shard
statistics, `pmax` of the shard maxima and `psum` of the shard sums of `exp`, and each divergence
is a `psum` of per-shard partial sums: the `[batch, tokens, vocab]` logits are never gathered, and
the result (replicated over `vocab_axis`) equals the unsharded loss.

A teacher logit of -inf (a vocabulary entry the teacher rules out, p^t_v = 0) contributes
exactly 0 to `forward_kl`, `generalized_jsd` and `total_variation`, values and gradients finite
(the t_v -> -inf limit, `nm.neg_inf_to_zero`); `reverse_kl` is then +inf wherever the student
puts mass on that entry, which is its value. Every function validates its
inputs in Python and then runs a jitted core, which is inlined inside a jitted step.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from kd_jax.losses import _numerics as nm
from kd_jax.losses import _validation as val

__all__ = ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation", "reduce_tokens"]

REDUCTIONS = ("none", "sequence", "mean")


# ------------------------------------------------------------------------------ reductions


def _check_reduction(reduction) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def reduce_tokens(values, where=None, reduction="mean"):
  """Reduces a per-token loss `[..., tokens]` over the valid tokens (`where`, same shape).

  Args:
    values: per-token losses `[..., tokens]` (masked tokens are excluded, whatever they hold).
    where: optional boolean mask of `values`' shape; None counts every token.
    reduction: `"none"` (the values, zero where masked), `"sequence"` (per sequence:
      `sum_t where * values / max(sum_t where, 1)`, shape `[...]`) or `"mean"` (over all tokens:
      `sum where * values / max(sum where, 1)`, a scalar).

  Returns:
    float32 array of the shape the reduction gives.
  """
  _check_reduction(reduction)
  val.check_rank(values, 1, "values")
  val.check_where(where, jnp.shape(values))
  return _reduce(nm.to_float32(values), where, reduction)


def _reduce(values, where, reduction):
  values = nm.apply_where(values, where)
  if reduction == "none":
    return values
  if reduction == "sequence":
    count = (jnp.full(values.shape[:-1], float(values.shape[-1]), jnp.float32) if where is None
             else jnp.sum(where.astype(jnp.float32), axis=-1))
    return jnp.sum(values, axis=-1) / jnp.maximum(count, 1.0)
  return jnp.sum(values) / nm.masked_count(where, values.size)


# ------------------------------------------------------------------------------ the losses


def _check_common(student_logits, teacher_logits, temperature, where, reduction):
  val.check_logits_pair(student_logits, teacher_logits)
  val.check_rank(student_logits, 2, "student_logits")
  val.check_where(where, jnp.shape(student_logits)[:-1])
  _check_reduction(reduction)
  if isinstance(temperature, numbers.Real) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, where=None,
               reduction="none", vocab_axis=None):
  r"""Forward KL per token: :math:`KL(p^t \| p^s) = \sum_v p^t_v (\log p^t_v - \log p^s_v)`.

  The word-level KD of Kim and Rush (EMNLP 2016, "Sequence-Level Knowledge Distillation") and
  Hinton et al.'s KD without the `T**2` factor (`kd` has it); TRL's
  `generalized_jsd_loss(beta=0)`. See the module docstring for masks, reductions and sharding.

  Args:
    student_logits: `[..., tokens, vocab]` student logits (any float dtype; float32 arithmetic).
    teacher_logits: `[..., tokens, vocab]` teacher logits, the student's shape.
    temperature: `T > 0` dividing both sides' logits.
    where: optional boolean `[..., tokens]` mask of the tokens that count.
    reduction: `"none"` (`[..., tokens]`), `"sequence"` (`[...]`) or `"mean"` (scalar).
    vocab_axis: mesh axis name the vocab axis is sharded over (inside `jax.shard_map`), or None.

  Returns:
    float32 array of the shape `reduction` gives.
  """
  _check_common(student_logits, teacher_logits, temperature, where, reduction)
  return _token_loss(student_logits, teacher_logits, temperature, where, kind="forward_kl",
                     beta=0.0, reduction=reduction, vocab_axis=vocab_axis)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, where=None,
               reduction="none", vocab_axis=None):
  r"""Reverse KL per token: :math:`KL(p^s \| p^t) = \sum_v p^s_v (\log p^s_v - \log p^t_v)`.

  Mode-seeking: the student is penalised for mass where the teacher has little (MiniLLM, Gu et
  al., ICLR 2024, optimise its sequence-level form); TRL's `generalized_jsd_loss(beta=1)`.
  Arguments and output as `forward_kl`.
  """
  _check_common(student_logits, teacher_logits, temperature, where, reduction)
  return _token_loss(student_logits, teacher_logits, temperature, where, kind="reverse_kl",
                     beta=1.0, reduction=reduction, vocab_axis=vocab_axis)


def generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, where=None,
                    reduction="none", vocab_axis=None):
  r"""Generalized Jensen-Shannon divergence per token, as TRL's `generalized_jsd_loss`.

  Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
  Mistakes" (ICLR 2024), Eq. 1; reference implementation
  `GKDTrainer.generalized_jsd_loss` in huggingface/trl (`trl/experimental/gkd/gkd_trainer.py`).
  With the mixture :math:`m = \beta p^t + (1 - \beta) p^s` (in probability space; its log is a
  `logaddexp` of the two log-probabilities),

  .. math::
    JSD_\beta = \beta \, KL(p^t \| m) + (1 - \beta) \, KL(p^s \| m), \quad 0 < \beta < 1.

  As TRL, `beta = 0` is defined as the forward KL :math:`KL(p^t \| p^s)` and `beta = 1` as the
  reverse KL :math:`KL(p^s \| p^t)`. These are the limits of :math:`JSD_\beta / \beta` and of
  :math:`JSD_\beta / (1 - \beta)`, not of :math:`JSD_\beta` itself (which tends to 0 at both
  ends): the value jumps at the endpoints; the direction of the gradient does not. `beta = 0.5`
  is the symmetric JSD.

  Args:
    student_logits, teacher_logits, temperature, where, reduction, vocab_axis: as `forward_kl`.
    beta: the skew, a Python number in [0, 1] (static: it selects the formula).

  Returns:
    float32 array of the shape `reduction` gives.
  """
  _check_common(student_logits, teacher_logits, temperature, where, reduction)
  if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
    raise ValueError(f"beta must be a Python number in [0, 1], got {beta!r}.")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must lie in [0, 1], got {beta}.")
  beta = float(beta)
  kind = "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"
  return _token_loss(student_logits, teacher_logits, temperature, where, kind=kind, beta=beta,
                     reduction=reduction, vocab_axis=vocab_axis)


def total_variation(student_logits, teacher_logits, *, temperature=1.0, where=None,
                    reduction="none", vocab_axis=None):
  r"""Total variation distance per token: :math:`\frac12 \sum_v |p^s_v - p^t_v|`, in [0, 1].

  The token-level TVD of Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge
  Distillation" (ACL 2023). Bounded and symmetric. Arguments and output as `forward_kl`.
  """
  _check_common(student_logits, teacher_logits, temperature, where, reduction)
  return _token_loss(student_logits, teacher_logits, temperature, where, kind="tv", beta=0.0,
                     reduction=reduction, vocab_axis=vocab_axis)


@functools.partial(jax.jit, static_argnames=("kind", "beta", "reduction", "vocab_axis"))
def _token_loss(student_logits, teacher_logits, temperature, where, *, kind, beta, reduction,
                vocab_axis):
  s = nm.to_float32(student_logits)
  t = nm.to_float32(teacher_logits)
  if where is not None:  # zeros at masked tokens, so that garbage there cannot reach a gradient
    s = jnp.where(where[..., None], s, 0.0)
    t = jnp.where(where[..., None], t, 0.0)
  temperature = jnp.asarray(temperature, jnp.float32)
  s, t = s / temperature, t / temperature
  ps, lse_s = nm.softmax_and_logsumexp(s, vocab_axis)
  pt, lse_t = nm.softmax_and_logsumexp(t, vocab_axis)
  if kind == "tv":
    terms = 0.5 * jnp.abs(ps - pt)
  else:
    log_ps, log_pt = s - lse_s, t - lse_t
    if kind == "forward_kl":
      terms = pt * nm.neg_inf_to_zero(t, log_pt - log_ps)
    elif kind == "reverse_kl":
      terms = ps * (log_ps - log_pt)
    else:  # 0 < beta < 1: log m = log((1 - beta) p^s + beta p^t)
      log_m = jnp.logaddexp(log_ps + jnp.log1p(-beta), log_pt + jnp.log(beta))
      terms = (beta * pt * nm.neg_inf_to_zero(t, log_pt - log_m)
               + (1.0 - beta) * ps * (log_ps - log_m))
  loss = nm.class_sum(terms, vocab_axis)
  return _reduce(loss, where, reduction)
