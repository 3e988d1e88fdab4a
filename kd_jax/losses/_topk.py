"""Sparse KD over the teacher's top-k classes: exact KL over k + 1 buckets (top-k and the tail).

A teacher-output cache that keeps only the teacher's k most probable classes per example
(`kd_jax.data.topk_cache`) needs a loss that reads k values instead of K. Given the teacher's k
largest logits `z_S` (classes `S`, |S| = k) and the log-sum-exp of its other tempered logits
`tail = logsumexp_{j not in S}(z_j / T)`, the teacher's tempered distribution is known exactly on
the k + 1 buckets {j}_{j in S} and "all other classes":

    p_j = exp(z_j / T - L),   p_tail = exp(tail - L),   L = logaddexp(logsumexp(z_S / T), tail)

and the student's on the same buckets is `q_j = softmax(s / T)_j`, `q_tail = 1 - sum_S q_j`
(computed as a masked log-sum-exp over the complement of S, never as `1 - sum`). The loss is

    sparse_kd = T^2 * KL_{k+1}(p || q) = T^2 * [sum_{j in S} p_j log(p_j / q_j)
                                                + p_tail log(p_tail / q_tail)].

Why the tail bucket (rather than renormalising both sides over the top k): it is the KL of the
two distributions coarse-grained onto the same k + 1 cells, so (a) at k = K it *is* Hinton KD,
(b) for k < K it is a lower bound of the dense KL (merging cells never increases a KL, the
data-processing inequality) that is zero exactly when the student matches the teacher on the
top-k classes and on the total tail mass, and (c) the student still pays for putting mass
outside the teacher's top k, which a renormalised top-k KL ignores. Its gradient with respect
to a student logit is `(q_j - p_j) / T * T^2` on S, as in dense KD, and `q_j (1 - p_tail / q_tail)
/ T * T^2` on the tail: the teacher's tail mass is spread in proportion to the student's own tail.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kd_jax.losses import _numerics as nm
from kd_jax.losses import _validation as val

__all__ = ["TopK", "teacher_topk", "sparse_kd", "topk_kl"]


class TopK(NamedTuple):
  """A teacher's top-k outputs at one temperature (what a top-k cache stores per example).

  Attributes:
    logits: `[..., k]` the teacher's k largest logits (raw, not divided by the temperature).
    indices: `[..., k]` integer class indices of those logits (distinct within a row).
    tail_logsumexp: `[...]` `logsumexp_{j not in indices}(teacher_logits_j / T)` at the
      temperature T the loss will use; ignored when k equals the number of classes.
  """

  logits: jax.Array
  indices: jax.Array
  tail_logsumexp: jax.Array


def _check_temperature(temperature) -> None:
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")


def teacher_topk(teacher_logits, *, k: int, temperature=1.0) -> TopK:
  r"""The teacher's top-k logits, their classes and the tail's log-sum-exp at `temperature`.

  `logits, indices = lax.top_k(teacher_logits, k)` (descending) and
  :math:`tail = \log \sum_{j \notin S} e^{z_j / T}` over the other classes (`-inf` when
  `k = num_classes`), all float32 (int32 indices), computed from the dense logits so no mass is
  lost to cancellation. The top-k set is the same at every temperature; only the tail depends
  on it. Feed the result to `sparse_kd` at the same temperature.

  Args:
    teacher_logits: `[..., num_classes]` teacher logits (any float dtype; float32 arithmetic).
    k: number of classes kept, `1 <= k <= num_classes` (static).
    temperature: the temperature `T > 0` of the tail.

  Returns:
    `TopK(logits [..., k], indices [..., k] int32, tail_logsumexp [...])`.
  """
  val.check_rank(teacher_logits, 1, "teacher_logits")
  num_classes = jnp.shape(teacher_logits)[-1]
  if not isinstance(k, int) or not 1 <= k <= num_classes:
    raise ValueError(f"k must be an int in [1, {num_classes}] for teacher_logits of shape "
                     f"{jnp.shape(teacher_logits)}, got k={k!r}.")
  _check_temperature(temperature)
  return _teacher_topk(teacher_logits, k, temperature)


def _topk_mask(indices, num_classes):
  """Boolean [..., num_classes], True at the classes listed in `indices` [..., k] (a scatter)."""
  lead = indices.shape[:-1]
  rows = indices.reshape(-1, indices.shape[-1])
  mask = jnp.zeros((rows.shape[0], num_classes), bool)
  mask = mask.at[jnp.arange(rows.shape[0])[:, None], rows].set(True)
  return mask.reshape(lead + (num_classes,))


@functools.partial(jax.jit, static_argnums=1)
def _teacher_topk(teacher_logits, k, temperature):
  z = nm.to_float32(teacher_logits)
  values, indices = jax.lax.top_k(z, k)
  num_classes = z.shape[-1]
  if k == num_classes:
    tail = jnp.full(z.shape[:-1], -jnp.inf, jnp.float32)
  else:
    rest = ~_topk_mask(indices, num_classes)
    zt = z / jnp.asarray(temperature, jnp.float32)
    tail = jax.nn.logsumexp(jnp.where(rest, zt, 0.0), axis=-1, where=rest)
  return TopK(values, indices.astype(jnp.int32), tail)


def _masked_topk(teacher: TopK, where):
  """Masked rows get harmless values (zeros, classes 0..k-1) so garbage cannot reach a gradient."""
  if where is None:
    return teacher
  k = teacher.indices.shape[-1]
  keep = where[..., None]
  return TopK(jnp.where(keep, teacher.logits, 0.0),
              jnp.where(keep, teacher.indices, jnp.arange(k, dtype=teacher.indices.dtype)),
              jnp.where(where, teacher.tail_logsumexp, 0.0))


def _bucket_kl(student_logits, teacher: TopK, temperature, where):
  """KL_{k+1}(p || q) per row, float32 (no T^2), masked rows exactly 0."""
  s = nm.to_float32(student_logits)
  if where is not None:
    s = jnp.where(where[..., None], s, 0.0)
  teacher = TopK(nm.to_float32(teacher.logits), jnp.asarray(teacher.indices, jnp.int32),
                 nm.to_float32(teacher.tail_logsumexp))
  teacher = _masked_topk(teacher, where)
  num_classes, k = s.shape[-1], teacher.indices.shape[-1]
  temperature = jnp.asarray(temperature, jnp.float32)
  indices = jnp.clip(teacher.indices, 0, num_classes - 1)
  z = teacher.logits / temperature
  st = s / temperature
  lse_s = jax.nn.logsumexp(st, axis=-1, keepdims=True)
  log_q = jnp.take_along_axis(st, indices, axis=-1) - lse_s
  if k == num_classes:  # no tail: exactly Hinton's KL over all classes.
    log_p = jax.nn.log_softmax(z, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  else:
    lse_top = jax.nn.logsumexp(z, axis=-1)
    total = jnp.logaddexp(lse_top, teacher.tail_logsumexp)[..., None]
    log_p = z - total
    log_p_tail = teacher.tail_logsumexp - total[..., 0]
    rest = ~_topk_mask(indices, num_classes)
    log_q_tail = (jax.nn.logsumexp(jnp.where(rest, st, 0.0), axis=-1, where=rest)
                  - lse_s[..., 0])
    kl = (jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
          + jnp.exp(log_p_tail) * (log_p_tail - log_q_tail))
  return nm.apply_where(kl, where)


def _check_topk_pair(student_logits, teacher: TopK, where) -> None:
  if not isinstance(teacher, tuple) or len(teacher) != 3:
    raise ValueError("teacher must be a TopK(logits, indices, tail_logsumexp) "
                     f"(kd_jax.losses.teacher_topk), got {type(teacher).__name__}.")
  teacher = TopK(*teacher)
  val.check_rank(student_logits, 1, "student_logits")
  batch_shape = tuple(jnp.shape(student_logits)[:-1])
  num_classes = jnp.shape(student_logits)[-1]
  val.check_same_shape(teacher.logits, teacher.indices, "teacher.logits", "teacher.indices")
  if tuple(jnp.shape(teacher.logits)[:-1]) != batch_shape:
    raise ValueError(
        f"teacher top-k of shape {jnp.shape(teacher.logits)} does not match the batch shape "
        f"{batch_shape} of student_logits.shape={jnp.shape(student_logits)}.")
  if tuple(jnp.shape(teacher.tail_logsumexp)) != batch_shape:
    raise ValueError(
        f"teacher.tail_logsumexp must have the batch shape {batch_shape}, got shape "
        f"{jnp.shape(teacher.tail_logsumexp)}.")
  k = jnp.shape(teacher.logits)[-1]
  if not 1 <= k <= num_classes:
    raise ValueError(f"the teacher's top-k has k={k} classes, the student {num_classes}; "
                     f"need 1 <= k <= {num_classes}.")
  if not jnp.issubdtype(jnp.asarray(teacher.indices).dtype, jnp.integer):
    raise ValueError(f"teacher.indices must be integers, got dtype "
                     f"{jnp.asarray(teacher.indices).dtype}.")
  val.check_where(where, batch_shape)


def sparse_kd(student_logits, teacher: TopK, *, temperature, where=None):
  r"""Hinton KD from the teacher's top-k only: :math:`T^2 \, KL_{k+1}(p \| q)` per example.

  The teacher's tempered distribution on its top-k classes and one tail bucket (all other
  classes; mass from `teacher.tail_logsumexp`) against the student's on the same k + 1 buckets
  (see the module docstring for the formula and why a tail bucket). At k = num_classes this is
  `kd` (Hinton, Vinyals and Dean 2015) exactly; for k < num_classes it is a lower bound of it,
  tight when the teacher's tail is proportional to the student's. Sparse top-k distillation as
  in the top-k logit caches of LLM distillation (e.g. Anshumann et al., "Sparse Logit Sampling",
  2025, who analyse the bias of renormalised top-k; the tail bucket keeps the total mass exact).

  Args:
    student_logits: `[..., num_classes]` student logits (any float dtype; float32 arithmetic).
    teacher: `TopK(logits [..., k], indices [..., k], tail_logsumexp [...])`, from
      `teacher_topk(teacher_logits, k=k, temperature=temperature)` or a top-k cache; its tail
      must have been computed at this `temperature`.
    temperature: softmax temperature `T > 0`.
    where: optional boolean mask of the batch shape; masked examples give exactly 0.

  Returns:
    float32 array of the batch shape `[...]`.
  """
  _check_topk_pair(student_logits, teacher, where)
  _check_temperature(temperature)
  return _sparse_kd(student_logits, TopK(*teacher), temperature, where)


@jax.jit
def _sparse_kd(student_logits, teacher, temperature, where):
  temperature = jnp.asarray(temperature, jnp.float32)
  return temperature**2 * _bucket_kl(student_logits, teacher, temperature, where)


def topk_kl(student_logits, teacher_logits, *, k: int, temperature=1.0, where=None):
  r"""KL over the teacher's top-k classes and a tail bucket, from dense logits, per example.

  :math:`KL_{k+1}(p \| q)` with the buckets of the teacher's k largest logits (see the module
  docstring), without the :math:`T^2` factor: `topk_kl(s, t, k=k, temperature=T) * T**2 ==
  sparse_kd(s, teacher_topk(t, k=k, temperature=T), temperature=T)`, and at `k = num_classes`
  it is :math:`KL(softmax(t/T) \| softmax(s/T))`. Works on any leading shape, e.g. language-model
  logits `[batch, time, vocab]` with a `[batch, time]` mask.

  Args:
    student_logits: `[..., num_classes]` student logits.
    teacher_logits: `[..., num_classes]` teacher logits, same shape.
    k: number of teacher classes kept, `1 <= k <= num_classes` (static).
    temperature: softmax temperature `T > 0` of both sides.
    where: optional boolean mask of the batch shape `[...]`; masked entries give exactly 0.

  Returns:
    float32 array of the batch shape `[...]`.
  """
  val.check_logits_pair(student_logits, teacher_logits)
  val.check_where(where, jnp.shape(student_logits)[:-1])
  num_classes = jnp.shape(teacher_logits)[-1]
  if not isinstance(k, int) or not 1 <= k <= num_classes:
    raise ValueError(f"k must be an int in [1, {num_classes}] for teacher_logits of shape "
                     f"{jnp.shape(teacher_logits)}, got k={k!r}.")
  _check_temperature(temperature)
  return _topk_kl(student_logits, teacher_logits, k, temperature, where)


@functools.partial(jax.jit, static_argnums=2)
def _topk_kl(student_logits, teacher_logits, k, temperature, where):
  t = nm.to_float32(teacher_logits)
  if where is not None:  # garbage in masked rows must not reach top_k or the tail's gradient.
    t = jnp.where(where[..., None], t, 0.0)
  return _bucket_kl(student_logits, _teacher_topk(t, k, temperature), temperature, where)
