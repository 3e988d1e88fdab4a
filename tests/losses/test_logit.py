"""kd and dkd against float64 numpy formulas, hand-computed cases and the numerics checklist."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kd_jax.losses import dkd, kd
from tests._numpy_reference import kd as _np_kd
from tests._numpy_reference import log_softmax as _np_log_softmax


def _np_dkd_mdistiller(s, t, y, alpha, beta, temp):
  """mdistiller's dkd_loss transcribed to float64 numpy, per example (its batch sum / B)."""
  gt = np.eye(s.shape[-1], dtype=bool)[y]
  ps, pt = np.exp(_np_log_softmax(s / temp)), np.exp(_np_log_softmax(t / temp))
  bs = np.stack([(ps * gt).sum(-1), (ps * ~gt).sum(-1)], -1)
  bt = np.stack([(pt * gt).sum(-1), (pt * ~gt).sum(-1)], -1)
  tckd = (bt * (np.log(bt) - np.log(bs))).sum(-1) * temp**2
  pt2 = np.exp(_np_log_softmax(t / temp - 1000.0 * gt))
  ls2 = _np_log_softmax(s / temp - 1000.0 * gt)
  # torch's kl_div: target * (log target - input), with 0 where target == 0.
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(pt2 > 0, pt2 * (np.log(pt2) - ls2), 0.0)
  nckd = terms.sum(-1) * temp**2
  return alpha * tckd + beta * nckd


# ------------------------------------------------------------------------------------------ kd


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_matches_numpy(temp):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 5, 10)) * 3
  got = kd(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature=temp)
  assert got.shape == (3, 5) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_kd(s, t, temp), rtol=1e-5, atol=1e-6)


def test_kd_hand_computed_two_classes():
  # T = 2: teacher logits (0, 2ln3) -> p_t = (1/4, 3/4); student logits 0 -> p_s = (1/2, 1/2).
  t = jnp.array([[0.0, 2 * np.log(3.0)]])
  s = jnp.zeros((1, 2))
  want = 4.0 * (0.25 * np.log(0.5) + 0.75 * np.log(1.5))
  np.testing.assert_allclose(kd(s, t, temperature=2.0), [want], rtol=1e-6)
  np.testing.assert_allclose(kd(t, t, temperature=2.0), [0.0], atol=1e-7)


def test_kd_batch_mean_equals_repdistiller_convention():
  # DistillKL: kl_div(log_softmax(s/T), softmax(t/T), reduction='sum') / B * T^2.
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 64, 100))
  lt, ls = _np_log_softmax(t / 4), _np_log_softmax(s / 4)
  want = (np.exp(lt) * (lt - ls)).sum() / 64 * 16
  np.testing.assert_allclose(kd(jnp.asarray(s), jnp.asarray(t)).mean(), want, rtol=1e-5)


def test_kd_where_zeroes_masked_examples_and_ignores_their_garbage():
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(2, 4, 6)).astype(np.float32)
  s[1] = np.nan
  where = jnp.array([True, False, True, False])
  got = kd(jnp.asarray(s), jnp.asarray(t), where=where)
  want = _np_kd(s.astype(np.float64), t.astype(np.float64), 4.0)
  np.testing.assert_allclose(got[::2], want[::2], rtol=1e-5)
  assert got[1] == 0.0 and got[3] == 0.0
  g = jax.grad(lambda s: kd(s, jnp.asarray(t), where=where).sum())(jnp.asarray(s))
  assert np.all(np.isfinite(g)) and np.all(g[1] == 0)


def test_kd_all_false_where_is_exactly_zero_with_zero_gradient():
  s = jnp.ones((3, 5))
  t = jnp.arange(15.0).reshape(3, 5)
  where = jnp.zeros((3,), bool)
  assert float(kd(s, t, where=where).sum()) == 0.0
  g = jax.grad(lambda s: kd(s, t, where=where).sum())(s)
  assert np.all(g == 0)


def test_kd_extreme_logits_finite_values_and_grads():
  s = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0]])
  t = jnp.array([[-1e4, 1e4, 0.0], [-1e4, 1e4, -1e4]])
  val, (gs, gt) = jax.value_and_grad(lambda s, t: kd(s, t).sum(), argnums=(0, 1))(s, t)
  assert np.isfinite(val) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  # Teacher class 1 at T=4: p_t ~ 1; student log p_s(1) = -2e4/4 -> loss ~ 16 * 5000.
  np.testing.assert_allclose(kd(s, t)[0], 16 * 5000.0, rtol=1e-4)


def test_kd_bfloat16_inputs_computed_in_float32():
  rng = np.random.default_rng(3)
  s, t = rng.normal(size=(2, 8, 10)).astype(np.float32)
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = kd(sb, tb)
  assert got.dtype == jnp.float32
  want = kd(sb.astype(jnp.float32), tb.astype(jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_kd_jit_vmap_and_grads():
  rng = np.random.default_rng(4)
  s, t = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(2, 3, 4, 5)))
  eager = kd(s, t, temperature=2.0)
  np.testing.assert_allclose(jax.jit(kd, static_argnames=())(s, t, temperature=2.0), eager,
                             rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(lambda a, b: kd(a, b, temperature=2.0))(s, t), eager,
                             rtol=1e-6)
  check_grads(lambda s, t: kd(s, t, temperature=2.0), (s[0], t[0]), order=1, modes=["rev"],
              atol=1e-2, rtol=1e-2)


def test_kd_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"\(4, 10\).*\(4, 9\)"):
    kd(jnp.zeros((4, 10)), jnp.zeros((4, 9)))
  with pytest.raises(ValueError, match="where"):
    kd(jnp.zeros((4, 10)), jnp.zeros((4, 10)), where=jnp.ones((3,), bool))


# ----------------------------------------------------------------------------------------- dkd


@pytest.mark.parametrize("alpha,beta,temp", [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.3, 2.0, 2.0)])
def test_dkd_batch_mean_matches_mdistiller(alpha, beta, temp):
  rng = np.random.default_rng(5)
  s, t = rng.normal(size=(2, 16, 10)) * 3
  y = rng.integers(0, 10, size=16)
  got = dkd(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y),
            alpha=alpha, beta=beta, temperature=temp)
  want = _np_dkd_mdistiller(s, t, y, alpha, beta, temp)
  assert got.shape == (16,)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(got.mean(), want.sum() / 16, rtol=2e-5)


def test_dkd_hand_computed_three_classes():
  # T = 1, label 0. Teacher p_t = (1/2, 1/4, 1/4); student p_s = (1/3, 1/3, 1/3).
  t = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  s = jnp.zeros((1, 3))
  tckd = 0.5 * np.log(0.5 / (1 / 3)) + 0.5 * np.log(0.5 / (2 / 3))
  nckd = 0.0  # both non-target parts are (1/2, 1/2)
  got = dkd(s, t, jnp.array([0]), alpha=1.0, beta=8.0, temperature=1.0)
  np.testing.assert_allclose(got, [tckd + 8 * nckd], rtol=1e-6)
  # Label 1: binary (1/4, 3/4) vs (1/3, 2/3); non-target (2/3, 1/3) vs (1/2, 1/2).
  tckd = 0.25 * np.log(0.75) + 0.75 * np.log(0.75 / (2 / 3))
  nckd = (2 / 3) * np.log(4 / 3) + (1 / 3) * np.log(2 / 3)
  got = dkd(s, t, jnp.array([1]), alpha=2.0, beta=3.0, temperature=1.0)
  np.testing.assert_allclose(got, [2 * tckd + 3 * nckd], rtol=1e-6)


def test_dkd_equals_kd_decomposition():
  # KL = TCKD + (1 - p_t,y) * NCKD (the DKD paper's Eq. 5): check with alpha = 1, beta = 1 - p_ty.
  rng = np.random.default_rng(6)
  s, t = rng.normal(size=(2, 8, 7))
  y = rng.integers(0, 7, size=8)
  pty = np.exp(_np_log_softmax(t / 2.0))[np.arange(8), y]
  parts = [dkd(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), alpha=a, beta=b, temperature=2.0)
           for a, b in [(1.0, 0.0), (0.0, 1.0)]]
  np.testing.assert_allclose(parts[0] + (1 - pty) * parts[1], _np_kd(s, t, 2.0), rtol=1e-4)


def test_dkd_labels_validation_and_masking():
  s = jnp.zeros((3, 4))
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    dkd(s, s, jnp.array([0, 4, 1]))
  with pytest.raises(ValueError, match="batch shape"):
    dkd(s, s, jnp.array([0, 1]))
  with pytest.raises(ValueError, match="integers"):
    dkd(s, s, jnp.array([0.0, 1.0, 2.0]))
  # A padded example with label -1 is fine when masked, and gives exactly 0.
  where = jnp.array([True, False, True])
  got = dkd(s, s + jnp.arange(4.0), jnp.array([0, -1, 3]), where=where)
  assert got[1] == 0.0 and np.all(np.isfinite(got))
  # Under jit the range cannot be checked: an unmasked bad label gives NaN.
  got = jax.jit(dkd)(s, s, jnp.array([0, 9, 1]))
  assert np.isnan(got[1]) and np.all(np.isfinite(got[::2]))


def test_dkd_all_false_where_and_extreme_logits():
  s = jnp.array([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 3.0, -1e4]])
  t = jnp.array([[-1e4, 1e4, 0.0, 2.0], [-1e4, 1e4, -1e4, 1e4]])
  y = jnp.array([0, 1])
  f = lambda s, t, w: dkd(s, t, y, where=w).sum()
  val, (gs, gt) = jax.value_and_grad(f, argnums=(0, 1))(s, t, None)
  assert np.isfinite(val) and np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  w = jnp.zeros((2,), bool)
  assert float(f(s, t, w)) == 0.0
  assert np.all(jax.grad(f)(s, t, w) == 0)


def test_dkd_bfloat16_jit_vmap_grads():
  rng = np.random.default_rng(7)
  s, t = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(2, 3, 4, 6)))
  y = jnp.asarray(rng.integers(0, 6, size=(3, 4)))
  eager = dkd(s, t, y)
  assert eager.shape == (3, 4)
  got = dkd(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16), y)
  assert got.dtype == jnp.float32
  want = dkd(s.astype(jnp.bfloat16).astype(jnp.float32), t.astype(jnp.bfloat16).astype(jnp.float32),
             y)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(dkd)(s, t, y), eager, rtol=1e-5)
  np.testing.assert_allclose(jax.vmap(dkd)(s, t, y), eager, rtol=1e-5)
  check_grads(lambda s, t: dkd(s, t, y[0], temperature=2.0), (s[0], t[0]), order=1,
              modes=["rev"], atol=1e-2, rtol=1e-2)


# ------------------------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

_logit_rows = hnp.arrays(np.float32, (3, 5), elements=st.floats(-50, 50, width=32))


@settings(max_examples=40, deadline=None)
@given(s=_logit_rows, t=_logit_rows, temp=st.sampled_from([0.5, 1.0, 4.0]))
def test_kd_is_nonnegative_and_zero_at_equality(s, t, temp):
  # KL(p || q) >= 0 (Gibbs' inequality), with equality iff p == q; the student is the teacher.
  assert np.all(np.asarray(kd(s, t, temperature=temp)) >= -1e-5)
  np.testing.assert_allclose(kd(t, t, temperature=temp), 0.0, atol=1e-5)
  # Adding a constant to a row leaves its softmax, hence the loss, unchanged.
  np.testing.assert_allclose(kd(s + 7.0, t, temperature=temp), kd(s, t, temperature=temp),
                             rtol=1e-4, atol=1e-4)
