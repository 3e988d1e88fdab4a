"""FitNet, AT and NST against numpy float64 re-statements of RepDistiller's formulas.

The `_np_*` functions restate HobbitLong/RepDistiller `distiller_zoo/{FitNet,AT,NST}.py` on NCHW
arrays; the JAX losses see the same data transposed to NHWC. The reference reduces to a batch
mean, so it is compared with the mean of the per-example output.
"""

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from kd_jax import losses
from kd_jax.losses import _feature as feat

_NAMES = ("fitnet", "attention_transfer", "nst")
_JIT = {name: jax.jit(getattr(losses, name)) for name in _NAMES}


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)), jnp.float32)


def _np_normalize(x, axis):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _np_fitnet(s, t):
  return np.mean((s - t) ** 2)


def _np_at(s, t, p=2):
  def at(f):
    return _np_normalize((f**p).mean(1).reshape(f.shape[0], -1), 1)
  return np.mean((at(s) - at(t)) ** 2)


def _np_nst(s, t):
  def prep(f):
    return _np_normalize(f.reshape(f.shape[0], f.shape[1], -1), 2)
  def poly(a, b):  # [n, Ca, X], [n, Cb, X] -> [n, Cb, Ca]
    return ((a[:, None, :, :] * b[:, :, None, :]).sum(-1)) ** 2
  s, t = prep(s), prep(t)
  return poly(t, t).mean() + poly(s, s).mean() - 2 * poly(s, t).mean()


_REFS = {"fitnet": _np_fitnet, "attention_transfer": _np_at, "nst": _np_nst}


def _pair(rng, name, b=3):
  s = rng.normal(size=(b, 4, 3, 3))
  t = rng.normal(size=(b, 4 if name == "fitnet" else 6, 3, 3)) * 2.0
  return s, t


def test_public_names_are_exported():
  for name in feat.__all__:
    assert getattr(losses, name) is getattr(feat, name)


@pytest.mark.parametrize("name", _NAMES)
def test_batch_mean_matches_repdistiller(name):
  rng = np.random.default_rng(0)
  s, t = _pair(rng, name)
  got = _JIT[name](_nhwc(s), _nhwc(t))
  assert got.shape == (3,)
  np.testing.assert_allclose(got.mean(), _REFS[name](s, t), rtol=1e-5)
  # Per example: the reference on a batch of one.
  np.testing.assert_allclose(got, [_REFS[name](s[i:i + 1], t[i:i + 1]) for i in range(3)],
                             rtol=1e-5)


def test_attention_transfer_p4_and_layer_lists():
  rng = np.random.default_rng(1)
  s1, t1 = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 4, 4))
  s2, t2 = rng.normal(size=(2, 6, 2, 2)), rng.normal(size=(2, 2, 2, 2))
  got = losses.attention_transfer([_nhwc(s1), _nhwc(s2)], [_nhwc(t1), _nhwc(t2)], p=4)
  np.testing.assert_allclose(got.mean(), _np_at(s1, t1, 4) + _np_at(s2, t2, 4), rtol=1e-5)


def test_nst_layer_lists():
  rng = np.random.default_rng(2)
  s1, t1 = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 4, 4))
  s2, t2 = rng.normal(size=(2, 6, 2, 2)), rng.normal(size=(2, 2, 2, 2))
  got = losses.nst((_nhwc(s1), _nhwc(s2)), (_nhwc(t1), _nhwc(t2)))
  np.testing.assert_allclose(got.mean(), _np_nst(s1, t1) + _np_nst(s2, t2), rtol=1e-5)


def test_hand_cases():
  # FitNet: one example, diff (1, 2, 3, 4) over a 1x2x2 map -> (1 + 4 + 9 + 16)/4.
  s = jnp.arange(1.0, 5.0).reshape(1, 1, 2, 2)
  np.testing.assert_allclose(losses.fitnet(s, jnp.zeros_like(s)), [7.5], rtol=1e-6)
  # AT: a 1x2 map with one channel. Student (1, 0) -> at (1, 0); teacher (1, 1) -> at (1, 1)/sqrt2.
  s = jnp.array([[[[1.0], [0.0]]]])
  t = jnp.array([[[[1.0], [1.0]]]])
  r = 1 / np.sqrt(2)
  np.testing.assert_allclose(losses.attention_transfer(s, t), [((1 - r) ** 2 + r**2) / 2],
                             rtol=1e-6)
  # NST: one channel each -> unit vectors; loss = 1 + 1 - 2 cos^2. Student (1, 0), teacher (1, 1).
  np.testing.assert_allclose(losses.nst(s, t), [2 - 2 * 0.5], rtol=1e-6)


@pytest.mark.parametrize("name", _NAMES)
def test_where_masks_examples(name):
  rng = np.random.default_rng(3)
  s, t = _pair(rng, name, b=4)
  s[1] = np.inf  # garbage in a masked row must not leak into values or gradients
  where = jnp.array([True, False, True, True])
  fn = lambda s: _JIT[name](s, _nhwc(t), where=where).sum()
  got = _JIT[name](_nhwc(s), _nhwc(t), where=where)
  assert float(got[1]) == 0.0
  keep = np.asarray(where)
  np.testing.assert_allclose(got[keep].mean(), _REFS[name](s[keep], t[keep]), rtol=1e-5)
  g = jax.jit(jax.grad(fn))(_nhwc(s))
  assert np.all(np.isfinite(g)) and np.all(g[1] == 0)
  none = jnp.zeros((4,), bool)
  val, g = jax.jit(jax.value_and_grad(
      lambda s: _JIT[name](s, _nhwc(t), where=none).sum()))(_nhwc(s))
  assert float(val) == 0.0 and np.all(g == 0)


@pytest.mark.parametrize("name", _NAMES)
def test_degenerate_inputs_finite(name):
  rng = np.random.default_rng(4)
  s, t = _pair(rng, name)
  s, t = s * 1e4, t * 1e4
  s[0] = 0.0
  t[2] = 0.0
  vg = jax.jit(jax.value_and_grad(lambda s, t: _JIT[name](s, t).sum()))
  for args in [(_nhwc(s), _nhwc(t)), (jnp.zeros_like(_nhwc(s)), jnp.zeros_like(_nhwc(t))),
               (_nhwc(s).astype(jnp.bfloat16), _nhwc(t).astype(jnp.bfloat16))]:
    val, g = vg(*args)
    assert val.dtype == jnp.float32 and np.isfinite(val)
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


def test_bfloat16_is_computed_in_float32():
  rng = np.random.default_rng(5)
  s, t = _pair(rng, "nst")
  s16, t16 = _nhwc(s).astype(jnp.bfloat16), _nhwc(t).astype(jnp.bfloat16)
  s64 = np.transpose(np.asarray(s16.astype(jnp.float32), np.float64), (0, 3, 1, 2))
  t64 = np.transpose(np.asarray(t16.astype(jnp.float32), np.float64), (0, 3, 1, 2))
  for name in ("attention_transfer", "nst"):
    got = _JIT[name](s16, t16)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got.mean(), _REFS[name](s64, t64), rtol=1e-5)


@pytest.mark.parametrize("name", _NAMES)
def test_gradients_of_both_sides_and_vmap(name):
  # The losses never stop gradients (the train step freezes the teacher): both sides are checked
  # against finite differences.
  rng = np.random.default_rng(6)
  s, t = _pair(rng, name, b=2)
  s, t = _nhwc(s), _nhwc(t)
  check_grads(jax.jit(lambda s: _JIT[name](s, t).sum()), (s,), order=1, modes=("rev",),
              atol=2e-2, rtol=2e-2)
  check_grads(jax.jit(lambda t: _JIT[name](s, t).sum()), (t,), order=1, modes=("rev",),
              atol=2e-2, rtol=2e-2)
  assert np.any(jax.jit(jax.grad(lambda t: _JIT[name](s, t).sum()))(t) != 0)
  batched = jax.jit(jax.vmap(getattr(losses, name)))(jnp.stack([s, s * 2]), jnp.stack([t, t]))
  np.testing.assert_allclose(batched[0], _JIT[name](s, t), rtol=1e-5)


def test_shape_errors_name_both_shapes():
  with pytest.raises(ValueError, match=r"\(2, 3, 3, 4\).*\(2, 3, 3, 5\)"):
    losses.fitnet(jnp.ones((2, 3, 3, 4)), jnp.ones((2, 3, 3, 5)))
  for fn in (losses.attention_transfer, losses.nst):
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 3\).*\(2, 2, 2, 3\)"):
      fn(jnp.ones((2, 4, 4, 3)), jnp.ones((2, 2, 2, 3)))
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 3\).*\(3, 4, 4, 3\)"):
      fn(jnp.ones((2, 4, 4, 3)), jnp.ones((3, 4, 4, 3)))
    with pytest.raises(ValueError, match="same"):
      fn([jnp.ones((2, 4, 4, 3))], [])
  with pytest.raises(ValueError, match="where"):
    losses.nst(jnp.ones((2, 4, 4, 3)), jnp.ones((2, 4, 4, 3)), where=jnp.ones((3,), bool))
