"""MobileNet (V1) with a width multiplier, the CUB-200 backbone of ReFilled (224x224 inputs).

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications" (2017), Table 1: conv3x3 stride 2 (32 ch) + BN + ReLU, then 13 depthwise-separable
blocks (depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU) with output channels / strides
(64,1) (128,2) (128,1) (256,2) (256,1) (512,2) (512,1)x5 (1024,2) (1024,1), global average
pooling and a linear classifier. Every channel count is int(c * width_multiplier). ReFilled's
CUB runs use widths 1.0 (teacher), 0.75, 0.5, 0.25 (official code `njulus/REFILLED`;
docs/refilled.md).

Registered as "mobilenet_v1" (option `width_multiplier`) when this module is imported.
Features: "stem" (stride 2), "stage1".."stage4" (strides 4, 8, 16, 32: after blocks 3, 5, 11,
13), "pre_pool" (= stage4), "embedding" (pooled, int(1024 * width) wide).
"""

from __future__ import annotations

from flax import nnx

from kd_jax.models import _layers as L
from kd_jax.models._registry import available, register
from kd_jax.models.vgg import ConvBN

BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
          (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
_STAGE_AFTER = {2: "stage1", 4: "stage2", 10: "stage3", 12: "stage4"}


class DepthwiseSeparable(nnx.Module):
  """dw 3x3 (stride s, groups = in) + BN + ReLU, then pw 1x1 + BN + ReLU."""

  def __init__(self, inp: int, oup: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.dw = ConvBN(inp, inp, 3, stride, 1, groups=inp, dtype=dtype, rngs=rngs)
    self.pw = ConvBN(inp, oup, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x, ura: bool):
    return L.relu(self.pw(L.relu(self.dw(x, ura)), ura))


class MobileNetV1(nnx.Module):
  """MobileNet V1 at `width_multiplier`; `model(x, train=...) -> (logits, features)`."""

  def __init__(self, width_multiplier: float = 1.0, *, num_classes: int, dtype=None,
               rngs: nnx.Rngs):
    if width_multiplier <= 0:
      raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}.")
    self.dtype = dtype
    ch = lambda c: max(1, int(c * width_multiplier))  # noqa: E731
    in_ch = ch(32)
    self.conv1 = ConvBN(3, in_ch, 3, 2, 1, dtype=dtype, rngs=rngs)
    blocks = []
    for c, s in BLOCKS:
      blocks.append(DepthwiseSeparable(in_ch, ch(c), s, dtype=dtype, rngs=rngs))
      in_ch = ch(c)
    self.blocks = nnx.List(blocks)
    self.fc = L.linear(in_ch, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    ura = not train
    x = L.to_compute(x, self.dtype)
    x = L.relu(self.conv1(x, ura))
    feats = {"stem": x}
    for i, block in enumerate(self.blocks):
      x = block(x, ura)
      if i in _STAGE_AFTER:
        feats[_STAGE_AFTER[i]] = x
    feats["pre_pool"] = x
    feats["embedding"] = emb = L.global_avg_pool(x)
    return self.fc(emb).astype("float32"), feats


if "mobilenet_v1" not in available():  # idempotent under module reloads

  @register("mobilenet_v1")
  def mobilenet_v1(*, num_classes, rngs, width_multiplier: float = 1.0, dtype=None):
    """MobileNet V1 (Howard et al. 2017) with `width_multiplier` (ReFilled CUB: 1/0.75/0.5/0.25)."""
    return MobileNetV1(width_multiplier, num_classes=num_classes, dtype=dtype, rngs=rngs)
