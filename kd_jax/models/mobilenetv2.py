"""RepDistiller's CIFAR MobileNetV2 (`models/mobilenetv2.py`, `mobile_half`) as a Flax NNX module.

"MobileNetV2" in the KD tables is `mobilenetv2_T_w(T=6, W=0.5)`: conv3x3 stride 2 (16 ch) + BN +
ReLU, seven groups of inverted residuals (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,2)
(6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1) with c scaled by W (every block, even t = 1, has
the 1x1 expansion conv), a 1x1 conv to 1280 channels + BN + ReLU, average pooling and a linear
classifier. Residual connection when stride 1 and in == out.
"""

from __future__ import annotations

import jax
from flax import nnx

from kd_jax.models import _layers as L
from kd_jax.models._registry import register
from kd_jax.models.vgg import ConvBN

_SETTING = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
            (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))


class InvertedResidual(nnx.Module):
  """pw 1x1 expand-BN-ReLU, dw 3x3 (stride s)-BN-ReLU, pw 1x1 linear-BN (`conv` = the 3 pairs)."""

  def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, *, dtype,
               rngs: nnx.Rngs):
    hidden = inp * expand_ratio
    self.use_res_connect = stride == 1 and inp == oup
    self.conv = nnx.List([
        ConvBN(inp, hidden, 1, dtype=dtype, rngs=rngs),
        ConvBN(hidden, hidden, 3, stride, 1, groups=hidden, dtype=dtype, rngs=rngs),
        ConvBN(hidden, oup, 1, dtype=dtype, rngs=rngs),
    ])

  def __call__(self, x, ura: bool):
    out = L.relu(self.conv[0](x, ura))
    out = L.relu(self.conv[1](out, ura))
    out = self.conv[2](out, ura)
    return x + out if self.use_res_connect else out


class MobileNetV2(nnx.Module):
  """RepDistiller `MobileNetV2(T, feature_dim, width_mult)` for 32x32 inputs.

  Features (T=6, W=0.5): stem [B,16,16,16], stage1 [B,16,16,12] (blocks[1]), stage2 [B,8,8,16]
  (blocks[2]), stage3 [B,4,4,48] (blocks[4]), stage4 [B,2,2,160] (blocks[6]; = pre_pool, before
  conv2, exactly RepDistiller's feat[-2]), embedding [B,1280] (after conv2-BN-ReLU and pooling).
  No preact_* features: the reference returns the same (linear) maps for preact=True.
  """

  def __init__(self, expand: int, width_mult: float, *, num_classes: int, dtype=None,
               rngs: nnx.Rngs):
    self.dtype = dtype
    in_ch = int(32 * width_mult)
    self.conv1 = ConvBN(3, in_ch, 3, 2, 1, dtype=dtype, rngs=rngs)
    blocks = []
    for t, c, n, s in _SETTING:
      out_ch = int(c * width_mult)
      group = []
      for i in range(n):
        group.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1,
                                      expand if t is None else t, dtype=dtype, rngs=rngs))
        in_ch = out_ch
      blocks.append(nnx.List(group))
    self.blocks = nnx.List(blocks)
    last = int(1280 * width_mult) if width_mult > 1.0 else 1280
    self.conv2 = ConvBN(in_ch, last, 1, dtype=dtype, rngs=rngs)
    # RepDistiller initialises the classifier with N(0, 0.01) and a zero bias.
    self.classifier = L.linear(last, num_classes, dtype=dtype,
                               kernel_init=jax.nn.initializers.normal(0.01), rngs=rngs)

  def __call__(self, x, *, train: bool):
    ura = not train
    x = L.to_compute(x, self.dtype)
    x = L.relu(self.conv1(x, ura))
    feats = {"stem": x}
    stage_after = {1: "stage1", 2: "stage2", 4: "stage3", 6: "stage4"}
    for i, group in enumerate(self.blocks):
      for block in group:
        x = block(x, ura)
      if i in stage_after:
        feats[stage_after[i]] = x
    feats["pre_pool"] = x
    x = L.relu(self.conv2(x, ura))
    feats["embedding"] = emb = L.global_avg_pool(x)
    return self.classifier(emb).astype("float32"), feats


@register("MobileNetV2")
def mobilenetv2(*, num_classes, rngs, expand: int = 6, width_mult: float = 0.5, dtype=None):
  """RepDistiller 'MobileNetV2' = mobile_half = mobilenetv2_T_w(T=6, W=0.5)."""
  return MobileNetV2(expand, width_mult, num_classes=num_classes, dtype=dtype, rngs=rngs)
