"""ptloss and proxy_teacher against float64 numpy formulas, Poly-1, and a brute-force minimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from kd_jax.losses import epsilon_is_valid, kd, proxy_teacher, ptloss
from tests._numpy_reference import log_softmax as _np_log_softmax


def _np_ptloss(s, t, eps, temp=1.0):
  """Exact PTLoss in float64: KL + sum_k p_t,k sum_m eps_{k,m} (1 - p_s,k)^m."""
  lt, ls = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
  pt, ps = np.exp(lt), np.exp(ls)
  eps = np.broadcast_to(eps if eps.ndim == 2 else eps[None], (s.shape[-1], eps.shape[-1]))
  m = np.arange(1, eps.shape[-1] + 1)
  poly = ((1 - ps)[..., None] ** m * eps).sum(-1)
  return (pt * (lt - ls)).sum(-1) + (pt * poly).sum(-1)


# -------------------------------------------------------------------------------------- ptloss


@pytest.mark.parametrize("per_class", [False, True])
def test_ptloss_matches_numpy(per_class):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 4, 3, 7)) * 2
  eps = rng.uniform(-1, 1, size=(7, 5) if per_class else (5,))
  got = ptloss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
               jnp.asarray(eps, jnp.float32), temperature=2.0)
  assert got.shape == (4, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_ptloss(s, t, eps, 2.0), rtol=1e-5, atol=1e-6)


def test_ptloss_hand_computed_two_classes():
  # p_t = (1/4, 3/4), p_s = (1/2, 1/2), eps = (0.3, -0.2) shared: each u = 1/2.
  t = jnp.log(jnp.array([[0.25, 0.75]]))
  s = jnp.zeros((1, 2))
  kl = 0.25 * np.log(0.5) + 0.75 * np.log(1.5)
  extra = 0.3 * 0.5 - 0.2 * 0.25  # sum_k p_t,k = 1
  np.testing.assert_allclose(ptloss(s, t, jnp.array([0.3, -0.2])), [kl + extra], rtol=1e-6)


def test_ptloss_zero_epsilon_equals_kd_over_t_squared():
  rng = np.random.default_rng(1)
  s, t = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(2, 8, 10)))
  for temp in (1.0, 4.0):
    got = ptloss(s, t, jnp.zeros((10, 3)), temperature=temp)
    np.testing.assert_allclose(got, kd(s, t, temperature=temp) / temp**2, rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.floats(-2.0, 2.0), st.integers(0, 2**31 - 1))
def test_ptloss_m1_one_hot_teacher_is_poly1(num_classes, eps1, seed):
  # Leng et al. 2022, Poly-1: CE + eps * (1 - p_y). A one-hot teacher via a very large logit.
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(3, num_classes)) * 3
  y = rng.integers(0, num_classes, size=3)
  t = np.where(np.eye(num_classes, dtype=bool)[y], 0.0, -1e4)
  ls = _np_log_softmax(s)[np.arange(3), y]
  want = -ls + eps1 * (1 - np.exp(ls))
  got = ptloss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
               jnp.array([eps1], jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_truncated_series_converges_to_exact_form():
  rng = np.random.default_rng(2)
  # Student probabilities bounded away from 0 (K = 4, logits in [-1, 1]: p >= 0.03).
  s, t = (jnp.asarray(a, jnp.float32) for a in rng.uniform(-1, 1, size=(2, 6, 4)))
  eps = jnp.asarray(rng.uniform(-0.5, 0.5, size=(4, 3)), jnp.float32)
  exact = np.asarray(ptloss(s, t, eps))
  errors = [np.abs(np.asarray(ptloss(s, t, eps, series_terms=n)) - exact).max()
            for n in (3, 10, 40, 400)]
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-5, errors
  # The series form against its own float64 formula at N = 10.
  pt, ps = np.exp(_np_log_softmax(np.asarray(t, np.float64))), np.exp(
      _np_log_softmax(np.asarray(s, np.float64)))
  m = np.arange(1, 11)
  coef = np.broadcast_to(1.0 / m, (4, 10)).copy()
  coef[:, :3] += np.asarray(eps, np.float64)
  series = ((1 - ps)[..., None] ** m * coef).sum(-1)
  want = (pt * np.log(pt)).sum(-1) + (pt * series).sum(-1)
  np.testing.assert_allclose(ptloss(s, t, eps, series_terms=10), want, rtol=1e-5, atol=1e-6)


def test_ptloss_rejects_bad_epsilon_and_series_terms():
  s = jnp.zeros((2, 5))
  with pytest.raises(ValueError, match=r"\(4, 3\).*5 classes"):
    ptloss(s, s, jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match="epsilon.shape"):
    ptloss(s, s, jnp.zeros((5, 3, 1)))
  with pytest.raises(ValueError, match="series_terms"):
    ptloss(s, s, jnp.zeros((3,)), series_terms=2)
  with pytest.raises(ValueError, match=r"\(2, 5\).*\(2, 4\)"):
    ptloss(s, jnp.zeros((2, 4)), jnp.zeros((3,)))


def test_ptloss_numerics_where_extremes_bf16():
  s = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0]])
  t = jnp.array([[-1e4, 1e4, 0.0], [0.0, 1e4, -1e4]])
  eps = jnp.array([0.5, -0.3, 0.2])
  f = lambda s, t, w: ptloss(s, t, eps, where=w).sum()
  val, (gs, gt) = jax.value_and_grad(f, argnums=(0, 1))(s, t, None)
  assert np.isfinite(val) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  w = jnp.zeros((2,), bool)
  assert float(f(s, t, w)) == 0.0 and np.all(jax.grad(f)(s, t, w) == 0)
  w = jnp.array([True, False])
  np.testing.assert_allclose(ptloss(s, t, eps, where=w), [ptloss(s, t, eps)[0], 0.0])
  rng = np.random.default_rng(3)
  a, b = (jnp.asarray(x, jnp.bfloat16) for x in rng.normal(size=(2, 4, 6)))
  got = ptloss(a, b, eps)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ptloss(a.astype(jnp.float32), b.astype(jnp.float32), eps),
                             rtol=1e-6)


def test_ptloss_jit_vmap_grads():
  rng = np.random.default_rng(4)
  s, t = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(2, 3, 2, 5)))
  eps = jnp.asarray(rng.uniform(-1, 1, size=(5, 2)), jnp.float32)
  eager = ptloss(s, t, eps)
  jitted = jax.jit(ptloss, static_argnames="series_terms")
  np.testing.assert_allclose(jitted(s, t, eps), eager, rtol=1e-6)
  np.testing.assert_allclose(jitted(s, t, eps, series_terms=6),
                             ptloss(s, t, eps, series_terms=6), rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(lambda a, b: ptloss(a, b, eps))(s, t), eager, rtol=1e-6)
  # Both modes: the exact form has a hand-written JVP rule, reverse mode is its transpose.
  check_grads(lambda s, t, e: ptloss(s, t, e), (s[0], t[0], eps), order=1,
              modes=["fwd", "rev"], atol=1e-2, rtol=1e-2)
  # The rule against autodiff of the series form's twin: the exact loss written out in jnp.
  def plain(s, t, e):
    log_pt, log_ps = jax.nn.log_softmax(t), jax.nn.log_softmax(s)
    u = 1 - jnp.exp(log_ps)
    poly = sum(e[:, m] * u ** (m + 1) for m in range(e.shape[1]))
    return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps + poly))
  want = jax.grad(plain, argnums=(0, 1, 2))(s[0], t[0], eps)
  got = jax.grad(lambda s, t, e: ptloss(s, t, e).sum(), argnums=(0, 1, 2))(s[0], t[0], eps)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- proxy teacher


def _np_brute_force_proxy(pt, eps):
  """argmin_q sum_k p_k [-log q_k + sum_m eps_{k,m} (1-q_k)^m] over the 2-simplex, by zooming
  grids in float64 (no stationarity condition used)."""
  eps = np.broadcast_to(eps if eps.ndim == 2 else eps[None], (3, eps.shape[-1]))
  m = np.arange(1, eps.shape[-1] + 1)

  def objective(q):  # q [..., 3]
    with np.errstate(divide="ignore"):
      poly = ((1 - q)[..., None] ** m * eps).sum(-1)
      return (pt * (-np.log(q) + poly)).sum(-1)

  center, width = np.array([1 / 3, 1 / 3]), 1.0
  for _ in range(12):
    g = np.linspace(-width / 2, width / 2, 81)
    q1, q2 = np.meshgrid(center[0] + g, center[1] + g, indexing="ij")
    q = np.stack([q1, q2, 1 - q1 - q2], -1)
    ok = np.all(q > 0, -1)
    f = np.where(ok, objective(np.where(ok[..., None], q, 1 / 3)), np.inf)
    i = np.unravel_index(np.argmin(f), f.shape)
    center, width = np.array([q1[i], q2[i]]), width / 8
  return np.array([center[0], center[1], 1 - center.sum()])


@pytest.mark.parametrize("method", ["newton", "fixed_point"])
def test_proxy_teacher_equals_brute_force_minimiser_k3(method):
  rng = np.random.default_rng(5)
  pts = rng.dirichlet([1.0, 1.0, 1.0], size=6)
  pts[0] = [0.9, 0.08, 0.02]
  m = np.arange(1, 4)
  for i, pt in enumerate(pts):
    eps = rng.uniform(-1, 1, size=(3, 3) if i % 2 else (3,)) / m
    res = proxy_teacher(jnp.asarray(pt, jnp.float32), jnp.asarray(eps, jnp.float32),
                        method=method)
    want = _np_brute_force_proxy(pt, eps)
    assert bool(res.valid) and bool(res.converged), (res.residual, res.iterations)
    np.testing.assert_allclose(res.probs, want, atol=2e-5)
    assert abs(float(res.probs.sum()) - 1) < 1e-6


def test_proxy_teacher_m1_hand_case_and_zero_epsilon():
  # K = 2, M = 1, eps = (e, 0): q1 = p1 (1 + e q1) / S with S = 1 + e p1 q1, a quadratic:
  # e p1 q1^2 + (1 - e p1) q1 - p1 = 0.
  p1, e = 0.3, 0.8
  q1 = (-(1 - e * p1) + np.sqrt((1 - e * p1) ** 2 + 4 * e * p1 * p1)) / (2 * e * p1)
  res = proxy_teacher(jnp.array([p1, 1 - p1]), jnp.array([[e], [0.0]]))
  np.testing.assert_allclose(res.probs, [q1, 1 - q1], atol=1e-6)
  assert q1 > p1  # a positive epsilon sharpens the teacher toward its class
  pt = jax.nn.softmax(jnp.asarray(np.random.default_rng(6).normal(size=(4, 9)), jnp.float32))
  res = proxy_teacher(pt, jnp.zeros((9, 5)))
  np.testing.assert_allclose(res.probs, pt, atol=1e-7)
  assert np.all(res.iterations == 0) and np.all(res.converged)
  # bfloat16 teacher probabilities are solved in float32.
  eps = jnp.full((5,), 0.1)
  res16 = proxy_teacher(pt.astype(jnp.bfloat16), eps)
  res32 = proxy_teacher(pt.astype(jnp.bfloat16).astype(jnp.float32), eps)
  assert res16.probs.dtype == jnp.float32
  np.testing.assert_allclose(res16.probs, res32.probs, atol=1e-6)


def test_proxy_teacher_is_a_stationary_point_of_ptloss():
  # The gradient of PTLoss w.r.t. student logits vanishes at the proxy teacher (K = 20).
  rng = np.random.default_rng(7)
  t = jnp.asarray(rng.normal(size=(5, 20)) * 2, jnp.float32)
  eps = jnp.asarray(rng.uniform(-1, 1, size=(20, 5)) / np.arange(1, 6), jnp.float32)
  res = proxy_teacher(jax.nn.softmax(t), eps)
  assert np.all(res.converged) and np.all(res.iterations <= 10)
  g = jax.grad(lambda z: ptloss(z, t, eps).sum())(jnp.log(res.probs))
  assert np.abs(g).max() < 1e-5


def test_proxy_teacher_invalid_epsilon_strict_and_flag():
  bad = jnp.array([-3.0, 0.0])  # 1 + q (-3) < 0 for q > 1/3
  pt = jnp.array([[0.5, 0.3, 0.2]])
  with pytest.raises(ValueError, match="valid proxy teacher"):
    proxy_teacher(pt, bad)
  assert not bool(proxy_teacher(pt, bad, strict=False).valid)
  assert not bool(jax.jit(lambda e: proxy_teacher(pt, e).valid)(bad))
  assert bool(jax.jit(lambda e: proxy_teacher(pt, e).valid)(jnp.array([0.5, -0.2])))
  assert not bool(epsilon_is_valid(jnp.array([0.0, -1.0])))  # 1 + 2 q^2 (-1) < 0 at q = 1
  with pytest.raises(ValueError, match=r"\[3, M\]"):
    proxy_teacher(pt, jnp.zeros((4, 2)))


def test_proxy_teacher_vmap_over_epsilon_and_extreme_teacher():
  rng = np.random.default_rng(8)
  pt = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 6)) * 5, jnp.float32))
  pt = pt.at[0].set(jnp.array([1.0, 0, 0, 0, 0, 0]))  # one-hot rows and zero probabilities
  eps = jnp.asarray(rng.uniform(-1, 1, size=(4, 6, 3)) / np.arange(1, 4), jnp.float32)
  batched = jax.vmap(lambda e: proxy_teacher(pt, e))(eps)
  assert batched.probs.shape == (4, 3, 6) and batched.valid.shape == (4,)
  for i in range(4):
    one = proxy_teacher(pt, eps[i])
    np.testing.assert_allclose(batched.probs[i], one.probs, atol=1e-6)
  assert np.all(np.isfinite(batched.probs))
  np.testing.assert_allclose(batched.probs[:, 0], np.tile([1.0, 0, 0, 0, 0, 0], (4, 1)),
                             atol=1e-7)
