"""kd_jax.compile_options: the CPU options reach XLA and move convolutions off YNNPACK.

What can fail: a jaxlib whose option names or enum values changed (compilation then raises, or
the convolution stays inside a YNNPACK fusion), a `jit` that drops the options or the caller's
arguments, and results that differ from the default compilation.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import compile_options
from kd_jax.train import step as step_lib

_DN = ("NHWC", "HWIO", "NHWC")


def _conv_relu(x, w):
  return jax.nn.relu(jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                  dimension_numbers=_DN))


def _inputs():
  rng = np.random.default_rng(0)
  # jaxlib 0.10.2 hands YNNPACK convolutions with >= 32 channels (16 stay with XLA).
  x = jnp.asarray(rng.standard_normal((4, 8, 8, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 32, 32)) * 0.1, jnp.float32)
  return x, w


def _ynn_convolutions(hlo: str) -> int:
  """Number of fused computations that YNNPACK runs and that contain a convolution."""
  callers = re.findall(r"fusion\([^\n]*calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo)
  count = 0
  for name in callers:
    body = re.search(rf"%{re.escape(name)} [^\n]*\{{\n(.*?)\n\}}", hlo, re.S)
    count += bool(body and " convolution(" in body.group(1))
  return count


def _top_level_convolutions(hlo: str) -> int:
  entry = hlo[hlo.index("ENTRY"):]
  return len(re.findall(r" convolution\(", entry))


def test_options_on_cpu_only():
  assert compile_options.compiler_options("cpu") == compile_options.CPU_COMPILER_OPTIONS
  assert compile_options.compiler_options("gpu") == {}
  assert compile_options.compiler_options("tpu") == {}
  assert jax.default_backend() == "cpu"
  options = compile_options.compiler_options()
  options["x"] = "y"  # a fresh dict: the module constant is not mutated
  assert "x" not in compile_options.CPU_COMPILER_OPTIONS


def test_default_compilation_gives_the_convolution_to_ynnpack():
  """The premise of the module: if jaxlib stops doing this, the options may be obsolete."""
  x, w = _inputs()
  hlo = jax.jit(_conv_relu).lower(x, w).compile().as_text()
  assert _ynn_convolutions(hlo) == 1
  assert _top_level_convolutions(hlo) == 0


def test_jit_with_options_runs_the_convolution_in_xla_with_the_same_result():
  x, w = _inputs()
  fast = compile_options.jit(_conv_relu)
  hlo = fast.lower(x, w).compile().as_text()
  assert _ynn_convolutions(hlo) == 0
  assert _top_level_convolutions(hlo) == 1
  np.testing.assert_allclose(fast(x, w), jax.jit(_conv_relu)(x, w), rtol=1e-5, atol=1e-5)
  expected = np.zeros((4, 8, 8, 32))  # independent float64 reference
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  for i in range(3):
    for j in range(3):
      expected += np.einsum("bhwc,cd->bhwd", xp[:, i:i + 8, j:j + 8], np.asarray(w[i, j]))
  np.testing.assert_allclose(fast(x, w), np.maximum(expected, 0), rtol=1e-4, atol=1e-4)


def test_jit_passes_arguments_and_caller_options_through():
  x, w = _inputs()
  donated = compile_options.jit(lambda a, b: _conv_relu(a, b), donate_argnums=(0,))
  x_copy = jnp.array(x, copy=True)
  donated(x_copy, w)
  assert x_copy.is_deleted()
  # A caller's option wins over the library's: with the jaxlib default list again, YNNPACK
  # gets the convolution back.
  default_list = {"xla_cpu_experimental_ynn_fusion_type": (
      "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,"
      "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")}
  hlo = compile_options.jit(_conv_relu, compiler_options=default_list).lower(
      x, w).compile().as_text()
  assert _ynn_convolutions(hlo) == 1


def test_library_step_and_env_flag_compile_the_same_program(tmp_path):
  """The per-call options equal `XLA_FLAGS=...=-individual_convolution` on a real model step."""
  script = tmp_path / "count.py"
  script.write_text(
      "import re, sys\n"
      "import jax, jax.numpy as jnp\n"
      "from flax import nnx\n"
      "from kd_jax import models, compile_options\n"
      "from kd_jax.train import state as state_lib, step as step_lib\n"
      "with_teacher = sys.argv[1] == '1'\n"
      "use_options = sys.argv[2] == '1'\n"
      "st = state_lib.TrainState.create(models.create('resnet8', num_classes=10, "
      "rngs=nnx.Rngs(0)), state_lib.sgd(0.1), rng=jax.random.key(0))\n"
      "batch = {'image': jnp.zeros((4, 32, 32, 3)), 'label': jnp.zeros((4,), jnp.int32)}\n"
      "args = ()\n"
      "if with_teacher:\n"
      "  gd, p, s = nnx.split(models.create('resnet8', num_classes=10, rngs=nnx.Rngs(1)), "
      "nnx.Param, ...)\n"
      "  fn = step_lib.make_train_step('ce:0.1,kd:0.9', teacher_graphdef=gd, axis_name=None)\n"
      "  args = ({'params': p, 'batch_stats': s},)\n"
      "else:\n"
      "  fn = step_lib.make_train_step('ce:1', axis_name=None)\n"
      "jit = compile_options.jit if use_options else jax.jit\n"
      "hlo = jit(fn).lower(st, batch, *args).compile().as_text()\n"
      "entry = hlo[hlo.index('ENTRY'):]\n"
      "print(len(re.findall(r'__ynn_fusion', hlo)), len(re.findall(r' convolution\\(', entry)))\n")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}

  def count(use_options, flags):
    out = subprocess.run(
        [sys.executable, str(script), "1", "1" if use_options else "0"],
        env={**env, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        check=True, timeout=600)
    return tuple(int(v) for v in out.stdout.split()[-2:])

  by_options = count(True, "")
  by_flag = count(False, "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution")
  by_default = count(False, "")
  assert by_options == by_flag
  assert by_options[1] > 0  # convolutions run by XLA itself
  assert by_default[1] < by_options[1]  # under jaxlib's default YNNPACK takes those >= 32 wide


def test_data_parallel_step_compiles_with_the_options():
  """The library's data-parallel step (the train loop's default path) gets them."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from kd_jax import models, parallel  # pylint: disable=g-import-not-at-top
  from kd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(2)
  st = state_lib.TrainState.create(models.create("resnet8", num_classes=10, rngs=nnx.Rngs(0)),
                                   state_lib.sgd(0.1), rng=jax.random.key(0))
  batch = {"image": np.zeros((4, 32, 32, 3), np.float32), "label": np.zeros((4,), np.int32)}
  fn = parallel.data_parallel(step_lib.make_train_step("ce:1"), mesh)
  hlo = fn.lower(parallel.replicate(st, mesh), parallel.shard_batch(batch, mesh)).compile().as_text()
  assert _ynn_convolutions(hlo) == 0
  assert _top_level_convolutions(hlo) > 0
