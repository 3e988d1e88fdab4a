"""Strided convolution whose gradients skip the zeros autodiff inserts (XLA:CPU only).

For y = conv(x, w) with stride s > 1, autodiff's input gradient convolves the cotangent dilated by
s (`lhs_dilation`: s - 1 zeros between neighbours), and XLA:CPU computes that convolution densely,
multiplying the zeros: about s^2 times the work for a stride-2 layer. The polyphase form of the
transposed convolution (Dumoulin & Visin 2016, "A guide to convolution arithmetic", section 4)
avoids them. Per dimension, with y[i] = sum_t x[s i + t - p] w[t],

    dx[s q + r] = sum_u dy[q + c_r - u] w[t_r + s u]^T,   t_r = (r + p) mod s,  c_r = (r + p - t_r) / s,

so phase r of dx is a stride-1 convolution of dy with the taps t_r, t_r + s, ... of w, flipped
and with input and output channels swapped; the s^2 phases are interleaved with interior padding.
The filter gradient of a 1x1 strided convolution is one matrix product of the strided input with
dy (XLA's own form is a 5x slower dilated convolution); every other filter gradient, and every
gradient off CPU (`jax.lax.platform_dependent`), is XLA's.

CIFAR resnet8x4 at batch 64: input gradient of the stage-2 entry convolution 58 -> 23 ms
(docs/performance.md, B16). Values are those of `jax.lax.conv_general_dilated`; only the order of
the sums differs. tests/models/test_strided_conv.py checks both gradients against autodiff of
XLA's convolution in float64.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated"]

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kwargs):
  """`jax.lax.conv_general_dilated`, with the polyphase gradients above where they apply.

  They apply to 2-D NHWC/HWIO convolutions with a stride above 1, explicit integer padding, no
  dilation, one feature/batch group and default precision; anything else goes to
  `jax.lax.conv_general_dilated` unchanged. The signature is the one `flax.nnx.Conv` calls.
  """
  strides = tuple(window_strides)
  dims = _dimension_numbers(lhs, rhs, dimension_numbers)
  applies = (
      lhs.ndim == 4 and dims == _NHWC and any(s > 1 for s in strides)
      and not isinstance(padding, str) and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and all(d == 1 for d in (rhs_dilation or (1, 1)))
      and feature_group_count == 1 and batch_group_count == 1 and precision is None
      and preferred_element_type is None and kwargs.get("out_sharding") is None)
  if not applies:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type, **kwargs)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _strided_conv(lhs, rhs, strides, pads)


def _dimension_numbers(lhs, rhs, dimension_numbers):
  if dimension_numbers is None:
    return None
  return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)


def _conv(x, w, strides, pads):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv(x, w, strides, pads):
  return _conv(x, w, strides, pads)


def _strided_conv_fwd(x, w, strides, pads):
  return _conv(x, w, strides, pads), (x, w)


def _strided_conv_bwd(strides, pads, residuals, g):
  x, w = residuals

  def xla_input_grad(g, w):
    return jax.vjp(lambda x_: _conv(x_, w, strides, pads), x)[1](g)[0]

  def xla_filter_grad(g, x):
    return jax.vjp(lambda w_: _conv(x, w_, strides, pads), w)[1](g)[0]

  dx = lax.platform_dependent(
      g, w, cpu=partial(_polyphase_input_grad, x_shape=x.shape, strides=strides, pads=pads),
      default=xla_input_grad)
  if w.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)):
    dw = lax.platform_dependent(
        g, x, cpu=partial(_pointwise_filter_grad, strides=strides, dtype=w.dtype),
        default=xla_filter_grad)
  else:
    dw = xla_filter_grad(g, x)
  return dx, dw


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def _phases(size: int, taps: int, stride: int, pad_lo: int, out_size: int):
  """Per input phase r of one spatial dimension: (r, first tap, tap count, conv padding, length)."""
  phases = []
  for r in range(stride):
    length = -(-(size - r) // stride)  # positions m < size with m = r (mod stride)
    first = (r + pad_lo) % stride
    count = max(0, -(-(taps - first) // stride))
    shift = (r + pad_lo - first) // stride
    lo = count - 1 - shift
    hi = length - out_size - lo + count - 1
    phases.append((r, first, count, (lo, hi), length))
  return phases


def _polyphase_input_grad(g, w, *, x_shape, strides, pads):
  """dx of `_conv` from the cotangent g, one stride-1 convolution per phase (module docstring)."""
  _, height, width, _ = x_shape
  (sh, sw), (kh, kw) = strides, w.shape[:2]
  zero = jnp.zeros((), g.dtype)
  dx = None
  for rh, th, uh, pad_h, len_h in _phases(height, kh, sh, pads[0][0], g.shape[1]):
    for rw, tw, uw, pad_w, len_w in _phases(width, kw, sw, pads[1][0], g.shape[2]):
      if min(uh, uw, len_h, len_w) <= 0:
        continue  # no tap reaches this phase: its gradient is zero
      taps = w[th::sh][:uh][::-1, :][:, tw::sw][:, :uw][:, ::-1]  # flipped taps of the phase
      part = lax.conv_general_dilated(g, jnp.swapaxes(taps, 2, 3), (1, 1), (pad_h, pad_w),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
      placed = lax.pad(part, zero, ((0, 0, 0),
                                    (rh, height - rh - (len_h - 1) * sh - 1, sh - 1),
                                    (rw, width - rw - (len_w - 1) * sw - 1, sw - 1),
                                    (0, 0, 0)))
      dx = placed if dx is None else dx + placed
  return jnp.zeros(x_shape, g.dtype) if dx is None else dx


def _pointwise_filter_grad(g, x, *, strides, dtype):
  """dw of an unpadded 1x1 strided `_conv`: the strided input's pixels times dy's, summed."""
  n, out_h, out_w, cout = g.shape
  sh, sw = strides
  cin = x.shape[-1]
  picked = lax.slice(x, (0, 0, 0, 0), (n, (out_h - 1) * sh + 1, (out_w - 1) * sw + 1, cin),
                     (1, sh, sw, 1))
  dw = jnp.einsum("nhwi,nhwo->io", picked, g,
                  preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
  return dw.astype(dtype).reshape(1, 1, cin, cout)
