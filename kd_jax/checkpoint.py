"""The one checkpoint codec: every array saved under its key path, checked before it is read.

Teachers (`kd_jax.teachers`) and train states (`kd_jax.train.loop`) are written with Orbax as
nested dicts whose keys are the pytree's own key names (`params/stage1/0/conv1/kernel`,
`opt_state/0/trace/...`, `term_state/crd/memory_s`), so a checkpoint is readable on its own and
an error can name the array that differs. PRNG keys are stored as their raw key data. Before any
array is read, `check_arrays` compares the checkpoint's metadata with the target: missing and
unexpected paths, shapes and dtypes. Orbax and TensorStore do not checksum what they read back,
so the writers record `array_checksums` (CRC-32 of every array's bytes) beside the arrays and
`verify_checksums` compares them after a restore: a flipped byte or a truncated file is named.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["abstract_saveable", "array_checksums", "check_arrays", "flat_paths", "from_saveable",
           "key_name", "nest", "to_saveable", "verify_checksums"]


def key_name(key) -> str:
  """The name of one pytree path entry: a dict key, attribute name or sequence index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat_paths(tree) -> dict[str, Any]:
  """{"a/b/0/c": leaf} for every leaf of `tree`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(key_name(k) for k in path): leaf for path, leaf in leaves}


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The nested dict of a {"a/b/c": leaf} mapping (the inverse of `flat_paths` for dicts)."""
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return out


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(tree) -> dict[str, Any]:
  """`tree` as a nested dict keyed by its key paths, PRNG keys as their key data."""
  return nest({p: (jax.random.key_data(x) if _is_key(x) else x)
               for p, x in flat_paths(tree).items()})


def abstract_saveable(tree, sharding=None) -> dict[str, Any]:
  """`to_saveable`'s structure with `jax.ShapeDtypeStruct` leaves (an Orbax restore target)."""
  def abstract(x):
    x = jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

  return nest({p: abstract(x) for p, x in flat_paths(tree).items()})


def from_saveable(template, saved: Mapping[str, Any]):
  """The arrays of a nested `saved` dict put back into the structure of `template`."""
  flat = flat_paths(saved)
  paths, treedef = list(flat_paths(template).items()), jax.tree.structure(template)
  out = []
  for path, t in paths:
    x = flat[path]
    out.append(jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x)
  return jax.tree.unflatten(treedef, out)


def check_arrays(where: str, target, metadata, *, what: str = "checkpoint",
                 hint: str = "", limit: int = 6, list_limit: int = 24) -> None:
  """Raises ValueError if `metadata` (the checkpoint's) and `target` (what this run expects)
  differ in key paths, shapes or dtypes; the message names `where` and the first differences.
  """
  want, have = flat_paths(target), flat_paths(metadata)
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  problems = []
  if missing:
    problems.append(f"arrays missing from the checkpoint (partial checkpoint?): "
                    f"{missing[:list_limit]}{' ...' if len(missing) > list_limit else ''}")
  if extra:
    problems.append(f"arrays in the checkpoint that this {what} does not have: "
                    f"{extra[:list_limit]}{' ...' if len(extra) > list_limit else ''}")
  for key in sorted(set(want) & set(have)):
    w, h = want[key], have[key]
    h_shape, h_dtype = tuple(getattr(h, "shape", ())), getattr(h, "dtype", None)
    w_dtype = np.dtype(w.dtype)
    if tuple(w.shape) != h_shape or (h_dtype is not None and np.dtype(h_dtype) != w_dtype):
      problems.append(f"array {key!r}: checkpoint has shape {h_shape} dtype {h_dtype}, the "
                      f"{what} expects shape {tuple(w.shape)} dtype {w_dtype}")
    if len(problems) >= limit:
      break
  if problems:
    raise ValueError(f"{where} does not match the {what}{hint}:\n  " + "\n  ".join(problems))


def array_checksums(tree) -> dict[str, dict[str, Any]]:
  """{key path: {"shape", "dtype", "crc32"}} of every array of a nested dict (CRC-32 of the
  array's bytes in C order)."""
  out = {}
  for key, leaf in flat_paths(tree).items():
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    out[key] = {"shape": list(a.shape), "dtype": str(a.dtype),
                "crc32": zlib.crc32(memoryview(a).cast("B")) & 0xFFFFFFFF}
  return out


def verify_checksums(where: str, recorded: Mapping[str, Any], restored, *,
                     hint: str = "") -> None:
  """Raises ValueError naming every array of `restored` whose bytes differ from `recorded`
  (`array_checksums` at save time), or that the record lists but `restored` lacks."""
  got = array_checksums(restored)
  bad = [k for k in sorted(got) if k in recorded and
         (recorded[k].get("crc32") != got[k]["crc32"] or
          list(recorded[k].get("shape", got[k]["shape"])) != got[k]["shape"])]
  missing = sorted(set(recorded) - set(got))
  if bad or missing:
    parts = []
    if bad:
      parts.append(f"array(s) {bad[:8]}{' ...' if len(bad) > 8 else ''} differ from what was "
                   "saved (CRC-32 mismatch)")
    if missing:
      parts.append(f"array(s) {missing[:8]} recorded at save time were not restored")
    raise ValueError(f"{where} is corrupt: " + "; ".join(parts) + "." + hint)
