"""PyTorch -> kd_jax conversion reproduces RepDistiller models' outputs (golden fixture).

tests/fixtures/models/torch_golden.npz was written by make_torch_golden.py with torch: resnet8 and
wrn_16_1 (10 classes) with random weights and randomised batch-norm statistics, a fixed input and
PyTorch's eval- and train-mode outputs and updated running statistics.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax.models import torch_convert

from models_testlib import FIXTURES, abstract_model, synthetic_state_dict

NAMES = ["resnet8", "wrn_16_1"]


def _sd(golden, name, prefix="sd"):
  p = f"{name}/{prefix}/"
  return {k[len(p):]: v for k, v in golden.items() if k.startswith(p)}


def _nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@nnx.jit(static_argnums=2)
def _forward(model, x, train):
  return model(x, train=train)


@pytest.mark.parametrize("name", NAMES)
def test_eval_outputs_match_pytorch(name, torch_golden):
  model = torch_convert.model_from_torch_state_dict(name, _sd(torch_golden, name), num_classes=10)
  logits, feats = _forward(model, jnp.asarray(_nhwc(torch_golden[f"{name}/x"])), False)
  np.testing.assert_allclose(logits, torch_golden[f"{name}/logits_eval"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(feats["pre_pool"], _nhwc(torch_golden[f"{name}/pre_pool_eval"]),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(feats["embedding"], torch_golden[f"{name}/embedding_eval"],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(feats["preact_stage3"],
                             _nhwc(torch_golden[f"{name}/preact_last_eval"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_train_step_matches_pytorch_including_running_stats(name, torch_golden):
  model = torch_convert.model_from_torch_state_dict(name, _sd(torch_golden, name), num_classes=10)
  logits, _ = _forward(model, jnp.asarray(_nhwc(torch_golden[f"{name}/x"])), True)
  np.testing.assert_allclose(logits, torch_golden[f"{name}/logits_train"], rtol=1e-4, atol=1e-4)
  # PyTorch's running statistics after the same train-mode forward, converted the same way.
  after = dict(_sd(torch_golden, name))
  after.update(_sd(torch_golden, name, "running_mean_after_train"))
  after.update(_sd(torch_golden, name, "running_var_after_train"))
  expected = torch_convert.model_from_torch_state_dict(name, after, num_classes=10)
  ours, theirs = nnx.state(model, nnx.BatchStat), nnx.state(expected, nnx.BatchStat)
  for (path, a), (path_b, b) in zip(nnx.to_flat_state(ours), nnx.to_flat_state(theirs)):
    assert path == path_b
    np.testing.assert_allclose(a[...], b[...], rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_from_torch_state_dict_returns_a_mergeable_state(torch_golden):
  state = torch_convert.from_torch_state_dict("resnet8", _sd(torch_golden, "resnet8"),
                                              num_classes=10)
  graphdef, _ = nnx.split(abstract_model("resnet8", 10))
  model = nnx.merge(graphdef, state)
  logits, _ = _forward(model, jnp.asarray(_nhwc(torch_golden["resnet8/x"])), False)
  np.testing.assert_allclose(logits, torch_golden["resnet8/logits_eval"], rtol=1e-4, atol=1e-4)


def test_data_parallel_prefix_is_stripped(torch_golden):
  sd = {"module." + k: v for k, v in _sd(torch_golden, "resnet8").items()}
  state = torch_convert.from_torch_state_dict("resnet8", sd, num_classes=10)
  np.testing.assert_array_equal(state["fc"]["bias"][...], torch_golden["resnet8/sd/fc.bias"])
  np.testing.assert_array_equal(state["layer2"][0]["downsample"][0]["kernel"][...],
                                np.transpose(torch_golden["resnet8/sd/layer2.0.downsample.0.weight"],
                                             (2, 3, 1, 0)))


def test_shape_mismatch_names_key_and_both_shapes(torch_golden):
  with pytest.raises(ValueError, match=r"'fc.weight'.*\(10, 64\).*\(64, 10\).*\(64, 100\)"):
    torch_convert.from_torch_state_dict("resnet8", _sd(torch_golden, "resnet8"), num_classes=100)


def test_unknown_key_is_named(torch_golden):
  sd = dict(_sd(torch_golden, "resnet8"))
  sd["layer4.0.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
  with pytest.raises(ValueError, match="layer4.0.conv1.weight"):
    torch_convert.from_torch_state_dict("resnet8", sd, num_classes=10)


def test_bias_where_we_have_none_is_named(torch_golden):
  sd = dict(_sd(torch_golden, "resnet8"))
  sd["conv1.bias"] = np.zeros((16,), np.float32)
  with pytest.raises(ValueError, match="conv1.bias"):
    torch_convert.from_torch_state_dict("resnet8", sd, num_classes=10)


def test_missing_variables_are_listed(torch_golden):
  sd = dict(_sd(torch_golden, "resnet8"))
  del sd["layer1.0.bn2.running_var"], sd["fc.weight"]
  with pytest.raises(ValueError, match=r"lacks 2 model variable\(s\): fc.kernel, layer1.0.bn2.var"):
    torch_convert.from_torch_state_dict("resnet8", sd, num_classes=10)


def test_wrong_architecture_is_named(torch_golden):
  with pytest.raises(ValueError, match="block1"):
    torch_convert.from_torch_state_dict("resnet8", _sd(torch_golden, "wrn_16_1"), num_classes=10)


def test_unconvertible_model_name():
  with pytest.raises(ValueError, match="no PyTorch conversion for model 'cnn_digits'"):
    torch_convert.from_torch_state_dict("cnn_digits", {}, num_classes=10)


@pytest.mark.parametrize("key,expected", [
    ("block0.0.weight", "block0.0.conv.weight"),
    ("block0.1.running_var", "block0.0.bn.running_var"),
    ("block3.4.bias", "block3.1.bn.bias"),
    ("classifier.weight", "classifier.weight"),
])
def test_vgg_sequential_indices(key, expected):
  assert torch_convert._rename_vgg(key) == expected


@pytest.mark.parametrize("key,expected", [
    ("conv1.0.weight", "conv1.conv.weight"),
    ("conv2.1.running_mean", "conv2.bn.running_mean"),
    ("blocks.3.2.conv.3.weight", "blocks.3.2.conv.1.conv.weight"),
    ("blocks.6.0.conv.7.bias", "blocks.6.0.conv.2.bn.bias"),
    ("classifier.0.weight", "classifier.weight"),
])
def test_mobilenetv2_sequential_indices(key, expected):
  assert torch_convert._rename_mobilenetv2(key) == expected


def test_relu_position_cannot_hold_weights():
  with pytest.raises(ValueError, match="ReLU"):
    torch_convert._rename_vgg("block0.2.weight")


@pytest.fixture(scope="module")
def torch_synthetic():
  with np.load(os.path.join(FIXTURES, "torch_synthetic.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name", ["vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50"])
def test_other_families_match_pytorch(name, torch_keys, torch_synthetic):
  """Deterministic numpy weights -> PyTorch outputs (fixture) == converted kd_jax outputs."""
  shapes = torch_keys[name]["state_dict"]
  model = torch_convert.model_from_torch_state_dict(
      name, synthetic_state_dict(name, shapes), num_classes=100)
  logits, feats = _forward(model, jnp.asarray(_nhwc(torch_synthetic["x"])), False)
  for key, ours in (("logits", logits), ("embedding", feats["embedding"]),
                    ("pre_pool", feats["pre_pool"])):
    if f"{name}/{key}" not in torch_synthetic:
      continue
    theirs = torch_synthetic[f"{name}/{key}"]
    theirs = _nhwc(theirs) if theirs.ndim == 4 else theirs
    scale = float(np.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * max(scale, 1.0), err_msg=key)
