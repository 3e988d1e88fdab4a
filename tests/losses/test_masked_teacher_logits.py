"""A teacher logit of -inf (a masked class, probability 0) gives the finite limit loss.

The references are float64 numpy restatements over the classes the teacher keeps, with the
`0 log 0 = 0` convention; NaN and +inf teacher logits stay NaN (the train step's guard and the
teacher sanity check report them instead of a silently wrong number).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses import dkd, kd, ptloss

T = 2.0
rng = np.random.default_rng(0)
S = rng.normal(size=(3, 5)) * 2
TEACHER = rng.normal(size=(3, 5)) * 2
TEACHER[0, 1] = TEACHER[1, 4] = TEACHER[2, 0] = TEACHER[2, 3] = -np.inf  # masked classes
LABELS = np.array([0, 4, 1])  # row 1: the ground-truth class itself is masked by the teacher
EPS = np.array([0.4, -0.1])


def _log_softmax(x):
  top = np.max(x, -1, keepdims=True)
  with np.errstate(invalid="ignore"):
    z = x - top
  return z - np.log(np.sum(np.exp(z), -1, keepdims=True))


def _kl(lt, ls):
  """sum_k p_k (log p_k - log q_k) with 0 where p_k = 0."""
  with np.errstate(invalid="ignore"):
    return np.sum(np.where(np.isneginf(lt), 0.0, np.exp(lt) * (lt - ls)), -1)


def _np_kd(s, t):
  return T**2 * _kl(_log_softmax(t / T), _log_softmax(s / T))


def _np_dkd(s, t, y, alpha=1.0, beta=8.0):
  gt = np.eye(s.shape[-1], dtype=bool)[y]
  ps, pt = np.exp(_log_softmax(s / T)), np.exp(_log_softmax(t / T))
  with np.errstate(divide="ignore"):
    bt = np.log(np.stack([(pt * gt).sum(-1), (pt * ~gt).sum(-1)], -1))
    bs = np.log(np.stack([(ps * gt).sum(-1), (ps * ~gt).sum(-1)], -1))
  nt = _log_softmax(np.where(gt, -np.inf, t / T))
  ns = _log_softmax(np.where(gt, -np.inf, s / T))
  nt = np.where(gt, -np.inf, nt)
  return T**2 * (alpha * _kl(bt, bs) + beta * _kl(nt, ns))


def _np_ptloss(s, t, eps):
  lt, ls = _log_softmax(t / T), _log_softmax(s / T)
  pt, ps = np.exp(lt), np.exp(ls)
  m = np.arange(1, eps.shape[-1] + 1)
  poly = ((1 - ps)[..., None] ** m * eps).sum(-1)
  return _kl(lt, ls) + (pt * poly).sum(-1)


CASES = {
    "kd": (lambda s, t: kd(s, t, temperature=T), _np_kd(S, TEACHER)),
    "dkd": (lambda s, t: dkd(s, t, jnp.asarray(LABELS), temperature=T),
            _np_dkd(S, TEACHER, LABELS)),
    "ptloss": (lambda s, t: ptloss(s, t, jnp.asarray(EPS, jnp.float32), temperature=T),
               _np_ptloss(S, TEACHER, EPS)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_minus_inf_teacher_logit_gives_the_limit_loss_and_finite_gradients(name):
  fn, want = CASES[name]
  assert np.all(np.isfinite(want))
  s, t = jnp.asarray(S, jnp.float32), jnp.asarray(TEACHER, jnp.float32)
  np.testing.assert_allclose(fn(s, t), want, rtol=2e-5, atol=1e-5)
  # A very negative finite logit is the same limit.
  np.testing.assert_allclose(fn(s, jnp.where(jnp.isinf(t), -1e30, t)), want, rtol=2e-5,
                             atol=1e-5)
  gs, gt = jax.grad(lambda s, t: fn(s, t).sum(), argnums=(0, 1))(s, t)
  assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  assert np.all(np.asarray(gt)[np.isinf(TEACHER)] == 0)  # no gradient into a masked class
  # The student's gradient is the limit's: the same as with -1e30 in float32 ...
  gs_limit = jax.grad(lambda s: fn(s, jnp.where(jnp.isinf(t), -1e30, t)).sum())(s)
  np.testing.assert_allclose(gs, gs_limit, rtol=1e-5, atol=1e-6)
  # ... and under jit and bfloat16 inputs.
  got = jax.jit(fn)(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16))
  assert got.dtype == jnp.float32 and np.all(np.isfinite(got))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_plus_inf_teacher_logits_stay_nan(name, bad):
  fn, _ = CASES[name]
  t = np.array(TEACHER)
  t[0, 2] = bad
  out = np.asarray(fn(jnp.asarray(S, jnp.float32), jnp.asarray(t, jnp.float32)))
  assert np.isnan(out[0]) and np.all(np.isfinite(out[1:]))
