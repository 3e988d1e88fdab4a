"""Teacher-output cache: run a frozen teacher once over a dataset and store its outputs by index.

When the student's inputs are not randomly augmented (evaluation, text, recommender data,
digits without augmentation), the teacher's outputs are the same every epoch, so the
distillation step only needs the student's forward/backward. `build` runs the teacher over the
dataset in fixed order (`eval_batches`: padded, masked, one compile) and writes one record per
example; `load` reads them back; `attach` adds them to the dataset's arrays as
"teacher_<key>" columns, so every batch from `kd_jax.data.batches` carries them, aligned by
example index. Records are stored with `array_record` (random access, the format of TFDS and
Grain) when it is installed, otherwise as one `.npy` file per output.

Layout of a cache directory: `teacher_cache.json` (format version, number of examples, output
names with per-example shapes and dtypes, a fingerprint of the input arrays) and
`outputs.array_record` or `outputs_<key>.npy`. The JSON is written last, so a directory without
it is an interrupted build.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import hashlib
import json
import os
import threading
from typing import Any

import numpy as np

from kd_jax.data import pipeline

FORMAT_VERSION = 1
META_FILE = "teacher_cache.json"
RECORDS_FILE = "outputs.array_record"
DEFAULT_KEY = "logits"


def _array_record_module():
  try:
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return array_record_module


def fingerprint(arrays: Mapping[str, Any]) -> str:
  """SHA-256 over each array's key, dtype, shape and bytes (keys sorted): identifies a dataset."""
  h = hashlib.sha256()
  for key in sorted(arrays):
    a = np.ascontiguousarray(np.asarray(arrays[key]))
    h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _as_outputs(out, batch_size: int) -> dict[str, np.ndarray]:
  """A teacher's batch output (array or dict of arrays) as a dict of numpy arrays."""
  outs = dict(out) if isinstance(out, Mapping) else {DEFAULT_KEY: out}
  result = {}
  for key, value in outs.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] != batch_size:
      raise ValueError(
          f"teacher output {key!r} must have the batch size {batch_size} as leading axis, "
          f"got shape {value.shape}.")
    result[key] = value
  return result


class TeacherCache:
  """Stored teacher outputs of one dataset, readable per example index.

  Attributes:
    path: the cache directory.
    num_examples: number of cached examples (= records).
    specs: {output name: (per-example shape, dtype)}.
    fingerprint: fingerprint of the input arrays the cache was built from (None for sources).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    meta_path = os.path.join(self.path, META_FILE)
    if not os.path.exists(meta_path):
      raise FileNotFoundError(
          f"no teacher cache at {self.path!r}: {META_FILE} is missing (never built, or the "
          "build was interrupted); run `kd_jax.data.teacher_cache.build(...)` first.")
    with open(meta_path) as f:
      meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(
          f"teacher cache {self.path!r} has format_version={meta.get('format_version')}, "
          f"this library reads {FORMAT_VERSION}; rebuild it.")
    self.num_examples = int(meta["num_examples"])
    self.specs = {k: (tuple(v["shape"]), np.dtype(v["dtype"]))
                  for k, v in meta["outputs"].items()}
    self.fingerprint = meta.get("fingerprint")
    self.backend = meta["backend"]
    self._lock = threading.Lock()
    self._reader = None
    self._arrays = None
    if self.backend == "array_record":
      module = _array_record_module()
      if module is None:
        raise ValueError(
            f"teacher cache {self.path!r} is stored with array_record, which is not installed "
            "(`pip install array_record`).")
      self._reader = module.ArrayRecordReader(
          os.path.join(self.path, RECORDS_FILE), "readahead_buffer_size:0,max_parallelism:0")
      if self._reader.num_records() != self.num_examples:
        raise ValueError(
            f"teacher cache {self.path!r} is corrupt: {self._reader.num_records()} records "
            f"for num_examples={self.num_examples}.")
    else:
      self._arrays = {
          k: np.load(os.path.join(self.path, f"outputs_{k}.npy"), mmap_mode="r")
          for k in self.specs}

  def __len__(self) -> int:
    return self.num_examples

  def _decode(self, record: bytes) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for key, (shape, dtype) in self.specs.items():
      size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      out[key] = np.frombuffer(record, dtype, count=size // dtype.itemsize,
                               offset=offset).reshape(shape)
      offset += size
    return out

  def get(self, indices) -> dict[str, np.ndarray]:
    """Outputs of the examples `indices` (ints in [0, N)), stacked: {name: [len(indices), ...]}."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
      raise IndexError(
          f"teacher cache {self.path!r} holds {self.num_examples} examples, asked for "
          f"indices in [{indices.min()}, {indices.max()}].")
    if self._arrays is not None:
      return {k: np.asarray(v[indices]) for k, v in self._arrays.items()}
    with self._lock:  # one reader, shared by Grain's threads.
      records = self._reader.read([int(i) for i in indices]) if indices.size else []
    decoded = [self._decode(r) for r in records]
    return {k: (np.stack([d[k] for d in decoded]) if decoded
                else np.zeros((0,) + shape, dtype))
            for k, (shape, dtype) in self.specs.items()}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in self.get([index]).items()}

  def to_arrays(self) -> dict[str, np.ndarray]:
    """All cached outputs in memory: {name: [N, ...]}, row i for example i."""
    return self.get(np.arange(self.num_examples))

  def close(self) -> None:
    if self._reader is not None:
      self._reader.close()
      self._reader = None


def load(path: str | os.PathLike) -> TeacherCache:
  """Opens the teacher cache written by `build` at `path`."""
  return TeacherCache(path)


def build(teacher_apply_fn: Callable[[dict[str, np.ndarray]], Any], arrays, *,
          batch_size: int, path: str | os.PathLike, backend: str = "auto",
          overwrite: bool = False) -> TeacherCache:
  """Runs `teacher_apply_fn` once over every example, in order, and stores the outputs.

  The dataset is read with `eval_batches` (batches of exactly `batch_size`, the last one
  zero-padded, so a jitted teacher compiles once); padded rows are dropped before writing.
  Record i holds the outputs of example i. Non-finite teacher outputs stop the build.

  Args:
    teacher_apply_fn: `fn(batch) -> array or dict of arrays` with leading axis `batch_size`;
      `batch` is a dict of numpy arrays (the dataset's keys plus "mask"). Typically a jitted
      eval-mode forward of the frozen teacher, e.g. `lambda b: jit_forward(b["image"])`.
    arrays: the dataset, a dict of equally long arrays (or a random-access source, then
      without fingerprint). Must be the un-augmented inputs the student will see.
    batch_size: teacher batch size.
    path: directory to write (created if missing).
    backend: "array_record", "npy", or "auto" (array_record when installed).
    overwrite: replace an existing cache at `path`.

  Returns:
    The `TeacherCache` just written.
  """
  path = os.fspath(path)
  if backend == "auto":
    backend = "array_record" if _array_record_module() is not None else "npy"
  if backend not in ("array_record", "npy"):
    raise ValueError(f"backend must be 'auto', 'array_record' or 'npy', got {backend!r}.")
  if backend == "array_record" and _array_record_module() is None:
    raise ValueError("backend='array_record' needs the array_record package "
                     "(`pip install array_record`).")
  meta_path = os.path.join(path, META_FILE)
  if os.path.exists(meta_path) and not overwrite:
    raise ValueError(f"a teacher cache already exists at {path!r}; pass overwrite=True "
                     "to rebuild it.")
  os.makedirs(path, exist_ok=True)
  if os.path.exists(meta_path):
    os.remove(meta_path)  # the directory is incomplete until the new metadata is written.

  source = pipeline.as_source(arrays)
  num_examples = len(source)
  specs = None
  chunks: dict[str, list[np.ndarray]] = {}
  writer = None
  done = 0
  try:
    if backend == "array_record":
      writer = _array_record_module().ArrayRecordWriter(
          os.path.join(path, RECORDS_FILE), "group_size:1")
    for batch in pipeline.eval_batches(source, batch_size=batch_size, prefetch=0):
      outs = _as_outputs(teacher_apply_fn(batch), batch_size)
      mask = batch["mask"]
      outs = {k: np.ascontiguousarray(v[mask]) for k, v in sorted(outs.items())}
      for key, value in outs.items():
        if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
          bad = np.flatnonzero(~np.isfinite(value.reshape(value.shape[0], -1)).all(1)) + done
          raise ValueError(
              f"teacher output {key!r} is not finite (NaN or inf) for examples "
              f"{bad[:10].tolist()}; refusing to cache it at {path!r}.")
      batch_specs = {k: (v.shape[1:], v.dtype) for k, v in outs.items()}
      if specs is None:
        specs = batch_specs
      elif batch_specs != specs:
        raise ValueError(f"teacher outputs changed shape/dtype between batches: {specs} "
                         f"then {batch_specs}.")
      if writer is not None:
        for row in range(int(mask.sum())):
          writer.write(b"".join(outs[k][row].tobytes() for k in specs))
      else:
        for key, value in outs.items():
          chunks.setdefault(key, []).append(value)
      done += int(mask.sum())
  finally:
    if writer is not None:
      writer.close()
  if backend == "npy":
    for key, parts in chunks.items():
      np.save(os.path.join(path, f"outputs_{key}.npy"), np.concatenate(parts))

  meta = {
      "format_version": FORMAT_VERSION,
      "num_examples": num_examples,
      "backend": backend,
      "outputs": {k: {"shape": list(s), "dtype": d.str} for k, (s, d) in specs.items()},
      "fingerprint": (fingerprint(source.arrays)
                      if isinstance(source, pipeline.ArraySource) else None),
  }
  with open(meta_path, "w") as f:
    json.dump(meta, f, indent=1)
  return TeacherCache(path)


def attach(arrays: Mapping[str, Any], cache: TeacherCache | str | os.PathLike, *,
           prefix: str = "teacher_") -> dict[str, np.ndarray]:
  """The dataset's arrays plus the cached outputs as columns `prefix + name` (row i = example i).

  With the default single output this adds "teacher_logits", so `batches(attach(arrays,
  cache), ...)` yields batches that carry the teacher's logits of exactly their examples.
  Checks that the cache was built from these arrays (same number of examples and, when
  recorded, the same fingerprint).

  Args:
    arrays: the dataset the cache was built from, a dict of equally long arrays.
    cache: a `TeacherCache` or its directory.
    prefix: prepended to each output name.

  Returns:
    A new dict: the original arrays and the teacher outputs.
  """
  if not isinstance(cache, TeacherCache):
    cache = load(cache)
  source = pipeline.ArraySource(arrays)
  if len(source) != cache.num_examples:
    raise ValueError(
        f"teacher cache {cache.path!r} holds {cache.num_examples} examples but the dataset "
        f"has {len(source)}; it was built from another dataset.")
  if cache.fingerprint is not None and cache.fingerprint != fingerprint(source.arrays):
    raise ValueError(
        f"teacher cache {cache.path!r} was built from different arrays (fingerprint "
        "mismatch: other values, order, keys or dtypes); rebuild it for this dataset.")
  out = dict(source.arrays)
  for key, value in cache.to_arrays().items():
    name = prefix + key
    if name in out:
      raise ValueError(f"the dataset already has a key {name!r}; choose another prefix.")
    out[name] = value
  return out
