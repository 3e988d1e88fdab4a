"""Implicit-feedback interactions: GroupLens / TFDS readers and HetComp's per-user split.

Every rating becomes one implicit interaction (user, item). The split follows HetComp's protocol
as coded in `SeongKu-Kang/HetComp_WWW23: Utils/data_utils.py`: drop users with fewer than 5
interactions; per user shuffle and take 20% test, 20% validation (floor division) and the rest as
train; drop held-out items never seen in training; drop users whose validation or test set is
empty. Users and items are then re-indexed contiguously (items = those seen in training).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class Interactions:
  """Raw implicit interactions with contiguous 0-based ids (duplicates removed)."""
  users: np.ndarray  # [n] int32
  items: np.ndarray  # [n] int32
  num_users: int
  num_items: int


def _from_raw_ids(raw_users, raw_items) -> Interactions:
  """Maps arbitrary user/item keys to contiguous ids and removes duplicate pairs."""
  u_keys, users = np.unique(np.asarray(raw_users), return_inverse=True)
  i_keys, items = np.unique(np.asarray(raw_items), return_inverse=True)
  pairs = np.unique(np.stack([users, items], 1).astype(np.int64), axis=0)
  return Interactions(pairs[:, 0].astype(np.int32), pairs[:, 1].astype(np.int32),
                      len(u_keys), len(i_keys))


# Users and items of the standard GroupLens releases: a file whose counts are these swapped had
# its user and item columns exchanged.
_KNOWN_SIZES = {"ml-100k": (943, 1682), "ml-1m": (6040, 3706), "ml-latest-small": (610, 9724),
                "ml-10m": (69878, 10677)}
_CSV_COLUMNS = ("userId", "movieId", "rating", "timestamp")
_RATING_RANGE = (0.5, 5.0)


def read_grouplens(path: str, *, min_rating: float | None = None,
                   duplicates: str = "error") -> Interactions:
  """Reads GroupLens MovieLens ratings as implicit feedback.

  Accepts the ML-100k `u.data` (tab separated: user, item, rating, timestamp), the ML-latest
  `ratings.csv` (header `userId,movieId,rating,timestamp`, read by column name, so any order
  works) and the ML-1M/10M `ratings.dat` (`::` separated), either as the file itself or as the
  directory holding it. Every row is checked: integer user and item ids, a rating in
  [0.5, 5] (a timestamp or an id there means the columns are shifted), an integer timestamp
  when present; the counts of users and items are compared with the standard releases' (a file
  with them swapped had its user and item columns exchanged).

  Args:
    path: a ratings file or a directory with one of `u.data`, `ratings.csv`, `ratings.dat`.
    min_rating: if given, keep only ratings >= min_rating (default: every rating counts).
    duplicates: "error" (default): a repeated (user, item) pair is an error naming both lines
      (GroupLens files have none, so it means a corrupted or concatenated file); "drop": keep
      one interaction per pair.

  Returns:
    `Interactions` with contiguous ids.

  Raises:
    ValueError: the path does not exist, holds no known ratings file, is empty, or a row is
      malformed, out of range or repeated (naming the file, the line and the field), or an
      unexpected CSV header (naming its columns and the expected ones).
  """
  if duplicates not in ("error", "drop"):
    raise ValueError(f"duplicates must be 'error' or 'drop', got {duplicates!r}.")
  if not os.path.exists(path):
    raise ValueError(f"GroupLens data path {path!r} does not exist.")
  if os.path.isdir(path):
    for name in ("u.data", "ratings.csv", "ratings.dat"):
      if os.path.isfile(os.path.join(path, name)):
        path = os.path.join(path, name)
        break
    else:
      raise ValueError(
          f"No GroupLens ratings file (u.data, ratings.csv or ratings.dat) in {path!r}; "
          f"found {sorted(os.listdir(path))[:10]}.")
  name = os.path.basename(path)
  columns = (0, 1, 2, 3)  # user, item, rating, timestamp
  rows, line_nos = [], []
  with open(path, encoding="latin-1") as f:
    for line_no, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if name.endswith(".csv"):
        fields = line.split(",")
        if not rows and not fields[0].strip().lstrip("-").isdigit():
          columns = _csv_columns(path, line_no, [c.strip() for c in fields])
          continue  # header
      elif name.endswith(".dat"):
        fields = line.split("::")
      else:
        fields = line.split("\t")
      if len(fields) < 3 or len(fields) > 4:
        raise ValueError(
            f"Malformed GroupLens line {line_no} in {path!r}: expected user, item, rating "
            f"(and timestamp) fields, got {len(fields)} field(s) in {line[:80]!r}.")
      rows.append(_parse_row(path, line_no, line, fields, columns))
      line_nos.append(line_no)
  if not rows:
    raise ValueError(f"GroupLens file {path!r} holds no ratings (an empty file?).")
  arr = np.asarray(rows, dtype=np.float64)
  pairs = arr[:, :2].astype(np.int64)
  if duplicates == "error":
    _, first, counts = np.unique(pairs, axis=0, return_index=True, return_counts=True)
    if np.any(counts > 1):
      i = first[np.flatnonzero(counts > 1)[0]]
      again = np.flatnonzero(np.all(pairs == pairs[i], axis=1))
      raise ValueError(
          f"GroupLens file {path!r}: the (user, item) pair ({pairs[i, 0]}, {pairs[i, 1]}) "
          f"appears on lines {[line_nos[j] for j in again[:5]]}; {int(np.sum(counts - 1))} "
          "repeated pair(s) in all (a corrupted or concatenated file? read_grouplens(..., "
          "duplicates='drop') keeps one of each).")
  sizes = (len(np.unique(pairs[:, 0])), len(np.unique(pairs[:, 1])))
  for release, (nu, ni) in _KNOWN_SIZES.items():
    if sizes == (ni, nu) and nu != ni:
      raise ValueError(
          f"GroupLens file {path!r} has {sizes[0]} users and {sizes[1]} items: the sizes of "
          f"{release} with the user and item columns swapped ({nu} users, {ni} items).")
  if min_rating is not None:
    arr = arr[arr[:, 2] >= min_rating]
  return _from_raw_ids(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64))


def _csv_columns(path: str, line_no: int, header: list[str]) -> tuple[int, ...]:
  """Column indices of user, item, rating (and timestamp) from a ratings.csv header."""
  unknown = [c for c in header if c not in _CSV_COLUMNS]
  missing = [c for c in _CSV_COLUMNS[:3] if c not in header]
  if unknown or missing or len(set(header)) != len(header):
    raise ValueError(
        f"GroupLens file {path!r}, line {line_no}: unexpected header columns {header} "
        f"(unknown {unknown}, missing {missing}); expected {list(_CSV_COLUMNS)} (timestamp "
        "optional, any order).")
  return tuple(header.index(c) if c in header else -1 for c in _CSV_COLUMNS)


def _parse_row(path, line_no, line, fields, columns):
  """(user, item, rating) of one row, each field checked."""
  where = f"GroupLens line {line_no} in {path!r}"
  values = []
  for field, col in zip(("user", "item", "rating", "timestamp"), columns):
    if col < 0 or col >= len(fields):
      if field == "timestamp":
        continue
      raise ValueError(f"Malformed {where}: no {field} field in {line[:80]!r}.")
    text = fields[col].strip()
    try:
      value = float(text) if field == "rating" else int(text)
    except ValueError:
      raise ValueError(f"Malformed {where}: the {field} field {text!r} is not "
                       f"{'a number' if field == 'rating' else 'an integer'} "
                       f"({line[:80]!r}).") from None
    if field == "rating" and not _RATING_RANGE[0] <= value <= _RATING_RANGE[1]:
      raise ValueError(f"Malformed {where}: the rating {text!r} is outside "
                       f"[{_RATING_RANGE[0]}, {_RATING_RANGE[1]}] (are the columns shifted or "
                       f"swapped?) ({line[:80]!r}).")
    if field in ("user", "item") and value < 0:
      raise ValueError(f"Malformed {where}: negative {field} id {value} ({line[:80]!r}).")
    values.append(value)
  return tuple(values[:3])


def load_tfds_movielens(name: str = "movielens/100k-ratings", *, split: str = "train",
                        data_dir: str | None = None) -> Interactions:
  """Reads TFDS `movielens/*-ratings` through `tfds.data_source` (random access, no TF).

  The dataset must already be prepared in `data_dir` (TFDS downloads need TensorFlow for
  preparation). Offline tests use `tfds.testing.mock_data`.

  Args:
    name: the TFDS name, e.g. `movielens/100k-ratings` or `movielens/1m-ratings`.
    split: the TFDS split (movielens has only `train`).
    data_dir: the TFDS data directory (default: TFDS's own).
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.structured import movielens  # noqa: F401  (registers the builder)
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  n = len(source)
  if n == 0:
    raise ValueError(f"TFDS {name!r} split {split!r} is empty.")
  users, items = [], []
  for k in range(n):
    record = source[k]
    users.append(_as_key(record["user_id"]))
    items.append(_as_key(record["movie_id"]))
  return _from_raw_ids(users, items)


def _as_key(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


@dataclasses.dataclass(frozen=True)
class Split:
  """A per-user train/validation/test split; each part is a CSR matrix (indptr, indices)."""
  num_users: int
  num_items: int
  train: tuple[np.ndarray, np.ndarray]
  valid: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]

  def rows(self, part: str, users) -> list[np.ndarray]:
    """The item ids of `part` ('train', 'valid', 'test') for each user in `users`."""
    indptr, indices = getattr(self, part)
    return [indices[indptr[u]:indptr[u + 1]] for u in np.asarray(users)]

  def dense_mask(self, part: str, users) -> np.ndarray:
    """A [len(users), num_items] boolean mask of `part`'s items (for a chunk of users)."""
    indptr, indices = getattr(self, part)
    users = np.asarray(users)
    mask = np.zeros((len(users), self.num_items), dtype=bool)
    counts = indptr[users + 1] - indptr[users]
    rows = np.repeat(np.arange(len(users)), counts)
    cols = np.concatenate([indices[indptr[u]:indptr[u + 1]] for u in users]) if len(users) else []
    mask[rows, np.asarray(cols, dtype=np.int64)] = True
    return mask

  def pairs(self, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) coordinate arrays of `part`."""
    indptr, indices = getattr(self, part)
    return np.repeat(np.arange(self.num_users), np.diff(indptr)).astype(np.int32), indices

  def counts(self, part: str) -> np.ndarray:
    return np.diff(getattr(self, part)[0])


def _csr(users, items, num_users):
  order = np.lexsort((items, users))
  users, items = users[order], items[order]
  indptr = np.zeros(num_users + 1, dtype=np.int64)
  np.add.at(indptr, users + 1, 1)
  return np.cumsum(indptr), items.astype(np.int32)


def split_per_user(data: Interactions, *, seed: int = 0, min_interactions: int = 5,
                   test_ratio: float = 0.2, valid_ratio: float = 0.2) -> Split:
  """HetComp's per-user 60/20/20 split with the official code's filtering, seeded.

  Per user with n >= min_interactions items (shuffled with `seed`): the first
  floor(n * test_ratio) go to test, the next floor(n * valid_ratio) to validation, the rest to
  train. Held-out items absent from every training row are dropped, then users with an empty
  validation or test set; ids are re-indexed contiguously (items: those seen in training).
  Reference: `SeongKu-Kang/HetComp_WWW23: Utils/data_utils.py`.

  Args:
    data: the interactions.
    seed: the shuffling seed (same seed and data give the same split).
    min_interactions: users with fewer interactions are dropped.
    test_ratio: fraction of each user's items for test.
    valid_ratio: fraction for validation.
  """
  rng = np.random.default_rng(seed)
  indptr, items = _csr(data.users, data.items, data.num_users)
  parts = {"train": ([], []), "valid": ([], []), "test": ([], [])}
  for u in range(data.num_users):
    row = items[indptr[u]:indptr[u + 1]]
    n = len(row)
    if n < min_interactions:
      continue
    row = row[rng.permutation(n)]
    n_test, n_valid = int(n * test_ratio), int(n * valid_ratio)
    for part, sl in (("test", row[:n_test]), ("valid", row[n_test:n_test + n_valid]),
                     ("train", row[n_test + n_valid:])):
      parts[part][0].append(np.full(len(sl), u, np.int64))
      parts[part][1].append(sl.astype(np.int64))
  cat = {k: (np.concatenate(v[0]) if v[0] else np.zeros(0, np.int64),
             np.concatenate(v[1]) if v[1] else np.zeros(0, np.int64)) for k, v in parts.items()}
  train_items = np.zeros(data.num_items, bool)
  train_items[cat["train"][1]] = True
  for k in ("valid", "test"):
    keep = train_items[cat[k][1]]
    cat[k] = (cat[k][0][keep], cat[k][1][keep])
  has = {k: np.bincount(cat[k][0], minlength=data.num_users) > 0 for k in cat}
  keep_user = has["train"] & has["valid"] & has["test"]
  if not keep_user.any():
    raise ValueError(
        f"No user is left after filtering ({data.num_users} users, {len(data.users)} "
        f"interactions, min_interactions={min_interactions}): every user needs at least "
        f"{min_interactions} interactions, with train, validation and test items left after "
        "the split (too few ratings per user, or a truncated ratings file?).")
  user_map = np.cumsum(keep_user) - 1
  item_map = np.cumsum(train_items) - 1
  num_users, num_items = int(keep_user.sum()), int(train_items.sum())
  out = {}
  for k, (us, its) in cat.items():
    keep = keep_user[us]
    out[k] = _csr(user_map[us[keep]], item_map[its[keep]], num_users)
  return Split(num_users, num_items, out["train"], out["valid"], out["test"])
