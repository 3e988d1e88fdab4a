"""RepDistiller's CIFAR ShuffleNetV1 / V2 (`models/ShuffleNetv1.py`, `ShuffleNetv2.py`) in Flax NNX.

ShuffleV1 (Zhang et al. 2018, groups 3): 1x1 stem conv (24 ch) + BN + ReLU, three stages of
[4, 8, 4] bottlenecks to 240/480/960 channels; a stage's first block has stride 2 and
concatenates a 3x3 stride-2 average-pooled shortcut (zeros counted in the mean, as PyTorch's
AvgPool2d); grouped 1x1 convs (group 1 for the first conv after the 24-channel stem) with a
channel shuffle; 4x4 average pooling, linear classifier.

ShuffleV2 (Ma et al. 2018, net size 1): 1x1 stem conv (24 ch) + BN + ReLU, three stages of a
stride-2 DownBlock followed by [3, 7, 3] split/shuffle BasicBlocks to 116/232/464 channels,
1x1 conv to 1024 + BN + ReLU, 4x4 average pooling, linear classifier.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from kd_jax.models import _layers as L
from kd_jax.models._registry import register


class V1Bottleneck(nnx.Module):
  """gconv1x1-BN-ReLU-shuffle-dwconv3x3-BN-ReLU-gconv1x1-BN (+ / concat shortcut); (out, preact)."""

  def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, *, dtype,
               rngs: nnx.Rngs):
    mid = out_planes // 4
    self.stride = stride
    self.g1 = 1 if in_planes == 24 else groups
    self.conv1 = L.conv2d(in_planes, mid, 1, groups=self.g1, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(mid, dtype=dtype, rngs=rngs)
    self.conv2 = L.conv2d(mid, mid, 3, stride, 1, groups=mid, dtype=dtype, rngs=rngs)
    self.bn2 = L.batch_norm(mid, dtype=dtype, rngs=rngs)
    self.conv3 = L.conv2d(mid, out_planes, 1, groups=groups, dtype=dtype, rngs=rngs)
    self.bn3 = L.batch_norm(out_planes, dtype=dtype, rngs=rngs)

  def __call__(self, x, ura: bool):
    out = L.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = L.channel_shuffle(out, self.g1)
    out = L.relu(self.bn2(self.conv2(out), use_running_average=ura))
    out = self.bn3(self.conv3(out), use_running_average=ura)
    if self.stride == 2:
      preact = jnp.concatenate([out, L.avg_pool(x, 3, 2, 1)], axis=-1)
    else:
      preact = out + x
    return L.relu(preact), preact


class ShuffleNetV1(nnx.Module):
  """RepDistiller `ShuffleNet(cfg)`; ShuffleV1 = out_planes (240, 480, 960), blocks (4, 8, 4), g 3.

  Features: stem [B,32,32,24], stage1 [B,16,16,240], stage2 [B,8,8,480], stage3 [B,4,4,960]
  (= pre_pool), preact_stage1..3 (last block before its ReLU), embedding [B,960].
  """

  def __init__(self, out_planes, num_blocks, groups: int, *, num_classes: int, dtype=None,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.conv1 = L.conv2d(3, 24, 1, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(24, dtype=dtype, rngs=rngs)
    in_planes = 24
    layers = []
    for planes, n in zip(out_planes, num_blocks):
      blocks = []
      for i in range(n):
        blocks.append(V1Bottleneck(in_planes, planes - (in_planes if i == 0 else 0),
                                   2 if i == 0 else 1, groups, dtype=dtype, rngs=rngs))
        in_planes = planes
      layers.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3 = layers
    self.linear = L.linear(in_planes, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    ura = not train
    x = L.to_compute(x, self.dtype)
    x = L.relu(self.bn1(self.conv1(x), use_running_average=ura))
    feats = {"stem": x}
    for k, layer in enumerate((self.layer1, self.layer2, self.layer3), start=1):
      for block in layer:
        x, pre = block(x, ura)
      feats[f"stage{k}"], feats[f"preact_stage{k}"] = x, pre
    feats["pre_pool"] = x
    feats["embedding"] = emb = L.global_avg_pool(x)
    return self.linear(emb).astype("float32"), feats


class V2BasicBlock(nnx.Module):
  """Split channels in half; right half: 1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU; concat; shuffle(2)."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    c = channels // 2
    self.split = c
    self.conv1 = L.conv2d(c, c, 1, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(c, dtype=dtype, rngs=rngs)
    self.conv2 = L.conv2d(c, c, 3, 1, 1, groups=c, dtype=dtype, rngs=rngs)
    self.bn2 = L.batch_norm(c, dtype=dtype, rngs=rngs)
    self.conv3 = L.conv2d(c, c, 1, dtype=dtype, rngs=rngs)
    self.bn3 = L.batch_norm(c, dtype=dtype, rngs=rngs)

  def __call__(self, x, ura: bool):
    x1, x2 = x[..., :self.split], x[..., self.split:]
    out = L.relu(self.bn1(self.conv1(x2), use_running_average=ura))
    out = self.bn2(self.conv2(out), use_running_average=ura)
    pre = self.bn3(self.conv3(out), use_running_average=ura)
    out = L.channel_shuffle(jnp.concatenate([x1, L.relu(pre)], axis=-1), 2)
    # As RepDistiller: the preact map is the concat before the shuffle.
    return out, jnp.concatenate([x1, pre], axis=-1)


class V2DownBlock(nnx.Module):
  """Two stride-2 branches (dw3x3-BN, 1x1-BN-ReLU | 1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU), shuffle."""

  def __init__(self, in_ch: int, out_ch: int, *, dtype, rngs: nnx.Rngs):
    mid = out_ch // 2
    self.conv1 = L.conv2d(in_ch, in_ch, 3, 2, 1, groups=in_ch, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(in_ch, dtype=dtype, rngs=rngs)
    self.conv2 = L.conv2d(in_ch, mid, 1, dtype=dtype, rngs=rngs)
    self.bn2 = L.batch_norm(mid, dtype=dtype, rngs=rngs)
    self.conv3 = L.conv2d(in_ch, mid, 1, dtype=dtype, rngs=rngs)
    self.bn3 = L.batch_norm(mid, dtype=dtype, rngs=rngs)
    self.conv4 = L.conv2d(mid, mid, 3, 2, 1, groups=mid, dtype=dtype, rngs=rngs)
    self.bn4 = L.batch_norm(mid, dtype=dtype, rngs=rngs)
    self.conv5 = L.conv2d(mid, mid, 1, dtype=dtype, rngs=rngs)
    self.bn5 = L.batch_norm(mid, dtype=dtype, rngs=rngs)

  def __call__(self, x, ura: bool):
    left = self.bn1(self.conv1(x), use_running_average=ura)
    left = L.relu(self.bn2(self.conv2(left), use_running_average=ura))
    right = L.relu(self.bn3(self.conv3(x), use_running_average=ura))
    right = self.bn4(self.conv4(right), use_running_average=ura)
    right = L.relu(self.bn5(self.conv5(right), use_running_average=ura))
    return L.channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nnx.Module):
  """RepDistiller `ShuffleNetV2(net_size=1)`: channels (116, 232, 464, 1024), blocks (3, 7, 3).

  Features: stem [B,32,32,24], stage1 [B,16,16,116], stage2 [B,8,8,232], stage3 [B,4,4,464]
  (= pre_pool, before conv2), preact_stage1..3 (last block's concat before ReLU and shuffle),
  embedding [B,1024] (after conv2-BN-ReLU and pooling).
  """

  def __init__(self, out_channels, num_blocks, *, num_classes: int, dtype=None, rngs: nnx.Rngs):
    self.dtype = dtype
    self.conv1 = L.conv2d(3, 24, 1, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(24, dtype=dtype, rngs=rngs)
    in_ch = 24
    layers = []
    for ch, n in zip(out_channels[:3], num_blocks):
      blocks = [V2DownBlock(in_ch, ch, dtype=dtype, rngs=rngs)]
      blocks += [V2BasicBlock(ch, dtype=dtype, rngs=rngs) for _ in range(n)]
      in_ch = ch
      layers.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3 = layers
    self.conv2 = L.conv2d(in_ch, out_channels[3], 1, dtype=dtype, rngs=rngs)
    self.bn2 = L.batch_norm(out_channels[3], dtype=dtype, rngs=rngs)
    self.linear = L.linear(out_channels[3], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    ura = not train
    x = L.to_compute(x, self.dtype)
    x = L.relu(self.bn1(self.conv1(x), use_running_average=ura))
    feats = {"stem": x}
    for k, layer in enumerate((self.layer1, self.layer2, self.layer3), start=1):
      x = layer[0](x, ura)
      pre = None
      for block in layer[1:]:
        x, pre = block(x, ura)
      feats[f"stage{k}"], feats[f"preact_stage{k}"] = x, pre
    feats["pre_pool"] = x
    x = L.relu(self.bn2(self.conv2(x), use_running_average=ura))
    feats["embedding"] = emb = L.global_avg_pool(x)
    return self.linear(emb).astype("float32"), feats


@register("ShuffleV1")
def shufflev1(*, num_classes, rngs, dtype=None):
  """RepDistiller ShuffleV1: out_planes (240, 480, 960), blocks (4, 8, 4), groups 3."""
  return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes=num_classes, dtype=dtype,
                      rngs=rngs)


@register("ShuffleV2")
def shufflev2(*, num_classes, rngs, dtype=None):
  """RepDistiller ShuffleV2 (net size 1): channels (116, 232, 464, 1024), blocks (3, 7, 3)."""
  return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=num_classes, dtype=dtype,
                      rngs=rngs)
