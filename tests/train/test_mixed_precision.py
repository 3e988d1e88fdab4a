"""bfloat16 compute, float32 parameters: the KD step stays close to the float32 step.

Teacher and student are the zoo's cnn_digits on the real digits images, created with
`dtype=bfloat16` (experiments/precision.py: `config.{teacher,student}.dtype`) from the same
float32 parameters as the float32 pair. Tolerances, over STEPS steps of SGD with momentum on a
KD + SP objective (SP's Gram matrices read bfloat16 features):

- every step's loss within 1% (relative) of the float32 step's loss (measured: at most 0.14%);
- the final parameters' displacement from the common start within 5% (relative l2 norm) of
  the float32 displacement (measured: 1.4%).

Parameters, batch statistics, the optimizer state and every metric stay float32.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments import precision
from kd_jax import compile_options
from kd_jax import data
from kd_jax import models
from kd_jax.train.state import TrainState, sgd
from kd_jax.train.step import apply_model, make_train_step

STEPS = 5
LOSS_RTOL = 0.01
UPDATE_RTOL = 0.05
SPEC = "ce:0.1,kd:0.9,sp:300"


def _pair(dtype):
  """(teacher graphdef, teacher variables, student state), equal parameters for every dtype."""
  def make(width, seed):
    return nnx.jit(lambda: models.create(
        "cnn_digits", num_classes=10, width=width, dtype=dtype,
        rngs=nnx.Rngs(jax.random.key(seed, impl="unsafe_rbg"))))()

  t_graph, t_params, t_rest = nnx.split(make(16, 1), nnx.Param, ...)
  state = TrainState.create(make(4, 2), sgd(0.05, momentum=0.9, weight_decay=5e-4),
                            rng=jax.random.key(0))
  return t_graph, {"params": t_params, "batch_stats": t_rest}, state


def _run(dtype, batches):
  t_graph, t_vars, state = _pair(dtype)
  step = compile_options.jit(make_train_step(SPEC, teacher_graphdef=t_graph, axis_name=None))
  start, losses = state.params, []
  for b in batches:
    state, metrics = step(state, b, t_vars)
    losses.append(metrics)
  return start, state, losses


@pytest.fixture(scope="module")
def runs():
  splits = data.load_digits(seed=0)
  batches = list(data.batches(splits.train, batch_size=64, seed=0, num_epochs=1, prefetch=0))
  return _run(None, batches[:STEPS]), _run(jnp.bfloat16, batches[:STEPS])


def test_bf16_step_stays_close_to_f32(runs):
  (start32, f32, m32), (start16, bf16, m16) = runs
  for a, b in zip(jax.tree.leaves(start32), jax.tree.leaves(start16), strict=True):
    np.testing.assert_array_equal(a, b)  # the same float32 start
  for s, (a, b) in enumerate(zip(m32, m16)):
    np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=LOSS_RTOL,
                               err_msg=f"step {s}")
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64))  # noqa: E731
                                   for x in jax.tree.leaves(t)])
  moved32 = flat(f32.params) - flat(start32)
  moved16 = flat(bf16.params) - flat(start32)
  assert np.linalg.norm(moved32) > 1e-2  # the run moved
  assert np.linalg.norm(moved16 - moved32) <= UPDATE_RTOL * np.linalg.norm(moved32)


def test_bf16_keeps_parameters_optimizer_state_and_losses_in_f32(runs):
  _, (_, bf16, metrics) = runs
  for tree in (bf16.params, bf16.batch_stats, bf16.opt_state):
    for x in jax.tree.leaves(tree):
      assert x.dtype == jnp.float32, x.dtype
  assert all(v.dtype == jnp.float32 for v in metrics[-1].values())
  # ... while the network computes in bfloat16 (features) and hands float32 logits to the losses.
  out, _ = apply_model(bf16.graphdef, bf16.params, bf16.batch_stats,
                       np.zeros((2, 8, 8, 1), np.float32), train=False)
  assert out.logits.dtype == jnp.float32
  assert out.features["pre_pool"].dtype == jnp.bfloat16


def test_precision_config_keys():
  cfg = ml_collections.ConfigDict({"options": {"width": 4}, "dtype": "bfloat16",
                                   "param_dtype": "float32"})
  precision.check(cfg, "student")
  assert precision.model_options(cfg) == {"width": 4, "dtype": jnp.dtype(jnp.bfloat16)}
  assert precision.describe(cfg) == {"width": 4, "dtype": "bfloat16"}
  assert precision.model_options(ml_collections.ConfigDict({"dtype": "float32"})) == {}
  with pytest.raises(ValueError, match="student.dtype='float8'"):
    precision.check(ml_collections.ConfigDict({"dtype": "float8"}), "student")
  with pytest.raises(ValueError, match="teacher.param_dtype='bfloat16'.*float32"):
    precision.check(ml_collections.ConfigDict({"param_dtype": "bfloat16"}), "teacher")
