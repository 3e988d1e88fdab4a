"""Sparse top-k KD: k = K is dense KD, k < K matches a float64 numpy restatement of the k + 1
bucket KL, and the numerics contract (+-1e4 logits, bfloat16, all-False masks) holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses
from tests._numpy_reference import log_softmax as _np_log_softmax


def _np_bucket_kl(s, t, k, temperature):
  """KL over the teacher's top-k classes plus one tail bucket, float64, written from scratch:
  sort the teacher's tempered probabilities, sum the rest into one cell on both sides."""
  s = np.asarray(s, np.float64) / temperature
  t = np.asarray(t, np.float64) / temperature
  p, q = np.exp(_np_log_softmax(t)), np.exp(_np_log_softmax(s))
  out = np.zeros(t.shape[:-1])
  for row in np.ndindex(*t.shape[:-1]):
    order = np.argsort(-t[row], kind="stable")
    top, rest = order[:k], order[k:]
    cells_p = np.append(p[row][top], p[row][rest].sum())
    cells_q = np.append(q[row][top], q[row][rest].sum())
    keep = cells_p > 0
    out[row] = np.sum(cells_p[keep] * np.log(cells_p[keep] / cells_q[keep]))
  return out


def _np_bucket_grad(s, t, k, temperature):
  """d/ds of T^2 KL_{k+1}: T (q_j - p_j) on the top k, T q_j (1 - p_tail / q_tail) on the tail."""
  s = np.asarray(s, np.float64) / temperature
  t = np.asarray(t, np.float64) / temperature
  p, q = np.exp(_np_log_softmax(t)), np.exp(_np_log_softmax(s))
  g = np.zeros_like(s)
  for row in np.ndindex(*t.shape[:-1]):
    order = np.argsort(-t[row], kind="stable")
    top, rest = order[:k], order[k:]
    g[row][top] = q[row][top] - p[row][top]
    if rest.size:
      g[row][rest] = q[row][rest] * (1 - p[row][rest].sum() / q[row][rest].sum())
  return temperature * g


def _logits(shape, seed, scale=2.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_k_equals_num_classes_is_dense_kd(temperature):
  s, t = _logits((6, 10), 0), _logits((6, 10), 1)
  top = losses.teacher_topk(t, k=10, temperature=temperature)
  got = losses.sparse_kd(s, top, temperature=temperature)
  want = losses.kd(s, t, temperature=temperature)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(losses.topk_kl(s, t, k=10, temperature=temperature)
                             * temperature**2, want, rtol=1e-6, atol=1e-7)
  g_sparse = jax.grad(lambda x: losses.sparse_kd(x, top, temperature=temperature).sum())(s)
  g_dense = jax.grad(lambda x: losses.kd(x, t, temperature=temperature).sum())(s)
  np.testing.assert_allclose(g_sparse, g_dense, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k,temperature", [(1, 1.0), (3, 4.0), (7, 2.0)])
def test_k_below_num_classes_matches_float64_reference(k, temperature):
  s, t = _logits((5, 9), 2), _logits((5, 9), 3, scale=3.0)
  top = losses.teacher_topk(t, k=k, temperature=temperature)
  want = temperature**2 * _np_bucket_kl(s, t, k, temperature)
  np.testing.assert_allclose(losses.sparse_kd(s, top, temperature=temperature), want,
                             rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(losses.topk_kl(s, t, k=k, temperature=temperature),
                             want / temperature**2, rtol=2e-5, atol=1e-6)
  g = jax.grad(lambda x: losses.sparse_kd(x, top, temperature=temperature).sum())(s)
  np.testing.assert_allclose(g, _np_bucket_grad(s, t, k, temperature), rtol=1e-4, atol=1e-6)


def test_teacher_topk_values_indices_and_tail_match_numpy():
  t = _logits((3, 8), 4)
  top = losses.teacher_topk(t, k=3, temperature=2.0)
  order = np.argsort(-t, axis=-1, kind="stable")
  np.testing.assert_array_equal(top.indices, order[:, :3])
  np.testing.assert_array_equal(top.logits, np.take_along_axis(t, order[:, :3], -1))
  rest = np.take_along_axis(t.astype(np.float64), order[:, 3:], -1) / 2.0
  np.testing.assert_allclose(top.tail_logsumexp, np.log(np.exp(rest).sum(-1)), rtol=1e-6)
  assert top.indices.dtype == jnp.int32
  assert np.all(np.isneginf(losses.teacher_topk(t, k=8).tail_logsumexp))


def test_topk_kl_is_a_lower_bound_growing_with_k():
  # Coarse-graining never increases a KL, and the top-k cells refine as k grows.
  s, t = _logits((4, 12), 5), _logits((4, 12), 6, scale=3.0)
  values = np.stack([losses.topk_kl(s, t, k=k, temperature=2.0) for k in (1, 2, 5, 12)])
  assert np.all(np.diff(values, axis=0) >= -1e-6)
  np.testing.assert_allclose(values[-1], losses.kd(s, t, temperature=2.0) / 4.0, rtol=1e-6)


def test_language_model_logits_with_a_token_mask():
  s, t = _logits((2, 5, 11), 7), _logits((2, 5, 11), 8)
  where = np.array([[True, True, False, True, False], [False, True, True, True, True]])
  got = losses.topk_kl(s, t, k=4, temperature=1.5, where=jnp.asarray(where))
  assert got.shape == (2, 5)
  want = np.where(where, _np_bucket_kl(s, t, 4, 1.5), 0.0)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_extreme_logits_give_finite_values_and_gradients():
  s = jnp.array([[1e4, -1e4, 0.0, 3.0, -1e4], [-1e4, 1e4, 3.0, 1e4, 0.0]])
  t = jnp.array([[-1e4, 1e4, 0.0, 2.0, 1e4], [-1e4, 1e4, -1e4, 0.0, 5.0]])
  for k in (2, 5):
    top = losses.teacher_topk(t, k=k, temperature=1.0)
    value = losses.sparse_kd(s, top, temperature=1.0)
    g_s, g_values, g_tail = jax.grad(
        lambda a, v, tail: losses.sparse_kd(a, top._replace(logits=v, tail_logsumexp=tail),
                                            temperature=1.0).sum(),
        argnums=(0, 1, 2))(s, top.logits, top.tail_logsumexp)
    g_t = jax.grad(lambda b: losses.topk_kl(s, b, k=k).sum())(t)
    for x in (value, g_s, g_values, g_tail, g_t):
      assert np.all(np.isfinite(np.asarray(x))), (k, x)
    assert np.all(np.asarray(value) >= 0)


def test_bfloat16_inputs_are_computed_in_float32():
  s, t = _logits((4, 10), 9), _logits((4, 10), 10)
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = losses.topk_kl(sb, tb, k=3, temperature=2.0)
  assert got.dtype == jnp.float32
  want = _np_bucket_kl(np.asarray(sb, np.float32), np.asarray(tb, np.float32), 3, 2.0)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  top = losses.teacher_topk(tb, k=3, temperature=2.0)
  assert losses.sparse_kd(sb, top, temperature=2.0).dtype == jnp.float32


def test_all_false_mask_is_zero_with_zero_gradients_and_ignores_garbage():
  s = jnp.asarray(_logits((3, 6), 11))
  t = jnp.asarray(_logits((3, 6), 12)).at[1].set(jnp.nan).at[2, 0].set(jnp.inf)
  none = jnp.zeros(3, bool)
  g_s, g_t = jax.grad(lambda a, b: losses.topk_kl(a, b, k=2, where=none).sum(),
                      argnums=(0, 1))(s, t)
  assert float(losses.topk_kl(s, t, k=2, where=none).sum()) == 0.0
  assert np.all(np.asarray(g_s) == 0) and np.all(np.asarray(g_t) == 0)
  # Partially masked: the garbage rows are masked, the clean row is the reference value.
  where = jnp.array([True, False, False])
  got = losses.topk_kl(s, t, k=2, where=where)
  np.testing.assert_allclose(got, [_np_bucket_kl(s[:1], t[:1], 2, 1.0)[0], 0.0, 0.0],
                             rtol=2e-5, atol=1e-6)
  bad = losses.TopK(jnp.full((3, 2), jnp.nan), jnp.full((3, 2), 99, jnp.int32),
                    jnp.full((3,), jnp.inf))
  g = jax.grad(lambda a: losses.sparse_kd(a, bad, temperature=4.0, where=none).sum())(s)
  assert np.all(np.asarray(g) == 0)


def test_clear_errors():
  s, t = jnp.zeros((2, 5)), jnp.zeros((2, 5))
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\]"):
    losses.teacher_topk(t, k=6)
  with pytest.raises(ValueError, match="k must be"):
    losses.topk_kl(s, t, k=0)
  with pytest.raises(ValueError, match="class mismatch"):
    losses.topk_kl(s, jnp.zeros((2, 4)), k=2)
  top = losses.teacher_topk(t, k=2)
  with pytest.raises(ValueError, match="batch shape"):
    losses.sparse_kd(jnp.zeros((3, 5)), top, temperature=1.0)
  with pytest.raises(ValueError, match="integers"):
    losses.sparse_kd(s, top._replace(indices=top.indices.astype(jnp.float32)), temperature=1.0)
  with pytest.raises(ValueError, match="temperature"):
    losses.sparse_kd(s, top, temperature=0.0)
  with pytest.raises(ValueError, match="TopK"):
    losses.sparse_kd(s, t, temperature=1.0)
