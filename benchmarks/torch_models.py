"""PyTorch CIFAR models with the architecture of the RepDistiller zoo, for the speed baseline only.

The one idea: the PyTorch side of every benchmark must train exactly the networks the anchors
train (RepDistiller `models/resnet.py` and `models/wrn.py`, which mdistiller copies), so the
layer structure, the parameter counts and even the `state_dict` key names are RepDistiller's.
Matching key names means a RepDistiller teacher checkpoint loads with `load_state_dict` and can be
converted to the Flax zoo (kd_jax.models) for a weight-conversion test.

torch is never a dependency of kd_jax: this file is imported only by the benchmark scripts run
in a separate interpreter that has torch (see benchmarks/README.md).

    python benchmarks/torch_models.py     # prints the parameter count of every model

Architectures (He et al. 2016 CIFAR ResNets; Zagoruyko & Komodakis 2016 wide ResNets):
  resnet{8,14,20,32,44,56,110}: 3x3 stem, three stages of BasicBlocks (post-activation), widths
    16/16/32/64; the "x4" variants (resnet8x4, resnet32x4) use 32/64/128/256.
  wrn_{depth}_{k}: pre-activation wide blocks, widths 16, 16k, 32k, 64k, a final BN-ReLU.
Both end in 8x8 average pooling and a linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "MODELS",
    "PARAM_COUNTS_100",
    "CifarResNet",
    "WideResNet",
    "create",
    "count_params",
]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class _PostActBlock(nn.Module):
  """conv-BN-ReLU-conv-BN, plus the (projected) input, then ReLU (RepDistiller BasicBlock)."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = _conv3x3(cin, cout, stride)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = _conv3x3(cout, cout)
    self.bn2 = nn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      # A 1x1 projection with BN whenever the shape changes (as RepDistiller: key `downsample.0/1`).
      self.downsample = nn.Sequential(
          nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    preact = y + shortcut
    return F.relu(preact), preact


class CifarResNet(nn.Module):
  """CIFAR ResNet of depth 6n+2 with BasicBlocks; `widths` = (stem, stage1, stage2, stage3)."""

  def __init__(self, depth: int, widths, num_classes: int = 100):
    super().__init__()
    if (depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    self.conv1 = _conv3x3(3, widths[0])
    self.bn1 = nn.BatchNorm2d(widths[0])
    cin = widths[0]
    stages = []
    for stage, (cout, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
      blocks = []
      for i in range(n):
        blocks.append(_PostActBlock(cin, cout, stride if i == 0 else 1))
        cin = cout
      stages.append(nn.Sequential(*blocks))
    self.layer1, self.layer2, self.layer3 = stages
    self.fc = nn.Linear(cin, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  @staticmethod
  def _stage(stage, x):
    preact = None
    for block in stage:
      x, preact = block(x)
    return x, preact

  def forward(self, x, is_feat: bool = False):
    """Returns logits, or (logits, features) with stage outputs, pre-activations and embedding."""
    x = F.relu(self.bn1(self.conv1(x)))
    feats = {"stem": x}
    for i, stage in enumerate((self.layer1, self.layer2, self.layer3), start=1):
      x, pre = self._stage(stage, x)
      feats[f"stage{i}"] = x
      feats[f"stage{i}_preact"] = pre
    feats["pre_pool"] = x
    emb = torch.flatten(F.avg_pool2d(x, x.shape[-1]), 1)
    feats["embedding"] = emb
    logits = self.fc(emb)
    return (logits, feats) if is_feat else logits


class _PreActWideBlock(nn.Module):
  """BN-ReLU-conv-BN-ReLU-conv plus shortcut (RepDistiller wrn BasicBlock, dropout 0).

  When the shape changes, the shortcut is a 1x1 conv applied to the *activated* input, as in
  RepDistiller (and the original WRN code); otherwise it is the raw input.
  """

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = _conv3x3(cin, cout, stride)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = _conv3x3(cout, cout)
    self.equal_in_out = cin == cout and stride == 1
    self.convShortcut = None if self.equal_in_out else nn.Conv2d(  # pylint: disable=invalid-name
        cin, cout, 1, stride=stride, bias=False)

  def forward(self, x):
    a = F.relu(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(self.conv1(a))))
    return y + (x if self.equal_in_out else self.convShortcut(a))


class _Stage(nn.Module):
  """A stack of wide blocks; exists so that state_dict keys read `blockN.layer.i...`."""

  def __init__(self, n: int, cin: int, cout: int, stride: int):
    super().__init__()
    self.layer = nn.Sequential(*[
        _PreActWideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  """Wide ResNet of depth 6n+4 and widening factor k (dropout 0, as the anchors train it)."""

  def __init__(self, depth: int, widen_factor: int, num_classes: int = 100):
    super().__init__()
    if (depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    w = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    self.conv1 = _conv3x3(3, w[0])
    self.block1 = _Stage(n, w[0], w[1], 1)
    self.block2 = _Stage(n, w[1], w[2], 2)
    self.block3 = _Stage(n, w[2], w[3], 2)
    self.bn1 = nn.BatchNorm2d(w[3])
    self.fc = nn.Linear(w[3], num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)

  def forward(self, x, is_feat: bool = False):
    """Returns logits, or (logits, features) as CifarResNet.forward."""
    x = self.conv1(x)
    feats = {"stem": x}
    for i, stage in enumerate((self.block1, self.block2, self.block3), start=1):
      x = stage(x)
      feats[f"stage{i}"] = x
    x = F.relu(self.bn1(x))
    feats["pre_pool"] = x
    emb = torch.flatten(F.avg_pool2d(x, x.shape[-1]), 1)
    feats["embedding"] = emb
    logits = self.fc(emb)
    return (logits, feats) if is_feat else logits


_X1 = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

MODELS = {
    "resnet8": lambda k: CifarResNet(8, _X1, k),
    "resnet14": lambda k: CifarResNet(14, _X1, k),
    "resnet20": lambda k: CifarResNet(20, _X1, k),
    "resnet32": lambda k: CifarResNet(32, _X1, k),
    "resnet44": lambda k: CifarResNet(44, _X1, k),
    "resnet56": lambda k: CifarResNet(56, _X1, k),
    "resnet110": lambda k: CifarResNet(110, _X1, k),
    "resnet8x4": lambda k: CifarResNet(8, _X4, k),
    "resnet32x4": lambda k: CifarResNet(32, _X4, k),
    "wrn_16_1": lambda k: WideResNet(16, 1, k),
    "wrn_16_2": lambda k: WideResNet(16, 2, k),
    "wrn_40_1": lambda k: WideResNet(40, 1, k),
    "wrn_40_2": lambda k: WideResNet(40, 2, k),
}

# Trainable parameters (weights + biases, no BN running statistics) for num_classes=100, as
# RepDistiller's constructors give them (published: resnet8x4 1.23M, resnet32x4 7.43M, wrn_40_2
# 2.26M, wrn_16_2 0.70M, resnet56 0.86M, resnet110 1.74M); the rest from the closed-form count of
# the architecture. `python benchmarks/torch_models.py` checks the modules against this table.
PARAM_COUNTS_100 = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
}


def create(name: str, num_classes: int = 100) -> nn.Module:
  """Builds the named model (see MODELS) with `num_classes` outputs."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  return MODELS[name](num_classes)


def count_params(model: nn.Module) -> int:
  """Number of trainable parameters."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _main():
  bad = []
  for name in MODELS:
    model = create(name, 100)
    n = count_params(model)
    want = PARAM_COUNTS_100.get(name)
    flag = "" if want == n else f"   MISMATCH (expected {want})"
    if want != n:
      bad.append(name)
    logits, feats = model.eval()(torch.zeros(2, 3, 32, 32), is_feat=True)
    shapes = {k: tuple(v.shape) for k, v in feats.items() if k in ("pre_pool", "embedding")}
    print(f"{name:11s} params={n:>10,d}  logits={tuple(logits.shape)}  {shapes}{flag}")
  if bad:
    raise SystemExit(f"parameter count mismatch: {bad}")


if __name__ == "__main__":
  _main()
