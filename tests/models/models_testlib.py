"""Helpers shared by the model tests (a uniquely named module, importable from any test file)."""

import functools
import importlib.util
import os

from flax import nnx

from kd_jax import models

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures",
                        "models")


@functools.lru_cache(maxsize=None)
def abstract_model(name: str, num_classes: int = 100):
  """`create(name)` traced with `nnx.eval_shape`: shapes and dtypes only, nothing computed."""
  return nnx.eval_shape(lambda: models.create(name, num_classes=num_classes))



def _load_synthetic_weights():
  spec = importlib.util.spec_from_file_location(
      "kd_jax_test_synthetic_weights", os.path.join(FIXTURES, "synthetic_weights.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Numpy-only, shared with the torch-side fixture script in tests/fixtures/models.
synthetic_state_dict = _load_synthetic_weights().synthetic_state_dict
