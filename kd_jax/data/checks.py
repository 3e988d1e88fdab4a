"""Checks of a dataset split before anything trains on it: a clear error instead of a silent one.

JAX's `one_hot` turns a label outside `[0, num_classes)` into a zero row (the example then
contributes nothing to cross-entropy, and accuracy counts it wrong), a NaN or inf input poisons
every step it is in, and an empty split fails deep inside batching. `check_split` refuses all of
these up front, naming the split, the field and the first offending example.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["check_split"]


def check_split(arrays: Mapping[str, Any], *, split: str, num_classes: int | None = None,
                input_key: str = "image", label_key: str | None = "label") -> None:
  """Raises ValueError if `arrays` (a dict of equally long arrays) is not a usable split.

  Checks: at least one example; every floating-point input (`input_key`) finite; labels
  (`label_key`, unless None or absent) integers in `[0, num_classes)` when `num_classes` is
  given.

  Args:
    arrays: the split, e.g. {"image": float [N, ...], "label": int [N]}.
    split: its name in messages ("train", "val", "test", "transfer", ...).
    num_classes: the number of classes the models predict (None: labels are not range-checked).
    input_key: the input array.
    label_key: the label array (None: the split has no labels).

  Raises:
    ValueError: naming the split, the field, the first offending example index and its value.
  """
  if input_key not in arrays:
    raise ValueError(f"the {split} split has no {input_key!r} array (keys: {sorted(arrays)}).")
  x = np.asarray(arrays[input_key])
  if x.ndim == 0 or x.shape[0] == 0:
    raise ValueError(f"the {split} split is empty ({input_key!r} has shape {x.shape}): nothing "
                     "to train or evaluate on (a class selection or filter that keeps no "
                     "example?).")
  if np.issubdtype(x.dtype, np.floating):
    bad = ~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
    if bad.any():
      i = int(np.flatnonzero(bad)[0])
      values = x[i][~np.isfinite(x[i])]
      raise ValueError(f"the {split} split has {int(bad.sum())} example(s) with non-finite "
                       f"{input_key!r} values (NaN/inf), the first at index {i} "
                       f"({values[:3].tolist()}); clean or drop them before training.")
  if label_key is None or label_key not in arrays:
    return
  y = np.asarray(arrays[label_key])
  if y.shape[:1] != x.shape[:1]:
    raise ValueError(f"the {split} split has {x.shape[0]} {input_key!r} rows but "
                     f"{y.shape[0] if y.ndim else 'no'} {label_key!r} rows.")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"the {split} split's {label_key!r} must be integers, got dtype {y.dtype}.")
  if num_classes is not None:
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
      i = int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])
      raise ValueError(
          f"the {split} split has {int(bad.sum())} {label_key!r} value(s) outside "
          f"[0, {num_classes}), the first at index {i} ({np.ravel(y[i])[:3].tolist()}); "
          "one_hot would silently turn them into zero rows (labels of another dataset or "
          "class order?).")
