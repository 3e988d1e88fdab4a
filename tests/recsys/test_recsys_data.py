"""GroupLens / TFDS readers and the seeded per-user split with HetComp's filtering."""

import numpy as np
import pytest

from kd_jax.recsys import data


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_read_u_data_tab_separated(tmp_path):
  _write(tmp_path / "u.data", "10\t7\t5\t1\n10\t8\t3\t2\n20\t7\t4\t3\n10\t7\t1\t4\n")
  with pytest.raises(ValueError, match=r"pair \(10, 7\) appears on lines \[1, 4\]"):
    data.read_grouplens(str(tmp_path))
  d = data.read_grouplens(str(tmp_path), duplicates="drop")  # the directory form
  assert (d.num_users, d.num_items) == (2, 2)
  pairs = sorted(zip(d.users.tolist(), d.items.tolist()))
  assert pairs == [(0, 0), (0, 1), (1, 0)]  # duplicate (10, 7) removed, ids contiguous


def test_read_ratings_csv_and_dat(tmp_path):
  f = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,5,4.0,1\n2,5,2.5,2\n"
             "2,9,1.0,3\n")
  d = data.read_grouplens(f)
  assert (d.num_users, d.num_items, len(d.users)) == (2, 2, 3)
  d = data.read_grouplens(f, min_rating=2.0)
  assert len(d.users) == 2
  sub = tmp_path / "m1"
  sub.mkdir()
  _write(sub / "ratings.dat", "1::3::5::9\n1::4::5::9\n")
  assert len(data.read_grouplens(str(sub)).users) == 2


def test_reader_errors_name_the_path(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    data.read_grouplens(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="No GroupLens ratings file"):
    data.read_grouplens(str(tmp_path))
  bad = _write(tmp_path / "u.data", "1\t2\t3\t4\nthis is not a rating\n")
  with pytest.raises(ValueError, match="line 2"):
    data.read_grouplens(bad)


def test_every_bad_file_or_row_is_named(tmp_path):
  empty = _write(tmp_path / "u.data", "\n")
  with pytest.raises(ValueError, match=f"{empty}.*holds no ratings"):
    data.read_grouplens(empty)
  cases = {
      "1\t2\t4\n1\t3": r"line 2 .*got 2 field\(s\)",
      "1\t2\t4\t5\t6\n": r"line 1 .*got 5 field\(s\)",
      "1\tx7\t4\t5\n": r"line 1 .*the item field 'x7' is not an integer",
      "1\t7\t4\t5\n1\t8\t881250949\t3\n": r"line 2 .*rating '881250949' is outside \[0.5, 5",
      "1\t7\tgood\n": r"line 1 .*rating field 'good' is not a number",
      "-1\t7\t4\n": r"line 1 .*negative user id -1",
  }
  for text, match in cases.items():
    path = _write(tmp_path / "u.data", text)
    with pytest.raises(ValueError, match=f"GroupLens {match}") as e:
      data.read_grouplens(path)
    assert path in str(e.value)
  with pytest.raises(ValueError, match=r"unexpected header columns \['user', 'movieId', "
                     r"'rating'\].*unknown \['user'\], missing \['userId'\]"):
    data.read_grouplens(_write(tmp_path / "ratings.csv", "user,movieId,rating\n1,2,3\n"))


def test_csv_columns_are_read_by_header_name(tmp_path):
  ordered = data.read_grouplens(_write(tmp_path / "ratings.csv", "userId,movieId,rating\n"
                                       "1,10,4\n1,11,3\n2,10,5\n"))
  sub = tmp_path / "b"
  sub.mkdir()
  shuffled = data.read_grouplens(_write(sub / "ratings.csv", "movieId,rating,userId\n"
                                        "10,4,1\n11,3,1\n10,5,2\n"))
  assert (shuffled.num_users, shuffled.num_items) == (2, 2)
  np.testing.assert_array_equal(shuffled.users, ordered.users)
  np.testing.assert_array_equal(shuffled.items, ordered.items)


def test_swapped_user_and_item_columns_of_a_known_release_are_refused(tmp_path):
  # 1682 "users" and 943 "items": ML-100k's sizes exchanged (a generated file, no real data).
  rows = [f"{u}\t{1 + u % 943}\t3\t1" for u in range(1, 1683)]
  bad = _write(tmp_path / "u.data", "\n".join(rows) + "\n")
  with pytest.raises(ValueError, match=r"1682 users and 943 items.*ml-100k with the user and "
                     r"item columns swapped"):
    data.read_grouplens(bad)


def test_tfds_movielens_via_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=12):
    d = data.load_tfds_movielens("movielens/100k-ratings")
  assert len(d.users) <= 12 and len(d.users) >= 1
  assert d.users.max() < d.num_users and d.items.max() < d.num_items


def test_split_is_seeded_and_follows_the_ratios(make_interactions):
  inter = make_interactions()
  a, b = data.split_per_user(inter, seed=3), data.split_per_user(inter, seed=3)
  c = data.split_per_user(inter, seed=4)
  for part in ("train", "valid", "test"):
    np.testing.assert_array_equal(a.pairs(part)[1], b.pairs(part)[1])
  assert any(not np.array_equal(a.pairs(p)[1], c.pairs(p)[1]) for p in ("train", "test"))
  # parts are disjoint per user; test and valid hold floor(0.2 n) items before filtering
  for u in range(a.num_users):
    tr, va, te = (set(r.tolist()) for r in (a.rows(p, [u])[0] for p in ("train", "valid",
                                                                          "test")))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert va and te and tr


def test_split_filtering_rules():
  # user 0: 4 items (dropped, < 5); user 1: 5 items, its held-out items exist in training for
  # user 2; user 3: 10 items, but everything it holds out is unique to it -> dropped.
  users = [0] * 4 + [1] * 5 + [2] * 10 + [3] * 10
  items = list(range(4)) + list(range(5)) + list(range(10)) + list(range(100, 110))
  inter = data.Interactions(np.asarray(users, np.int32), np.asarray(items, np.int32), 4, 110)
  s = data.split_per_user(inter, seed=0)
  # numpy reference of the rule
  rng = np.random.default_rng(0)
  kept = []
  train_items = set()
  parts = {}
  for u, row in ((0, items[:4]), (1, items[4:9]), (2, items[9:19]), (3, items[19:29])):
    if len(row) < 5:
      continue
    row = np.asarray(row)[rng.permutation(len(row))]
    n_te = n_va = int(len(row) * 0.2)
    parts[u] = (row[n_te + n_va:], row[n_te:n_te + n_va], row[:n_te])
    train_items |= set(parts[u][0].tolist())
  for u, (tr, va, te) in parts.items():
    if any(i in train_items for i in va) and any(i in train_items for i in te):
      kept.append(u)
  assert s.num_users == len(kept)
  assert s.num_items == len(train_items)
  assert 0 not in kept and 3 not in kept  # too few interactions / held-out items unseen
  n_valid = s.counts("valid")
  assert (n_valid > 0).all() and (s.counts("test") > 0).all()


def test_no_user_left_after_filtering_names_the_rule():
  tiny = data.Interactions(np.array([0, 0, 1], np.int32), np.array([0, 1, 0], np.int32), 2, 2)
  with pytest.raises(ValueError, match=r"No user is left after filtering \(2 users, 3 "
                     r"interactions, min_interactions=5\): every user needs at least 5"):
    data.split_per_user(tiny)
