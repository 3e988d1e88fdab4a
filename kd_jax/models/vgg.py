"""VGG with batch norm of RepDistiller (`models/vgg.py`, the `vgg*_bn` builders) as Flax NNX modules.

Five blocks of conv3x3(bias)-BN[-ReLU] layers (the ReLU after a block's last BN is applied by the
forward pass, so the pre-ReLU map is available), 2x2 max-pooling after blocks 0-2 (after block 3
only for 64x64 inputs), global average pooling and one linear classifier 512 -> classes.
Configurations: vgg8 "S" [64][128][256][512][512], vgg11 "A", vgg13 "B", vgg16 "D", vgg19 "E".
"""

from __future__ import annotations

import jax
from flax import nnx

from kd_jax.models import _layers as L
from kd_jax.models._registry import register

_CFG = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class ConvBN(nnx.Module):
  """conv followed by BN (no activation); PyTorch's `Sequential(conv, bn)` pair."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, *,
               groups: int = 1, bias: bool = False, dtype, rngs: nnx.Rngs):
    self.conv = L.conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=bias,
                         dtype=dtype, rngs=rngs)
    self.bn = L.batch_norm(out_ch, dtype=dtype, rngs=rngs)

  def __call__(self, x, ura: bool):
    return self.bn(self.conv(x), use_running_average=ura)


class VGG(nnx.Module):
  """RepDistiller `VGG(cfg, batch_norm=True)`.

  Features (32x32 input): stem [B,32,32,c0] (relu(block0)), stage1 [B,16,16,128],
  stage2 [B,8,8,256], stage3 [B,4,4,512], stage4 [B,4,4,512] (= pre_pool), preact_stage1..4
  (block outputs before their final ReLU), embedding [B,512].
  """

  def __init__(self, cfg, *, num_classes: int, dtype=None, rngs: nnx.Rngs):
    self.dtype = dtype
    blocks = []
    in_ch = 3
    for widths in cfg:
      layers = []
      for w in widths:
        layers.append(ConvBN(in_ch, w, 3, 1, 1, bias=True, dtype=dtype, rngs=rngs))
        in_ch = w
      blocks.append(nnx.List(layers))
    self.block0, self.block1, self.block2, self.block3, self.block4 = blocks
    # RepDistiller initialises the classifier with N(0, 0.01) and a zero bias.
    self.classifier = L.linear(in_ch, num_classes, dtype=dtype,
                               kernel_init=jax.nn.initializers.normal(0.01), rngs=rngs)

  @staticmethod
  def _block(layers, x, ura):
    """Runs conv-BN-ReLU ... conv-BN; returns the pre-ReLU output."""
    for i, layer in enumerate(layers):
      if i > 0:
        x = L.relu(x)
      x = layer(x, ura)
    return x

  def __call__(self, x, *, train: bool):
    ura = not train
    x = L.to_compute(x, self.dtype)
    h = x.shape[1]
    x = L.relu(self._block(self.block0, x, ura))
    feats = {"stem": x}
    x = L.max_pool(x, 2, 2)
    for k, block in enumerate((self.block1, self.block2, self.block3, self.block4), start=1):
      pre = self._block(block, x, ura)
      x = L.relu(pre)
      feats[f"stage{k}"], feats[f"preact_stage{k}"] = x, pre
      if k < 3 or (k == 3 and h == 64):
        x = L.max_pool(x, 2, 2)
    feats["pre_pool"] = x
    feats["embedding"] = emb = L.global_avg_pool(x)
    return self.classifier(emb).astype("float32"), feats


def _register_vgg(name, cfg):
  def build(*, num_classes, rngs, dtype=None):
    return VGG(cfg, num_classes=num_classes, dtype=dtype, rngs=rngs)

  build.__name__ = name
  build.__doc__ = f"RepDistiller {name} (= {name}_bn, with batch norm): blocks {cfg}."
  register(name)(build)


for _name, _cfg in _CFG.items():
  _register_vgg(_name, _cfg)
