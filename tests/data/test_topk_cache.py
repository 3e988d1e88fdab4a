"""The top-k teacher cache keyed by (epoch, index): the pipeline's augmented (and mixed) views are
the views the cache was written from, bit for bit, and the teacher's outputs on them match it;
a cache written for another run is refused naming the field; a partial cache is detected."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import data
from kd_jax.data import augment as aug
from kd_jax.data import topk_cache

N, H, C, K, EPOCHS, B = 20, 6, 10, 3, 2, 8
TEMPS = (1.0, 4.0)
SEED = 7


def _arrays():
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(N, H, H, 1)).astype(np.float32),
          "label": rng.integers(0, C, N).astype(np.int32),
          "index": np.arange(N, dtype=np.int32)}


def _weights(seed=1):
  rng = np.random.default_rng(seed)
  return {"w1": rng.normal(size=(H * H, 12)).astype(np.float32) / H,
          "w2": rng.normal(size=(12, C)).astype(np.float32)}


def _teacher_fn(w):
  return jax.jit(lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w["w1"]) @ w["w2"])


def _teacher_np(w, x):
  """The same teacher written independently in float64 numpy."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return np.tanh(x @ w["w1"].astype(np.float64)) @ w["w2"].astype(np.float64)


def _augment(arrays, mode="mixup"):
  base = aug.compose(lambda x, rng: aug.random_crop(x, rng, padding=2), aug.random_flip)
  return aug.mix(base, arrays, mode=mode, alpha=0.4, prob=0.75)


def _spec(arrays, augment, w, **overrides):
  kw = dict(teacher_name="toy", teacher_variables=w, augment=augment,
            augment_config={"crop": 2, "flip": True, "mix": "mixup", "alpha": 0.4, "p": 0.75},
            seed=SEED, num_epochs=EPOCHS, k=K, temperatures=TEMPS)
  kw.update(overrides)
  return topk_cache.make_spec(arrays, **kw)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """A complete cache written by two shards (as two hosts would); shard 1 splits each teacher
  batch over two devices."""
  arrays, w = _arrays(), _weights()
  augment = _augment(arrays)
  spec = _spec(arrays, augment, w)
  path = str(tmp_path_factory.mktemp("topk") / "cache")
  fn = _teacher_fn(w)
  topk_cache.write(path, spec, fn, arrays, augment=augment, batch_size=4, num_shards=2,
                   shard_index=0)
  topk_cache.write(path, spec, fn, arrays, augment=augment, batch_size=4, num_shards=2,
                   shard_index=1, devices=jax.local_devices()[:2])
  return path, arrays, w, augment, spec


def _np_topk(logits, k, temperature):
  order = np.argsort(-logits, axis=-1, kind="stable")
  top, rest = order[:, :k], order[:, k:]
  tail = np.log(np.exp(np.take_along_axis(logits, rest, -1) / temperature).sum(-1))
  return top, np.take_along_axis(logits, top, -1), tail


def test_pipeline_views_are_the_cached_views_and_the_teacher_matches(written):
  path, arrays, w, augment, spec = written
  cache = topk_cache.load(path, expect=spec)
  assert len(cache) == EPOCHS * N and cache.num_classes == C
  steps = data.steps_per_epoch(N, B) * EPOCHS
  seen_mixed = 0
  for step, batch in enumerate(data.batches(arrays, batch_size=B, seed=SEED, augment=augment,
                                            num_epochs=EPOCHS, extras=cache.lookup,
                                            prefetch=0)):
    epoch = step // data.steps_per_epoch(N, B)
    for row, index in enumerate(batch["index"]):
      # Re-augmenting the example reproduces the view the writer gave the teacher, bit for bit.
      view = data.example_view(arrays, int(index), epoch=epoch, seed=SEED, augment=augment)
      for key in ("image", "mix_label", "mix_lambda"):
        np.testing.assert_array_equal(batch[key][row], view[key])
    seen_mixed += int(np.sum(batch["mix_lambda"] < 1))
    # The teacher on the batch's views (float64 numpy) matches the cached top-k.
    logits = _teacher_np(w, batch["image"])
    for t in TEMPS:
      top, values, tail = _np_topk(logits, K, t)
      np.testing.assert_array_equal(batch["teacher_topk_indices"], top)
      np.testing.assert_allclose(batch["teacher_topk_logits"], values, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(batch[topk_cache.tail_column(t)], tail, rtol=1e-5, atol=1e-5)
  assert step + 1 == steps and seen_mixed > 0
  assert batch["teacher_topk_indices"].dtype == np.int32
  # Random access by (epoch, index), as each host reads its own rows.
  top = cache.topk(1, [19, 0], temperature=4.0)
  views = np.stack([data.example_view(arrays, i, epoch=1, seed=SEED, augment=augment)["image"]
                    for i in (19, 0)])
  np.testing.assert_allclose(top.logits, _np_topk(_teacher_np(w, views), K, 4.0)[1],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(IndexError, match="epochs 0..1"):
    cache.lookup(2, [0])


def test_a_cache_for_another_run_is_refused_naming_the_field(written, tmp_path):
  path, arrays, w, augment, spec = written
  changed = {
      "seed": dataclasses.replace(spec, seed=SEED + 1),
      "teacher": _spec(arrays, augment, _weights(seed=2)),
      "augmentation": _spec(arrays, _augment(arrays, mode="cutmix"), w),
      "dataset": _spec({**arrays, "label": arrays["label"][::-1].copy()}, augment, w),
      "k": dataclasses.replace(spec, k=K + 1),
      "num_epochs": dataclasses.replace(spec, num_epochs=EPOCHS + 1),
      "temperatures": dataclasses.replace(spec, temperatures=(2.0,)),
      "shuffle": dataclasses.replace(spec, shuffle=False),
  }
  for field, other in changed.items():
    with pytest.raises(topk_cache.CacheMismatchError, match=f"field '{field}'"):
      topk_cache.load(path, expect=other)
  # Fewer epochs and a subset of the temperatures are served by the same cache.
  topk_cache.load(path, expect=dataclasses.replace(spec, num_epochs=1, temperatures=(4.0,)))
  # A writer for another run does not mix its records into this cache.
  copy = str(tmp_path / "copy")
  shutil.copytree(path, copy)
  with pytest.raises(topk_cache.CacheMismatchError, match="field 'seed'"):
    topk_cache.write(copy, changed["seed"], _teacher_fn(w), arrays, augment=augment,
                     batch_size=4, num_shards=2, shard_index=0)


def test_a_partial_cache_is_detected_and_resumed(written, tmp_path):
  path, arrays, w, augment, spec = written

  def corrupt(name, fn):
    copy = str(tmp_path / name)
    shutil.copytree(path, copy)
    fn(copy)
    return copy

  one_shard = corrupt("one_shard", lambda p: os.remove(os.path.join(p, "shard-00001-of-00002.json")))
  with pytest.raises(topk_cache.PartialCacheError, match=r"shard\(s\) \[1\] of 2"):
    topk_cache.load(one_shard)
  no_epoch = corrupt("no_epoch", lambda p: os.remove(
      os.path.join(p, "epoch-00001.shard-00000-of-00002.array_record")))
  with pytest.raises(topk_cache.PartialCacheError, match="epoch 1, shard 0"):
    topk_cache.load(no_epoch)

  def shorten(p):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    name = os.path.join(p, "epoch-00000.shard-00001-of-00002.array_record")
    writer = array_record_module.ArrayRecordWriter(name, "group_size:1")
    writer.write(b"x" * 8)
    writer.close()

  with pytest.raises(topk_cache.PartialCacheError, match="holds 1 records, expected 10"):
    topk_cache.load(corrupt("short", shorten))

  def interrupt(p):  # shard 0 stopped after its first epoch: the second never finished
    meta_path = os.path.join(p, "shard-00000-of-00002.json")
    meta = json.load(open(meta_path))
    json.dump({**meta, "epochs_complete": 1}, open(meta_path, "w"))
    os.remove(os.path.join(p, "epoch-00001.shard-00000-of-00002.array_record"))

  interrupted = corrupt("interrupted", interrupt)
  with pytest.raises(topk_cache.PartialCacheError, match="shard 0 of 2 holds epochs 0..0 of 2"):
    topk_cache.load(interrupted)
  topk_cache.write(interrupted, spec, _teacher_fn(w), arrays, augment=augment, batch_size=4,
                   num_shards=2, shard_index=0)  # resumes with epoch 1
  resumed, full = topk_cache.load(interrupted, expect=spec), topk_cache.load(path)
  np.testing.assert_array_equal(resumed.records(1, np.arange(N)), full.records(1, np.arange(N)))
  with pytest.raises(FileNotFoundError, match="no top-k teacher cache"):
    topk_cache.load(tmp_path / "nothing")


def test_mixup_and_cutmix_views():
  # Example i's image is the constant i, so a mixed pixel tells which partner was drawn.
  n = 12
  arrays = {"image": np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None],
                                     (n, 8, 8, 1)).copy(),
            "label": (np.arange(n) % 5).astype(np.int32)}
  mixup = aug.mix(None, arrays, mode="mixup", alpha=0.5)
  cutmix = aug.mix(None, arrays, mode="cutmix", alpha=1.0)
  for i in range(n):
    ex = {k: v[i] for k, v in arrays.items()}
    out = mixup(ex, data.example_rng(3, 0, i))
    lam = float(out["mix_lambda"])
    value = float(out["image"][0, 0, 0])
    np.testing.assert_allclose(out["image"], value)
    if lam < 1:  # value = lam * i + (1 - lam) * j
      j = round((value - lam * i) / (1 - lam))
      assert abs(lam * i + (1 - lam) * j - value) < 1e-4 and out["mix_label"] == j % 5
    out = cutmix(ex, data.example_rng(3, 0, i))
    img = out["image"][..., 0]
    kept = np.mean(img == i)
    others = np.unique(img[img != i])
    assert len(others) <= 1
    if others.size:
      np.testing.assert_allclose(float(out["mix_lambda"]), kept, atol=1e-6)
      ys, xs = np.nonzero(img != i)  # the pasted region is one box
      assert np.all(img[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == others[0])
      assert out["mix_label"] == int(others[0]) % 5
    else:  # not mixed, or mixed with itself
      assert out["mix_lambda"] == 1 or out["mix_label"] == ex["label"]
  # A pure function of the generator's seed; another epoch draws another view.
  ex = {k: v[4] for k, v in arrays.items()}
  a, b = cutmix(ex, data.example_rng(3, 0, 4)), cutmix(ex, data.example_rng(3, 0, 4))
  np.testing.assert_array_equal(a["image"], b["image"])
  views = [mixup(ex, data.example_rng(3, e, 4))["mix_lambda"] for e in range(4)]
  assert len(set(map(float, views))) > 1
  no_mix = aug.mix(None, arrays, prob=0.0)(ex, data.example_rng(3, 0, 4))
  assert no_mix["mix_lambda"] == 1 and no_mix["mix_label"] == ex["label"]
  with pytest.raises(ValueError, match="mode"):
    aug.mix(None, arrays, mode="mosaic")
  with pytest.raises(ValueError, match="needs a numpy Generator"):
    mixup(ex, None)
