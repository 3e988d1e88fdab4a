"""ReFilled losses against float64 numpy references written from the formulas, and hand cases.

The references below follow the official code's structure literally (njulus/REFILLED Train.py:
loops over mined (a, p, n), `[p; 1 - p]` stacked along the batch axis and "batchmean" KL, tuples
grouped by (anchor, positive)), so the library's masked, vectorised form is checked against an
independent derivation rather than against itself.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util

from kd_jax import losses

# Compiled once per shape: far cheaper on CPU than op-by-op dispatch (eager is checked below too).
_stage1 = jax.jit(losses.refilled_relationship, static_argnames=("tuples", "mode"))
_stage2 = jax.jit(losses.refilled_classifier, static_argnames=("distance",))

# --------------------------------------------------------------------------- numpy references


def _np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _np_dist(x):
  return np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)


def _np_mine(d, y, margin, keep=None, guard=1e-4):
  """Semi-hard triplets in lexicographic (a, p, n) order, as pytorch-metric-learning's miner."""
  b = len(y)
  keep = np.ones(b, bool) if keep is None else keep
  out = []
  for a, p, n in itertools.product(range(b), repeat=3):
    if not (keep[a] and keep[p] and keep[n]):
      continue
    if a == p or y[a] != y[p] or y[n] == y[a]:
      continue
    gap = d[a, n] - d[a, p]
    # float32 vs float64 must agree on every decision: no gap may sit on a boundary.
    assert min(abs(gap), abs(gap - margin)) > guard, "test data too close to a mining boundary"
    if 0 < gap <= margin:
      out.append((a, p, n))
  return out


def _np_stage1(s, t, y, *, margin=0.2, tau=4.0, tuples=False, mode="official", keep=None):
  s, t = _np_normalize(np.float64(s)), _np_normalize(np.float64(t))
  ds, dt = _np_dist(s), _np_dist(t)
  trip = _np_mine(ds, y, margin, keep)
  if not trip:
    return 0.0
  if not tuples:
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    ps = np.array([sig((ds[a, n] - ds[a, p]) / tau) for a, p, n in trip])
    pt = np.array([sig((dt[a, n] - dt[a, p]) / tau) for a, p, n in trip])
    if mode == "official":  # 1000 * KLDivLoss(batchmean)(log cat[ps, 1-ps], cat[pt, 1-pt])
      tgt, inp = np.concatenate([pt, 1 - pt]), np.concatenate([ps, 1 - ps])
      return 1000.0 * np.sum(tgt * (np.log(tgt) - np.log(inp))) / len(tgt)
    kl = pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))
    return kl.mean()
  groups = {}
  for a, p, n in trip:
    groups.setdefault((a, p), []).append(n)
  kls = []
  for (a, p), negs in groups.items():
    zs = -np.array([ds[a, p]] + [ds[a, n] for n in negs]) / tau
    zt = -np.array([dt[a, p]] + [dt[a, n] for n in negs]) / tau
    qs, qt = np.exp(zs - zs.max()), np.exp(zt - zt.max())
    qs, qt = qs / qs.sum(), qt / qt.sum()
    kls.append(np.sum(qt * np.log(qt / qs)))
  return (1000.0 if mode == "official" else 1.0) * np.mean(kls)


def _np_stage2(logits, t, y, *, centers=None, tau=2.0, distance="squared", keep=None):
  logits, t = np.float64(logits), np.float64(t)
  b = len(y)
  keep = np.ones(b, bool) if keep is None else keep
  present = sorted(set(int(c) for c in y[keep]))
  out = np.zeros(b)
  for i in range(b):
    if not keep[i]:
      continue
    zt = []
    for c in present:
      if centers is None:
        center = t[keep & (y == c)].mean(axis=0)
        sq = np.sum((t[i] - center) ** 2)
        zt.append(-(sq if distance == "squared" else np.sqrt(sq)))
      else:
        zt.append(t[i] @ (centers[c] / np.linalg.norm(centers[c])))
    zt = np.array(zt) / tau
    zs = logits[i, present] / tau
    lt = zt - zt.max() - np.log(np.exp(zt - zt.max()).sum())
    ls = zs - zs.max() - np.log(np.exp(zs - zs.max()).sum())
    out[i] = np.sum(np.exp(lt) * (lt - ls))
  return out


def _random_batch(seed, b=12, ds=4, dt=7, classes=3):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(b, ds)).astype(np.float32)
  t = rng.normal(size=(b, dt)).astype(np.float32)
  y = (np.arange(b) % classes).astype(np.int32)
  rng.shuffle(y)
  return s, t, y


# --------------------------------------------------------------------------- hand-checked case
# Six unit vectors in the plane (3 classes x 2 samples), so normalising changes nothing and
# d(i, j) = 2 sin(|angle_i - angle_j| / 2):
#   x0 = 340 deg, x1 = 20 deg (class 0);  x2 = 0, x3 = 230 (class 1);  x4 = 140, x5 = 150 (class 2).
# Positive pairs: d(0,1) = 2 sin 20 = 0.684, d(2,3) = 2 sin 65 = 1.813, d(4,5) = 2 sin 5 = 0.174.
# Candidates (a, p, n) and gap = d(a,n) - d(a,p), semi-hard iff 0 < gap <= 0.2:
#   (2,3,4): 2 sin 70 - 2 sin 65 = 1.879 - 1.813 = 0.067  -> semi-hard
#   (2,3,5): 2 sin 75 - 2 sin 65 = 1.932 - 1.813 = 0.119  -> semi-hard
#   (3,2,1): d(230, 20) = 2 sin 75 = 1.932, gap 0.119      -> semi-hard
#   (3,2,0): 2 sin 55 = 1.638 < 1.813 (hard); (3,2,4): 2 sin 45 (hard); (3,2,5): 2 sin 40 (hard)
#   (2,3,0), (2,3,1): 2 sin 10 = 0.347 (hard)
#   (0,1,2), (1,0,2): 0.347 < 0.684 (hard); (0,1,3..5), (1,0,3..5): gaps >= 0.95 (easy)
#   (4,5,*) and (5,4,*): every negative is >= 1.41 away, gaps >= 1.2 (easy)
HAND_ANGLES = np.deg2rad([340.0, 20.0, 0.0, 230.0, 140.0, 150.0])
HAND_LABELS = np.array([0, 0, 1, 1, 2, 2], np.int32)
HAND_TRIPLETS = [(2, 3, 4), (2, 3, 5), (3, 2, 1)]
# Teacher: a different width (3), scaled (normalisation must undo it), other angles.
HAND_TEACHER_ANGLES = np.deg2rad([0.0, 30.0, 60.0, 120.0, 200.0, 260.0])


def _hand_student():
  return np.stack([np.cos(HAND_ANGLES), np.sin(HAND_ANGLES)], axis=1).astype(np.float32)


def _hand_teacher():
  a = HAND_TEACHER_ANGLES
  return 3.0 * np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], axis=1).astype(np.float32)


def _chord(deg):
  return 2.0 * np.sin(np.deg2rad(abs(deg)) / 2.0)


def test_hand_case_mined_triplets_are_the_listed_ones():
  s = jnp.asarray(_hand_student())
  d = jnp.sqrt(jnp.maximum(jnp.sum((s[:, None] - s[None]) ** 2, -1), 0.0))
  mask = np.asarray(losses.semihard_triplet_mask(d, jnp.asarray(HAND_LABELS), margin=0.2))
  assert sorted(map(tuple, np.argwhere(mask).tolist())) == HAND_TRIPLETS


def test_hand_case_where_drops_every_triplet_of_a_masked_row():
  s = jnp.asarray(_hand_student())
  d = jnp.sqrt(jnp.maximum(jnp.sum((s[:, None] - s[None]) ** 2, -1), 0.0))
  keep = jnp.array([True, True, True, True, True, False])
  mask = np.asarray(losses.semihard_triplet_mask(d, jnp.asarray(HAND_LABELS), where=keep))
  assert sorted(map(tuple, np.argwhere(mask).tolist())) == [(2, 3, 4), (3, 2, 1)]


def test_hand_case_stage1_values():
  tau = 4.0
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  # Student gaps from the table above; teacher distances from the teacher's angles (deg).
  ta = np.rad2deg(HAND_TEACHER_ANGLES)
  ps, pt = [], []
  for a, p, n in HAND_TRIPLETS:
    ps.append(sig((_chord(np.rad2deg(HAND_ANGLES[n] - HAND_ANGLES[a]))
                   - _chord(np.rad2deg(HAND_ANGLES[p] - HAND_ANGLES[a]))) / tau))
    pt.append(sig((_chord(ta[n] - ta[a]) - _chord(ta[p] - ta[a])) / tau))
  ps, pt = np.array(ps), np.array(pt)
  kl = pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))
  s, t, y = map(jnp.asarray, (_hand_student(), _hand_teacher(), HAND_LABELS))
  got_paper = _stage1(s, t, y, mode="paper")
  got_official = _stage1(s, t, y, mode="official")
  np.testing.assert_allclose(got_paper, kl.mean(), rtol=2e-4)
  np.testing.assert_allclose(got_official, 500.0 * kl.mean(), rtol=2e-4)
  # Tuple form: groups (2,3; 4,5) and (3,2; 1).
  want = []
  for (a, p), negs in (((2, 3), (4, 5)), ((3, 2), (1,))):
    zs = -np.array([_chord(np.rad2deg(HAND_ANGLES[j] - HAND_ANGLES[a])) for j in (p, *negs)])
    zt = -np.array([_chord(ta[j] - ta[a]) for j in (p, *negs)])
    qs, qt = np.exp(zs / tau) / np.exp(zs / tau).sum(), np.exp(zt / tau) / np.exp(zt / tau).sum()
    want.append(np.sum(qt * np.log(qt / qs)))
  got_tuple = _stage1(s, t, y, tuples=True, mode="official")
  np.testing.assert_allclose(got_tuple, 1000.0 * np.mean(want), rtol=2e-4)


def test_hand_case_stage2_in_batch_centres():
  # Teacher embeddings on a line: class 0 at 0, 2; class 1 at 4, 6 (class 2 absent, C = 3).
  t = np.array([[0.0], [2.0], [4.0], [6.0]], np.float32)
  y = np.array([0, 0, 1, 1], np.int32)
  logits = np.array([[1.0, 0.0, 5.0]] * 4, np.float32)
  # Centres 1 and 5; squared distances of x0 = 0: 1 and 25; tau = 2 -> teacher logits -0.5, -12.5.
  pt0 = np.exp([-0.5, -12.5]) / np.exp([-0.5, -12.5]).sum()
  ps0 = np.exp([0.5, 0.0]) / np.exp([0.5, 0.0]).sum()  # class 2 (logit 5) is absent: masked out
  want0 = np.sum(pt0 * np.log(pt0 / ps0))
  got = _stage2(jnp.asarray(logits), jnp.asarray(t), jnp.asarray(y))
  np.testing.assert_allclose(got[0], want0, rtol=1e-5)


# --------------------------------------------------------------------------- stage 1 references


@pytest.mark.parametrize("tuples", [False, True])
@pytest.mark.parametrize("mode", ["official", "paper"])
def test_stage1_matches_numpy_reference(tuples, mode):
  s, t, y = _random_batch(seed=3)
  want = _np_stage1(s, t, y, tuples=tuples, mode=mode)
  got = _stage1(
      jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), tuples=tuples, mode=mode)
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=2e-4)


def test_stage1_where_matches_reference_on_kept_rows():
  s, t, y = _random_batch(seed=3)
  keep = np.ones(len(y), bool)
  keep[[1, 6, 7]] = False
  for tuples in (False, True):
    want = _np_stage1(s, t, y, tuples=tuples, keep=keep)
    got = _stage1(
        jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), tuples=tuples, where=jnp.asarray(keep))
    np.testing.assert_allclose(got, want, rtol=2e-4)


def test_stage1_margin_and_temperature_are_used():
  s, t, y = _random_batch(seed=4)
  for margin, tau in ((0.5, 1.0), (0.1, 8.0)):
    want = _np_stage1(s, t, y, margin=margin, tau=tau, mode="paper")
    got = _stage1(
        jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), margin=margin, temperature=tau,
        mode="paper")
    np.testing.assert_allclose(got, want, rtol=2e-4)


def _np_grad(f, x, eps=1e-6):
  """Central differences of a float64 numpy function, coordinate by coordinate."""
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    e = np.zeros_like(x)
    e[idx] = eps
    g[idx] = (f(x + e) - f(x - e)) / (2 * eps)
  return g


@pytest.mark.parametrize("tuples", [False, True])
def test_stage1_gradient_matches_reference_finite_differences(tuples):
  s, t, y = _random_batch(seed=3)  # every mining gap is >= 2.7e-3 from a boundary
  want = _np_grad(lambda x: _np_stage1(x, t, y, tuples=tuples, mode="paper"), np.float64(s))
  got = jax.grad(lambda x: _stage1(
      x, jnp.asarray(t), jnp.asarray(y), tuples=tuples, mode="paper"))(jnp.asarray(s))
  assert np.abs(want).max() > 1e-4
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
  # And JAX's own directional check (float64 inputs; the shared Gram helper accumulates the
  # matmul in float32, so the finite differences are only good to about a percent).
  with jax.enable_x64(True):
    f = lambda x: _stage1(
        x, jnp.asarray(t, jnp.float64), jnp.asarray(y), tuples=tuples, mode="official")
    test_util.check_grads(f, (jnp.asarray(s, jnp.float64),), order=1, modes=["rev"], eps=1e-4,
                          atol=5e-2, rtol=5e-2)


def test_stage1_teacher_gradient_flows():
  # Losses never stop gradients; the train step freezes the teacher. The teacher-side gradient
  # is checked against finite differences (triplets are mined on the student, so fixed here).
  s, t, y = _random_batch(seed=3)
  with jax.enable_x64(True):
    f = lambda tt: _stage1(jnp.asarray(s, jnp.float64), tt, jnp.asarray(y), mode="official")
    test_util.check_grads(f, (jnp.asarray(t, jnp.float64),), order=1, modes=["rev"], eps=1e-4,
                          atol=5e-2, rtol=5e-2)
    assert np.any(np.asarray(jax.grad(f)(jnp.asarray(t, jnp.float64))) != 0)


@pytest.mark.parametrize("tuples", [False, True])
def test_stage1_no_triplet_gives_zero_and_zero_gradient(tuples):
  s, t, _ = _random_batch(seed=3)
  cases = {
      "single class": (np.zeros(12, np.int32), None),
      "all-false where": (_random_batch(seed=3)[2], np.zeros(12, bool)),
      # Tiny margin: nothing is semi-hard.
      "empty": (_random_batch(seed=3)[2], None),
  }
  for name, (y, keep) in cases.items():
    margin = 1e-9 if name == "empty" else 0.2
    f = lambda x: _stage1(
        x, jnp.asarray(t), jnp.asarray(y), margin=margin, tuples=tuples,
        where=None if keep is None else jnp.asarray(keep))
    value, grad = jax.value_and_grad(f)(jnp.asarray(s))
    assert float(value) == 0.0, name
    assert np.all(np.asarray(grad) == 0), name


def test_stage1_widths_may_differ_but_batches_must_match():
  s, t, y = _random_batch(seed=3, ds=4, dt=33)
  assert np.isfinite(float(_stage1(jnp.asarray(s), jnp.asarray(t),
                                                        jnp.asarray(y))))
  with pytest.raises(ValueError, match=r"\(12, 4\).*\(11, 33\)"):
    _stage1(jnp.asarray(s), jnp.asarray(t[:11]), jnp.asarray(y))
  with pytest.raises(ValueError, match="mode"):
    _stage1(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), mode="code")
  with pytest.raises(ValueError, match="labels"):
    _stage1(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y[:5]))


def test_stage1_zero_rows_duplicates_and_large_features_stay_finite():
  s, t, y = _random_batch(seed=3)
  s[0] = 0.0  # zero feature row
  s[1] = s[4]  # duplicate embeddings: distance exactly 0
  s[2] *= 1e4
  t[3] = 0.0
  for tuples in (False, True):
    value, grad = jax.value_and_grad(lambda x, tu=tuples: _stage1(
        x, jnp.asarray(t), jnp.asarray(y), tuples=tu))(jnp.asarray(s))
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


def test_stage1_bfloat16_inputs_compute_in_float32():
  s, t, y = _random_batch(seed=3)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = _stage1(s16, t16, jnp.asarray(y))
  assert got.dtype == jnp.float32
  # Same value as float32 on the bf16-rounded inputs (mining decisions may differ from unrounded).
  want = _stage1(s16.astype(jnp.float32), t16.astype(jnp.float32),
                                      jnp.asarray(y))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grad = jax.grad(lambda x: _stage1(x, t16, jnp.asarray(y)))(s16)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_stage1_jit_and_vmap_agree_with_eager():
  batches = [_random_batch(seed=k) for k in (3, 4)]
  s, t, y = (jnp.asarray(np.stack(x)) for x in zip(*batches))
  f = lambda a, b, c: losses.refilled_relationship(a, b, c, tuples=True)
  got = jax.jit(jax.vmap(f))(s, t, y)
  want = [_np_stage1(*b, tuples=True) for b in batches]
  np.testing.assert_allclose(got, want, rtol=2e-4)
  np.testing.assert_allclose(f(s[0], t[0], y[0]), want[0], rtol=2e-4)  # eager, op by op


def test_stage1_batch_128_compiles_and_runs():
  s, t, y = _random_batch(seed=0, b=128, ds=64, dt=128, classes=10)
  f = jax.jit(jax.value_and_grad(lambda x: losses.refilled_relationship(
      x, jnp.asarray(t), jnp.asarray(y), tuples=True)))
  value, grad = f(jnp.asarray(s))
  assert np.isfinite(float(value)) and float(value) > 0 and np.all(np.isfinite(grad))


def test_stage1_all_gathered_per_device_step_equals_global_batch():
  """Per-device code that all-gathers the batch mines the global batch; with the step's
  per-device (pmap) semantics, the pmean of gradients is the global-batch gradient."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)  # a replicated "student parameter"
  t = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)

  def per_device(w, x, t, y):
    def loss(w):
      g = lambda a: jax.lax.all_gather(a, "batch", axis=0, tiled=True)
      return losses.refilled_relationship(g(x @ w), g(t), g(y), tuples=True)
    value, grad = jax.value_and_grad(loss)(w)
    return jax.lax.pmean(value, "batch"), jax.lax.pmean(grad, "batch")

  mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("batch"), P("batch"),
                                                                   P("batch")),
                                 out_specs=(P(), P()), check_vma=False))
  value, grad = mapped(w, x, t, y)
  want_value, want_grad = jax.value_and_grad(
      lambda w: _stage1(x @ w, t, y, tuples=True))(w)
  assert float(want_value) > 0
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- stage 2


@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_stage2_in_batch_centres_match_numpy(distance):
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(10, 6)).astype(np.float32) * 3
  t = rng.normal(size=(10, 5)).astype(np.float32)
  y = np.array([0, 0, 2, 2, 2, 3, 3, 5, 5, 0], np.int32)  # classes 1 and 4 absent
  got = _stage2(jnp.asarray(logits), jnp.asarray(t), jnp.asarray(y),
                                   distance=distance)
  np.testing.assert_allclose(got, _np_stage2(logits, t, y, distance=distance), rtol=1e-4,
                             atol=1e-6)


def test_stage2_global_centres_match_numpy_and_where():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(10, 6)).astype(np.float32) * 3
  t = np.abs(rng.normal(size=(10, 5))).astype(np.float32)
  y = np.array([0, 0, 2, 2, 2, 3, 3, 5, 5, 0], np.int32)
  centers = rng.normal(size=(6, 5)).astype(np.float32) * 4  # unnormalised on purpose
  keep = np.array([1, 1, 1, 1, 1, 0, 0, 1, 1, 0], bool)  # drops class 3 entirely
  got = _stage2(jnp.asarray(logits), jnp.asarray(t), jnp.asarray(y),
                                   centers=jnp.asarray(centers), temperature=3.0,
                                   where=jnp.asarray(keep))
  want = _np_stage2(logits, t, y, centers=centers, tau=3.0, keep=keep)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(got)[~keep] == 0)


def test_stage2_gradients_of_both_sides():
  rng = np.random.default_rng(9)
  logits = rng.normal(size=(8, 4))
  t = rng.normal(size=(8, 3))
  y = np.array([0, 1, 1, 3, 3, 3, 0, 1], np.int32)
  with jax.enable_x64(True):
    f = lambda z: _stage2(z, jnp.asarray(t), jnp.asarray(y)).sum()
    test_util.check_grads(f, (jnp.asarray(logits),), order=1, modes=["rev"], eps=1e-6,
                          atol=1e-7, rtol=1e-6)
    g = jax.grad(f)(jnp.asarray(logits))
    assert np.all(np.asarray(g)[:, 2] == 0)  # absent class: no gradient at all
    # The teacher side is differentiable too (the train step, not the loss, freezes it).
    ft = lambda tt: _stage2(jnp.asarray(logits), tt, jnp.asarray(y)).sum()
    test_util.check_grads(ft, (jnp.asarray(t),), order=1, modes=["rev"], eps=1e-6, atol=1e-7,
                          rtol=1e-6)
    assert np.any(np.asarray(jax.grad(ft)(jnp.asarray(t))) != 0)


def test_stage2_edge_cases_are_finite():
  rng = np.random.default_rng(10)
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 1e4
  t = rng.normal(size=(6, 9)).astype(np.float32)
  t[2] = 0.0
  y = np.zeros(6, np.int32)  # single class: the local classifier has one class -> KL 0
  for centers in (None, jnp.asarray(rng.normal(size=(5, 9)), jnp.float32)):
    v, g = jax.value_and_grad(lambda z, c=centers: _stage2(
        z, jnp.asarray(t), jnp.asarray(y), centers=c).sum())(jnp.asarray(logits))
    assert float(v) == 0.0 and np.all(np.asarray(g) == 0)
  y2 = np.array([0, 1, 2, 3, 4, 0], np.int32)
  v, g = jax.value_and_grad(lambda z: _stage2(
      z, jnp.asarray(t), jnp.asarray(y2)).sum())(jnp.asarray(logits))
  assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))
  none = jnp.zeros(6, bool)
  v, g = jax.value_and_grad(lambda z: _stage2(
      z, jnp.asarray(t), jnp.asarray(y2), where=none).sum())(jnp.asarray(logits))
  assert float(v) == 0.0 and np.all(np.asarray(g) == 0)


def test_stage2_bfloat16_jit_vmap_and_shape_errors():
  rng = np.random.default_rng(11)
  logits = rng.normal(size=(2, 8, 4)).astype(np.float32)
  t = rng.normal(size=(2, 8, 6)).astype(np.float32)
  y = rng.integers(0, 4, size=(2, 8)).astype(np.int32)
  got = jax.jit(jax.vmap(losses.refilled_classifier))(
      jnp.asarray(logits, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), jnp.asarray(y))
  assert got.dtype == jnp.float32
  r16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  for k in range(2):
    np.testing.assert_allclose(got[k], _np_stage2(r16(logits[k]), r16(t[k]), y[k]), rtol=1e-4,
                               atol=1e-6)
  with pytest.raises(ValueError, match=r"centers.*\(4, 6\).*\(3, 6\)"):
    _stage2(jnp.asarray(logits[0]), jnp.asarray(t[0]), jnp.asarray(y[0]),
                               centers=jnp.zeros((3, 6)))
  with pytest.raises(ValueError, match="batch size"):
    _stage2(jnp.asarray(logits[0]), jnp.asarray(t[0, :7]), jnp.asarray(y[0]))


# --------------------------------------------------------------------------- centres and NCM


def test_class_centers_are_normalised_sums_with_zero_rows_for_empty_classes():
  x = np.array([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0], [5.0, 5.0]], np.float32)
  y = np.array([0, 0, 2, 1], np.int32)
  keep = np.array([True, True, True, False])
  got = np.asarray(losses.class_centers(jnp.asarray(x), jnp.asarray(y), 4,
                                        where=jnp.asarray(keep)))
  want = np.array([[1 / np.sqrt(10), 3 / np.sqrt(10)], [0, 0], [np.sqrt(0.5)] * 2, [0, 0]])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_class_sums_accumulate_to_the_centres():
  rng = np.random.default_rng(12)
  x = rng.normal(size=(10, 3)).astype(np.float32)
  y = rng.integers(0, 4, size=10).astype(np.int32)
  total = sum(losses.class_sums(jnp.asarray(x[k:k + 5]), jnp.asarray(y[k:k + 5]), 4)
              for k in (0, 5))
  want = np.stack([x[y == c].sum(0) for c in range(4)])
  np.testing.assert_allclose(total, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(total / np.maximum(np.linalg.norm(want, axis=1, keepdims=True),
                                                1e-12),
                             losses.class_centers(jnp.asarray(x), jnp.asarray(y), 4),
                             rtol=1e-5, atol=1e-6)


def test_ncm_accuracy_by_hand():
  centers = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # class 2 has no centre
  x = jnp.asarray([[2.0, 1.0], [0.1, 3.0], [-1.0, -1.0], [1.0, 1.5]])
  # <x/|x|, c>: row 0 -> class 0; row 1 -> 1; row 2 -> scores (-.71, -.71, [0 but excluded]) -> 0;
  # row 3 -> 1.
  y = jnp.asarray([0, 1, 2, 0], jnp.int32)
  np.testing.assert_array_equal(losses.ncm_predict(x, centers), [0, 1, 0, 1])
  np.testing.assert_allclose(losses.ncm_accuracy(x, y, centers), 0.5)
  np.testing.assert_allclose(
      losses.ncm_accuracy(x, y, centers, where=jnp.asarray([True, True, False, False])), 1.0)
  assert float(losses.ncm_accuracy(x, y, centers, where=jnp.zeros(4, bool))) == 0.0


def test_stage1_axis_name_mines_triplets_in_the_global_batch():
  # Under shard_map over 4 devices with axis_name, every device returns the loss of the whole
  # batch computed on one device (mining across shards), which differs from a shard's own.
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  s, t, y = _random_batch(seed=5)
  mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:4])
  keep = jnp.arange(len(y)) != 1

  def per_device(s, t, y, keep):
    return losses.refilled_relationship(s, t, y, where=keep, axis_name="batch")[None]

  mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("batch"),) * 4,
                                 out_specs=P("batch")))
  put = lambda a: jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("batch")))  # noqa: E731
  got = np.asarray(mapped(put(s), put(t), put(y), put(keep)))
  want = float(losses.refilled_relationship(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y),
                                            where=keep))
  np.testing.assert_allclose(got, np.full(4, want), rtol=1e-5)
  shard = float(losses.refilled_relationship(jnp.asarray(s[:3]), jnp.asarray(t[:3]),
                                             jnp.asarray(y[:3]), where=keep[:3]))
  assert abs(shard - want) > 1e-6
