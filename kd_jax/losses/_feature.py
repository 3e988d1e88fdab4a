"""Feature-map distillation losses: match the student's intermediate activations to the teacher's.

Every loss here is per example: it returns [b] (masked rows exactly 0) and the caller reduces, so
the plain batch mean equals the RepDistiller value. Feature maps are NHWC (channels last), as Flax
convolutions produce them; RepDistiller's are NCHW, so "mean over channels" there (axis 1) is the
last axis here. Student and teacher may be single arrays or equally long lists of layer pairs,
whose per-pair losses are summed (RepDistiller's `sum(loss_group)`). They never stop gradients:
the train step applies `stop_gradient` to the teacher's outputs once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses._numerics import apply_where
from kd_jax.losses._numerics import l2_normalize
from kd_jax.losses._numerics import to_float32
from kd_jax.losses._validation import check_rank
from kd_jax.losses._validation import check_same_shape
from kd_jax.losses._validation import check_where

__all__ = ["fitnet", "attention_transfer", "nst"]


def _layer_pairs(student, teacher):
  """Returns [(student_i, teacher_i)] for a single pair or for two equally long sequences."""
  s_seq = isinstance(student, (list, tuple))
  t_seq = isinstance(teacher, (list, tuple))
  if s_seq != t_seq:
    raise ValueError(
        "student_features and teacher_features must both be arrays or both be lists of arrays, "
        f"got {type(student).__name__} and {type(teacher).__name__}."
    )
  if not s_seq:
    return [(student, teacher)]
  if len(student) != len(teacher) or not student:
    raise ValueError(
        "student_features and teacher_features must list the same (non-zero) number of layers, "
        f"got {len(student)} and {len(teacher)} (shapes {[jnp.shape(x) for x in student]} and "
        f"{[jnp.shape(x) for x in teacher]})."
    )
  return list(zip(student, teacher))


def _prepare(x, where):
  """float32 copy of `x` with the rows outside `where` zeroed (no inf/NaN reaches a gradient)."""
  x = to_float32(x)
  if where is not None:
    x = jnp.where(jnp.reshape(where, where.shape + (1,) * (x.ndim - 1)), x, 0.0)
  return x


def _check_maps(student, teacher, min_rank):
  check_rank(student, min_rank, "student_features")
  check_rank(teacher, min_rank, "teacher_features")
  s_shape, t_shape = jnp.shape(student), jnp.shape(teacher)
  if s_shape[0] != t_shape[0] or s_shape[1:-1] != t_shape[1:-1]:
    raise ValueError(
        "student_features and teacher_features must agree in batch and spatial size (NHWC; only "
        f"the channel count may differ), got student_features.shape={s_shape} and "
        f"teacher_features.shape={t_shape}. Resize one side first (RepDistiller average-pools the "
        "larger map)."
    )


def fitnet(student_features, teacher_features, *, where=None):
  """FitNets hint loss: per-example mean squared error over all feature dimensions.

  loss_i = mean_{h, w, c} (r(A^S)_i - A^T_i)^2, whose batch mean is `nn.MSELoss()` of the
  reference. The regressor r that maps the student's channels (and, if needed, spatial size) to
  the teacher's is a trainable module on the model side (RepDistiller `ConvReg`, a conv + BN +
  ReLU); this function takes its output, so both shapes must match exactly.

  Paper: A. Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
  Reference: HobbitLong/RepDistiller `distiller_zoo/FitNet.py` (`HintLoss`), on `feat[2]`
  (`--hint_layer 2`) with loss weight `-b 100`. (RepDistiller trains the hint jointly with CE,
  not in the paper's separate first stage.)

  Args:
    student_features: [b, ...] regressed student features (NHWC or any layout equal to the
      teacher's), or a list/tuple of them (per-pair losses are summed).
    teacher_features: [b, ...] teacher features of the same shape, or a list/tuple.
    where: optional boolean [b] mask; masked examples give 0.

  Returns:
    float32 [b].
  """
  total = 0.0
  for s, t in _layer_pairs(student_features, teacher_features):
    check_rank(s, 2, "student_features")
    check_same_shape(s, t, "student_features", "teacher_features")
    check_where(where, jnp.shape(s)[:1])
    s = _prepare(s, where)
    t = _prepare(t, where)
    diff = jnp.reshape(s - t, (s.shape[0], -1))
    total = total + jnp.mean(jnp.square(diff), axis=-1)
  return apply_where(total, where)


def _attention_map(f, p):
  """at(f) = normalize(mean_c f^p) over the flattened spatial positions, [b, H*W]."""
  a = jnp.mean(jnp.power(f, p), axis=-1)
  return l2_normalize(jnp.reshape(a, (a.shape[0], -1)), axis=-1)


def attention_transfer(student_features, teacher_features, *, p: int = 2, where=None):
  """Attention transfer: squared distance of l2-normalised spatial attention maps.

  With at(A) = Q / max(||Q||_2, 1e-12), Q = flatten_{h,w}(mean_c A^p) (channel-wise mean of the
  p-th power, NHWC channels last)::

    loss_i = mean_{h,w} (at(A^S)_i - at(A^T)_i)^2,

  summed over layer pairs. Its batch mean equals the reference's `.pow(2).mean()` per pair.
  Channels may differ between student and teacher; spatial sizes must match (the reference
  average-pools the larger map to the smaller one; do that in the model if needed).

  Paper: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention", ICLR 2017.
  Reference: HobbitLong/RepDistiller `distiller_zoo/AT.py` (`Attention(p=2)`), on all
  intermediate stage outputs (`feat[1:-1]`) with loss weight `-b 1000`.

  Args:
    student_features: `[b, *spatial, c_s]` NHWC student maps, or a list/tuple of them.
    teacher_features: `[b, *spatial, c_t]` NHWC teacher maps, or an equally long list/tuple.
    p: the power applied before the channel mean (an integer keeps negative activations legal).
    where: optional boolean [b] mask; masked examples give 0.

  Returns:
    float32 [b].
  """
  total = 0.0
  for s, t in _layer_pairs(student_features, teacher_features):
    _check_maps(s, t, 3)
    check_where(where, jnp.shape(s)[:1])
    at_s = _attention_map(_prepare(s, where), p)
    at_t = _attention_map(_prepare(t, where), p)
    total = total + jnp.mean(jnp.square(at_s - at_t), axis=-1)
  return apply_where(total, where)


def _channel_gram_sq_mean(a, b):
  """mean_{c, c'} (sum_x a[x, c] b[x, c'])^2 per example for [n, X, C] maps: [n]."""
  # Full float32 products: accelerators default to TF32 (GPU) or one bfloat16 pass (TPU).
  k = jnp.einsum("nxc,nxd->ncd", a, b, precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)
  return jnp.mean(jnp.square(k), axis=(1, 2))


def nst(student_features, teacher_features, *, where=None):
  """Neuron selectivity transfer: squared MMD with the polynomial kernel k(x, y) = (x^T y)^2.

  Each channel's map is flattened over space and l2-normalised over space, giving unit vectors
  f^S_c (c = 1..C_S) and f^T_c (c = 1..C_T); with k the degree-2, c = 0 polynomial kernel::

    loss_i = mean_{c,c'} k(f^T_c, f^T_c') + mean_{c,c'} k(f^S_c, f^S_c')
             - 2 mean_{c,c'} k(f^S_c, f^T_c'),

  summed over layer pairs (the reference's `full_loss=True` form; the teacher-only term is a
  constant). Its batch mean equals the reference. Channels may differ; spatial sizes must match.

  Paper: Z. Huang, N. Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
  Transfer", arXiv 1707.01219, 2017. Reference: HobbitLong/RepDistiller `distiller_zoo/NST.py`
  (`NSTLoss`), on all intermediate stage outputs (`feat[1:-1]`) with loss weight `-b 50`.

  Args:
    student_features: `[b, *spatial, c_s]` NHWC student maps, or a list/tuple of them.
    teacher_features: `[b, *spatial, c_t]` NHWC teacher maps, or an equally long list/tuple.
    where: optional boolean [b] mask; masked examples give 0.

  Returns:
    float32 [b].
  """
  total = 0.0
  for s, t in _layer_pairs(student_features, teacher_features):
    _check_maps(s, t, 3)
    check_where(where, jnp.shape(s)[:1])
    s = _prepare(s, where)
    t = _prepare(t, where)
    # [b, X, C], each channel l2-normalised over the X spatial positions.
    s = l2_normalize(jnp.reshape(s, (s.shape[0], -1, s.shape[-1])), axis=1)
    t = l2_normalize(jnp.reshape(t, (t.shape[0], -1, t.shape[-1])), axis=1)
    total = (total + _channel_gram_sq_mean(t, t) + _channel_gram_sq_mean(s, s)
             - 2.0 * _channel_gram_sq_mean(s, t))
  return apply_where(total, where)
