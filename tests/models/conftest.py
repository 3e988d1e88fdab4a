"""Shared helpers for the model tests: abstract (shape-only) models, built once per process."""

import functools
import json
import os

import numpy as np
import pytest
from flax import nnx

from kd_jax import models

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "models")


@functools.lru_cache(maxsize=None)
def abstract_model(name: str, num_classes: int = 100):
  """`create(name)` traced with `nnx.eval_shape`: shapes and dtypes only, nothing computed."""
  return nnx.eval_shape(lambda: models.create(name, num_classes=num_classes))


@pytest.fixture(scope="session")
def torch_keys():
  """PyTorch parameter counts and state_dict key shapes (tests/fixtures/models/torch_keys.json)."""
  with open(os.path.join(FIXTURES, "torch_keys.json")) as f:
    return json.load(f)


@pytest.fixture(scope="session")
def torch_golden():
  """PyTorch resnet8 / wrn_16_1 weights, inputs and outputs (tests/fixtures/models)."""
  with np.load(os.path.join(FIXTURES, "torch_golden.npz")) as z:
    return {k: z[k] for k in z.files}
