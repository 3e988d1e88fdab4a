"""Tiny stand-in models shared by the training tests (fast to compile, no BatchNorm or dropout
unless asked)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ToyNet(nnx.Module):
  """x [b, 8, 8, 1] -> hidden (pre_pool [b, 4, 4, c]) -> embedding -> logits; `(logits, features)`."""

  def __init__(self, *, num_classes=10, width=8, batch_norm=False, dropout_rate=0.0, rngs):
    self.conv = nnx.Conv(1, width, (3, 3), strides=(2, 2), rngs=rngs)
    self.bn = nnx.BatchNorm(width, rngs=rngs) if batch_norm else None
    self.drop = nnx.Dropout(dropout_rate, rngs=rngs) if dropout_rate else None
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, x, *, train):
    h = self.conv(x)
    if self.bn is not None:
      h = self.bn(h, use_running_average=not train)
    h = jax.nn.relu(h)
    if self.drop is not None:
      h = self.drop(h, deterministic=not train)
    emb = jnp.mean(h, axis=(1, 2))
    return self.head(emb), {"pre_pool": h, "embedding": emb}


def toy_batch(n=32, seed=0, num_classes=10):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
          "label": rng.integers(0, num_classes, size=(n,)).astype(np.int32)}
