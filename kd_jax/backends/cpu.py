"""The XLA:CPU code paths of kd_jax, all in one module; other platforms get plain XLA ops.

Each function here computes the same values as its plain-JAX counterpart (up to the order of
floating-point sums) and differs only in the operations it hands to XLA:CPU, chosen by the
platform the program is lowered for (`jax.lax.platform_dependent`), so a program lowered for GPU
or TPU contains XLA's own operations only. Measurements: docs/performance.md.

Compiler options (`CPU_COMPILER_OPTIONS`, `compiler_options`). jaxlib 0.10's XLA:CPU hands every
convolution to YNNPACK by default (`xla_cpu_experimental_ynn_fusion_type` contains
`individual_convolution`), which runs one with 64 or fewer output channels on a single thread: a
CIFAR stage-1 3x3 convolution (batch 64, 32x32, 64 -> 64) takes 63 ms there and 34 ms in XLA's
own Eigen convolution on both cores of a 2-core AVX2 machine. The options keep YNNPACK for
matrix products and reductions and give convolutions back to XLA. `compiler_options()` compiles
a scalar program with them once per process; a jaxlib that renamed the experimental flag or its
values gets no options (and one warning) instead of a failing compilation at every step.

Strided convolutions (`conv_general_dilated`). For y = conv(x, w) with stride s > 1, autodiff's
input gradient convolves the cotangent dilated by s (`lhs_dilation`: s - 1 zeros between
neighbours), and XLA:CPU computes that convolution densely, multiplying the zeros. The polyphase
form (Dumoulin & Visin 2016, "A guide to convolution arithmetic", section 4) avoids them. Per
dimension, with y[i] = sum_t x[s i + t - p] w[t] and the input phase x_r[q] = x[s q + r],

    y[i] = sum_r sum_u x_r[i + u - c_r] w[t_r + s u],   t_r = (r + p) mod s,  c_r = (r + p - t_r) / s,

a sum of s^2 stride-1 convolutions of strided slices of x. The convolution is a `jax.custom_jvp`
whose primal is XLA's strided convolution and whose tangent in x is that sum; the transpose of a
strided slice is interior padding and that of a stride-1 convolution is a stride-1 convolution,
so reverse mode's input gradient is

    dx[s q + r] = sum_u dy[q + c_r - u] w[t_r + s u]^T,

one stride-1 convolution per phase, interleaved with interior padding: no zeros multiplied.
The tangent in w of an unpadded 1x1 convolution is one matrix product of the strided input (its
transpose, the filter gradient, replaces XLA's 5x slower dilated convolution); every other
filter tangent is XLA's convolution. Being linear maps written in ordinary ops, the tangents
support forward mode (`jax.jvp`), reverse mode and forward-over-reverse (Hessian-vector
products). CIFAR resnet8x4 at batch 64: the input gradient of the stage-2 entry convolution takes
23 ms instead of 58 ms (docs/performance.md, "Polyphase input gradient of strided convolutions").

Row sums (`row_sum`): a matrix-vector product with a ones vector, which XLA:CPU does not fuse with
its producers into a slow YNNPACK reduction fusion (docs/performance.md, "Row sums as a GEMV").

ReLU (`relu`): `where(x <= 0, 0, x)`, which XLA materialises once instead of recomputing its
producer in every consumer (docs/performance.md, "ReLU as a select"). It is a compare and a
select, XLA's own operations on every platform, so it is the same program everywhere (no
per-activation switch).
"""

from __future__ import annotations

import functools
import re
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = ["CPU_COMPILER_OPTIONS", "compiler_options", "conv_general_dilated", "cpu_paths",
           "relu", "row_sum"]

# The default YNNPACK fusion types of jaxlib 0.10.2 minus `individual_convolution` (the per-call
# spelling of `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`: both
# give the same compiled program, tests/test_compile_options.py checks it).
CPU_COMPILER_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


# ------------------------------------------------------------------------------------------------
# Compiler options


def compiler_options() -> dict[str, str]:
  """`CPU_COMPILER_OPTIONS` if the installed jaxlib accepts them, else `{}`; a fresh dict.

  The first call for a given set of options compiles a scalar program with them on the CPU
  backend; the answer is cached. Rejected options (an unknown or renamed flag or value) give one
  `UserWarning` and no options, so programs compile with jaxlib's defaults instead of failing.
  """
  return dict(_accepted(tuple(sorted(CPU_COMPILER_OPTIONS.items()))))


@functools.lru_cache(maxsize=None)
def _accepted(items: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
  if not items:
    return items
  try:
    device = jax.devices("cpu")[0]
  except RuntimeError:  # no CPU backend in this process: nothing to probe with
    return items
  probe = jax.jit(lambda v: v + 1, compiler_options=dict(items))
  try:
    probe.lower(jax.device_put(np.float32(0), device)).compile()
  except jax.errors.JaxRuntimeError as e:
    warnings.warn(
        f"kd_jax.backends.cpu: this jaxlib ({jax.lib.__version__}) rejects the XLA:CPU compiler "
        f"options {dict(items)} ({str(e).splitlines()[0]}); compiling without them, with "
        "jaxlib's defaults (slower convolutions on CPU).", UserWarning, stacklevel=3)
    return ()
  return items


# ------------------------------------------------------------------------------------------------
# Strided convolutions

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))
_DN = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         **kwargs):
  """`jax.lax.conv_general_dilated`, with the polyphase input gradient on CPU where it applies.

  It applies to 2-D NHWC/HWIO convolutions with a stride above 1, explicit integer padding, no
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
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN)


@partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _strided_conv(x, w, strides, pads):
  return _conv(x, w, strides, pads)


@partial(_strided_conv.defjvp, symbolic_zeros=True)
def _strided_conv_jvp(strides, pads, primals, tangents):
  """Primal: XLA's strided convolution. Tangent: the same linear map, in the polyphase form
  (x) and as a matrix product (w of a 1x1 convolution) on CPU; XLA's convolution elsewhere."""
  x, w = primals
  x_dot, w_dot = tangents
  y = _conv(x, w, strides, pads)
  xla = partial(_conv, strides=strides, pads=pads)
  parts = []
  if not isinstance(x_dot, SymbolicZero):
    parts.append(lax.platform_dependent(
        x_dot, w, cpu=partial(_polyphase_conv, strides=strides, pads=pads), default=xla))
  if not isinstance(w_dot, SymbolicZero):
    if w.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)):
      parts.append(lax.platform_dependent(
          x, w_dot, cpu=partial(_pointwise_conv, strides=strides), default=xla))
    else:
      parts.append(xla(x, w_dot))
  if not parts:
    return y, jnp.zeros_like(y)
  return y, parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _phases(size: int, taps: int, stride: int, pad_lo: int, out_size: int):
  """Per input phase r of one spatial dimension: (r, first tap, tap count, conv padding, length)
  of the stride-1 convolution `x_r * w[first::stride][:count]` (module docstring)."""
  phases = []
  for r in range(stride):
    length = -(-(size - r) // stride)  # positions m < size with m = r (mod stride)
    first = (r + pad_lo) % stride
    count = max(0, -(-(taps - first) // stride))
    shift = (r + pad_lo - first) // stride  # c_r
    phases.append((r, first, count, (shift, out_size + count - 1 - shift - length), length))
  return phases


def _polyphase_conv(x, w, *, strides, pads):
  """`_conv(x, w)` as a sum of stride-1 convolutions of the input phases (module docstring);
  linear in x, and its transpose is the polyphase input gradient."""
  n, height, width, cin = x.shape
  (sh, sw), (kh, kw) = strides, w.shape[:2]
  out_h = (height + sum(pads[0]) - kh) // sh + 1
  out_w = (width + sum(pads[1]) - kw) // sw + 1
  y = None
  for rh, th, uh, pad_h, len_h in _phases(height, kh, sh, pads[0][0], out_h):
    for rw, tw, uw, pad_w, len_w in _phases(width, kw, sw, pads[1][0], out_w):
      if min(uh, uw, len_h, len_w) <= 0:
        continue  # no tap reaches this phase
      phase = lax.slice(x, (0, rh, rw, 0),
                        (n, rh + (len_h - 1) * sh + 1, rw + (len_w - 1) * sw + 1, cin),
                        (1, sh, sw, 1))
      taps = w[th::sh][:uh][:, tw::sw][:, :uw]
      part = lax.conv_general_dilated(phase, taps, (1, 1), (pad_h, pad_w), dimension_numbers=_DN)
      y = part if y is None else y + part
  if y is None:
    return jnp.zeros((n, out_h, out_w, w.shape[-1]), jnp.result_type(x, w))
  return y


def _pointwise_conv(x, w, *, strides):
  """An unpadded 1x1 strided `_conv(x, w)` as the strided input's pixels times w[0, 0]; linear
  in w, and its transpose is the filter gradient as one matrix product."""
  n, height, width, cin = x.shape
  sh, sw = strides
  out_h, out_w = (height - 1) // sh + 1, (width - 1) // sw + 1
  picked = lax.slice(x, (0, 0, 0, 0), (n, (out_h - 1) * sh + 1, (out_w - 1) * sw + 1, cin),
                     (1, sh, sw, 1))
  # A 2-D product: its transpose, [N, cin]^T [N, cout], is the one XLA:CPU runs fastest
  # (an einsum over n, h, w transposes to a slower layout: +15-20% for this gradient).
  y = lax.dot_general(picked.reshape(-1, cin), w[0, 0], (((1,), (0,)), ((), ())),
                      preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
  return y.reshape(n, out_h, out_w, -1).astype(jnp.result_type(x, w))


# ------------------------------------------------------------------------------------------------
# Row sums and ReLU


def row_sum(x):
  """sum over the last axis; on CPU computed as the matrix-vector product `x @ ones`.

  XLA:CPU in jaxlib 0.10.2 hands a row reduction, together with the elementwise ops that feed
  it, to a YNNPACK fusion, and those are slow on a loss's small arrays: in PTLoss's value+grad
  at B = 256, K = 100 the two fusions carrying the loss and its gradient took 64 us each, where
  XLA's own loop fusions of the same ops take 14-22 us plus 4 us for a GEMV. A dot is not fused
  with its producers, so they stay in XLA's loop fusion. KD value+grad takes 0.6-0.9x the time
  of the same KL written with `jax.nn.log_softmax` and `jnp.sum` (B = 256 and 4096 with K = 100,
  B = 16 with K = 32,000; benchmarks/ptloss_selection.py). The product runs at
  `Precision.HIGHEST` (a float32 accumulation, like `jnp.sum`). Off CPU it is `jnp.sum`.
  """
  return lax.platform_dependent(x, cpu=_row_sum_gemv, default=lambda x: jnp.sum(x, axis=-1))


def _row_sum_gemv(x):
  total = jnp.matmul(x, jnp.ones(x.shape[-1:], x.dtype), precision=lax.Precision.HIGHEST,
                     preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
  return total.astype(x.dtype)  # accumulated in at least float32, returned as jnp.sum would


def relu(x):
  """ReLU, max(x, 0), written as `where(x <= 0, 0, x)` (NaN still propagates, gradient 0 at 0,
  as `jax.nn.relu`).

  Why not `jnp.maximum(x, 0)`: XLA duplicates an "effectively unary" producer such as
  `maximum(x, 0)`, and with it the residual sum `bn2(conv2) + shortcut` that feeds it, into every
  consumer. One consumer is the transposed copy XLA:CPU makes of each convolution's input for the
  filter gradient ([N,H,W,C] -> [C,H,W,N]); recomputing two strided inputs there costs 5-10x a
  plain transpose (38 ms vs 3-8 ms for one CIFAR stage-1 activation, batch 64). A select on a
  compare has two full-size operands, so XLA materialises it once and the transpose reads it:
  the resnet8x4 train step is 9% faster, the resnet32x4 -> resnet8x4 KD step 7%
  (docs/performance.md, "ReLU as a select"). Same values and gradients as `jax.nn.relu`, on
  every platform.
  """
  return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


# ------------------------------------------------------------------------------------------------
# Lowering check


def cpu_paths(stablehlo: str) -> dict[str, int]:
  """Counts this module's CPU-only operations in a StableHLO program's text.

  "interleave": `stablehlo.pad` with interior padding (the polyphase input gradient);
  "gemv": `dot_general` at HIGHEST precision (the row-sum GEMV); "platform_switch": a
  multi-platform `platform_dependent` switch left in the program; and, for reference,
  "lhs_dilate": XLA's own dilated-cotangent input gradients of strided convolutions, which a
  GPU/TPU program has (one per strided convolution) and a CPU program does not. A program
  lowered for GPU or TPU has no CPU path when the first three are 0 (tests/test_cpu_backend.py,
  benchmarks/device.py).
  """
  return {
      "interleave": len(re.findall(r"stablehlo\.pad [^\n]*interior = \[0, [1-9]", stablehlo)),
      "gemv": len(re.findall(r"stablehlo\.dot_general [^\n]*precision = \[HIGHEST, HIGHEST\]",
                             stablehlo)),
      "platform_switch": stablehlo.count("_platform_index"),
      "lhs_dilate": len(re.findall(r"lhs_dilate = \[", stablehlo)),
  }
