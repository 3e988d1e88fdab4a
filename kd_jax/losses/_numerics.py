"""Numerically safe building blocks shared by every loss.

Conventions: compute in float32 even when inputs are bfloat16, use `xlogy` for
p log p, never divide by a bare norm, exclude masked entries with `where` (never by relying on
0 * inf), and normalise by max(count, 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kd_jax.backends.cpu import row_sum  # sum over the last axis, a GEMV on CPU

# Matches torch.nn.functional.normalize's default eps, which the reference implementations use.
NORM_EPS = 1e-12


def to_float32(x):
  """Promotes half-precision floats (bfloat16, float16) to float32; leaves wider types alone."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
    return x.astype(jnp.float32)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.float32)
  return x


def safe_norm(x, axis=-1, keepdims=False, eps: float = NORM_EPS):
  """max(||x||_2, eps) with a finite (zero) gradient at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  return jnp.sqrt(jnp.maximum(sq, eps * eps))


def l2_normalize(x, axis=-1, eps: float = NORM_EPS):
  """x / max(||x||_2, eps), as `torch.nn.functional.normalize` (zero rows stay zero)."""
  return x / safe_norm(x, axis=axis, keepdims=True, eps=eps)


def safe_sqrt(x, eps: float = NORM_EPS):
  """sqrt(max(x, eps^2)): a square root whose gradient stays finite at 0."""
  return jnp.sqrt(jnp.maximum(x, eps * eps))


def pairwise_sq_distances(x, y=None):
  """Squared Euclidean distances ||x_i - y_j||^2 for rows of [n, d] and [m, d], clipped at 0."""
  y = x if y is None else y
  x2 = jnp.sum(jnp.square(x), axis=-1)[:, None]
  y2 = jnp.sum(jnp.square(y), axis=-1)[None, :]
  # At least float32 (bfloat16 inputs), but keep float64 when it is given (gradient checks).
  xy = jnp.matmul(x, y.T, preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
  return jnp.maximum(x2 + y2 - 2.0 * xy, 0.0)


def masked_log_softmax(logits, mask=None, axis: int = -1):
  """log softmax over the entries where `mask` is True; masked entries return exactly 0.

  A row with no True entry returns all zeros with zero gradient (no NaN).
  """
  if mask is None:
    return jax.nn.log_softmax(logits, axis=axis)
  mask = jnp.broadcast_to(mask, logits.shape)
  # Give all-false rows a harmless normaliser so that no inf or NaN appears anywhere.
  safe_mask = mask | ~jnp.any(mask, axis=axis, keepdims=True)
  safe_logits = jnp.where(safe_mask, logits, 0.0)
  lse = jax.nn.logsumexp(safe_logits, axis=axis, where=safe_mask, keepdims=True)
  return jnp.where(mask, safe_logits - lse, 0.0)


def softmax_and_logsumexp(z, axis_name=None):
  """`(softmax(z), logsumexp(z))` along the last axis from one exp: `log softmax = z - lse`.

  `p = e / sum(e)` with `e = exp(z - max z)` (the max held constant for autodiff, as in
  `jax.nn.log_softmax`), and the sum is `row_sum` (`kd_jax.backends.cpu.row_sum`, a GEMV on
  CPU). `lse` keeps its trailing axis of size 1.

  With `axis_name` (inside `jax.shard_map`, the last axis sharded over that mesh axis) the max
  is a `pmax` and the sum a `psum` of the per-shard statistics: `p` is this shard's part of the
  global softmax and `lse` the global log-sum-exp; the full last axis is never gathered.
  """
  top = lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  if axis_name is not None:
    top = lax.stop_gradient(lax.pmax(top, axis_name))
  e = jnp.exp(z - top)
  total = class_sum(e, axis_name)[..., None]
  return e / total, top + jnp.log(total)


def class_sum(x, axis_name=None):
  """`row_sum(x)`, then `psum` over `axis_name` when the last axis is sharded over it."""
  total = row_sum(x)
  return total if axis_name is None else lax.psum(total, axis_name)


def kl_from_logits(teacher_logits, student_logits, *, axis: int = -1, mask=None):
  """KL(softmax(t) || softmax(s)) per row, both softmaxes restricted to `mask` (if given).

  Entries outside the mask contribute exactly 0. Computed in the inputs' dtype; promote first.
  Without a mask, along the last axis: `sum_k p^t_k ((t_k - s_k) - (lse(t) - lse(s)))`, with
  the sums as `row_sum`. A teacher logit of -inf (a masked class, `p^t_k = 0`) contributes
  exactly 0, as in the limit `t_k -> -inf`, values and gradients finite (`neg_inf_to_zero`);
  NaN and +inf stay NaN.
  """
  if mask is None and axis in (-1, jnp.ndim(teacher_logits) - 1):
    pt, lse_t = softmax_and_logsumexp(teacher_logits)
    _, lse_s = softmax_and_logsumexp(student_logits)
    diff = neg_inf_to_zero(teacher_logits, teacher_logits - student_logits)
    return row_sum(pt * (diff - (lse_t - lse_s)))
  log_pt = masked_log_softmax(teacher_logits, mask, axis)
  log_ps = masked_log_softmax(student_logits, mask, axis)
  pt = jnp.exp(log_pt)
  terms = pt * neg_inf_to_zero(log_pt, log_pt - log_ps)
  if mask is not None:
    terms = jnp.where(jnp.broadcast_to(mask, terms.shape), terms, 0.0)
  return jnp.sum(terms, axis=axis)


def neg_inf_to_zero(teacher_logits, values):
  """`values` with 0 where `teacher_logits` is -inf (a class of teacher probability 0).

  `p^t_k * (t_k - ...)` is `0 * -inf = NaN` there although its limit is 0; selecting the
  difference itself (not the product) keeps the backward pass free of `0 * inf` too.
  """
  return jnp.where(teacher_logits == -jnp.inf, jnp.zeros_like(values), values)


def kl_from_probs(teacher_probs, student_logits, *, axis: int = -1, mask=None):
  """KL(p || softmax(s)) per row for a given distribution p (zeros allowed, via `xlogy`)."""
  log_ps = masked_log_softmax(student_logits, mask, axis)
  terms = jax.scipy.special.xlogy(teacher_probs, teacher_probs) - teacher_probs * log_ps
  if mask is not None:
    terms = jnp.where(jnp.broadcast_to(mask, terms.shape), terms, 0.0)
  return jnp.sum(terms, axis=axis)


def apply_where(values, where):
  """Zeros the entries of a per-example loss where `where` is False (None: unchanged)."""
  if where is None:
    return values
  return jnp.where(where, values, jnp.zeros_like(values))


def masked_count(where, n: int):
  """max(number of True entries, 1) as float32; n when `where` is None."""
  if where is None:
    return jnp.asarray(max(n, 1), jnp.float32)
  return jnp.maximum(jnp.sum(where.astype(jnp.float32)), 1.0)
