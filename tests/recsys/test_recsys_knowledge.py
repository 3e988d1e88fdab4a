"""Sparse knowledge: the importance formula, the sort-based ensemble against a dense numpy
reference, the O(users x N) footprint, and building it from scorers."""

import jax.numpy as jnp
import numpy as np

from kd_jax.recsys import debias, knowledge


def _dense_ensemble(lists, num_items, gamma=0.05, bonus=0.0):
  """Reference: w(r) per teacher over the whole catalogue (rank N outside the list)."""
  b, x, n = lists.shape
  w = np.full((b, x, num_items), (1.0 / (n + 1)) ** gamma)
  for u in range(b):
    for t in range(x):
      for r, i in enumerate(lists[u, t]):
        w[u, t, i] = (1.0 / (r + 1)) ** gamma
  in_any = np.zeros((b, num_items), bool)
  for u in range(b):
    in_any[u, lists[u].ravel()] = True
  score = w.mean(1) + bonus * w.std(1)
  return np.where(in_any, score, -np.inf), w.std(1)


def test_rank_importance_formula():
  r = np.array([0, 1, 9, 99])
  np.testing.assert_allclose(knowledge.rank_importance(r), (1.0 / (r + 1.0)) ** 0.05, rtol=1e-6)
  assert float(knowledge.rank_importance(0)) == 1.0


def test_ensemble_topk_matches_dense_reference():
  rng = np.random.default_rng(0)
  b, x, n, items = 4, 3, 6, 15
  lists = np.stack([[rng.choice(items, n, replace=False) for _ in range(x)] for _ in range(b)])
  for bonus in (0.0, 2.0):
    ids, ok, dis = knowledge.ensemble_topk(jnp.asarray(lists), k=8, dissensus_bonus=bonus)
    score, std = _dense_ensemble(lists, items, bonus=bonus)
    for u in range(b):
      # stable reference order: score descending, then item id ascending
      order = sorted(np.flatnonzero(np.isfinite(score[u])), key=lambda i: (-score[u, i], i))
      np.testing.assert_allclose(score[u, np.asarray(ids[u])[np.asarray(ok[u])]],
                                 score[u, order[:8]][:int(ok[u].sum())], rtol=1e-5)
      np.testing.assert_allclose(np.asarray(dis[u])[np.asarray(ok[u])],
                                 std[u, np.asarray(ids[u])[np.asarray(ok[u])]], atol=1e-5)


def test_ensemble_consensus_beats_single_teacher_and_invalid_slots():
  # w(0) = 1, w(1) = 0.5**0.05 = 0.9659, outside (rank N = 2): 3**-0.05 = 0.9466.
  # item 7: ranks (1, 0) -> 0.9830; item 3: (0, out) -> 0.9733; item 5: (out, 1) -> 0.9563
  lists = jnp.asarray([[[3, 7], [7, 5]]])
  ids, ok, _ = knowledge.ensemble_topk(lists, k=4)
  assert np.asarray(ids)[0, :3].tolist() == [7, 3, 5]
  assert np.asarray(ok).tolist() == [[True, True, True, False]]  # 3 unique candidates


def test_select_checkpoints():
  ranks = jnp.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
  v = jnp.asarray([[0, 3, 1], [2, 2, 0]])
  got = knowledge.select_checkpoints(ranks, v)
  for u in range(2):
    for t in range(3):
      np.testing.assert_array_equal(got[u, t], np.asarray(ranks)[u, t, int(v[u, t])])


def test_memory_is_o_users_times_n(tiny_split):
  num_x, num_v, n = 2, 4, 5
  scorers = []
  rng = np.random.default_rng(0)
  for _ in range(num_x):
    tables = [jnp.asarray(rng.normal(size=(tiny_split.num_users, tiny_split.num_items)),
                          jnp.float32) for _ in range(num_v)]
    scorers.append([lambda u, t=t: t[jnp.asarray(u)] for t in tables])
  know = knowledge.build_knowledge(scorers, tiny_split, top_n=n, num_observed=3, chunk_size=16)
  u = tiny_split.num_users
  assert know.ranks.shape == (u, num_x, num_v, n)
  assert know.nbytes == u * num_x * num_v * n * 4 + u * 3 * 4 + u * 3  # no users x items
  # top-N excludes training items and follows the scorer
  for user in range(u):
    tr = set(tiny_split.rows("train", [user])[0].tolist())
    s = np.asarray(scorers[0][1](np.array([user])))[0]
    ref = [i for i in np.argsort(-s, kind="stable") if i not in tr][:n]
    np.testing.assert_array_equal(know.ranks[user, 0, 1], ref)
    obs = know.observed[user][know.observed_mask[user]]
    assert set(obs.tolist()) <= tr and len(obs) == min(3, len(tr))
  ids, ok, d = knowledge.construct(know, np.full((u, num_x), 3), k=4, chunk_size=16)
  assert ids.shape == (u, 4) and ok.all()


def test_dissensus_weights_mean_one():
  d = np.array([[0.1, 0.3, 0.0, 0.2], [0.0, 0.0, 0.0, 0.0]], np.float32)
  ok = np.array([[True, True, True, False], [True, True, False, False]])
  w = debias.dissensus_weights(d, ok, 0.5)
  np.testing.assert_allclose(w[0, :3], 0.5 + 0.5 * d[0, :3] / (0.4 / 3), rtol=1e-6)
  np.testing.assert_allclose(w[0, :3].mean(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w[1], [1, 1, 0, 0])
