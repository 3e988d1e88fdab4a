"""CIFAR augmentation: crops are zero-filled shifts, flips are mirrors, normalisation hits 0/1."""

import numpy as np
import pytest

from kd_jax.data import augment as aug


def _image(h=6, w=5, c=3, seed=0):
  return np.random.default_rng(seed).integers(1, 256, size=(h, w, c)).astype(np.uint8)


def _shifted(image, dy, dx):
  """out[y, x] = image[y - dy, x - dx] where inside, else 0 (written independently of np.pad)."""
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  for y in range(h):
    for x in range(w):
      if 0 <= y - dy < h and 0 <= x - dx < w:
        out[y, x] = image[y - dy, x - dx]
  return out


@pytest.mark.parametrize("top,left", [(0, 0), (4, 4), (8, 8), (1, 7), (6, 2)])
def test_crop_of_padded_image_is_a_zero_filled_shift(top, left):
  image = _image()
  out = aug.pad_and_crop(image, top, left, padding=4)
  assert out.shape == image.shape and out.dtype == image.dtype
  np.testing.assert_array_equal(out, _shifted(image, 4 - top, 4 - left))


def test_random_crop_draws_every_offset_uniformly():
  image = _image(4, 4, 1)
  rng = np.random.default_rng(0)
  candidates = {(dy, dx): _shifted(image, dy, dx).tobytes()
                for dy in range(-2, 3) for dx in range(-2, 3)}
  seen = {}
  for _ in range(2000):
    out = aug.random_crop(image, rng, padding=2).tobytes()
    # Identify the shift by matching against all 25 candidates.
    matches = [shift for shift, ref in candidates.items() if ref == out]
    assert len(matches) == 1
    seen[matches[0]] = seen.get(matches[0], 0) + 1
  assert len(seen) == 25
  assert min(seen.values()) > 2000 / 25 * 0.6


def test_flip_twice_is_identity_and_flip_mirrors():
  image = _image()
  flipped = aug.flip_horizontal(image)
  for j in range(image.shape[1]):
    np.testing.assert_array_equal(flipped[:, j], image[:, image.shape[1] - 1 - j])
  np.testing.assert_array_equal(aug.flip_horizontal(flipped), image)


def test_random_flip_is_a_fair_coin():
  image = _image()
  rng = np.random.default_rng(1)
  flips = sum(np.array_equal(aug.random_flip(image, rng), aug.flip_horizontal(image))
              for _ in range(1000))
  assert 430 < flips < 570


def test_normalised_mock_data_has_the_intended_statistics():
  mean, std = aug.CIFAR100_MEAN, aug.CIFAR100_STD
  rng = np.random.default_rng(0)
  # Mock pixels in [0, 1] with exactly the CIFAR-100 per-channel mean and std.
  z = rng.standard_normal(size=(20000, 3))
  z = (z - z.mean(0)) / z.std(0)
  pixels = (z * np.array(std) + np.array(mean)).reshape(100, 200, 3)
  out = aug.normalize(pixels, mean=mean, std=std)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out.reshape(-1, 3).mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(out.reshape(-1, 3).std(0), 1.0, atol=1e-4)


def test_to_float_scales_uint8_like_totensor():
  image = np.array([[[0, 128, 255]]], np.uint8)
  np.testing.assert_allclose(aug.to_float(image), [[[0.0, 128 / 255, 1.0]]], rtol=1e-6)


def test_cifar_train_augment_matches_the_recipe_step_by_step():
  image = _image(32, 32, 3)
  example = {"image": image, "label": np.int32(7)}
  out = aug.cifar_train_augment("cifar100")(example, np.random.default_rng(42))
  # Replay the draws: crop offsets, then the flip coin.
  rng = np.random.default_rng(42)
  top, left = int(rng.integers(0, 9)), int(rng.integers(0, 9))
  flip = rng.random() < 0.5
  ref = _shifted(image, 4 - top, 4 - left).astype(np.float64) / 255.0
  if flip:
    ref = ref[:, ::-1]
  ref = (ref - np.array(aug.CIFAR100_MEAN)) / np.array(aug.CIFAR100_STD)
  assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.float32
  np.testing.assert_allclose(out["image"], ref, rtol=1e-5, atol=1e-5)
  assert out["label"] == 7 and example["image"] is image  # input not mutated


def test_eval_transform_is_deterministic_and_rejects_random_steps_without_rng():
  image = _image(32, 32, 3)
  out = aug.cifar_eval_transform("cifar10")({"image": image}, None)
  ref = (image / 255.0 - np.array(aug.CIFAR10_MEAN)) / np.array(aug.CIFAR10_STD)
  np.testing.assert_allclose(out["image"], ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="rng=None"):
    aug.cifar_train_augment()({"image": image}, None)


def test_bad_inputs():
  with pytest.raises(ValueError, match="unknown CIFAR"):
    aug.cifar_train_augment("cifar1000")
  with pytest.raises(ValueError, match="channel axis"):
    aug.normalize(np.zeros((2, 2, 1)), mean=(0.5, 0.5, 0.5), std=(1, 1, 1))
  with pytest.raises(ValueError, match="outside the padded"):
    aug.pad_and_crop(_image(), 9, 0, padding=4)
  with pytest.raises(ValueError, match="rank 3"):
    aug.flip_horizontal(np.zeros((4, 4)))
