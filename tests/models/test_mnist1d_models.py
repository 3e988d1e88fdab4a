"""The MNIST-1D models: shapes, named features, hand-counted parameters, 1-D conv arithmetic,
and that a few SGD steps of the library's step fit a fixed batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax import compile_options
from kd_jax import models
from kd_jax.data import mnist1d as data_mnist1d
from kd_jax.models import mnist1d
from kd_jax.train import TrainState
from kd_jax.train import make_train_step
from kd_jax.train import sgd

CNNS = ("cnn1d_mnist1d", "cnn1d_mnist1d_narrow")


@nnx.jit(static_argnums=2)
def _fwd(model, x, train):
  return model(x, train=train)


def _count(model, kind):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, kind)))


def _signals(b, key=0):
  return jax.random.normal(jax.random.key(key), (b, 40, 1))


def test_registered():
  assert {"cnn1d_mnist1d", "cnn1d_mnist1d_narrow", "mlp_mnist1d"} <= set(models.available())


@pytest.mark.parametrize("name,c", [("cnn1d_mnist1d", 32), ("cnn1d_mnist1d_narrow", 3)])
def test_cnn_outputs(name, c):
  model = models.create(name, num_classes=7)
  x = _signals(3)
  for train in (True, False):
    logits, feats = _fwd(model, x, train)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    shapes = {k: v.shape for k, v in feats.items()}
    # Lengths: 40 (k5, pad 2) -> 20 -> 10 (k3, stride 2, pad 1) -> 10 (k3, pad 1).
    assert shapes == {
        "stem": (3, 40, c), "stage1": (3, 20, c), "stage2": (3, 10, 2 * c),
        "stage3": (3, 10, 2 * c), "preact_stage1": (3, 20, c), "preact_stage2": (3, 10, 2 * c),
        "preact_stage3": (3, 10, 2 * c), "pre_pool": (3, 10, 2 * c), "embedding": (3, 2 * c)}
    np.testing.assert_array_equal(feats["pre_pool"], feats["stage3"])
    np.testing.assert_allclose(feats["embedding"], np.asarray(feats["pre_pool"]).mean(axis=1),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        logits, np.asarray(feats["embedding"]) @ np.asarray(model.fc.kernel[...])
        + np.asarray(model.fc.bias[...]), rtol=1e-5, atol=1e-5)
    for k in ("stage1", "stage2", "stage3"):
      np.testing.assert_allclose(np.maximum(np.asarray(feats["preact_" + k]), 0), feats[k])


def test_cnn_accepts_signals_without_channel_axis():
  model = models.create("cnn1d_mnist1d", num_classes=10)
  x = _signals(2)
  np.testing.assert_allclose(_fwd(model, x[..., 0], False)[0], _fwd(model, x, False)[0],
                             rtol=1e-6, atol=1e-6)


def test_mlp_outputs():
  model = models.create("mlp_mnist1d", num_classes=10)
  logits, feats = _fwd(model, _signals(3), True)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert {k: v.shape for k, v in feats.items()} == {
      "stem": (3, 100), "stage1": (3, 100), "preact_stage1": (3, 100), "pre_pool": (3, 100),
      "embedding": (3, 100)}
  np.testing.assert_array_equal(feats["pre_pool"], feats["embedding"])
  np.testing.assert_allclose(
      logits, np.asarray(feats["embedding"]) @ np.asarray(model.fc3.kernel[...])
      + np.asarray(model.fc3.bias[...]), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="40 input values"):
    model(jnp.zeros((2, 30, 1)), train=False)


# Hand counts from the layer sizes (10 classes; convolutions have no bias, BN has scale + bias):
#   cnn1d_mnist1d (c = 32): conv 1*32*5 + BN 2*32 + conv 32*32*3 + BN 2*32 + conv 32*64*3
#                           + BN 2*64 + conv 64*64*3 + BN 2*64 + fc 64*10 + 10
#   cnn1d_mnist1d_narrow (c = 3): conv 1*3*5 + BN 6 + conv 3*3*3 + BN 6 + conv 3*6*3 + BN 12
#                                 + conv 6*6*3 + BN 12 + fc 6*10 + 10
#   mlp_mnist1d (h = 100): 40*100 + 100 + 100*100 + 100 + 100*10 + 10
PARAMS = {
    "cnn1d_mnist1d": 160 + 64 + 3072 + 64 + 6144 + 128 + 12288 + 128 + 650,
    "cnn1d_mnist1d_narrow": 15 + 6 + 27 + 6 + 54 + 12 + 108 + 12 + 70,
    "mlp_mnist1d": 4100 + 10100 + 1010,
}
# BN running mean + variance per channel: 2 * (c + c + 2c + 2c).
BATCH_STATS = {"cnn1d_mnist1d": 2 * 192, "cnn1d_mnist1d_narrow": 2 * 18, "mlp_mnist1d": 0}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_param_counts(name):
  model = nnx.eval_shape(lambda: models.create(name, num_classes=10))
  assert _count(model, nnx.Param) == PARAMS[name]
  assert _count(model, nnx.BatchStat) == BATCH_STATS[name]


def test_width_and_hidden_options():
  wide = nnx.eval_shape(lambda: models.create("cnn1d_mnist1d", num_classes=10, width=8))
  # 21 c^2 + (5 + 12 + 20) c + 10 at c = 8.
  assert _count(wide, nnx.Param) == 21 * 64 + 37 * 8 + 10
  mlp = nnx.eval_shape(lambda: models.create("mlp_mnist1d", num_classes=10, hidden=16))
  assert _count(mlp, nnx.Param) == 41 * 16 + 17 * 16 + 17 * 10


@pytest.mark.parametrize("stride,padding,kernel", [(1, 2, 5), (2, 1, 3), (3, 0, 4)])
def test_conv1d_is_torch_conv1d(stride, padding, kernel):
  """y[b, i, o] = sum_{t, c} xpad[b, s i + t, c] w[t, c, o], xpad zero-padded by p each side."""
  conv = mnist1d.conv1d(3, 5, kernel, stride, padding, rngs=nnx.Rngs(0))
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 11, 3)), np.float64)
  w = np.asarray(conv.kernel[...], np.float64)
  assert w.shape == (kernel, 3, 5)
  xpad = np.pad(x, ((0, 0), (padding, padding), (0, 0)))
  n_out = (11 + 2 * padding - kernel) // stride + 1
  ref = np.stack([np.einsum("btc,tco->bo", xpad[:, stride * i:stride * i + kernel], w)
                  for i in range(n_out)], axis=1)
  np.testing.assert_allclose(conv(jnp.asarray(x, jnp.float32)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
  model = models.create(name, num_classes=10, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logits, feats = _fwd(model, _signals(2), False)
  assert logits.dtype == jnp.float32 and feats["embedding"].dtype == jnp.bfloat16


# Loss after 30 SGD steps over the loss before, at most: the narrow CNN (310 parameters) fits
# 40 signals much more slowly than the others (measured: 0.07, 0.02 and 0.81).
FIT_RATIO = {"cnn1d_mnist1d": 0.5, "mlp_mnist1d": 0.5, "cnn1d_mnist1d_narrow": 0.9}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_sgd_steps_reduce_the_loss_on_a_fixed_batch(name):
  x, y = data_mnist1d.generate_mnist1d(num_samples=40, seed=3)
  batch = {"image": x[..., None], "label": y}
  model = models.create(name, num_classes=10, rngs=nnx.Rngs(0))
  state = TrainState.create(model, sgd(0.1, momentum=0.9), rng=jax.random.key(0))
  step = compile_options.jit(make_train_step("ce:1", axis_name=None))
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  # Cross-entropy at initialisation is near log(10) = 2.30.
  assert 1.5 < losses[0] < 4.0
  assert losses[-1] < FIT_RATIO[name] * losses[0], losses
