"""text_transformer: output contract, padding invariance, masked mean pool by hand, train mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax import models
from kd_jax.models import text  # noqa: F401  (registers the name)


def _model(**kw):
  opts = dict(vocab_size=40, max_len=12, width=16, depth=2, num_heads=2, dropout_rate=0.5)
  opts.update(kw)
  return models.create("text_transformer", num_classes=3, rngs=nnx.Rngs(0), **opts)


def test_contract_and_pool_by_hand():
  m = _model()
  tokens = jnp.array([[1, 5, 6, 2, 0, 0, 0, 0], [1, 7, 8, 9, 10, 11, 12, 2]], jnp.int32)
  logits, f = m(tokens, train=False)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  assert set(f) == {"stem", "stage1", "stage2", "pre_pool", "embedding"}
  assert f["stage2"].shape == (2, 8, 16) and f["embedding"].shape == (2, 16)
  # Embedding = mean of pre_pool over the non-padding tokens (numpy, float64).
  pre = np.asarray(f["pre_pool"], np.float64)
  keep = np.asarray(tokens) != 0
  expected = (pre * keep[..., None]).sum(1) / keep.sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(f["embedding"]), expected, rtol=1e-5, atol=1e-6)
  w = np.asarray(m.head.kernel[...], np.float64)
  b = np.asarray(m.head.bias[...], np.float64)
  np.testing.assert_allclose(np.asarray(logits), expected @ w + b, rtol=1e-4, atol=1e-5)


def test_padding_does_not_change_the_prediction():
  m = _model()
  short = jnp.array([[1, 5, 6, 2]], jnp.int32)
  padded = jnp.array([[1, 5, 6, 2, 0, 0, 0, 0, 0]], jnp.int32)
  np.testing.assert_allclose(m(short, train=False)[0], m(padded, train=False)[0], atol=1e-5)


def test_dropout_only_in_train_mode_and_jit_split_merge():
  m = _model()
  tokens = jnp.array([[1, 5, 6, 7, 8, 2]], jnp.int32)
  e1 = m(tokens, train=False)[0]
  e2 = m(tokens, train=False)[0]
  np.testing.assert_array_equal(e1, e2)
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  @jax.jit
  def fwd(params, rest, x):
    return nnx.merge(graphdef, params, rest)(x, train=True)[0]

  t1 = fwd(params, rest, tokens)
  assert not np.allclose(t1, e1)
  assert np.all(np.isfinite(np.asarray(t1)))


def test_bad_input_and_options():
  m = _model()
  with pytest.raises(ValueError, match="length <= 12"):
    m(jnp.ones((1, 13), jnp.int32), train=False)
  with pytest.raises(ValueError, match="divisible by num_heads"):
    _model(width=10, num_heads=4)
  with pytest.raises(ValueError, match="does not take option"):
    _model(colour="red")
