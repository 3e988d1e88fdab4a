"""select_coefficients: float64 recomputation of the score table, rejection and reproducibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses import proxy_teacher
from kd_jax.ptloss import closeness, sample_candidates, select_coefficients
from tests._numpy_reference import log_softmax as _np_log_softmax

N, K = 48, 10


def _data(seed=0, sharp=2.0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, K, size=N)
  logits = rng.normal(size=(N, K)) + sharp * np.eye(K)[y]
  return logits.astype(np.float32), y


def _np_proxy(pt, eps, iters=4000):
  """The damped fixed point of docs/ptloss.md in float64, run to convergence."""
  eps = np.broadcast_to(eps if eps.ndim == 2 else eps[None], (pt.shape[-1], eps.shape[-1]))
  m = np.arange(1, eps.shape[-1] + 1)
  q = pt.copy()
  for _ in range(iters):
    dp = ((1 - q)[..., None] ** (m - 1) * m * eps).sum(-1)  # P'(1 - q)
    tilde = pt * (1 + q * dp)
    q = 0.5 * q + 0.5 * tilde / tilde.sum(-1, keepdims=True)
  return q


def _np_distance(q, y, distance):
  d = q - np.eye(q.shape[-1])[y]
  return {"l2": np.sqrt((d**2).sum(-1)), "sq_l2": (d**2).sum(-1),
          "tvd": 0.5 * np.abs(d).sum(-1)}[distance].mean()


@pytest.mark.parametrize("distance,per_class", [("l2", False), ("tvd", True)])
def test_scores_match_float64_recomputation(distance, per_class):
  logits, y = _data()
  sel = select_coefficients(jnp.asarray(logits), jnp.asarray(y), key=jax.random.key(0),
                            num_candidates=12, order=3, distance=distance, per_class=per_class,
                            temperature=2.0, chunk_size=4)
  assert sel.scores.shape == (12,) and sel.candidates.shape[0] == 12
  assert sel.candidates.shape[1:] == ((K, 3) if per_class else (3,))
  pt = np.exp(logits.astype(np.float64) / 2.0)
  pt /= pt.sum(-1, keepdims=True)
  for i in (0, 1, 5, int(sel.index)):
    want = _np_distance(_np_proxy(pt, np.asarray(sel.candidates[i], np.float64)), y, distance)
    np.testing.assert_allclose(sel.scores[i], want, rtol=2e-5)
  assert int(sel.num_invalid) == 0 and bool(np.all(sel.valid))
  assert int(sel.index) == int(np.argmin(sel.scores))
  np.testing.assert_array_equal(sel.epsilon, sel.candidates[sel.index])
  assert np.all(sel.max_iterations <= 10) and np.all(sel.converged_fraction == 1.0)


def test_returns_zero_epsilon_when_teacher_equals_labels():
  _, y = _data(1)
  one_hot_logits = np.where(np.eye(K, dtype=bool)[y], 0.0, -1e4).astype(np.float32)
  sel = select_coefficients(jnp.asarray(one_hot_logits), jnp.asarray(y), key=jax.random.key(3),
                            num_candidates=12, order=3)
  assert int(sel.index) == 0
  np.testing.assert_array_equal(sel.epsilon, np.zeros(3))
  assert float(sel.scores[0]) == 0.0


def test_score_table_reproducible_for_a_fixed_key():
  logits, y = _data(2)
  run = lambda k: select_coefficients(jnp.asarray(logits), jnp.asarray(y), key=jax.random.key(k),
                                      num_candidates=12, order=3)
  a, b, c = run(7), run(7), run(8)
  np.testing.assert_array_equal(a.scores, b.scores)
  np.testing.assert_array_equal(a.candidates, b.candidates)
  assert not np.array_equal(a.candidates[1:], c.candidates[1:])
  assert a.scores[0] == c.scores[0]  # candidate 0 is the vanilla teacher for every key


def test_invalid_candidates_are_rejected_even_when_they_would_score_best():
  logits, y = _data(3, sharp=5.0)  # an accurate teacher: sharpening helps
  mild = [6.0, 0.0]
  invalid = [6.0, -4.0]  # 1 + q^2 P''(1 - q) = 1 - 8 q^2 < 0: not convex, rejected
  cands = jnp.asarray([[0.0, 0.0], invalid, mild], jnp.float32)
  pt = jax.nn.softmax(jnp.asarray(logits))
  raw = [float(closeness(proxy_teacher(pt, c, strict=False).probs, jnp.asarray(y)))
         for c in cands]
  assert raw[1] < min(raw[0], raw[2])  # the test's premise: unchecked, it would win
  sel = select_coefficients(jnp.asarray(logits), jnp.asarray(y), key=None, candidates=cands)
  assert int(sel.index) == 2 and int(sel.num_invalid) == 1
  assert np.isinf(sel.scores[1]) and not bool(sel.valid[1]) and not bool(sel.epsilon_valid[1])
  np.testing.assert_allclose(np.asarray(sel.scores)[[0, 2]], [raw[0], raw[2]], rtol=1e-6)


def test_sample_candidates_law_and_where_mask():
  eps = sample_candidates(jax.random.key(0), 200, 4, num_classes=3, scale=2.0)
  assert eps.shape == (200, 3, 4)
  assert np.all(eps[0] == 0)
  bound = 2.0 / np.arange(1, 5)
  assert np.all(np.abs(eps) <= bound) and np.all(np.abs(eps).max(axis=(0, 1)) > 0.9 * bound)
  # A where mask equals dropping the masked validation examples (float64 recomputation).
  logits, y = _data(4)
  logits[30:] = np.nan  # garbage in masked rows must not matter
  where = np.arange(N) < 30
  masked = select_coefficients(jnp.asarray(logits), jnp.asarray(y), where=jnp.asarray(where),
                               key=jax.random.key(1), num_candidates=12, order=3)
  pt = np.exp(_np_log_softmax(logits[:30].astype(np.float64)))
  for i in (0, 3, 11):
    want = _np_distance(_np_proxy(pt, np.asarray(masked.candidates[i], np.float64)), y[:30], "l2")
    np.testing.assert_allclose(masked.scores[i], want, rtol=2e-5)


def test_bad_inputs_raise():
  logits, y = _data()
  with pytest.raises(ValueError, match=r"labels_val must have shape \(48,\)"):
    select_coefficients(jnp.asarray(logits), jnp.asarray(y[:5]), key=jax.random.key(0))
  with pytest.raises(ValueError, match="distance"):
    select_coefficients(jnp.asarray(logits), jnp.asarray(y), key=jax.random.key(0),
                        distance="l1")
  with pytest.raises(ValueError, match="key"):
    select_coefficients(jnp.asarray(logits), jnp.asarray(y), key=None)
  with pytest.raises(ValueError, match=r"\[C, 10, M\]"):
    select_coefficients(jnp.asarray(logits), jnp.asarray(y), key=None,
                        candidates=jnp.zeros((3, 4, 2)))


def test_closeness_distances_by_hand():
  probs = jnp.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
  labels = jnp.array([0, 2])
  # Row 0: d = (-0.5, 0.3, 0.2); row 1: d = (0.1, 0.1, -0.2).
  sq = np.array([0.25 + 0.09 + 0.04, 0.01 + 0.01 + 0.04])
  np.testing.assert_allclose(closeness(probs, labels, distance="sq_l2"), sq.mean(), rtol=1e-6)
  np.testing.assert_allclose(closeness(probs, labels), np.sqrt(sq).mean(), rtol=1e-6)
  np.testing.assert_allclose(closeness(probs, labels, distance="tvd"), (0.5 + 0.2) / 2, rtol=1e-6)
  np.testing.assert_allclose(closeness(probs, labels, distance="tvd",
                                       where=jnp.array([False, True])), 0.2, rtol=1e-6)
  # The log score: -log q_y = -log 0.5 and -log 0.8.
  np.testing.assert_allclose(closeness(probs, labels, distance="ce"),
                             -(np.log(0.5) + np.log(0.8)) / 2, rtol=1e-6)


def test_expected_calibration_error_by_hand():
  from kd_jax.ptloss import expected_calibration_error  # pylint: disable=g-import-not-at-top
  # Confidences 0.9 (right), 0.85 (wrong), 0.55 (right), 0.4 (wrong); bins of width 0.5:
  # bin (0.5, 1]: conf mean (0.9 + 0.85 + 0.55) / 3, accuracy 2/3; bin [0, 0.5]: 0.4 vs 0.
  probs = jnp.array([[0.9, 0.1], [0.15, 0.85], [0.55, 0.45], [0.4, 0.3]])
  probs = probs.at[3].set(jnp.array([0.4, 0.35]))  # rows need not sum to 1 for the metric
  labels = jnp.array([0, 0, 0, 1])
  want = 3 / 4 * abs(2 / 3 - (0.9 + 0.85 + 0.55) / 3) + 1 / 4 * abs(0 - 0.4)
  np.testing.assert_allclose(expected_calibration_error(probs, labels, num_bins=2), want,
                             rtol=1e-6)
  # Masked rows do not count.
  np.testing.assert_allclose(expected_calibration_error(
      probs, labels, num_bins=2, where=jnp.array([True, False, False, False])), 0.1, rtol=1e-6)
