"""Small models for the offline 8x8x1 digits dataset (scikit-learn `load_digits`).

Both follow the zoo's output contract, so the training system and the colab exercise the same
code paths as the CIFAR models: `cnn_digits` has batch norm (train/eval statistics) and
convolutional stage maps; `mlp_digits` is a plain two-hidden-layer perceptron.
"""

from __future__ import annotations

from flax import nnx

from kd_jax.models import _layers as L
from kd_jax.models._registry import register


class DigitsCNN(nnx.Module):
  """conv3x3(1->c) BN ReLU [stem] -> conv3x3(c->2c) BN ReLU [stage1, 8x8]
  -> conv3x3(2c->4c, stride 2) BN ReLU [stage2, 4x4] -> global average pool -> linear.

  With width c = 8 and 10 classes it has 6,274 parameters (BN statistics excluded).
  """

  def __init__(self, *, num_classes: int, width: int = 8, in_channels: int = 1, dtype=None,
               rngs: nnx.Rngs):
    self.dtype = dtype
    c = width
    self.conv1 = L.conv2d(in_channels, c, 3, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = L.batch_norm(c, dtype=dtype, rngs=rngs)
    self.conv2 = L.conv2d(c, 2 * c, 3, 1, 1, dtype=dtype, rngs=rngs)
    self.bn2 = L.batch_norm(2 * c, dtype=dtype, rngs=rngs)
    self.conv3 = L.conv2d(2 * c, 4 * c, 3, 2, 1, dtype=dtype, rngs=rngs)
    self.bn3 = L.batch_norm(4 * c, dtype=dtype, rngs=rngs)
    self.fc = L.linear(4 * c, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    ura = not train
    x = L.to_compute(x, self.dtype)
    stem = L.relu(self.bn1(self.conv1(x), use_running_average=ura))
    pre1 = self.bn2(self.conv2(stem), use_running_average=ura)
    s1 = L.relu(pre1)
    pre2 = self.bn3(self.conv3(s1), use_running_average=ura)
    s2 = L.relu(pre2)
    emb = L.global_avg_pool(s2)
    logits = self.fc(emb).astype("float32")
    feats = {"stem": stem, "stage1": s1, "stage2": s2, "preact_stage1": pre1,
             "preact_stage2": pre2, "pre_pool": s2, "embedding": emb}
    return logits, feats


class DigitsMLP(nnx.Module):
  """flatten -> linear(in->h1) ReLU [stem] -> linear(h1->h2) ReLU [stage1] -> linear(h2->classes).

  Also the MNIST-1D MLP (`mlp_mnist1d`, `kd_jax.models.mnist1d`).

  With (64, 32) hidden units, 64 inputs and 10 classes it has 6,570 parameters.
  """

  def __init__(self, *, num_classes: int, hidden: tuple[int, int] = (64, 32),
               in_features: int = 64, dtype=None, name: str = "mlp_digits", rngs: nnx.Rngs):
    self.dtype = dtype
    self.in_features = in_features
    self.name = name  # the registered name, for error messages
    self.fc1 = L.linear(in_features, hidden[0], dtype=dtype, rngs=rngs)
    self.fc2 = L.linear(hidden[0], hidden[1], dtype=dtype, rngs=rngs)
    self.fc3 = L.linear(hidden[1], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train: bool):
    del train  # no batch norm or dropout
    x = L.to_compute(x, self.dtype)
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] != self.in_features:
      raise ValueError(f"{self.name} expects {self.in_features} input values per example, "
                       f"got input of shape {x.shape}")
    pre0 = self.fc1(x)
    stem = L.relu(pre0)
    pre1 = self.fc2(stem)
    s1 = L.relu(pre1)
    logits = self.fc3(s1).astype("float32")
    feats = {"stem": stem, "stage1": s1, "preact_stage1": pre1, "pre_pool": s1, "embedding": s1}
    return logits, feats


@register("cnn_digits")
def cnn_digits(*, num_classes, rngs, width: int = 8, in_channels: int = 1, dtype=None):
  """Small BN CNN for 8x8 digits (6,274 parameters at width 8, 10 classes)."""
  return DigitsCNN(num_classes=num_classes, width=width, in_channels=in_channels, dtype=dtype,
                   rngs=rngs)


@register("mlp_digits")
def mlp_digits(*, num_classes, rngs, hidden=(64, 32), in_features: int = 64, dtype=None):
  """Two-hidden-layer MLP for 8x8 digits (6,570 parameters, 10 classes)."""
  return DigitsMLP(num_classes=num_classes, hidden=tuple(hidden), in_features=in_features,
                   dtype=dtype, rngs=rngs)
