"""HetComp's phase-A and phase-B losses against float64 numpy references written from the
formulas (docs/hetcomp.md), plus the numerical edge cases every loss must survive."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.recsys import losses


def _ref_a(s, train, t_ids, t_ok, p_ids, p_ok, w=None):
  out = []
  for u in range(s.shape[0]):
    T = [int(i) for i, ok in zip(t_ids[u], t_ok[u]) if ok]
    P = [int(i) for i, ok in zip(p_ids[u], p_ok[u]) if ok]
    rest = [j for j in range(s.shape[1]) if not train[u, j] and j not in T]
    rest_sum = sum(np.exp(s[u, j]) for j in rest)
    tot = 0.0
    for pos, i in enumerate(t_ids[u]):
      if t_ok[u, pos]:
        wt = 1.0 if w is None else w[u, pos]
        tot += wt * (s[u, i] - np.log(np.exp(s[u, i]) + rest_sum))
    for i in P:
      tot += s[u, i] - np.log(np.exp(s[u, i]) + rest_sum)
    out.append(-tot)
  return np.asarray(out)


def _ref_pl(s_u, pi, rest):
  tot = 0.0
  for k in range(len(pi)):
    tot += s_u[pi[k]] - np.log(sum(np.exp(s_u[i]) for i in pi[k:])
                               + sum(np.exp(s_u[j]) for j in rest))
  return -tot


def _ref_b(s, train, t_ids, t_ok, p_ids, p_ok, short, long):
  out = []
  for u in range(s.shape[0]):
    t_l = [int(i) for i, ok in zip(t_ids[u, :long], t_ok[u, :long]) if ok]
    t_s = [int(i) for i, ok in zip(t_ids[u, :short], t_ok[u, :short]) if ok]
    P = [int(i) for i, ok in zip(p_ids[u], p_ok[u]) if ok]
    unobs = [j for j in range(s.shape[1]) if not train[u, j]]
    rest_l = [j for j in unobs if j not in t_l]
    rest_s = [j for j in unobs if j not in t_s]
    out.append(_ref_pl(s[u], P, rest_l)
               + 0.5 * (_ref_pl(s[u], t_l, rest_l) + _ref_pl(s[u], t_s, rest_s)))
  return np.asarray(out)


def _case(seed=0, b=3, n=12, k=5, p=3):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(b, n)) * 2
  train = np.zeros((b, n), bool)
  t_ids = np.zeros((b, k), np.int32)
  p_ids = np.zeros((b, p), np.int32)
  for u in range(b):
    perm = rng.permutation(n)
    train[u, perm[:p + 1]] = True
    p_ids[u] = perm[:p]
    t_ids[u] = perm[p + 1:p + 1 + k]
  t_ok = np.ones((b, k), bool)
  t_ok[0, 3:] = False  # a short knowledge list
  p_ok = np.ones((b, p), bool)
  p_ok[1, 2:] = False
  return s, train, t_ids, t_ok, p_ids, p_ok


def test_phase_a_hand_case():
  # 3 items, item 0 observed (in P), item 1 in T, item 2 the only rest item.
  s = np.array([[1.0, 2.0, 0.5]])
  args = (s, np.array([[True, False, False]]), np.array([[1]]), np.array([[True]]),
          np.array([[0]]), np.array([[True]]))
  expected = -((2.0 - np.log(np.exp(2.0) + np.exp(0.5)))
               + (1.0 - np.log(np.exp(1.0) + np.exp(0.5))))
  np.testing.assert_allclose(losses.hetcomp_phase_a_loss(*args), [expected], rtol=1e-6)


def test_phase_a_matches_reference_with_weights():
  s, train, t_ids, t_ok, p_ids, p_ok = _case()
  w = np.random.default_rng(5).uniform(0.2, 2.0, t_ids.shape)
  got = losses.hetcomp_phase_a_loss(s, train, t_ids, t_ok, p_ids, p_ok, topk_weights=w)
  np.testing.assert_allclose(got, _ref_a(s, train, t_ids, t_ok, p_ids, p_ok, w), rtol=2e-5)


def test_phase_b_matches_reference():
  s, train, t_ids, t_ok, p_ids, p_ok = _case(seed=1)
  got = losses.hetcomp_phase_b_loss(s, train, t_ids, t_ok, p_ids, p_ok, short=2, long=4)
  np.testing.assert_allclose(got, _ref_b(s, train, t_ids, t_ok, p_ids, p_ok, 2, 4), rtol=2e-5)


def test_plackett_luce_hand_case():
  # pi = (a, b) with scores (1, 0), rest {c} with score -1:
  # -[1 - log(e + 1 + e^-1)] - [0 - log(1 + e^-1)]
  got = losses.plackett_luce(jnp.array([[1.0, 0.0]]), jnp.array([[True, True]]),
                             jnp.array([-1.0]))
  exp = -(1 - np.log(np.e + 1 + np.exp(-1))) - (0 - np.log(1 + np.exp(-1)))
  np.testing.assert_allclose(got, [exp], rtol=1e-6)


@pytest.mark.parametrize("phase", ["a", "b"])
def test_numerics_extremes_masks_and_bf16(phase):
  fn = losses.hetcomp_phase_a_loss if phase == "a" else losses.hetcomp_phase_b_loss
  kw = {} if phase == "a" else {"short": 2, "long": 4}
  s, train, t_ids, t_ok, p_ids, p_ok = _case(seed=2)
  big = np.where(np.random.default_rng(0).random(s.shape) < 0.5, 1e4, -1e4)
  for clip in (40.0, None):
    val, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, train, t_ids, t_ok, p_ids, p_ok,
                                                         clip=clip, **kw)))(jnp.asarray(big))
    assert np.isfinite(val) and np.all(np.isfinite(grad))
  # all-false knowledge masks and an all-observed row (empty rest pool): exactly 0, finite grads
  none_t, none_p = np.zeros_like(t_ok), np.zeros_like(p_ok)
  all_train = np.ones_like(train)
  val, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, all_train, t_ids, none_t, p_ids,
                                                      none_p, **kw)))(jnp.asarray(s))
  assert float(val) == 0.0 and np.all(np.asarray(grad) == 0.0)
  # empty rest pool but valid knowledge: finite
  val, grad = jax.value_and_grad(lambda x: jnp.sum(fn(x, all_train, t_ids, t_ok, p_ids, p_ok,
                                                      **kw)))(jnp.asarray(s))
  assert np.isfinite(val) and np.all(np.isfinite(grad))
  # masked users contribute exactly 0; zero scores are fine
  where = np.array([True, False, True])
  out = fn(np.zeros_like(s), train, t_ids, t_ok, p_ids, p_ok, where=where, **kw)
  assert float(out[1]) == 0.0 and np.all(np.isfinite(out))
  # bfloat16 inputs are computed in float32
  out16 = fn(jnp.asarray(s, jnp.bfloat16), train, t_ids, t_ok, p_ids, p_ok, **kw)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, fn(jnp.asarray(s, jnp.bfloat16).astype(jnp.float32), train,
                                       t_ids, t_ok, p_ids, p_ok, **kw), rtol=1e-6)


def test_bad_shapes_raise():
  s, train, t_ids, t_ok, p_ids, p_ok = _case()
  with pytest.raises(ValueError, match="train_mask"):
    losses.hetcomp_phase_a_loss(s, train[:, :3], t_ids, t_ok, p_ids, p_ok)
  with pytest.raises(ValueError, match="fewer than long"):
    losses.hetcomp_phase_b_loss(s, train, t_ids, t_ok, p_ids, p_ok, long=50)


def _ref_rrd(s_int, s_unint, m_int, m_unint):
  """DE-RRD's relaxed ranking loss written out in float64: only the interesting positions."""
  out = []
  for u in range(s_int.shape[0]):
    pi = [float(x) for x, ok in zip(s_int[u], m_int[u]) if ok]
    rest = sum(np.exp(float(x)) for x, ok in zip(s_unint[u], m_unint[u]) if ok)
    tot = 0.0
    for k in range(len(pi)):
      tot += pi[k] - np.log(sum(np.exp(x) for x in pi[k:]) + rest)
    out.append(-tot)
  return np.asarray(out)


def _rrd_case(seed=0, b=4, k=5, l=7):
  rng = np.random.default_rng(seed)
  s_int = rng.normal(size=(b, k)) * 2
  s_unint = rng.normal(size=(b, l)) * 2
  m_int = np.ones((b, k), bool)
  m_int[1, 3:] = False  # a short interesting list
  m_unint = np.ones((b, l), bool)
  m_unint[2, ::2] = False
  m_unint[3] = False  # no uninteresting item at all
  return s_int, s_unint, m_int, m_unint


def test_rrd_hand_case_and_reference():
  # interesting (a, b) with scores (2, 1), uninteresting {c, d} with (0, -1):
  # -[2 - log(e^2 + e + 1 + e^-1)] - [1 - log(e + 1 + e^-1)]
  rest = 1 + np.exp(-1)
  exp = -(2 - np.log(np.exp(2) + np.e + rest)) - (1 - np.log(np.e + rest))
  got = losses.rrd_loss(jnp.array([[2.0, 1.0]]), jnp.array([[0.0, -1.0]]))
  np.testing.assert_allclose(got, [exp], rtol=1e-6)
  s_int, s_unint, m_int, m_unint = _rrd_case()
  got = losses.rrd_loss(s_int, s_unint, interesting_mask=m_int, uninteresting_mask=m_unint)
  np.testing.assert_allclose(got, _ref_rrd(s_int, s_unint, m_int, m_unint), rtol=2e-5)


def test_rrd_is_listmle_minus_the_uninteresting_positions():
  # ListMLE (rax) over [pi; U] in that order = RRD + ListMLE over U alone (same order).
  import rax
  s_int, s_unint, _, _ = _rrd_case(seed=3)
  k, l = s_int.shape[1], s_unint.shape[1]
  both = np.concatenate([s_int, s_unint], 1)
  labels = np.broadcast_to(np.arange(k + l, 0, -1, dtype=np.float32), both.shape)
  full = rax.listmle_loss(jnp.asarray(both), jnp.asarray(labels), reduce_fn=None)
  tail = rax.listmle_loss(jnp.asarray(s_unint), jnp.asarray(labels[:, k:]), reduce_fn=None)
  np.testing.assert_allclose(losses.rrd_loss(s_int, s_unint), full - tail, rtol=1e-5)


def test_rrd_numerics_masks_and_bf16():
  s_int, s_unint, m_int, m_unint = _rrd_case(seed=4)
  rng = np.random.default_rng(1)
  big_i = np.where(rng.random(s_int.shape) < 0.5, 1e4, -1e4)
  big_u = np.where(rng.random(s_unint.shape) < 0.5, 1e4, -1e4)
  f = lambda a, b, **kw: jnp.sum(losses.rrd_loss(a, b, **kw))  # noqa: E731
  val, grads = jax.value_and_grad(f, argnums=(0, 1))(
      jnp.asarray(big_i), jnp.asarray(big_u), interesting_mask=m_int, uninteresting_mask=m_unint)
  assert np.isfinite(val) and all(np.all(np.isfinite(g)) for g in grads)
  # all-false masks: exactly 0 with zero gradients; zero scores are finite
  val, grads = jax.value_and_grad(f, argnums=(0, 1))(
      jnp.asarray(s_int), jnp.asarray(s_unint), interesting_mask=np.zeros_like(m_int),
      uninteresting_mask=np.zeros_like(m_unint))
  assert float(val) == 0.0 and all(np.all(np.asarray(g) == 0.0) for g in grads)
  out = losses.rrd_loss(np.zeros_like(s_int), np.zeros_like(s_unint),
                        where=np.array([True, False, True, True]))
  assert float(out[1]) == 0.0 and np.all(np.isfinite(out))
  # masked entries never reach the loss, whatever their scores
  poisoned_u = np.where(m_unint, s_unint, 1e4)
  np.testing.assert_allclose(
      losses.rrd_loss(s_int, poisoned_u, interesting_mask=m_int, uninteresting_mask=m_unint),
      _ref_rrd(s_int, s_unint, m_int, m_unint), rtol=2e-5)
  # bfloat16 inputs are computed in float32
  out16 = losses.rrd_loss(jnp.asarray(s_int, jnp.bfloat16), jnp.asarray(s_unint, jnp.bfloat16))
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(
      out16, losses.rrd_loss(jnp.asarray(s_int, jnp.bfloat16).astype(jnp.float32),
                             jnp.asarray(s_unint, jnp.bfloat16).astype(jnp.float32)), rtol=1e-6)
  with pytest.raises(ValueError, match="share the user axis"):
    losses.rrd_loss(s_int, s_unint[:2])
  with pytest.raises(ValueError, match="interesting_mask"):
    losses.rrd_loss(s_int, s_unint, interesting_mask=m_int[:, :2])
