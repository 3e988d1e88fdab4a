"""CIFAR ResNets of RepDistiller (`models/resnet.py`, `models/resnetv2.py`) as Flax NNX modules.

resnet{8,14,20,32,44,56,110}, resnet8x4, resnet32x4: He et al. (2016) CIFAR ResNets — 3x3 stem,
three stages of post-activation BasicBlocks (widths 16/16/32/64, or 32/64/128/256 for the x4
variants; strides 1/2/2), a 1x1-conv + BN projection wherever the shape changes, 8x8 average
pooling and a linear classifier. ResNet50: the CIFAR form of the ImageNet bottleneck ResNet-50
(3x3 stride-1 stem, no max-pool, stages 64/128/256/512 x4, [3, 4, 6, 3] blocks).

Attribute names follow the PyTorch modules (`layer1[0].downsample[0]`, ...), so that
`kd_jax.models.torch_convert` maps RepDistiller `state_dict` keys mechanically.
"""

from __future__ import annotations

from flax import nnx

from kd_jax.models import _layers as L
from kd_jax.models._registry import register


class BasicBlock(nnx.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU; returns (out, preact)."""

  def __init__(self, in_planes: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    self.conv1 = L.conv2d(in_planes, planes, 3, stride, 1, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = L.conv2d(planes, planes, 3, 1, 1, dtype=dtype, rngs=rngs)
    self.bn2 = L.batch_norm(planes, dtype=dtype, rngs=rngs)
    if stride != 1 or in_planes != planes:
      self.downsample = nnx.List([L.conv2d(in_planes, planes, 1, stride, 0, dtype=dtype, rngs=rngs),
                                  L.batch_norm(planes, dtype=dtype, rngs=rngs)])
    else:
      self.downsample = None

  def __call__(self, x, ura: bool):
    out = L.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = self.bn2(self.conv2(out), use_running_average=ura)
    if self.downsample is not None:
      x = self.downsample[1](self.downsample[0](x), use_running_average=ura)
    preact = out + x
    return L.relu(preact), preact


class Bottleneck(nnx.Module):
  """1x1-3x3-1x1 bottleneck (expansion 4) with a 1x1-conv + BN `shortcut` when shapes change."""

  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int, *, dtype, rngs: nnx.Rngs):
    out_planes = self.expansion * planes
    self.conv1 = L.conv2d(in_planes, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = L.conv2d(planes, planes, 3, stride, 1, dtype=dtype, rngs=rngs)
    self.bn2 = L.batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv3 = L.conv2d(planes, out_planes, 1, dtype=dtype, rngs=rngs)
    self.bn3 = L.batch_norm(out_planes, dtype=dtype, rngs=rngs)
    if stride != 1 or in_planes != out_planes:
      self.shortcut = nnx.List([L.conv2d(in_planes, out_planes, 1, stride, dtype=dtype, rngs=rngs),
                                L.batch_norm(out_planes, dtype=dtype, rngs=rngs)])
    else:
      self.shortcut = None

  def __call__(self, x, ura: bool):
    out = L.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = L.relu(self.bn2(self.conv2(out), use_running_average=ura))
    out = self.bn3(self.conv3(out), use_running_average=ura)
    if self.shortcut is not None:
      x = self.shortcut[1](self.shortcut[0](x), use_running_average=ura)
    preact = out + x
    return L.relu(preact), preact


def _run_stage(blocks, x, ura):
  preact = None
  for block in blocks:
    x, preact = block(x, ura)
  return x, preact


class CifarResNet(nnx.Module):
  """RepDistiller `ResNet(depth, num_filters, 'basicblock')`: depth = 6n + 2, n blocks per stage.

  Features: stem [B,32,32,f0], stage1 [B,32,32,f1], stage2 [B,16,16,f2], stage3 [B,8,8,f3]
  (= pre_pool), preact_stage1..3 (the stages' last block before its ReLU), embedding [B,f3].
  """

  def __init__(self, depth: int, num_filters, *, num_classes: int, dtype=None, rngs: nnx.Rngs):
    if (depth - 2) % 6 != 0:
      raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
    n = (depth - 2) // 6
    self.dtype = dtype
    self.conv1 = L.conv2d(3, num_filters[0], 3, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(num_filters[0], dtype=dtype, rngs=rngs)
    in_planes = num_filters[0]
    layers = []
    for planes, stride in zip(num_filters[1:], (1, 2, 2)):
      blocks = []
      for i in range(n):
        blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, dtype=dtype,
                                 rngs=rngs))
        in_planes = planes
      layers.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3 = layers
    self.fc = L.linear(num_filters[3], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    ura = not train
    x = L.to_compute(x, self.dtype)
    x = L.relu(self.bn1(self.conv1(x), use_running_average=ura))
    feats = {"stem": x}
    for k, layer in enumerate((self.layer1, self.layer2, self.layer3), start=1):
      x, pre = _run_stage(layer, x, ura)
      feats[f"stage{k}"], feats[f"preact_stage{k}"] = x, pre
    feats["pre_pool"] = x
    feats["embedding"] = emb = L.global_avg_pool(x)
    return self.fc(emb).astype("float32"), feats


class ResNetV2(nnx.Module):
  """RepDistiller `resnetv2.ResNet(Bottleneck, num_blocks)` (CIFAR stem: 3x3, stride 1, no pool).

  Features: stem [B,32,32,64], stage1..4 ([B,32,32,256], [B,16,16,512], [B,8,8,1024],
  [B,4,4,2048]; stage4 = pre_pool), preact_stage1..4, embedding [B,2048].
  """

  def __init__(self, num_blocks, *, num_classes: int, dtype=None, rngs: nnx.Rngs):
    self.dtype = dtype
    self.conv1 = L.conv2d(3, 64, 3, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(64, dtype=dtype, rngs=rngs)
    in_planes = 64
    layers = []
    for planes, stride, n in zip((64, 128, 256, 512), (1, 2, 2, 2), num_blocks):
      blocks = []
      for i in range(n):
        blocks.append(Bottleneck(in_planes, planes, stride if i == 0 else 1, dtype=dtype,
                                 rngs=rngs))
        in_planes = planes * Bottleneck.expansion
      layers.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = layers
    self.linear = L.linear(in_planes, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    ura = not train
    x = L.to_compute(x, self.dtype)
    x = L.relu(self.bn1(self.conv1(x), use_running_average=ura))
    feats = {"stem": x}
    for k, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
      x, pre = _run_stage(layer, x, ura)
      feats[f"stage{k}"], feats[f"preact_stage{k}"] = x, pre
    feats["pre_pool"] = x
    feats["embedding"] = emb = L.global_avg_pool(x)
    return self.linear(emb).astype("float32"), feats


_SMALL = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)
_CIFAR_RESNETS = {
    "resnet8": (8, _SMALL), "resnet14": (14, _SMALL), "resnet20": (20, _SMALL),
    "resnet32": (32, _SMALL), "resnet44": (44, _SMALL), "resnet56": (56, _SMALL),
    "resnet110": (110, _SMALL), "resnet8x4": (8, _WIDE), "resnet32x4": (32, _WIDE),
}


def _register_cifar_resnet(name, depth, filters):
  def build(*, num_classes, rngs, dtype=None):
    return CifarResNet(depth, filters, num_classes=num_classes, dtype=dtype, rngs=rngs)

  build.__name__ = name
  build.__doc__ = f"RepDistiller {name}: depth {depth}, widths {filters}."
  register(name)(build)


for _name, (_depth, _filters) in _CIFAR_RESNETS.items():
  _register_cifar_resnet(_name, _depth, _filters)


@register("ResNet50")
def resnet50(*, num_classes, rngs, dtype=None):
  """RepDistiller ResNet50 (CIFAR form): Bottleneck blocks [3, 4, 6, 3]."""
  return ResNetV2((3, 4, 6, 3), num_classes=num_classes, dtype=dtype, rngs=rngs)
