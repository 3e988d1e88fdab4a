"""MNIST-1D splits: the package's signals, sizes, stratification, determinism, no side effects."""

import os
import random
import socket

import numpy as np
import pytest

from kd_jax import data
from kd_jax.data import mnist1d


@pytest.fixture(scope="module")
def splits():
  return data.load_mnist1d(seed=0)


def _package_signals(num_samples, seed):
  """The package's own output, called directly: x [n, 40] float64, y [n]."""
  from mnist1d.data import get_dataset_args, make_dataset
  args = get_dataset_args()
  args.num_samples, args.seed = num_samples, seed
  d = make_dataset(args)
  return np.concatenate([d["x"], d["x_test"]]), np.concatenate([d["y"], d["y_test"]])


def _parts(s):
  return (s.train, s.val, s.test)


def _raw(split, s):
  """Undoes the train-statistics normalisation: [n, 40] float64."""
  return split["image"][..., 0].astype(np.float64) * float(s.std[0]) + float(s.mean[0])


def test_shapes_dtypes_and_sizes(splits):
  assert splits.num_classes == 10
  for split, n in zip(_parts(splits), (4000, 500, 500)):
    assert set(split) == {"image", "label"}
    assert split["image"].shape == (n, 40, 1) and split["image"].dtype == np.float32
    assert split["label"].shape == (n,) and split["label"].dtype == np.int32
  assert splits.mean.shape == (1,) and splits.std.shape == (1,)


def test_splits_are_the_package_signals_disjoint_and_complete(splits):
  """Every example is one of the package's 5000 signals with its label, each used once."""
  x_ref, y_ref = _package_signals(5000, 0)
  ours = np.concatenate([_raw(p, splits) for p in _parts(splits)])
  labels = np.concatenate([p["label"] for p in _parts(splits)])
  ref_sq = (x_ref ** 2).sum(1)
  match = []
  for chunk in np.array_split(np.arange(ours.shape[0]), 10):
    d2 = (ours[chunk] ** 2).sum(1)[:, None] + ref_sq[None] - 2 * ours[chunk] @ x_ref.T
    nearest = d2.argmin(1)
    np.testing.assert_allclose(ours[chunk], x_ref[nearest], atol=1e-4)
    match.append(nearest)
  match = np.concatenate(match)
  assert np.unique(match).shape[0] == 5000  # disjoint splits covering the whole set
  np.testing.assert_array_equal(labels, y_ref[match])


def test_class_balance(splits):
  # The package makes 500 signals of each class; the split is stratified: 80 / 10 / 10 %.
  for split, per_class in zip(_parts(splits), (400, 50, 50)):
    np.testing.assert_array_equal(np.bincount(split["label"], minlength=10), [per_class] * 10)


def test_train_normalised_with_its_own_statistics(splits):
  x = splits.train["image"].astype(np.float64)
  np.testing.assert_allclose(x.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(x.std(), 1.0, atol=1e-5)
  # The package standardised the whole set, so the training part's statistics are near (0, 1).
  x_ref, _ = _package_signals(5000, 0)
  np.testing.assert_allclose([x_ref.mean(), x_ref.std()], [0.0, 1.0], atol=1e-9)
  assert abs(float(splits.mean[0])) < 0.05 and abs(float(splits.std[0]) - 1.0) < 0.05
  # Val/test use the train statistics, not their own.
  assert abs(float(splits.test["image"].mean())) > 1e-4


def test_deterministic_in_seed(splits):
  again = data.load_mnist1d(seed=0)
  for a, b in zip(_parts(splits), _parts(again)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_different_seeds_give_different_signals():
  a = mnist1d.generate_mnist1d(num_samples=200, seed=0)[0]
  b = mnist1d.generate_mnist1d(num_samples=200, seed=1)[0]
  assert a.shape == b.shape == (200, 40)
  assert not np.allclose(np.sort(a.ravel()), np.sort(b.ravel()), atol=1e-3)


def test_split_seed_changes_the_split_not_the_signals():
  a = data.load_mnist1d(num_samples=200, split_seed=0)
  b = data.load_mnist1d(num_samples=200, split_seed=1)
  assert [p["label"].shape[0] for p in _parts(a)] == [160, 20, 20]
  assert not np.allclose(_raw(a.test, a), _raw(b.test, b), atol=1e-3)
  pool_a = np.sort(np.concatenate([_raw(p, a) for p in _parts(a)]).ravel())
  pool_b = np.sort(np.concatenate([_raw(p, b) for p in _parts(b)]).ravel())
  np.testing.assert_allclose(pool_a, pool_b, atol=1e-4)


def test_writes_nothing_needs_no_network_and_keeps_global_rngs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)

  def no_network(*args, **kwargs):
    raise AssertionError("load_mnist1d opened a socket")

  monkeypatch.setattr(socket, "socket", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  np.random.seed(123)
  random.seed(123)
  expected = (np.random.rand(), random.random())
  np.random.seed(123)
  random.seed(123)
  s = data.load_mnist1d(num_samples=100, val_fraction=0.2, test_fraction=0.2)
  assert (np.random.rand(), random.random()) == expected
  assert [p["label"].shape[0] for p in _parts(s)] == [60, 20, 20]
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("num_samples", [0, 5, 105, 2.5, True])
def test_bad_num_samples(num_samples):
  with pytest.raises(ValueError, match="multiple of 10"):
    data.load_mnist1d(num_samples=num_samples)


@pytest.mark.parametrize("val,test", [(0.5, 0.5), (-0.1, 0.1), (0.1, 1.0)])
def test_bad_fractions(val, test):
  with pytest.raises(ValueError, match="fraction"):
    data.load_mnist1d(val_fraction=val, test_fraction=test)


def test_transfer_set_is_unlabelled_and_normalised_with_the_train_statistics():
  from kd_jax.data import load_mnist1d, mnist1d_transfer_set  # pylint: disable=g-import-not-at-top
  splits = load_mnist1d(num_samples=200, seed=0)
  extra = mnist1d_transfer_set(splits, num_samples=100, seed=1)
  assert extra["image"].shape == (100, 40, 1) and not extra["labeled"].any()
  # Other signals than the labelled set's, on the same scale (train-split statistics).
  assert not np.allclose(extra["image"][:10], splits.train["image"][:10])
  assert abs(float(extra["image"].mean())) < 0.3 and 0.7 < float(extra["image"].std()) < 1.3
