"""FitNet with RepDistiller's trainable connector: `ConvReg` maps the student's hint layer onto
the teacher's, then `losses.fitnet` (mean squared error) compares them.

    L = mean((relu(BN(conv(f_s))) - f_t)^2)

`conv` depends on the spatial sizes (student H_s, teacher H_t), as RepDistiller's
`models/util.py` `ConvReg`: a 3x3 stride-2 convolution (padding 1) when H_s = 2 H_t, a 4x4
stride-2 transposed convolution (padding 1) when 2 H_s = H_t, else a (1 + H_s - H_t) x
(1 + W_s - W_t) convolution without padding (H_s >= H_t). Batch norm is PyTorch's (momentum 0.1,
eps 1e-5, unbiased running variance), in train mode inside the step; its running statistics are
the term's state (per device, averaged over the data-parallel axis like the student's).
Initialisation is PyTorch's default for `Conv2d` / `ConvTranspose2d` (weights and biases
U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and `BatchNorm2d` (scale 1, offset 0).

Paper: A. Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. Reference:
HobbitLong/RepDistiller (`--distill hint`, hint layer 2, `-b 100` with CE weight 1).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kd_jax import losses
from kd_jax.models._layers import batch_norm
from kd_jax.train.terms._base import LossTerm, feature, feature_pair, masked_mean
from kd_jax.train.terms._base import register_term


def _uniform(bound: float):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def connector_kind(student_shape, teacher_shape) -> str:
  """"conv_s2", "deconv" or "conv" for NHWC hint shapes, as RepDistiller's `ConvReg`."""
  if len(student_shape) != 4 or len(teacher_shape) != 4:
    raise ValueError(f"fitnet's connector needs NHWC feature maps, got {tuple(student_shape)} "
                     f"and {tuple(teacher_shape)}.")
  s_h, t_h = student_shape[1], teacher_shape[1]
  if s_h == 2 * t_h:
    return "conv_s2"
  if 2 * s_h == t_h:
    return "deconv"
  if s_h >= t_h:
    return "conv"
  raise ValueError(f"fitnet's connector cannot map a student map of height {s_h} onto a "
                   f"teacher map of height {t_h} (student {tuple(student_shape)}, teacher "
                   f"{tuple(teacher_shape)}).")


class ConvReg(nnx.Module):
  """RepDistiller's `ConvReg` in NHWC (see the module docstring)."""

  def __init__(self, student_shape, teacher_shape, *, rngs: nnx.Rngs):
    _, s_h, s_w, s_c = student_shape
    _, t_h, t_w, t_c = teacher_shape
    self.kind = connector_kind(student_shape, teacher_shape)
    if self.kind == "conv_s2":
      kernel, self.strides, self.padding = (3, 3), (2, 2), ((1, 1), (1, 1))
    elif self.kind == "deconv":
      kernel, self.strides, self.padding = (4, 4), (2, 2), ((2, 2), (2, 2))
    else:
      kernel, self.strides, self.padding = (1 + s_h - t_h, 1 + s_w - t_w), (1, 1), ((0, 0), (0, 0))
    # PyTorch's fan_in: in_channels * k * k for Conv2d, out_channels * k * k for ConvTranspose2d.
    fan_in = (t_c if self.kind == "deconv" else s_c) * kernel[0] * kernel[1]
    bound = 1.0 / math.sqrt(fan_in)
    k_w, k_b = jax.random.split(rngs.params())
    # HWIO; for the transposed convolution this is the equivalent (flipped) forward kernel.
    self.kernel = nnx.Param(_uniform(bound)(k_w, kernel + (s_c, t_c)))
    self.bias = nnx.Param(_uniform(bound)(k_b, (t_c,)))
    self.bn = batch_norm(t_c, rngs=rngs)

  def __call__(self, x, *, train: bool = True, mask=None):
    dilation = (2, 2) if self.kind == "deconv" else (1, 1)
    y = jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32), self.kernel[...], self.strides if self.kind != "deconv"
        else (1, 1), self.padding, lhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    y = y + self.bias[...]
    bn_mask = None if mask is None else mask[:, None, None, None]
    if bn_mask is not None:
      bn_mask = jnp.broadcast_to(bn_mask, y.shape)
    return jax.nn.relu(self.bn(y, use_running_average=not train, mask=bn_mask))


def _graphdef(student_shape, teacher_shape):
  return nnx.graphdef(nnx.eval_shape(lambda: ConvReg(student_shape, teacher_shape,
                                                     rngs=nnx.Rngs(0))))


@register_term("fitnet")
@dataclasses.dataclass(frozen=True)
class FitNet(LossTerm):
  """FitNet hint loss through RepDistiller's `ConvReg` (`connector=true`, the default), or
  `losses.fitnet` between same-shaped maps (`connector=false`)."""

  feature: Any = "stage2"
  teacher_feature: Any = None
  connector: bool = True

  def init(self, rng, student, teacher, *, num_data=None):
    if not self.connector:
      return None, None
    s = feature(student, self.feature, "the student")
    t = feature(teacher, self.feature if self.teacher_feature is None else self.teacher_feature,
                "the teacher")
    reg = ConvReg(s.shape, t.shape, rngs=nnx.Rngs(params=rng))
    return nnx.state(reg, nnx.Param), nnx.state(reg, nnx.BatchStat)

  def __call__(self, ctx):
    s, t = feature_pair(ctx, self.feature, self.teacher_feature)
    if not self.connector:
      return masked_mean(losses.fitnet(s, t, where=ctx.where), ctx.where)
    if ctx.params is None:
      raise ValueError("loss term 'fitnet' has no connector parameters: initialise the terms "
                       "with step.init(state, batch, ...) before training (or pass "
                       "connector=false for same-shaped maps).")
    # Copies: batch norm updates its statistics in place, and the inputs must stay untouched.
    params, state = jax.tree.map(lambda x: jnp.array(x, copy=True), (ctx.params, ctx.state))
    reg = nnx.merge(_graphdef(s.shape, t.shape), params, state)
    y = reg(s, train=True, mask=ctx.where)
    new_state = nnx.state(reg, nnx.BatchStat)
    if ctx.axis_name is not None:
      new_state = jax.lax.pmean(new_state, ctx.axis_name)
    return masked_mean(losses.fitnet(y, t, where=ctx.where), ctx.where), new_state
