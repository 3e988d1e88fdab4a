"""Logit distillation: Hinton KD and decoupled KD (DKD), per example, in float32.

Both compare temperature-softened class distributions of a student and a teacher. They return a
per-example loss of the batch shape; the caller reduces (the batch mean reproduces the reference
implementations' `sum / B` convention). Gradients flow into both arguments: freezing the teacher
(`jax.lax.stop_gradient` or differentiating only the student) is the train step's job.

Each public function checks its inputs in Python (static shapes, and concrete labels when it can)
and then calls a jitted core: an eager call compiles once per shape, and inside a jitted train
step the core is simply inlined.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses import _numerics as nm
from kd_jax.losses import _validation as val

__all__ = ["kd", "dkd"]


def _check_temperature(temperature) -> None:
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")


def _masked_rows(x, where):
  """Replaces masked-out rows by zeros so that garbage there (inf, NaN) cannot reach a gradient."""
  if where is None:
    return x
  return jnp.where(where[..., None], x, jnp.zeros_like(x))


def kd(student_logits, teacher_logits, *, temperature=4.0, where=None):
  r"""Hinton knowledge distillation: :math:`T^2 \, KL(softmax(t/T) \| softmax(s/T))` per example.

  Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015). The batch mean
  of this loss equals RepDistiller's `DistillKL` (`kl_div(log_softmax(s/T), softmax(t/T),
  reduction="sum") / B * T**2`) and torchdistill's / KD-Zoo's `batchmean * T**2`.

  Args:
    student_logits: `[..., num_classes]` student logits (any float dtype; computed in float32).
    teacher_logits: `[..., num_classes]` teacher logits, same shape as the student's.
    temperature: softmax temperature `T > 0` applied to both sides (4 on CIFAR-100, 1 on ImageNet).
    where: optional boolean mask of the batch shape `[...]`; masked examples give exactly 0.

  Returns:
    float32 array of the batch shape `[...]`.
  """
  val.check_logits_pair(student_logits, teacher_logits)
  val.check_where(where, jnp.shape(student_logits)[:-1])
  _check_temperature(temperature)
  return _kd(student_logits, teacher_logits, temperature, where)


@jax.jit
def _kd(student_logits, teacher_logits, temperature, where):
  s = _masked_rows(nm.to_float32(student_logits), where)
  t = _masked_rows(nm.to_float32(teacher_logits), where)
  temperature = jnp.asarray(temperature, jnp.float32)
  loss = temperature**2 * nm.kl_from_logits(t / temperature, s / temperature)
  return nm.apply_where(loss, where)


def _check_labels(labels, batch_shape, num_classes, where) -> None:
  """Labels must be integers of the batch shape; concrete labels are range-checked."""
  if tuple(jnp.shape(labels)) != tuple(batch_shape):
    raise ValueError(
        f"labels must have the batch shape {tuple(batch_shape)} of the logits, got "
        f"labels.shape={jnp.shape(labels)}."
    )
  if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {jnp.asarray(labels).dtype}.")
  if isinstance(labels, jax.core.Tracer) or isinstance(where, jax.core.Tracer):
    return  # Under a transformation the range cannot be checked; see the `dkd` docstring.
  lab = np.asarray(labels)
  keep = np.ones(lab.shape, bool) if where is None else np.asarray(where)
  bad = keep & ((lab < 0) | (lab >= num_classes))
  if bad.any():
    raise ValueError(
        f"labels must lie in [0, {num_classes}) for logits with {num_classes} classes; got "
        f"{lab[bad][:5].tolist()} (labels.shape={lab.shape})."
    )


def dkd(student_logits, teacher_logits, labels, *, alpha=1.0, beta=8.0, temperature=4.0,
        where=None):
  r"""Decoupled knowledge distillation: `alpha * TCKD + beta * NCKD`, per example.

  Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022); reference implementation
  `dkd_loss` in megvii-research/mdistiller `mdistiller/distillers/DKD.py`. With
  :math:`p = softmax(z/T)` and :math:`y` the label,

  * TCKD :math:`= T^2 \, KL(b^t \| b^s)` with the binary distribution
    :math:`b = (p_y, 1 - p_y)` (target versus non-target mass);
  * NCKD :math:`= T^2 \, KL(\hat p^t \| \hat p^s)` with :math:`\hat p` the softmax over the
    non-target classes only.

  The batch mean equals mdistiller's `dkd_loss` (which sums and divides by the batch size). The
  reference removes the target class by subtracting 1000 from its tempered logit; we exclude it
  with a mask (`masked_log_softmax`), which is the `1000 -> infinity` limit of the same formula:
  the two agree to float precision whenever the tempered logits span much less than 1000, and
  ours stays exact beyond. The binary masses are computed in log space (`logsumexp`) rather than
  as `log(sum(p))`, so they stay finite for logits of any size.

  mdistiller multiplies the loss by a linear warm-up `min(epoch / warmup, 1)` (20 epochs on
  CIFAR-100) and adds cross-entropy with weight 1; both are left to the caller.

  Args:
    student_logits: `[..., num_classes]` student logits, `num_classes >= 2`.
    teacher_logits: `[..., num_classes]` teacher logits.
    labels: integer ground-truth classes of the batch shape `[...]`. Outside `jax.jit` a label
      outside `[0, num_classes)` (in an unmasked example) raises a `ValueError`; inside `jax.jit`
      it cannot be checked and the loss of that example is NaN.
    alpha: weight of TCKD (1 in mdistiller).
    beta: weight of NCKD (8 by default; 2 or 6 for some CIFAR-100 pairs, 0.5 on ImageNet).
    temperature: softmax temperature `T > 0` (4 on CIFAR-100, 1 on ImageNet).
    where: optional boolean mask of the batch shape; masked examples give exactly 0 (their
      labels are not checked).

  Returns:
    float32 array of the batch shape `[...]`.
  """
  val.check_logits_pair(student_logits, teacher_logits)
  batch_shape = jnp.shape(student_logits)[:-1]
  num_classes = jnp.shape(student_logits)[-1]
  if num_classes < 2:
    raise ValueError(f"dkd needs at least 2 classes, got logits of shape "
                     f"{jnp.shape(student_logits)}.")
  val.check_where(where, batch_shape)
  _check_labels(labels, batch_shape, num_classes, where)
  _check_temperature(temperature)
  return _dkd(student_logits, teacher_logits, labels, alpha, beta, temperature, where)


@jax.jit
def _dkd(student_logits, teacher_logits, labels, alpha, beta, temperature, where):
  num_classes = student_logits.shape[-1]
  s = _masked_rows(nm.to_float32(student_logits), where)
  t = _masked_rows(nm.to_float32(teacher_logits), where)
  labels = jnp.asarray(labels)
  in_range = (labels >= 0) & (labels < num_classes)
  gt = jax.nn.one_hot(jnp.where(in_range, labels, 0), num_classes, dtype=jnp.bool_)
  temperature = jnp.asarray(temperature, jnp.float32)
  s, t = s / temperature, t / temperature

  def binary_log_probs(z):
    log_p = jax.nn.log_softmax(z, axis=-1)
    log_target = jnp.sum(jnp.where(gt, log_p, 0.0), axis=-1)
    log_other = jax.nn.logsumexp(jnp.where(gt, 0.0, log_p), axis=-1, where=~gt)
    return jnp.stack([log_target, log_other], axis=-1)

  tckd = nm.kl_from_logits(binary_log_probs(t), binary_log_probs(s))
  nckd = nm.kl_from_logits(t, s, mask=~gt)
  loss = temperature**2 * (alpha * tckd + beta * nckd)
  loss = jnp.where(in_range, loss, jnp.nan)
  return nm.apply_where(loss, where)
