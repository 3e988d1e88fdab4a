"""Batch-relational distillation losses: match how samples relate to each other, not the samples.

Each loss here compares a [b, b] structure built over the mini-batch (a Gram matrix, pairwise
distances, angles, cosine similarities) between student and teacher, so the student and teacher
feature widths may differ and only the batch size must agree. A boolean row mask `where` [b]
excludes padded rows from every structure and from every normaliser (max(count, 1)); an all-False
mask gives exactly 0. The teacher side is always under `stop_gradient`.

Feature maps are NHWC (channels last); the batch-relational losses flatten every axis after the
first, so the layout does not change their value.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kd_jax.losses._numerics import NORM_EPS
from kd_jax.losses._numerics import l2_normalize
from kd_jax.losses._numerics import masked_count
from kd_jax.losses._numerics import safe_sqrt
from kd_jax.losses._numerics import to_float32
from kd_jax.losses._validation import check_batch_match
from kd_jax.losses._validation import check_rank
from kd_jax.losses._validation import check_where

__all__ = ["gram", "sp"]


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


def _flatten_rows(x, where):
  """[b, ...] -> [b, prod(...)], masked rows set to 0; integer inputs become float32."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  q = jnp.reshape(x, (x.shape[0], -1))
  if where is not None:
    q = jnp.where(where[:, None], q, jnp.zeros((), q.dtype))
  return q


def gram(features, *, where=None, eps: float = NORM_EPS):
  """Row-normalised batch Gram matrix of SP: G = normalize_rows(Q Q^T), Q = reshape(A, [b, -1]).

  `G[i, :] = (Q Q^T)[i, :] / max(||(Q Q^T)[i, :]||_2, eps)`, exactly as RepDistiller's
  `Similarity.similarity_loss` (`torch.mm` then `F.normalize`, whose eps is 1e-12). The product is
  accumulated in float32 (`preferred_element_type`) even for bfloat16 features; a zero feature row
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
  g = jnp.matmul(q, q.T, preferred_element_type=acc)
  return l2_normalize(g, axis=-1, eps=eps)


def _sp_one(student, teacher, where):
  check_rank(student, 2, "student_features")
  check_rank(teacher, 2, "teacher_features")
  check_batch_match(student, teacher)
  check_where(where, jnp.shape(student)[:1])
  g_s = gram(student, where=where)
  g_t = jax.lax.stop_gradient(gram(teacher, where=where))
  b = masked_count(where, jnp.shape(student)[0])
  return jnp.sum(jnp.square(g_t - g_s)) / (b * b)


def sp(student_features, teacher_features, *, where=None):
  """Similarity-preserving KD loss: (1/b^2) * ||G_T - G_S||_F^2, summed over layer pairs.

  `G = gram(A)` is the row-L2-normalised batch Gram matrix of the flattened activations (see
  `gram`). Only the batch size of student and teacher must agree: channels and spatial sizes may
  differ, since only [b, b] matrices are compared. The teacher side is under `stop_gradient`.

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

  Returns:
    Scalar float32 loss.
  """
  pairs = _layer_pairs(student_features, teacher_features, "student_features",
                       "teacher_features")
  return sum(_sp_one(s, t, where) for s, t in pairs)
