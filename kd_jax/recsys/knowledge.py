"""Sparse ensemble ranking knowledge: per user, teacher and checkpoint, the top-N items only.

HetComp's official code keeps a dense users x items importance matrix per teacher and checkpoint
(`SeongKu-Kang/HetComp_WWW23: Utils/data_utils.py`; docs/hetcomp.md). We keep only the
teachers' top-N unobserved items ([U, X, V, N] int32, memory O(U x N)) and rebuild the importance
on the fly from the rank r (0-based):

    w(r) = (1 / (r + 1)) ** 0.05

This is the rank importance of the same group's KDD'24 code (`Gyu-Seok0/CCD_KDD24:
Run/Ensemble.py, Utils/utils.py`), used because the WWW'23 Eq. 8 was not retrieved (FLAGGED:
a default, not the paper's verified equation). An item outside a teacher's top-N is given rank N
(the best rank it could have), so the ensemble score is

    score_E(u, i) = sum_x w(r_x(u, i)),   r_x = rank in teacher x's list, or N if absent,

computed by sorting the <= X*N candidate ids of a user and summing per unique item: nothing
of size users x items is ever formed. The teachers' disagreement on an item (its "dissensus")
is the standard deviation of w(r_x) over the teachers, available at the same cost.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.recsys.data import Split

IMPORTANCE_GAMMA = 0.05


def rank_importance(ranks, gamma: float = IMPORTANCE_GAMMA):
  """w(r) = (1 / (r + 1)) ** gamma for 0-based ranks r (KDD'24-group default, flagged)."""
  return jnp.power(1.0 / (jnp.asarray(ranks, jnp.float32) + 1.0), gamma)


@dataclasses.dataclass
class Knowledge:
  """Teachers' trajectories as top-N lists, plus the ensemble's ranking of observed items.

  Attributes:
    ranks: [U, X, V, N] int32, item ids in rank order per user, teacher and checkpoint
      (training items excluded).
    observed: [U, P] int32, the ensemble's top-P training items per user (`P_u`).
    observed_mask: [U, P] bool, False where a user has fewer than P training items.
    num_items: the catalogue size.
  """
  ranks: np.ndarray
  observed: np.ndarray
  observed_mask: np.ndarray
  num_items: int

  @property
  def nbytes(self) -> int:
    return self.ranks.nbytes + self.observed.nbytes + self.observed_mask.nbytes

  @property
  def shape(self):
    return self.ranks.shape


@functools.partial(jax.jit, static_argnames=("n",))
def _masked_top(scores, exclude, *, n):
  return jax.lax.top_k(jnp.where(exclude, -jnp.inf, scores.astype(jnp.float32)), n)[1]


@functools.partial(jax.jit, static_argnames=("p", "gamma"))
def _observed_top(score_list, train, *, p, gamma):
  """Ensemble ranking of training items: sum_x w(rank of i among u's training items)."""
  total = 0.0
  for s in score_list:
    s = jnp.where(train, s.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-s, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    total = total + jnp.where(train, rank_importance(rank, gamma), 0.0)
  total = jnp.where(train, total, -jnp.inf)
  vals, idx = jax.lax.top_k(total, p)
  return idx, jnp.isfinite(vals)


def build_knowledge(scorers: Sequence[Sequence[Callable]], split: Split, *, top_n: int = 100,
                    num_observed: int = 10, chunk_size: int = 256,
                    gamma: float = IMPORTANCE_GAMMA) -> Knowledge:
  """Top-N unobserved items per (user, teacher, checkpoint) and the observed top-P.

  Args:
    scorers: scorers[x][v] maps [B] user ids to [B, num_items] scores (teacher x, checkpoint v;
      the last checkpoint is the converged model, used for `observed`).
    split: the data split; training items are excluded from the top-N.
    top_n: N, the list length kept (HetComp uses K = 100 ensemble items, so N >= 100).
    num_observed: P, the number of observed items kept (10 in the official code).
    chunk_size: users per chunk (memory O(chunk x items) while building).
    gamma: the importance exponent.
  """
  num_x, num_v = len(scorers), len(scorers[0])
  if any(len(s) != num_v for s in scorers):
    raise ValueError(f"Every teacher needs the same number of checkpoints, got "
                     f"{[len(s) for s in scorers]}.")
  if top_n > split.num_items:
    raise ValueError(f"top_n={top_n} exceeds the catalogue size {split.num_items}.")
  u_total = split.num_users
  ranks = np.zeros((u_total, num_x, num_v, top_n), np.int32)
  observed = np.zeros((u_total, num_observed), np.int32)
  observed_mask = np.zeros((u_total, num_observed), bool)
  for start in range(0, u_total, chunk_size):
    users = np.arange(start, min(start + chunk_size, u_total))
    padded = np.concatenate([users, np.zeros(chunk_size - len(users), users.dtype)])
    train = jnp.asarray(split.dense_mask("train", padded))
    converged = []
    for x in range(num_x):
      for v in range(num_v):
        s = scorers[x][v](padded)
        ranks[users, x, v] = np.asarray(_masked_top(s, train, n=top_n))[:len(users)]
        if v == num_v - 1:
          converged.append(s)
    idx, ok = _observed_top(tuple(converged), train, p=num_observed, gamma=gamma)
    observed[users] = np.asarray(idx)[:len(users)]
    observed_mask[users] = np.asarray(ok)[:len(users)]
  return Knowledge(ranks, observed, observed_mask, split.num_items)


def select_checkpoints(ranks, v):
  """[B, X, V, N] lists and [B, X] checkpoint indices -> the [B, X, N] lists in use."""
  return jnp.take_along_axis(ranks, v[:, :, None, None].astype(jnp.int32), axis=2)[:, :, 0]


@functools.partial(jax.jit, static_argnames=("k", "gamma"))
def ensemble_topk(lists, *, k: int = 100, gamma: float = IMPORTANCE_GAMMA,
                  dissensus_bonus: float = 0.0):
  """The ensemble's top-k unobserved items from the teachers' [B, X, N] top-N lists.

  score(u, i) = mean_x w(r_x) + dissensus_bonus * std_x w(r_x), with r_x = N outside teacher
  x's list (`dissensus_bonus` = 0 is HetComp's ensemble, docs/hetcomp.md; > 0 is our debiasing
  strategy 1, see debias.py). Ties break by smaller item id.

  Args:
    lists: [B, X, N] int item ids, rank order per teacher.
    k: the number of ensemble items returned (HetComp: K = 100).
    gamma: the importance exponent.
    dissensus_bonus: beta >= 0, the weight of the teachers' disagreement.

  Returns:
    (ids [B, k] int32, valid [B, k] bool, dissensus [B, k] float32 = std_x w(r_x)).
  """
  b, x, n = lists.shape
  m = x * n
  if k > m:
    raise ValueError(f"k={k} exceeds the {m} candidates of lists with shape {lists.shape}.")
  ids = lists.reshape(b, m).astype(jnp.int32)
  w = jnp.broadcast_to(rank_importance(jnp.arange(n), gamma), (b, x, n)).reshape(b, m)
  w_floor = rank_importance(n, gamma)
  order = jnp.argsort(ids, axis=-1, stable=True)
  ids_s = jnp.take_along_axis(ids, order, -1)
  w_s = jnp.take_along_axis(w, order, -1)
  first = jnp.concatenate([jnp.ones((b, 1), bool), ids_s[:, 1:] != ids_s[:, :-1]], -1)
  seg = jnp.cumsum(first, -1) - 1
  seg_sum = jax.vmap(lambda d, s: jax.ops.segment_sum(d, s, num_segments=m))
  cnt = seg_sum(jnp.ones_like(w_s), seg)
  s1 = seg_sum(w_s, seg)
  s2 = seg_sum(w_s * w_s, seg)
  item = jax.vmap(lambda d, s: jax.ops.segment_max(d, s, num_segments=m))(ids_s, seg)
  absent = x - cnt
  mean = (s1 + absent * w_floor) / x
  var = jnp.maximum((s2 + absent * w_floor**2) / x - mean**2, 0.0)
  std = jnp.sqrt(var)
  score = jnp.where(cnt > 0, mean + dissensus_bonus * std, -jnp.inf)
  vals, pos = jax.lax.top_k(score, k)
  top_ids = jnp.take_along_axis(item, pos, -1)
  valid = jnp.isfinite(vals)
  return (jnp.where(valid, top_ids, 0).astype(jnp.int32), valid,
          jnp.where(valid, jnp.take_along_axis(std, pos, -1), 0.0))


def construct(knowledge: Knowledge, v, *, k: int = 100, chunk_size: int = 4096,
              gamma: float = IMPORTANCE_GAMMA, dissensus_bonus: float = 0.0):
  """T_u for every user at checkpoints v ([U, X]), chunked: ids, valid, dissensus ([U, k])."""
  u_total = knowledge.ranks.shape[0]
  v = np.asarray(v)
  out_ids = np.zeros((u_total, k), np.int32)
  out_ok = np.zeros((u_total, k), bool)
  out_d = np.zeros((u_total, k), np.float32)
  for start in range(0, u_total, chunk_size):
    sl = slice(start, min(start + chunk_size, u_total))
    n = sl.stop - sl.start
    r, vv = knowledge.ranks[sl], v[sl]
    if n < chunk_size and u_total > chunk_size:  # pad so that one compiled shape serves all
      r = np.concatenate([r, np.zeros((chunk_size - n,) + r.shape[1:], r.dtype)])
      vv = np.concatenate([vv, np.zeros((chunk_size - n,) + vv.shape[1:], vv.dtype)])
    lists = select_checkpoints(jnp.asarray(r), jnp.asarray(vv))
    ids, ok, d = ensemble_topk(lists, k=k, gamma=gamma, dissensus_bonus=dissensus_bonus)
    out_ids[sl], out_ok[sl], out_d[sl] = (np.asarray(ids)[:n], np.asarray(ok)[:n],
                                          np.asarray(d)[:n])
  return out_ids, out_ok, out_d
