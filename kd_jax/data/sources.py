"""TFDS random-access sources (`tfds.data_source`, no TensorFlow needed) and the CIFAR pipelines.

`tfds.data_source` reads a dataset prepared in the array_record format and returns a sequence of
decoded numpy example dicts, which `kd_jax.data.batches` shuffles, augments and batches with
Grain. CIFAR follows the KD-literature recipe (`HobbitLong/RepDistiller`, the code of Tian et
al., "Contrastive Representation Distillation", ICLR 2020): random crop 32 with 4-pixel
zero padding, horizontal flip, per-channel normalisation; evaluation only normalises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import os
from typing import Any

import numpy as np

from kd_jax.data import augment as augment_lib
from kd_jax.data import pipeline

CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


class DatasetUnavailableError(RuntimeError):
  """A TFDS dataset is neither prepared locally nor preparable here (e.g. offline)."""


class MappedSource:
  """A random-access source whose examples pass through `fn` when read (lazily, per example)."""

  def __init__(self, source, fn: Callable[[Mapping[str, Any]], dict[str, Any]], *,
               with_index: bool = False):
    self.source = source
    self.fn = fn
    self.with_index = with_index  # add "index": the example's position in the source (CRD)

  def _out(self, example, index):
    out = self.fn(example)
    if self.with_index:
      out["index"] = np.int32(index)
    return out

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._out(self.source[index], index)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    getitems = getattr(self.source, "__getitems__", None)
    examples = getitems(list(indices)) if getitems else [self.source[i] for i in indices]
    return [self._out(ex, i) for ex, i in zip(examples, indices)]


def _unavailable_message(name: str, split, data_dir, download: bool,
                         error: BaseException) -> str:
  """Says what is missing where, why TFDS could not fix it, and the command that does."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  where = os.fspath(data_dir) if data_dir else (
      os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
  prepared = False
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    where = os.fspath(builder.data_path)
    prepared = builder.is_prepared()
  except Exception:  # pylint: disable=broad-except
    pass  # keep the unresolved directory; the rest of the message still holds.
  cause = f"{type(error).__name__}: {error}"
  if prepared:
    what = (f"is prepared in {where!r} but `tfds.data_source` cannot read it ({cause}); "
            "it reads only the array_record format")
  elif not download:
    what = f"is not prepared in {where!r} and download=False"
  else:
    what = f"is not prepared in {where!r} and downloading/preparing it here failed ({cause})"
  return (
      f"TFDS dataset {name!r} (split {split!r}) {what}.\n"
      "To fix it, prepare it once in array_record format on a machine with internet (preparing "
      "needs TensorFlow): `pip install tensorflow tensorflow-datasets && tfds build "
      f"{name} --file_format=array_record --data_dir=DIR`, copy DIR here and pass "
      "data_dir=DIR (or set TFDS_DATA_DIR=DIR). Offline, use `kd_jax.data.load_digits()`.")


def tfds_source(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                download: bool = True):
  """A TFDS split as a random-access sequence of numpy example dicts, read lazily.

  Thin wrapper of `tfds.data_source(name, split=split, data_dir=data_dir, download=download)`
  (array_record reader; works without TensorFlow) that turns TFDS's errors for a dataset that
  is missing and cannot be prepared into one `DatasetUnavailableError` naming the dataset, the
  directory searched and the command that fixes it.

  Args:
    name: TFDS dataset name, e.g. "cifar100" or "cifar10:3.0.2".
    split: split name or slice, e.g. "train", "test", "train[:90%]".
    data_dir: where prepared datasets live; default TFDS's (`TFDS_DATA_DIR` or
      ~/tensorflow_datasets).
    download: try to download and prepare the dataset when it is missing.

  Returns:
    The data source: `len(source)` examples, `source[i]` a dict of numpy values.

  Raises:
    ValueError: unknown dataset name.
    DatasetUnavailableError: the dataset is not prepared and cannot be prepared here.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"unknown TFDS dataset name {name!r} (see `tfds.list_builders()`).") from e
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, ValueError) and "split" in str(e).lower():
      raise ValueError(f"TFDS dataset {name!r} has no split {split!r}: {e}") from e
    raise DatasetUnavailableError(
        _unavailable_message(name, split, data_dir, download, e)) from e


def _image_and_label(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {"image": np.asarray(example["image"]),
          "label": np.asarray(example["label"], np.int32)}


def cifar(name: str = "cifar100", split: str = "train", *, batch_size: int, seed: int = 0,
          train: bool, data_dir: str | os.PathLike | None = None,
          num_epochs: int | None = None, start_step: int = 0, prefetch: int = 2,
          num_threads: int | None = None, num_shards: int = 1, shard_index: int = 0,
          download: bool = True, source=None,
          with_index: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """CIFAR-10/100 batches from TFDS through Grain, with the KD-literature augmentation.

  train=True: `kd_jax.data.batches` over the split (reshuffled every epoch, full batches only)
  with `cifar_train_augment(name)` (crop 32 / pad 4, horizontal flip, normalise with the
  dataset's mean and std; RepDistiller `dataset/cifar100.py`). train=False: `eval_batches`
  (each example once, in order, last batch zero-padded, plus a bool "mask") with
  `cifar_eval_transform(name)` (normalise only).

  Args:
    name: "cifar100" or "cifar10".
    split: TFDS split, e.g. "train", "test", "train[:45000]".
    batch_size: global batch size.
    seed: seeds shuffling and augmentation (train only).
    train: training pipeline (shuffle, augment, repeat) or evaluation pipeline.
    data_dir: TFDS data directory (see `tfds_source`).
    num_epochs: training epochs; None repeats forever (train only).
    start_step: resume a training stream at this step (train only).
    prefetch: batches prepared ahead in background threads.
    num_threads: threads preparing batches.
    num_shards: hosts sharing each global batch (train only).
    shard_index: this host's block of the global batch (train only).
    download: let TFDS download and prepare a missing dataset.
    source: an already opened source of CIFAR examples (default `tfds_source(name, split)`).
    with_index: also yield "index", int32 [B], each example's position in the split (CRD's
      memory bank is indexed by it).

  Returns:
    An iterator of {"image": float32 [B, 32, 32, 3], "label": int32 [B]} (+ "mask" when not
    `train`, + "index" when `with_index`).
  """
  if name not in CIFAR_NUM_CLASSES:
    raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of "
                     f"{sorted(CIFAR_NUM_CLASSES)}.")
  if source is None:
    source = tfds_source(name, split, data_dir=data_dir, download=download)
  source = MappedSource(source, _image_and_label, with_index=with_index)
  if train:
    return pipeline.batches(
        source, batch_size=batch_size, seed=seed, shuffle=True, drop_remainder=True,
        augment=augment_lib.cifar_train_augment(name), num_epochs=num_epochs,
        start_step=start_step, prefetch=prefetch, num_threads=num_threads,
        num_shards=num_shards, shard_index=shard_index)
  return pipeline.eval_batches(
      source, batch_size=batch_size, transform=augment_lib.cifar_eval_transform(name),
      prefetch=prefetch, num_threads=num_threads)
