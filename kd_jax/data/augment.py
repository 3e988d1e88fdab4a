"""Per-example image augmentation in numpy: the CIFAR recipe of the KD literature, composable.

Every transform has the signature `fn(image, rng) -> image` on one HWC image (`rng` a
`np.random.Generator`; deterministic transforms accept and ignore it, so an eval transform can be
called with `rng=None`). `compose(*fns)` chains them into an `augment(example, rng) -> example`
for `kd_jax.data.batches`, whose per-example generators keep augmentation reproducible.

CIFAR recipe (`HobbitLong/RepDistiller: dataset/cifar100.py`, also used by
`megvii-research/mdistiller`): `transforms.RandomCrop(32, padding=4)`,
`RandomHorizontalFlip()`, `ToTensor()`, `Normalize(mean, std)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from kd_jax.data import pipeline

ImageFn = Callable[[np.ndarray, "np.random.Generator | None"], np.ndarray]

# RepDistiller `dataset/cifar100.py` (also mdistiller): per-channel statistics of CIFAR-100 train.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
# Per-channel mean and pixel standard deviation of the CIFAR-10 training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR_STATS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
}


def _check_hwc(image: np.ndarray, name: str) -> None:
  if image.ndim != 3:
    raise ValueError(f"{name} expects one HWC image (rank 3), got shape {image.shape}.")


def _need_rng(rng, name: str) -> None:
  if rng is None:
    raise ValueError(
        f"{name} is random and needs a numpy Generator; it was called with rng=None "
        "(eval transforms must be deterministic).")


def to_float(image: np.ndarray, rng=None) -> np.ndarray:
  """uint8 pixels in 0..255 -> float32 in [0, 1] (as torchvision `ToTensor`); floats -> float32."""
  del rng
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / np.float32(255.0)
  return image.astype(np.float32, copy=False)


def pad_and_crop(image: np.ndarray, top: int, left: int, *, padding: int = 4,
                 size: tuple[int, int] | None = None) -> np.ndarray:
  """Zero-pads H and W by `padding` on each side, then crops `size` at (top, left).

  out[i, j] = padded[top + i, left + j], with padded[p + y, p + x] = image[y, x] and 0 outside;
  i.e. the image shifted by (padding - top, padding - left) with zeros filling the gap.

  Args:
    image: one HWC image.
    top: crop row offset into the padded image, in [0, H + 2 * padding - size[0]].
    left: crop column offset, in [0, W + 2 * padding - size[1]].
    padding: zero padding on every side of both spatial axes.
    size: (height, width) of the crop; default the image's own (H, W).
  """
  _check_hwc(image, "pad_and_crop")
  h, w = image.shape[:2]
  ch, cw = (h, w) if size is None else size
  if not (0 <= top <= h + 2 * padding - ch and 0 <= left <= w + 2 * padding - cw):
    raise ValueError(
        f"crop offset (top={top}, left={left}) of size {(ch, cw)} falls outside the "
        f"padded image {(h + 2 * padding, w + 2 * padding)} (image {image.shape}, "
        f"padding={padding}).")
  # Copy the overlap of the crop window with the image into zeros (no padded copy).
  out = np.zeros((ch, cw) + image.shape[2:], image.dtype)
  y0, x0 = top - padding, left - padding  # window origin in image coordinates.
  ys, ye = max(y0, 0), min(y0 + ch, h)
  xs, xe = max(x0, 0), min(x0 + cw, w)
  if ys < ye and xs < xe:
    out[ys - y0:ye - y0, xs - x0:xe - x0] = image[ys:ye, xs:xe]
  return out


def random_crop(image: np.ndarray, rng: np.random.Generator, *, padding: int = 4,
                size: tuple[int, int] | None = None) -> np.ndarray:
  """torchvision `RandomCrop(size, padding)`: a uniform crop of the zero-padded image.

  Offsets top, left ~ Uniform{0..H + 2p - h}, Uniform{0..W + 2p - w} (two `rng.integers` draws),
  then `pad_and_crop`. For CIFAR: size 32, padding 4, so 9 x 9 equally likely shifts.
  """
  _need_rng(rng, "random_crop")
  _check_hwc(image, "random_crop")
  h, w = image.shape[:2]
  ch, cw = (h, w) if size is None else size
  top = int(rng.integers(0, h + 2 * padding - ch + 1))
  left = int(rng.integers(0, w + 2 * padding - cw + 1))
  return pad_and_crop(image, top, left, padding=padding, size=(ch, cw))


def flip_horizontal(image: np.ndarray, rng=None) -> np.ndarray:
  """Mirrors the width axis: out[:, j] = image[:, W - 1 - j]."""
  del rng
  _check_hwc(image, "flip_horizontal")
  return image[:, ::-1]


def random_flip(image: np.ndarray, rng: np.random.Generator, *, p: float = 0.5) -> np.ndarray:
  """torchvision `RandomHorizontalFlip(p)`: mirrors the width axis with probability p."""
  _need_rng(rng, "random_flip")
  return flip_horizontal(image) if rng.random() < p else image


def normalize(image: np.ndarray, rng=None, *, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """(image - mean) / std per channel (last axis), in float32, as torchvision `Normalize`."""
  del rng
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if mean.shape != std.shape or mean.shape[-1:] != np.shape(image)[-1:]:
    raise ValueError(
        f"mean {mean.shape} and std {std.shape} must match the channel axis of image "
        f"{image.shape}.")
  if np.any(std <= 0):
    raise ValueError(f"std must be positive, got std={std.tolist()}.")
  out = to_float(image) - mean
  out *= np.float32(1.0) / std
  return out


def compose(*fns: ImageFn, key: str = "image"):
  """Chains image transforms into an `augment(example, rng) -> example` on `example[key]`.

  The transforms run in order and share the example's generator (each draws in turn), so the
  result is a function of (example, rng state) only. Other keys pass through unchanged.
  """
  for fn in fns:
    if not callable(fn):
      raise ValueError(f"compose expects callables fn(image, rng), got {fn!r}.")

  def augment(example, rng=None):
    out = dict(example)
    image = np.asarray(out[key])
    for fn in fns:
      image = fn(image, rng)
    out[key] = np.ascontiguousarray(image)
    return out

  return augment


def _stats(name: str):
  if name not in CIFAR_STATS:
    raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {sorted(CIFAR_STATS)}.")
  return CIFAR_STATS[name]


def cifar_train_augment(name: str = "cifar100", *, padding: int = 4):
  """The KD-literature CIFAR training transform: crop 32 / pad 4, flip, to [0, 1], normalise."""
  mean, std = _stats(name)
  return compose(
      lambda x, rng: random_crop(x, rng, padding=padding),
      random_flip,
      to_float,
      lambda x, rng: normalize(x, mean=mean, std=std),
  )


def cifar_eval_transform(name: str = "cifar100"):
  """The deterministic CIFAR evaluation transform: to [0, 1], normalise."""
  mean, std = _stats(name)
  return compose(to_float, lambda x, rng: normalize(x, mean=mean, std=std))


MIX_LABEL = "mix_label"
MIX_WEIGHT = "mix_lambda"


def mix(base, source, *, mode: str = "mixup", alpha: float = 1.0, prob: float = 1.0,
        key: str = "image", label_key: str = "label"):
  r"""Mixup or CutMix as a per-example augmentation, drawn from the example's own generator.

  Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018):
  :math:`x = \lambda x_i + (1 - \lambda) x_j`; CutMix (Yun et al., ICCV 2019): the box of
  relative area :math:`1 - \lambda` centred uniformly in the image is pasted from :math:`x_j`
  (clipped at the border), and :math:`\lambda` becomes the area actually kept. In both,
  :math:`\lambda \sim Beta(\alpha, \alpha)` and the partner j is uniform over the dataset.

  Unlike the usual batch-level mixing (which pairs rows of a batch, so the view depends on the
  batch), everything here is drawn from the example's generator in a fixed order: whether to mix
  (probability `prob`), j, lambda, the box, then the partner's own `base` augmentation. With
  `kd_jax.data.batches` that generator is `example_rng(seed, epoch, position)`, so the mixed view
  stays a pure function of (seed, epoch, example index), and a teacher cache keyed by (epoch,
  index) stays valid (`kd_jax.data.topk_cache`).

  The example gets `"mix_label"` (the partner's label) and `"mix_lambda"` (float32, the weight of its
  own label; 1 when not mixed); the `ce` loss term then uses
  :math:`\lambda CE(y_i) + (1 - \lambda) CE(y_j)`.

  Args:
    base: the per-example augmentation `base(example, rng) -> example` applied to both images
      before mixing (e.g. `cifar_train_augment()`), or None.
    source: the dataset (dict of arrays or random-access source) the partners are read from.
    mode: "mixup" or "cutmix".
    alpha: Beta parameter (> 0); 1 gives a uniform lambda (CutMix's default), 0.2-0.4 is common
      for mixup.
    prob: probability that an example is mixed at all.
    key: the image entry.
    label_key: the label entry.
  """
  if mode not in ("mixup", "cutmix"):
    raise ValueError(f"mode must be 'mixup' or 'cutmix', got {mode!r}.")
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got alpha={alpha}.")
  if not 0 <= prob <= 1:
    raise ValueError(f"prob must lie in [0, 1], got prob={prob}.")
  source = pipeline.as_source(source)
  n = len(source)
  identity = base if base is not None else (lambda ex, rng: dict(ex))

  def augment(example, rng=None):
    _need_rng(rng, f"mix(mode={mode!r})")
    out = dict(identity(example, rng))
    label = np.asarray(out[label_key])
    image = np.asarray(out[key])
    if rng.random() >= prob:
      out[MIX_LABEL] = label
      out[MIX_WEIGHT] = np.float32(1.0)
      return out
    j = int(rng.integers(n))
    lam = float(rng.beta(alpha, alpha))
    if mode == "cutmix":
      _check_hwc(image, "mix(mode='cutmix')")
      h, w = image.shape[:2]
      ratio = np.sqrt(1.0 - lam)
      cut_h, cut_w = int(h * ratio), int(w * ratio)
      cy, cx = int(rng.integers(h)), int(rng.integers(w))
      y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
      x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
    partner = identity(dict(source[j]), rng)
    other = np.asarray(partner[key])
    if other.shape != image.shape:
      raise ValueError(f"mix: example {j}'s {key!r} has shape {other.shape}, the mixed example "
                       f"{image.shape}; mixing needs equal shapes (augment to a fixed size first).")
    if mode == "mixup":
      mixed = (np.float32(lam) * to_float(image) + np.float32(1.0 - lam) * to_float(other))
    else:
      mixed = image.copy()
      mixed[y0:y1, x0:x1] = other[y0:y1, x0:x1]
      lam = 1.0 - float((y1 - y0) * (x1 - x0)) / float(h * w)
    out[key] = np.ascontiguousarray(mixed)
    out[MIX_LABEL] = np.asarray(partner[label_key]).astype(label.dtype)
    out[MIX_WEIGHT] = np.float32(lam)
    return out

  return augment
