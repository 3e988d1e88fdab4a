"""FitNet's ConvReg and CC's LinearEmbed: RepDistiller's connectors as term parameters.

The values against RepDistiller's PyTorch modules (same inputs and weights) are checked on the
golden fixture `tests/fixtures/train/connectors_golden.npz` when present; the shapes, the
initialisation bounds and a real resnet32x4 -> resnet8x4 step always run.
"""

import math
import os

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


# ------------------------------------------------------------------ against RepDistiller's modules

_GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "..", "fixtures", "train",
                               "connectors_golden.npz"))
_NHWC = (0, 2, 3, 1)


def _ctx(f_s, f_t, params=None, state=None, feature="stage2"):
  from kd_jax.train import TermContext  # pylint: disable=g-import-not-at-top
  outs = lambda f: Outputs(jnp.zeros((f.shape[0], 10)), {feature: jnp.asarray(f)})  # noqa: E731
  return TermContext(student=outs(f_s), teacher=outs(f_t), batch={"label": jnp.zeros(
      (f_s.shape[0],), jnp.int32)}, student_params=None, axis_name=None,
      step=jnp.zeros((), jnp.int32), params=params, state=state)


def _relerr(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12)


@pytest.mark.parametrize("case", ["same", "half", "double", "shrink"])
def test_fitnet_convreg_equals_repdistiller(case):
  g = {k[len(f"fitnet/{case}/"):]: _GOLDEN[k] for k in _GOLDEN.files
       if k.startswith(f"fitnet/{case}/")}
  f_s, f_t = np.transpose(g["f_s"], _NHWC), np.transpose(g["f_t"], _NHWC)
  term = fitnet_lib.FitNet()
  ctx = _ctx(f_s, f_t)
  params, state = term.init(jax.random.key(0), *(jax.eval_shape(lambda o=o: o)
                                                 for o in (ctx.student, ctx.teacher)))
  w = g["sd/conv.weight"]
  # Conv2d [out, in, kh, kw] -> HWIO; ConvTranspose2d [in, out, kh, kw] -> the flipped HWIO
  # kernel of the equivalent convolution over the 2-dilated input.
  kernel = (np.transpose(w, (2, 3, 0, 1))[::-1, ::-1] if case == "double"
            else np.transpose(w, (2, 3, 1, 0)))
  nnx.replace_by_pure_dict(params, {"kernel": jnp.asarray(kernel.copy()),
                                    "bias": g["sd/conv.bias"],
                                    "bn": {"scale": g["sd/bn.weight"], "bias": g["sd/bn.bias"]}})
  nnx.replace_by_pure_dict(state, {"bn": {"mean": g["sd/bn.running_mean"],
                                          "var": g["sd/bn.running_var"]}})

  def loss(p):
    return term(_ctx(f_s, f_t, p, state))

  (value, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert _relerr(value, g["loss"]) < 1e-5
  new_mean = np.asarray(new_state["bn"]["mean"].get_value())
  new_var = np.asarray(new_state["bn"]["var"].get_value())
  reg = nnx.merge(fitnet_lib._graphdef(f_s.shape, f_t.shape), *jax.tree.map(
      lambda v: v, (params, state)))
  assert _relerr(reg(jnp.asarray(f_s)), np.transpose(g["out"], _NHWC)) < 1e-5
  gk = np.asarray(grads["kernel"].get_value())
  want_gk = (np.transpose(g["grad/conv.weight"], (2, 3, 0, 1))[::-1, ::-1] if case == "double"
             else np.transpose(g["grad/conv.weight"], (2, 3, 1, 0)))
  assert _relerr(gk, want_gk) < 1e-4
  # A bias before train-mode batch norm has zero gradient: both sides are rounding noise.
  scale = np.max(np.abs(want_gk))
  assert np.max(np.abs(np.asarray(grads["bias"].get_value()))) < 1e-5 * scale
  assert np.max(np.abs(g["grad/conv.bias"])) < 1e-5 * scale
  assert _relerr(grads["bn"]["scale"].get_value(), g["grad/bn.weight"]) < 1e-4
  assert _relerr(grads["bn"]["bias"].get_value(), g["grad/bn.bias"]) < 1e-4
  assert _relerr(new_mean, g["after/bn.running_mean"]) < 1e-5
  assert _relerr(new_var, g["after/bn.running_var"]) < 1e-5


def test_cc_linear_embed_equals_repdistiller():
  from kd_jax.train.terms import cc as cc_lib  # pylint: disable=g-import-not-at-top
  g = {k[3:]: _GOLDEN[k] for k in _GOLDEN.files if k.startswith("cc/")}
  # torch.nn.Linear stores [out, in]; the term's kernels are [in, out].
  head = lambda who: {"kernel": jnp.asarray(g[f"sd/embed_{who}.linear.weight"].T),  # noqa: E731
                      "bias": jnp.asarray(g[f"sd/embed_{who}.linear.bias"])}
  params = {"student": head("s"), "teacher": head("t")}
  term = cc_lib.CC(feature="embedding")
  value, grads = jax.value_and_grad(
      lambda p: term(_ctx(g["f_s"], g["f_t"], p, feature="embedding")))(params)
  assert _relerr(cc_lib.linear_embed(params["student"], g["f_s"]), g["e_s"]) < 1e-5
  assert _relerr(cc_lib.linear_embed(params["teacher"], g["f_t"]), g["e_t"]) < 1e-5
  assert _relerr(value, g["loss"]) < 1e-5
  for who in ("s", "t"):
    side = "student" if who == "s" else "teacher"
    assert _relerr(grads[side]["kernel"], g[f"grad/embed_{who}.linear.weight"].T) < 1e-4
    assert _relerr(grads[side]["bias"], g[f"grad/embed_{who}.linear.bias"]) < 1e-4
