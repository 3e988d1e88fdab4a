"""A drop-in `lax.conv_general_dilated` whose filter gradient is k*k GEMMs on XLA:CPU.

XLA:CPU lowers the filter (weight) gradient of a convolution as a convolution of the input with
the output gradient as its kernel (a 32x32 "kernel" for a CIFAR stage), which Eigen runs several
times slower than the forward pass: on a 2-core AVX2 EPYC it was 5x the forward convolution over
resnet8x4's layers and 65% of the student's backward pass (benchmarks/README.md). This function
computes the same gradient as one GEMM per kernel tap,

    dW[i, j, :, :] = X_pad[:, i::s, j::s, :]^T  @  dY          ([ci, B*Ho*Wo] @ [B*Ho*Wo, co])

which Eigen runs at matrix-multiply speed (2.6x less time for the filter gradients, 20x for
strided 1x1 projections). The forward pass and the input gradient stay XLA's own. The GEMM form is
used only when lowering for CPU (`jax.lax.platform_dependent`); GPUs and TPUs keep their native
convolution gradients. Only the plain case (NHWC/HWIO, no dilation, one feature group) is
rewritten; anything else calls `lax.conv_general_dilated` unchanged.

Usage: `nnx.Conv(..., conv_general_dilated=conv_general_dilated)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _filter_grad_gemm(x, g, kernel_hw, strides, padding):
  """dL/dW of `_conv` as one [ci, B*Ho*Wo] @ [B*Ho*Wo, co] product per kernel tap."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  b, ho, wo, co = g.shape
  ci = x.shape[-1]
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  g2 = g.reshape(b * ho * wo, co)
  taps = []
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, ci),
                          (1, sh, sw, 1))
      taps.append(jnp.matmul(tap.reshape(b * ho * wo, ci).T, g2,
                             preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, ci, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_gemm_wgrad(x, w, strides, padding):
  return _conv(x, w, strides, padding)


def _fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _bwd(strides, padding, res, g):
  x, w = res
  _, vjp = jax.vjp(lambda a, k: _conv(a, k, strides, padding), x, w)

  def native(x, w, g):
    return vjp(g)

  def gemm(x, w, g):
    dx = jax.vjp(lambda a: _conv(a, w, strides, padding), x)[1](g)[0]
    dw = _filter_grad_gemm(x, g, w.shape[:2], strides, padding).astype(w.dtype)
    return dx, dw

  return jax.lax.platform_dependent(x, w, g, cpu=gemm, default=native)


_conv_gemm_wgrad.defvjp(_fwd, _bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kwargs):
  """`jax.lax.conv_general_dilated` with a GEMM filter gradient on CPU (see module docstring).

  Args are those of `jax.lax.conv_general_dilated`; the result is identical (the forward pass is
  the same op), and so are gradients up to float32 summation order.
  """
  nd = lhs.ndim - 2
  plain = (
      nd == 2 and not isinstance(padding, str) and feature_group_count == 1
      and batch_group_count == 1 and preferred_element_type is None and not kwargs.get(
          "out_sharding") and all(d == 1 for d in (lhs_dilation or (1,) * nd))
      and all(d == 1 for d in (rhs_dilation or (1,) * nd))
      and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
  padding = tuple(tuple(int(v) for v in p) for p in padding)
  return _conv_gemm_wgrad(lhs, rhs, tuple(int(s) for s in window_strides), padding)
