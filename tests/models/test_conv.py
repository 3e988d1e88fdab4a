"""The GEMM filter-gradient convolution: same forward, same gradients as lax's convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax.models._conv import conv_general_dilated

_DN = ("NHWC", "HWIO", "NHWC")


def _np_conv_grads(x, w, g, stride, pad):
  """float64 input and filter gradients of a NHWC/HWIO convolution, by explicit tap loops."""
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  kh, kw = w.shape[:2]
  (pt, pb), (pl, pr) = pad
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  dxp = np.zeros_like(xp)
  dw = np.zeros_like(w)
  _, ho, wo, _ = g.shape
  for i in range(kh):
    for j in range(kw):
      win = (slice(None), slice(i, i + stride * (ho - 1) + 1, stride),
             slice(j, j + stride * (wo - 1) + 1, stride), slice(None))
      dw[i, j] = np.einsum("bhwc,bhwo->co", xp[win], g)
      dxp[win] += np.einsum("bhwo,co->bhwc", g, w[i, j])
  dx = dxp[:, pt:xp.shape[1] - pb, pl:xp.shape[2] - pr, :]
  return dx, dw


@pytest.mark.parametrize("k,stride,pad", [(3, 1, ((1, 1), (1, 1))), (3, 2, ((1, 1), (1, 1))),
                                          (1, 2, ((0, 0), (0, 0))), (3, 2, ((0, 1), (1, 0)))])
def test_forward_and_gradients_match_float64_reference(k, stride, pad):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 9, 8, 4)).astype(np.float32)
  w = rng.normal(size=(k, k, 4, 5)).astype(np.float32)

  def f(conv):
    return lambda a, b: conv(a, b, (stride, stride), pad, dimension_numbers=_DN)

  y_ref = f(jax.lax.conv_general_dilated)(x, w)
  y, vjp = jax.vjp(f(conv_general_dilated), x, w)
  np.testing.assert_array_equal(y, y_ref)
  g = rng.normal(size=y.shape).astype(np.float32)
  dx, dw = jax.jit(vjp)(g)
  dx_np, dw_np = _np_conv_grads(x, w, g, stride, pad)
  np.testing.assert_allclose(dx, dx_np, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, dw_np, rtol=1e-4, atol=1e-4)


def test_grouped_convolution_falls_back_to_lax():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)

  def loss(conv):
    return lambda b: jnp.sum(conv(x, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN,
                                  feature_group_count=2) ** 2)

  np.testing.assert_allclose(jax.grad(loss(conv_general_dilated))(w),
                             jax.grad(loss(jax.lax.conv_general_dilated))(w), rtol=1e-5)


def test_nnx_conv_uses_it_with_bfloat16_compute():
  conv = nnx.Conv(3, 4, (3, 3), padding=((1, 1), (1, 1)), dtype=jnp.bfloat16,
                  conv_general_dilated=conv_general_dilated, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 5, 5, 3), jnp.float32)
  grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32)))(conv)
  assert grads["kernel"][...].dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(grads["kernel"][...])))
