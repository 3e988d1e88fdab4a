"""`kd_jax.models._conv.conv_general_dilated` against autodiff of XLA's convolution.

The reference is `jax.vjp` / `jax.jvp` of `jax.lax.conv_general_dilated` (XLA's dilated-cotangent
input gradient and its own filter gradient), in float64; the polyphase gradients and tangents
(`kd_jax.backends.cpu`) must agree to rounding for every stride, kernel size, padding and odd or
even input size below.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax.models import _conv
from kd_jax.models import _layers as L

DN = ("NHWC", "HWIO", "NHWC")


def _reference(x, w, strides, pads):
  return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN)


def _ours(x, w, strides, pads):
  return _conv.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN)


CASES = [  # (height, width, kernel, stride, pad)
    (h, w, k, s, p)
    for h, w, k, s, p in itertools.product((8, 9), (7,), (1, 2, 3, 5), (2, 3), (0, 1, 2))
    if min(h, w) + 2 * p >= k
] + [(32, 32, 3, 2, 1), (16, 16, 1, 2, 0), (6, 6, 3, (2, 1), 1)]


@pytest.mark.parametrize("h,w,k,s,p", CASES)
def test_gradients_equal_autodiff_of_xla_conv_float64(h, w, k, s, p):
  with jax.enable_x64():
    rng = np.random.default_rng(h * 1000 + w * 100 + k * 10 + (s if isinstance(s, int) else 7))
    strides = (s, s) if isinstance(s, int) else s
    pads = ((p, p), (p, p))
    x = jnp.asarray(rng.standard_normal((2, h, w, 3)))
    kernel = jnp.asarray(rng.standard_normal((k, k, 3, 4)))
    y_ref, vjp_ref = jax.vjp(lambda a, b: _reference(a, b, strides, pads), x, kernel)
    y, vjp = jax.vjp(jax.jit(lambda a, b: _ours(a, b, strides, pads)), x, kernel)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    g = jnp.asarray(rng.standard_normal(y.shape))
    for got, want in zip(vjp(g), vjp_ref(g)):
      np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


def _jvps_and_hvp(conv, x, kernel, dx, dk, strides, pads):
  """jvp along (dx, dk), (dx, 0), (0, dk), and the Hessian of sum(sin(conv)) times (dx, dk)."""
  f = lambda a, b: conv(a, b, strides, pads)
  outs = [jax.jvp(f, (x, kernel), t)
          for t in ((dx, dk), (dx, jnp.zeros_like(dk)), (jnp.zeros_like(dx), dk))]
  grad = jax.grad(lambda a, b: jnp.sum(jnp.sin(f(a, b))), argnums=(0, 1))
  return outs, jax.jvp(grad, (x, kernel), (dx, dk))[1]


# The tangent's transpose is the gradient, checked on every case above; here one case per kind:
# 1x1 (the matrix product), even and odd kernels, phases without taps, stride 3, mixed strides.
TANGENT_CASES = [(9, 7, 1, 2, 0), (8, 7, 1, 3, 1), (8, 7, 2, 2, 1), (9, 7, 3, 2, 1),
                 (9, 7, 5, 3, 2), (8, 7, 3, 3, 0), (32, 32, 3, 2, 1), (16, 16, 1, 2, 0),
                 (6, 6, 3, (2, 1), 1)]


@pytest.mark.parametrize("h,w,k,s,p", TANGENT_CASES)
def test_tangents_and_hessian_products_equal_xla_conv_float64(h, w, k, s, p):
  """Forward mode (the polyphase tangent in x, the 1x1 matrix product in w) and
  forward-over-reverse, against the same of `jax.lax.conv_general_dilated`."""
  with jax.enable_x64():
    rng = np.random.default_rng(h * 1000 + w * 100 + k * 10 + (s if isinstance(s, int) else 7))
    strides = (s, s) if isinstance(s, int) else s
    pads = ((p, p), (p, p))
    x, dx = (jnp.asarray(rng.standard_normal((2, h, w, 3))) for _ in range(2))
    kernel, dk = (jnp.asarray(rng.standard_normal((k, k, 3, 4))) for _ in range(2))
    both = jax.jit(lambda *a: (_jvps_and_hvp(_ours, *a, strides, pads),
                               _jvps_and_hvp(_reference, *a, strides, pads)))
    got, want = both(x, kernel, dx, dk)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def test_tangents_of_one_argument_only():
  """Closing over x (or w) gives the rule a symbolic-zero tangent: the other part alone."""
  with jax.enable_x64():
    rng = np.random.default_rng(3)
    x, dx = (jnp.asarray(rng.standard_normal((2, 9, 9, 3))) for _ in range(2))
    for k, p in ((3, 1), (1, 0)):
      kernel, dk = (jnp.asarray(rng.standard_normal((k, k, 3, 4))) for _ in range(2))
      pads = ((p, p), (p, p))
      got_x = jax.jvp(lambda a: _ours(a, kernel, (2, 2), pads), (x,), (dx,))
      want_x = jax.jvp(lambda a: _reference(a, kernel, (2, 2), pads), (x,), (dx,))
      got_w = jax.jvp(lambda b: _ours(x, b, (2, 2), pads), (kernel,), (dk,))
      want_w = jax.jvp(lambda b: _reference(x, b, (2, 2), pads), (kernel,), (dk,))
      for a, b in zip((*got_x, *got_w), (*want_x, *want_w)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


def test_nnx_conv_uses_it_and_trains_like_xla():
  """A strided `L.conv2d` (as in every resnet/wrn projection) gives XLA's values and grads."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 16, 16, 8)), jnp.float32)
  for k, p in ((3, 1), (1, 0)):
    conv = L.conv2d(8, 16, k, 2, p, rngs=nnx.Rngs(0))
    assert conv.conv_general_dilated is _conv.conv_general_dilated
    assert "custom_jvp" in str(jax.make_jaxpr(conv)(x))  # the polyphase path, not a fallback
    graphdef, params = nnx.split(conv)
    kernel = conv.kernel[...]

    def loss_ours(x, params, graphdef=graphdef):
      return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

    def loss_xla(x, kernel, p=p):
      return jnp.sum(jnp.sin(_reference(x, kernel, (2, 2), ((p, p), (p, p)))))

    dx, dparams = jax.grad(loss_ours, argnums=(0, 1))(x, params)
    want = jax.grad(loss_xla, argnums=(0, 1))(x, kernel)
    for a, b in zip((dx, dparams["kernel"][...]), want):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_bfloat16_gradients_are_finite_and_close():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.bfloat16)
  pads = ((1, 1), (1, 1))
  got = jax.grad(lambda a, b: jnp.sum(_ours(a, b, (2, 2), pads).astype(jnp.float32)),
                 argnums=(0, 1))(x, kernel)
  want = jax.grad(lambda a, b: jnp.sum(_reference(a, b, (2, 2), pads).astype(jnp.float32)),
                  argnums=(0, 1))(x.astype(jnp.float32), kernel.astype(jnp.float32))
  for a, b in zip(got, want):
    assert a.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("kwargs", [
    {"window_strides": (1, 1), "padding": ((1, 1), (1, 1))},
    {"window_strides": (2, 2), "padding": "SAME"},
    {"window_strides": (2, 2), "padding": ((1, 1), (1, 1)), "rhs_dilation": (2, 2)},
])
def test_other_convolutions_are_xla_unchanged(kwargs):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda a, b: _conv.conv_general_dilated(
      a, b, dimension_numbers=DN, **kwargs))(x, kernel))
  assert "custom_jvp" not in jaxpr
  y = _conv.conv_general_dilated(x, kernel, dimension_numbers=DN, **kwargs)
  np.testing.assert_array_equal(
      y, jax.lax.conv_general_dilated(x, kernel, dimension_numbers=DN, **kwargs))
