"""kd_jax.data.glue: the hashing tokenizer by hand; TFDS GLUE sources and batches on mock data."""

import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax.data import glue

N = 12


@pytest.fixture
def mock_tfds(tfds_mock_data):
  tfds_mock_data(N)


def _hand_id(word, vocab_size):
  return 3 + zlib.crc32(word.encode()) % (vocab_size - 3)


def test_tokenizer_single_text_by_hand():
  tok = glue.HashTokenizer(vocab_size=100, max_len=8)
  out = tok.encode(b"Hello, World!")
  words = ["hello", ",", "world", "!"]
  expected = [1] + [_hand_id(w, 100) for w in words] + [2, 0, 0]
  np.testing.assert_array_equal(out, expected)
  assert out.dtype == np.int32
  assert all(3 <= i < 100 for i in out[1:5])


def test_tokenizer_pair_truncates_longest_first():
  tok = glue.HashTokenizer(vocab_size=50, max_len=8)
  a, b = "a b c d e f", "x y"
  out = tok.encode(a, b)
  # budget 8 - 3 = 5 pieces: a loses its tail until 3 + 2 fit.
  expected = ([1] + [_hand_id(w, 50) for w in "a b c".split()] + [2]
              + [_hand_id(w, 50) for w in "x y".split()] + [2])
  np.testing.assert_array_equal(out, expected)


def test_tokenizer_bad_arguments():
  with pytest.raises(ValueError, match="vocab_size"):
    glue.HashTokenizer(vocab_size=3)
  with pytest.raises(ValueError, match="max_len"):
    glue.HashTokenizer(max_len=2)
  with pytest.raises(ValueError, match="one text or a pair"):
    glue.HashTokenizer().encode("a", "b", "c")
  with pytest.raises(ValueError, match="unknown text task 'nope'"):
    glue.task("nope")


@pytest.mark.parametrize("name", ["sst2", "rte", "mnli", "anli_r1"])
def test_text_source_tokenises_mock_examples(mock_tfds, name):
  tok = glue.HashTokenizer(vocab_size=64, max_len=16)
  task = glue.task(name)
  import tensorflow_datasets.text.glue, tensorflow_datasets.text.anli  # noqa: F401,E401
  raw = tfds.data_source(task.tfds_name, split="train")
  src = glue.text_source(name, "train", tokenizer=tok)
  assert len(src) == N
  for i in (0, N - 1):
    ex = src[i]
    expected = tok.encode(*(raw[i][k] for k in task.text_keys))
    np.testing.assert_array_equal(ex["tokens"], expected)
    assert ex["tokens"].shape == (16,) and ex["tokens"][0] == tok.CLS
    assert 0 <= int(ex["label"]) < task.num_classes


def test_glue_batches_train_and_eval(mock_tfds):
  tok = glue.HashTokenizer(vocab_size=64, max_len=16)
  it = glue.glue("rte", "train", tokenizer=tok, batch_size=4, train=True, seed=0, num_epochs=1,
                 prefetch=0)
  batches = list(it)
  assert len(batches) == N // 4
  assert batches[0]["tokens"].shape == (4, 16) and batches[0]["tokens"].dtype == np.int32
  ev = list(glue.glue("rte", "validation", tokenizer=tok, batch_size=5, train=False, prefetch=0))
  assert [b["tokens"].shape[0] for b in ev] == [5, 5, 5]
  assert int(sum(b["mask"].sum() for b in ev)) == N
  arrays = glue.load_arrays("rte", "validation", tokenizer=tok)
  np.testing.assert_array_equal(arrays["tokens"],
                                np.concatenate([b["tokens"][b["mask"]] for b in ev]))


def test_splits_of():
  assert glue.splits_of("mnli", dev_fraction=0.05) == {
      "train": "train[:95%]", "dev": "train[95%:]", "test": "validation_matched"}
  with pytest.raises(ValueError, match="dev_fraction"):
    glue.splits_of("rte", dev_fraction=0.0)
