"""Batch-relational distillation losses: match how samples relate to each other, not the samples.

Each loss here compares a [b, b] structure built over the mini-batch (a Gram matrix, pairwise
distances, angles, cosine similarities) between student and teacher, so the student and teacher
feature widths may differ and only the batch size must agree. A boolean row mask `where` [b]
excludes padded rows from every structure and from every normaliser (max(count, 1)); an all-False
mask gives exactly 0. Like every loss of `kd_jax.losses`, they never stop gradients: the train
step applies `stop_gradient` to the teacher's outputs once.

Feature maps are NHWC (channels last); the batch-relational losses flatten every axis after the
first, so the layout does not change their value.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax.losses._batch import gather_batch
from kd_jax.losses._numerics import NORM_EPS
from kd_jax.losses._numerics import l2_normalize
from kd_jax.losses._numerics import masked_count
from kd_jax.losses._numerics import safe_sqrt
from kd_jax.losses._numerics import to_float32
from kd_jax.losses._validation import check_batch_match
from kd_jax.losses._validation import check_rank
from kd_jax.losses._validation import check_same_shape
from kd_jax.losses._validation import check_where

__all__ = ["gram", "sp", "rkd", "pkt", "cc"]

# Full float32 products for the [b, b] structures: by default accelerators compute float32 dots
# in TF32 (recent GPUs) or one bfloat16 pass (TPU), which is far from the reference's values.
_HIGHEST = jax.lax.Precision.HIGHEST


def _layer_pairs(student, teacher, student_name, teacher_name):
  """Returns [(student_i, teacher_i)] for a single pair or for two equally long sequences."""
  s_seq = isinstance(student, (list, tuple))
  t_seq = isinstance(teacher, (list, tuple))
  if s_seq != t_seq:
    raise ValueError(
        f"{student_name} and {teacher_name} must both be arrays or both be lists of arrays, got "
        f"{type(student).__name__} and {type(teacher).__name__}."
    )
  if not s_seq:
    return [(student, teacher)]
  if len(student) != len(teacher):
    raise ValueError(
        f"{student_name} and {teacher_name} must list the same number of layers, got "
        f"{len(student)} and {len(teacher)} (shapes {[jnp.shape(x) for x in student]} and "
        f"{[jnp.shape(x) for x in teacher]})."
    )
  if not student:
    raise ValueError(f"{student_name} and {teacher_name} are empty lists.")
  return list(zip(student, teacher))


def _gather(x, axis_name):
  """All-gathers the rows of `x` (or None) over the named batch axis; identity for None."""
  return None if x is None else gather_batch(x, axis_name)


def _flatten_rows(x, where):
  """[b, ...] -> [b, prod(...)], masked rows set to 0; integer inputs become float32."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  # An explicit row size: `-1` cannot be inferred for an empty batch (b = 0).
  q = jnp.reshape(x, (x.shape[0], math.prod(x.shape[1:])))
  if where is not None:
    q = jnp.where(where[:, None], q, jnp.zeros((), q.dtype))
  return q


def gram(features, *, where=None, eps: float = NORM_EPS):
  """Row-normalised batch Gram matrix of SP: G = normalize_rows(Q Q^T), Q = reshape(A, [b, -1]).

  `G[i, :] = (Q Q^T)[i, :] / max(||(Q Q^T)[i, :]||_2, eps)`, exactly as RepDistiller's
  `Similarity.similarity_loss` (`torch.mm` then `F.normalize`, whose eps is 1e-12). The product is
  accumulated in float32 (`preferred_element_type`, at `Precision.HIGHEST`, so not in TF32 or
  one bfloat16 pass on accelerators) even for bfloat16 features; a zero feature row
  gives a zero Gram row with a finite gradient.

  Args:
    features: [b, ...] activations of one layer (NHWC feature maps or [b, d] embeddings; every axis
      after the batch axis is flattened, so the layout does not matter).
    where: optional boolean [b] row mask; masked rows are zeroed before the product, so their rows
      AND columns of G are exactly 0 and they do not affect the normalisation of the other rows.
    eps: lower bound of a row norm.

  Returns:
    float32 [b, b] (float64 if the features are float64).
  """
  check_rank(features, 2, "features")
  check_where(where, jnp.shape(features)[:1])
  q = _flatten_rows(features, where)
  acc = jnp.promote_types(q.dtype, jnp.float32)
  g = jnp.matmul(q, q.T, precision=_HIGHEST, preferred_element_type=acc)
  return l2_normalize(g, axis=-1, eps=eps)


def _sp_one(student, teacher, where):
  check_rank(student, 2, "student_features")
  check_rank(teacher, 2, "teacher_features")
  check_batch_match(student, teacher)
  check_where(where, jnp.shape(student)[:1])
  g_s = gram(student, where=where)
  g_t = gram(teacher, where=where)
  b = masked_count(where, jnp.shape(student)[0])
  return jnp.sum(jnp.square(g_t - g_s)) / (b * b)


def sp(student_features, teacher_features, *, where=None, axis_name=None):
  """Similarity-preserving KD loss: (1/b^2) * ||G_T - G_S||_F^2, summed over layer pairs.

  `G = gram(A)` is the row-L2-normalised batch Gram matrix of the flattened activations (see
  `gram`). Only the batch size of student and teacher must agree: channels and spatial sizes may
  differ, since only [b, b] matrices are compared.

  Paper: F. Tung and G. Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
  Reference: HobbitLong/RepDistiller `distiller_zoo/SP.py` (`Similarity`, author-verified); the
  value equals the sum over pairs of its per-pair losses. RepDistiller trains with weight
  `-b 3000` on one pair: the last-stage feature map before pooling (`feat[-2]`), with CE weight 1
  and no KD term.

  Args:
    student_features: [b, ...] student activations (NHWC feature maps or [b, d]), or a list/tuple
      of them, one per layer pair.
    teacher_features: [b, ...] teacher activations, or a list/tuple as long as the student's.
    where: optional boolean [b] row mask (the same for every pair). A masked row is excluded from
      the Gram matrices (its row and column) and from b = max(#valid, 1); an all-False mask
      gives 0.
    axis_name: optional name of the mapped batch axis (inside `jax.shard_map` or `jax.pmap`). If
      given, the rows (and `where`) of all devices are all-gathered first, so the loss covers the
      global batch and every device returns the same value; its gradient is right when the global
      objective is the mean of the per-device losses (`pmean` of the gradients under `pmap`, or of
      the loss before `jax.grad` under `shard_map`). None: per-device batch (what a plain
      `jax.jit` over a sharded global batch already sees as the global batch).

  Returns:
    Scalar float32 loss.
  """
  pairs = _layer_pairs(student_features, teacher_features, "student_features",
                       "teacher_features")
  where = _gather(where, axis_name)
  return sum(_sp_one(_gather(s, axis_name), _gather(t, axis_name), where) for s, t in pairs)


def _embedding_pair(student_embed, teacher_embed, where, axis_name):
  """Gathers (if `axis_name`), checks and flattens a student/teacher pair of [b, ...] embeddings.

  Returns float32 `[b, d]` rows with masked rows zeroed, the
  (gathered) mask and the batch size b.
  """
  student_embed, teacher_embed, where = (
      _gather(x, axis_name) for x in (student_embed, teacher_embed, where))
  check_rank(student_embed, 2, "student_embed")
  check_rank(teacher_embed, 2, "teacher_embed")
  check_batch_match(student_embed, teacher_embed, "student_embed", "teacher_embed")
  b = jnp.shape(student_embed)[0]
  check_where(where, (b,))
  s = to_float32(_flatten_rows(student_embed, where))
  t = to_float32(_flatten_rows(teacher_embed, where))
  return s, t, where, b


def _pair_mask(where, b):
  """[b, b] float mask of pairs of valid rows (all ones when `where` is None)."""
  if where is None:
    return jnp.ones((b, b), jnp.float32)
  w = where.astype(jnp.float32)
  return w[:, None] * w[None, :]


def _huber(x):
  """Smooth L1 with beta = 1 (torch `F.smooth_l1_loss`, elementwise): the Huber loss, delta 1."""
  ax = jnp.abs(x)
  return jnp.where(ax < 1.0, 0.5 * jnp.square(x), ax - 0.5)


def _rkd_differences(e, where):
  """diff[i, j] = e_j - e_i ([b, b, d], the reference's `td`), zero for pairs with a masked row."""
  diff = e[None, :, :] - e[:, None, :]
  if where is not None:
    diff = jnp.where(where[:, None, None] & where[None, :, None], diff, 0.0)
  return diff


def _rkd_distances(diff, pair):
  """Pairwise distances of RepDistiller `RKDLoss.pdist`, divided by their mean over valid pairs.

  The squared distances are clamped at 1e-12 before the square root (so a duplicate row is at
  distance 1e-6 with a zero gradient, never NaN), the diagonal is 0 and the mean runs over the
  off-diagonal pairs of valid rows (the reference's `d[d > 0]`). The squared distances are summed
  from the explicit differences (which the angle term needs anyway) rather than expanded as
  |x|^2 + |y|^2 - 2<x, y>: the same value, without the cancellation that turns duplicate rows
  into float32 noise.
  """
  b = diff.shape[0]
  off = pair * (1.0 - jnp.eye(b, dtype=jnp.float32))
  d = safe_sqrt(jnp.sum(jnp.square(diff), axis=-1), eps=1e-6) * off
  n = jnp.sum(off)
  mean = jnp.sum(d) / jnp.maximum(n, 1.0)
  return d / jnp.where(n > 0, mean, 1.0)


def _rkd_angles(diff):
  """cos of the angle at i between j and k: <unit(e_j - e_i), unit(e_k - e_i)>, [b, b, b]."""
  unit = l2_normalize(diff, axis=-1)
  return jnp.einsum("ijd,ikd->ijk", unit, unit, precision=_HIGHEST,
                    preferred_element_type=jnp.float32)


def rkd(student_embed, teacher_embed, *, distance_weight: float = 25.0,
        angle_weight: float = 50.0, where=None, axis_name=None):
  """Relational KD: distance-wise plus angle-wise smooth-L1 between the batch's relations.

  With `psi_D(i, j) = ||e_i - e_j|| / mu` (mu the mean distance over pairs i != j) and
  `psi_A(i, j, k) = <(e_j - e_i) / ||e_j - e_i||, (e_k - e_i) / ||e_k - e_i||>`::

    L = distance_weight * mean_{i,j} huber(psi_D^S - psi_D^T)
        + angle_weight * mean_{i,j,k} huber(psi_A^S - psi_A^T),

  with the Huber loss of delta 1 (torch `smooth_l1_loss`) averaged over all b^2 (b^3) entries,
  diagonal included, as the reference does.

  Paper: W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019.
  Reference: HobbitLong/RepDistiller `distiller_zoo/RKD.py` (`RKDLoss(w_d=25, w_a=50)`), applied
  to the pooled penultimate features (`feat[-1]`) with loss weight `-b 1` and CE weight 1.

  Numerics: squared distances are clamped at 1e-12 before the square root and difference vectors
  are normalised by `max(||v||, 1e-12)`, exactly as the reference, so duplicate or zero rows give
  finite values and gradients. One deliberate difference: squared distances are summed from the
  explicit differences e_j - e_i (which the angle term materialises anyway, [b, b, d] memory, as
  the reference) instead of `|e_i|^2 + |e_j|^2 - 2<e_i, e_j>`; the value is the same up to float32
  rounding, but duplicate rows stay exactly at the clamp instead of becoming cancellation noise.
  With fewer than two valid rows the distance normaliser is 1 (the reference divides by the mean
  of an empty set, NaN) and the loss is 0.

  Args:
    student_embed: [b, ...] student features (flattened to [b, d_s]).
    teacher_embed: [b, ...] teacher features (flattened to [b, d_t]); d_t may differ from d_s.
    distance_weight: weight of the distance term (RepDistiller `w_d`).
    angle_weight: weight of the angle term (RepDistiller `w_a`).
    where: optional boolean [b] row mask; masked rows are excluded from every pair and triple and
      the means run over b_valid^2 and b_valid^3 entries.
    axis_name: optional name of the mapped batch axis (inside `jax.shard_map` or `jax.pmap`). If
      given, the rows (and `where`) of all devices are all-gathered first, so the loss covers the
      global batch and every device returns the same value; its gradient is right when the global
      objective is the mean of the per-device losses (`pmean` of the gradients under `pmap`, or of
      the loss before `jax.grad` under `shard_map`). None: per-device batch (what a plain
      `jax.jit` over a sharded global batch already sees as the global batch).

  Returns:
    Scalar float32 loss.
  """
  s, t, where, b = _embedding_pair(student_embed, teacher_embed, where, axis_name)
  pair = _pair_mask(where, b)
  n = masked_count(where, b)

  diff_s, diff_t = _rkd_differences(s, where), _rkd_differences(t, where)
  d_s, d_t = _rkd_distances(diff_s, pair), _rkd_distances(diff_t, pair)
  loss_d = jnp.sum(pair * _huber(d_s - d_t)) / (n * n)

  a_s, a_t = _rkd_angles(diff_s), _rkd_angles(diff_t)
  # Masked triples have zero difference vectors on both sides: their terms are exactly 0.
  loss_a = jnp.sum(_huber(a_s - a_t)) / (n * n * n)
  return distance_weight * loss_d + angle_weight * loss_a


def _pkt_similarity(x, where, eps):
  """Row-stochastic [b, b] matrix of PKT: (cos + 1) / 2, normalised over the valid columns."""
  norm = safe_sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  x = x / (norm + eps)
  cos = jnp.matmul(x, x.T, precision=_HIGHEST, preferred_element_type=jnp.float32)
  p = (cos + 1.0) / 2.0
  if where is not None:
    p = p * _pair_mask(where, x.shape[0])
  row = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(row > 0, row, 1.0)


def pkt(student_embed, teacher_embed, *, eps: float = 1e-7, where=None, axis_name=None):
  """Probabilistic Knowledge Transfer: KL-like divergence of cosine-similarity distributions.

  x_i <- x_i / (||x_i|| + eps); P_ij = ((<x_i, x_j> + 1) / 2) / sum_k ((<x_i, x_k> + 1) / 2), the
  same for the student (Q); then

    L = mean_{i,j} P_ij * log((P_ij + eps) / (Q_ij + eps)),

  the mean over all b^2 entries (not a sum over j), as the reference.

  Paper: N. Passalis, A. Tefas, "Learning Deep Representations with Probabilistic Knowledge
  Transfer", ECCV 2018. Reference: HobbitLong/RepDistiller `distiller_zoo/PKT.py`
  (`PKT.cosine_similarity_loss`, from the authors' code), applied to the pooled penultimate
  features (`feat[-1]`) with loss weight `-b 30000`.

  Args:
    student_embed: [b, ...] student features (flattened to [b, d_s]).
    teacher_embed: [b, ...] teacher features (flattened to [b, d_t]); d_t may differ from d_s.
    eps: the reference's 1e-7, added to the norms and inside the log.
    where: optional boolean [b] row mask; masked rows and columns are dropped before the row
      normalisation and the mean runs over b_valid^2 entries.
    axis_name: optional name of the mapped batch axis (inside `jax.shard_map` or `jax.pmap`). If
      given, the rows (and `where`) of all devices are all-gathered first, so the loss covers the
      global batch and every device returns the same value; its gradient is right when the global
      objective is the mean of the per-device losses (`pmean` of the gradients under `pmap`, or of
      the loss before `jax.grad` under `shard_map`). None: per-device batch (what a plain
      `jax.jit` over a sharded global batch already sees as the global batch).

  Returns:
    Scalar float32 loss.
  """
  s, t, where, b = _embedding_pair(student_embed, teacher_embed, where, axis_name)
  q = _pkt_similarity(s, where, eps)
  p = _pkt_similarity(t, where, eps)
  terms = p * (jnp.log(p + eps) - jnp.log(q + eps))
  n = masked_count(where, b)
  return jnp.sum(terms) / (n * n)


def cc(student_embed, teacher_embed, *, where=None, axis_name=None):
  """Correlation congruence loss exactly as RepDistiller's `Correlation` (a simplified form).

  With `delta_i = |e^S_i - e^T_i|` (elementwise), the reference computes::

    L = mean_{i=0..b-2} sum_d delta_i[d] * delta_{i+1}[d],

  i.e. the inner product of the absolute embedding errors of CONSECUTIVE samples in the batch. It
  is not the paper's ||C_T - C_S||^2 over full b x b correlation matrices (with a Gaussian-RBF
  kernel); we reproduce the code the RepDistiller benchmark was run with.

  Paper: B. Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019.
  Reference: HobbitLong/RepDistiller `distiller_zoo/CC.py` (`Correlation`, code from the
  authors). RepDistiller feeds it the penultimate features of both networks through two TRAINABLE
  128-d linear embeddings (`LinearEmbed`, `--feat_dim 128`, both in the optimiser) and weights it
  with `-b 0.02`; the embeddings and the weight are the caller's. Since the teacher's embedding is
  trained too, this loss does NOT stop the teacher side's gradient: stop the teacher backbone's
  features before embedding them.

  Args:
    student_embed: [b, d] embedded student features.
    teacher_embed: [b, d] embedded teacher features, the same shape.
    where: optional boolean [b] row mask. Valid rows are taken in order (masked ones skipped), so
      the value equals the reference on the valid rows alone; normalised by max(b_valid - 1, 1).
    axis_name: optional name of the mapped batch axis (inside `jax.shard_map` or `jax.pmap`). If
      given, the rows (and `where`) of all devices are all-gathered first, so the loss covers the
      global batch and every device returns the same value; its gradient is right when the global
      objective is the mean of the per-device losses (`pmean` of the gradients under `pmap`, or of
      the loss before `jax.grad` under `shard_map`). None: per-device batch (what a plain
      `jax.jit` over a sharded global batch already sees as the global batch).

  Returns:
    Scalar float32 loss (0 for fewer than two valid rows; the reference returns NaN for b = 1).
  """
  student_embed, teacher_embed, where = (
      _gather(x, axis_name) for x in (student_embed, teacher_embed, where))
  check_rank(student_embed, 2, "student_embed")
  check_same_shape(student_embed, teacher_embed, "student_embed", "teacher_embed")
  b = jnp.shape(student_embed)[0]
  check_where(where, (b,))
  s = to_float32(_flatten_rows(student_embed, where))
  t = to_float32(_flatten_rows(teacher_embed, where))
  delta = jnp.abs(s - t)
  if where is None:
    pair_valid = jnp.ones((b - 1,), jnp.float32)
    n_pairs = jnp.asarray(max(b - 1, 1), jnp.float32)
  else:
    # Move the valid rows to the front, in order (a static-shape compaction).
    order = jnp.argsort(~where, stable=True)
    delta = delta[order]
    n_valid = jnp.sum(where.astype(jnp.int32))
    pair_valid = (jnp.arange(b - 1) + 1 < n_valid).astype(jnp.float32)
    n_pairs = jnp.maximum(n_valid - 1, 1).astype(jnp.float32)
  per_pair = jnp.sum(delta[:-1] * delta[1:], axis=-1)
  return jnp.sum(per_pair * pair_valid) / n_pairs
