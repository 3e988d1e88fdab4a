"""Teacher-output cache: stored outputs equal fresh ones, aligned with example indices."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import data
from kd_jax.data import teacher_cache

N, D, C = 37, 6, 5


def _dataset(seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(N, D)).astype(np.float32),
          "label": rng.integers(0, C, size=N).astype(np.int32)}


_W = np.random.default_rng(1).normal(size=(D, C)).astype(np.float32)
_V = np.random.default_rng(2).normal(size=(D, 3)).astype(np.float32)


@jax.jit
def _teacher(x):
  return jnp.tanh(x) @ _W


def _teacher_np(x):
  # The same teacher written independently in float64 numpy.
  return np.tanh(x.astype(np.float64)) @ _W.astype(np.float64)


@pytest.mark.parametrize("backend", ["array_record", "npy"])
def test_cached_outputs_equal_fresh_outputs(tmp_path, backend):
  arrays = _dataset()
  cache = teacher_cache.build(lambda b: _teacher(b["image"]), arrays, batch_size=8,
                              path=tmp_path / "c", backend=backend)
  assert len(cache) == N and cache.backend == backend
  fresh = _teacher_np(arrays["image"])
  stored = cache.to_arrays()["logits"]
  assert stored.shape == (N, C) and stored.dtype == np.float32
  np.testing.assert_allclose(stored, fresh, rtol=1e-5, atol=1e-5)
  # Random access by index, also after reopening from disk.
  reopened = teacher_cache.load(tmp_path / "c")
  idx = [36, 0, 17, 17]
  np.testing.assert_allclose(reopened.get(idx)["logits"], fresh[idx], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(reopened[5]["logits"], fresh[5], rtol=1e-5, atol=1e-5)
  with pytest.raises(IndexError, match="37 examples"):
    reopened.get([37])


def test_batches_carry_the_teacher_logits_of_their_examples(tmp_path):
  arrays = _dataset()
  cache = teacher_cache.build(lambda b: _teacher(b["image"]), arrays, batch_size=16,
                              path=tmp_path / "c")
  with_teacher = teacher_cache.attach(arrays, cache)
  assert set(with_teacher) == {"image", "label", "teacher_logits"}
  for b in itertools.islice(data.batches(with_teacher, batch_size=8, seed=4), 9):
    np.testing.assert_allclose(b["teacher_logits"], _teacher_np(b["image"]),
                               rtol=1e-5, atol=1e-5)


def test_dict_outputs_are_stored_per_name(tmp_path):
  arrays = _dataset()

  def teacher(b):
    x = b["image"]
    return {"logits": _teacher(x), "embedding": (x @ _V).astype(np.float16)}

  cache = teacher_cache.build(teacher, arrays, batch_size=10, path=tmp_path / "c")
  out = teacher_cache.attach(arrays, tmp_path / "c")
  assert out["teacher_embedding"].dtype == np.float16
  np.testing.assert_allclose(out["teacher_embedding"],
                             (arrays["image"].astype(np.float64) @ _V).astype(np.float16),
                             rtol=1e-2, atol=1e-2)
  np.testing.assert_allclose(out["teacher_logits"], _teacher_np(arrays["image"]),
                             rtol=1e-5, atol=1e-5)
  assert cache.specs["embedding"] == ((3,), np.dtype(np.float16))


def test_errors(tmp_path):
  arrays = _dataset()
  teacher_cache.build(lambda b: _teacher(b["image"]), arrays, batch_size=8, path=tmp_path / "c")
  with pytest.raises(ValueError, match="already exists"):
    teacher_cache.build(lambda b: _teacher(b["image"]), arrays, batch_size=8,
                        path=tmp_path / "c")
  with pytest.raises(ValueError, match="fingerprint mismatch"):
    teacher_cache.attach(_dataset(seed=9), tmp_path / "c")
  with pytest.raises(ValueError, match="holds 37 examples but the dataset has 5"):
    teacher_cache.attach({k: v[:5] for k, v in arrays.items()}, tmp_path / "c")
  with pytest.raises(FileNotFoundError, match="no teacher cache"):
    teacher_cache.load(tmp_path / "missing")

  def nan_teacher(b):
    out = np.array(_teacher(b["image"]))
    out[1, 2] = np.nan
    return out

  with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) for examples \[1\]"):
    teacher_cache.build(nan_teacher, arrays, batch_size=8, path=tmp_path / "nan")
  with pytest.raises(ValueError, match="leading axis"):
    teacher_cache.build(lambda b: np.zeros((3, C)), arrays, batch_size=8, path=tmp_path / "x")
