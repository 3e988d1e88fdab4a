"""SP, RKD, PKT and CC against numpy float64 re-statements of RepDistiller's formulas.

The `_np_*` functions restate HobbitLong/RepDistiller `distiller_zoo/{SP,RKD,PKT,CC}.py` in numpy
float64 on NCHW / [b, d] inputs; the JAX losses see the same data as NHWC.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from kd_jax import losses
from kd_jax.losses import _relational as rel


# Jitted once per test process: eager dispatch of RKD's b^3 angle tensor is slow on shared CPUs.
_JIT = {name: jax.jit(getattr(losses, name)) for name in ("sp", "rkd", "pkt", "cc")}


def _nhwc(x_nchw):
  return jnp.asarray(np.transpose(x_nchw, (0, 2, 3, 1)), jnp.float32)


# ---------------------------------------------------------------------------------------------
# numpy float64 references (RepDistiller, NCHW)


def _np_normalize_rows(m, eps=1e-12):
  return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), eps)


def _np_sp(f_s, f_t):
  b = f_s.shape[0]
  q_s, q_t = f_s.reshape(b, -1), f_t.reshape(b, -1)
  g_s = _np_normalize_rows(q_s @ q_s.T)
  g_t = _np_normalize_rows(q_t @ q_t.T)
  return ((g_t - g_s) ** 2).sum() / (b * b)


# ---------------------------------------------------------------------------------------------
# SP


def test_public_names_are_exported():
  for name in rel.__all__:
    assert getattr(losses, name) is getattr(rel, name)


def test_gram_hand_case():
  # Q = [[1, 0], [1, 1]]: QQ^T = [[1, 1], [1, 2]]; rows / [sqrt 2, sqrt 5].
  q = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  want = [[1 / np.sqrt(2), 1 / np.sqrt(2)], [1 / np.sqrt(5), 2 / np.sqrt(5)]]
  np.testing.assert_allclose(losses.gram(q), want, rtol=1e-6)


def test_sp_hand_case():
  # Student Q = [[1, 0], [0, 1]] -> G_S = I. Teacher Q = [[1, 0], [1, 1]] -> G_T as above.
  s = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  t = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  a, c = 1 / np.sqrt(2), 1 / np.sqrt(5)
  want = ((a - 1) ** 2 + a**2 + c**2 + (2 * c - 1) ** 2) / 4
  np.testing.assert_allclose(losses.sp(s, t), want, rtol=1e-6)


def test_sp_matches_repdistiller_with_different_channels_and_sizes():
  rng = np.random.default_rng(0)
  f_s = rng.normal(size=(6, 3, 4, 4))  # NCHW, as the reference
  f_t = rng.normal(size=(6, 5, 2, 2))
  got = losses.sp(_nhwc(f_s), _nhwc(f_t))
  np.testing.assert_allclose(got, _np_sp(f_s, f_t), rtol=1e-5)
  # NHWC vs NCHW only permutes the flattened columns: the Gram matrix is the same.
  np.testing.assert_allclose(losses.gram(_nhwc(f_t)), _np_normalize_rows(
      f_t.reshape(6, -1) @ f_t.reshape(6, -1).T), rtol=1e-5, atol=1e-7)


def test_sp_layer_lists_sum_pairs():
  rng = np.random.default_rng(1)
  s1, t1 = rng.normal(size=(4, 2, 3, 3)), rng.normal(size=(4, 4, 3, 3))
  s2, t2 = rng.normal(size=(4, 7)), rng.normal(size=(4, 9))
  got = losses.sp([_nhwc(s1), jnp.asarray(s2, jnp.float32)],
                  (_nhwc(t1), jnp.asarray(t2, jnp.float32)))
  np.testing.assert_allclose(got, _np_sp(s1, t1) + _np_sp(s2, t2), rtol=1e-5)


def test_sp_mask_equals_loss_on_valid_rows():
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(5, 6)), rng.normal(size=(5, 8))
  where = np.array([True, False, True, True, False])
  got = losses.sp(jnp.asarray(s), jnp.asarray(t), where=jnp.asarray(where))
  np.testing.assert_allclose(got, _np_sp(s[where], t[where]), rtol=1e-5)
  # Garbage (even inf) in a masked row changes nothing.
  s_bad = s.copy()
  s_bad[1] = np.inf
  got_bad = losses.sp(jnp.asarray(s_bad), jnp.asarray(t), where=jnp.asarray(where))
  np.testing.assert_allclose(got_bad, got, rtol=1e-6)


def test_sp_all_false_mask_is_zero_with_zero_gradient():
  s, t = jnp.ones((3, 4)), jnp.arange(12.0).reshape(3, 4)
  where = jnp.zeros((3,), bool)
  assert float(losses.sp(s, t, where=where)) == 0.0
  g = jax.jit(jax.grad(lambda s: losses.sp(s, t, where=where)))(s)
  assert np.all(g == 0)


def test_sp_zero_rows_and_large_inputs_are_finite():
  rng = np.random.default_rng(3)
  s = rng.normal(size=(4, 2, 2, 3)) * 1e4
  s[0] = 0.0
  t = rng.normal(size=(4, 2, 2, 5)) * 1e4
  t[2] = 0.0
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  val, g = jax.jit(jax.value_and_grad(losses.sp))(s, t)
  assert np.isfinite(val) and np.all(np.isfinite(g))
  g0 = jax.jit(jax.grad(losses.sp))(jnp.zeros((4, 3)), jnp.zeros((4, 3)))
  assert np.all(np.isfinite(g0))


def test_sp_bfloat16_computes_in_float32():
  rng = np.random.default_rng(4)
  s = jnp.asarray(rng.normal(size=(4, 3, 3, 8)), jnp.bfloat16)
  t = jnp.asarray(rng.normal(size=(4, 3, 3, 8)), jnp.bfloat16)
  got = losses.sp(s, t)
  assert got.dtype == jnp.float32
  assert losses.gram(s).dtype == jnp.float32
  want = _np_sp(np.asarray(s.astype(jnp.float32), np.float64),
                np.asarray(t.astype(jnp.float32), np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sp_gradients_of_both_sides():
  # Losses never stop gradients (the train step freezes the teacher).
  rng = np.random.default_rng(5)
  s = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  check_grads(jax.jit(lambda s: losses.sp(s, t)), (s,), order=1, modes=("rev",), atol=1e-2,
              rtol=1e-2)
  check_grads(jax.jit(lambda t: losses.sp(s, t)), (t,), order=1, modes=("rev",), atol=1e-2,
              rtol=1e-2)
  assert np.any(jax.grad(losses.sp, argnums=1)(s, t) != 0)


def test_sp_jit_and_vmap():
  rng = np.random.default_rng(6)
  s = rng.normal(size=(2, 4, 3)).astype(np.float32)
  t = rng.normal(size=(2, 4, 5)).astype(np.float32)
  where = jnp.array([True, True, False, True])
  batched = jax.jit(jax.vmap(lambda s, t: losses.sp(s, t, where=where)))(s, t)
  w = np.asarray(where)
  want = [_np_sp(s[i][w], t[i][w]) for i in range(2)]
  np.testing.assert_allclose(batched, want, rtol=1e-5)


def test_sp_shape_errors_name_both_shapes():
  with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 3\)"):
    losses.sp(jnp.ones((4, 3)), jnp.ones((5, 3)))
  with pytest.raises(ValueError, match="same number of layers"):
    losses.sp([jnp.ones((4, 3))], [jnp.ones((4, 3)), jnp.ones((4, 3))])
  with pytest.raises(ValueError, match="where"):
    losses.sp(jnp.ones((4, 3)), jnp.ones((4, 3)), where=jnp.ones((3,), bool))


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    scale_s=st.floats(1e-2, 1e2), scale_t=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16), perm_seed=st.integers(0, 2**16))
def test_sp_invariances(scale_s, scale_t, seed, perm_seed):
  """SP is invariant to a global rescaling of either side, to a rotation of either side's feature
  space, and to a permutation of the batch applied to both sides.

  It is NOT invariant to rescaling one sample (that scales row i of QQ^T unevenly: G_ii by a^2,
  G_ij by a), see `test_sp_is_not_invariant_to_one_sample_scale`.
  """
  rng = np.random.default_rng(seed)
  s, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 6))
  rot, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  perm = np.random.default_rng(perm_seed).permutation(5)
  sp = lambda a, b: _JIT["sp"](jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  base = float(sp(s, t))
  scaled = sp(s * scale_s, t * scale_t)
  rotated = sp(s @ rot, t)
  permuted = sp(s[perm], t[perm])
  for v in (scaled, rotated, permuted):
    np.testing.assert_allclose(v, base, rtol=1e-4, atol=1e-7)


def test_sp_is_not_invariant_to_one_sample_scale():
  q = np.array([[1.0, 0.0], [1.0, 1.0]])
  q2 = q.copy()
  q2[0] *= 2.0
  # Row 0 of QQ^T goes from (1, 1) to (4, 2): a different direction.
  assert not np.allclose(losses.gram(jnp.asarray(q2))[0], losses.gram(jnp.asarray(q))[0])
  np.testing.assert_allclose(losses.gram(jnp.asarray(q2))[0], [2 / np.sqrt(5), 1 / np.sqrt(5)],
                             rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# RKD, PKT, CC: numpy float64 references


def _np_smooth_l1(x):
  ax = np.abs(x)
  return np.where(ax < 1.0, 0.5 * x * x, ax - 0.5).mean()


def _np_pdist(e):
  sq = (e**2).sum(1)
  res = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * e @ e.T, 1e-12))
  np.fill_diagonal(res, 0.0)
  return res


def _np_angles(e):
  diff = e[None, :, :] - e[:, None, :]
  unit = diff / np.maximum(np.linalg.norm(diff, axis=2, keepdims=True), 1e-12)
  return np.einsum("ijd,ikd->ijk", unit, unit).reshape(-1)


def _np_rkd(s, t, w_d=25.0, w_a=50.0):
  s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
  t_d = _np_pdist(t)
  t_d = t_d / t_d[t_d > 0].mean()
  d = _np_pdist(s)
  d = d / d[d > 0].mean()
  return w_d * _np_smooth_l1(d - t_d) + w_a * _np_smooth_l1(_np_angles(s) - _np_angles(t))


def _np_pkt(s, t, eps=1e-7):
  def sim(x):
    x = x / (np.sqrt((x**2).sum(1, keepdims=True)) + eps)
    m = (x @ x.T + 1.0) / 2.0
    return m / m.sum(1, keepdims=True)
  q, p = sim(s), sim(t)
  return np.mean(p * np.log((p + eps) / (q + eps)))


def _np_cc(s, t):
  delta = np.abs(s - t)
  return np.mean((delta[:-1] * delta[1:]).sum(1))


_REFS = {"rkd": _np_rkd, "pkt": _np_pkt}


@pytest.mark.parametrize("name", ["rkd", "pkt"])
def test_embedding_losses_match_repdistiller(name):
  rng = np.random.default_rng(10)
  s, t = rng.normal(size=(7, 5)), rng.normal(size=(7, 9)) * 3.0
  got = _JIT[name](jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(got, _REFS[name](s, t), rtol=1e-5)


def test_rkd_weights_and_duplicate_rows():
  rng = np.random.default_rng(11)
  s, t = rng.normal(size=(5, 4)), rng.normal(size=(5, 6))
  s[3] = s[1]  # duplicate student rows: distance clamped to 1e-6, angle vectors zero
  got = _JIT["rkd"](jnp.asarray(s), jnp.asarray(t), distance_weight=2.0, angle_weight=0.5)
  np.testing.assert_allclose(got, _np_rkd(s, t, 2.0, 0.5), rtol=1e-5)
  g = jax.jit(jax.grad(losses.rkd))(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  assert np.all(np.isfinite(g))


def test_rkd_hand_case_distance_only():
  # Student points on a line 0, 1, 2 -> distances (1, 2, 1)/mean(4/3); teacher 0, 1, 3 ->
  # (1, 3, 2)/2. Angle term off.
  s = jnp.array([[0.0], [1.0], [2.0]])
  t = jnp.array([[0.0], [1.0], [3.0]])
  ds = np.array([[0, 1, 2], [1, 0, 1], [2, 1, 0]]) / (8 / 6)
  dt = np.array([[0, 1, 3], [1, 0, 2], [3, 2, 0]]) / 2.0
  x = np.abs(ds - dt)
  want = np.where(x < 1, 0.5 * x * x, x - 0.5).sum() / 9
  got = _JIT["rkd"](s, t, distance_weight=1.0, angle_weight=0.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_pkt_hand_case():
  # Orthonormal student rows: cos = I -> (I + 1)/2 = [[1, .5], [.5, 1]] -> rows (2/3, 1/3).
  # Identical teacher rows: all cos 1 -> rows (1/2, 1/2).
  s = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  t = jnp.array([[2.0, 0.0], [3.0, 0.0]])
  eps = 1e-7
  p, q = 0.5, np.array([2 / 3, 1 / 3])
  want = np.sum(p * np.log((p + eps) / (q + eps))) * 2 / 4
  np.testing.assert_allclose(losses.pkt(s, t), want, rtol=1e-5)


def test_cc_matches_repdistiller_and_hand_case():
  rng = np.random.default_rng(12)
  s, t = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
  np.testing.assert_allclose(losses.cc(jnp.asarray(s), jnp.asarray(t)), _np_cc(s, t), rtol=1e-5)
  # delta = [[1, 2], [3, 1], [0, 2]]: consecutive products 1*3 + 2*1 = 5 and 0 + 2 = 2 -> 3.5.
  s = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.0, 2.0]])
  np.testing.assert_allclose(losses.cc(s, jnp.zeros((3, 2))), 3.5, rtol=1e-6)
  # The teacher embedding is trainable in RepDistiller: it must receive a gradient.
  assert np.any(jax.grad(losses.cc, argnums=1)(s, jnp.zeros((3, 2))) != 0)


@pytest.mark.parametrize("name", ["rkd", "pkt", "cc"])
def test_masked_rows_equal_loss_on_valid_rows(name):
  rng = np.random.default_rng(13)
  s, t = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  where = np.array([True, False, True, True, False, True])
  ref = {"rkd": _np_rkd, "pkt": _np_pkt, "cc": _np_cc}[name]
  got = _JIT[name](jnp.asarray(s), jnp.asarray(t), where=jnp.asarray(where))
  np.testing.assert_allclose(got, ref(s[where], t[where]), rtol=1e-5)
  s_bad = s.copy()
  s_bad[4] = 1e30
  got_bad = _JIT[name](jnp.asarray(s_bad), jnp.asarray(t), where=jnp.asarray(where))
  np.testing.assert_allclose(got_bad, got, rtol=1e-6)


@pytest.mark.parametrize("name", ["sp", "rkd", "pkt", "cc"])
def test_degenerate_inputs_finite_values_and_gradients(name):
  fn = getattr(losses, name)
  # One compiled function per dtype (eager gradients of RKD's b^3 angles are slow to dispatch).
  value_and_grad = jax.jit(jax.value_and_grad(fn))
  masked = jax.jit(jax.value_and_grad(lambda s, t, w: fn(s, t, where=w)))
  rng = np.random.default_rng(14)
  s = rng.normal(size=(4, 6)) * 1e4
  t = rng.normal(size=(4, 6)) * 1e4
  s[0] = 0.0
  t[2] = 0.0
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  for args in [(s, t), (jnp.zeros_like(s), jnp.zeros_like(t)), (s.astype(jnp.bfloat16),
                                                              t.astype(jnp.bfloat16))]:
    val, g = value_and_grad(*args)
    assert val.dtype == jnp.float32 and np.isfinite(val), (name, val)
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
  none = jnp.zeros((4,), bool)
  val, g = masked(s, t, none)
  assert float(val) == 0.0 and np.all(g == 0)
  one = jnp.array([False, True, False, False])
  val, g = masked(s, t, one)
  assert np.isfinite(val) and np.all(np.isfinite(g))


@pytest.mark.parametrize("name", ["rkd", "pkt", "cc"])
def test_gradients_check_and_vmap(name):
  fn = getattr(losses, name)
  rng = np.random.default_rng(15)
  s = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  check_grads(jax.jit(lambda s: fn(s, t)), (s,), order=1, modes=("rev",), atol=2e-2,
              rtol=2e-2)
  ss = rng.normal(size=(2, 4, 3))
  tt = rng.normal(size=(2, 4, 3))
  batched = jax.jit(jax.vmap(fn))(jnp.asarray(ss, jnp.float32), jnp.asarray(tt, jnp.float32))
  ref = {"rkd": _np_rkd, "pkt": _np_pkt, "cc": _np_cc}[name]
  np.testing.assert_allclose(batched, [ref(ss[i], tt[i]) for i in range(2)], rtol=1e-5)


@pytest.mark.parametrize("name", ["rkd", "pkt"])
def test_teacher_side_gradient_flows(name):
  # Losses never stop gradients: the teacher side matches finite differences.
  rng = np.random.default_rng(11)
  s = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  fn = getattr(losses, name)
  check_grads(jax.jit(lambda t: fn(s, t)), (t,), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)
  assert np.any(jax.jit(jax.grad(fn, argnums=1))(s, t) != 0)


def test_embedding_shape_errors_name_both_shapes():
  for fn in (losses.rkd, losses.pkt):
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 3\)"):
      fn(jnp.ones((4, 3)), jnp.ones((5, 3)))
  with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 5\)"):
    losses.cc(jnp.ones((4, 3)), jnp.ones((4, 5)))


# ---------------------------------------------------------------------------------------------
# Data parallelism: axis_name all-gathers the rows so that the loss covers the global batch.


def _relational_objective(theta, x, xt, where, axis_name=None):
  f_s = x @ theta
  kw = dict(where=where, axis_name=axis_name)
  return (losses.sp([f_s, f_s[:, :2]], [xt, xt], **kw) + losses.rkd(f_s, xt, **kw)
          + losses.pkt(f_s, xt, **kw) + losses.cc(f_s, xt[:, :3], **kw))


def test_axis_name_gives_the_global_batch_loss_under_shard_map_and_pmap():
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  n_dev = 8
  assert jax.device_count() >= n_dev
  rng = np.random.default_rng(20)
  x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  xt = jnp.asarray(rng.normal(size=(16, 7)), jnp.float32)
  theta = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  where = jnp.asarray(rng.random(16) < 0.75)
  want_v, want_g = jax.jit(jax.value_and_grad(_relational_objective))(theta, x, xt, where)

  # shard_map: the objective is the mean of the per-device losses, taken before jax.grad.
  mesh = jax.make_mesh((n_dev,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:n_dev])

  def per_device(theta, x, xt, where):
    return jax.value_and_grad(lambda th: jax.lax.pmean(
        _relational_objective(th, x, xt, where, "batch"), "batch"))(theta)

  step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("batch"), P("batch"),
                                                                 P("batch")),
                               out_specs=(P(), P())))
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  v, g = step(put(theta, P()), put(x, P("batch")), put(xt, P("batch")), put(where, P("batch")))
  np.testing.assert_allclose(v, want_v, rtol=1e-5)
  np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-6)

  # pmap: per-device gradients, then pmean of the gradients.
  def pmapped(theta, x, xt, where):
    v, g = jax.value_and_grad(_relational_objective)(theta, x, xt, where, "batch")
    return v, jax.lax.pmean(g, "batch")

  split = lambda a: a.reshape((n_dev, -1) + a.shape[1:])
  v, g = jax.pmap(pmapped, axis_name="batch", in_axes=(None, 0, 0, 0),
                  devices=jax.devices()[:n_dev])(theta, split(x), split(xt), split(where))
  np.testing.assert_allclose(v, np.full(n_dev, want_v), rtol=1e-5)
  np.testing.assert_allclose(g[0], want_g, rtol=1e-4, atol=1e-6)
