"""The offline digits splits: sizes, stratification, disjointness, statistics, determinism."""

import numpy as np
import pytest
from sklearn import datasets

from kd_jax import data


@pytest.fixture(scope="module")
def splits():
  return data.load_digits(seed=0)


def _raw_keys(split, mean, std):
  """Undoes the normalisation and returns each image as bytes of its 0..16 pixel counts."""
  raw = np.rint((split["image"].astype(np.float64) * std + mean) * 16.0).astype(np.int64)
  return [r.tobytes() + bytes([l]) for r, l in zip(raw, split["label"])]


def test_shapes_dtypes_and_sizes(splits):
  assert splits.num_classes == 10
  sizes = []
  for split in (splits.train, splits.val, splits.test):
    assert set(split) == {"image", "label"}
    assert split["image"].dtype == np.float32 and split["label"].dtype == np.int32
    assert split["image"].shape[1:] == (8, 8, 1)
    assert split["image"].shape[0] == split["label"].shape[0]
    sizes.append(split["label"].shape[0])
  assert sum(sizes) == 1797
  assert sizes[1] == round(0.1 * 1797) and sizes[2] == round(0.2 * 1797)


def test_train_normalised_with_its_own_statistics(splits):
  x = splits.train["image"].astype(np.float64)
  np.testing.assert_allclose(x.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(x.std(), 1.0, atol=1e-5)
  # Undoing the normalisation gives back integer pixel counts 0..16 (so mean/std are the ones
  # applied), and their statistics (computed here in float64) are the reported mean/std.
  counts = (x * splits.std + splits.mean) * 16.0
  np.testing.assert_allclose(counts, np.rint(counts), atol=1e-3)
  assert counts.min() > -1e-3 and counts.max() < 16 + 1e-3
  np.testing.assert_allclose(splits.mean, [np.rint(counts).mean() / 16], rtol=1e-5)
  np.testing.assert_allclose(splits.std, [(np.rint(counts) / 16).std()], rtol=1e-5)
  # Val/test use the train statistics, not their own: their means are not exactly 0.
  assert abs(float(splits.test["image"].mean())) > 1e-4


def test_splits_are_disjoint_and_cover_the_dataset(splits):
  raw = datasets.load_digits()
  everything = sorted(
      img.astype(np.int64).tobytes() + bytes([l])
      for img, l in zip(raw.images, raw.target))
  parts = [_raw_keys(s, splits.mean, splits.std) for s in (splits.train, splits.val, splits.test)]
  assert sorted(parts[0] + parts[1] + parts[2]) == everything


def test_stratified(splits):
  overall = np.bincount(datasets.load_digits().target, minlength=10) / 1797
  for split in (splits.train, splits.val, splits.test):
    frac = np.bincount(split["label"], minlength=10) / split["label"].shape[0]
    np.testing.assert_allclose(frac, overall, atol=0.01)


def test_seeded_and_reproducible(splits):
  again = data.load_digits(seed=0)
  other = data.load_digits(seed=1)
  np.testing.assert_array_equal(again.test["image"], splits.test["image"])
  np.testing.assert_array_equal(again.val["label"], splits.val["label"])
  assert not np.array_equal(other.test["image"], splits.test["image"])


def test_fraction_options_and_errors():
  s = data.load_digits(val_fraction=0.0, test_fraction=0.5)
  assert s.val["label"].shape == (0,) and s.test["label"].shape == (round(0.5 * 1797),)
  with pytest.raises(ValueError, match="val_fraction"):
    data.load_digits(val_fraction=-0.1)
  with pytest.raises(ValueError, match="leave a training split"):
    data.load_digits(val_fraction=0.5, test_fraction=0.5)
