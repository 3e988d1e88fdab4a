"""The offline built-in dataset: scikit-learn's 8x8 handwritten digits, split and normalised.

scikit-learn ships the 1,797 real images of the UCI "Optical Recognition of Handwritten Digits"
test set (Alpaydin & Kaynak, 1998), so the main job and the notebooks run on a fresh machine
with no download. Splits are stratified and seeded; the validation split is carved out of the
training part, never out of the test split, and the normalisation statistics come from the
training split only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Pixel values in `sklearn.datasets.load_digits` are counts in 0..16 (4x4 blocks of a 32x32 bitmap).
_DIGITS_MAX_VALUE = 16.0
_STD_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
  """Train, validation and test arrays of one dataset, with the train split's statistics.

  Attributes:
    train: {"image": float32 [N, H, W, C], "label": int32 [N]}, normalised.
    val: same structure, held out from the training part.
    test: same structure.
    num_classes: number of classes.
    mean: float32 [C], per-channel mean of the (scaled to [0, 1]) training images.
    std: float32 [C], per-channel standard deviation of the training images.
  """

  train: dict[str, np.ndarray]
  val: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  num_classes: int
  mean: np.ndarray
  std: np.ndarray


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
  for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {name}={value}.")
  if val_fraction + test_fraction >= 1.0:
    raise ValueError(
        "val_fraction + test_fraction must leave a training split, got "
        f"val_fraction={val_fraction} + test_fraction={test_fraction} >= 1."
    )


def _stratified_split(labels: np.ndarray, sizes: tuple[int, ...], seed: int):
  """Splits indices into len(sizes) disjoint sorted parts, stratified by label.

  Uses scikit-learn's `train_test_split(..., stratify=...)` (seeded by `seed`) twice: first the
  test part off the whole set, then the validation part off the remainder.
  """
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  n_val, n_test = sizes
  all_idx = np.arange(labels.shape[0])
  if n_test:
    rest, test = train_test_split(
        all_idx, test_size=n_test, stratify=labels, random_state=seed)
  else:
    rest, test = all_idx, all_idx[:0]
  if n_val:
    train, val = train_test_split(
        rest, test_size=n_val, stratify=labels[rest], random_state=seed + 1)
  else:
    train, val = rest, rest[:0]
  return np.sort(train), np.sort(val), np.sort(test)


def load_digits(*, seed: int = 0, val_fraction: float = 0.1,
                test_fraction: float = 0.2) -> DatasetSplits:
  """Loads scikit-learn's digits as normalised NHWC float32 images in stratified splits.

  Each image x in {0..16}^{8x8} becomes (x / 16 - mean) / std, where mean and std are the pixel
  statistics of the training split (one channel). Split sizes are round(fraction * 1797) for
  test and validation; the rest is training (train/val/test = 1258/180/359 with the defaults).
  The same `seed` always gives the same splits.

  Data: Alpaydin & Kaynak (1998), UCI ML repository, as shipped by
  `sklearn.datasets.load_digits`.

  Args:
    seed: seeds the stratified splits.
    val_fraction: fraction of all examples held out of training for validation.
    test_fraction: fraction of all examples used for the test split.

  Returns:
    A `DatasetSplits` with 10 classes and images of shape [N, 8, 8, 1].
  """
  _check_fractions(val_fraction, test_fraction)
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  bunch = datasets.load_digits()
  images = (np.asarray(bunch.images, np.float32) / _DIGITS_MAX_VALUE)[..., None]
  labels = np.asarray(bunch.target, np.int32)
  n = labels.shape[0]
  sizes = (int(round(val_fraction * n)), int(round(test_fraction * n)))
  train_idx, val_idx, test_idx = _stratified_split(labels, sizes, seed)

  train_images = images[train_idx]
  mean = train_images.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
  std = train_images.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
  std = np.maximum(std, _STD_EPS)

  def split(idx):
    return {
        "image": ((images[idx] - mean) / std).astype(np.float32),
        "label": labels[idx],
    }

  return DatasetSplits(
      train=split(train_idx), val=split(val_idx), test=split(test_idx),
      num_classes=int(labels.max()) + 1, mean=mean, std=std)
