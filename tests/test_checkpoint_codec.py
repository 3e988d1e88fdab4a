"""The checkpoint codec: key-path names, round trip with PRNG keys, and mismatch messages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import checkpoint
from kd_jax.train import TrainState
from tests.train._toy import ToyNet


def _state():
  state = TrainState.create(ToyNet(width=4, rngs=nnx.Rngs(0)), optax.sgd(0.1, momentum=0.9),
                            rng=jax.random.key(3))
  return state.with_terms(params={"crd": {"w": jnp.ones((2, 3))}},
                          state={"crd": {"memory": jnp.arange(6.0).reshape(3, 2)}})


def test_paths_name_the_arrays_of_a_train_state():
  paths = set(checkpoint.flat_paths(_state()))
  # nnx.Param leaves end in "value" (the Variable's field).
  assert {"params/conv/kernel/value", "params/head/bias/value", "term_params/crd/w",
          "term_state/crd/memory", "step", "rng"} <= paths
  assert any(p.startswith("opt_state/") and p.endswith("/trace/student/conv/kernel/value")
             for p in paths)


def test_round_trip_keeps_values_and_keys():
  state = _state()
  saved = checkpoint.to_saveable(state)
  assert isinstance(saved["params"]["conv"]["kernel"]["value"], jax.Array)
  assert saved["rng"].dtype == jnp.uint32  # raw key data
  back = checkpoint.from_saveable(state, saved)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
    else:
      np.testing.assert_array_equal(a, b)


def test_mismatches_are_named():
  state = _state()
  target = checkpoint.abstract_saveable(state)
  meta = checkpoint.to_saveable(state)
  meta["term_state"]["crd"]["memory"] = jnp.zeros((4, 2))
  del meta["params"]["head"]["bias"]["value"]
  with pytest.raises(ValueError) as e:
    checkpoint.check_arrays("ckpt/7", target, meta, what="state")
  msg = str(e.value)
  assert "ckpt/7" in msg and "'params/head/bias/value'" in msg
  assert "'term_state/crd/memory'" in msg and "(4, 2)" in msg and "(3, 2)" in msg
