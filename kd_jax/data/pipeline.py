"""Deterministic, resumable Grain batching over any random-access source.

A batch is a pure function of (seed, step): step s belongs to epoch e = s // steps_per_epoch,
epoch e visits the examples in a permutation seeded by (seed, e), and an optional per-example
augmentation draws from a generator seeded by (seed, e, position of the example in the epoch).
So `start_step=s` yields exactly what a fresh iterator yields from step s on, whatever the
number of prefetch threads, and a resumed training run sees the same data as an uninterrupted
one. The pipeline is a `grain.MapDataset` over step indices (mapped to batches, sliced at
`start_step`) turned into a threaded, prefetching `grain.IterDataset`.

Batches never cross an epoch boundary: with `drop_remainder=True` each epoch has
floor(N / batch_size) full batches, otherwise ceil(N / batch_size) with a smaller last one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import functools
import sys
from typing import Any, Protocol

import grain
import numpy as np

Example = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]
# augment(example, rng) -> example; rng is a numpy Generator (None for eval transforms).
Augment = Callable[[Example, "np.random.Generator | None"], Example]

# Upper bound on the step index of an endless (num_epochs=None) iterator.
_ENDLESS_STEPS = sys.maxsize // 2


class RandomAccessSource(Protocol):
  """What `batches` reads from: a length and per-example dicts (e.g. a TFDS data source)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    ...


class ArraySource:
  """A dict of equally long arrays seen as a random-access source of examples.

  Gathering a batch of indices is one vectorised `take` per key (no per-example Python loop).
  """

  def __init__(self, arrays: Mapping[str, Any]):
    if not arrays:
      raise ValueError("arrays must hold at least one key, got an empty mapping.")
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: (v.shape[0] if v.ndim else None) for k, v in self.arrays.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
      raise ValueError(
          "every array must have the same leading (example) size, got shapes "
          f"{ {k: v.shape for k, v in self.arrays.items()} }.")
    self._len = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Example:
    return {k: v[index] for k, v in self.arrays.items()}

  def gather(self, indices: np.ndarray) -> Batch:
    return {k: np.take(v, indices, axis=0) for k, v in self.arrays.items()}


def as_source(arrays) -> RandomAccessSource:
  """A dict of arrays becomes an `ArraySource`; anything with len and [i] is used as is."""
  if isinstance(arrays, Mapping):
    return ArraySource(arrays)
  if hasattr(arrays, "__len__") and hasattr(arrays, "__getitem__"):
    return arrays
  raise ValueError(
      "expected a dict of arrays or a random-access source with __len__ and __getitem__, "
      f"got {type(arrays).__name__}.")


def _stack(examples: Sequence[Mapping[str, Any]]) -> Batch:
  keys = examples[0].keys()
  return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in keys}


def _read(source: RandomAccessSource, indices: np.ndarray) -> list[Example]:
  """Reads examples one by one, or in one call where the source has `__getitems__`."""
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    return [dict(ex) for ex in getitems([int(i) for i in indices])]
  return [dict(source[int(i)]) for i in indices]


def _gather(source: RandomAccessSource, indices: np.ndarray) -> Batch:
  if isinstance(source, ArraySource):
    return source.gather(indices)
  return _stack(_read(source, indices))


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  """floor(N / B) batches per epoch with `drop_remainder`, else ceil(N / B)."""
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def _check_batching(num_examples: int, batch_size: int, drop_remainder: bool,
                    num_shards: int, shard_index: int) -> None:
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got batch_size={batch_size}.")
  if num_examples == 0:
    raise ValueError("cannot batch an empty source (0 examples).")
  if drop_remainder and batch_size > num_examples:
    raise ValueError(
        f"batch_size={batch_size} is larger than the {num_examples} examples; with "
        "drop_remainder=True no batch would ever be produced.")
  if num_shards <= 0 or not 0 <= shard_index < num_shards:
    raise ValueError(
        f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, "
        f"num_shards={num_shards}.")
  if batch_size % num_shards:
    raise ValueError(
        f"the global batch_size={batch_size} must be divisible by num_shards={num_shards}.")


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng((seed, epoch)).permutation(num_examples)


@functools.lru_cache(maxsize=4)
def _epoch_positions(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  order = _epoch_order(num_examples, seed, epoch, shuffle)
  positions = np.empty(num_examples, np.int64)
  positions[order] = np.arange(num_examples)
  return positions


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The example indices of `epoch` in visiting order: position p holds example `order[p]`."""
  return _epoch_order(num_examples, seed, epoch, shuffle).copy()


def epoch_positions(num_examples: int, seed: int, epoch: int, shuffle: bool = True
                    ) -> np.ndarray:
  """The inverse of `epoch_order`: `positions[i]` is where example i is visited in `epoch`."""
  return _epoch_positions(num_examples, seed, epoch, shuffle).copy()


def example_view(arrays, index: int, *, epoch: int, seed: int, augment: Augment | None,
                 shuffle: bool = True) -> Example:
  """Example `index` as `batches` yields it in `epoch`: `augment(example, example_rng(seed,
  epoch, p))` with p its position in the epoch's permutation (no augmentation: the example).

  So every augmented view is a pure function of (seed, epoch, example index), whatever the batch
  size, the number of hosts or the step the iterator was started at; a teacher-output cache keyed
  by (epoch, index) (`kd_jax.data.topk_cache`) relies on it.
  """
  source = as_source(arrays)
  n = len(source)
  if not 0 <= int(index) < n:
    raise IndexError(f"example index {index} is outside [0, {n}).")
  example = dict(source[int(index)])
  if augment is None:
    return example
  position = int(_epoch_positions(n, seed, epoch, shuffle)[int(index)])
  return augment(example, example_rng(seed, epoch, position))


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The generator of the example at `position` (0-based, within the epoch) of `epoch`.

  Seeded by the tuple (seed, epoch, position) through numpy's SeedSequence, so every example
  of every epoch draws from an independent, reproducible stream.
  """
  return np.random.default_rng((seed, epoch, position))


def _read_options(prefetch: int, num_threads: int | None) -> grain.ReadOptions:
  if prefetch < 0:
    raise ValueError(f"prefetch must be >= 0, got prefetch={prefetch}.")
  if num_threads is None:
    num_threads = min(prefetch, 2)
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def batches(arrays, *, batch_size: int, seed: int, shuffle: bool = True,
            drop_remainder: bool = True, augment: Augment | None = None,
            num_epochs: int | None = None, start_step: int = 0, prefetch: int = 2,
            num_threads: int | None = None, num_shards: int = 1,
            shard_index: int = 0,
            extras: Callable[[int, np.ndarray], Mapping[str, Any]] | None = None
            ) -> Iterator[Batch]:
  """Iterates over shuffled (optionally augmented) batches, reproducibly and resumably.

  Step s is epoch e = s // K (K = `steps_per_epoch(N, batch_size, drop_remainder)`), rows
  [(s mod K) * B, (s mod K + 1) * B) of the permutation of range(N) drawn from
  `np.random.default_rng((seed, e))` (each epoch reshuffled; identity order if not `shuffle`).
  The example at position p of epoch e is passed through `augment(example, example_rng(seed,
  e, p))`, so augmentations too depend only on (seed, step), never on iteration history or
  thread timing. Same recipe as Grain's `MapDataset.shuffle(seed).repeat()`, per-epoch seeds
  (grain/_src/python/dataset/transformations/shuffle.py), with batches kept inside epochs.

  Args:
    arrays: a dict of equally long arrays (gathered vectorised) or a random-access source of
      example dicts such as `tfds.data_source(...)`.
    batch_size: the global batch size B.
    seed: seeds shuffling and augmentation.
    shuffle: reshuffle every epoch; otherwise the natural order.
    drop_remainder: drop each epoch's last incomplete batch (static shapes for `jit`).
    augment: optional per-example transform `augment(example, rng) -> example` on numpy arrays
      (see `kd_jax.data.augment`).
    num_epochs: number of passes; None repeats forever.
    start_step: the first step to produce: exactly the batches a fresh iterator yields from
      step `start_step` on.
    prefetch: number of batches computed ahead in background threads (0: synchronous).
    num_threads: threads computing batches; default min(prefetch, 2).
    num_shards: split every global batch into this many contiguous row blocks (hosts).
    shard_index: the block this process yields (its `jax.process_index()` for multi-host).
    extras: optional `extras(epoch, indices) -> {key: array [len(indices), ...]}` called for
      every (host block of a) batch with the epoch and the dataset indices of its rows; its
      arrays join the batch, row for row (e.g. `kd_jax.data.topk_cache.TopKCache.lookup`, the
      teacher's cached outputs on exactly these views).

  Returns:
    An iterator of dicts of numpy arrays with the source's keys, each of leading size
    B / num_shards (smaller only for an epoch's last batch when not `drop_remainder`).
  """
  source = as_source(arrays)
  n = len(source)
  _check_batching(n, batch_size, drop_remainder, num_shards, shard_index)
  if num_epochs is not None and num_epochs < 0:
    raise ValueError(f"num_epochs must be >= 0 or None, got num_epochs={num_epochs}.")
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got start_step={start_step}.")
  per_epoch = steps_per_epoch(n, batch_size, drop_remainder)
  total = _ENDLESS_STEPS if num_epochs is None else per_epoch * num_epochs
  shard_size = batch_size // num_shards

  def make_batch(step: int) -> Batch:
    epoch, k = divmod(int(step), per_epoch)
    begin = k * batch_size + shard_index * shard_size
    end = min(begin + shard_size, n, (k + 1) * batch_size)
    positions = np.arange(begin, max(begin, end))
    indices = _epoch_order(n, seed, epoch, shuffle)[positions]
    if augment is None:
      batch = _gather(source, indices)
    else:
      batch = _stack([augment(ex, example_rng(seed, epoch, int(p)))
                      for ex, p in zip(_read(source, indices), positions)])
    if extras is not None:
      for key, value in extras(epoch, indices).items():
        if key in batch:
          raise ValueError(f"extras returned the key {key!r}, which the batch already has.")
        batch[key] = value
    return batch

  ds = grain.MapDataset.range(min(start_step, total), total).map(make_batch)
  return iter(ds.to_iter_dataset(_read_options(prefetch, num_threads)))


def eval_batches(arrays, *, batch_size: int, transform: Augment | None = None,
                 prefetch: int = 2, num_threads: int | None = None) -> Iterator[Batch]:
  """Every example exactly once, in order, in fixed-size batches with a validity mask.

  The last batch is padded with zeros up to `batch_size` (static shapes, so a jitted eval step
  compiles once) and every batch carries `"mask"`: bool [B], True for real examples. Reduce
  metrics as sum(metric * mask) / max(sum(mask), 1).

  Args:
    arrays: a dict of equally long arrays or a random-access source of example dicts.
    batch_size: the batch size B.
    transform: optional deterministic per-example transform, called as
      `transform(example, None)` (e.g. `augment.compose(augment.to_float, normalize)`).
    prefetch: number of batches computed ahead in background threads.
    num_threads: threads computing batches; default min(prefetch, 2).

  Returns:
    An iterator of ceil(N / B) dicts of numpy arrays, the source's keys plus "mask".
  """
  source = as_source(arrays)
  n = len(source)
  _check_batching(n, batch_size, False, 1, 0)
  num_batches = steps_per_epoch(n, batch_size, drop_remainder=False)

  def make_batch(step: int) -> Batch:
    indices = np.arange(step * batch_size, min((step + 1) * batch_size, n))
    if transform is None:
      batch = _gather(source, indices)
    else:
      batch = _stack([transform(ex, None) for ex in _read(source, indices)])
    pad = batch_size - indices.shape[0]
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    batch["mask"] = np.arange(batch_size) < indices.shape[0]
    return batch

  ds = grain.MapDataset.range(num_batches).map(make_batch)
  return iter(ds.to_iter_dataset(_read_options(prefetch, num_threads)))
