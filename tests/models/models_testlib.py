"""Helpers shared by the model tests (a uniquely named module, importable from any test file)."""

import functools
import os

from flax import nnx

from kd_jax import models

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures",
                        "models")


@functools.lru_cache(maxsize=None)
def abstract_model(name: str, num_classes: int = 100):
  """`create(name)` traced with `nnx.eval_shape`: shapes and dtypes only, nothing computed."""
  return nnx.eval_shape(lambda: models.create(name, num_classes=num_classes))
