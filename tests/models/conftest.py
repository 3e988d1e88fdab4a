"""Fixtures for the model tests: the PyTorch reference files in tests/fixtures/models."""

import json
import os

import numpy as np
import pytest

from models_testlib import FIXTURES


@pytest.fixture(scope="session")
def torch_keys():
  """PyTorch parameter counts and state_dict key shapes (torch_keys.json)."""
  with open(os.path.join(FIXTURES, "torch_keys.json")) as f:
    return json.load(f)


@pytest.fixture(scope="session")
def torch_golden():
  """PyTorch resnet8 / wrn_16_1 weights, inputs and outputs (torch_golden.npz)."""
  with np.load(os.path.join(FIXTURES, "torch_golden.npz")) as z:
    return {k: z[k] for k in z.files}
