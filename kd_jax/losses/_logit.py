"""Logit distillation: Hinton KD (optionally on standardised logits), decoupled KD (DKD) and
DIST, in float32.

KD and DKD compare temperature-softened class distributions of a student and a teacher. They return a
per-example loss of the batch shape; the caller reduces (the batch mean reproduces the reference
implementations' `sum / B` convention). Gradients flow into both arguments: freezing the teacher
(`jax.lax.stop_gradient` or differentiating only the student) is the train step's job.

Each public function checks its inputs in Python (static shapes, and concrete labels when it can)
and then calls a jitted core: an eager call compiles once per shape, and inside a jitted train
step the core is simply inlined.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses import _numerics as nm
from kd_jax.losses._batch import gather_batch
from kd_jax.losses import _validation as val

__all__ = ["kd", "dkd", "dist", "standardize_logits"]

# Logit standardisation's stabiliser, added to the standard deviation (Sun et al.'s `normalize`
# and torchdistill's `LogitStdKDLoss` default).
STD_EPS = 1e-7
# torch.nn.functional.cosine_similarity's default, which torchdistill's `DISTLoss` uses.
COS_EPS = 1e-8


def _check_temperature(temperature) -> None:
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")


def _masked_rows(x, where):
  """Replaces masked-out rows by zeros so that garbage there (inf, NaN) cannot reach a gradient."""
  if where is None:
    return x
  return jnp.where(where[..., None], x, jnp.zeros_like(x))


def standardize_logits(logits, *, eps=STD_EPS):
  r"""Z-scores logits along the class axis: :math:`(z - \bar z) / (\epsilon + \sigma(z))`.

  The pre-processing of Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR
  2024): :math:`\sigma` is the *unbiased* standard deviation over the `K` classes (divided by
  `K - 1`, as `torch.Tensor.std` in the authors' `normalize` and in torchdistill's
  `LogitStdKDLoss.standardize`) and `eps` = 1e-7 is added to it. Computed in float32; a row of
  equal logits gives zeros with a zero gradient (its standard deviation is clipped away from 0
  under the square root).

  Args:
    logits: `[..., num_classes]` logits, `num_classes >= 2`.
    eps: added to the standard deviation.

  Returns:
    float32 array of the logits' shape.
  """
  k = jnp.shape(logits)[-1]
  if k < 2:
    raise ValueError(f"standardize_logits needs at least 2 classes (the unbiased standard "
                     f"deviation divides by K - 1), got logits of shape {jnp.shape(logits)}.")
  return _standardize(nm.to_float32(logits), eps)


def _standardize(z, eps):
  k = z.shape[-1]
  centred = z - jnp.mean(z, axis=-1, keepdims=True)
  var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / (k - 1)
  return centred / (eps + nm.safe_sqrt(var))


def kd(student_logits, teacher_logits, *, temperature=4.0, standardize=False, where=None):
  r"""Hinton knowledge distillation: :math:`T^2 \, KL(softmax(t/T) \| softmax(s/T))` per example.

  Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (2015). The batch mean
  of this loss equals RepDistiller's `DistillKL` (`kl_div(log_softmax(s/T), softmax(t/T),
  reduction="sum") / B * T**2`) and torchdistill's / KD-Zoo's `batchmean * T**2`.

  With `standardize=True`, both logits are z-scored first (`standardize_logits`):
  :math:`T^2 \, KL(softmax(Z(t)/T) \| softmax(Z(s)/T))`, the logit standardisation of Sun et
  al., "Logit Standardization in Knowledge Distillation" (CVPR 2024). Its batch mean equals the
  authors' `kd_loss(..., logit_stand=True)` (sunshangquan/logit-standardization-KD,
  `mdistiller/distillers/KD.py`), which keeps the `T^2` factor; torchdistill's
  `LogitStdKDLoss` returns the same KL without `T^2` when used alone (`alpha=None`) and with it
  when combined with cross-entropy. The authors train with T = 2 and KD weight 9 (CE 0.1) on
  CIFAR-100.

  Args:
    student_logits: `[..., num_classes]` student logits (any float dtype; computed in float32).
    teacher_logits: `[..., num_classes]` teacher logits, same shape as the student's.
    temperature: softmax temperature `T > 0` applied to both sides (4 on CIFAR-100, 1 on ImageNet).
    standardize: z-score both logits along the class axis first (needs `num_classes >= 2`).
    where: optional boolean mask of the batch shape `[...]`; masked examples give exactly 0.

  Returns:
    float32 array of the batch shape `[...]`.
  """
  val.check_logits_pair(student_logits, teacher_logits)
  val.check_where(where, jnp.shape(student_logits)[:-1])
  _check_temperature(temperature)
  if standardize and jnp.shape(student_logits)[-1] < 2:
    raise ValueError(f"kd(standardize=True) needs at least 2 classes, got logits of shape "
                     f"{jnp.shape(student_logits)}.")
  return _kd(student_logits, teacher_logits, temperature, where, bool(standardize))


@functools.partial(jax.jit, static_argnums=4)
def _kd(student_logits, teacher_logits, temperature, where, standardize):
  s = _masked_rows(nm.to_float32(student_logits), where)
  t = _masked_rows(nm.to_float32(teacher_logits), where)
  if standardize:
    s, t = _standardize(s, STD_EPS), _standardize(t, STD_EPS)
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


def dist(student_logits, teacher_logits, *, beta=1.0, gamma=1.0, temperature=1.0, where=None,
         axis_name=None):
  r"""DIST: inter- and intra-class Pearson correlation of the class probabilities (a scalar).

  Huang, You, Wang, Qian and Xu, "Knowledge Distillation from A Stronger Teacher" (NeurIPS
  2022). With :math:`Y = softmax(z/T)` row-wise ([b, K]) and
  :math:`\rho(u, v) = \frac{(u - \bar u) \cdot (v - \bar v)}
  {\max(\|u - \bar u\|, \epsilon) \max(\|v - \bar v\|, \epsilon)}`,

  * inter-class relation :math:`= T^2 (1 - \frac{1}{b} \sum_i \rho(Y^s_{i,:}, Y^t_{i,:}))`
    (each example's class distribution),
  * intra-class relation :math:`= T^2 (1 - \frac{1}{K} \sum_k \rho(Y^s_{:,k}, Y^t_{:,k}))`
    (each class's probabilities across the batch),

  and the loss is `beta * inter + gamma * intra`. This equals torchdistill's `DISTLoss` (its
  `tau` is `temperature`; `F.cosine_similarity` with eps 1e-8, which bounds each norm below);
  the authors' `dist_kd.py` divides by `||u|| ||v|| + eps` instead, which differs only for
  (near) constant rows. The authors' CIFAR-100 recipe is CE 1 + 2 x DIST with T = 4 and
  beta = gamma = 1.

  Args:
    student_logits: `[b, num_classes]` student logits (computed in float32).
    teacher_logits: `[b, num_classes]` teacher logits.
    beta: weight of the inter-class relation.
    gamma: weight of the intra-class relation.
    temperature: softmax temperature `T > 0`.
    where: optional boolean [b] row mask. Masked rows are excluded from both relations: the
      inter-class mean is over the valid rows (max(#valid, 1)), and the intra-class correlation
      of each class is taken over the valid rows only (their mean, their norms); an all-False
      mask gives exactly 0 with zero gradients.
    axis_name: optional mapped batch axis: rows and mask are all-gathered over it first, so the
      intra-class relation covers the global batch (as `losses.sp`).

  Returns:
    Scalar float32 loss.
  """
  val.check_rank(student_logits, 2, "student_logits")
  val.check_logits_pair(student_logits, teacher_logits)
  if jnp.ndim(student_logits) != 2:
    raise ValueError(f"dist takes [batch, num_classes] logits, got student_logits.shape="
                     f"{jnp.shape(student_logits)}.")
  val.check_where(where, jnp.shape(student_logits)[:1])
  _check_temperature(temperature)
  student_logits, teacher_logits = gather_batch((student_logits, teacher_logits), axis_name)
  if where is not None:
    where = gather_batch(where, axis_name)
  return _dist(student_logits, teacher_logits, beta, gamma, temperature, where)


def _pearson(a, b, axis, weights=None):
  """Pearson correlation along `axis` as cosine of the centred vectors (norms bounded by eps);
  `weights` (0/1, broadcastable) selects the entries that take part."""
  if weights is None:
    a = a - jnp.mean(a, axis=axis, keepdims=True)
    b = b - jnp.mean(b, axis=axis, keepdims=True)
  else:
    n = jnp.maximum(jnp.sum(weights, axis=axis, keepdims=True), 1.0)
    a = (a - jnp.sum(a * weights, axis=axis, keepdims=True) / n) * weights
    b = (b - jnp.sum(b * weights, axis=axis, keepdims=True) / n) * weights
  dot = jnp.sum(a * b, axis=axis)
  return dot / (nm.safe_norm(a, axis=axis, eps=COS_EPS) * nm.safe_norm(b, axis=axis, eps=COS_EPS))


@jax.jit
def _dist(student_logits, teacher_logits, beta, gamma, temperature, where):
  s = _masked_rows(nm.to_float32(student_logits), where)
  t = _masked_rows(nm.to_float32(teacher_logits), where)
  temperature = jnp.asarray(temperature, jnp.float32)
  ys = jax.nn.softmax(s / temperature, axis=-1)
  yt = jax.nn.softmax(t / temperature, axis=-1)
  b = s.shape[0]
  w = (jnp.ones((b,), jnp.float32) if where is None else where.astype(jnp.float32))
  count = nm.masked_count(where, b)
  inter = jnp.sum(w * (1.0 - _pearson(ys, yt, axis=-1))) / count
  intra = 1.0 - jnp.mean(_pearson(ys, yt, axis=0, weights=None if where is None else w[:, None]))
  if where is not None:  # no valid row: no relation at all (0, not 1 - 0)
    intra = jnp.where(jnp.any(where), intra, 0.0)
  return temperature**2 * (beta * inter + gamma * intra)
