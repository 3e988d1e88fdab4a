"""Full-ranking Recall/NDCG and popularity lift against hand-computed and float64 references."""

import math

import jax.numpy as jnp
import numpy as np
import rax

from kd_jax.recsys import metrics


def _np_metrics(scores, relevant, exclude, k):
  """Independent float64 reference: Recall@K = hits/|GT|, binary NDCG, IDCG over min(|GT|,K)."""
  rec, ndcg = [], []
  for s, r, e in zip(scores, relevant, exclude):
    cand = [i for i in np.argsort(-s, kind="stable") if not e[i]][:k]
    hits = [1.0 if r[i] else 0.0 for i in cand]
    n_rel = r.sum()
    rec.append(sum(hits) / max(n_rel, 1))
    dcg = sum(h / math.log2(p + 2) for p, h in enumerate(hits))
    idcg = sum(1.0 / math.log2(p + 2) for p in range(min(int(n_rel), k)))
    ndcg.append(dcg / idcg if idcg > 0 else 0.0)
  return np.asarray(rec), np.asarray(ndcg)


def test_hand_computed_ndcg_and_recall():
  # items 0..4 scored 0.9..0.5; item 0 is a training item (excluded); relevant: items 1 and 3.
  # ranking after exclusion: 1, 2, 3, 4 -> hits at ranks 1 and 3.
  scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]], np.float32)
  relevant = np.array([[False, True, False, True, False]])
  exclude = np.array([[True, False, False, False, False]])
  out = metrics._chunk_metrics(scores, relevant, exclude, jnp.ones(5), ks=(2, 3), pop_k=1)
  idcg2 = 1.0 + 1.0 / math.log2(3)
  np.testing.assert_allclose(out["ndcg@2"], [1.0 / idcg2], rtol=1e-6)  # 0.6131
  np.testing.assert_allclose(out["ndcg@3"], [(1.0 + 0.5) / idcg2], rtol=1e-6)  # 0.9197
  np.testing.assert_allclose(out["recall@2"], [0.5])
  np.testing.assert_allclose(out["recall@3"], [1.0])


def test_random_cases_match_numpy_reference():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(7, 40)).astype(np.float32)
  relevant = rng.random((7, 40)) < 0.2
  exclude = (rng.random((7, 40)) < 0.3) & ~relevant
  out = metrics._chunk_metrics(scores, relevant, exclude, jnp.ones(40), ks=(5, 10), pop_k=3)
  for k in (5, 10):
    rec, ndcg = _np_metrics(scores.astype(np.float64), relevant, exclude, k)
    np.testing.assert_allclose(out[f"recall@{k}"], rec, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out[f"ndcg@{k}"], ndcg, rtol=1e-5, atol=1e-7)
    # rax's sort-based metrics agree (a second, independent implementation)
    np.testing.assert_allclose(out[f"recall@{k}"], rax.recall_metric(
        scores, relevant.astype(np.float32), where=~exclude, topn=k, reduce_fn=None), rtol=1e-5)
    np.testing.assert_allclose(out[f"ndcg@{k}"], rax.ndcg_metric(
        scores, relevant.astype(np.float32), where=~exclude, topn=k, reduce_fn=None), rtol=1e-5)


def test_evaluate_chunks_and_excludes_other_heldout(tiny_split):
  rng = np.random.default_rng(1)
  table = rng.normal(size=(tiny_split.num_users, tiny_split.num_items)).astype(np.float32)
  f = lambda u: jnp.asarray(table)[jnp.asarray(u)]  # noqa: E731
  a = metrics.evaluate(f, tiny_split, "test", ks=(5, 10), chunk_size=7)
  b = metrics.evaluate(f, tiny_split, "test", ks=(5, 10), chunk_size=64)
  users = np.arange(tiny_split.num_users)
  rel = tiny_split.dense_mask("test", users)
  exc = tiny_split.dense_mask("train", users) | tiny_split.dense_mask("valid", users)
  rec, ndcg = _np_metrics(table.astype(np.float64), rel, exc, 10)
  for res in (a, b):
    np.testing.assert_allclose(res["recall@10"], rec.mean(), rtol=1e-5)
    np.testing.assert_allclose(res["ndcg@10"], ndcg.mean(), rtol=1e-5)


def test_popularity_lift_reference(tiny_split):
  users, items = tiny_split.pairs("train")
  phi = np.bincount(items, minlength=tiny_split.num_items) / tiny_split.num_users
  gap_p = np.mean([phi[tiny_split.rows("train", [u])[0]].mean()
                   for u in range(tiny_split.num_users)])
  np.testing.assert_allclose(metrics.profile_popularity(tiny_split), gap_p, rtol=1e-12)
  # recommending the 3 most popular unseen items vs the profile
  rec_pop = np.array([0.5, 0.3])
  np.testing.assert_allclose(metrics.popularity_lift(rec_pop, 0.2), (0.4 - 0.2) / 0.2 * 100)
  # end to end: numpy GAP_r of the top-10 (train and valid excluded) of a fixed scorer
  rng = np.random.default_rng(2)
  table = rng.normal(size=(tiny_split.num_users, tiny_split.num_items))
  exc = (tiny_split.dense_mask("train", np.arange(tiny_split.num_users))
         | tiny_split.dense_mask("valid", np.arange(tiny_split.num_users)))
  gap_r = np.mean([phi[[i for i in np.argsort(-t) if not e[i]][:10]].mean()
                   for t, e in zip(table, exc)])
  f = lambda u: jnp.asarray(table, jnp.float32)[jnp.asarray(u)]  # noqa: E731
  np.testing.assert_allclose(metrics.evaluate(f, tiny_split, "test")["popularity_lift"],
                             (gap_r - gap_p) / gap_p * 100, rtol=1e-5)
  pop_first = lambda u: jnp.broadcast_to(jnp.asarray(phi, jnp.float32), (len(u), len(phi)))  # noqa
  rare_first = lambda u: -pop_first(u)  # noqa: E731
  assert (metrics.evaluate(pop_first, tiny_split, "test")["popularity_lift"]
          > metrics.evaluate(rare_first, tiny_split, "test")["popularity_lift"])
