"""`kd_jax.models._layers.relu` against max(x, 0) computed in numpy, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import _layers as L


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_relu_values_match_numpy_max(dtype):
  x = np.array([-np.inf, -1e4, -2.5, -0.0, 0.0, 1e-30, 3.0, 1e4, np.inf, np.nan], np.float32)
  xd = jnp.asarray(x, dtype)
  got = L.relu(xd)
  assert got.dtype == jnp.dtype(dtype)
  want = np.maximum(np.asarray(xd, np.float64), 0.0)
  np.testing.assert_array_equal(np.asarray(got, np.float64), want)
  assert np.isnan(np.asarray(got, np.float32)[-1])  # NaN propagates, as jax.nn.relu


def test_relu_gradient_is_the_indicator_of_positive_inputs():
  x = np.array([-3.0, -1e-6, 0.0, 1e-6, 2.0, 1e4], np.float32)
  grad = jax.vmap(jax.grad(L.relu))(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(grad), (x > 0).astype(np.float32))


def test_relu_in_a_jitted_vjp_matches_masking_by_hand():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 8, 8, 16)).astype(np.float32)
  g = rng.standard_normal(x.shape).astype(np.float32)
  y, vjp = jax.vjp(jax.jit(L.relu), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), np.where(x > 0, x, 0))
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), np.where(x > 0, g, 0))
