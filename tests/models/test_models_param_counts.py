"""Every zoo model has exactly the trainable parameters of RepDistiller's PyTorch model.

Models are built with `nnx.eval_shape` (no arrays computed), so the whole zoo is checked fast.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from kd_jax import models
from kd_jax.models import torch_convert

from models_testlib import abstract_model

# PyTorch `sum(p.numel() for p in model.parameters())` at num_classes=100 (BN running statistics
# excluded), for HobbitLong/RepDistiller models/*.py (`model_dict` names). Measured with torch
# 2.13 on two independent PyTorch restatements of those files: tests/fixtures/models/
# torch_reference.py (all 22) and benchmarks/torch_models.py (resnet*, wrn_*), which agree.
# Rounded, they are the sizes quoted in the KD literature (e.g. resnet32x4 7.43M, resnet8x4
# 1.23M, wrn_40_2 2.26M, vgg13 9.46M, vgg8 3.96M, MobileNetV2 0.81M, ShuffleV1 0.95M,
# ShuffleV2 1.36M, ResNet50 23.71M).
REFERENCE_PARAMS = {
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
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "ResNet50": 23_705_252,
}
# Hand counts for the digits models (10 classes):
#   cnn_digits: conv 1*8*9 + BN 2*8 + conv 8*16*9 + BN 2*16 + conv 16*32*9 + BN 2*32 + fc 32*10+10
#   mlp_digits: 64*64+64 + 64*32+32 + 32*10+10
DIGITS_PARAMS = {
    "cnn_digits": 72 + 16 + 1152 + 32 + 4608 + 64 + 330,
    "mlp_digits": 4160 + 2080 + 330,
}


def _count(model, kind):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, kind)))


# Models outside the CIFAR zoo, counted by their own tests (tests/train/test_refilled_pipeline.py,
# tests/models/test_text_model.py, tests/models/test_mnist1d_models.py).
OTHER_MODELS = {"mobilenet_v1", "text_transformer", "cnn1d_mnist1d", "cnn1d_mnist1d_narrow",
                "mlp_mnist1d"}


def test_zoo_is_complete():
  assert set(models.available()) == set(REFERENCE_PARAMS) | set(DIGITS_PARAMS) | OTHER_MODELS


def test_reference_table_matches_fixture(torch_keys):
  # The hard-coded numbers above and the fixture generated from PyTorch must agree.
  assert {k: v["params"] for k, v in torch_keys.items()} == REFERENCE_PARAMS


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_param_count_equals_pytorch(name, torch_keys):
  model = abstract_model(name)
  assert _count(model, nnx.Param) == REFERENCE_PARAMS[name]
  # BN running statistics exist and are not parameters: as many as PyTorch's running buffers.
  buffers = sum(int(np.prod(s)) for k, s in torch_keys[name]["state_dict"].items()
                if k.endswith(("running_mean", "running_var")))
  assert _count(model, nnx.BatchStat) == buffers


@pytest.mark.parametrize("name", sorted(DIGITS_PARAMS))
def test_digits_param_counts(name):
  model = nnx.eval_shape(lambda: models.create(name, num_classes=10))
  assert _count(model, nnx.Param) == DIGITS_PARAMS[name]


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_every_pytorch_key_converts(name, torch_keys):
  """Every RepDistiller state_dict key maps onto a variable of the right shape, and none is left."""
  sd = {k: np.zeros(s, np.float32) for k, s in torch_keys[name]["state_dict"].items()}
  model = nnx.clone(abstract_model(name))
  torch_convert.load_torch_state_dict(model, name, sd)
  leaves = jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat)))
  assert all(isinstance(x, jax.Array) for x in leaves)  # nothing still abstract
