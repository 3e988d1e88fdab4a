"""DKC: the discrepancy against a numpy NDCG' reference and the switching rule on crafted cases."""

import math

import jax.numpy as jnp
import numpy as np

from kd_jax.recsys import dkc


def _ref_d(student, teacher, top):
  g = [(2 ** math.exp(-r / 10) - 1) / math.log2(r + 2) for r in range(top)]
  dcg = sum(gr for r, gr in enumerate(g) if student[r] in set(teacher[:top]))
  return round(1 - dcg / sum(g), 4)


def test_discrepancy_matches_reference():
  rng = np.random.default_rng(0)
  student = np.stack([rng.permutation(80)[:50] for _ in range(3)])
  teachers = np.stack([[rng.permutation(80)[:60] for _ in range(4)] for _ in range(3)])
  teachers[0, 0, :50] = student[0]  # identical top-50: D = 0
  got = np.asarray(dkc.discrepancy(jnp.asarray(student), jnp.asarray(teachers)))
  assert got.shape == (3, 4)
  for u in range(3):
    for v in range(4):
      np.testing.assert_allclose(got[u, v], _ref_d(student[u], teachers[u, v], 50), atol=1e-4)
  assert got[0, 0] == 0.0


def test_switching_rule_crafted_case():
  # 5 (user, teacher) pairs, V = 4; epoch 20, p = 10 -> th = 1.05 * 0.995**2 = 1.03951
  v = jnp.asarray([[0, 0, 1, 3, 2]])
  d0 = jnp.asarray([[0.50, 0.50, 0.30, 0.10, 0.40]])
  d_all = jnp.asarray([[[0.9, 0.40, 0.35, 0.20],   # v=0: ratio .5/.40=1.25 > th -> advance
                        [0.9, 0.49, 0.35, 0.20],   # ratio 1.0204: below th, >= 1 -> stay
                        [0.9, 0.8, 0.60, 0.25],    # v=1: ratio .3/.6=0.5 < 1 -> official only
                        [0.9, 0.8, 0.60, 0.05],    # v=3: already last -> stay
                        [0.9, 0.8, 0.60, 0.00]]])  # v=2: D(3)=0 -> ratio inf -> advance
  new_v, new_d0, adv = dkc.dkc_switch(v, d0, d_all, 20, first_call=False)
  np.testing.assert_array_equal(adv, [[True, False, True, False, True]])
  np.testing.assert_array_equal(new_v, [[1, 0, 2, 3, 3]])
  # D0 <- D(min(v + 2, 3)) for the advanced pairs
  np.testing.assert_allclose(new_d0, [[0.35, 0.50, 0.25, 0.10, 0.00]])
  # paper-level rule: no 'ratio < 1' branch, no decay
  _, _, adv = dkc.dkc_switch(v, d0, d_all, 20, first_call=False, decay=1.0,
                             advance_on_drift=False)
  np.testing.assert_array_equal(adv, [[True, False, False, False, True]])
  # the decay matters: ratio 1.0204 passes th = 1.05 * 0.995**10 = 0.9986 at epoch 100
  _, _, adv = dkc.dkc_switch(v, d0, d_all, 100, first_call=False, advance_on_drift=False)
  assert bool(adv[0, 1])
  # first call only records D0 = D(v + 1)
  v1, d01, adv = dkc.dkc_switch(v, d0, d_all, 10, first_call=True)
  np.testing.assert_array_equal(v1, v)
  np.testing.assert_allclose(d01, [[0.40, 0.49, 0.60, 0.05, 0.00]])
  assert not np.any(adv)


def test_threshold_and_finished():
  np.testing.assert_allclose(dkc.dkc_threshold(35), 1.05 * 0.995 ** 3, rtol=1e-6)
  assert dkc.dkc_finished(jnp.full((10, 6), 3))
  v = np.full((1000, 6), 3)
  v[0, 0] = 0  # mean 2.997 rounds to 3.00 -> finished, as in the official rounding
  assert dkc.dkc_finished(jnp.asarray(v))
  v[:10, 0] = 2  # mean 2.99 -> not finished
  assert not dkc.dkc_finished(jnp.asarray(v))
