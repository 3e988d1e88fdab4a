"""CUB-200-2011 pipeline: transforms against independent references, TFDS offline via mock_data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.data import cub

MEAN = np.array(cub.IMAGENET_MEAN)
STD = np.array(cub.IMAGENET_STD)


@pytest.mark.parametrize("shape,out", [((5, 7, 3), (11, 9)), ((40, 30, 3), (13, 17))])
def test_resize_bilinear_matches_jax_image_resize(shape, out):
  x = np.random.default_rng(0).uniform(0, 255, size=shape).astype(np.float32)
  want = np.asarray(jax.image.resize(jnp.asarray(x), out + (3,), method="linear",
                                     antialias=False))
  np.testing.assert_allclose(cub.resize_bilinear(x, *out), want, rtol=1e-5, atol=1e-3)


def test_eval_transform_is_resize_then_centre_crop():
  # Shorter side already 256: no resampling, the crop is rows 16..239, columns 48..271.
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, size=(256, 320, 3), dtype=np.uint8)
  out = cub.eval_transform(224, 256)({"image": image, "label": 3})
  want = (image[16:240, 48:272] / 255.0 - MEAN) / STD
  assert out["image"].shape == (224, 224, 3) and out["image"].dtype == np.float32
  np.testing.assert_allclose(out["image"], want, rtol=1e-5, atol=1e-5)
  # A constant image of any size becomes the normalised constant.
  flat = np.full((300, 500, 3), 128, np.uint8)
  np.testing.assert_allclose(cub.eval_transform()({"image": flat})["image"],
                             np.broadcast_to((128 / 255 - MEAN) / STD, (224, 224, 3)),
                             rtol=1e-5, atol=1e-5)


def test_random_resized_crop_box_follows_torchvision_bounds():
  rng = np.random.default_rng(2)
  for _ in range(200):
    h, w = int(rng.integers(20, 400)), int(rng.integers(20, 400))
    top, left, ch, cw = cub.random_resized_crop_box(h, w, rng)
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
  # A very wide image makes every try fail: centred fallback with ratio clamped to 4/3.
  box = cub.random_resized_crop_box(10, 1000, np.random.default_rng(0))
  assert box == (0, (1000 - 13) // 2, 10, 13)


def test_cub_batches_from_mock_tfds(tfds_mock_data):
  tfds_mock_data(6)  # see tests/conftest.py for the tfds 4.9.10 batched-read workaround
  train = next(cub.cub("train", batch_size=4, seed=0, train=True, image_size=32, prefetch=0))
  evals = list(cub.cub("test", batch_size=4, train=False, image_size=32, resize_size=36,
                       prefetch=0))
  assert train["image"].shape == (4, 32, 32, 3) and train["image"].dtype == np.float32
  assert np.all((train["label"] >= 0) & (train["label"] < cub.NUM_CLASSES))
  assert np.all(np.isfinite(train["image"]))
  assert len(evals) == 2 and evals[-1]["mask"].tolist() == [True, True, False, False]
  assert evals[0]["image"].shape == (4, 32, 32, 3)
