"""Mixup / CutMix inside the step (function matching) against numpy restatements: the mixed
inputs, CutMix's box (clovaai/CutMix-PyTorch `rand_bbox`), the (seed, step) keying, and the train
step feeding the same mixed batch to teacher and student (with a separate teacher view)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax.data import mixing
from kd_jax.train.state import TrainState
from kd_jax.train.step import make_train_step
from tests.train._toy import ToyNet, toy_batch


def _np_mixup(x, lam, keep=None):
  lam_row = np.full(len(x), lam) if keep is None else np.where(keep & np.roll(keep, 1), lam, 1.0)
  lam_row = lam_row.reshape((-1,) + (1,) * (x.ndim - 1))
  return lam_row * x + (1 - lam_row) * np.roll(x, 1, axis=0)


def _np_rand_bbox(h, w, lam, center):
  """rand_bbox of clovaai/CutMix-PyTorch (train.py), with the centre given as a fraction."""
  cut_rat = np.sqrt(1.0 - lam)
  cut_w, cut_h = int(w * cut_rat), int(h * cut_rat)
  cx, cy = int(center[1] * w), int(center[0] * h)
  bbx1, bbx2 = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
  bby1, bby2 = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
  return bby1, bby2, bbx1, bbx2


def _np_cutmix(x, lam, center):
  y0, y1, x0, x1 = _np_rand_bbox(x.shape[1], x.shape[2], lam, center)
  out = x.copy()
  out[:, y0:y1, x0:x1] = np.roll(x, 1, axis=0)[:, y0:y1, x0:x1]
  return out, 1 - (y1 - y0) * (x1 - x0) / (x.shape[1] * x.shape[2])


def test_mixup_and_cutmix_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 6, 10, 3)).astype(np.float32)
  keep = np.array([True, True, False, True, True])
  np.testing.assert_allclose(mixing.mixup(jnp.asarray(x), 0.7), _np_mixup(x, 0.7), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(mixing.mixup(jnp.asarray(x), 0.7, jnp.asarray(keep)),
                             _np_mixup(x, 0.7, keep), rtol=1e-6,
                             atol=1e-6)
  for lam, center in ((0.6, (0.5, 0.5)), (0.9, (0.05, 0.95)), (0.5, (0.99, 0.0)), (1.0, (.3, .3))):
    got, area = mixing.cutmix(jnp.asarray(x), lam, jnp.asarray(center))
    want, want_area = _np_cutmix(x, lam, center)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(area, want_area, rtol=1e-6)


def test_mix_batch_is_keyed_by_seed_and_step_and_mixes_both_views_alike():
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(6, 8, 8, 1)).astype(np.float32),
           "image_hi": rng.normal(size=(6, 16, 16, 1)).astype(np.float32),
           "label": np.arange(6, dtype=np.int32), "mask": np.array([1, 1, 1, 1, 1, 0], bool)}
  m, cm = mixing.Mixing("mixup", alpha=1.0, seed=3), mixing.Mixing("cutmix", seed=3)

  @jax.jit
  def run(bt):  # everything in one program: one compilation
    keys = ("image", "image_hi")
    k_lam, k_center = jax.random.split(jax.random.fold_in(jax.random.key(3), 4))
    return (mixing.mix_batch(bt, m, step=jnp.int32(4), keys=keys),
            mixing.mix_batch(bt, m, step=jnp.int32(5), keys=keys),
            mixing.mix_batch(bt, cm, step=jnp.int32(4), keys=keys),
            mixing.draw_lambda(k_lam, 1.0), jax.random.uniform(k_center, (2,)))

  a, other, c, lam, center = run(batch)
  again = run(batch)[0]
  np.testing.assert_array_equal(a["image"], again["image"])  # deterministic
  lam, center = float(lam), np.asarray(center)
  assert 0.5 <= lam <= 1.0
  for k in ("image", "image_hi"):
    np.testing.assert_allclose(a[k], _np_mixup(batch[k], lam, batch["mask"]), rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(a["mix_lambda"], [1.0, lam, lam, lam, lam, 1.0], rtol=1e-6)
  np.testing.assert_array_equal(a["mix_label"], [5, 0, 1, 2, 3, 4])
  assert not np.allclose(other["mix_lambda"][1], lam)  # another step, another draw

  for k in ("image", "image_hi"):  # the same relative box on both resolutions
    want, _ = _np_cutmix(batch[k], lam, center)
    # Row 5 is padding and row 0's partner is row 5: neither is mixed.
    want[0], want[5] = batch[k][0], batch[k][5]
    np.testing.assert_array_equal(c[k], want)
  np.testing.assert_allclose(c["mix_lambda"][1], _np_cutmix(batch["image"], lam, center)[1],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="no \\['view'\\]"):
    mixing.mix_batch(batch, m, step=0, keys=("view",))
  with pytest.raises(ValueError, match="kind"):
    mixing.Mixing("mixcut")


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_step_gives_teacher_and_student_the_same_mixed_batch():
  teacher = ToyNet(width=16, rngs=nnx.Rngs(1))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  student = ToyNet(width=8, rngs=nnx.Rngs(2))
  state = TrainState.create(student, optax.sgd(0.1), rng=jax.random.key(0)).replace(step=7)
  batch = toy_batch(16, seed=5)
  batch["image_hi"] = np.random.default_rng(6).normal(size=(16, 16, 16, 1)).astype(np.float32)
  m = mixing.Mixing("mixup", alpha=0.4, seed=11)
  step = jax.jit(make_train_step("ce:0.5,kd:0.5(temperature=2)", teacher_graphdef=t_graph,
                                 axis_name=None, teacher_input_key="image_hi", mixing=m))
  _, metrics = step(state, batch, {"params": t_params, "batch_stats": t_rest})

  lam = float(mixing.draw_lambda(jax.random.split(
      jax.random.fold_in(jax.random.key(11), 7))[0], 0.4))
  xs, xt = _np_mixup(batch["image"], lam), _np_mixup(batch["image_hi"], lam)
  s = np.float64(student(jnp.asarray(xs, jnp.float32), train=True)[0])
  t = np.float64(teacher(jnp.asarray(xt, jnp.float32), train=False)[0])
  y, y2 = batch["label"], np.roll(batch["label"], 1)
  ls = _np_log_softmax(s)
  ce = np.mean(-lam * ls[np.arange(16), y] - (1 - lam) * ls[np.arange(16), y2])
  lt, ls2 = _np_log_softmax(t / 2), _np_log_softmax(s / 2)
  kd = 4.0 * np.mean(np.sum(np.exp(lt) * (lt - ls2), -1))
  np.testing.assert_allclose(metrics["loss/ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/kd"], kd, rtol=1e-4)
  with pytest.raises(ValueError, match="mixing needs the teacher in the step"):
    make_train_step("ce:0.1,kd:0.9", cached_teacher="teacher_", mixing=m, axis_name=None)
