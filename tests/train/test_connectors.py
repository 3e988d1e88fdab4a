"""FitNet's ConvReg and CC's LinearEmbed: RepDistiller's connectors as term parameters.

The values against RepDistiller's PyTorch modules (same inputs and weights) are checked on the
golden fixture `tests/fixtures/train/connectors_golden.npz` when present; the shapes, the
initialisation bounds and a real resnet32x4 -> resnet8x4 step always run.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import models
from kd_jax.train import TrainState, make_train_step, sgd
from kd_jax.train.terms import fitnet as fitnet_lib
from kd_jax.train.terms import Outputs


def _outputs(shape_s, shape_t):
  s = Outputs(jax.ShapeDtypeStruct((4, 10), jnp.float32),
              {"stage2": jax.ShapeDtypeStruct(shape_s, jnp.float32)})
  t = Outputs(jax.ShapeDtypeStruct((4, 10), jnp.float32),
              {"stage2": jax.ShapeDtypeStruct(shape_t, jnp.float32)})
  return s, t


@pytest.mark.parametrize("shape_s,shape_t,kind,kernel", [
    ((4, 8, 8, 16), (4, 8, 8, 32), "conv", (1, 1, 16, 32)),
    ((4, 16, 16, 16), (4, 8, 8, 32), "conv_s2", (3, 3, 16, 32)),
    ((4, 4, 4, 16), (4, 8, 8, 32), "deconv", (4, 4, 16, 32)),
    ((4, 10, 10, 16), (4, 8, 8, 32), "conv", (3, 3, 16, 32)),
])
def test_convreg_kind_shapes_and_pytorch_init_bounds(shape_s, shape_t, kind, kernel):
  assert fitnet_lib.connector_kind(shape_s, shape_t) == kind
  term = fitnet_lib.FitNet()
  params, state = term.init(jax.random.key(0), *_outputs(shape_s, shape_t))
  w = np.asarray(params["kernel"].get_value())
  assert w.shape == kernel
  # PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); ConvTranspose2d's fan_in is
  # out_channels * k * k (its weight is [in, out, k, k]).
  fan_in = (kernel[3] if kind == "deconv" else kernel[2]) * kernel[0] * kernel[1]
  bound = 1 / math.sqrt(fan_in)
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
  np.testing.assert_array_equal(params["bn"]["scale"].get_value(), np.ones(kernel[3]))
  np.testing.assert_array_equal(state["bn"]["var"].get_value(), np.ones(kernel[3]))
  # The output has the teacher's shape.
  reg = nnx.merge(fitnet_lib._graphdef(shape_s, shape_t), params, state)
  assert reg(jnp.ones(shape_s)).shape == shape_t


def test_convreg_refuses_a_smaller_student_map():
  with pytest.raises(ValueError, match="cannot map"):
    fitnet_lib.connector_kind((2, 6, 6, 4), (2, 8, 8, 4))


def test_fitnet_and_cc_train_resnet32x4_to_resnet8x4_with_their_connectors():
  teacher = models.create("resnet32x4", num_classes=100, rngs=nnx.Rngs(1))
  t_graph, t_params, t_rest = nnx.split(teacher, nnx.Param, ...)
  t_vars = {"params": t_params, "batch_stats": t_rest}
  student = models.create("resnet8x4", num_classes=100, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 100, size=4).astype(np.int32)}
  step = make_train_step("ce:1,fitnet:100,cc:0.02", teacher_graphdef=t_graph, axis_name=None)
  state = TrainState.create(student, sgd(0.05, momentum=0.9, weight_decay=5e-4),
                            rng=jax.random.key(0))
  state = step.init(state, batch, t_vars)
  # resnet8x4's stage2 is [b, 16, 16, 128] like resnet32x4's: a 1x1 convolution connector.
  assert state.term_params["fitnet"]["kernel"].get_value().shape == (1, 1, 128, 128)
  assert state.term_params["cc"]["student"]["kernel"].shape == (256, 128)
  assert state.term_params["cc"]["teacher"]["kernel"].shape == (256, 128)
  new, metrics = jax.jit(step)(state, batch, t_vars)
  for k in ("loss", "loss/fitnet", "loss/cc", "loss/ce"):
    assert np.isfinite(float(metrics[k])) and float(metrics[k]) > 0, k
  # The connectors were trained, and the connector's running statistics moved.
  moved = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))  # noqa: E731
  assert moved(new.term_params["fitnet"]["kernel"].get_value(),
               state.term_params["fitnet"]["kernel"].get_value()) > 0
  assert moved(new.term_params["cc"]["teacher"]["kernel"],
               state.term_params["cc"]["teacher"]["kernel"]) > 0
  assert moved(new.term_state["fitnet"]["bn"]["mean"].get_value(),
               state.term_state["fitnet"]["bn"]["mean"].get_value()) > 0
