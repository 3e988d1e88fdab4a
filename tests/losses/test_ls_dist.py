"""Logit standardisation (`kd(..., standardize=True)`) and DIST (`dist`): golden values from
torchdistill's `LogitStdKDLoss` and `DISTLoss` (tests/fixtures/losses/make_logit_golden.py), a
float64 numpy restatement, hand-computed cases and the numerics checklist."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses import dist, kd, standardize_logits
from tests._numpy_reference import log_softmax as _np_log_softmax

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "..", "fixtures", "losses",
                              "logit_golden.npz"))
CASES = ("t1", "t4", "wide_t2")


def _np_standardize(z):
  return (z - z.mean(-1, keepdims=True)) / (1e-7 + z.std(-1, ddof=1, keepdims=True))


def _np_ls_kd(s, t, temp):
  lt, ls = _np_log_softmax(_np_standardize(t) / temp), _np_log_softmax(_np_standardize(s) / temp)
  return temp**2 * (np.exp(lt) * (lt - ls)).sum(-1)


def _f32(x):
  return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------- standardisation

def test_standardize_is_unbiased_z_score_hand_case():
  # (0, 1, 2): mean 1, unbiased std 1 (the biased std would be 0.816 and give +-1.22).
  np.testing.assert_allclose(standardize_logits(jnp.array([[0.0, 1.0, 2.0]])),
                             [[-1 / (1 + 1e-7), 0.0, 1 / (1 + 1e-7)]], rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_ls_kd_matches_torchdistill_logit_std_kd_loss(case):
  s, t, temp = GOLDEN[f"{case}/s"], GOLDEN[f"{case}/t"], float(GOLDEN[f"{case}/temperature"])
  got = kd(_f32(s), _f32(t), temperature=temp, standardize=True)
  # torchdistill's KL alone has no T^2; combined with CE (alpha 0.1, beta 0.9) it has.
  np.testing.assert_allclose(float(got.mean()), temp**2 * GOLDEN[f"lskd/{case}/kl"], rtol=1e-5)
  ce = -_np_log_softmax(s)[np.arange(8), GOLDEN[f"{case}/labels"]].mean()
  np.testing.assert_allclose(0.1 * ce + 0.9 * float(got.mean()), GOLDEN[f"lskd/{case}/combined"],
                             rtol=1e-5)
  np.testing.assert_allclose(got, _np_ls_kd(s, t, temp), rtol=1e-5, atol=1e-6)


def test_ls_kd_is_invariant_to_each_sides_shift_and_scale():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 6, 7))
  base = kd(_f32(s), _f32(t), temperature=2.0, standardize=True)
  moved = kd(_f32(5 * s - 3), _f32(0.2 * t + 1), temperature=2.0, standardize=True)
  np.testing.assert_allclose(moved, base, rtol=1e-4, atol=1e-6)
  # Plain KD is not: the option changes the loss.
  assert not np.allclose(kd(_f32(5 * s - 3), _f32(t), temperature=2.0),
                         kd(_f32(s), _f32(t), temperature=2.0), rtol=1e-2)


def test_ls_kd_numerics_extreme_constant_masked_and_bfloat16():
  s = jnp.array([[1e4, -1e4, 0.0, 5.0], [3.0, 3.0, 3.0, 3.0], [-1e4, 1e4, 3.0, -1e4]])
  t = jnp.array([[-1e4, 1e4, 0.0, 2.0], [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
  f = lambda s, t: kd(s, t, temperature=2.0, standardize=True).sum()
  v, (gs, gt) = jax.value_and_grad(f, argnums=(0, 1))(s, t)
  assert np.isfinite(v) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  np.testing.assert_allclose(kd(s, t, temperature=2.0, standardize=True),
                             _np_ls_kd(np.asarray(s, np.float64), np.asarray(t, np.float64), 2.0),
                             rtol=1e-4, atol=1e-5)
  where = jnp.zeros((3,), bool)
  g = lambda s: kd(s, t, temperature=2.0, standardize=True, where=where).sum()
  assert float(g(s)) == 0.0 and np.all(jax.grad(g)(s) == 0)
  # Garbage in masked rows never reaches the value or the gradient.
  bad = s.at[1].set(jnp.nan)
  keep = jnp.array([True, False, True])
  h = lambda s: kd(s, t, temperature=2.0, standardize=True, where=keep).sum()
  assert np.isfinite(h(bad)) and np.all(np.isfinite(jax.grad(h)(bad)))
  sb, tb = s.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
  got = kd(sb, tb, temperature=2.0, standardize=True)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, kd(sb.astype(jnp.float32), tb.astype(jnp.float32),
                                     temperature=2.0, standardize=True), rtol=1e-6)


def test_standardize_rejects_a_single_class():
  with pytest.raises(ValueError, match="2 classes"):
    kd(jnp.ones((2, 1)), jnp.ones((2, 1)), standardize=True)


# ----------------------------------------------------------------------------------------- DIST

def _np_dist(s, t, temp, beta, gamma):
  """The DIST formula in float64 numpy (torchdistill's eps convention)."""
  ys, yt = np.exp(_np_log_softmax(s / temp)), np.exp(_np_log_softmax(t / temp))

  def pearson(a, b):  # rows
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    na = np.maximum(np.linalg.norm(a, axis=1), 1e-8)
    nb = np.maximum(np.linalg.norm(b, axis=1), 1e-8)
    return (a * b).sum(1) / (na * nb)

  inter = 1 - pearson(ys, yt).mean()
  intra = 1 - pearson(ys.T, yt.T).mean()
  return temp**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("case", CASES)
def test_dist_matches_torchdistill_dist_loss(case):
  s, t, temp = GOLDEN[f"{case}/s"], GOLDEN[f"{case}/t"], float(GOLDEN[f"{case}/temperature"])
  beta, gamma = float(GOLDEN[f"dist/{case}/beta"]), float(GOLDEN[f"dist/{case}/gamma"])
  f = lambda s: dist(s, _f32(t), beta=beta, gamma=gamma, temperature=temp)
  value, grad = jax.value_and_grad(f)(_f32(s))
  np.testing.assert_allclose(float(value), GOLDEN[f"dist/{case}/value"], rtol=1e-5)
  np.testing.assert_allclose(float(value), _np_dist(s, t, temp, beta, gamma), rtol=1e-5)
  np.testing.assert_allclose(grad, GOLDEN[f"dist/{case}/grad_s"], rtol=1e-4,
                             atol=1e-5 * np.abs(GOLDEN[f"dist/{case}/grad_s"]).max())
  # A mask keeping the first rows equals the reference on those rows (garbage elsewhere).
  sub = int(GOLDEN["sub"])
  where = jnp.arange(8) < sub
  garbage = _f32(s).at[sub:].set(jnp.inf)
  masked = dist(garbage, _f32(t), beta=beta, gamma=gamma, temperature=temp, where=where)
  np.testing.assert_allclose(float(masked), GOLDEN[f"dist/{case}/sub_value"], rtol=1e-5)
  g = jax.grad(lambda s: dist(s, _f32(t), beta=beta, gamma=gamma, temperature=temp,
                              where=where))(garbage)
  assert np.all(np.isfinite(g)) and np.all(g[sub:] == 0)


def test_dist_hand_cases():
  s = jnp.array([[0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
  # Identical inputs: both correlations are 1, the loss 0.
  np.testing.assert_allclose(dist(s, s, temperature=4.0), 0.0, atol=1e-6)
  # Two classes: the centred probabilities of a row are (p - 1/2, 1/2 - p), so every correlation
  # is the sign of (p_s - 1/2)(p_t - 1/2). Opposite preferences in both rows: every row and
  # every column has rho = -1, so inter = intra = 2 and the loss is T^2 (2 beta + 2 gamma).
  s2 = jnp.array([[0.0, 1.0], [1.0, 0.0]])
  np.testing.assert_allclose(dist(s2, s2[:, ::-1], temperature=4.0, beta=1.0, gamma=0.5),
                             16.0 * (2.0 + 1.0), rtol=1e-5)
  # One row: the centred column has no spread (0 / eps = 0), so intra = 1 - 0.
  np.testing.assert_allclose(dist(s2[:1], s2[:1, ::-1]), 2.0 + 1.0, rtol=1e-5)


def test_dist_numerics_extreme_uniform_all_false_and_bfloat16():
  s = jnp.array([[1e4, -1e4, 0.0, 5.0], [3.0, 3.0, 3.0, 3.0], [-1e4, 1e4, 3.0, -1e4]])
  t = jnp.array([[-1e4, 1e4, 0.0, 2.0], [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
  f = lambda s, t: dist(s, t, temperature=1.0)
  v, (gs, gt) = jax.value_and_grad(f, argnums=(0, 1))(s, t)
  assert np.isfinite(v) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  np.testing.assert_allclose(v, _np_dist(np.asarray(s, np.float64), np.asarray(t, np.float64),
                                         1.0, 1.0, 1.0), rtol=1e-4)
  none = jnp.zeros((3,), bool)
  g = lambda s: dist(s, t, temperature=4.0, where=none)
  assert float(g(s)) == 0.0 and np.all(jax.grad(g)(s) == 0)
  sb, tb = s.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
  got = dist(sb, tb)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, dist(sb.astype(jnp.float32), tb.astype(jnp.float32)),
                             rtol=1e-6)


def test_dist_axis_name_covers_the_global_batch():
  rng = np.random.default_rng(3)
  s, t = _f32(rng.normal(size=(8, 5)) * 2), _f32(rng.normal(size=(8, 5)) * 2)
  where = jnp.array([True, True, False, True, True, True, False, True])
  want = dist(s, t, temperature=4.0, where=where)
  per_shard = jax.vmap(lambda a, b, w: dist(a, b, temperature=4.0, where=w, axis_name="d"),
                       axis_name="d")(s.reshape(4, 2, 5), t.reshape(4, 2, 5), where.reshape(4, 2))
  np.testing.assert_allclose(per_shard, np.full(4, want), rtol=1e-6)


def test_dist_rejects_bad_shapes():
  with pytest.raises(ValueError, match="batch, num_classes"):
    dist(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4)))
  with pytest.raises(ValueError, match="class mismatch"):
    dist(jnp.ones((2, 3)), jnp.ones((2, 4)))
