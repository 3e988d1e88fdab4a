"""Models for MNIST-1D (`kd_jax.data.load_mnist1d`): a 1-D CNN teacher and two small students.

Inputs are [B, 40, 1] signals (length-major, one channel; [B, 40] is accepted too). MNIST-1D
(Greydanus, 2020, "Scaling down deep learning") is built so that translation-equivariant local
filters matter: with 4,000 training examples the paper's three-layer CNN reaches 94 % test
accuracy and its 40-100-100-10 MLP 68 %, so the teacher-student gap is large and a distillation
loss has room to help.

- `cnn1d_mnist1d` (teacher): conv k5 (1->c) BN ReLU [stem, 40] -> conv k3 (c->c, stride 2) BN
  ReLU [stage1, 20] -> conv k3 (c->2c, stride 2) BN ReLU [stage2, 10] -> conv k3 (2c->2c)
  BN ReLU [stage3, 10] -> global average pool over length -> linear. Width c = 32 by default.
- `cnn1d_mnist1d_narrow` (student): the same network at width 3 (310 parameters).
- `mlp_mnist1d` (student): flatten -> linear(40->h) ReLU [stem] -> linear(h->h) ReLU [stage1]
  -> linear(h->classes), h = 100 as in the paper.

Convolutions follow `kd_jax.models._layers` (PyTorch's symmetric integer padding, Kaiming
fan-out init, no bias before batch norm, PyTorch batch norm); the feature dict follows the zoo
contract (`kd_jax.models`): "pre_pool" is the last stage's map before pooling, [B, L, C] for the
CNNs and the last hidden layer [B, h] for the MLP; "embedding" is the vector the classifier reads.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from kd_jax.models import _conv
from kd_jax.models import _layers as L
from kd_jax.models._registry import register
from kd_jax.models.digits import DigitsMLP

MNIST1D_LENGTH = 40


def conv1d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
           padding: int = 0, *, bias: bool = False, dtype=None, rngs: nnx.Rngs) -> nnx.Conv:
  """`torch.nn.Conv1d(in, out, k, stride, padding, bias=bias)` on [B, L, C] inputs (Kaiming
  fan-out init as `_layers.conv2d`)."""
  return nnx.Conv(
      in_channels, out_channels, (kernel_size,), (stride,), padding=((padding, padding),),
      use_bias=bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=L.CONV_INIT,
      conv_general_dilated=_conv.conv_general_dilated, rngs=rngs)


def _as_signal(x, dtype):
  """[B, L] or [B, L, C] -> [B, L, C] in the compute dtype."""
  x = L.to_compute(x, dtype)
  return x[..., None] if x.ndim == 2 else x


class Mnist1DCNN(nnx.Module):
  """conv k5 (in->c) BN ReLU [stem] -> conv k3 s2 (c->c) BN ReLU [stage1]
  -> conv k3 s2 (c->2c) BN ReLU [stage2] -> conv k3 (2c->2c) BN ReLU [stage3]
  -> mean over length -> linear.

  On 40-sample signals the maps have lengths 40, 20, 10, 10. Parameters (BN statistics
  excluded): 5 in c + 3 c^2 + 6 c^2 + 12 c^2 + 2 (c + c + 2c + 2c) + 2c k + k for k classes,
  i.e. 21 c^2 + (5 in + 12 + 2k) c + k; 22,698 at c = 32, 1 channel and 10 classes.
  """

  def __init__(self, *, num_classes: int, width: int = 32, in_channels: int = 1, dtype=None,
               rngs: nnx.Rngs):
    self.dtype = dtype
    c = width
    self.conv1 = conv1d(in_channels, c, 5, 1, 2, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(c, dtype=dtype, rngs=rngs)
    self.conv2 = conv1d(c, c, 3, 2, 1, dtype=dtype, rngs=rngs)
    self.bn2 = L.batch_norm(c, dtype=dtype, rngs=rngs)
    self.conv3 = conv1d(c, 2 * c, 3, 2, 1, dtype=dtype, rngs=rngs)
    self.bn3 = L.batch_norm(2 * c, dtype=dtype, rngs=rngs)
    self.conv4 = conv1d(2 * c, 2 * c, 3, 1, 1, dtype=dtype, rngs=rngs)
    self.bn4 = L.batch_norm(2 * c, dtype=dtype, rngs=rngs)
    self.fc = L.linear(2 * c, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    ura = not train
    x = _as_signal(x, self.dtype)
    stem = L.relu(self.bn1(self.conv1(x), use_running_average=ura))
    pre1 = self.bn2(self.conv2(stem), use_running_average=ura)
    s1 = L.relu(pre1)
    pre2 = self.bn3(self.conv3(s1), use_running_average=ura)
    s2 = L.relu(pre2)
    pre3 = self.bn4(self.conv4(s2), use_running_average=ura)
    s3 = L.relu(pre3)
    emb = jnp.mean(s3, axis=1)
    logits = self.fc(emb).astype("float32")
    feats = {"stem": stem, "stage1": s1, "stage2": s2, "stage3": s3, "preact_stage1": pre1,
             "preact_stage2": pre2, "preact_stage3": pre3, "pre_pool": s3, "embedding": emb}
    return logits, feats


@register("cnn1d_mnist1d")
def cnn1d_mnist1d(*, num_classes, rngs, width: int = 32, in_channels: int = 1, dtype=None):
  """The MNIST-1D teacher: 4-layer BN 1-D CNN (22,698 parameters at width 32, 10 classes)."""
  return Mnist1DCNN(num_classes=num_classes, width=width, in_channels=in_channels, dtype=dtype,
                    rngs=rngs)


@register("cnn1d_mnist1d_narrow")
def cnn1d_mnist1d_narrow(*, num_classes, rngs, width: int = 3, in_channels: int = 1,
                         dtype=None):
  """The teacher's architecture at width 3: a narrow MNIST-1D student (310 parameters)."""
  return Mnist1DCNN(num_classes=num_classes, width=width, in_channels=in_channels, dtype=dtype,
                    rngs=rngs)


@register("mlp_mnist1d")
def mlp_mnist1d(*, num_classes, rngs, hidden: int = 100, in_features: int = MNIST1D_LENGTH,
                dtype=None):
  """The paper's MNIST-1D MLP, 40-100-100-10: flatten -> linear(in->h) ReLU [stem] ->
  linear(h->h) ReLU [stage1] -> linear(h->classes). Parameters: (in + 1) h + (h + 1) h +
  (h + 1) k; 15,210 with h = 100, 40 inputs and 10 classes."""
  return DigitsMLP(num_classes=num_classes, hidden=(hidden, hidden), in_features=in_features,
                   dtype=dtype, name="mlp_mnist1d", rngs=rngs)
