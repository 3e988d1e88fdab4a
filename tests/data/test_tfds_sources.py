"""TFDS data_source + Grain CIFAR pipelines, offline with `tfds.testing.mock_data` (no TensorFlow)."""

import itertools

import numpy as np
import pytest

from kd_jax import data
from kd_jax.data import augment as aug
from kd_jax.data import sources

N = 20


@pytest.fixture
def mock_tfds(tfds_mock_data):
  tfds_mock_data(N)  # see tests/conftest.py for the tfds 4.9.10 batched-read workaround


def _raw(name, split):
  src = data.tfds_source(name, split)
  return [src[i] for i in range(len(src))]


@pytest.mark.parametrize("name,num_classes", [("cifar100", 100), ("cifar10", 10)])
def test_tfds_source_reads_numpy_examples(mock_tfds, name, num_classes):
  src = data.tfds_source(name, "train")
  assert len(src) == N
  ex = src[3]
  assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
  assert 0 <= int(ex["label"]) < num_classes
  np.testing.assert_array_equal(src[3]["image"], ex["image"])  # stable reads


def test_cifar_train_batches_are_augmented_source_examples(mock_tfds):
  raw = _raw("cifar100", "train")
  seed, bs = 3, 8
  it = data.cifar("cifar100", "train", batch_size=bs, seed=seed, train=True)
  out = list(itertools.islice(it, 3))
  per_epoch = N // bs
  for step, b in enumerate(out):
    assert set(b) == {"image", "label"}
    assert b["image"].dtype == np.float32 and b["image"].shape == (bs, 32, 32, 3)
    assert b["label"].dtype == np.int32 and b["label"].shape == (bs,)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(N)
    for j in range(bs):
      pos = k * bs + j
      ex = raw[order[pos]]
      # Independent replay of the recipe: shift with zero fill, flip, scale, normalise.
      rng = np.random.default_rng((seed, epoch, pos))
      top, left = int(rng.integers(0, 9)), int(rng.integers(0, 9))
      flip = rng.random() < 0.5
      padded = np.zeros((40, 40, 3), np.float64)
      padded[4:36, 4:36] = ex["image"] / 255.0
      ref = padded[top:top + 32, left:left + 32]
      if flip:
        ref = ref[:, ::-1]
      ref = (ref - np.array(aug.CIFAR100_MEAN)) / np.array(aug.CIFAR100_STD)
      np.testing.assert_allclose(b["image"][j], ref, rtol=1e-5, atol=1e-5)
      assert b["label"][j] == int(ex["label"])


def test_cifar_train_resumes_exactly(mock_tfds):
  kw = dict(batch_size=4, seed=0, train=True)
  fresh = list(itertools.islice(data.cifar("cifar10", "train", **kw), 7))
  resumed = list(itertools.islice(data.cifar("cifar10", "train", start_step=4, **kw), 3))
  for f, r in zip(fresh[4:], resumed, strict=True):
    np.testing.assert_array_equal(f["image"], r["image"])
    np.testing.assert_array_equal(f["label"], r["label"])


def test_cifar_eval_covers_the_split_once_normalised(mock_tfds):
  raw = _raw("cifar10", "test")
  out = list(data.cifar("cifar10", "test", batch_size=8, train=False))
  assert len(out) == 3 and all(b["image"].shape == (8, 32, 32, 3) for b in out)
  images = np.concatenate([b["image"][b["mask"]] for b in out])
  labels = np.concatenate([b["label"][b["mask"]] for b in out])
  ref = (np.stack([ex["image"] for ex in raw]) / 255.0 - np.array(aug.CIFAR10_MEAN)) / np.array(
      aug.CIFAR10_STD)
  np.testing.assert_allclose(images, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels, [int(ex["label"]) for ex in raw])
  assert out[-1]["mask"].sum() == N - 16


def test_missing_dataset_error_names_dataset_dir_and_fix(tmp_path):
  with pytest.raises(sources.DatasetUnavailableError) as info:
    data.tfds_source("cifar10", "test", data_dir=tmp_path, download=False)
  msg = str(info.value)
  assert "'cifar10'" in msg and str(tmp_path) in msg
  assert "tfds build cifar10 --file_format=array_record" in msg


def test_unknown_names():
  with pytest.raises(ValueError, match="unknown TFDS dataset name 'no_such_dataset_kd'"):
    data.tfds_source("no_such_dataset_kd", "train", download=False)
  with pytest.raises(ValueError, match="unknown CIFAR dataset"):
    data.cifar("cifar1000", "train", batch_size=2, train=True)


def test_cifar_with_index_yields_each_examples_position(mock_tfds):
  raw = _raw("cifar100", "train")
  it = data.cifar("cifar100", "train", batch_size=8, seed=1, train=True, with_index=True)
  for batch in itertools.islice(it, 3):
    idx = batch["index"]
    assert idx.dtype == np.int32 and idx.shape == (8,)
    np.testing.assert_array_equal(batch["label"], [int(raw[i]["label"]) for i in idx])
  # Without the flag the batch keeps its two keys.
  plain = next(data.cifar("cifar100", "train", batch_size=8, seed=1, train=True))
  assert set(plain) == {"image", "label"}
