"""Tiny synthetic interaction data shared by the recsys tests (never the licensed data)."""

import numpy as np
import pytest

from kd_jax.recsys import data


def synthetic_interactions(num_users=40, num_items=30, per_user=12, seed=0):
  """Users with a popularity-skewed set of items each (deterministic)."""
  rng = np.random.default_rng(seed)
  pop = 1.0 / np.arange(1, num_items + 1) ** 0.7
  pop /= pop.sum()
  users, items = [], []
  for u in range(num_users):
    n = rng.integers(per_user // 2, per_user + 1)
    its = rng.choice(num_items, size=n, replace=False, p=pop)
    users += [u] * n
    items += list(its)
  return data._from_raw_ids(np.asarray(users), np.asarray(items))


@pytest.fixture(scope="session")
def make_interactions():
  return synthetic_interactions


@pytest.fixture(scope="session")
def tiny_split():
  return data.split_per_user(synthetic_interactions(), seed=0)
