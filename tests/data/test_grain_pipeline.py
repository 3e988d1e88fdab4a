"""Grain batching: epochs are permutations, batches depend only on (seed, step), resumption is exact."""

import itertools

import numpy as np
import pytest

from kd_jax import data


def _arrays(n=10, d=3):
  return {
      "image": np.arange(n * d, dtype=np.float32).reshape(n, d),
      "label": np.arange(n, dtype=np.int32),
  }


def _take(it, k):
  return list(itertools.islice(it, k))


def _labels(batches):
  return [b["label"].tolist() for b in batches]


def _noise_augment(example, rng):
  # Adds a random offset: the result depends on the per-example generator only.
  out = dict(example)
  out["image"] = example["image"] + rng.uniform(size=example["image"].shape).astype(np.float32)
  return out


def test_each_epoch_is_a_fresh_permutation():
  arrays = _arrays(10)
  out = list(data.batches(arrays, batch_size=4, seed=3, num_epochs=3))
  assert len(out) == 3 * (10 // 4) == 3 * data.steps_per_epoch(10, 4)
  epochs = [np.concatenate([b["label"] for b in out[2 * e:2 * e + 2]]) for e in range(3)]
  for ep in epochs:
    assert len(set(ep.tolist())) == 8  # no repeats inside an epoch
  assert len({tuple(ep.tolist()) for ep in epochs}) == 3  # reshuffled every epoch
  # Image rows travel with their labels.
  for b in out:
    np.testing.assert_array_equal(b["image"], arrays["image"][b["label"]])
    assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32


def test_no_drop_remainder_covers_every_example_each_epoch():
  out = list(data.batches(_arrays(10), batch_size=4, seed=0, num_epochs=2,
                          drop_remainder=False))
  assert [len(b["label"]) for b in out] == [4, 4, 2, 4, 4, 2]
  for e in range(2):
    seen = np.concatenate([b["label"] for b in out[3 * e:3 * e + 3]])
    assert sorted(seen.tolist()) == list(range(10))


def test_no_shuffle_is_natural_order():
  out = _take(data.batches(_arrays(10), batch_size=5, seed=0, shuffle=False), 4)
  assert _labels(out) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] * 2


def test_same_seed_same_batches_other_seed_other_batches():
  a = _labels(_take(data.batches(_arrays(), batch_size=4, seed=7), 6))
  b = _labels(_take(data.batches(_arrays(), batch_size=4, seed=7, prefetch=0), 6))
  c = _labels(_take(data.batches(_arrays(), batch_size=4, seed=8), 6))
  assert a == b
  assert a != c


@pytest.mark.parametrize("start_step", [0, 1, 2, 5])
def test_resume_from_step_matches_fresh_iterator(start_step):
  kw = dict(batch_size=4, seed=11, augment=_noise_augment)
  fresh = _take(data.batches(_arrays(), **kw), start_step + 4)[start_step:]
  resumed = _take(data.batches(_arrays(), start_step=start_step, prefetch=4, num_threads=3,
                               **kw), 4)
  for f, r in zip(fresh, resumed, strict=True):
    np.testing.assert_array_equal(f["label"], r["label"])
    np.testing.assert_array_equal(f["image"], r["image"])


def test_resume_with_finite_epochs_yields_the_tail():
  kw = dict(batch_size=3, seed=1, num_epochs=2)
  fresh = list(data.batches(_arrays(), **kw))
  assert _labels(list(data.batches(_arrays(), start_step=4, **kw))) == _labels(fresh[4:])
  assert list(data.batches(_arrays(), start_step=len(fresh) + 5, **kw)) == []


def test_augment_uses_the_per_example_generator():
  seed = 5
  out = _take(data.batches(_arrays(), batch_size=4, seed=seed, augment=_noise_augment), 3)
  base = _arrays()["image"]
  per_epoch = data.steps_per_epoch(10, 4)
  order = {e: np.random.default_rng((seed, e)).permutation(10) for e in range(2)}
  for step, b in enumerate(out):
    epoch, k = divmod(step, per_epoch)
    for j in range(4):
      pos = k * 4 + j
      idx = order[epoch][pos]
      assert b["label"][j] == idx
      noise = np.random.default_rng((seed, epoch, pos)).uniform(size=3).astype(np.float32)
      np.testing.assert_array_equal(b["image"][j], base[idx] + noise)


def test_shards_split_the_global_batch():
  kw = dict(batch_size=4, seed=2)
  whole = _take(data.batches(_arrays(), **kw), 3)
  parts = [_take(data.batches(_arrays(), num_shards=2, shard_index=h, **kw), 3)
           for h in range(2)]
  for s in range(3):
    np.testing.assert_array_equal(
        np.concatenate([parts[0][s]["label"], parts[1][s]["label"]]), whole[s]["label"])


def test_works_on_a_list_of_example_dicts():
  examples = [{"image": np.full((2,), i, np.float32), "label": np.int32(i)} for i in range(6)]
  out = _take(data.batches(examples, batch_size=3, seed=0), 2)
  ref = _take(data.batches(_arrays(6, 2), batch_size=3, seed=0), 2)
  assert _labels(out) == _labels(ref)
  assert out[0]["image"].shape == (3, 2)


def test_eval_batches_cover_everything_once_with_mask():
  arrays = _arrays(10)
  out = list(data.eval_batches(arrays, batch_size=4))
  assert len(out) == 3
  for b in out:
    assert b["image"].shape == (4, 3) and b["mask"].dtype == bool
  labels = np.concatenate([b["label"][b["mask"]] for b in out])
  np.testing.assert_array_equal(labels, np.arange(10))
  assert out[-1]["mask"].tolist() == [True, True, False, False]
  np.testing.assert_array_equal(out[-1]["image"][2:], 0.0)
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in out])[:10], arrays["image"])


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="same leading"):
    data.batches({"image": np.zeros((3, 2)), "label": np.zeros(4)}, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="batch_size=20"):
    data.batches(_arrays(10), batch_size=20, seed=0)
  with pytest.raises(ValueError, match="divisible by num_shards"):
    data.batches(_arrays(10), batch_size=3, seed=0, num_shards=2)
  with pytest.raises(ValueError, match="start_step"):
    data.batches(_arrays(10), batch_size=2, seed=0, start_step=-1)
