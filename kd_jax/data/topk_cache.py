"""A teacher cache that survives data augmentation: top-k teacher outputs keyed by (epoch, index).

`kd_jax.data.batches` makes every augmented view a pure function of (seed, epoch, example index)
(`pipeline.example_view`: the epoch's permutation is seeded by (seed, epoch), the example at
position p draws from `example_rng(seed, epoch, p)`, and `augment.mix` draws Mixup/CutMix partners
from the same generator). So the teacher's output on every view of a whole training run can be
computed once, before training, and read back beside the images: `write` runs the teacher over
the views of every epoch and stores, per (epoch, index), its top-k logits, their classes and the
tail's log-sum-exp at each requested temperature (what `kd_jax.losses.sparse_kd` needs); `load`
opens the cache, checks it, and `TopKCache.lookup` is the `extras` hook of `batches`, so each
batch carries `teacher_topk_logits`, `teacher_topk_indices` and `teacher_topk_tail_t<T>` for
exactly its rows (the `kd_topk` loss term reads them).

Layout of a cache directory::

    shard-00000-of-00002.json                             one per writer (host): the CacheSpec,
                                                          its index range, epochs completed
    epoch-00000.shard-00000-of-00002.array_record         records of examples [begin, end) of
    epoch-00000.shard-00001-of-00002.array_record         epoch 0, in index order; one file per
    ...                                                   (epoch, shard)

Record (epoch e, index i) is record i - begin of its file; the files in (epoch, shard) order
make one Grain `ArrayRecordDataSource` whose record `e * N + i` is (e, i), so any host reads any
rows by index. A record is the bytes of `logits` float32 [k], `indices` uint16 [k] (int32 beyond
65,536 classes) and `tail_logsumexp` float32 [len(temperatures)]. An epoch file is written under
a temporary name and renamed when complete, and the shard's JSON counts completed epochs, so an
interrupted writer leaves a detectably partial cache and `write` resumes it.

Integrity: the `CacheSpec` (teacher name and checksum of its variables, dataset checksum,
augmentation config plus a digest of a few augmented views, seed, shuffle, k, temperatures,
number of epochs and examples) is stored by every shard; `load(path, expect=spec)` refuses a
cache written for anything else with a `CacheMismatchError` naming the field, and a missing
shard, epoch or record raises `PartialCacheError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import glob
import hashlib
import json
import os
import re
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses
from kd_jax.data import pipeline
from kd_jax.data import teacher_cache

FORMAT_VERSION = 1
PREFIX = "teacher_topk_"
_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.json$")
_WRITER_OPTIONS = "group_size:1,uncompressed"  # random access by record; floats barely compress


class CacheMismatchError(ValueError):
  """The cache was written for another teacher, dataset, augmentation, seed, k or length."""


class PartialCacheError(ValueError):
  """The cache is incomplete: a shard, an epoch file or records are missing."""


# ------------------------------------------------------------------------------------ layout

def logits_column(prefix: str = PREFIX) -> str:
  """Batch key of the teacher's top-k logits, float32 [b, k]."""
  return prefix + "logits"


def indices_column(prefix: str = PREFIX) -> str:
  """Batch key of the top-k classes, int32 [b, k]."""
  return prefix + "indices"


def tail_column(temperature: float, prefix: str = PREFIX) -> str:
  """Batch key of the tail's log-sum-exp at `temperature`, float32 [b] (e.g. "..._tail_t4")."""
  return f"{prefix}tail_t{float(temperature):g}"


def _record_dtype(k: int, num_classes: int, num_temperatures: int) -> np.dtype:
  index_dtype = "<u2" if num_classes <= 65536 else "<i4"
  return np.dtype([("logits", "<f4", (k,)), ("indices", index_dtype, (k,)),
                   ("tail_logsumexp", "<f4", (num_temperatures,))])


def _epoch_file(epoch: int, shard: int, num_shards: int) -> str:
  return f"epoch-{epoch:05d}.shard-{shard:05d}-of-{num_shards:05d}.array_record"


def _shard_file(shard: int, num_shards: int) -> str:
  return f"shard-{shard:05d}-of-{num_shards:05d}.json"


def _shard_range(num_examples: int, shard: int, num_shards: int) -> tuple[int, int]:
  return shard * num_examples // num_shards, (shard + 1) * num_examples // num_shards


# ------------------------------------------------------------------------------------ spec

@dataclasses.dataclass(frozen=True)
class CacheSpec:
  """Everything a cached teacher output depends on; two runs may share a cache iff these agree.

  Attributes:
    teacher: the teacher's name and a checksum of its variables (`teacher_id`).
    dataset: a checksum of the dataset's arrays, or a name given for other sources.
    augmentation: the augmentation's config (canonical JSON) and a digest of a few of its views.
    seed: the data seed (shuffling and augmentation) of `kd_jax.data.batches`.
    shuffle: whether epochs are shuffled (positions, hence augmentation draws, depend on it).
    num_epochs: epochs cached (a run may use fewer).
    num_examples: dataset size N.
    k: number of teacher classes kept per example.
    temperatures: temperatures at which the tail's log-sum-exp is stored (a run may use a subset).
  """

  teacher: str
  dataset: str
  augmentation: str
  seed: int
  shuffle: bool
  num_epochs: int
  num_examples: int
  k: int
  temperatures: tuple[float, ...]

  def __post_init__(self):
    object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
    if self.k < 1:
      raise ValueError(f"k must be >= 1, got k={self.k}.")
    if not self.temperatures or not all(t > 0 for t in self.temperatures):
      raise ValueError(f"temperatures must be a non-empty list of positive numbers, got "
                       f"{self.temperatures}.")
    if self.num_epochs < 1 or self.num_examples < 1:
      raise ValueError(f"num_epochs and num_examples must be >= 1, got {self.num_epochs} and "
                       f"{self.num_examples}.")

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "temperatures": list(self.temperatures)}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> CacheSpec:
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def checksum(tree) -> str:
  """SHA-256 over every leaf's key path, dtype, shape and bytes (e.g. a teacher's variables)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def teacher_id(name: str, variables) -> str:
  """`"<name>:<checksum of variables, 16 hex digits>"`: which teacher wrote a cache."""
  return f"{name}:{checksum(variables)[:16]}"


def augmentation_id(arrays, augment, config, *, seed: int, shuffle: bool = True,
                    num_views: int = 4) -> str:
  """The augmentation's config as canonical JSON plus a digest of its first views.

  The digest covers examples 0..num_views-1 at epochs 0 and 1 (`pipeline.example_view`), so a
  change of the augmentation's code is noticed even when its config string is unchanged.
  """
  text = json.dumps(config, sort_keys=True, default=str)
  if augment is None:
    return f"{text}|views:none"
  source = pipeline.as_source(arrays)
  h = hashlib.sha256()
  for epoch in (0, 1):
    for index in range(min(num_views, len(source))):
      view = pipeline.example_view(source, index, epoch=epoch, seed=seed, augment=augment,
                                   shuffle=shuffle)
      for key in sorted(view):
        a = np.ascontiguousarray(np.asarray(view[key]))
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
  return f"{text}|views:{h.hexdigest()[:16]}"


def make_spec(arrays, *, teacher_name: str, teacher_variables, augment, augment_config,
              seed: int, num_epochs: int, k: int, temperatures: Sequence[float],
              shuffle: bool = True, dataset: str | None = None) -> CacheSpec:
  """The `CacheSpec` of a run: checksums of the teacher and the data, the augmentation's id.

  Args:
    arrays: the training set (dict of arrays, checksummed) or a random-access source (then
      `dataset` names it, e.g. "cifar100:train:3.0.2").
    teacher_name, teacher_variables: the teacher (`teacher_id`).
    augment: the per-example augmentation given to `batches` (None: none).
    augment_config: a JSON-able description of it (e.g. {"recipe": "cifar", "mix": "cutmix"}).
    seed, shuffle: as given to `batches`.
    num_epochs: epochs to cache.
    k: teacher classes kept per example.
    temperatures: the temperatures the losses will use (each stores one tail per example).
    dataset: the dataset's name, required when `arrays` is not a dict of arrays.
  """
  source = pipeline.as_source(arrays)
  if dataset is None:
    if not isinstance(source, pipeline.ArraySource):
      raise ValueError("make_spec: pass dataset='<name>' for a source that is not a dict of "
                       "arrays (its contents are not checksummed).")
    dataset = "sha256:" + teacher_cache.fingerprint(source.arrays)[:16]
  return CacheSpec(
      teacher=teacher_id(teacher_name, teacher_variables), dataset=str(dataset),
      augmentation=augmentation_id(source, augment, augment_config, seed=seed, shuffle=shuffle),
      seed=int(seed), shuffle=bool(shuffle), num_epochs=int(num_epochs),
      num_examples=len(source), k=int(k), temperatures=tuple(temperatures))


def _compare(path: str, cached: CacheSpec, expect: CacheSpec) -> None:
  """Raises CacheMismatchError naming the first field where `expect` cannot use `cached`."""
  for field in dataclasses.fields(CacheSpec):
    have, want = getattr(cached, field.name), getattr(expect, field.name)
    if field.name == "num_epochs":
      ok = want <= have
    elif field.name == "temperatures":
      ok = set(want) <= set(have)
    else:
      ok = have == want
    if not ok:
      raise CacheMismatchError(
          f"the top-k teacher cache at {path!r} does not fit this run: field {field.name!r} is "
          f"{have!r} in the cache but {want!r} here. Rebuild it with "
          "kd_jax.data.topk_cache.write, or point to the cache written for this run.")


# ------------------------------------------------------------------------------------ writing

def _atomic_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _array_record_module():
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  return array_record_module


def write(path: str | os.PathLike, spec: CacheSpec, teacher_fn: Callable[[Any], Any], arrays,
          *, augment, batch_size: int, num_shards: int = 1, shard_index: int = 0,
          devices: Sequence[jax.Device] | None = None, overwrite: bool = False,
          prefetch: int = 2, input_key: str = "image") -> dict[str, Any]:
  """One teacher pass over every epoch's augmented views, stored as top-k records.

  This process writes examples [shard_index * N // num_shards, (shard_index + 1) * N //
  num_shards) of every epoch (one process per host: `num_shards=jax.process_count(),
  shard_index=jax.process_index()`; the shards need no coordination). Views are built as
  `pipeline.example_view` (exactly what `batches(..., seed=spec.seed, augment=augment)` yields)
  in Grain worker threads, in batches of `batch_size` (the last one padded, so `teacher_fn`
  compiles once), optionally split over `devices` (e.g. `jax.local_devices()`) along the batch.
  A shard already in `path` with the same spec resumes after its last complete epoch.

  Args:
    path: the cache directory (created if missing; shared by all hosts' writers).
    spec: the run's `CacheSpec` (`make_spec`).
    teacher_fn: `teacher_fn(images [batch_size, ...]) -> logits [batch_size, num_classes]`, the
      frozen teacher in inference mode (typically a jitted `kd_jax.train.step.teacher_outputs`).
    arrays: the dataset (dict of arrays or random-access source) the spec was made from.
    augment: the augmentation the spec was made with.
    batch_size: teacher batch size (a multiple of len(devices)).
    num_shards, shard_index: this writer's share of the examples.
    devices: devices to shard each teacher batch over (None: where `teacher_fn` puts it).
    overwrite: discard this shard's records written for another spec.
    prefetch: batches of views built ahead in background threads.
    input_key: the view's entry fed to the teacher.

  Returns:
    This shard's metadata (the contents of its JSON file).

  Raises:
    CacheMismatchError: `path` holds a cache (of any shard) written for another spec or another
      number of shards, and `overwrite` is False.
    ValueError: non-finite teacher outputs, or k larger than the number of classes.
  """
  path = os.fspath(path)
  source = pipeline.as_source(arrays)
  n = len(source)
  if n != spec.num_examples:
    raise CacheMismatchError(f"the dataset has {n} examples, the spec {spec.num_examples}; "
                             "make the spec from this dataset.")
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index}, {num_shards}.")
  if batch_size < 1 or (devices and batch_size % len(devices)):
    raise ValueError(f"batch_size={batch_size} must be >= 1 and a multiple of the "
                     f"{len(devices or [1])} devices.")
  os.makedirs(path, exist_ok=True)
  for other in sorted(glob.glob(os.path.join(path, "shard-*.json"))):
    meta = _read_json(other)
    if meta.get("num_shards") != num_shards or CacheSpec.from_json(meta["spec"]) != spec:
      if overwrite:
        os.remove(other)
        continue
      cached = CacheSpec.from_json(meta["spec"])
      if cached != spec:
        _compare_exact(path, cached, spec)
      raise CacheMismatchError(
          f"{path!r} holds a cache written by {meta.get('num_shards')} shards, this writer uses "
          f"num_shards={num_shards}; pass overwrite=True to replace it.")
  begin, end = _shard_range(n, shard_index, num_shards)
  meta_path = os.path.join(path, _shard_file(shard_index, num_shards))
  meta = _read_json(meta_path) if os.path.exists(meta_path) else None
  start_epoch = 0 if meta is None or overwrite else int(meta["epochs_complete"])
  put = _placer(devices)
  topk_fn = jax.jit(lambda z: _topk_records(z, spec.k, spec.temperatures))
  module = _array_record_module()
  num_classes = None if meta is None else meta["num_classes"]
  chunks = [(b, min(b + batch_size, end)) for b in range(begin, end, batch_size)]

  for epoch in range(start_epoch, spec.num_epochs):
    def views(chunk, epoch=epoch):
      lo, hi = chunk
      idx = np.arange(lo, lo + batch_size).clip(max=hi - 1)  # pad by repeating the last row
      rows = [pipeline.example_view(source, int(i), epoch=epoch, seed=spec.seed,
                                    augment=augment, shuffle=spec.shuffle) for i in idx]
      return hi - lo, np.stack([np.asarray(r[input_key]) for r in rows])

    ds = grain.MapDataset.source(chunks).map(views)
    final = os.path.join(path, _epoch_file(epoch, shard_index, num_shards))
    tmp = final + ".partial"
    writer = module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    try:
      options = grain.ReadOptions(num_threads=min(prefetch, 2), prefetch_buffer_size=prefetch)
      for count, images in ds.to_iter_dataset(options):
        logits = teacher_fn(put(images))
        if num_classes is None:
          num_classes = int(np.shape(logits)[-1])
          if spec.k > num_classes:
            raise ValueError(f"k={spec.k} exceeds the teacher's {num_classes} classes.")
        if np.shape(logits) != (batch_size, num_classes):
          raise ValueError(f"teacher_fn must return logits [{batch_size}, {num_classes}], "
                           f"got shape {np.shape(logits)}.")
        values, indices, tails = jax.device_get(topk_fn(jnp.asarray(logits)))
        if not (np.all(np.isfinite(values[:count])) and np.all(~np.isnan(tails[:count]))):
          raise ValueError(f"the teacher's logits are not finite on epoch {epoch} (examples "
                           f"from {begin}); refusing to cache them at {path!r}.")
        rec = np.zeros(count, _record_dtype(spec.k, num_classes, len(spec.temperatures)))
        rec["logits"], rec["indices"], rec["tail_logsumexp"] = (
            values[:count], indices[:count], tails[:count])
        for row in rec:
          writer.write(row.tobytes())
    finally:
      writer.close()
    os.replace(tmp, final)
    meta = {"format_version": FORMAT_VERSION, "spec": spec.to_json(), "num_shards": num_shards,
            "shard_index": shard_index, "begin": begin, "end": end,
            "num_classes": num_classes, "epochs_complete": epoch + 1}
    _atomic_json(meta_path, meta)
  return meta


def _compare_exact(path, cached: CacheSpec, expect: CacheSpec) -> None:
  for field in dataclasses.fields(CacheSpec):
    have, want = getattr(cached, field.name), getattr(expect, field.name)
    if have != want:
      raise CacheMismatchError(
          f"{path!r} holds a top-k teacher cache written for another run: field "
          f"{field.name!r} is {have!r} there but {want!r} here; pass overwrite=True to "
          "replace it, or write to another directory.")


def _placer(devices):
  if not devices or len(devices) == 1:
    return (lambda x: jax.device_put(x, devices[0])) if devices else (lambda x: x)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  return lambda x: jax.device_put(x, sharding)


def _topk_records(logits, k, temperatures):
  tops = [losses.teacher_topk(logits, k=k, temperature=t) for t in temperatures]
  return tops[0].logits, tops[0].indices, jnp.stack([t.tail_logsumexp for t in tops], -1)


# ------------------------------------------------------------------------------------ reading

def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


class TopKCache:
  """A complete top-k teacher cache, read by (epoch, index) through Grain.

  Attributes:
    path: the cache directory.
    spec: the `CacheSpec` it was written for.
    num_classes: the teacher's number of classes.
    source: a `grain.sources.ArrayRecordDataSource` whose record `epoch * N + index` holds the
      teacher's top-k on that view (raw bytes; `decode` reads them).
  """

  def __init__(self, path: str | os.PathLike, *, expect: CacheSpec | None = None,
               prefix: str = PREFIX):
    self.path = os.fspath(path)
    self.prefix = prefix
    metas = {}
    for name in sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []:
      m = _SHARD_RE.match(name)
      if m:
        metas[(int(m.group(1)), int(m.group(2)))] = _read_json(os.path.join(self.path, name))
    if not metas:
      raise FileNotFoundError(f"no top-k teacher cache at {self.path!r} (no shard-*.json); "
                              "write one with kd_jax.data.topk_cache.write.")
    counts = {h for _, h in metas}
    if len(counts) != 1:
      raise PartialCacheError(f"{self.path!r} mixes caches written by {sorted(counts)} shards.")
    num_shards = counts.pop()
    missing = [s for s in range(num_shards) if (s, num_shards) not in metas]
    if missing:
      raise PartialCacheError(
          f"top-k teacher cache {self.path!r} is partial: shard(s) {missing} of {num_shards} "
          "have not written anything (their writer never ran or has not finished an epoch).")
    metas = [metas[(s, num_shards)] for s in range(num_shards)]
    for meta in metas:
      if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"top-k cache {self.path!r} has format_version="
                         f"{meta.get('format_version')}, this library reads {FORMAT_VERSION}.")
    self.spec = CacheSpec.from_json(metas[0]["spec"])
    for s, meta in enumerate(metas):
      if CacheSpec.from_json(meta["spec"]) != self.spec:
        _compare_exact(self.path, CacheSpec.from_json(meta["spec"]), self.spec)
    n, num_epochs = self.spec.num_examples, self.spec.num_epochs
    for s, meta in enumerate(metas):
      if int(meta["epochs_complete"]) < num_epochs:
        raise PartialCacheError(
            f"top-k teacher cache {self.path!r} is partial: shard {s} of {num_shards} holds "
            f"epochs 0..{int(meta['epochs_complete']) - 1} of {num_epochs}; run its "
            "topk_cache.write again to resume it.")
    self.num_classes = int(metas[0]["num_classes"])
    self._dtype = _record_dtype(self.spec.k, self.num_classes, len(self.spec.temperatures))
    module = _array_record_module()
    files = []
    for epoch in range(num_epochs):
      for s in range(num_shards):
        begin, end = _shard_range(n, s, num_shards)
        name = os.path.join(self.path, _epoch_file(epoch, s, num_shards))
        if not os.path.exists(name):
          raise PartialCacheError(f"top-k teacher cache {self.path!r} is partial: epoch "
                                  f"{epoch}, shard {s} ({os.path.basename(name)}) is missing.")
        try:
          reader = module.ArrayRecordReader(name)
          count = reader.num_records()
          reader.close()
        except Exception as e:  # pylint: disable=broad-except
          raise PartialCacheError(f"top-k teacher cache file {name!r} is unreadable "
                                  f"(truncated?): {e}") from None
        if count != end - begin:
          raise PartialCacheError(
              f"top-k teacher cache {self.path!r} is partial: {os.path.basename(name)} holds "
              f"{count} records, expected {end - begin} (examples [{begin}, {end})).")
        files.append(f"{name}[0:{count}]")
    self.source = grain.sources.ArrayRecordDataSource(files)
    if len(self.source) != n * num_epochs:
      raise PartialCacheError(f"top-k teacher cache {self.path!r}: {len(self.source)} records "
                              f"for {num_epochs} epochs x {n} examples.")
    if expect is not None:
      _compare(self.path, self.spec, expect)

  def __len__(self) -> int:
    return len(self.source)

  def decode(self, records: Sequence[bytes]) -> np.ndarray:
    """Records as a structured array with fields logits, indices, tail_logsumexp."""
    if not records:
      return np.zeros(0, self._dtype)
    return np.frombuffer(b"".join(records), self._dtype)

  def records(self, epoch: int, indices) -> np.ndarray:
    """The decoded records of examples `indices` on `epoch`'s views."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    n = self.spec.num_examples
    if not 0 <= epoch < self.spec.num_epochs:
      raise IndexError(f"top-k teacher cache {self.path!r} holds epochs 0..{self.spec.num_epochs - 1}, "
                       f"asked for epoch {epoch} (the run is longer than the cache).")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      raise IndexError(f"top-k teacher cache {self.path!r} holds {n} examples, asked for "
                       f"indices in [{indices.min()}, {indices.max()}].")
    return self.decode(self.source.__getitems__([int(epoch * n + i) for i in indices]))

  def lookup(self, epoch: int, indices) -> dict[str, np.ndarray]:
    """Batch columns for `batches(..., extras=cache.lookup)`: the top-k logits (float32 [b, k]),
    classes (int32 [b, k]) and one tail column per stored temperature (float32 [b])."""
    rec = self.records(epoch, indices)
    out = {logits_column(self.prefix): np.ascontiguousarray(rec["logits"]),
           indices_column(self.prefix): rec["indices"].astype(np.int32)}
    for j, t in enumerate(self.spec.temperatures):
      out[tail_column(t, self.prefix)] = np.ascontiguousarray(rec["tail_logsumexp"][:, j])
    return out

  def topk(self, epoch: int, indices, *, temperature: float) -> losses.TopK:
    """The cached `kd_jax.losses.TopK` of examples `indices` on `epoch`, at `temperature`."""
    if float(temperature) not in self.spec.temperatures:
      raise ValueError(f"the cache stores tails at temperatures {self.spec.temperatures}, not "
                       f"{temperature}.")
    rec = self.records(epoch, indices)
    j = self.spec.temperatures.index(float(temperature))
    return losses.TopK(rec["logits"], rec["indices"].astype(np.int32), rec["tail_logsumexp"][:, j])

  def size_bytes(self) -> int:
    """Bytes on disk of the record files."""
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(self.path, "*.array_record")))


def load(path: str | os.PathLike, *, expect: CacheSpec | None = None,
         prefix: str = PREFIX) -> TopKCache:
  """Opens a complete top-k cache; with `expect`, refuses one written for another run.

  Raises:
    FileNotFoundError: no cache at `path`.
    PartialCacheError: a shard, an epoch file or records are missing.
    CacheMismatchError: `expect` differs from the cache's spec (naming the field). A run may use
      fewer epochs and a subset of the temperatures.
  """
  return TopKCache(path, expect=expect, prefix=prefix)
