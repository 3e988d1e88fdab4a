"""Full-ranking top-K evaluation (Recall@K, NDCG@K) and popularity lift, chunked over users.

Protocol (HetComp's official code, `SeongKu-Kang/HetComp_WWW23: Utils/evaluation.py`): every
item is ranked for every user, except the user's training items and the items of the other held-out
part (validation ranking excludes train+test, test ranking excludes train+validation).
`Recall@K = hits / |GT|`; NDCG@K has binary gains and an ideal DCG over `min(|GT|, K)` items (the same
values as rax's `recall_metric` / `ndcg_metric` with `topn=K`). Users are processed in
fixed-size chunks, so memory is O(chunk x items) whatever the number of users.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.recsys.data import Split

DEFAULT_KS = (10, 20, 50)


@functools.partial(jax.jit, static_argnames=("ks", "pop_k"))
def _chunk_metrics(scores, relevant, exclude, item_pop, *, ks, pop_k):
  """Per-user Recall@K, NDCG@K and mean popularity of the top-`pop_k` for one chunk.

  One `lax.top_k` of the largest K serves every cut-off (rax's sort-based `recall_metric` /
  `ndcg_metric` give the same values, which the tests check, but were ~50x slower for
  full-catalogue lists on CPU).
  """
  scores = jnp.asarray(scores, jnp.float32)
  masked = jnp.where(exclude, -jnp.inf, scores)
  k_max = min(max(max(ks), pop_k), scores.shape[-1])
  vals, top = jax.lax.top_k(masked, k_max)
  hits = jnp.take_along_axis(relevant, top, -1) & jnp.isfinite(vals)
  n_rel = jnp.sum(relevant & ~exclude, -1)
  discount = 1.0 / jnp.log2(jnp.arange(k_max, dtype=jnp.float32) + 2.0)
  cum_discount = jnp.cumsum(discount)
  out = {}
  for k in ks:
    h = hits[:, :k].astype(jnp.float32)
    out[f"recall@{k}"] = jnp.sum(h, -1) / jnp.maximum(n_rel, 1)
    last = jnp.clip(jnp.minimum(n_rel, k) - 1, 0, k_max - 1)
    idcg = jnp.where(n_rel > 0, cum_discount[last], 1.0)
    out[f"ndcg@{k}"] = jnp.sum(h * discount[:k], -1) / idcg
  # The popularity of the top-`pop_k` as a weighted sum over all k_max positions, not a slice
  # of `top`: a second slice of top_k's output makes XLA:CPU replace its TopK call by a full
  # sort of every row (13x slower on ML-100k's 1,611 items).
  first = (jnp.arange(k_max) < pop_k).astype(jnp.float32) / min(pop_k, k_max)
  out["rec_popularity"] = jnp.sum(item_pop[top] * first, axis=-1)
  return out


def item_popularity(split: Split) -> np.ndarray:
  """phi(i): the fraction of users with item i in their training set."""
  _, items = split.pairs("train")
  return np.bincount(items, minlength=split.num_items) / max(split.num_users, 1)


def profile_popularity(split: Split) -> float:
  """GAP_p: the mean over users of the mean phi over their training items."""
  phi = item_popularity(split)
  users, items = split.pairs("train")
  per_user = np.bincount(users, weights=phi[items], minlength=split.num_users)
  return float(np.mean(per_user / np.maximum(split.counts("train"), 1)))


def popularity_lift(rec_popularity, profile_gap: float) -> float:
  """PL = (GAP_r - GAP_p) / GAP_p x 100 (Abdollahpouri et al., RecSys 2020).

  Args:
    rec_popularity: per-user mean phi over the user's top-K recommendations; GAP_r is its mean.
    profile_gap: GAP_p, from `profile_popularity`.
  """
  gap_r = float(np.mean(np.asarray(rec_popularity, np.float64)))
  return (gap_r - profile_gap) / max(profile_gap, 1e-12) * 100.0


def evaluate(score_fn: Callable[[np.ndarray], jax.Array], split: Split, part: str = "test", *,
             ks: Sequence[int] = DEFAULT_KS, chunk_size: int = 256,
             popularity_k: int = 10) -> dict[str, float]:
  """Full-ranking Recall@K / NDCG@K over `part`'s users, plus popularity lift of the top-K.

  Args:
    score_fn: maps a [B] int array of user ids to [B, num_items] scores (B = chunk_size; the
      last chunk is padded with user 0 and masked out).
    split: the data split.
    part: 'test' (excludes train+valid) or 'valid' (excludes train+test).
    ks: the cut-offs.
    chunk_size: users per chunk (bounds memory at chunk_size x num_items).
    popularity_k: the list length whose popularity defines the popularity lift.

  Returns:
    means over users with a non-empty `part`: `recall@K`, `ndcg@K`, `popularity_lift`.
  """
  if part not in ("valid", "test"):
    raise ValueError(f"part must be 'valid' or 'test', got {part!r}.")
  other = "valid" if part == "test" else "test"
  users = np.flatnonzero(split.counts(part) > 0)
  item_pop = jnp.asarray(item_popularity(split), jnp.float32)
  ks = tuple(int(k) for k in ks)
  sums: dict[str, float] = {}
  pops = []
  for start in range(0, len(users), chunk_size):
    chunk = users[start:start + chunk_size]
    n = len(chunk)
    padded = np.concatenate([chunk, np.zeros(chunk_size - n, chunk.dtype)])
    relevant = split.dense_mask(part, padded)
    exclude = split.dense_mask("train", padded) | split.dense_mask(other, padded)
    res = _chunk_metrics(score_fn(padded), relevant, exclude, item_pop, ks=ks,
                         pop_k=popularity_k)
    for key, val in res.items():
      val = np.asarray(val, np.float64)[:n]
      if key == "rec_popularity":
        pops.append(val)
      else:
        sums[key] = sums.get(key, 0.0) + float(val.sum())
  out = {k: v / max(len(users), 1) for k, v in sums.items()}
  out["popularity_lift"] = popularity_lift(np.concatenate(pops), profile_popularity(split))
  return out
