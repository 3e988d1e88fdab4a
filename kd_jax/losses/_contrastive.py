"""Contrastive representation distillation (CRD): an NCE loss over given memory-bank negatives.

The loss is pure: the memory banks (one per side, [num_data, d] unit rows), the sampling of the
negatives and the momentum update are the training code's explicit state. This module scores the
given rows, as RepDistiller's `ContrastMemory` does, and applies its NCE loss; `crd_memory_update`
is the pure form of the memory's momentum update.

Shapes: embeds [B, d] (already projected by the trainable linear heads and l2-normalised),
negatives [B, K, d] (rows gathered from the OTHER side's memory bank), positives [B, d].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax.losses._numerics import apply_where
from kd_jax.losses._numerics import l2_normalize
from kd_jax.losses._numerics import to_float32
from kd_jax.losses._validation import check_rank
from kd_jax.losses._validation import check_same_shape
from kd_jax.losses._validation import check_where

__all__ = ["crd", "crd_from_scores", "crd_normalizers", "crd_normalizers_from_scores",
           "crd_memory_update"]

# The reference's `eps` in `ContrastLoss`.
_NCE_EPS = 1e-7


def _check_inputs(student_embed, teacher_embed, student_negatives, teacher_negatives,
                  student_positive, teacher_positive, where):
  check_rank(student_embed, 2, "student_embed")
  check_same_shape(student_embed, teacher_embed, "student_embed", "teacher_embed")
  check_rank(student_negatives, 3, "student_negatives")
  check_same_shape(student_negatives, teacher_negatives, "student_negatives",
                   "teacher_negatives")
  b, d = jnp.shape(student_embed)
  nb, k, nd = jnp.shape(student_negatives)
  if (nb, nd) != (b, d) or k < 1:
    raise ValueError(
        "student_negatives must be [B, K, d] (K >= 1) for student_embed [B, d], got "
        f"student_negatives.shape={jnp.shape(student_negatives)} and "
        f"student_embed.shape={jnp.shape(student_embed)}."
    )
  for name, pos in (("student_positive", student_positive),
                    ("teacher_positive", teacher_positive)):
    if pos is not None:
      check_same_shape(pos, student_embed, name, "student_embed")
  check_where(where, (b,))


def _scores(anchor, positive, negatives, temperature):
  """[B, K + 1] logits <row, anchor> / T, the positive in column 0 (RepDistiller's `idx` order)."""
  rows = jnp.concatenate([positive[:, None, :], negatives], axis=1)
  # Full float32 products: accelerators default to TF32 (GPU) or one bfloat16 pass (TPU), and
  # exp(score / 0.07) magnifies any error in the score 14-fold.
  scores = jnp.einsum("bkd,bd->bk", rows, anchor, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
  return scores / temperature


def _logsumexp(x, mask):
  """log sum exp over the entries where `mask` is True (all entries for None); -inf if none.

  The shifted exponent is clipped at 0: when XLA contracts (s / T) - max into one fused
  multiply-add, a huge score (unnormalised inputs) can exceed its own rounded maximum by more
  than 88 and exp would overflow, which `jax.nn.logsumexp` does not guard against.
  """
  if mask is not None:
    x = jnp.where(mask, x, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(x))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  return m + jnp.log(jnp.sum(jnp.exp(jnp.minimum(x - m, 0.0))))


def _log_normalizer(scores, num_data, where):
  """log Z, Z = mean(exp(scores)) * num_data over the valid rows (the reference's first step)."""
  if where is None:
    count = jnp.asarray(scores.size)
    lse = _logsumexp(scores, None)
  else:
    mask = jnp.broadcast_to(where[:, None], scores.shape)
    count = jnp.maximum(jnp.sum(mask), 1)
    lse = _logsumexp(scores, mask)
    # All-False mask: logsumexp is -inf; any finite value will do, the loss is zeroed anyway.
    lse = jnp.where(jnp.any(mask), lse, 0.0)
  return jax.lax.stop_gradient(lse - jnp.log(count.astype(jnp.float32)) + math.log(num_data))


def _prepare_side(anchor, positive, negatives, temperature):
  anchor = to_float32(anchor)
  positive = jax.lax.stop_gradient(to_float32(positive))
  negatives = jax.lax.stop_gradient(to_float32(negatives))
  return _scores(anchor, positive, negatives, temperature)


def _mask_rows(x, where):
  if where is None:
    return x
  return jnp.where(jnp.reshape(where, where.shape + (1,) * (x.ndim - 1)), x, 0.0)


def _both_scores(student_embed, teacher_embed, student_negatives, teacher_negatives,
                 student_positive, teacher_positive, temperature, where):
  """[B, K + 1] scores of the student anchor against teacher rows and vice versa.

  Positives and negatives play the memory bank's part and are detached (also when the positives
  default to the live embeds); gradients flow through the anchors. Masked rows are zeroed first,
  so nothing non-finite in them reaches a value or a gradient.
  """
  student_positive = student_embed if student_positive is None else student_positive
  teacher_positive = teacher_embed if teacher_positive is None else teacher_positive
  s_scores = _prepare_side(_mask_rows(student_embed, where), _mask_rows(teacher_positive, where),
                           _mask_rows(teacher_negatives, where), temperature)
  t_scores = _prepare_side(_mask_rows(teacher_embed, where), _mask_rows(student_positive, where),
                           _mask_rows(student_negatives, where), temperature)
  return s_scores, t_scores


def crd_normalizers(student_embed, teacher_embed, student_negatives, teacher_negatives, *,
                    num_data: int, temperature: float = 0.07, student_positive=None,
                    teacher_positive=None, where=None):
  """The NCE normalising constants (Z_s, Z_t) that RepDistiller fixes at its first step.

  Z = mean_{b, k} exp(<row_bk, anchor_b> / T) * num_data over the batch's K + 1 rows (positive
  and negatives), for the student anchor against teacher rows (Z_s, RepDistiller `Z_v1`) and the
  teacher anchor against student rows (Z_t, `Z_v2`). To reproduce RepDistiller exactly, compute
  these once on the first batch, keep them in the training state and pass them to `crd` as
  `normalizers` ever after. Arguments as in `crd`.

  Returns:
    (z_s, z_t): two float32 scalars, without gradient.
  """
  _check_inputs(student_embed, teacher_embed, student_negatives, teacher_negatives,
                student_positive, teacher_positive, where)
  s_scores, t_scores = _both_scores(student_embed, teacher_embed, student_negatives,
                                    teacher_negatives, student_positive, teacher_positive,
                                    temperature, where)
  return crd_normalizers_from_scores(s_scores, t_scores, num_data=num_data, where=where)


def crd_normalizers_from_scores(student_scores, teacher_scores, *, num_data: int, where=None):
  """`crd_normalizers` from the `[B, K + 1]` score matrices of `crd_from_scores`."""
  _check_scores(student_scores, teacher_scores, where)
  return (jnp.exp(_log_normalizer(to_float32(student_scores), num_data, where)),
          jnp.exp(_log_normalizer(to_float32(teacher_scores), num_data, where)))


def _check_scores(student_scores, teacher_scores, where):
  shape = jnp.shape(student_scores)
  if len(shape) != 2 or shape[1] < 2:
    raise ValueError(f"scores must be [B, K + 1] with K >= 1 (positive in column 0), got "
                     f"student_scores.shape={shape}.")
  check_same_shape(teacher_scores, student_scores, "teacher_scores", "student_scores")
  check_where(where, shape[:1])


def _nce(scores, log_z, num_data):
  """Per-row NCE loss of RepDistiller `ContrastLoss` on P = exp(scores) / Z, in log space.

  -log(P_0 / (P_0 + K/N + eps)) - sum_k log((K/N) / (P_k + K/N + eps)).
  """
  k = scores.shape[-1] - 1
  log_p = scores - log_z
  log_noise = math.log(k / num_data)
  log_denom = jnp.logaddexp(log_p, math.log(k / num_data + _NCE_EPS))
  log_d1 = log_p[:, 0] - log_denom[:, 0]
  log_d0 = log_noise - log_denom[:, 1:]
  return -(log_d1 + jnp.sum(log_d0, axis=-1))


def crd(student_embed, teacher_embed, student_negatives, teacher_negatives, *, num_data: int,
        temperature: float = 0.07, normalizers=None, student_positive=None,
        teacher_positive=None, where=None):
  """Contrastive representation distillation: two NCE losses against memory-bank negatives.

  For the student anchor s_b (against teacher-memory rows) and symmetrically the teacher anchor
  t_b (against student-memory rows), with P_bk = exp(<row_bk, anchor_b> / T) / Z for the positive
  row k = 0 and the K negatives k = 1..K, noise probability 1/N (N = num_data) and eps = 1e-7:

    nce_b = -log(P_b0 / (P_b0 + K/N + eps)) - sum_{k>=1} log((K/N) / (P_bk + K/N + eps)),
    loss_b = nce_b(student anchor, Z_s) + nce_b(teacher anchor, Z_t).

  The batch mean of `loss_b` equals RepDistiller's `CRDLoss` (`criterion_s(out_s) +
  criterion_t(out_t)`). Computed in log space, so unnormalised or large inputs stay finite.

  Paper: Y. Tian, D. Krishnan, P. Isola, "Contrastive Representation Distillation", ICLR 2020.
  Reference: HobbitLong/RepDistiller `crd/criterion.py` (`CRDLoss`, `ContrastLoss`) and
  `crd/memory.py` (`ContrastMemory` scoring). RepDistiller: loss weight `-b 0.8` with CE weight 1
  (`-a 0`), `feat_dim` 128, K = `nce_k` 16384, T = `nce_t` 0.07, memory momentum 0.5, N the
  training-set size, "exact" mode (the positive is the sample's own memory row; negatives are
  other classes' samples).

  What the caller owns: the two trainable `Embed` heads (linear + l2-normalise, applied to the
  pooled penultimate features; the teacher's head is trained too, so no gradient is stopped on
  either embed here), the two memory banks, the sampling of negative indices and the momentum
  update (`crd_memory_update`, applied AFTER scoring, as the reference does). Memory rows
  (negatives, positives) are under `stop_gradient`.

  Args:
    student_embed: [B, d] projected, l2-normalised student features (RepDistiller `v1`).
    teacher_embed: [B, d] projected, l2-normalised teacher features (`v2`).
    student_negatives: [B, K, d] rows of the STUDENT memory bank at the negative indices; scored
      against the teacher anchor (`memory_v1[idx]`).
    teacher_negatives: [B, K, d] rows of the TEACHER memory bank at the same indices; scored
      against the student anchor (`memory_v2[idx]`).
    num_data: N, the number of training examples (the size of each memory bank).
    temperature: T.
    normalizers: (Z_s, Z_t), the constants for the student-anchor and teacher-anchor scores
      (RepDistiller fixes each from its first batch: see `crd_normalizers`). Default None:
      estimate both from the current batch, exactly as RepDistiller does at its first step (the
      estimate carries no gradient).
    student_positive: [B, d] the student-side positive for the teacher anchor. RepDistiller uses
      the student memory row at the sample's own index (`memory_v1[y]`, before this step's update);
      default: `student_embed`.
    teacher_positive: [B, d] the teacher-side positive for the student anchor (`memory_v2[y]`);
      default: `teacher_embed`.
    where: optional boolean [B] mask; masked rows give 0 and do not enter the Z estimate.

  Returns:
    float32 [B] per-example loss (the caller reduces; mean == the reference).
  """
  _check_inputs(student_embed, teacher_embed, student_negatives, teacher_negatives,
                student_positive, teacher_positive, where)
  s_scores, t_scores = _both_scores(student_embed, teacher_embed, student_negatives,
                                    teacher_negatives, student_positive, teacher_positive,
                                    temperature, where)
  return crd_from_scores(s_scores, t_scores, num_data=num_data, normalizers=normalizers,
                         where=where)


def crd_from_scores(student_scores, teacher_scores, *, num_data: int, normalizers=None,
                    where=None):
  """`crd` from precomputed scores: the NCE part alone.

  For callers that score the memory bank their own way (e.g. the `crd` term,
  `kd_jax.train.terms.crd`, which computes `<memory, anchor>` for the whole bank with one matrix
  product when that is cheaper than gathering `[B, K, d]` rows).

  Args:
    student_scores: `[B, K + 1]` float, `<row, student anchor> / T` against the teacher-side
      rows, the positive in column 0 (`crd`'s student-anchor scores). Rows masked by `where`
      must still be finite (zero them).
    teacher_scores: `[B, K + 1]`, the teacher anchor against the student-side rows.
    num_data, normalizers, where: as in `crd`.

  Returns:
    float32 `[B]` per-example loss.
  """
  _check_scores(student_scores, teacher_scores, where)
  s_scores, t_scores = to_float32(student_scores), to_float32(teacher_scores)
  if normalizers is None:
    log_z_s = _log_normalizer(s_scores, num_data, where)
    log_z_t = _log_normalizer(t_scores, num_data, where)
  else:
    z_s, z_t = normalizers
    log_z_s = jax.lax.stop_gradient(jnp.log(jnp.asarray(z_s, jnp.float32)))
    log_z_t = jax.lax.stop_gradient(jnp.log(jnp.asarray(z_t, jnp.float32)))
  loss = _nce(s_scores, log_z_s, num_data) + _nce(t_scores, log_z_t, num_data)
  return apply_where(loss, where)


def crd_memory_update(memory, embeds, indices, *, momentum: float = 0.5, where=None):
  """Momentum update of a CRD memory bank: m[i] <- normalize(momentum * m[i] + (1 - momentum) e).

  The pure form of RepDistiller `crd/memory.py` (`ContrastMemory.forward`, "update memory"):
  returns the new bank; the caller applies it after the loss has scored the old one, once per
  side (the student bank with the student embeds, the teacher bank with the teacher embeds).
  Rows are normalised by max(||row||, 1e-12) (the reference divides by the bare norm). With
  repeated indices in one batch one of the updates wins (as `index_copy_`).

  Args:
    memory: [N, d] memory bank.
    embeds: [B, d] this batch's embeds of one side (gradients are stopped).
    indices: [B] integer dataset indices of the batch's samples.
    momentum: weight of the old row.
    where: optional boolean [B] mask; masked rows leave the bank unchanged.

  Returns:
    [N, d] updated memory bank, in the memory's dtype.
  """
  check_rank(memory, 2, "memory")
  check_rank(embeds, 2, "embeds")
  if jnp.shape(embeds)[1] != jnp.shape(memory)[1]:
    raise ValueError(
        f"embeds must have the memory's width, got embeds.shape={jnp.shape(embeds)} and "
        f"memory.shape={jnp.shape(memory)}."
    )
  if jnp.shape(indices) != jnp.shape(embeds)[:1]:
    raise ValueError(
        f"indices must be [B] for embeds [B, d], got indices.shape={jnp.shape(indices)} and "
        f"embeds.shape={jnp.shape(embeds)}."
    )
  check_where(where, jnp.shape(indices))
  embeds = jax.lax.stop_gradient(to_float32(embeds))
  old = to_float32(memory)[indices]
  new = l2_normalize(momentum * old + (1.0 - momentum) * embeds, axis=-1)
  if where is not None:
    # Out-of-range indices are dropped: masked rows write nothing.
    indices = jnp.where(where, indices, memory.shape[0])
  return memory.at[indices].set(new.astype(memory.dtype), mode="drop")
