"""CUB-200-2011 from TFDS (`caltech_birds2011`) through Grain, with the ImageNet-style transforms.

The ReFilled CUB recipe (official code `njulus/REFILLED`, docs/refilled.md): training images get
RandomResizedCrop(224) (area in [0.08, 1], aspect ratio in [3/4, 4/3], torchvision's 10 tries
then a centre-crop fallback) and a horizontal flip; test images Resize(256) on the shorter side
and CenterCrop(224); both are normalised with the ImageNet statistics. Images of CUB have
different sizes, so every transform ends at a fixed `size` x `size`. Resizing is bilinear with
half-pixel centres (no antialiasing) in numpy, so no image library or TensorFlow is needed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from kd_jax.data import augment as augment_lib
from kd_jax.data import pipeline
from kd_jax.data import sources

NAME = "caltech_birds2011"
NUM_CLASSES = 200
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_and_label(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A TFDS `caltech_birds2011` example as {"image": uint8 [H, W, 3], "label": int32}."""
  return {"image": np.asarray(example["image"]), "label": np.asarray(example["label"], np.int32)}


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of an [H, W, C] image to [height, width, C] (float32), half-pixel centres.

  Output pixel (i, j) samples the input at ((i + 0.5) H / height - 0.5, (j + 0.5) W / width -
  0.5), clamped to the image, as `torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)` and `jax.image.resize(method="linear")` for upsampling.
  """
  augment_lib._check_hwc(image, "image")  # pylint: disable=protected-access
  x = np.asarray(image, np.float32)
  h, w = x.shape[:2]

  def coords(n_out, n_in):
    c = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (c - lo).astype(np.float32)

  y0, y1, fy = coords(int(height), h)
  x0, x1, fx = coords(int(width), w)
  top = x[y0] * (1 - fy)[:, None, None] + x[y1] * fy[:, None, None]
  return top[:, x0] * (1 - fx)[None, :, None] + top[:, x1] * fx[None, :, None]


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, *,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's `RandomResizedCrop.get_params`: (top, left, crop_h, crop_w).

  Up to 10 tries of area ~ U(scale) * H * W and log-uniform aspect ratio; if none fits, the
  largest centred crop with the ratio clamped to `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _normalize(x: np.ndarray) -> np.ndarray:
  return augment_lib.normalize(x / 255.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def train_augment(size: int = 224):
  """RandomResizedCrop(size) + horizontal flip + ImageNet normalisation, float32 [size, size, 3]."""

  def fn(image, rng):
    augment_lib._need_rng(rng, "train_augment")  # pylint: disable=protected-access
    image = np.asarray(image)
    top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng)
    x = resize_bilinear(image[top:top + h, left:left + w], size, size)
    x = augment_lib.random_flip(x, rng)
    return _normalize(x).astype(np.float32)

  return augment_lib.compose(fn)


def eval_transform(size: int = 224, resize: int = 256):
  """Resize the shorter side to `resize`, CenterCrop(size), ImageNet normalisation."""

  def fn(image, rng=None):
    del rng
    image = np.asarray(image)
    h, w = image.shape[:2]
    if h <= w:
      nh, nw = resize, max(1, int(resize * w / h))
    else:
      nh, nw = max(1, int(resize * h / w)), resize
    x = resize_bilinear(image, nh, nw)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return _normalize(x[top:top + size, left:left + size]).astype(np.float32)

  return augment_lib.compose(fn)


def cub(split: str = "train", *, batch_size: int, seed: int = 0, train: bool,
        image_size: int = 224, resize_size: int = 256,
        data_dir: str | os.PathLike | None = None, num_epochs: int | None = None,
        start_step: int = 0, prefetch: int = 2, num_threads: int | None = None,
        num_shards: int = 1, shard_index: int = 0, download: bool = True,
        source=None) -> Iterator[dict[str, np.ndarray]]:
  """CUB-200-2011 batches from `tfds.data_source("caltech_birds2011")` through Grain.

  train=True: `pipeline.batches` (reshuffled every epoch, full batches, resumable at
  `start_step`) with `train_augment(image_size)`; train=False: `pipeline.eval_batches` (every
  example once, zero-padded last batch, bool "mask") with `eval_transform(image_size,
  resize_size)`.

  Args:
    split: TFDS split ("train" 5,994 images, "test" 5,794), or a slice such as "train[:90%]".
    batch_size: global batch size.
    seed: seeds shuffling and augmentation (train only).
    train: training or evaluation pipeline.
    image_size: output side (224).
    resize_size: shorter side before the centre crop at evaluation (256).
    data_dir: TFDS data directory.
    num_epochs, start_step, prefetch, num_threads, num_shards, shard_index: see
      `kd_jax.data.batches`.
    download: let TFDS download and prepare a missing dataset.
    source: an already opened source of CUB examples.

  Returns:
    An iterator of {"image": float32 [B, size, size, 3], "label": int32 [B]} (+ "mask" when
    evaluating).
  """
  if source is None:
    source = sources.tfds_source(NAME, split, data_dir=data_dir, download=download)
  source = sources.MappedSource(source, image_and_label)
  if train:
    return pipeline.batches(
        source, batch_size=batch_size, seed=seed, shuffle=True, drop_remainder=True,
        augment=train_augment(image_size), num_epochs=num_epochs, start_step=start_step,
        prefetch=prefetch, num_threads=num_threads, num_shards=num_shards,
        shard_index=shard_index)
  return pipeline.eval_batches(source, batch_size=batch_size,
                               transform=eval_transform(image_size, resize_size),
                               prefetch=prefetch, num_threads=num_threads)
