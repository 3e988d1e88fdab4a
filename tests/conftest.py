"""Test-suite set-up: 8 simulated CPU devices, so multi-device code runs on every test run.

The flag must be set before JAX touches a device; pytest imports this file before any test module.
A persistent compilation cache in a per-run temporary folder lets the subprocess tests (the main
job, the notebooks) reuse programs the in-process tests already compiled.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="kd_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import contextlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def tfds_mock_data(monkeypatch):
  """`enter(num_examples)`: TFDS mock data for the rest of the test (no TensorFlow, no network).

  Examples are generated from each builder's feature spec (`MockPolicy.USE_CODE`). tfds 4.9.10's
  mock sets `__getitems__` on its MagicMock reader as a plain attribute, so batched reads fail
  with a missing-argument TypeError (real array_record readers support them); batches are read
  key by key through the working mocked `__getitem__` instead.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.data_sources import array_record  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(array_record.ArrayRecordDataSource, "__getitems__",
                      lambda self, keys: [self[k] for k in keys], raising=False)
  with contextlib.ExitStack() as stack:
    yield lambda num_examples: stack.enter_context(tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE))
