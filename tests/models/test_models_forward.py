"""Output shapes and feature names of every model family (shape-only forward with eval_shape).

The expected shapes are RepDistiller's feature maps for a [2, 3, 32, 32] input, transposed to
NHWC; numerical agreement with PyTorch is tested in test_torch_convert.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax import models
from kd_jax.models import wrn

from models_testlib import abstract_model


def _cifar(stem, stages, emb):
  shapes = {"stem": stem, "embedding": (emb,)}
  for k, s in enumerate(stages, start=1):
    shapes[f"stage{k}"] = s
  shapes["pre_pool"] = stages[-1]
  return shapes


def _with_preact(shapes):
  out = dict(shapes)
  out.update({f"pre{k.replace('stage', 'act_stage')}": v for k, v in shapes.items()
              if k.startswith("stage")})
  return out


EXPECTED = {
    "resnet8": _with_preact(_cifar((32, 32, 16), [(32, 32, 16), (16, 16, 32), (8, 8, 64)], 64)),
    "resnet110": _with_preact(_cifar((32, 32, 16), [(32, 32, 16), (16, 16, 32), (8, 8, 64)], 64)),
    "resnet32x4": _with_preact(
        _cifar((32, 32, 32), [(32, 32, 64), (16, 16, 128), (8, 8, 256)], 256)),
    "wrn_16_2": _with_preact(_cifar((32, 32, 16), [(32, 32, 32), (16, 16, 64), (8, 8, 128)], 128)),
    "wrn_40_1": _with_preact(_cifar((32, 32, 16), [(32, 32, 16), (16, 16, 32), (8, 8, 64)], 64)),
    "vgg8": _with_preact(
        _cifar((32, 32, 64), [(16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)], 512)),
    "vgg13": _with_preact(
        _cifar((32, 32, 64), [(16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)], 512)),
    "MobileNetV2": _cifar((16, 16, 16), [(16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160)], 1280),
    "ShuffleV1": _with_preact(
        _cifar((32, 32, 24), [(16, 16, 240), (8, 8, 480), (4, 4, 960)], 960)),
    "ShuffleV2": _with_preact(
        _cifar((32, 32, 24), [(16, 16, 116), (8, 8, 232), (4, 4, 464)], 1024)),
    "ResNet50": _with_preact(_cifar(
        (32, 32, 64), [(32, 32, 256), (16, 16, 512), (8, 8, 1024), (4, 4, 2048)], 2048)),
}


# Train and eval mode for every family; the deepest models (tracing cost) in eval mode only.
_CASES = [(n, t) for n in sorted(EXPECTED) for t in (True, False)
          if not (t and n in ("resnet110", "ResNet50"))]


@pytest.mark.parametrize("name,train", _CASES)
def test_output_shapes_and_feature_names(name, train):
  model = abstract_model(name)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  logits, feats = nnx.eval_shape(lambda m, x: m(x, train=train), model, x)
  assert logits.shape == (2, 100) and logits.dtype == jnp.float32
  assert {k: v.shape[1:] for k, v in feats.items()} == EXPECTED[name]
  assert all(v.shape[0] == 2 and v.dtype == jnp.float32 for v in feats.values())


@pytest.mark.parametrize("name", ["resnet8", "MobileNetV2"])
def test_bfloat16_compute_option(name):
  model = nnx.eval_shape(lambda: models.create(name, num_classes=10, dtype=jnp.bfloat16))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  logits, feats = nnx.eval_shape(lambda m, x: m(x, train=True), model, x)
  assert logits.dtype == jnp.float32
  assert feats["pre_pool"].dtype == jnp.bfloat16


def test_wrn_dropout_option_reaches_every_block():
  model = nnx.eval_shape(lambda: models.create("wrn_16_1", num_classes=10, dropout_rate=0.3))
  blocks = [b for stage in (model.block1, model.block2, model.block3) for b in stage.layer]
  assert len(blocks) == 6 and all(b.dropout.rate == 0.3 for b in blocks)
  default = abstract_model("wrn_16_1")
  assert all(b.dropout is None for b in default.block1.layer)  # RepDistiller default: 0.0


def test_wide_block_dropout_only_in_train_mode():
  """A WRN block with dropout equals the dropout-free block in eval mode and differs in train."""
  with_dropout = wrn.WideBlock(8, 8, 1, 0.5, dtype=None, rngs=nnx.Rngs(0))
  plain = wrn.WideBlock(8, 8, 1, 0.0, dtype=None, rngs=nnx.Rngs(1))
  nnx.update(plain, nnx.state(with_dropout, (nnx.Param, nnx.BatchStat)))
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  fwd = nnx.jit(lambda m, x, train: m(x, train)[0], static_argnums=2)
  np.testing.assert_array_equal(fwd(with_dropout, x, False), fwd(with_dropout, x, False))
  np.testing.assert_allclose(fwd(with_dropout, x, False), fwd(plain, x, False), rtol=1e-6)
  # Train mode does not read the running statistics, so the dropout-free block repeats itself;
  # with dropout the RNG stream advances and the outputs differ.
  np.testing.assert_allclose(fwd(plain, x, True), fwd(plain, x, True), rtol=1e-6)
  assert not np.allclose(fwd(with_dropout, x, True), fwd(with_dropout, x, True), atol=1e-3)


def test_wrn_rejects_bad_dropout_rate():
  with pytest.raises(ValueError, match="dropout_rate"):
    models.create("wrn_16_1", num_classes=10, dropout_rate=1.0)
