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


def read_grouplens(path: str, *, min_rating: float | None = None) -> Interactions:
  """Reads GroupLens MovieLens ratings as implicit feedback.

  Accepts the ML-100k `u.data` (tab separated: user, item, rating, timestamp), the ML-latest
  `ratings.csv` (header `userId,movieId,rating,timestamp`) and the ML-1M/10M `ratings.dat`
  (`::` separated), either as the file itself or as the directory holding it.

  Args:
    path: a ratings file or a directory with one of `u.data`, `ratings.csv`, `ratings.dat`.
    min_rating: if given, keep only ratings >= min_rating (default: every rating counts).

  Returns:
    `Interactions` with contiguous ids.

  Raises:
    ValueError: the path does not exist, holds no known ratings file, or is malformed.
  """
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
  rows = []
  with open(path, encoding="latin-1") as f:
    for line_no, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if name.endswith(".csv"):
        fields = line.split(",")
        if line_no == 1 and not fields[0].strip().isdigit():
          continue  # header
      elif name.endswith(".dat"):
        fields = line.split("::")
      else:
        fields = line.split("\t")
      if len(fields) < 3:
        raise ValueError(
            f"Malformed GroupLens line {line_no} in {path!r}: expected user, item, rating "
            f"(and timestamp) fields, got {line[:80]!r}.")
      try:
        rows.append((int(fields[0]), int(fields[1]), float(fields[2])))
      except ValueError as e:
        raise ValueError(
            f"Malformed GroupLens line {line_no} in {path!r}: {line[:80]!r} ({e}).") from None
  if not rows:
    raise ValueError(f"GroupLens file {path!r} holds no ratings.")
  arr = np.asarray(rows, dtype=np.float64)
  if min_rating is not None:
    arr = arr[arr[:, 2] >= min_rating]
  return _from_raw_ids(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64))


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
        f"interactions, min_interactions={min_interactions}).")
  user_map = np.cumsum(keep_user) - 1
  item_map = np.cumsum(train_items) - 1
  num_users, num_items = int(keep_user.sum()), int(train_items.sum())
  out = {}
  for k, (us, its) in cat.items():
    keep = keep_user[us]
    out[k] = _csr(user_map[us[keep]], item_map[its[keep]], num_users)
  return Split(num_users, num_items, out["train"], out["valid"], out["test"])
