"""The `kd_jax.models` contract: registry, call signature, feature dict, batch-norm modes, dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax import models


def _params(model):
  return nnx.state(model, nnx.Param)


@nnx.jit(static_argnums=2)
def _fwd(model, x, train):
  """One compiled forward per model and mode (eager mode would compile every op separately)."""
  return model(x, train=train)


def test_available_is_sorted_and_has_the_digits_models():
  names = models.available()
  assert names == sorted(names)
  assert {"cnn_digits", "mlp_digits"} <= set(names)


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError, match="unknown model name 'resnet9'.*cnn_digits.*mlp_digits"):
    models.create("resnet9", num_classes=10)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes(num_classes):
  with pytest.raises(ValueError, match="num_classes"):
    models.create("mlp_digits", num_classes=num_classes)


def test_unknown_option_is_named():
  with pytest.raises(ValueError, match="dropout_rate"):
    models.create("cnn_digits", num_classes=10, dropout_rate=0.3)


def test_default_rngs_is_rngs_zero():
  a = models.create("cnn_digits", num_classes=10)
  b = models.create("cnn_digits", num_classes=10, rngs=nnx.Rngs(0))
  c = models.create("cnn_digits", num_classes=10, rngs=nnx.Rngs(1))
  ka, kb, kc = (m.conv1.kernel[...] for m in (a, b, c))
  np.testing.assert_array_equal(ka, kb)
  assert not np.allclose(ka, kc)


@pytest.mark.parametrize("name,keys", [
    ("cnn_digits", {"stem", "stage1", "stage2", "preact_stage1", "preact_stage2", "pre_pool",
                    "embedding"}),
    ("mlp_digits", {"stem", "stage1", "preact_stage1", "pre_pool", "embedding"}),
])
def test_digits_outputs(name, keys):
  model = models.create(name, num_classes=7)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  for train in (True, False):
    logits, feats = _fwd(model, x, train)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert set(feats) == keys
    assert feats["embedding"].ndim == 2 and feats["embedding"].shape[0] == 3
    np.testing.assert_array_equal(feats["pre_pool"], feats[sorted(k for k in keys if k.startswith("stage"))[-1]])
    # The classifier reads the embedding: logits = embedding @ W + b.
    head = model.fc if name == "cnn_digits" else model.fc3
    np.testing.assert_allclose(
        logits, np.asarray(feats["embedding"]) @ np.asarray(head.kernel[...]) + np.asarray(head.bias[...]),
        rtol=1e-5, atol=1e-5)
    for k in keys:
      if k.startswith("preact_"):
        np.testing.assert_allclose(np.maximum(np.asarray(feats[k]), 0), feats[k[len("preact_"):]])


def test_cnn_digits_embedding_is_spatial_mean_of_last_stage():
  model = models.create("cnn_digits", num_classes=10)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  _, feats = _fwd(model, x, False)
  assert feats["stage2"].shape == (2, 4, 4, 32)
  np.testing.assert_allclose(feats["embedding"], np.asarray(feats["stage2"]).mean(axis=(1, 2)),
                             rtol=1e-6, atol=1e-6)


def test_batchnorm_train_uses_batch_stats_and_updates_running_averages():
  model = models.create("cnn_digits", num_classes=10)
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1)) * 3.0 + 1.0
  z = np.asarray(model.conv1(x), np.float64)  # conv1 output, the input of bn1
  _, feats = _fwd(model, x, True)
  mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
  expected_stem = np.maximum((z - mean) / np.sqrt(var + 1e-5), 0.0)  # scale 1, bias 0 at init
  np.testing.assert_allclose(feats["stem"], expected_stem, rtol=1e-4, atol=1e-4)
  # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch (running mean starts at 0, var
  # at 1), with the unbiased batch variance for the running variance (n = 4 * 8 * 8 per channel).
  n = 4 * 8 * 8
  np.testing.assert_allclose(model.bn1.mean[...], 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.bn1.var[...], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5,
                             atol=1e-6)


def test_batchnorm_eval_uses_running_averages_and_changes_nothing():
  model = models.create("cnn_digits", num_classes=10)
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
  _fwd(model, x, True)  # move the running averages away from (0, 1)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  z = np.asarray(model.conv1(x), np.float64)
  _, feats = _fwd(model, x, False)
  m, v = np.asarray(model.bn1.mean[...]), np.asarray(model.bn1.var[...])
  np.testing.assert_allclose(feats["stem"], np.maximum((z - m) / np.sqrt(v + 1e-5), 0.0),
                             rtol=1e-4, atol=1e-4)
  after = nnx.state(model, nnx.BatchStat)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  # Eval output of an example does not depend on the rest of the batch; train output does.
  full, _ = _fwd(model, x, False)
  one, _ = _fwd(model, x[:1], False)
  np.testing.assert_allclose(full[:1], one, rtol=1e-5, atol=1e-5)
  full_t, _ = _fwd(model, x, True)
  half_t, _ = _fwd(model, x[:2], True)
  assert not np.allclose(full_t[:2], half_t, atol=1e-4)


def test_functional_use_under_jit():
  model = models.create("cnn_digits", num_classes=10)
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  @jax.jit
  def step(params, stats, x):
    m = nnx.merge(graphdef, params, stats)
    logits, _ = m(x, train=True)
    return logits, nnx.state(m, nnx.BatchStat)

  x = jax.random.normal(jax.random.key(4), (4, 8, 8, 1))
  logits, new_stats = step(params, stats, x)
  eager, _ = _fwd(model, x, True)  # nnx.jit on the module itself
  np.testing.assert_allclose(logits, eager, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               new_stats, nnx.state(model, nnx.BatchStat))


@pytest.mark.parametrize("name", ["cnn_digits", "mlp_digits"])
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
  model = models.create(name, num_classes=10, dtype=jnp.bfloat16)
  ref = models.create(name, num_classes=10)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_params(model)))
  x = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
  logits, feats = _fwd(model, x, False)
  assert logits.dtype == jnp.float32
  assert feats["embedding"].dtype == jnp.bfloat16
  ref_logits, _ = _fwd(ref, x, False)
  np.testing.assert_allclose(logits, ref_logits, rtol=0.05, atol=0.05)


def test_mlp_rejects_wrong_input_size():
  model = models.create("mlp_digits", num_classes=10)
  with pytest.raises(ValueError, match="64 input values"):
    model(jnp.zeros((2, 4, 4, 1)), train=False)


def test_create_compiled_gives_the_parameters_of_create():
  eager = models.create("resnet8", num_classes=10, rngs=nnx.Rngs(3))
  compiled = models.create_compiled("resnet8", num_classes=10, seed=3)
  a, b = nnx.state(eager), nnx.state(compiled)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
