"""CRD against a numpy float64 re-statement of RepDistiller's ContrastMemory + ContrastLoss.

`_NpCRD` restates HobbitLong/RepDistiller `crd/memory.py` (scoring against the other side's
memory, Z fixed from the first batch, momentum update after scoring) and `crd/criterion.py`
(`ContrastLoss` for both anchors); the JAX side gets the same memory rows gathered by index.
"""

import functools

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from kd_jax import losses
from kd_jax.losses import _contrastive as con

N, B, K, D, T = 50, 4, 6, 8, 0.07


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _NpCRD:
  """RepDistiller's CRD memory and loss in numpy float64 (v1 = student, v2 = teacher)."""

  def __init__(self, rng):
    stdv = 1.0 / np.sqrt(D / 3)
    self.mem_v1 = rng.uniform(-stdv, stdv, size=(N, D))
    self.mem_v2 = rng.uniform(-stdv, stdv, size=(N, D))
    self.z_v1 = self.z_v2 = -1.0

  @staticmethod
  def contrast_loss(x):
    m = x.shape[1] - 1
    pn = 1.0 / N
    log_d1 = np.log(x[:, 0] / (x[:, 0] + m * pn + 1e-7))
    log_d0 = np.log((m * pn) / (x[:, 1:] + m * pn + 1e-7))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]

  def step(self, v1, v2, y, idx):
    out_v2 = np.exp(np.einsum("bkd,bd->bk", self.mem_v1[idx], v2) / T)
    out_v1 = np.exp(np.einsum("bkd,bd->bk", self.mem_v2[idx], v1) / T)
    if self.z_v1 < 0:
      self.z_v1 = out_v1.mean() * N
    if self.z_v2 < 0:
      self.z_v2 = out_v2.mean() * N
    loss = self.contrast_loss(out_v1 / self.z_v1) + self.contrast_loss(out_v2 / self.z_v2)
    for mem, v in ((self.mem_v1, v1), (self.mem_v2, v2)):
      pos = mem[y] * 0.5 + v * 0.5
      mem[y] = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    return loss


def _batch(rng):
  y = rng.choice(N, size=B, replace=False)
  neg = np.stack([rng.choice(np.setdiff1d(np.arange(N), [i]), K, replace=False) for i in y])
  idx = np.concatenate([y[:, None], neg], axis=1)
  return _unit(rng.normal(size=(B, D))), _unit(rng.normal(size=(B, D))), y, idx


def _jax_inputs(mem_s, mem_t, v1, v2, y, idx):
  f = lambda x: jnp.asarray(x, jnp.float32)
  return dict(student_embed=f(v1), teacher_embed=f(v2),
              student_negatives=f(mem_s[idx[:, 1:]]), teacher_negatives=f(mem_t[idx[:, 1:]]),
              student_positive=f(mem_s[y]), teacher_positive=f(mem_t[y]))


_crd = jax.jit(functools.partial(losses.crd, num_data=N, temperature=T))
_norms = jax.jit(functools.partial(losses.crd_normalizers, num_data=N, temperature=T))
_update = jax.jit(losses.crd_memory_update)


def test_public_names_are_exported():
  for name in con.__all__:
    assert getattr(losses, name) is getattr(con, name)


def test_two_steps_match_repdistiller_memory_and_loss():
  rng = np.random.default_rng(0)
  ref = _NpCRD(rng)
  mem_s, mem_t = jnp.asarray(ref.mem_v1, jnp.float32), jnp.asarray(ref.mem_v2, jnp.float32)
  z = None
  for step in range(2):
    v1, v2, y, idx = _batch(rng)
    inputs = _jax_inputs(np.asarray(mem_s, np.float64), np.asarray(mem_t, np.float64),
                         v1, v2, y, idx)
    if step == 0:
      z = _norms(**inputs)  # frozen after the first step, as the reference
    got = _crd(**inputs, normalizers=z)
    want = ref.step(v1, v2, y, idx)
    assert got.shape == (B,)
    np.testing.assert_allclose(got.mean(), want, rtol=1e-5)
    np.testing.assert_allclose(z, (ref.z_v1, ref.z_v2), rtol=1e-5)
    mem_s = _update(mem_s, inputs["student_embed"], jnp.asarray(y))
    mem_t = _update(mem_t, inputs["teacher_embed"], jnp.asarray(y))
    np.testing.assert_allclose(mem_s, ref.mem_v1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mem_t, ref.mem_v2, rtol=1e-5, atol=1e-6)
  # At the first step the default (batch-estimated) Z equals the frozen one.
  np.testing.assert_allclose(_crd(**inputs), _crd(**inputs, normalizers=_norms(**inputs)),
                             rtol=1e-6)


def test_hand_case_one_negative():
  # d = 1, T = 1, N = 1, K = 1, Z = 1: P_pos = e^1, P_neg = e^-1, K/N = 1.
  one = jnp.ones((1, 1))
  got = losses.crd(one, one, -jnp.ones((1, 1, 1)), -jnp.ones((1, 1, 1)), num_data=1,
                   temperature=1.0, normalizers=(1.0, 1.0))
  e = np.e
  per_side = -np.log(e / (e + 1 + 1e-7)) - np.log(1 / (1 / e + 1 + 1e-7))
  np.testing.assert_allclose(got, [2 * per_side], rtol=1e-6)


def test_mask_gradients_and_degenerate_inputs():
  rng = np.random.default_rng(1)
  mem = _unit(rng.normal(size=(N, D)))
  v1, v2, y, idx = _batch(rng)
  inputs = _jax_inputs(mem, mem, v1, v2, y, idx)
  where = jnp.array([True, False, True, True])
  keep = np.asarray(where)
  got = _crd(**inputs, where=where)
  sub = {k: v[keep] for k, v in inputs.items()}
  np.testing.assert_allclose(got[keep], _crd(**sub), rtol=1e-5)
  assert float(got[1]) == 0.0
  np.testing.assert_allclose(_norms(**inputs, where=where), _norms(**sub), rtol=1e-5)
  none = jnp.zeros((B,), bool)
  f = jax.jit(jax.value_and_grad(
      lambda s, t, w: _crd(**{**inputs, "student_embed": s, "teacher_embed": t},
                           where=w).sum(), argnums=(0, 1)))
  val, (gs, gt) = f(inputs["student_embed"], inputs["teacher_embed"], none)
  assert float(val) == 0.0 and np.all(gs == 0) and np.all(gt == 0)
  # Both embeds are trainable (RepDistiller trains the teacher's Embed head too).
  val, (gs, gt) = f(inputs["student_embed"], inputs["teacher_embed"], where)
  assert np.any(gs != 0) and np.any(gt != 0) and np.all(gs[1] == 0)
  # Unnormalised inputs up to 1e4, zero rows and bfloat16: finite values and gradients.
  big = {k: jnp.asarray(rng.normal(size=v.shape) * 1e4, jnp.float32) for k, v in inputs.items()}
  big["student_embed"] = big["student_embed"].at[0].set(0.0)
  for args in (big, {k: v.astype(jnp.bfloat16) for k, v in inputs.items()}):
    val, grads = jax.jit(jax.value_and_grad(lambda a: _crd(**a).sum()))(args)
    assert val.dtype == jnp.float32 and np.isfinite(val)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves(grads))
  # Memory rows receive no gradient.
  g_neg = jax.jit(jax.grad(lambda n: _crd(**{**inputs, "student_negatives": n}).sum()))(
      inputs["student_negatives"])
  assert np.all(g_neg == 0)


def test_check_grads_and_vmap():
  rng = np.random.default_rng(2)
  mem = _unit(rng.normal(size=(N, D)))
  v1, v2, y, idx = _batch(rng)
  inputs = _jax_inputs(mem, mem, v1, v2, y, idx)
  z = _norms(**inputs)
  f = jax.jit(lambda s: _crd(**{**inputs, "student_embed": s}, normalizers=z).sum())
  check_grads(f, (inputs["student_embed"],), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)
  stacked = {k: jnp.stack([v, v]) for k, v in inputs.items()}
  batched = jax.jit(jax.vmap(lambda a: losses.crd(**a, num_data=N, temperature=T)))(stacked)
  np.testing.assert_allclose(batched[1], _crd(**inputs), rtol=1e-5)


def test_memory_update_mask_and_hand_case():
  mem = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  emb = jnp.array([[0.0, 1.0], [1.0, 0.0]])
  new = losses.crd_memory_update(mem, emb, jnp.array([0, 2]), momentum=0.5,
                                 where=jnp.array([True, False]))
  r = 1 / np.sqrt(2)
  np.testing.assert_allclose(new, [[r, r], [0.0, 1.0], [1.0, 0.0]], rtol=1e-6)


def test_shape_errors_name_both_shapes():
  e, n = jnp.ones((4, 8)), jnp.ones((4, 6, 8))
  with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 7\)"):
    losses.crd(e, jnp.ones((4, 7)), n, n, num_data=N)
  with pytest.raises(ValueError, match=r"\(4, 6, 7\).*\(4, 8\)"):
    losses.crd(e, e, jnp.ones((4, 6, 7)), jnp.ones((4, 6, 7)), num_data=N)
  with pytest.raises(ValueError, match=r"\(4, 6, 8\).*\(4, 5, 8\)"):
    losses.crd(e, e, n, jnp.ones((4, 5, 8)), num_data=N)
  with pytest.raises(ValueError, match=r"\(3, 8\).*\(4, 8\)"):
    losses.crd(e, e, n, n, num_data=N, student_positive=jnp.ones((3, 8)))
  with pytest.raises(ValueError, match=r"\(4, 3\).*\(10, 8\)"):
    losses.crd_memory_update(jnp.ones((10, 8)), jnp.ones((4, 3)), jnp.arange(4))


def test_crd_from_scores_matches_repdistiller_nce_on_given_scores():
  """The NCE part alone, against RepDistiller's ContrastLoss restated per row in float64."""
  rng = np.random.default_rng(7)
  b, k = 5, 6
  s_scores, t_scores = (rng.normal(size=(2, b, k + 1)) * 3).astype(np.float32)
  where = np.arange(b) != 1
  s_scores[~where] = t_scores[~where] = 0.0  # masked rows must be finite

  pn = k / N
  x_s, x_t = (np.exp(x[where].astype(np.float64)) for x in (s_scores, t_scores))

  def nce(p):  # per row, p = exp(score) / Z, positive in column 0
    return -(np.log(p[:, 0] / (p[:, 0] + pn + 1e-7))
             + np.log(pn / (p[:, 1:] + pn + 1e-7)).sum(axis=1))

  z_s, z_t = x_s.mean() * N, x_t.mean() * N  # RepDistiller's first-step Z over the valid rows
  expected = np.zeros(b)
  expected[where] = nce(x_s / z_s) + nce(x_t / z_t)
  np.testing.assert_allclose(losses.crd_from_scores(s_scores, t_scores, num_data=N, where=where),
                             expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      losses.crd_normalizers_from_scores(s_scores, t_scores, num_data=N, where=where),
      (z_s, z_t), rtol=1e-5)
  # Given (fixed) normalisers are used as they are.
  z_fixed = (2.0 * z_s, 0.5 * z_t)
  np.testing.assert_allclose(
      losses.crd_from_scores(s_scores, t_scores, num_data=N, normalizers=z_fixed,
                             where=where)[where],
      nce(x_s / z_fixed[0]) + nce(x_t / z_fixed[1]), rtol=1e-5)
  with pytest.raises(ValueError, match="K \\+ 1"):
    losses.crd_from_scores(s_scores[:, :1], t_scores[:, :1], num_data=N)
