"""Wide ResNets of RepDistiller (`models/wrn.py`, Zagoruyko & Komodakis 2016) as Flax NNX modules.

wrn_{depth}_{k}: 3x3 stem (16 channels, no BN), three stages of pre-activation blocks
(BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) of widths 16k/32k/64k with strides 1/2/2,
(depth - 4) / 6 blocks per stage, a 1x1 `convShortcut` (no BN) where in != out, a final BN-ReLU,
8x8 average pooling and a linear classifier.

Attribute names follow the PyTorch modules (`block1.layer[0].bn1`, `conv_shortcut` for
`convShortcut`), so `kd_jax.models.torch_convert` maps RepDistiller `state_dict` keys.
"""

from __future__ import annotations

from flax import nnx

from kd_jax.models import _layers as L
from kd_jax.models._registry import register


class WideBlock(nnx.Module):
  """Pre-activation wide block; returns (out, bn1(x)) — the BN'd input is WRN's 'preact' map."""

  def __init__(self, in_planes: int, out_planes: int, stride: int, dropout_rate: float, *,
               dtype, rngs: nnx.Rngs):
    self.bn1 = L.batch_norm(in_planes, dtype=dtype, rngs=rngs)
    self.conv1 = L.conv2d(in_planes, out_planes, 3, stride, 1, dtype=dtype, rngs=rngs)
    self.bn2 = L.batch_norm(out_planes, dtype=dtype, rngs=rngs)
    self.conv2 = L.conv2d(out_planes, out_planes, 3, 1, 1, dtype=dtype, rngs=rngs)
    self.equal_in_out = in_planes == out_planes
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate > 0 else None
    self.conv_shortcut = (None if self.equal_in_out else
                          L.conv2d(in_planes, out_planes, 1, stride, 0, dtype=dtype, rngs=rngs))

  def __call__(self, x, train: bool):
    bn_x = self.bn1(x, use_running_average=not train)
    act = L.relu(bn_x)
    out = L.relu(self.bn2(self.conv1(act), use_running_average=not train))
    if self.dropout is not None:
      out = self.dropout(out, deterministic=not train)
    out = self.conv2(out)
    # As RepDistiller: the identity path carries the raw x, the projection reads relu(bn1(x)).
    shortcut = x if self.equal_in_out else self.conv_shortcut(act)
    return shortcut + out, bn_x


class NetworkBlock(nnx.Module):
  """One stage: `layer` is the list of WideBlocks (PyTorch `blockK.layer`)."""

  def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, dropout_rate: float,
               *, dtype, rngs: nnx.Rngs):
    self.layer = nnx.List([
        WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                  dropout_rate, dtype=dtype, rngs=rngs) for i in range(n)])

  def __call__(self, x, train: bool):
    """Returns (stage output, bn1 output of the stage's first block)."""
    first_bn = None
    for i, block in enumerate(self.layer):
      x, bn_x = block(x, train)
      if i == 0:
        first_bn = bn_x
    return x, first_bn


class WideResNet(nnx.Module):
  """RepDistiller `WideResNet(depth, num_classes, widen_factor, dropRate)`.

  Features: stem [B,32,32,16] (raw conv1, no BN/ReLU, as feat[0]), stage1 [B,32,32,16k],
  stage2 [B,16,16,32k], stage3 [B,8,8,64k] (= pre_pool: block3's raw output, before the final
  BN+ReLU), preact_stage1/2/3 = block2.layer[0].bn1(stage1), block3.layer[0].bn1(stage2),
  bn1(stage3) (RepDistiller's preact=True features, taken from the forward pass so running
  statistics update once), embedding [B,64k] (after the final BN-ReLU and pooling).
  """

  def __init__(self, depth: int, widen_factor: int, *, num_classes: int,
               dropout_rate: float = 0.0, dtype=None, rngs: nnx.Rngs):
    if (depth - 4) % 6 != 0:
      raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    n = (depth - 4) // 6
    ch = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    self.dtype = dtype
    self.conv1 = L.conv2d(3, ch[0], 3, 1, 1, dtype=dtype, rngs=rngs)
    self.block1 = NetworkBlock(n, ch[0], ch[1], 1, dropout_rate, dtype=dtype, rngs=rngs)
    self.block2 = NetworkBlock(n, ch[1], ch[2], 2, dropout_rate, dtype=dtype, rngs=rngs)
    self.block3 = NetworkBlock(n, ch[2], ch[3], 2, dropout_rate, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(ch[3], dtype=dtype, rngs=rngs)
    self.fc = L.linear(ch[3], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    x = L.to_compute(x, self.dtype)
    s0 = self.conv1(x)
    s1, _ = self.block1(s0, train)
    s2, pre1 = self.block2(s1, train)
    s3, pre2 = self.block3(s2, train)
    pre3 = self.bn1(s3, use_running_average=not train)
    emb = L.global_avg_pool(L.relu(pre3))
    feats = {"stem": s0, "stage1": s1, "stage2": s2, "stage3": s3, "preact_stage1": pre1,
             "preact_stage2": pre2, "preact_stage3": pre3, "pre_pool": s3, "embedding": emb}
    return self.fc(emb).astype("float32"), feats


def _register_wrn(name, depth, k):
  def build(*, num_classes, rngs, dropout_rate: float = 0.0, dtype=None):
    return WideResNet(depth, k, num_classes=num_classes, dropout_rate=dropout_rate, dtype=dtype,
                      rngs=rngs)

  build.__name__ = name
  build.__doc__ = (f"RepDistiller {name}: depth {depth}, widen factor {k}; `dropout_rate` "
                   "(default 0.0 as RepDistiller) between a block's two convolutions.")
  register(name)(build)


for _name, (_depth, _k) in {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1),
                            "wrn_40_2": (40, 2)}.items():
  _register_wrn(_name, _depth, _k)
