"""Token-level LM losses: TRL's generalized JSD (golden fixture), numpy float64 restatements,
reductions, masks and the numerics contract."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses
from tests._numpy_reference import log_softmax as _np_log_softmax

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "token",
                      "trl_golden.npz")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as f:
    return dict(f)


def _np_losses(s, t, temperature=1.0, beta=0.5):
  """float64 restatements, per token: forward KL, reverse KL, JSD(beta), TV."""
  ls, lt = _np_log_softmax(s / temperature), _np_log_softmax(t / temperature)
  ps, pt = np.exp(ls), np.exp(lt)
  log_m = np.logaddexp(np.log(beta) + lt, np.log1p(-beta) + ls)  # m = beta p_t + (1-beta) p_s
  return {
      "forward_kl": (pt * (lt - ls)).sum(-1),
      "reverse_kl": (ps * (ls - lt)).sum(-1),
      "jsd": (beta * pt * (lt - log_m) + (1 - beta) * ps * (ls - log_m)).sum(-1),
      "tv": 0.5 * np.abs(ps - pt).sum(-1),
  }


def _grads(fn, **kw):
  """jit(value_and_grad) of the loss with reduction "mean", w.r.t. both logits."""
  return jax.jit(jax.value_and_grad(lambda s, t, w, temp: fn(
      s, t, temperature=temp, where=w, reduction="mean", **kw), argnums=(0, 1)))


# ----------------------------------------------------------------------------- TRL parity


@pytest.mark.parametrize("beta_index", range(5))
def test_generalized_jsd_matches_trl(golden, beta_index):
  beta = float(golden["betas"][beta_index])
  s, t, where = golden["student"], golden["teacher"], golden["where"]
  value_and_grad = _grads(losses.generalized_jsd, beta=beta)
  per_token = jax.jit(lambda s, t, temp: losses.generalized_jsd(s, t, beta=beta,
                                                                temperature=temp))
  for j, temperature in enumerate(golden["temperatures"]):
    temperature = np.float32(temperature)
    np.testing.assert_allclose(per_token(s, t, temperature), golden["per_token"][beta_index, j],
                               rtol=1e-5, atol=1e-7)
    value, (gs, gt) = value_and_grad(s, t, where, temperature)
    np.testing.assert_allclose(value, golden["batchmean"][beta_index, j], rtol=1e-5)
    for got, want in ((gs, golden["grad_student"]), (gt, golden["grad_teacher"])):
      want = want[beta_index, j]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_forward_and_reverse_kl_are_trls_beta_limits(golden):
  s, t, where = golden["student"], golden["teacher"], golden["where"]
  for fn, i in ((losses.forward_kl, 0), (losses.reverse_kl, 4)):
    assert golden["betas"][i] == (0.0 if fn is losses.forward_kl else 1.0)
    value_and_grad = _grads(fn)
    for j, temperature in enumerate(golden["temperatures"]):
      temperature = np.float32(temperature)
      np.testing.assert_allclose(fn(s, t, temperature=temperature),
                                 golden["per_token"][i, j], rtol=1e-5, atol=1e-7)
      value, (gs, _) = value_and_grad(s, t, where, temperature)
      np.testing.assert_allclose(value, golden["batchmean"][i, j], rtol=1e-5)
      want = golden["grad_student"][i, j]
      np.testing.assert_allclose(gs, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_golden_is_trl_and_not_our_formula_restated(golden):
  # The fixture agrees with the float64 restatement too (so neither side is a typo), and the
  # JSD at the endpoints is not the limit of the interior formula (TRL's definition).
  s, t = golden["student"].astype(np.float64), golden["teacher"].astype(np.float64)
  for i, beta in enumerate(golden["betas"]):
    want = _np_losses(s, t, 2.0, beta if 0 < beta < 1 else 0.5)
    key = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(float(beta), "jsd")
    np.testing.assert_allclose(golden["per_token"][i, 1], want[key], rtol=1e-10)
  tiny = _np_losses(s, t, 1.0, 1e-6)["jsd"]
  assert np.all(tiny < 1e-4 * golden["per_token"][0, 0])


# ----------------------------------------------------------------------------- reductions


def test_reductions_by_hand(golden):
  s, t, where = golden["student"], golden["teacher"], golden["where"]
  per_token = golden["per_token"][2, 0]  # beta 0.5, T = 1
  got = losses.generalized_jsd(s, t, where=where, reduction="none")
  np.testing.assert_allclose(got, np.where(where, per_token, 0.0), rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(got)[~where] == 0)
  seq = losses.generalized_jsd(s, t, where=where, reduction="sequence")
  want = np.where(where, per_token, 0).sum(-1) / np.maximum(where.sum(-1), 1)
  assert want[2] == 0 and where[2].sum() == 0  # the fully masked sequence
  np.testing.assert_allclose(seq, want, rtol=1e-5)
  np.testing.assert_allclose(losses.reduce_tokens(per_token, where, "sequence"), want, rtol=1e-6)
  np.testing.assert_allclose(losses.reduce_tokens(per_token, None, "mean"), per_token.mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.generalized_jsd(s, t, reduction="sequence"),
                             per_token.mean(-1), rtol=1e-5)


def test_total_variation_and_symmetries_against_numpy():
  rng = np.random.default_rng(0)
  s, t = (2 * rng.standard_normal((2, 3, 2, 9))).astype(np.float32)
  want = _np_losses(s.astype(np.float64), t.astype(np.float64), 1.5, 0.3)
  np.testing.assert_allclose(losses.total_variation(s, t, temperature=1.5), want["tv"],
                             rtol=1e-5)
  np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=0.3, temperature=1.5),
                             want["jsd"], rtol=1e-5)
  # JSD(beta) swaps into JSD(1 - beta) with the roles exchanged; TV is symmetric.
  np.testing.assert_allclose(losses.generalized_jsd(s, t, beta=0.3),
                             losses.generalized_jsd(t, s, beta=0.7), rtol=1e-5)
  np.testing.assert_allclose(losses.total_variation(s, t), losses.total_variation(t, s),
                             rtol=1e-6)
  np.testing.assert_allclose(losses.reverse_kl(s, t), losses.forward_kl(t, s), rtol=1e-6)
  # Hand case: p = (1, 0), q = (1/2, 1/2) -> TV = 1/2.
  hand = losses.total_variation(jnp.array([[0.0, -1e4]]), jnp.array([[0.0, 0.0]]))
  np.testing.assert_allclose(hand, [0.5], rtol=1e-6)


# ----------------------------------------------------------------------------- numerics

LOSSES = {
    "forward_kl": losses.forward_kl,
    "reverse_kl": losses.reverse_kl,
    "jsd": lambda s, t, **kw: losses.generalized_jsd(s, t, beta=0.5, **kw),
    "jsd_skew": lambda s, t, **kw: losses.generalized_jsd(s, t, beta=0.1, **kw),
    "tv": losses.total_variation,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_numerics_contract(name):
  fn = LOSSES[name]
  rng = np.random.default_rng(1)
  big_s = np.where(rng.random((2, 4, 12)) < 0.5, 1e4, -1e4).astype(np.float32)
  big_t = np.where(rng.random((2, 4, 12)) < 0.5, 1e4, -1e4).astype(np.float32)
  where = np.array([[True, True, False, True], [False, True, True, True]])
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda s, t, w: fn(s, t, where=w, reduction="mean"), argnums=(0, 1)))
  # +-1e4 logits: finite values and gradients, and the float64 value.
  value, grads = value_and_grad(big_s, big_t, where)
  assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)
  key = {"jsd_skew": "jsd"}.get(name, name)
  want = _np_losses(big_s.astype(np.float64), big_t.astype(np.float64),
                    beta=0.1 if name == "jsd_skew" else 0.5)[key]
  np.testing.assert_allclose(value, want[where].mean(), rtol=1e-5)
  # An all-False mask: exactly 0, zero gradients, even with inf and NaN in the masked logits.
  junk = np.full((2, 4, 12), np.nan, np.float32)
  junk[0, 0, 0] = np.inf
  none = np.zeros((2, 4), bool)
  value, grads = value_and_grad(junk, junk, none)
  assert float(value) == 0.0 and all(np.all(np.asarray(g) == 0) for g in grads)
  # bfloat16 inputs: float32 arithmetic on the bf16 values, a float32 loss, bf16 gradients.
  s = rng.standard_normal((2, 4, 12)).astype(np.float32)
  t = rng.standard_normal((2, 4, 12)).astype(np.float32)
  value, grads = value_and_grad(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16),
                                where)
  assert value.dtype == jnp.float32 and all(g.dtype == jnp.bfloat16 for g in grads)
  round_bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
  want, want_grads = value_and_grad(round_bf16(s), round_bf16(t), where)
  np.testing.assert_allclose(value, want, rtol=1e-6)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=1e-2, atol=1e-2 * np.abs(w).max())


def test_a_minus_inf_teacher_logit_is_a_class_of_probability_zero():
  # The t -> -inf limit: the same loss as on the remaining classes (values and gradients), for
  # the losses where it is finite; reverse KL is +inf (the student has mass there).
  rng = np.random.default_rng(2)
  s = rng.standard_normal((2, 3, 7)).astype(np.float32)
  t = rng.standard_normal((2, 3, 7)).astype(np.float32)
  t[:, :, 2] = -np.inf
  keep = np.arange(7) != 2
  for name in ("forward_kl", "jsd", "jsd_skew", "tv"):
    fn = LOSSES[name]
    value_and_grad = jax.value_and_grad(lambda s, t: fn(s, t, reduction="mean"), argnums=(0, 1))
    value, (gs, gt) = value_and_grad(s, t)
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt)), name
    # Removing the class from both sides is not the same (the student keeps its mass there),
    # so compare with a finite, very negative teacher logit instead.
    t_far = np.where(keep, t, -1e4).astype(np.float32)
    want, (ws, wt) = value_and_grad(s, t_far)
    np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(gs, ws, rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(gt[..., keep], wt[..., keep], rtol=1e-5, atol=1e-7, err_msg=name)
  assert np.all(np.isposinf(np.asarray(losses.reverse_kl(s, t))))


def test_bad_inputs_are_named():
  s = jnp.zeros((2, 3, 5))
  with pytest.raises(ValueError, match="class mismatch"):
    losses.reverse_kl(s, jnp.zeros((2, 3, 6)))
  with pytest.raises(ValueError, match=r"where must have the batch shape \(2, 3\)"):
    losses.generalized_jsd(s, s, where=jnp.ones((2,), bool))
  with pytest.raises(ValueError, match="where must be boolean"):
    losses.forward_kl(s, s, where=jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="at least 2 axes"):
    losses.total_variation(jnp.zeros(5), jnp.zeros(5))
  with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
    losses.generalized_jsd(s, s, beta=1.5)
  with pytest.raises(ValueError, match="beta must be a Python number"):
    losses.generalized_jsd(s, s, beta=jnp.float32(0.5))
  with pytest.raises(ValueError, match="reduction must be one of"):
    losses.forward_kl(s, s, reduction="batchmean")
  with pytest.raises(ValueError, match="temperature must be > 0"):
    losses.reverse_kl(s, s, temperature=0.0)
