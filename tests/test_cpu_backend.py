"""kd_jax.backends.cpu: forward mode through the zoo, GPU/TPU lowerings without CPU paths, and
the compiler-option fallback.

References: the same models with every convolution replaced by `jax.lax.conv_general_dilated`
(plain XLA autodiff, no custom rule) in float64; StableHLO text of `jax.export` lowerings, whose
CPU-only operations are the polyphase interleave (`stablehlo.pad` with interior padding), the
row-sum GEMV (the only `dot_general` at HIGHEST precision) and the absence of XLA's
dilated-cotangent input gradient (`lhs_dilate`); and a jaxlib rejecting a bogus option.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_jax import compile_options, losses, models
from kd_jax.backends import cpu

DN = ("NHWC", "HWIO", "NHWC")


def _plain_conv(lhs, rhs, *args, **kwargs):
  return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)


def _input(name, rng):
  """Each model's documented input, batch 2: CIFAR 32x32x3, digits 8x8x1, MNIST-1D 40x1
  signals, token ids."""
  if name == "text_transformer":
    return jnp.array([[1, 5, 6, 2, 0, 0], [1, 7, 8, 9, 10, 2]], jnp.int32)
  if "mnist1d" in name:
    shape = (2, 40, 1)
  elif name.endswith("_digits"):
    shape = (2, 8, 8, 1)
  else:
    shape = (2, 32, 32, 3)
  return jnp.asarray(rng.standard_normal(shape))


def _float64_model(name, rng):
  """(graphdef, plain-conv graphdef, params, other state) with random float64 parameters.

  Built from `nnx.eval_shape` (no initialiser runs); train-mode batch norm normalises every
  layer, so N(0, 0.5^2) kernels keep activations O(1).
  """
  options = {}
  if name == "text_transformer":
    options = dict(vocab_size=40, max_len=12, width=16, depth=2, num_heads=2)
  abstract = nnx.eval_shape(lambda: models.create(name, num_classes=10, **options))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  params = jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape) * (0.5 if len(s.shape) > 1 else 1.0)),
      params)
  rest = jax.tree.map(lambda s: jnp.ones(s.shape, jnp.float64)
                      if jnp.issubdtype(s.dtype, jnp.floating) else jnp.zeros(s.shape, s.dtype),
                      rest)
  plain = nnx.merge(graphdef, params, rest)
  for _, module in nnx.iter_graph(plain):
    if isinstance(module, nnx.Conv):
      module.conv_general_dilated = _plain_conv
  plain_graphdef, _, _ = nnx.split(plain, nnx.Param, ...)
  return graphdef, plain_graphdef, params, rest


def _has_strided_2d_conv(graphdef, params, rest):
  return any(isinstance(m, nnx.Conv) and len(m.kernel_size) == 2 and m.feature_group_count == 1
             and any(s > 1 for s in np.atleast_1d(m.strides)) and not isinstance(m.padding, str)
             for _, m in nnx.iter_graph(nnx.merge(graphdef, params, rest)))


def _apply(graphdef, params, rest, x, *, train):
  params, rest = jax.tree.map(lambda v: v, (params, rest))  # fresh Variables for this trace
  logits, features = nnx.merge(graphdef, params, rest)(x, train=train)
  return logits, features["embedding"]  # embedding: float64 (the logits are cast to float32)


# Deeper members of a family whose shallower members are checked numerically below: forward mode
# is traced through them (a custom_vjp anywhere would raise), without running them op by op.
TRACE_ONLY = {"resnet14", "resnet32", "resnet44", "resnet56", "resnet110", "resnet32x4",
              "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg11", "vgg13", "vgg16", "vgg19", "ResNet50",
              "ShuffleV2", "mobilenet_v1"}


@pytest.mark.parametrize("name", models.available())
def test_jvp_through_every_zoo_model_equals_plain_xla_float64(name):
  """`jax.jvp` along a tangent of the input and of every parameter at once (op by op: no
  compile of the whole model), against the same model with XLA's convolution. Models without a
  strided 2-D convolution must give plain XLA's program itself. tests/models/test_strided_conv.py
  checks the input-only and parameter-only tangents of the layer."""
  rng = np.random.default_rng(len(name))
  train = name != "text_transformer"  # its train mode is dropout; the others' is batch norm
  with jax.enable_x64():
    graphdef, plain_graphdef, params, rest = _float64_model(name, rng)
    x = _input(name, rng)
    dp = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
    if jnp.issubdtype(x.dtype, jnp.floating):
      primals, tangents = (x, params), (jnp.asarray(rng.standard_normal(x.shape)), dp)
      f = lambda g: lambda x, p: _apply(g, p, rest, x, train=train)
    else:  # token ids have no tangent
      primals, tangents = (params,), (dp,)
      f = lambda g: lambda p: _apply(g, p, rest, x, train=train)
    jvp = lambda g: jax.jvp(f(g), primals, tangents)[1]
    if name in TRACE_ONLY:
      traced = jax.make_jaxpr(lambda: jvp(graphdef))()
      # The strided convolutions' CPU tangent, where the model has one (vgg pools instead).
      assert ("platform_index" in str(traced)) == _has_strided_2d_conv(graphdef, params, rest)
      assert [v.aval.shape for v in traced.jaxpr.outvars] == [
          v.aval.shape for v in jax.make_jaxpr(lambda: jvp(plain_graphdef))().jaxpr.outvars]
      return
    got = jvp(graphdef)
    if _has_strided_2d_conv(graphdef, params, rest):
      forward = jax.make_jaxpr(lambda *a: f(graphdef)(*a))(*primals)
      assert "name=_strided_conv" in str(forward)  # the rule under test...
      assert "platform_index" in str(jax.make_jaxpr(lambda: jvp(graphdef))())  # ...and its tangent
      want = jvp(plain_graphdef)
    else:
      assert str(jax.make_jaxpr(lambda: jvp(graphdef))()) == str(
          jax.make_jaxpr(lambda: jvp(plain_graphdef))())
      want = got
    for a, b in zip(got, want, strict=True):
      assert a.dtype == b.dtype and bool(jnp.all(jnp.isfinite(a)))
      scale = float(jnp.max(jnp.abs(b)))
      assert scale > 0
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * scale, err_msg=name)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1"])
def test_hessian_vector_product_forward_over_reverse(name):
  """`jax.jvp(jax.grad(loss))` on the parameters equals plain XLA's, and a central finite
  difference of the gradient."""
  rng = np.random.default_rng(0)
  with jax.enable_x64():
    graphdef, plain_graphdef, params, rest = _float64_model(name, rng)
    x = _input(name, rng)
    v = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)

    def loss(graphdef, params):  # of the float64 embedding (the logits are rounded to float32)
      _, emb = _apply(graphdef, params, rest, x, train=True)
      return jnp.sum(jnp.sin(emb)) + 0.1 * jnp.sum(emb**2)

    def hvp(g):
      return jax.jit(lambda p, v: jax.jvp(jax.grad(lambda q: loss(g, q)), (p,), (v,))[1])(
          params, v)

    got, want = hvp(graphdef), hvp(plain_graphdef)
    eps = 1e-6
    grad = jax.jit(jax.grad(lambda q: loss(graphdef, q)))
    shift = lambda s: jax.tree.map(lambda p, t: p + s * t, params, v)
    fd = jax.tree.map(lambda a, b: (a - b) / (2 * eps), grad(shift(eps)), grad(shift(-eps)))
    for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(fd)):
      scale = float(jnp.max(jnp.abs(b))) + 1e-30
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * scale)
      np.testing.assert_allclose(a, c, rtol=0, atol=1e-6 * scale)


# ------------------------------------------------------------------------------------------------
# Lowerings: GPU/TPU programs contain XLA's own operations only


def _value_and_grad_text(platforms, name="resnet8"):
  """StableHLO of a KD step's value+grad (train mode, 10 classes, batch 2) for `platforms`."""
  abstract = nnx.eval_shape(lambda: models.create(name, num_classes=10))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

  def loss(params, rest, x, teacher_logits):
    logits, _ = _apply(graphdef, params, rest, x, train=True)
    return losses.kd(logits, teacher_logits, temperature=4.0).mean()

  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2, 10), jnp.float32)
  exported = jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=platforms)(
      params, rest, x, t)
  return exported.mlir_module()


def _markers(text):
  return {
      "interleave": len(re.findall(r"stablehlo\.pad [^\n]*interior = \[0, [1-9]", text)),
      "gemv": len(re.findall(r"stablehlo\.dot_general [^\n]*precision = \[HIGHEST, HIGHEST\]",
                             text)),
      "lhs_dilate": len(re.findall(r"lhs_dilate = \[", text)),
      "platform_index": text.count("_platform_index"),
  }


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_gpu_and_tpu_lowerings_have_no_cpu_paths(platform):
  on_cpu = _markers(_value_and_grad_text(["cpu"]))
  other = _markers(_value_and_grad_text([platform]))
  # The CPU program uses all three paths and never XLA's dilated-cotangent input gradient.
  assert on_cpu["interleave"] >= 4 and on_cpu["gemv"] >= 2 and on_cpu["lhs_dilate"] == 0
  # resnet8 has 4 strided convolutions: each input gradient is XLA's own off CPU.
  assert other == {"interleave": 0, "gemv": 0, "lhs_dilate": 4, "platform_index": 0}
  assert on_cpu["platform_index"] == 0


def test_a_multi_platform_lowering_carries_both_paths():
  """The markers above can see a CPU path: one program for cpu and cuda holds both branches
  and the runtime platform switch."""
  both = _markers(_value_and_grad_text(["cpu", "cuda"]))
  assert both["interleave"] >= 4 and both["gemv"] >= 2 and both["lhs_dilate"] >= 4
  assert both["platform_index"] > 0


def test_cpu_compilation_has_no_conditional_left():
  """`lax.platform_dependent` leaves one-branch `stablehlo.case`s on constants in a
  single-platform lowering; XLA:CPU folds them away."""
  abstract = nnx.eval_shape(lambda: models.create("resnet8", num_classes=10))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  grad = jax.jit(jax.grad(lambda p, r, x: jnp.sum(_apply(graphdef, p, r, x, train=True)[0])))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  hlo = grad.lower(params, rest, x).compile().as_text()
  assert " conditional(" not in hlo
  assert "lhs_dilate" not in hlo


# ------------------------------------------------------------------------------------------------
# Compiler options


@pytest.fixture
def fresh_probe():
  cpu._accepted.cache_clear()
  yield
  cpu._accepted.cache_clear()


def test_compiler_options_are_accepted_by_this_jaxlib(fresh_probe):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert cpu.compiler_options() == cpu.CPU_COMPILER_OPTIONS
  assert compile_options.compiler_options("cpu") == cpu.CPU_COMPILER_OPTIONS


def test_rejected_compiler_options_fall_back_with_one_warning(monkeypatch, fresh_probe):
  bogus = {"xla_cpu_experimental_ynn_fusion_type_renamed": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option"):
    jax.jit(lambda v: v + 1, compiler_options=bogus).lower(np.float32(0)).compile()
  monkeypatch.setattr(cpu, "CPU_COMPILER_OPTIONS", bogus)
  with pytest.warns(UserWarning, match="rejects the XLA:CPU compiler options") as record:
    assert compile_options.compiler_options() == {}
  assert len(record) == 1
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # probed once: no second warning
    assert compile_options.compiler_options() == {}
    assert cpu.compiler_options() == {}
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(compile_options.jit(lambda a: 2 * a)(x), 2 * np.arange(6.0).reshape(2, 3))


def test_a_renamed_option_value_also_falls_back(monkeypatch, fresh_probe):
  monkeypatch.setattr(cpu, "CPU_COMPILER_OPTIONS",
                      {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_RENAMED"})
  with pytest.warns(UserWarning, match="not a valid enum value"):
    assert cpu.compiler_options() == {}
