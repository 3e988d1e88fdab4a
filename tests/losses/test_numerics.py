"""The shared numeric helpers against hand-computed values and numpy float64 formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.losses import _numerics as nm
from tests._numpy_reference import log_softmax as _np_log_softmax


def test_kl_from_logits_matches_numpy():
  rng = np.random.default_rng(0)
  t, s = rng.normal(size=(2, 4, 7))
  lt, ls = _np_log_softmax(t), _np_log_softmax(s)
  want = (np.exp(lt) * (lt - ls)).sum(-1)
  got = nm.kl_from_logits(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_masked_kl_equals_kl_on_the_kept_columns():
  rng = np.random.default_rng(1)
  t, s = rng.normal(size=(2, 3, 6))
  mask = np.array([True, False, True, True, False, True])
  lt, ls = _np_log_softmax(t[:, mask]), _np_log_softmax(s[:, mask])
  want = (np.exp(lt) * (lt - ls)).sum(-1)
  got = nm.kl_from_logits(jnp.asarray(t), jnp.asarray(s), mask=jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_all_false_mask_gives_zero_and_finite_gradient():
  t = jnp.array([[1.0, 2.0, 3.0]])
  mask = jnp.zeros((1, 3), bool)
  f = lambda s: nm.kl_from_logits(t, s, mask=mask).sum()
  assert float(f(t * 2)) == 0.0
  g = jax.grad(f)(t * 2)
  assert np.all(np.isfinite(g)) and np.all(g == 0)


def test_kl_from_probs_handles_zero_probabilities():
  p = jnp.array([[1.0, 0.0, 0.0]])
  s = jnp.array([[0.0, 0.0, 0.0]])
  np.testing.assert_allclose(nm.kl_from_probs(p, s), [np.log(3.0)], rtol=1e-6)


def test_l2_normalize_zero_row_and_gradient():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(nm.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
  g = jax.grad(lambda x: nm.l2_normalize(x).sum())(x)
  assert np.all(np.isfinite(g))


def test_pairwise_sq_distances_hand_case():
  x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
  np.testing.assert_allclose(nm.pairwise_sq_distances(x), [[0, 25], [25, 0]], atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int32])
def test_to_float32_promotes(dtype):
  assert nm.to_float32(jnp.ones(2, dtype)).dtype == jnp.float32


def test_row_sum_matches_numpy_and_its_gradient_is_ones():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 5, 7)).astype(np.float32)
  np.testing.assert_allclose(nm.row_sum(jnp.asarray(x)), x.astype(np.float64).sum(-1),
                             rtol=1e-6, atol=1e-6)
  g = jax.grad(lambda x: jnp.sum(nm.row_sum(x) * jnp.arange(5.0)[None, :]))(jnp.asarray(x))
  np.testing.assert_array_equal(g, np.broadcast_to(np.arange(5.0)[None, :, None], x.shape))
  batched = jax.vmap(nm.row_sum)(jnp.asarray(x))
  np.testing.assert_allclose(batched, x.astype(np.float64).sum(-1), rtol=1e-6, atol=1e-6)


def test_row_sum_is_a_dot_on_cpu_not_a_reduction():
  # The point of row_sum on CPU: the compiled program sums with a dot (GEMV), not a reduce.
  if jax.default_backend() != "cpu":
    pytest.skip("the dot form is CPU-only; elsewhere row_sum is jnp.sum")
  hlo = jax.jit(nm.row_sum).lower(jnp.ones((4, 6))).compile().as_text()
  assert " dot(" in hlo and " reduce(" not in hlo


def test_softmax_and_logsumexp_match_numpy_at_extreme_logits():
  z = np.array([[1e4, -1e4, 0.0, 3.0], [0.5, -0.25, 2.0, -3.0]])
  p, lse = nm.softmax_and_logsumexp(jnp.asarray(z, jnp.float32))
  want_log_p = _np_log_softmax(z)
  np.testing.assert_allclose(p, np.exp(want_log_p), rtol=1e-6, atol=1e-30)
  top = z.max(-1, keepdims=True)
  np.testing.assert_allclose(lse, top + np.log(np.exp(z - top).sum(-1, keepdims=True)),
                             rtol=1e-6)
  # d lse / dz = softmax(z), also through the max held constant.
  g = jax.grad(lambda z: nm.softmax_and_logsumexp(z)[1].sum())(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(g, np.exp(want_log_p), rtol=1e-5, atol=1e-30)


def test_kl_from_logits_gradient_is_softmax_difference():
  rng = np.random.default_rng(4)
  t, s = rng.normal(size=(2, 3, 9)) * 3
  g = jax.grad(lambda s: nm.kl_from_logits(jnp.asarray(t, jnp.float32), s).sum())(
      jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(g, np.exp(_np_log_softmax(s)) - np.exp(_np_log_softmax(t)),
                             rtol=1e-5, atol=1e-6)


def test_row_sum_of_bfloat16_accumulates_in_float32():
  # 4096 ones: the sum is exactly representable in bfloat16, but a bfloat16 running sum stalls
  # at 256 (its spacing there is 2, and 256 + 1 rounds back to 256).
  x = jnp.ones((2, 4096), jnp.bfloat16)
  got = nm.row_sum(x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), [4096.0, 4096.0])
