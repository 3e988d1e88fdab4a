"""Vocabulary-sharded losses on 8 simulated CPU devices: inside `jax.shard_map` with the vocab
axis sharded, each token loss (and PTLoss) equals the unsharded loss, values and gradients, and
the compiled program holds no array with an axis of the full vocabulary size."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import losses

B, T, V = 3, 5, 104  # V = 8 x 13; no other axis of the program is 104 long
AXIS = "vocab"
LOGITS = P(None, None, AXIS)


def _mesh():
  if jax.device_count() < 8:
    pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")
  return jax.make_mesh((8,), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,))


def _full_vocab_shapes(hlo: str) -> list[str]:
  """Every array shape in the HLO text with an axis of length V."""
  return [m for m in re.findall(r"\[[0-9,]*\]", hlo) if str(V) in m.strip("[]").split(",")]


def _inputs():
  rng = np.random.default_rng(0)
  s = (3 * rng.standard_normal((B, T, V))).astype(np.float32)
  t = (3 * rng.standard_normal((B, T, V))).astype(np.float32)
  where = rng.random((B, T)) > 0.3
  return s, t, where


TOKEN_LOSSES = {
    "forward_kl": lambda s, t, **kw: losses.forward_kl(s, t, temperature=2.0, **kw),
    "reverse_kl": losses.reverse_kl,
    "jsd": lambda s, t, **kw: losses.generalized_jsd(s, t, beta=0.3, **kw),
    "tv": losses.total_variation,
}


def _check(mesh, loss, args, specs):
  """Sharded value and gradients (w.r.t. every argument but the mask) against the unsharded
  ones; returns the compiled sharded program's text."""
  diff = tuple(range(len(args) - 1))

  def sharded(*a):
    return jax.shard_map(lambda *x: loss(*x, vocab_axis=AXIS), mesh=mesh, in_specs=specs,
                         out_specs=P())(*a)

  put = [jax.device_put(x, NamedSharding(mesh, sp)) for x, sp in zip(args, specs)]
  compiled = jax.jit(jax.value_and_grad(sharded, argnums=diff)).lower(*put).compile()
  value, grads = compiled(*put)
  want, want_grads = jax.jit(jax.value_and_grad(loss, argnums=diff))(*args)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for g, w, sp in zip(grads, want_grads, specs):
    # The gradients stay sharded like their inputs.
    assert g.sharding.is_equivalent_to(NamedSharding(mesh, sp), g.ndim), (g.sharding, sp)
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max())
  return compiled.as_text()


@pytest.mark.parametrize("name", sorted(TOKEN_LOSSES))
def test_sharded_token_loss_equals_unsharded_and_never_gathers(name):
  mesh = _mesh()
  fn = TOKEN_LOSSES[name]
  # Every reduction at once: a scalar mixing the per-token, per-sequence and mean outputs.
  weights = np.linspace(0.5, 1.5, B * T, dtype=np.float32).reshape(B, T)

  def loss(s, t, where, vocab_axis=None):
    kw = dict(where=where, vocab_axis=vocab_axis)
    return (jnp.sum(weights * fn(s, t, reduction="none", **kw))
            + jnp.sum(fn(s, t, reduction="sequence", **kw) * jnp.arange(1.0, B + 1))
            + fn(s, t, reduction="mean", **kw))

  hlo = _check(mesh, loss, _inputs(), (LOGITS, LOGITS, P()))
  assert not _full_vocab_shapes(hlo), _full_vocab_shapes(hlo)[:5]
  assert f"[{B},{T},{V // 8}]" in hlo  # each device holds its 13 vocabulary entries


@pytest.mark.parametrize("series_terms,per_class", [(None, True), (6, False)])
def test_sharded_ptloss_equals_unsharded_and_never_gathers(series_terms, per_class):
  mesh = _mesh()
  s, t, where = _inputs()
  rng = np.random.default_rng(1)
  eps = rng.uniform(-0.3, 0.3, size=(V, 3) if per_class else (3,)).astype(np.float32)

  def loss(s, t, eps, where, vocab_axis=None):
    return jnp.sum(losses.ptloss(s, t, eps, temperature=1.5, where=where,
                                 series_terms=series_terms, vocab_axis=vocab_axis))

  eps_spec = P(AXIS, None) if per_class else P()
  hlo = _check(mesh, loss, (s, t, eps, where), (LOGITS, LOGITS, eps_spec, P()))
  assert not _full_vocab_shapes(hlo), _full_vocab_shapes(hlo)[:5]


def test_the_shape_check_sees_a_gather():
  # The check above can fail: the same loss on all-gathered logits holds [3, 5, 104] arrays.
  mesh = _mesh()
  s, t, where = _inputs()

  def gathered(s, t, where):
    s, t = (jax.lax.all_gather(x, AXIS, axis=2, tiled=True) for x in (s, t))
    return losses.reverse_kl(s, t, where=where, reduction="mean")

  # (all_gather's result is typed as varying over the axis, hence check_vma=False.)
  f = jax.shard_map(gathered, mesh=mesh, in_specs=(LOGITS, LOGITS, P()), out_specs=P(),
                    check_vma=False)
  put = [jax.device_put(x, NamedSharding(mesh, sp))
         for x, sp in zip((s, t, where), (LOGITS, LOGITS, P()))]
  hlo = jax.jit(f).lower(*put).compile().as_text()
  assert f"[{B},{T},{V}]" in _full_vocab_shapes(hlo)
  np.testing.assert_allclose(jax.jit(f)(*put),
                             losses.reverse_kl(s, t, where=where, reduction="mean"), rtol=1e-6)
