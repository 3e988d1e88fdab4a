"""GLUE-style text classification from TFDS, tokenised with a hashing tokenizer that needs no files.

PTLoss's domain (Zhang et al., KDD 2024): NLU classification. Tasks are read with
`tfds.data_source` (array_record, no TensorFlow needed), tokenised per example with
`HashTokenizer` (words and punctuation hashed into a fixed vocabulary, so nothing is downloaded
or built), padded or truncated to a static length and batched by `kd_jax.data.batches` (Grain).

    tok = HashTokenizer(vocab_size=8192, max_len=128)
    train = glue("sst2", "train", tokenizer=tok, batch_size=32, seed=0, train=True)
    batch = next(train)     # {"tokens": int32 [32, 128], "label": int32 [32]}

GLUE's test labels are hidden (-1), so experiments report on the validation split and carve
their dev split for PTLoss's coefficient selection out of the training split ("train[-5%:]").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import dataclasses
import os
import re
import zlib
from typing import Any

import numpy as np

from kd_jax.data import pipeline
from kd_jax.data import sources


@dataclasses.dataclass(frozen=True)
class TextTask:
  """One classification task: TFDS name, the text fields (one or a pair), classes, eval split."""

  tfds_name: str
  text_keys: tuple[str, ...]
  num_classes: int
  eval_split: str = "validation"


# The paper's domain (NLI / QA classification; its exact datasets were not available to us, BoolQ,
# RTE, CB, MNLI and ANLI are a low-confidence guess, docs/ptloss.md) and the rest of GLUE.
# super_glue's builder needs TensorFlow to be constructed (tfds 4.9.10).
TASKS: dict[str, TextTask] = {
    "sst2": TextTask("glue/sst2", ("sentence",), 2),
    "cola": TextTask("glue/cola", ("sentence",), 2),
    "mrpc": TextTask("glue/mrpc", ("sentence1", "sentence2"), 2),
    "qqp": TextTask("glue/qqp", ("question1", "question2"), 2),
    "qnli": TextTask("glue/qnli", ("question", "sentence"), 2),
    "rte": TextTask("glue/rte", ("sentence1", "sentence2"), 2),
    "mnli": TextTask("glue/mnli", ("premise", "hypothesis"), 3, "validation_matched"),
    "anli_r1": TextTask("anli/r1", ("context", "hypothesis"), 3),
    "anli_r2": TextTask("anli/r2", ("context", "hypothesis"), 3),
    "anli_r3": TextTask("anli/r3", ("context", "hypothesis"), 3),
    "boolq": TextTask("super_glue/boolq", ("question", "passage"), 2),
    "cb": TextTask("super_glue/cb", ("premise", "hypothesis"), 3),
}

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def task(name: str) -> TextTask:
  """The `TextTask` registered as `name` (a key of `TASKS`)."""
  if name not in TASKS:
    raise ValueError(f"unknown text task {name!r}; known tasks: {', '.join(sorted(TASKS))}.")
  return TASKS[name]


class HashTokenizer:
  """Lower-cased words and punctuation hashed into `vocab_size` ids; [CLS] a [SEP] b [SEP].

  Ids: 0 padding, 1 [CLS], 2 [SEP], and `3 + crc32(word) mod (vocab_size - 3)` for every word
  (the "hashing trick", Weinberger et al., ICML 2009): no vocabulary file and no pass over the
  data, the same ids on every machine (crc32 is stable, unlike Python's `hash`). A pair is
  truncated longest-first (as BERT's tokenizers) so that the whole fits `max_len`.
  """

  PAD, CLS, SEP = 0, 1, 2

  def __init__(self, vocab_size: int = 8192, max_len: int = 128, *, lowercase: bool = True):
    if vocab_size < 4:
      raise ValueError(f"vocab_size must be >= 4 (3 special ids), got {vocab_size}.")
    if max_len < 3:
      raise ValueError(f"max_len must be >= 3 ([CLS] x [SEP]), got {max_len}.")
    self.vocab_size = int(vocab_size)
    self.max_len = int(max_len)
    self.lowercase = lowercase

  def words(self, text) -> list[str]:
    """The word and punctuation pieces of `text` (str or UTF-8 bytes)."""
    if isinstance(text, (bytes, np.bytes_)):
      text = bytes(text).decode("utf-8", errors="replace")
    text = str(text)
    return _WORD.findall(text.lower() if self.lowercase else text)

  def ids(self, text) -> list[int]:
    """Hashed ids of `text`'s pieces, without special tokens."""
    n = self.vocab_size - 3
    return [3 + zlib.crc32(w.encode("utf-8")) % n for w in self.words(text)]

  def encode(self, *texts) -> np.ndarray:
    """int32 [max_len]: [CLS] a [SEP] (b [SEP]), truncated longest-first, zero-padded."""
    if not 1 <= len(texts) <= 2:
      raise ValueError(f"encode takes one text or a pair, got {len(texts)} texts.")
    parts = [self.ids(t) for t in texts]
    budget = self.max_len - 1 - len(parts)
    while sum(map(len, parts)) > budget:
      longest = max(range(len(parts)), key=lambda i: len(parts[i]))
      parts[longest].pop()
    out = [self.CLS]
    for p in parts:
      out += p + [self.SEP]
    tokens = np.zeros((self.max_len,), np.int32)
    tokens[:len(out)] = out
    return tokens


def _register_builders(tfds_name: str) -> None:
  """Imports the TFDS builder module of `tfds_name`: name lookup alone tries TensorFlow first."""
  import importlib  # pylint: disable=g-import-not-at-top
  module = {"glue": "glue", "super_glue": "super_glue", "anli": "anli"}.get(
      tfds_name.split("/")[0])
  if module:
    importlib.import_module(f"tensorflow_datasets.text.{module}")


def text_source(name: str, split: str, *, tokenizer: HashTokenizer,
                data_dir: str | os.PathLike | None = None, download: bool = True, source=None):
  """A task's split as a random-access source of {"tokens": int32 [L], "label": int32}.

  Args:
    name: a task of `TASKS` ("sst2", "rte", "mnli", "boolq", ...).
    split: TFDS split or slice, e.g. "train", "train[:95%]", "validation".
    tokenizer: the tokenizer (fixes the static length L).
    data_dir, download: as `kd_jax.data.tfds_source`.
    source: an already opened source of raw examples (default `tfds_source(task.tfds_name)`).

  Returns:
    A `MappedSource` tokenising each example when it is read.
  """
  t = task(name)
  if source is None:
    _register_builders(t.tfds_name)
    source = sources.tfds_source(t.tfds_name, split, data_dir=data_dir, download=download)

  def encode(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    missing = [k for k in t.text_keys if k not in example]
    if missing:
      raise ValueError(f"task {name!r} expects text fields {t.text_keys}, example has "
                       f"{sorted(example)}.")
    return {"tokens": tokenizer.encode(*(example[k] for k in t.text_keys)),
            "label": np.asarray(example["label"], np.int32)}

  return sources.MappedSource(source, encode)


def glue(name: str, split: str, *, tokenizer: HashTokenizer, batch_size: int, train: bool,
         seed: int = 0, data_dir: str | os.PathLike | None = None,
         num_epochs: int | None = None, start_step: int = 0, prefetch: int = 2,
         num_threads: int | None = None, num_shards: int = 1, shard_index: int = 0,
         download: bool = True, source=None) -> Iterator[dict[str, np.ndarray]]:
  """Batches of a text task through Grain: {"tokens": int32 [B, L], "label": int32 [B]}.

  train=True: `kd_jax.data.batches` (reshuffled every epoch, full batches, resumable at
  `start_step`, `num_shards` row blocks for multi-host). train=False: `eval_batches` (every
  example once, in order, the last batch zero-padded, plus a bool "mask").

  Args:
    name: a task of `TASKS`.
    split: TFDS split or slice.
    tokenizer: a `HashTokenizer`.
    batch_size: global batch size.
    train: training or evaluation pipeline.
    seed: seeds shuffling (train only).
    data_dir, download, source: as `text_source`.
    num_epochs, start_step, prefetch, num_threads, num_shards, shard_index: as
      `kd_jax.data.batches`.
  """
  src = text_source(name, split, tokenizer=tokenizer, data_dir=data_dir, download=download,
                    source=source)
  if train:
    return pipeline.batches(src, batch_size=batch_size, seed=seed, shuffle=True,
                            drop_remainder=True, num_epochs=num_epochs, start_step=start_step,
                            prefetch=prefetch, num_threads=num_threads, num_shards=num_shards,
                            shard_index=shard_index)
  return pipeline.eval_batches(src, batch_size=batch_size, prefetch=prefetch,
                               num_threads=num_threads)


def load_arrays(name: str, split: str, *, tokenizer: HashTokenizer,
                data_dir: str | os.PathLike | None = None, download: bool = True,
                source=None) -> dict[str, np.ndarray]:
  """A whole split tokenised into arrays {"tokens": [N, L], "label": [N]} (for small splits)."""
  src = text_source(name, split, tokenizer=tokenizer, data_dir=data_dir, download=download,
                    source=source)
  examples = src.__getitems__(range(len(src)))
  if not examples:
    return {"tokens": np.zeros((0, tokenizer.max_len), np.int32),
            "label": np.zeros((0,), np.int32)}
  return {k: np.stack([ex[k] for ex in examples]) for k in ("tokens", "label")}


def splits_of(name: str, *, dev_fraction: float = 0.05) -> dict[str, str]:
  """TFDS split strings for train / dev (PTLoss selection) / test (the labelled eval split)."""
  if not 0.0 < dev_fraction < 1.0:
    raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}.")
  pct = max(1, int(round(100 * dev_fraction)))
  return {"train": f"train[:{100 - pct}%]", "dev": f"train[{100 - pct}%:]",
          "test": task(name).eval_split}


__all__ = ["TASKS", "TextTask", "HashTokenizer", "task", "text_source", "glue", "load_arrays",
           "splits_of"]
